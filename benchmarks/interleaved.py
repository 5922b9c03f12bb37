"""Interleaved 1F1B: fxpart's Runner against torch.distributed.pipelining's ``ScheduleInterleaved1F1B`` on 2 CPU ranks.

A deep MLP (``passes.zoo.mlp``) is planned twice for 2 pipeline ranks with few micro-batches (m = 2 and 4, where
the fill and drain are a large share of the step):

* ``partition(model, 2, (x,), strategy="pipeline", schedule="1f1b", n_microbatches=m)``: 2 stages;
* ``partition(model, 2, (x,), strategy="pipeline", n_virtual=2, n_microbatches=m)``: 4 stages, rank r holding
  stages r and r + 2 (schedule ``"interleaved-1f1b"``).

Every rank builds the same plans (``device=None``: rank 0 measures this machine and every rank plans with its
figures). On each, the SAME stage modules are trained by fxpart's ``runtime.Runner`` and by torch's own
schedule built directly on them (``PipelineStage`` per stage, ``Schedule1F1B`` or ``ScheduleInterleaved1F1B``,
then ``optimizer.step()`` and a loss broadcast: the same per-step work as ``Runner.step``). Steps are timed
after a warm-up, the four implementations interleaved (the order rotates every step) with a barrier before
each step; a step's time is the slowest rank's; medians. Both interleaved runs start from the same weights
as the 1F1B runs and their losses are checked equal.

Writes ``benchmarks/results/interleaved.md``. Run: ``python benchmarks/interleaved.py`` (about a minute on
2 cores; it launches its own 2 ranks with gloo on 127.0.0.1).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import _common  # noqa: F401 - puts the repository root on sys.path
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import gather_ranks, md_table, median, rank_argv, write_result


WORLD = 2
MICROBATCHES = (2, 4)
IMPLS = ("fxpart 1f1b", "torch 1F1B", "fxpart interleaved", "torch Interleaved1F1B")
LR = 1e-3


def _sgd(params):
    return torch.optim.SGD(params, lr=LR)


def _loss(outputs, target):
    return F.mse_loss(outputs[0] if isinstance(outputs, (tuple, list)) else outputs, target)


class _Torch:
    """torch.distributed.pipelining's schedule on the plan's stage modules as they are (this rank's stages)."""

    def __init__(self, plan, rank: int, n_microbatches: int):
        from torch.distributed import pipelining as pp
        n = len(plan.stages)
        self.indices = list(range(rank, n, WORLD))
        self.modules = [plan.stages[i].module for i in self.indices]
        stages = [pp.PipelineStage(m, i, n, torch.device("cpu")) for m, i in zip(self.modules, self.indices)]
        if len(stages) == 1:
            self.schedule = pp.Schedule1F1B(stages[0], n_microbatches, loss_fn=_loss)
        else:
            self.schedule = pp.ScheduleInterleaved1F1B(stages, n_microbatches, loss_fn=_loss)
        params = {id(p): p for m in self.modules for p in m.parameters() if p.requires_grad}
        self.optimizer = _sgd(list(params.values()))
        self.first, self.last = 0 in self.indices, n - 1 in self.indices

    def step(self, x, y) -> float:
        losses: list = []
        self.schedule.step(*((x,) if self.first else ()), target=y if self.last else None,
                           losses=losses if self.last else None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.stack([l.detach() for l in losses]).mean() if self.last else torch.zeros(())
        dist.broadcast(loss, src=WORLD - 1)
        return float(loss)


def _timed(step) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def _run_rank(args, out_path: str) -> None:
    from partitioner import partition
    from passes import zoo
    from runtime import Runner
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model, (x,) = zoo.mlp(depth=args.depth, width=args.width, batch=args.batch)
    y = torch.randn_like(x)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for m in MICROBATCHES:
        plain = partition(model, WORLD, (x,), strategy="pipeline", schedule="1f1b", n_microbatches=m)
        inter = partition(model, WORLD, (x,), strategy="pipeline", n_virtual=2, n_microbatches=m)
        runners = {"fxpart 1f1b": Runner(plain, loss_fn=F.mse_loss, optimizer_fn=_sgd),
                   "fxpart interleaved": Runner(inter, loss_fn=F.mse_loss, optimizer_fn=_sgd)}
        torch_runs = {"torch 1F1B": _Torch(plain, rank, m), "torch Interleaved1F1B": _Torch(inter, rank, m)}
        # every implementation trains the model's own parameters: same start, same first losses
        first = {}
        for name in IMPLS:
            model.load_state_dict(init)
            step = (lambda r=runners[name]: r.step((x,), y)) if name in runners else \
                (lambda t=torch_runs[name]: t.step(x, y))
            first[name] = step()
        steps = {name: ((lambda r=runners[name]: r.step((x,), y)) if name in runners else
                        (lambda t=torch_runs[name]: t.step(x, y))) for name in IMPLS}
        for _ in range(args.warmup):
            for step in steps.values():
                step()
        times: dict[str, list[float]] = {k: [] for k in IMPLS}
        for i in range(args.steps):
            for k in IMPLS[i % len(IMPLS):] + IMPLS[:i % len(IMPLS)]:
                times[k].append(_timed(steps[k]))
        results.append({"m": m, "times": times, "first_loss": first,
                        "simulated": {"1f1b": plain.cost.step_time_s, "interleaved": inter.cost.step_time_s},
                        "stages": [len(plain.stages), len(inter.stages)]})
        print(f"rank {rank} m={m}: " + ", ".join(f"{k} {median(v) * 1e3:.1f} ms" for k, v in times.items()),
              flush=True)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


def _report(gathered: list, args, elapsed_s: float) -> str:
    rows, check = [], []
    for per_rank in zip(*gathered):
        m = per_rank[0]["m"]
        step = {k: median(max(ts) for ts in zip(*(r["times"][k] for r in per_rank))) for k in IMPLS}
        sim = per_rank[0]["simulated"]
        rows.append([m, f"{step['fxpart 1f1b'] * 1e3:.1f}", f"{step['torch 1F1B'] * 1e3:.1f}",
                     f"{step['fxpart interleaved'] * 1e3:.1f}", f"{step['torch Interleaved1F1B'] * 1e3:.1f}",
                     f"{step['fxpart 1f1b'] / step['fxpart interleaved']:.3f}x",
                     f"{step['torch 1F1B'] / step['torch Interleaved1F1B']:.3f}x",
                     f"{sim['1f1b'] / sim['interleaved']:.3f}x",
                     f"{step['torch Interleaved1F1B'] / step['fxpart interleaved']:.3f}x",
                     f"{step['torch 1F1B'] / step['fxpart 1f1b']:.3f}x"])
        losses = per_rank[0]["first_loss"]
        check.append(f"m={m}: first-step loss " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
    table = md_table(["m", "fxpart 1f1b ms", "torch 1F1B ms", "fxpart interleaved ms", "torch Interleaved1F1B ms",
                      "fxpart speed-up from interleaving", "torch speed-up from interleaving",
                      "simulated speed-up", "fxpart / torch (interleaved)", "fxpart / torch (1f1b)"], rows)
    return f"""# Interleaved 1F1B: fxpart Runner vs torch.distributed.pipelining (2 CPU ranks, gloo)

Model: `passes.zoo.mlp(depth={args.depth}, width={args.width}, batch={args.batch})`, MSE loss, SGD; 2 ranks on
127.0.0.1 (gloo), `torch.set_num_threads(1)` per rank. Plans: `partition(model, 2, (x,), strategy="pipeline",
schedule="1f1b", n_microbatches=m)` (2 stages) and `partition(..., n_virtual=2, n_microbatches=m)` (4 stages,
rank r holding r and r + 2). {args.warmup} warm-up steps per implementation, then the median of {args.steps}
timed steps, the implementations interleaved (order rotated each step), a barrier before each step, a step's
time taken on the slowest rank. Total run {elapsed_s:.0f} s.

{table}

* Speed-up from interleaving: the 1F1B step over the interleaved step of the same implementation; theory
  for equal stages, p = 2 and v = 2: (m + p - 1) / (m + (p - 1) / v) = {(2 + 1) / (2 + 0.5):.3f} at m = 2,
  {(4 + 1) / (4 + 0.5):.3f} at m = 4 (point-to-point messages double).
* `simulated speed-up`: the two plans' `plan.cost.step_time_s` (the simulator the planner chooses with).
* `fxpart / torch`: torch's step over fxpart's on the same stage modules (> 1: fxpart faster). The
  machine's 2 cores are shared, so ratios move by roughly +-5-10% between runs.

Same start, same loss (the 4 implementations train the model's own parameters from the same weights):
{chr(10).join("* " + c for c in check)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="print the table without writing it")
    parser.add_argument("--rank-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_out:
        _run_rank(args, args.rank_out)
        return
    start = time.monotonic()
    gathered = gather_ranks(__file__, rank_argv(args, ["depth", "width", "batch", "warmup", "steps"]), WORLD,
                            timeout_s=900, echo=True)
    text = _report(gathered, args, time.monotonic() - start)
    if not args.no_write:
        write_result("interleaved.md", text)
    print(text)


if __name__ == "__main__":
    main()
