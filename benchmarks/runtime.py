"""Pipeline runtime speed: fxpart's ``Runner`` against ``torch.distributed.pipelining`` on 2 CPU ranks.

A deep MLP (``passes.zoo.mlp``) is partitioned into 2 stages with
``partition(model, 2, inputs, strategy="pipeline", device="h100", n_microbatches=m, schedule="1f1b")`` for m = 4
and 8 (one stage per rank, which both torch schedules here need). Every rank
builds the same plans; for each (m, schedule) the SAME stage modules are trained by

* ``fxpart``: ``runtime.Runner(plan, schedule=..., n_microbatches=m, ...)``;
* ``pipelining``: ``torch.distributed.pipelining.PipelineStage`` built directly on the stage
  module (no wrapper), driven by ``ScheduleGPipe`` / ``Schedule1F1B``, then ``optimizer.step()``
  and a loss broadcast, the same per-step work as ``Runner.step``;
* ``adapter``: fxpart's ``runtime.pipelining_schedule`` (torch's schedules over the stage module
  wrapped so that outputs and input gradients are contiguous, plus tied-gradient sync).

Steps are timed after a warm-up, interleaving the implementations (the order rotates every
step) with a barrier before each step; a step's time is the slowest rank's. Then a few more
Runner steps (and torch steps) are instrumented to measure each rank's idle (bubble) fraction:
stage compute is the time inside the stage module's forward (module hooks) plus the time
inside ``torch.autograd.backward`` (wrapped for the measurement only); idle = 1 - compute /
(step wall time - optimizer step). It is printed next to ``partitioner.schedules.simulate`` fed
the measured per-action times, and the theory (p-1)/(m+p-1).

Writes ``benchmarks/results/runtime.md``. Run: ``python benchmarks/runtime.py`` (about 1-2 min on
2 cores; it launches its own 2 ranks with gloo on 127.0.0.1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import _common  # noqa: F401 - puts the repository root on sys.path
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import gather_ranks, md_table, median, rank_argv, write_result


N_STAGES = 2
MICROBATCHES = (4, 8)
SCHEDULES = (("gpipe", "GPipe"), ("1f1b", "1F1B"))      # fxpart name, torch.distributed.pipelining name
IMPLS = ("fxpart", "pipelining", "adapter")
LR = 1e-3


# -- one rank ------------------------------------------------------------------------------------
def _sgd(params):
    return torch.optim.SGD(params, lr=LR)


class _TorchPipeline:
    """``PipelineStage`` on the plan's stage module as it is, under ``Schedule<name>``; ``step`` does
    the same per-step work as ``Runner.step`` (schedule, optimizer step, loss broadcast)."""

    def __init__(self, plan, rank: int, name: str, n_microbatches: int):
        from torch.distributed import pipelining as pp
        self.rank, self.last = rank, len(plan.stages) - 1
        self.module = plan.stages[rank].module
        stage = pp.PipelineStage(self.module, rank, len(plan.stages), torch.device("cpu"))
        self.schedule = getattr(pp, f"Schedule{name}")(stage, n_microbatches, loss_fn=_stage_loss)
        self.optimizer = _sgd([p for p in self.module.parameters() if p.requires_grad])

    def step(self, x, y) -> float:
        losses: list = []
        if self.rank == 0:
            self.schedule.step(x)
        else:
            self.schedule.step(target=y, losses=losses)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.stack([l.detach() for l in losses]).mean() if self.rank == self.last else torch.zeros(())
        dist.broadcast(loss, src=self.last)
        return float(loss)


def _stage_loss(outputs, target):
    return F.mse_loss(outputs[0] if isinstance(outputs, (tuple, list)) else outputs, target)


class _ComputeClock:
    """Seconds spent in a stage's compute: its forward (module hooks) and every ``torch.autograd.backward``
    call (``Tensor.backward`` goes through it too), and in the optimizer step. For measurement only:
    it wraps ``torch.autograd.backward`` until ``close``."""

    def __init__(self, module: torch.nn.Module, optimizer, runner=None):
        self.recv_s = 0.0
        self._runner = runner
        if runner is not None:   # fxpart: time blocked in its point-to-point receives (tensors; a shape header only when a stage input has no static shape)
            recv = runner.driver._recv_tensors

            def timed_recv(*args, **kwargs):
                t0 = time.perf_counter()
                out = recv(*args, **kwargs)
                self.recv_s += time.perf_counter() - t0
                return out
            runner.driver._recv_tensors = timed_recv
        self.forward_s: list[float] = []
        self.backward_s: list[float] = []
        self.optimizer_s = 0.0
        self._t = 0.0
        self._handles = [module.register_forward_pre_hook(self._start),
                         module.register_forward_hook(lambda *_: self.forward_s.append(time.perf_counter() - self._t)),
                         optimizer.register_step_pre_hook(self._start),
                         optimizer.register_step_post_hook(self._stop_optimizer)]
        self._backward = torch.autograd.backward

        def timed_backward(*args, **kwargs):
            t0 = time.perf_counter()
            out = self._backward(*args, **kwargs)
            self.backward_s.append(time.perf_counter() - t0)
            return out
        torch.autograd.backward = timed_backward

    def _start(self, *_):
        self._t = time.perf_counter()

    def _stop_optimizer(self, *_):
        self.optimizer_s += time.perf_counter() - self._t

    def compute_s(self) -> float:
        return sum(self.forward_s) + sum(self.backward_s)

    def close(self) -> None:
        torch.autograd.backward = self._backward
        if self._runner is not None:
            del self._runner.driver._recv_tensors
        for h in self._handles:
            h.remove()


def _timed_step(step) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _idle(step, module, optimizer, n_steps: int, runner=None) -> dict:
    """Idle fraction of this rank over ``n_steps`` instrumented steps, and its median F / B action times."""
    rows = []
    forward_s, backward_s = [], []
    for _ in range(n_steps):
        clock = _ComputeClock(module, optimizer, runner)
        try:
            wall = _timed_step(step)
        finally:
            clock.close()
        pipeline_s = wall - clock.optimizer_s
        rows.append((1 - clock.compute_s() / wall, 1 - clock.compute_s() / pipeline_s, clock.recv_s / pipeline_s))
        forward_s += clock.forward_s
        backward_s += clock.backward_s
    return {"idle_step": median(r[0] for r in rows), "idle_pipeline": median(r[1] for r in rows),
            "recv": median(r[2] for r in rows),
            "forward_s": median(forward_s) if forward_s else float("nan"),
            "backward_s": median(backward_s) if backward_s else float("nan"), "n_backward": len(backward_s)}


def _run_rank(args, out_path: str) -> None:
    from partitioner import partition
    from passes import zoo
    from runtime import Runner, pipelining_schedule
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=N_STAGES)
    torch.manual_seed(0)
    model, (x,) = zoo.mlp(depth=args.depth, width=args.width, batch=args.batch)
    y = torch.randn_like(x)
    results = []
    for m in MICROBATCHES:
        plan = partition(model, N_STAGES, (x,), strategy="pipeline", device="h100", n_microbatches=m, schedule="1f1b")
        for ours, theirs in SCHEDULES:
            runner = Runner(plan, schedule=ours, n_microbatches=m, loss_fn=F.mse_loss, optimizer_fn=_sgd)
            direct = _TorchPipeline(plan, rank, theirs, m)
            adapter = pipelining_schedule(plan, rank, theirs, n_microbatches=m, loss_fn=F.mse_loss)
            adapter_opt = _sgd(adapter.parameters())
            steps = {"fxpart": lambda: runner.step((x,), y), "pipelining": lambda: direct.step(x, y),
                     "adapter": lambda: adapter.step((x,), y, adapter_opt)}
            for _ in range(args.warmup):
                for step in steps.values():
                    step()
            times: dict[str, list[float]] = {k: [] for k in IMPLS}
            for i in range(args.steps):
                for k in IMPLS[i % len(IMPLS):] + IMPLS[:i % len(IMPLS)]:   # rotate the order against drift
                    times[k].append(_timed_step(steps[k]))
            idle = {"fxpart": _idle(steps["fxpart"], runner.module, runner.optimizer, args.idle_steps,
                                    runner),
                    "pipelining": _idle(steps["pipelining"], direct.module, direct.optimizer, args.idle_steps)}
            results.append({"m": m, "schedule": ours, "times": times, "idle": idle})
            log = {k: f"{median(v) * 1e3:.1f} ms" for k, v in times.items()}
            print(f"rank {rank} m={m} {ours}: {log}", flush=True)
    gathered = [None] * N_STAGES
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


# -- launch and report ---------------------------------------------------------------------------
def _report(gathered: list, args, elapsed_s: float) -> str:
    from partitioner.schedules import make_schedule, simulate
    speed_rows, idle_rows = [], []
    for per_rank in zip(*gathered):
        m, schedule = per_rank[0]["m"], per_rank[0]["schedule"]
        # a step's time is the slowest rank's (they end on the same loss broadcast, so nearly equal)
        step_s = {k: median(max(ts) for ts in zip(*(r["times"][k] for r in per_rank))) for k in IMPLS}
        rate = {k: 1 / v for k, v in step_s.items()}
        speed_rows.append([m, schedule, f"{rate['fxpart']:.2f}", f"{rate['pipelining']:.2f}",
                           f"{rate['fxpart'] / rate['pipelining']:.3f}x", f"{rate['adapter']:.2f}",
                           f"{rate['fxpart'] / rate['adapter']:.3f}x"])
        ours = [r["idle"]["fxpart"] for r in per_rank]
        sim = simulate(make_schedule(schedule, N_STAGES, m), forward_s=[o["forward_s"] for o in ours],
                       backward_s=[o["backward_s"] for o in ours]).bubble_fraction
        theory = (N_STAGES - 1) / (m + N_STAGES - 1)
        for rank, r in enumerate(per_rank):
            o, t = r["idle"]["fxpart"], r["idle"]["pipelining"]
            idle_rows.append([m, schedule, rank, f"{o['forward_s'] * 1e3:.2f}", f"{o['backward_s'] * 1e3:.2f}",
                              f"{o['idle_step']:.1%}", f"{o['idle_pipeline']:.1%}", f"{o['recv']:.1%}",
                              f"{sim[rank]:.1%}", f"{theory:.1%}",
                              f"{t['idle_pipeline']:.1%}" if t["n_backward"] else "n/a"])
    speed = md_table(["m", "schedule", "fxpart steps/s", "pipelining steps/s", "fxpart / pipelining",
                      "adapter steps/s", "fxpart / adapter"], speed_rows)
    idle = md_table(["m", "schedule", "rank", "F ms", "B ms", "idle (step)", "idle (excl. optimizer)",
                     "blocked in recv", "simulated", "theory (p-1)/(m+p-1)", "pipelining idle (excl. optimizer)"],
                    idle_rows)
    return f"""# Pipeline runtime: fxpart Runner vs torch.distributed.pipelining (2 CPU ranks, gloo)

Model: `passes.zoo.mlp(depth={args.depth}, width={args.width}, batch={args.batch})`, MSE loss, SGD;
`partition(model, 2, (x,), strategy="pipeline", device="h100", n_microbatches=m, schedule="1f1b")` (one stage
per rank; interleaving is measured in `interleaved.md`); 2 ranks on 127.0.0.1 (gloo),
`torch.set_num_threads(1)` per rank. {args.warmup} warm-up steps per implementation, then the
median of {args.steps} timed steps, the implementations interleaved (order rotated each step), a
barrier before each step, a step's time taken on the slowest rank. Total run {elapsed_s:.0f} s.

## Throughput

{speed}

* `fxpart`: `runtime.Runner(plan, schedule=..., n_microbatches=m, loss_fn=F.mse_loss, optimizer_fn=SGD)`.
* `pipelining`: `PipelineStage(plan.stages[rank].module, ...)` directly (the same module object,
  unwrapped) under `ScheduleGPipe` / `Schedule1F1B`, then `optimizer.step()`, `zero_grad` and a
  loss broadcast: the same per-step work as `Runner.step`. This is the fair schedule-vs-schedule
  comparison, and the ratio the "not slower" claim rests on (>= ~1.0 means not slower).
* `adapter`: fxpart's `runtime.pipelining_schedule` (torch's schedules; the stage module is
  re-traced with a contiguous-gradient autograd function on each input and `.contiguous()` on
  each output, plus tied-gradient sync), shown for reference.
* Noise: the machine's 2 cores are shared, so ratios move by roughly +-5-10% between runs
  (compare `pipelining` with `adapter`, which do the same work); read a ratio within that band
  of 1.0 as "same speed", not as a win or a loss.

## Idle (bubble) fraction per rank, fxpart Runner

{idle}

Measured over {args.idle_steps} further instrumented steps (median). Compute = time inside the stage
module's forward (forward pre/post hooks; the loss on the last stage is not counted) plus time
inside `torch.autograd.backward` (wrapped only for these steps). `idle (step)` = 1 - compute /
step wall time; `idle (excl. optimizer)` subtracts the optimizer step (optimizer step hooks)
from the wall time, which is what the bubble formula describes. `blocked in recv`: the share of
that time the Runner spends in its blocking receives (its driver's private `_recv_tensors`, wrapped for
these steps; receives posted ahead are waited for there too). `simulated` is
`partitioner.schedules.simulate` with the measured median F and B time of each stage (no
communication cost). `theory` is (p-1)/(m+p-1) with p = 2. The last column measures torch's
schedules on the same module the same way. Idle above the simulated value is communication
(point-to-point messages over gloo), Python overhead between actions and two processes
sharing 2 cores with anything else running.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--idle-steps", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print the table without writing it")
    parser.add_argument("--rank-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_out:
        _run_rank(args, args.rank_out)
        return
    start = time.monotonic()
    gathered = gather_ranks(__file__, rank_argv(args, ["depth", "width", "batch", "warmup", "steps", "idle_steps"]),
                            N_STAGES, timeout_s=600, echo=True)
    text = _report(gathered, args, time.monotonic() - start)
    if not args.no_write:
        write_result("runtime.md", text)
    print(text)


if __name__ == "__main__":
    main()
