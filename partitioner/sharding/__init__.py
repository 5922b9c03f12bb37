"""Tensor (Megatron) sharding of a captured graph: layouts (``layout``), the per-op rule table
(``rules``), the region analysis that grows column-parallel regions to their row-parallel ends
(``regions``), and the rewrite of the graph into shard GraphModules with explicit collectives
(``rewrite``)."""
from .layout import Shard, join_shards_like, local_size
from .regions import MATMULS, Sharding, analyze, seed_input, whole_params
from .rewrite import ALL_GATHER, ALL_REDUCE, WAIT, block_of, build_shard, simulate, simulate_shards, sliced_params

__all__ = ["Shard", "Sharding", "analyze", "seed_input", "MATMULS", "build_shard", "sliced_params", "simulate",
           "simulate_shards", "block_of", "ALL_REDUCE", "ALL_GATHER", "WAIT", "local_size", "join_shards_like",
           "whole_params"]
