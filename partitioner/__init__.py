"""fxpart partitioner: cut a captured graph into pipeline stages or tensor shards."""

__all__: list[str] = []
