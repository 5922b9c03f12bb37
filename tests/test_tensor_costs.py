"""Tensor-parallel shard costs: what the rewrite adds to a shard is costed as what it is."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from partitioner import partition
from passes import DeviceSpec, capture, estimate
from passes._keys import COST


def test_row_parallel_bias_add_costs_an_elementwise_add_not_the_matmul():
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    x = torch.randn(64, 256)
    spec = DeviceSpec("toy", {torch.float32: 1e12}, memory_bandwidth_Bps=1e11, link_bandwidth_Bps=1e10, launch_s=0.0)
    gm = capture(model, (x,))
    estimate(gm, (x,), device=spec, training=True)
    whole = {n.name: n.meta[COST] for n in gm.graph.nodes if COST in n.meta}
    plan = partition(gm, 2, (x,), strategy="tensor", device=spec)
    shard = plan.stages[0].shards[0].module
    (bias_add,) = [n for n in shard.graph.nodes if n.target == torch.ops.aten.add.Tensor]
    row_matmul = whole["linear_1"]
    assert bias_add.meta[COST].time_s < row_matmul.time_s / 4
    total = sum(n.meta[COST].time_s for n in shard.graph.nodes if COST in n.meta and n.meta[COST].flops)
    assert total == pytest.approx(sum(c.time_s for c in whole.values() if c.flops) / 2)
    assert bias_add.meta[COST].flops == 0
