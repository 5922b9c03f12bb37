"""The tensor-parallel runtime across 2 processes (gloo on CPU) against single-process training.

Each slow test launches this file as a script once per rank; every rank makes the same tensor
plan, runs ``Runner`` (rank r holds shard r, every rank gets the full batch), checks the
forward, trains 3 SGD steps, gathers the state and saves / reloads / merges its shard; rank 0
also trains the unpartitioned model and writes everything to a file the test reads.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from runtime.launch import run_local

sys.path.insert(0, os.path.dirname(__file__))
from test_runtime import N_STEPS, _case, _close, _sgd   # noqa: E402

CASES = ("mlp", "gpt2", "llama", "moe", "phi3", "falcon", "mixtral")


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _worker(name: str, out_path: str) -> None:
    """One rank: forward, 3 training steps and the gathered state of the tensor plan's shard."""
    import torch.distributed as dist
    from partitioner import partition
    from runtime import Runner, merge_shards
    model, args, kwargs, target, loss_fn = _case(name, 4)
    plan = partition(model, 2, args, kwargs, strategy="tensor", device="h100")
    inputs = kwargs or args
    with torch.no_grad():
        want = _logits(model(*args, **kwargs)).clone()
    runner = Runner(plan, loss_fn=loss_fn, optimizer_fn=_sgd)
    rank = dist.get_rank()
    result = {"forward": _logits(runner.forward(*args, **kwargs)), "model_forward": want,
              "state_keys": list(model.state_dict()), "group_name": dist.group.WORLD.group_name,
              "planned_group": plan.sharding.group_name, "param_shards": dict(plan.sharding.param_shards)}
    with torch.no_grad():    # the plan's own shard graph: functional collectives on group "0"
        raw = plan.stages[0].shards[rank].module(*plan.signature.flatten(args, kwargs))
    result["raw_forward"] = raw[0]
    result["losses"] = [runner.step(inputs, target) for _ in range(N_STEPS)]
    result["state"] = runner.full_state_dict()
    shard_dir = os.path.join(os.path.dirname(out_path), f"{name}-shards")
    runner.save_shard(shard_dir)
    trained = {k: v.clone() for k, v in runner.module.state_dict().items()}
    with torch.no_grad():
        for p in runner.module.parameters():
            p.zero_()
    runner.load_shard(shard_dir)
    result["reloaded"] = all(torch.equal(v, trained[k]) for k, v in runner.module.state_dict().items())
    dist.barrier()
    result["merged"] = merge_shards(shard_dir) if rank == 0 else None
    local = runner.shard_state_dict()
    parts = [None, None] if rank == 0 else None
    dist.gather_object(local, parts, dst=0)
    losses = [None, None]
    dist.all_gather_object(losses, result["losses"])
    if rank == 0:
        result["replica_mismatch"] = [k for k in local if k not in plan.sharding.param_shards
                                      and plan.state_keys.get(k, k) not in plan.sharding.param_shards
                                      and not torch.equal(parts[0][k], parts[1][k])]
        result["losses_per_rank"] = losses
        result["reference"] = _reference(name)
        torch.save(result, out_path)
    dist.barrier()               # no rank tears down while a peer is still in a collective
    dist.destroy_process_group()


def _reference(name: str) -> dict:
    model, args, kwargs, target, loss_fn = _case(name, 4)
    opt = _sgd(model.parameters())
    losses = []
    for _ in range(N_STEPS):
        loss = loss_fn(model(*args, **kwargs), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _launch(name: str, tmp_path, world_size: int = 2, timeout_s: float = 120):
    out = tmp_path / f"{name}.pt"
    run_local([__file__, name, str(out)], world_size, timeout_s=timeout_s)
    return torch.load(out, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_tensor_parallel_training_matches_single_process(name, tmp_path):
    result = _launch(name, tmp_path)
    _close(result["forward"], result["model_forward"], f"{name} Runner.forward")
    _close(result["raw_forward"], result["model_forward"], f"{name} shard graph with functional all_reduce")
    assert result["planned_group"] == result["group_name"] == "0"
    ref = result["reference"]
    _close(torch.tensor(result["losses"]), torch.tensor(ref["losses"]), f"{name} losses")
    assert result["losses_per_rank"][0] == result["losses_per_rank"][1]
    assert list(result["state"]) == result["state_keys"] == list(ref["state"])
    for key, want in ref["state"].items():
        assert result["state"][key].shape == want.shape, key
        _close(result["state"][key], want, f"{name} {key}")
    assert result["reloaded"], "load_shard did not restore the saved shard"
    assert list(result["merged"]) == list(ref["state"])
    for key, want in result["state"].items():
        torch.testing.assert_close(result["merged"][key], want, rtol=0, atol=0, msg=f"merge_shards {key}")
    assert result["replica_mismatch"] == [], "replicated parameters diverged across ranks"
    if name == "llama":    # untied embedding: vocabulary-parallel (padding_idx 0 is shard 0's)
        assert result["param_shards"]["model.embed_tokens.weight"].dim == 0
        assert result["param_shards"]["lm_head.weight"].dim == 0       # vocabulary-parallel head, logits gathered
    if name == "moe":      # expert parallel: each rank holds half the experts
        assert {k: s.dim for k, s in result["param_shards"].items()} == {"w_in": 0, "w_out": 0}
    if name == "gpt2":
        assert result["param_shards"]["transformer.h.0.attn.c_attn.weight"].blocks == 3   # q | k | v
        assert "lm_head.weight" in result["state"] and "transformer.wte.weight" in result["state"]


def test_tensor_runner_refuses_a_world_size_other_than_the_number_of_shards(monkeypatch):
    import torch.distributed as dist
    from partitioner import partition
    from runtime import Runner
    model, args, _, _, _ = _case("mlp", 4)
    plan = partition(model, 2, args, strategy="tensor", device="h100")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="runs on 2 devices but the world size is 3"):
        Runner(plan)
    assert not dist.is_initialized()


def test_megatron_graph_puts_f_before_each_column_group_and_g_after_each_row_matmul():
    from partitioner import partition
    from runtime.tensor_parallel import copy_to_region, megatron_graph, reduce_from_region
    model, args, _, _, _ = _case("mlp", 4)
    plan = partition(model, 2, args, strategy="tensor", device="h100")
    gm = megatron_graph(plan.stages[0].shards[0].module, group_name="0", param_shards=plan.sharding.param_shards)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(reduce_from_region) == len(plan.sharding.row) == 2
    assert targets.count(copy_to_region) == len(plan.sharding.backward_collectives) == 2
    assert "_c10d_functional" not in gm.code
    assert dict(gm.named_parameters()).keys() == dict(plan.stages[0].shards[0].module.named_parameters()).keys()


def test_megatron_graph_gathers_a_vocabulary_parallel_head_with_an_autograd_gather():
    from partitioner import partition
    from runtime.tensor_parallel import gather_from_region, megatron_graph
    model, _, kwargs, _, _ = _case("llama", 4)
    plan = partition(model, 2, (), kwargs, strategy="tensor", device="h100")
    assert plan.sharding.gathered == ("linear_14",)
    gm = megatron_graph(plan.stages[0].shards[1].module, group_name="0", param_shards=plan.sharding.param_shards)
    gather = [n for n in gm.graph.nodes if n.target is gather_from_region]
    assert len(gather) == 1 and gather[0].args[1:] == (2, "0")
    assert "_c10d_functional" not in gm.code


def test_join_shards_undoes_the_fused_qkv_split():
    from partitioner.sharding import Shard
    from partitioner.sharding.rewrite import _local
    from runtime.tensor_parallel import join_shards
    w = torch.arange(4 * 12.).reshape(4, 12)
    shard = Shard(1, 3)
    parts = [_local(w, tuple(w.shape), shard, r, 2, lambda op, a: op(*a)) for r in range(2)]
    torch.testing.assert_close(join_shards(parts, shard), w)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
