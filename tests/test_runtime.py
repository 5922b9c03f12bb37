"""The pipeline runtime across 2 processes (gloo on CPU) against single-process training.

Each slow test launches this file twice as a script (ranks 0 and 1 of a 2-process group);
rank 0 also trains an identical model on the full batch in one process, and writes both
results to a file the test reads.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

N_STEPS = 3
N_MICROBATCHES = 2
LR = 0.1


# -- the cases: seeded model, micro-batch example, full batch, target, loss --------------------------
def _case(name: str):
    from passes import zoo
    torch.manual_seed(0)
    if name == "mlp":
        model, _ = zoo.mlp(depth=4, width=32, batch=4)
        x = torch.randn(4 * N_MICROBATCHES, 32)
        target = torch.randn(4 * N_MICROBATCHES, 32)
        return model, (x,), target, F.mse_loss
    if name == "tiny_gpt":
        vocab = 64
        model, _ = zoo.tiny_gpt(n_layers=2, d_model=32, n_heads=2, batch=2, seq=8, vocab_size=vocab)
        idx = torch.randint(0, vocab, (2 * N_MICROBATCHES, 8))
        target = torch.randint(0, vocab, (2 * N_MICROBATCHES, 8))
        return model, (idx,), target, lambda logits, t: F.cross_entropy(logits.reshape(-1, vocab), t.reshape(-1))
    raise ValueError(name)


def _microbatch(inputs: tuple) -> tuple:
    return tuple(t[: t.shape[0] // N_MICROBATCHES] for t in inputs)


def _sgd(params):
    return torch.optim.SGD(params, lr=LR)


def _worker(name: str, out_path: str) -> None:
    """One rank: train the partitioned model with both schedules; rank 0 also trains the reference."""
    from partitioner import partition
    from runtime import Runner
    model, inputs, target, loss_fn = _case(name)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    plan = partition(model, 2, _microbatch(inputs), device="h100")
    rank = int(os.environ["RANK"])
    result: dict = {"schedules": {}}
    no_opt = Runner(plan, n_microbatches=N_MICROBATCHES, loss_fn=loss_fn)
    try:
        no_opt.step(inputs, target)
    except ValueError as e:
        result["no_optimizer_error"] = str(e)
    for schedule in ("gpipe", "1f1b"):
        model.load_state_dict(init)
        runner = Runner(plan, schedule=schedule, n_microbatches=N_MICROBATCHES, loss_fn=loss_fn, optimizer_fn=_sgd)
        losses = [runner.step(inputs, target) for _ in range(N_STEPS)]
        result["schedules"][schedule] = {"losses": losses, "state": runner.full_state_dict()}
    model.load_state_dict(init)
    result["forward"] = runner.forward(*_microbatch(inputs))
    result["memory"] = runner.memory_report()
    if rank == 0:
        result["reference"] = _reference(name)
        torch.save(result, out_path)


def _fault_worker() -> None:
    """Rank 1's loss raises: its error names rank, stage and action; rank 0 must not hang."""
    from partitioner import partition
    from runtime import Runner
    model, inputs, target, _ = _case("mlp")
    plan = partition(model, 2, _microbatch(inputs), device="h100")

    def bad_loss(out, t):
        raise RuntimeError("loss exploded")
    runner = Runner(plan, n_microbatches=N_MICROBATCHES, loss_fn=bad_loss, optimizer_fn=_sgd, timeout_s=10)
    runner.step(inputs, target)


def _reference(name: str) -> dict:
    model, inputs, target, loss_fn = _case(name)
    opt = _sgd(model.parameters())
    with torch.no_grad():
        forward = model(*_microbatch(inputs))
    losses = []
    for _ in range(N_STEPS):
        loss = loss_fn(model(*inputs), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    groups: dict = {}
    for k, v in model.state_dict().items():   # tied weights: several keys, one tensor
        groups.setdefault(v.data_ptr(), []).append(k)
    aliases = {k: keys for keys in groups.values() for k in keys}
    return {"losses": losses, "state": state, "forward": forward, "aliases": aliases}


# -- launching ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(name: str, tmp_path, world_size: int = 2, timeout_s: float = 120, expect_ok: bool = True):
    out = tmp_path / f"{name}.pt"
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world_size),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, name, str(out)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world_size)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout_s)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if not expect_ok:
        return [p.returncode for p in procs], logs
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log[-4000:]}"
    return torch.load(out, weights_only=False)


def _check_matches_single_process(result: dict) -> None:
    ref = result["reference"]
    assert "optimizer_fn" in result["no_optimizer_error"]
    for schedule, got in result["schedules"].items():
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{schedule} losses: {m}")
        state = got["state"]
        assert set(state) <= set(ref["state"]), set(state) - set(ref["state"])
        for key, want in ref["state"].items():   # a tied alias is checked through the key the plan keeps
            have = next((state[k] for k in ref["aliases"][key] if k in state), None)
            assert have is not None, f"{schedule}: {key} missing from full_state_dict"
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-7, msg=lambda m: f"{schedule} {key}: {m}")
    torch.testing.assert_close(result["forward"], ref["forward"], rtol=1e-5, atol=1e-6)
    assert [row["rank"] for row in result["memory"]] == [0, 1]
    assert all(row["measured_peak_bytes"] > 0 and row["estimated_bytes"] > 0 for row in result["memory"])


@pytest.mark.slow
def test_two_stage_mlp_training_matches_single_process_both_schedules(tmp_path):
    _check_matches_single_process(_launch("mlp", tmp_path))


@pytest.mark.slow
def test_two_stage_tiny_gpt_with_tied_head_matches_single_process_both_schedules(tmp_path):
    result = _launch("tiny_gpt", tmp_path)
    _check_matches_single_process(result)
    assert "wte.weight" in result["reference"]["state"]   # the tie was exercised: both stages hold it


@pytest.mark.slow
def test_an_error_on_one_rank_names_rank_stage_and_action_and_peers_do_not_hang(tmp_path):
    codes, logs = _launch("fault", tmp_path, timeout_s=60, expect_ok=False)
    assert codes[0] != 0 and codes[1] != 0
    assert "rank 1 (stage 1) failed at action F0" in logs[1] and "loss exploded" in logs[1]


def test_runner_refuses_a_world_size_other_than_the_number_of_stages(monkeypatch):
    from partitioner import partition
    from runtime import Runner
    import torch.distributed as dist
    model, inputs, _, _ = _case("mlp")
    plan = partition(model, 2, _microbatch(inputs), device="h100")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="2 stages but the world size is 3"):
        Runner(plan)
    assert not dist.is_initialized()


if __name__ == "__main__":
    _fault_worker() if sys.argv[1] == "fault" else _worker(sys.argv[1], sys.argv[2])
