"""The pipeline runtime across 2 and 4 processes (gloo on CPU) against single-process training.

Each slow test launches this file as a script once per rank; every rank plans the model on
the full batch (``partition(..., n_microbatches=m)``), trains 3 steps with fxpart's Runner
(GPipe and 1F1B) and with torch.distributed.pipelining's schedules built from the same stage
modules; rank 0 also trains the unpartitioned model on the full batch and writes everything
to a file the test reads. The matrix covers every model, 2 and 4 processes and both
schedules without running every combination.
"""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from runtime.launch import launch_local

N_STEPS = 3
LR = 0.1
VOCAB = 64


# -- the cases: seeded model, full batch (args, kwargs), target, loss --------------------------
def _case(name: str, batch: int):
    from passes import zoo
    torch.manual_seed(0)
    if name == "mlp":
        model, _ = zoo.mlp(depth=4, width=32, batch=batch)
        return model, (torch.randn(batch, 32),), {}, torch.randn(batch, 32), F.mse_loss
    if name == "moe":
        model, (x,) = zoo.moe(batch=batch, seq=4, d_model=16, n_experts=4)
        return model, (x,), {}, torch.randn_like(x), F.mse_loss
    if name == "tiny_gpt":
        model, _ = zoo.tiny_gpt(n_layers=2, d_model=32, n_heads=2, batch=batch, seq=8, vocab_size=VOCAB)
        return model, (_ids(batch),), {}, _ids(batch), _token_loss
    if name in ("gpt2", "llama"):
        model = _hf(name)
        return model, (), {"input_ids": _ids(batch), "use_cache": False}, _ids(batch), \
            lambda out, t: _token_loss(out.logits, t)
    raise ValueError(name)


def _hf(name: str):
    import transformers as tf
    if name == "gpt2":
        config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                               attn_implementation="eager")
        return tf.GPT2LMHeadModel(config)   # tied wte / lm_head
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=16, bos_token_id=0,
                            eos_token_id=0, pad_token_id=0, attn_implementation="eager")
    return tf.LlamaForCausalLM(config)


def _ids(batch: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, 8))


def _token_loss(logits, target):
    return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))


def _sgd(params):
    return torch.optim.SGD(params, lr=LR)


# name -> (model, n_stages, n_microbatches, Runner schedules, pipelining schedules)
CASES = {
    "mlp-2": ("mlp", 2, 4, ("gpipe", "1f1b"), ("GPipe", "1F1B")),
    "llama-2": ("llama", 2, 2, ("gpipe", "1f1b"), ()),
    "gpt2-2": ("gpt2", 2, 2, ("gpipe", "1f1b"), ()),
    "tiny_gpt-4": ("tiny_gpt", 4, 4, ("gpipe", "1f1b"), ("1F1B",)),
    "moe-4": ("moe", 4, 4, ("gpipe", "1f1b"), ("GPipe",)),
    "mlp-interleaved": ("mlp", 4, 4, (), ("Interleaved1F1B", "InterleavedZeroBubble", "ZBVZeroBubble")),
}


def _worker(case: str, out_path: str) -> None:
    """One rank: train the partitioned model under each schedule; rank 0 also trains the reference."""
    from partitioner import partition
    from runtime import Runner, merge_shards, pipelining_schedule
    name, n_stages, m, schedules, torch_schedules = CASES[case]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model, args, kwargs, target, loss_fn = _case(name, 2 * m)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    plan = partition(model, n_stages, args, kwargs, device="h100", n_microbatches=m)
    inputs = kwargs or args
    result: dict = {"schedules": {}, "state_keys": list(model.state_dict()), "memory": {}, "activations": {}}
    runner = None
    for schedule in schedules:
        model.load_state_dict(init)
        runner = Runner(plan, schedule=schedule, loss_fn=loss_fn, optimizer_fn=_sgd, track_memory=True)
        losses = [runner.step(inputs, target) for _ in range(N_STEPS)]
        result["schedules"][schedule] = {"losses": losses, "state": runner.full_state_dict()}
        result["memory"][schedule] = runner.memory_report()
        result["activations"][schedule] = max(runner.activation_log)
    if runner is not None:
        shard_dir = os.path.join(os.path.dirname(out_path), f"{case}-shards")
        runner.save_shard(shard_dir)
        model.load_state_dict(init)          # wipe, then load our shard back
        runner.load_shard(shard_dir)
        result["reloaded"] = runner.full_state_dict()
        torch.distributed.barrier()
        result["merged"] = merge_shards(shard_dir) if rank == 0 else None
        model.load_state_dict(init)
        result["forward"] = runner.forward(*args, **kwargs)
    for schedule in torch_schedules:
        model.load_state_dict(init)
        if world != n_stages:   # interleaved: several stages per rank
            import torch.distributed as dist
            if not dist.is_initialized():
                dist.init_process_group("gloo")
        else:
            Runner(plan)        # initialises the process group like the Runner does
        sched = pipelining_schedule(plan, rank, schedule, n_microbatches=m, loss_fn=loss_fn)
        opt = _sgd(sched.parameters()) if sched.parameters() else None
        losses = [sched.step(args, target, opt) for _ in range(N_STEPS)]
        result["schedules"][schedule] = {"losses": losses, "state": _gather_state(plan, sched, rank)}
    if rank == 0:
        result["reference"] = _reference(name, m)
        torch.save(result, out_path)
    torch.distributed.barrier()   # no rank leaves while a peer may still be talking to it


def _gather_state(plan, sched, rank: int):
    """The whole state dict on rank 0 from the ranks' stage modules, with the model's keys; losses from the last."""
    import torch.distributed as dist
    from runtime import merge_state_dicts
    local = {}
    for stage in sched.stages:
        local.update({k: v.detach().clone() for k, v in stage.submod.state_dict().items()})
    parts = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(local, parts, dst=0)
    if rank:
        return None
    merged = merge_state_dicts(parts)
    return {key: merged[attr] for key, attr in plan.state_keys.items()}


def _reference(name: str, m: int) -> dict:
    model, args, kwargs, target, loss_fn = _case(name, 2 * m)
    opt = _sgd(model.parameters())
    with torch.no_grad():
        forward = model(*args, **kwargs)
    losses = []
    for _ in range(N_STEPS):
        loss = loss_fn(model(*args, **kwargs), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "forward": forward}


def _fault_worker(kind: str) -> None:
    """Rank 1 fails in its loss at micro-batch 1 (mid-step): it raises, or the process dies at once."""
    from partitioner import partition
    from runtime import Runner
    model, args, _, target, _ = _case("mlp", 8)
    plan = partition(model, 2, args, device="h100", n_microbatches=4)
    calls = []

    def bad_loss(out, t):
        calls.append(1)
        if len(calls) == 2:
            if kind == "kill":
                os._exit(17)
            raise RuntimeError("loss exploded")
        return F.mse_loss(out, t)
    runner = Runner(plan, loss_fn=bad_loss, optimizer_fn=_sgd, timeout_s=20)
    runner.step(args, target)


def _mismatch_worker() -> None:
    """Rank 1 plans other cuts than rank 0: both must refuse before any pipeline traffic."""
    from partitioner import partition
    from runtime import Runner
    model, args, _, _, _ = _case("mlp", 4)
    cuts = ["linear_1"] if int(os.environ["RANK"]) == 0 else ["linear_3"]
    plan = partition(model, 2, args, device="h100", cuts=cuts)
    Runner(plan, loss_fn=F.mse_loss, optimizer_fn=_sgd, timeout_s=20)


# -- launching ----------------------------------------------------------------------------
def _launch(case: str, tmp_path, world_size: int, timeout_s: float = 150, expect_ok: bool = True):
    out = tmp_path / f"{case}.pt"
    codes, logs = launch_local([__file__, case, str(out)], world_size, timeout_s=timeout_s)
    if not expect_ok:
        return codes, logs
    for r, (code, log) in enumerate(zip(codes, logs)):
        assert code == 0, f"rank {r} exited with {code}:\n{log[-4000:]}"
    return torch.load(out, weights_only=False)


def _close(got, want, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def _check_state(state: dict, result: dict, what: str) -> None:
    ref = result["reference"]["state"]
    assert list(state) == result["state_keys"] == list(ref), f"{what}: keys differ from model.state_dict()"
    for key, want in ref.items():
        _close(state[key], want, f"{what} {key}")


def _check_matches_single_process(case: str, result: dict) -> None:
    ref = result["reference"]
    for schedule, got in result["schedules"].items():
        _close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), f"{case} {schedule} losses")
        _check_state(got["state"], result, f"{case} {schedule}")
    if "forward" in result:
        want = ref["forward"].logits if hasattr(ref["forward"], "logits") else ref["forward"]
        got = result["forward"].logits if hasattr(result["forward"], "logits") else result["forward"]
        _close(got, want, f"{case} forward")
        _check_state(result["reloaded"], result, f"{case} reloaded shards")
        _check_state(result["merged"], result, f"{case} merged shards")
    for schedule, rows in result["memory"].items():
        assert all(r["measured_by"] == "live storages peak" and r["measured_peak_bytes"] > 0 and r["estimated_bytes"] > 0
                   for r in rows), rows


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_pipelined_training_matches_single_process(case, tmp_path):
    world = 2 if case == "mlp-interleaved" else CASES[case][1]
    result = _launch(case, tmp_path, world)
    _check_matches_single_process(case, result)
    if case == "mlp-2":   # 2 stages, 4 micro-batches: 1F1B keeps 2 in flight on stage 0, GPipe all 4
        assert result["activations"] == {"gpipe": 4, "1f1b": 2}
    if case == "gpt2-2":
        assert "transformer.wte.weight" in result["state_keys"] and "lm_head.weight" in result["state_keys"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_a_failing_rank_ends_every_rank_nonzero_within_the_timeout(kind, tmp_path):
    start = time.monotonic()
    codes, logs = _launch(f"fault-{kind}", tmp_path, 2, timeout_s=90, expect_ok=False)
    assert time.monotonic() - start < 90
    assert all(c not in (0, None) for c in codes), (codes, [log[-2000:] for log in logs])
    assert "rank 0 (stage 0) failed at action" in logs[0], logs[0][-2000:]
    if kind == "raise":
        assert "rank 1 (stage 1) failed at action F1" in logs[1] and "loss exploded" in logs[1]
    else:
        assert codes[1] == 17


@pytest.mark.slow
def test_ranks_with_different_plans_are_refused_on_every_rank(tmp_path):
    codes, logs = _launch("mismatch", tmp_path, 2, timeout_s=90, expect_ok=False)
    assert all(c not in (0, None) for c in codes), (codes, [log[-2000:] for log in logs])
    for rank, log in enumerate(logs):
        assert f"rank {rank}: the ranks do not run the same plan (ranks [1] differ" in log, log[-2000:]


def test_runner_refuses_a_world_size_other_than_the_number_of_stages(monkeypatch):
    from partitioner import partition
    from runtime import Runner
    import torch.distributed as dist
    model, args, _, _, _ = _case("mlp", 4)
    plan = partition(model, 2, args, device="h100")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="2 stages but the world size is 3"):
        Runner(plan)
    assert not dist.is_initialized()


def test_plan_made_on_the_full_batch_runs_micro_batch_stages_and_keeps_the_models_keys():
    from partitioner import partition
    model, args, kwargs, _, _ = _case("tiny_gpt", 8)
    plan = partition(model, 2, args, device="h100", n_microbatches=4)
    assert plan.runs_microbatches and plan.microbatch_shapes == ((2, 8),)
    torch.testing.assert_close(plan(*args), model(*args))          # full batch: 4 slices, concatenated
    flat = plan.stages[0].module(args[0][:2])                        # one micro-batch through stage 0
    assert flat[0].shape[0] == 2
    assert list(plan.state_keys) == list(model.state_dict())
    assert plan.state_keys["wte.weight"] == plan.state_keys["head.weight"]   # tied: one tensor, two keys


if __name__ == "__main__":
    if sys.argv[1].startswith("fault-"):
        _fault_worker(sys.argv[1].split("-")[1])
    elif sys.argv[1] == "mismatch":
        _mismatch_worker()
    else:
        _worker(sys.argv[1], sys.argv[2])
