"""Tensor (Megatron) partitioning: shards simulated in one process equal the model; weights split 1/n."""
from __future__ import annotations

import pytest
import torch

from _models import MODELS
from partitioner import partition
from partitioner.tensor import ALL_REDUCE

_SHARDED = {"gpt2", "llama", "bert", "t5", "vit", "mlp"}


def _outputs(out):
    if hasattr(out, "logits"):
        return out.logits
    return out


def _plan(name: str, n: int):
    model, args, kwargs = MODELS[name]()
    plan = partition(model, n, args, kwargs, strategy="tensor", device="h100", training=False)
    return model, args, kwargs, plan


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "t5", "vit", "mlp", "moe"])
def test_tensor_plan_equals_model_and_splits_weights(name, n):
    model, args, kwargs, plan = _plan(name, n)
    with torch.no_grad():
        torch.testing.assert_close(_outputs(plan(*args, **kwargs)), _outputs(model(*args, **kwargs)))
    info = plan.sharding
    assert len(plan.stages) == n and all(isinstance(s.module, torch.fx.GraphModule) for s in plan.stages)
    for stage in plan.stages:
        stage.module.graph.lint()
    print(f"{name} n={n}: largest shard holds {info.sharded_fraction:.3f} of the split parameters; "
          f"{len(info.column)} column-, {len(info.row)} row-parallel, {len(info.replicated)} replicated")
    if name in _SHARDED:
        assert info.row, plan.report()
        assert info.sharded_fraction == pytest.approx(1 / n, abs=1e-3)
        n_reduce = sum(node.target is ALL_REDUCE for node in plan.stages[0].module.graph.nodes)
        assert n_reduce == len(info.row)
        assert max(s.cost.param_bytes for s in plan.stages) < sum(p.numel() * 4 for p in model.parameters())
    else:   # MoE: expert einsums have no rule, so the layer stays whole on every shard
        assert not info.row and any("einsum" in why for why in info.replicated.values())
    assert "replicated" in plan.report() or not info.replicated


def test_gpt2_has_two_all_reduces_per_block_forward_and_backward():
    _, _, _, plan = _plan("gpt2", 2)
    blocks = plan.sharding.per_block()
    assert [(b, f, bw) for b, f, bw, _ in blocks] == [("transformer.h.0", 2, 2), ("transformer.h.1", 2, 2)]
    report = plan.report()
    assert "column-parallel" in report and "row-parallel" in report and "addmm_1" in report


def test_llama_grouped_kv_heads_not_divisible_stay_replicated_with_reason():
    # 2 KV heads on 4 shards: attention cannot split by heads; the MLP still does, and numbers stay exact
    model, args, kwargs, plan = _plan("llama", 4)
    info = plan.sharding
    reasons = [why for why in info.replicated.values() if "fewer heads than shards" in why]
    assert len(reasons) >= 2 and len(info.row) == 2     # down-projections only
    with torch.no_grad():
        torch.testing.assert_close(plan(*args, **kwargs).logits, model(*args, **kwargs).logits)


def test_llama_grouped_kv_heads_shard_when_n_divides_them():
    _, _, _, plan = _plan("llama", 2)
    assert len(plan.sharding.row) == 4                   # o_proj and down_proj of both layers
    local = [n for n in plan.stages[0].module.graph.nodes if n.target is torch.ops.aten.expand.default]
    assert any(list(n.args[1])[:2] == [2, 1] for n in local)   # repeat_kv expands 1 local KV head


def test_shard_rewrites_head_count_in_views():
    _, _, _, plan = _plan("gpt2", 4)
    code = plan.stages[1].module.code
    assert "_c10d_functional.all_reduce" in code and "wait_tensor" in code
    # c_attn is [64, 192] (q|k|v): each shard holds 1/4 of every block
    params = dict(plan.stages[1].module.named_parameters())
    assert tuple(params["transformer.h.0.attn.c_attn.weight"].shape) == (64, 48)
    assert tuple(params["transformer.h.0.attn.c_proj.weight"].shape) == (16, 64)
    assert tuple(params["transformer.h.0.attn.c_proj.bias"].shape) == (64,)   # added once, after the all-reduce


def test_drawing_has_one_cluster_per_shard_and_the_collectives(tmp_path):
    _, _, _, plan = _plan("gpt2", 2)
    text = open(plan.draw(str(tmp_path / "plan.dot"))).read()
    assert text.count("subgraph cluster_shard") == 2
    assert text.count("all-reduce (sum)") == len(plan.sharding.row)


def test_unknown_strategy_is_refused():
    model, args, kwargs = MODELS["mlp"]()
    with pytest.raises(ValueError, match="tensor"):
        partition(model, 2, args, kwargs, strategy="sequence")
