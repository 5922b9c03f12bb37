"""fxpart runtime: execute a partition plan across processes with torch.distributed."""

__all__: list[str] = []
