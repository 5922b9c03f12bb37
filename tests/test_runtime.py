"""The runtime over a mesh (gloo on CPU) against single-process training.

Each slow test launches this file as a script once per rank. Every rank plans the model on the
full batch with the same arguments, runs ``Runner`` on its place in the mesh, trains 3 steps
of SGD with momentum over the batch split into ``dp`` replicas x micro-batches, gathers the whole
state, saves its shard, and rank 0 also trains the unpartitioned model on the full batch and
writes everything to a file the test reads: losses, forward and ``full_state_dict()`` must equal
the single process at 1e-5, and the merged shards the whole state. Hugging Face models take
their inputs as keywords (``runner.step((), target, input_ids=...)``) with ``use_cache=False``
left out (the plan's baked-in constant).
"""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from runtime.launch import launch_local, run_local

N_STEPS = 3
VOCAB = 64


# -- the cases: seeded model, full batch (args, kwargs), target, loss --------------------------
def _case(name: str, batch: int):
    from passes import zoo
    gen = torch.Generator().manual_seed(3)
    if name == "mlp":
        c = zoo.make("mlp", depth=4, width=32, batch=batch)
        return c.model, c.args, {}, torch.randn(batch, 32, generator=gen), F.mse_loss
    if name == "moe":
        c = zoo.make("moe", batch=batch, seq=4, d_model=16, n_experts=4)
        return c.model, c.args, {}, torch.randn(c.args[0].shape, generator=gen), F.mse_loss
    if name == "tiny_gpt":
        c = zoo.make("tiny_gpt", n_layers=2, d_model=32, n_heads=2, batch=batch, seq=8, vocab_size=VOCAB)
        return c.model, c.args, {}, torch.randint(0, VOCAB, (batch, 8), generator=gen), _token_loss
    if name == "gpt2":        # tied embedding and head
        c = zoo.make("gpt2", n_embd=32, n_head=2, vocab=VOCAB, batch=batch, seq=8)
    elif name == "llama":     # 4 query heads share 2 KV heads
        c = zoo.make("llama", hidden=32, vocab=VOCAB, batch=batch, seq=8)
    elif name in ("phi3", "falcon", "mixtral"):   # fused qkv / gate_up, x @ W.T, MoE experts
        c = zoo.make(name, vocab=VOCAB, batch=batch, seq=8)
    elif name == "bart":      # one embedding read by the encoder and the decoder, tied to the head
        c = zoo.make("bart", vocab=VOCAB, batch=batch, seq=8, decoder_seq=6)
        decoder = c.kwargs["decoder_input_ids"]
        return c.model, (), {"input_ids": c.args[0], **c.kwargs}, \
            torch.randint(0, VOCAB, decoder.shape, generator=gen), lambda out, t: _token_loss(out.logits, t)
    else:
        raise ValueError(name)
    ids = c.args[0]
    return c.model, (), {"input_ids": ids}, torch.randint(0, VOCAB, ids.shape, generator=gen), \
        lambda out, t: _token_loss(out.logits, t)


def _token_loss(logits, target):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _reference(name: str, batch: int) -> dict:
    model, args, kwargs, target, loss_fn = _case(name, batch)
    opt = _sgd(model.parameters())
    losses = []
    for _ in range(N_STEPS):
        loss = loss_fn(model(*args, **kwargs), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():                      # the trained model, as the runner's forward after its steps
        forward = model(*args, **kwargs)
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "forward": forward.logits if hasattr(forward, "logits") else forward}


# -- workers ------------------------------------------------------------------------------
MESHES = {   # name -> (mesh, data-parallel mode, models)
    "dp4": ({"dp": 4}, "replicate", ("mlp", "gpt2", "llama")),
    "dp4-shard": ({"dp": 4}, "shard", ("mlp", "gpt2", "llama")),
    "dp2pp2": ({"dp": 2, "pp": 2}, "replicate", ("mlp", "gpt2", "llama")),
    # bart: stage 0 reads the tied embedding in two blocks (kept whole there), stage 1 in its head
    "dp2pp2-shard": ({"dp": 2, "pp": 2}, "shard", ("mlp", "gpt2", "llama", "bart")),
    "dp2tp2": ({"dp": 2, "tp": 2}, "replicate", ("mlp", "gpt2", "llama")),
    "tp2pp2": ({"tp": 2, "pp": 2}, "replicate", ("mlp", "gpt2", "llama")),
    "dp2tp2pp2": ({"dp": 2, "tp": 2, "pp": 2}, "replicate", ("mlp", "gpt2", "llama")),
    # every block recomputed in backward (the plan's recompute decision), alone and under FSDP2
    "pp2-recompute": ({"pp": 2}, "replicate", ("gpt2", "llama")),
    "dp2-shard-recompute": ({"dp": 2}, "shard", ("gpt2", "llama")),
    "auto4": (None, None, ("mlp", "gpt2")),        # strategy="auto" on 4 devices: whatever mesh it chooses
    # interleaved 1F1B: each pipeline rank holds several stages (gpt2's tied embedding and head on two ranks)
    "pp2-interleaved": ({"pp": 2}, "replicate", ("mlp", "gpt2", "llama")),
    "dp2pp2-shard-interleaved": ({"dp": 2, "pp": 2}, "shard", ("gpt2", "llama")),
    "tp2pp2-interleaved": ({"tp": 2, "pp": 2}, "replicate", ("gpt2", "llama")),
}
BATCH, MICROBATCHES = 8, 4       # 4 micro-batches in all: dp x n_microbatches per replica


def _world(mesh: dict | None) -> int:
    return 4 if mesh is None else mesh.get("dp", 1) * mesh.get("tp", 1) * mesh.get("pp", 1)


def _mesh_worker(case: str, out_path: str) -> None:
    """One rank: every model of the case on its mesh; rank 0 adds the single-process references."""
    import torch.distributed as dist
    from partitioner import partition
    from runtime import Runner, merge_shards
    mesh, mode, names = MESHES[case]
    n_devices = _world(mesh)
    results = {}
    for name in names:
        model, args, kwargs, target, loss_fn = _case(name, BATCH)
        if mesh is None:
            plan = partition(model, n_devices, args, kwargs, device="h100")
        else:
            schedule = "interleaved-1f1b" if case.endswith("interleaved") else "1f1b"
            plan = partition(model, n_devices, args, kwargs, mesh=mesh, data_parallel=mode, device="h100",
                             n_microbatches=MICROBATCHES // mesh.get("dp", 1), schedule=schedule,
                             recompute=case.endswith("recompute"))
            assert (plan.n_virtual > 1) == case.endswith("interleaved") and len(plan.stages) == \
                mesh["pp"] * plan.n_virtual if "pp" in mesh else True
        assert plan.decisions.recompute == case.endswith("recompute")
        runner = Runner(plan, loss_fn=loss_fn, optimizer_fn=_sgd)
        losses = [runner.step(args, target, **kwargs) for _ in range(N_STEPS)]
        state = runner.full_state_dict()
        forward = runner.forward(*args, **kwargs)
        shard_dir = os.path.join(os.path.dirname(out_path), f"{case}-{name}-shards")
        runner.save_shard(shard_dir)
        dist.barrier()
        merged = merge_shards(shard_dir) if dist.get_rank() == 0 else None
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, losses)
        groups = sum(1 for m in runner.module.modules() if type(m).__name__.startswith("FSDP"))
        recomputed = sum(1 for m in runner.module.modules() if type(m).__name__.endswith("Recomputed"))
        results[name] = {"losses": losses, "losses_per_rank": everyone, "state": state, "merged": merged,
                         "fsdp_groups": groups, "recomputed_units": recomputed,
                         "forward": forward.logits if hasattr(forward, "logits") else forward,
                         "state_keys": list(model.state_dict()), "mesh": plan.mesh, "mode": plan.data_parallel}
        if dist.get_rank() == 0:
            results[name]["reference"] = _reference(name, BATCH)
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()   # no rank leaves while a peer may still be talking to it


SCHEDULE_CASES = {   # name -> (model, stages, micro-batches, Runner schedules, torch.distributed.pipelining's)
    "mlp-2": ("mlp", 2, 4, ("gpipe", "1f1b"), ("GPipe", "1F1B")),
    "tiny_gpt-4": ("tiny_gpt", 4, 4, ("gpipe", "1f1b"), ("1F1B",)),
    "moe-4": ("moe", 4, 4, ("gpipe", "1f1b"), ()),
    # 2 ranks holding 2 stages each: fxpart's interleaved 1F1B and torch's multi-stage schedules, on one plan
    "mlp-interleaved": ("mlp", 2, 4, ("interleaved-1f1b",), ("Interleaved1F1B", "InterleavedZeroBubble",
                                                            "ZBVZeroBubble")),
}


def _schedule_worker(case: str, out_path: str) -> None:
    """One rank: a pipeline plan under fxpart's schedules and torch.distributed.pipelining's."""
    import torch.distributed as dist
    from partitioner import partition
    from runtime import Runner, pipelining_schedule
    name, n_stages, m, schedules, torch_schedules = SCHEDULE_CASES[case]
    model, args, kwargs, target, loss_fn = _case(name, 2 * m)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    plan = partition(model, n_stages, args, kwargs, strategy="pipeline", device="h100", n_microbatches=m,
                     n_virtual=2 if case.endswith("interleaved") else 1)
    result: dict = {"schedules": {}, "memory": {}, "activations": {}}
    for schedule in schedules:
        model.load_state_dict(init)
        runner = Runner(plan, schedule=schedule, loss_fn=loss_fn, optimizer_fn=_sgd, track_memory=True)
        losses = [runner.step(args, target, **kwargs) for _ in range(N_STEPS)]
        result["schedules"][schedule] = {"losses": losses, "state": runner.full_state_dict()}
        result["memory"][schedule] = runner.memory_report()
        result["activations"][schedule] = max(runner.activation_log)
    for schedule in torch_schedules:
        model.load_state_dict(init)
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        sched = pipelining_schedule(plan, dist.get_rank(), schedule, n_microbatches=m, loss_fn=loss_fn)
        opt = _sgd(sched.parameters()) if sched.parameters() else None
        losses = [sched.step(args, target, opt) for _ in range(N_STEPS)]
        result["schedules"][schedule] = {"losses": losses, "state": _gather_state(plan, sched)}
    if dist.get_rank() == 0:
        result["reference"] = _reference(name, 2 * m)
        result["state_keys"] = list(model.state_dict())
        torch.save(result, out_path)
    dist.barrier()


def _gather_state(plan, sched):
    """The whole state dict on rank 0 from the ranks' pipelining stages, with the model's keys."""
    import torch.distributed as dist
    from runtime import merge_state_dicts
    local = {}
    for stage in sched.stages:
        local.update({k: v.detach().clone() for k, v in stage.submod.state_dict().items()})
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    if dist.get_rank():
        return None
    merged = merge_state_dicts(parts)
    return {key: merged[attr] for key, attr in plan.state_keys.items()}


def _fault_worker(kind: str) -> None:
    """Rank 1 fails in its loss at micro-batch 1 (mid-step): it raises, or the process dies at once."""
    from partitioner import partition
    from runtime import Runner
    model, args, _, target, _ = _case("mlp", 8)
    plan = partition(model, 2, args, strategy="pipeline", device="h100", n_microbatches=4)
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
    plan = partition(model, 2, args, strategy="pipeline", device="h100", cuts=cuts)
    Runner(plan, loss_fn=F.mse_loss, optimizer_fn=_sgd, timeout_s=20)


def _agree_worker(out_path: str) -> None:
    """Four ranks plan with device=None at once: rank 0 measures this machine and every rank plans with it."""
    import torch.distributed as dist
    from partitioner import partition
    from runtime import Runner
    model, args, _, target, _ = _case("tiny_gpt", 8)
    plan = partition(model, 4, args, strategy="pipeline", n_microbatches=2)
    runner = Runner(plan, loss_fn=_token_loss, optimizer_fn=_sgd)      # refuses if the plans differ
    runner.step(args, target)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (plan.cuts, plan.device.to_dict()))
    if dist.get_rank() == 0:
        torch.save(everyone, out_path)
    dist.barrier()


# -- launching ----------------------------------------------------------------------------
def _launch(case: str, tmp_path, world_size: int, timeout_s: float = 300, expect_ok: bool = True):
    out = tmp_path / f"{case}.pt"
    if not expect_ok:
        return launch_local([__file__, case, str(out)], world_size, timeout_s=timeout_s)
    run_local([__file__, case, str(out)], world_size, timeout_s=timeout_s)
    return torch.load(out, weights_only=False)


def _close(got, want, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _check_state(state: dict, keys: list, ref: dict, what: str) -> None:
    assert list(state) == keys == list(ref), f"{what}: keys differ from model.state_dict()"
    for key, want in ref.items():
        _close(state[key], want, f"{what} {key}")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MESHES))
def test_training_on_a_mesh_equals_one_process(case, tmp_path):
    mesh = MESHES[case][0]
    results = _launch(case, tmp_path, _world(mesh), timeout_s=600)
    for name, got in results.items():
        ref = got["reference"]
        what = f"{case} {name} on {got['mesh']}"
        if mesh is not None:
            assert got["mesh"] == {"dp": 1, "tp": 1, "pp": 1, **mesh} and got["mode"] == MESHES[case][1]
        _close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), f"{what} losses")
        assert all(losses == got["losses"] for losses in got["losses_per_rank"]), f"{what}: ranks report other losses"
        _check_state(got["state"], got["state_keys"], ref["state"], what)
        _close(got["forward"], ref["forward"], f"{what} forward")
        _check_state(got["merged"], got["state_keys"], got["state"], f"{what} merged shards")
        if got["mode"] == "shard" and name != "mlp":    # one FSDP group per transformer block, and the root's
            assert got["fsdp_groups"] >= 2, f"{what}: {got['fsdp_groups']} FSDP groups"
        if case.endswith("recompute"):                   # the stage's blocks run under checkpoint
            assert got["recomputed_units"] >= 1, f"{what}: no unit recomputes"


def _check_schedules(case: str, result: dict) -> None:
    ref = result["reference"]
    for schedule, got in result["schedules"].items():
        _close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), f"{case} {schedule} losses")
        _check_state(got["state"], result["state_keys"], ref["state"], f"{case} {schedule}")
    for schedule, rows in result["memory"].items():
        assert all(r["measured_by"] == "live storages peak" and r["measured_peak_bytes"] > 0 and r["estimated_bytes"] > 0
                   for r in rows), rows


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SCHEDULE_CASES))
def test_pipeline_schedules_train_equal_to_one_process(case, tmp_path):
    result = _launch(case, tmp_path, SCHEDULE_CASES[case][1])
    _check_schedules(case, result)
    if case == "mlp-2":   # 2 stages, 4 micro-batches: 1F1B keeps 2 in flight on stage 0, GPipe all 4
        assert result["activations"] == {"gpipe": 4, "1f1b": 2}


@pytest.mark.slow
def test_four_ranks_planning_at_once_on_this_machine_agree(tmp_path):
    everyone = _launch("agree", tmp_path, 4)
    assert all(entry == everyone[0] for entry in everyone), everyone
    assert everyone[0][1]["name"] == "cpu"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_a_failing_rank_ends_every_rank_nonzero_within_the_timeout(kind, tmp_path):
    start = time.monotonic()
    codes, logs = _launch(f"fault-{kind}", tmp_path, 2, timeout_s=90, expect_ok=False)
    assert time.monotonic() - start < 90
    assert all(c not in (0, None) for c in codes), (codes, [log[-2000:] for log in logs])
    assert "rank 0 (stage 0, replica 0, shard 0) failed at action" in logs[0], logs[0][-2000:]
    if kind == "raise":
        assert "rank 1 (stage 1, replica 0, shard 0) failed at action F1" in logs[1] and "loss exploded" in logs[1]
    else:
        assert codes[1] == 17


@pytest.mark.slow
def test_ranks_with_different_plans_are_refused_on_every_rank(tmp_path):
    codes, logs = _launch("mismatch", tmp_path, 2, timeout_s=90, expect_ok=False)
    assert all(c not in (0, None) for c in codes), (codes, [log[-2000:] for log in logs])
    for rank, log in enumerate(logs):
        assert f"rank {rank}: the ranks do not run the same plan (ranks [1] differ" in log, log[-2000:]


def test_pipelining_adapter_refuses_stages_that_pass_sizes_between_them():
    from partitioner import partition
    from runtime import pipelining_schedule
    model, args, _, _, _ = _case("moe", 8)      # tokens flattened to [b * s, d]: the last stage needs b and s
    plan = partition(model, 2, args, strategy="pipeline", device="h100")
    with pytest.raises(ValueError, match=r"stage 1 takes sizes \['sym_size_int.*torch.distributed.pipelining passes "
                                         r"only tensors"):
        pipelining_schedule(plan, 0, "GPipe", n_microbatches=2)


def test_runner_refuses_a_world_size_other_than_the_plans_devices(monkeypatch):
    from partitioner import partition
    from runtime import Runner
    import torch.distributed as dist
    model, args, _, _, _ = _case("mlp", 4)
    plan = partition(model, 2, args, strategy="pipeline", device="h100")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="runs on 2 devices but the world size is 3"):
        Runner(plan)
    assert not dist.is_initialized()


def test_plan_made_on_the_full_batch_runs_any_batch_and_keeps_the_models_keys():
    from partitioner import partition
    model, args, _, _, _ = _case("tiny_gpt", 8)
    plan = partition(model, 2, args, strategy="pipeline", device="h100", n_microbatches=4)
    torch.testing.assert_close(plan(*args), model(*args))
    for shape in ((2, 8), (5, 3), (1, 1)):        # a micro-batch, an odd batch and length, one token
        ids = torch.randint(0, VOCAB, shape)
        torch.testing.assert_close(plan(ids), model(ids))
    assert list(plan.state_keys) == list(model.state_dict())
    assert plan.state_keys["wte.weight"] == plan.state_keys["head.weight"]   # tied: one tensor, two keys


if __name__ == "__main__":
    what = sys.argv[1]
    if what.startswith("fault-"):
        _fault_worker(what.split("-")[1])
    elif what == "mismatch":
        _mismatch_worker()
    elif what == "agree":
        _agree_worker(sys.argv[2])
    elif what in MESHES:
        _mesh_worker(what, sys.argv[2])
    else:
        _schedule_worker(what, sys.argv[2])
