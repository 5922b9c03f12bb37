"""Simulator fidelity over device meshes: ``Runner``'s measured step against ``plan.cost.step_time_s``.

One model (``passes.zoo.mlp``: Linear + GELU layers, where compute dominates Python overhead on
one thread) is planned on every mesh of 2 ranks (dp=2, pp=2, tp=2) and of 4 ranks (dp=4,
dp=2 x pp=2, pp=4, tp=4) and trained by ``runtime.Runner`` over gloo on this machine, each rank
on one thread (``launch_local`` sets ``OMP_NUM_THREADS=1``). The simulated step of each plan
comes from a ``DeviceSpec`` measured here, by the same ranks, in the same run:

* compute: ``measure_node_times`` (every node of the graph timed alone on rank 0 while the
  others wait) passed to ``estimate(..., node_times=...)``, so the simulator stands on measured
  op times, not on the roofline; ``measure_cpu`` (one thread: matmul FLOP/s, copy bandwidth,
  AdamW's sweep) for what is not timed (the optimizer, weights read per micro-batch, bucket copies);
* links: ``runtime.calibrate.measure_link`` (gloo ping-pong and all-reduce at a few sizes,
  fitted to bandwidth + latency), into the point-to-point and the collective figures;
* the runtime's host time per schedule action: ``runtime.calibrate.measure_action_overhead``;
* ranks sharing cores: ``runtime.calibrate.measure_contention`` (a training pass of a quarter
  batch alone and on every rank at once) into ``DeviceSpec.node_compute_units``, which the
  simulator lays out as processor sharing (``partitioner.timeshare``).

To tell the cost model's error from the sharing's, each round also times, on rank 0 alone, the
whole batch's forward and training pass beside the estimate of them from that round's node times.

Calibration and timed steps alternate in rounds (the machine is shared, and its load drifts
within seconds): the node times and the compute units are measured right before each mesh's
steps, the other figures once per round. A mesh's step is the slowest rank's, with a barrier
before each step; the meshes are interleaved (order rotated each round). At 4 ranks
``torch.nn.parallel.DistributedDataParallel`` trains the same model on the same batch beside
them. Each plan is simulated again at the end, its cuts pinned, once per round.

Writes ``benchmarks/results/mesh.md``. Run: ``python benchmarks/mesh.py`` (a few minutes on 2 cores;
it launches its own ranks with gloo on 127.0.0.1).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import tempfile
import time

import _common  # noqa: F401 - puts the repository root on sys.path
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import md_table, median, run_ranks, spearman, write_result


MESHES = {2: (("dp=2", {"dp": 2}), ("pp=2", {"pp": 2}), ("tp=2", {"tp": 2})),
          4: (("dp=4", {"dp": 4}), ("dp=2 x pp=2", {"dp": 2, "pp": 2}), ("pp=4", {"pp": 4}), ("tp=4", {"tp": 4}))}
SCHEDULE = "1f1b"
LR = 1e-4


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR)


def _microbatches(mesh: dict, args) -> int:
    return args.microbatches if mesh.get("pp", 1) > 1 else 1


# -- one rank -------------------------------------------------------------------------------------
class _Calibration:
    """This machine measured by the ranks: links and CPU figures per round, compute just before each mesh's steps.

    ``round`` measures the links (gloo ping-pong and all-reduce), this CPU's FLOP/s, copy and AdamW
    bandwidth (rank 0 alone, the others waiting) and the runtime's host time per action.
    ``before(key)``, right before a mesh's timed steps, times every node of the graph on rank 0
    alone (``measure_node_times``) and how many compute units the ranks share then (a training pass
    of a quarter batch alone and on every rank at once): the machine's other load drifts within
    seconds, so the compute figures are taken next to the steps they predict. ``spec`` gives the
    medians of the round figures with the compute units of one key.
    """

    def __init__(self, model, x, y):
        from passes import capture
        self.gm = capture(model, (x,))
        self.x = x
        self.work = _training_pass(model, x[: len(x) // 4], y[: len(x) // 4])
        self.whole = _training_pass(model, x, y)
        self.alone: list[dict] = []
        self.links: list[dict] = []
        self.cpu: list[dict] = []
        self.overheads: list[float] = []
        self.node_times: dict[tuple, dict] = {}
        self.units: dict[tuple, float] = {}

    def round(self) -> None:
        from passes.devices import measure_cpu
        from runtime.calibrate import measure_action_overhead, measure_link
        self.links.append(measure_link())
        box = [measure_cpu.__wrapped__().to_dict() if dist.get_rank() == 0 else None]   # alone: the others wait
        dist.broadcast_object_list(box, src=0)
        self.cpu.append(box[0])
        box = [self._alone() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        self.alone.append(box[0])
        if not self.units:
            self.before(("first",))
        self.overheads.append(measure_action_overhead(self.spec())["action_overhead_s"])

    def _alone(self) -> dict:
        """Rank 0 alone (the others wait): the graph's nodes timed one by one, and the whole batch's forward and
        training pass (forward + backward) timed as they run: the cost model's error without contention."""
        from passes import measure_node_times
        nodes = measure_node_times(self.gm, (self.x,))
        with torch.no_grad():
            forward = _median_s(lambda: self.gm(self.x))
        return {"nodes": nodes, "forward_s": forward, "training_pass_s": _median_s(self.whole)}

    def before(self, key: tuple) -> None:
        """Node times and shared compute units now, under ``key``."""
        from passes import measure_node_times
        from runtime.calibrate import measure_contention
        box = [measure_node_times(self.gm, (self.x,)) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        self.node_times[key] = box[0]
        self.units[key] = measure_contention(work=self.work)["units"]

    def spec(self, key: tuple | None = None, *, shared: bool = True):
        """A ``DeviceSpec`` of the median round figures with ``key``'s compute units (None: the median of all)."""
        from passes import DeviceSpec
        from runtime.calibrate import fit_link
        n = self.links[0]["group_size"]
        sizes = self.links[0]["samples"]["bytes"]
        p2p = [median(link["samples"]["p2p"][i] for link in self.links) for i in range(len(sizes))]
        ring = [median(link["samples"]["all_reduce"][i] for link in self.links) for i in range(len(sizes))]
        p2p_bw, p2p_lat = fit_link(sizes, p2p)
        ring_bw, ring_lat = fit_link(sizes, ring, steps=2 * (n - 1), share=2 * (n - 1) / n)
        base = dict(self.cpu[0])
        base["peak_flops"] = {k: median(c["peak_flops"][k] for c in self.cpu) for k in base["peak_flops"]}
        for name in ("memory_bandwidth_Bps", "optimizer_bandwidth_Bps"):
            base[name] = median(c[name] for c in self.cpu)
        units = median(self.units.values()) if key is None else self.units[key]
        return DeviceSpec.from_dict(dict(
            base, link_bandwidth_Bps=p2p_bw, link_latency_s=p2p_lat, inter_node_bandwidth_Bps=p2p_bw,
            inter_node_latency_s=p2p_lat, collective_bandwidth_Bps=ring_bw, collective_latency_s=ring_lat,
            node_compute_units=units if shared else 0.0,
            action_overhead_s=median(self.overheads) if self.overheads else 0.0,
            source=f"{base['source']}; gloo links, shared cores and action overhead measured between {n} ranks"))

    def times(self, key: tuple | None = None) -> dict:
        """Node times under ``key`` (None: the median of every measurement)."""
        if key is not None:
            return self.node_times[key]
        every = list(self.node_times.values())
        return {name: median(t[name] for t in every) for name in every[0]}

    def to_dict(self) -> dict:
        return {"links": self.links, "cpu": self.cpu, "overheads": self.overheads,
                "alone": [{k: v for k, v in row.items() if k != "nodes"} for row in self.alone],
                "units": {"/".join(map(str, k)): u for k, u in self.units.items()},
                "node_total_s": {"/".join(map(str, k)): sum(t.values()) for k, t in self.node_times.items()}}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_s(fn, repeats: int = 3) -> float:
    """Median seconds of ``fn()`` after one call to warm up."""
    fn()
    return median(_seconds(fn) for _ in range(repeats))


def _training_pass(model, x, y):
    """Forward and backward of a copy of the model (no update): the work the ranks contend with."""
    work = copy.deepcopy(model)

    def run():
        F.mse_loss(work(x), y).backward()
        work.zero_grad(set_to_none=True)
    return run


class _PhaseClock:
    """Seconds a rank spends in each part of ``Runner.step`` (wrapping the runner's pieces until ``close``)."""

    def __init__(self, runner):
        self.seconds: dict[str, float] = {}
        self._undo = []
        self._wrap(runner.driver, "_forward", "forward")
        self._wrap(runner.driver, "_backward", "backward")
        self._wrap(runner.driver, "_recv_tensors", "receive")
        if runner._grad_sync is not None:
            self._wrap(runner._grad_sync, "finish", "gradient sync")
        if runner.optimizer is not None:
            self._wrap(runner.optimizer, "step", "optimizer")

    def _wrap(self, obj, name: str, key: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
        setattr(obj, name, timed)
        self._undo.append((obj, name))

    def close(self) -> None:
        for obj, name in self._undo:
            delattr(obj, name)


def _plan(gm, x, n: int, mesh: dict, spec, node_times: dict, args, cuts=None):
    """The plan of ``mesh`` costed with ``spec`` and the measured node times (the cuts pinned when given)."""
    from partitioner import partition
    from passes import estimate
    estimate(gm, (x,), device=spec, training=True, optimizer="adamw", node_times=node_times)
    return partition(gm, n, (x,), mesh=mesh, data_parallel="replicate", device=spec,
                     n_microbatches=_microbatches(mesh, args), schedule=SCHEDULE, cuts=cuts or None)


class _DDP:
    """``DistributedDataParallel`` (gloo) on a copy of the model, on this rank's share of the batch, with the
    same per-step work as ``Runner.step`` (AdamW step, zero_grad, the loss all-reduced)."""

    def __init__(self, model):
        from torch.nn.parallel import DistributedDataParallel
        self.module = DistributedDataParallel(copy.deepcopy(model))
        self.optimizer = _adamw(self.module.parameters())

    def step(self, x, y) -> float:
        n, r = dist.get_world_size(), dist.get_rank()
        loss = F.mse_loss(self.module(x.chunk(n)[r]), y.chunk(n)[r])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        return float(total) / n


def _timed_step(step, runner=None) -> tuple[float, dict]:
    """Seconds of one step after a barrier, and the seconds of its parts (a ``Runner``'s)."""
    clock = _PhaseClock(runner) if runner is not None else None
    dist.barrier()
    start = time.perf_counter()
    try:
        step()
    finally:
        took = time.perf_counter() - start
        if clock is not None:
            clock.close()
    return took, dict(clock.seconds, step=took) if clock is not None else {}


def _slowest(times: list[float]) -> list[float]:
    """Per step, the slowest rank's time (every rank gets the same list)."""
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _run_rank(args, out_path: str) -> None:
    from passes import zoo
    from runtime import Runner
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    n, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    model, (x,) = zoo.mlp(depth=args.depth, width=args.width, batch=args.batch)
    y = torch.randn_like(x)
    load_start = os.getloadavg()[0]
    calibration = _Calibration(model, x, y)
    calibration.round()
    first = calibration.spec()
    steps, plans, runners = {}, {}, {}
    for name, mesh in MESHES[n]:
        plans[name] = _plan(calibration.gm, x, n, mesh, first, calibration.times(), args)
        runners[name] = runner = Runner(plans[name], loss_fn=F.mse_loss, optimizer_fn=_adamw)
        steps[name] = lambda runner=runner: runner.step((x,), y)
    if n == 4:
        ddp = _DDP(model)
        steps["DDP"] = lambda: ddp.step(x, y)
    names = list(steps)
    for _ in range(args.warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    phases: dict[str, list[dict]] = {name: [] for name in runners}
    for r in range(args.rounds):
        if r:
            calibration.round()
        for name in names[r % len(names):] + names[:r % len(names)]:      # rotated against drift
            if name in runners:
                calibration.before((r, name))
            block = [_timed_step(steps[name], runners.get(name)) for _ in range(args.steps)]
            times[name].append(_slowest([t for t, _ in block]))
            if name in runners:
                phases[name] += [p for _, p in block]
    everyone = [None] * n
    dist.all_gather_object(everyone, {name: _median_parts(rows) for name, rows in phases.items()})
    if rank == 0:
        result = {"world": n, "times": times, "calibration": calibration.to_dict(), "phases": everyone,
                  "load": [load_start, os.getloadavg()[0]], "simulated": _simulate(x, n, plans, calibration, args)}
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _median_parts(rows: list[dict]) -> dict:
    return {key: median(row.get(key, 0.0) for row in rows) for key in rows[0]}


def _simulate(x, n: int, plans: dict, calibration: _Calibration, args) -> dict:
    """Each plan simulated again (its cuts pinned) once per round, on the round figures with the node times and
    compute units measured just before that round's steps of the mesh; and on the median figures with every
    rank on its own core (no sharing)."""
    out = {}
    for name, mesh in MESHES[n]:
        cuts = [c["node"] for c in plans[name].decisions.cuts]
        keys = [(r, name) for r in range(args.rounds)]
        rounds = [_plan(calibration.gm, x, n, mesh, calibration.spec(key), calibration.times(key), args,
                        cuts=cuts).cost for key in keys]
        alone = _plan(calibration.gm, x, n, mesh, calibration.spec(shared=False), calibration.times(), args,
                      cuts=cuts).cost
        typical = _plan(calibration.gm, x, n, mesh, calibration.spec(), calibration.times(), args, cuts=cuts).cost
        out[name] = {"rounds": [c.step_time_s for c in rounds], "detail": _detail(typical),
                     "units": [calibration.units[key] for key in keys], "alone": alone.step_time_s}
    out["_spec"] = calibration.spec().to_dict()
    out["_compute"] = [_compute_alone(calibration, x, row) for row in calibration.alone]
    return out


def _compute_alone(calibration: _Calibration, x, row: dict) -> dict:
    """One round's whole-batch forward and training pass on rank 0 alone beside what the cost model makes of
    that round's node times (forward + backward of every node, as the simulator sums them)."""
    from passes import estimate
    est = estimate(calibration.gm, (x,), device=calibration.spec(), training=True, optimizer="adamw",
                   node_times=row["nodes"])
    return {"nodes_forward_s": sum(row["nodes"].values()), "forward_s": row["forward_s"],
            "estimated_pass_s": sum(c.time_s for c in est.nodes), "training_pass_s": row["training_pass_s"]}


def _detail(cost) -> dict:
    return {"compute_s": cost.compute_s, "bubble": cost.bubble_fraction, "optimizer_s": cost.optimizer_s,
            "axes": [dataclasses.asdict(a) for a in cost.axes]}


# -- launch and report ------------------------------------------------------------------------------
def _launch(world: int, argv: list[str], out_path: str, timeout_s: float) -> dict:
    run_ranks(__file__, argv, world, out_path, timeout_s=timeout_s)
    with open(out_path) as f:
        return json.load(f)


def _rows(result: dict) -> list[dict]:
    """Per mesh: measured (median of every step), simulated (median over rounds), and their ratio (median over
    rounds of each round's simulated / measured: a round's simulation has that round's compute units)."""
    rows = []
    for name, _ in MESHES[result["world"]]:
        sim = result["simulated"][name]
        rounds = result["times"][name]
        ratios = [s / median(t) for s, t in zip(sim["rounds"], rounds)]
        rows.append({"mesh": name, "measured": median(t for block in rounds for t in block),
                     "sim": median(sim["rounds"]), "ratio": median(ratios), "low": min(ratios), "high": max(ratios),
                     "alone": sim["alone"], "units": sim["units"], "detail": sim["detail"]})
    return rows


def _ranking(rows: list[dict], key: str) -> str:
    return " < ".join(r["mesh"] for r in sorted(rows, key=lambda r: r[key]))


def _phase_rows(result: dict, rows: list[dict]) -> list[list]:
    """Measured parts of a step (mean over ranks of each rank's median) beside the simulator's."""
    out = []
    for row in rows:
        parts = [rank[row["mesh"]] for rank in result["phases"]]
        mean = {key: sum(p.get(key, 0.0) for p in parts) / len(parts)
                for key in ("forward", "backward", "receive", "gradient sync", "optimizer", "step")}
        d = row["detail"]
        exposed = {a["axis"]: a["exposed_s"] for a in d["axes"]}
        out.append([row["mesh"], *(f"{mean[k] * 1e3:.1f}" for k in ("forward", "backward", "receive",
                                                                   "gradient sync", "optimizer", "step")),
                    f"{d['compute_s'] * 1e3:.1f}", f"{d['bubble']:.0%}", f"{d['optimizer_s'] * 1e3:.1f}",
                    " ".join(f"{k} {v * 1e3:.1f}" for k, v in exposed.items()) or "-"])
    return out


def _section(result: dict) -> str:
    rows = _rows(result)
    spec = result["simulated"]["_spec"]
    cal = result["calibration"]
    table = md_table(["mesh", "measured ms", "simulated ms", "simulated / measured", "rounds (min-max)",
                      "compute units", "simulated, cores not shared, ms", "ratio"],
                     [[r["mesh"], f"{r['measured'] * 1e3:.1f}", f"{r['sim'] * 1e3:.1f}", f"{r['ratio']:.3f}",
                       f"{r['low']:.2f}-{r['high']:.2f}", f"{min(r['units']):.2f}-{max(r['units']):.2f}",
                       f"{r['alone'] * 1e3:.1f}", f"{r['alone'] / r['measured']:.3f}"] for r in rows])
    phases = md_table(["mesh", "forward", "backward", "of which receive", "gradient sync", "optimizer", "step",
                       "sim: busiest stage compute (own core)", "sim: bubble", "sim: optimizer",
                       "sim: exposed communication"], _phase_rows(result, rows))
    text = [f"## {result['world']} ranks", "", table, "",
            f"* ranking by measured step: {_ranking(rows, 'measured')}",
            f"* ranking by simulated step: {_ranking(rows, 'sim')} (Spearman "
            f"{spearman([r['measured'] for r in rows], [r['sim'] for r in rows]):.2f}); with cores not shared: "
            f"{_ranking(rows, 'alone')}",
            f"* calibrated (medians over {len(cal['links'])} rounds): gloo point-to-point "
            f"{spec['link_bandwidth_Bps'] / 1e9:.2f} GB/s + {spec['link_latency_s'] * 1e6:.0f} us, all-reduce "
            f"{spec['collective_bandwidth_Bps'] / 1e9:.2f} GB/s + {spec['collective_latency_s'] * 1e6:.0f} us per "
            f"ring step; matmul {spec['peak_flops']['float32'] / 1e9:.0f} GFLOP/s, copy "
            f"{spec['memory_bandwidth_Bps'] / 1e9:.1f} GB/s, AdamW {spec['optimizer_bandwidth_Bps'] / 1e9:.1f} GB/s "
            f"(one thread); runtime overhead {spec['action_overhead_s'] * 1e3:.2f} ms per action; forward of the "
            f"whole batch, nodes timed alone: {median(cal['node_total_s'].values()) * 1e3:.1f} ms "
            f"({min(cal['node_total_s'].values()) * 1e3:.0f}-{max(cal['node_total_s'].values()) * 1e3:.0f}); "
            f"compute units the ranks "
            f"share, before each mesh's steps: {min(cal['units'].values()):.2f}-{max(cal['units'].values()):.2f}"]
    if "DDP" in result["times"]:
        ddp = median(t for block in result["times"]["DDP"] for t in block)
        dp = next(r for r in rows if r["mesh"] == f"dp={result['world']}")
        text.append(f"* `DistributedDataParallel` (gloo, same model, batch and AdamW) step {ddp * 1e3:.1f} ms; "
                    f"fxpart dp={result['world']} / DDP = {dp['measured'] / ddp:.3f}")
    text += ["", "Where the time goes, ms per step (measured: mean over ranks of each rank's median; simulated: "
                 "see below):", "", phases, "", f"Why it is off at {result['world']} ranks:", "", *_why(result, rows)]
    return "\n".join(text)


def _why(result: dict, rows: list[dict]) -> list[str]:
    """Where simulated / measured leaves 15%, and the evidence this run holds for why."""
    off = [f"{r['mesh']} ({r['ratio']:.2f})" for r in rows if abs(r["ratio"] - 1) > 0.15]
    shared = [r["alone"] / r["measured"] for r in rows]
    units = [u for r in rows for u in r["units"]]
    lines = [f"* off by more than 15%: {', '.join(off) if off else 'none'}; every round's ratio, by mesh, in "
             f"`rounds (min-max)`.",
             f"* cores shared: {result['world']} ranks of one thread on {os.cpu_count()} cores, beside other jobs "
             + (f"(load average {result['load'][0]:.1f} at the start, {result['load'][1]:.1f} at the end). "
                if "load" in result else ". ")
             + f"With every rank on its own core the simulated step is {min(shared):.2f}-{max(shared):.2f} of the "
               f"measured one: the other {1 - max(shared):.0%}-{1 - min(shared):.0%} of the step is the sharing (and "
               f"the errors below), which the simulator knows only as the compute units measured before each mesh's "
               f"steps ({min(units):.2f}-{max(units):.2f} here, for the same ranks), "
               f"while the other jobs' load changes within seconds."]
    compute = result["simulated"].get("_compute")
    if compute:
        def mid(key):
            return median(c[key] for c in compute)
        ratio = median(c["estimated_pass_s"] / c["training_pass_s"] for c in compute)
        lines.append(f"* the cost model alone (rank 0 alone, the others waiting, whole batch, median over rounds): "
                     f"training pass (forward + backward) {mid('estimated_pass_s') * 1e3:.1f} ms estimated, "
                     f"{mid('training_pass_s') * 1e3:.1f} ms measured ({ratio:.2f}); forward "
                     f"{mid('nodes_forward_s') * 1e3:.1f} ms as its nodes timed one by one, "
                     f"{mid('forward_s') * 1e3:.1f} ms whole. Backward times are not measured but the forward's scaled "
                     f"by the roofline's ratio (2x for a matmul)"
                     + (", short of what the CPU's backward takes." if ratio < 0.95 else
                        f"; here that is within {abs(1 - ratio):.0%}: the error is elsewhere."))
    dp = next((r for r in rows if r["mesh"] == f"dp={result['world']}"), None)
    if dp is not None:
        parts = [rank[dp["mesh"]] for rank in result["phases"]]
        sync = sum(p.get("gradient sync", 0.0) for p in parts) / len(parts)
        exposed = sum(a["exposed_s"] for a in dp["detail"]["axes"] if a["axis"] == "dp")
        if exposed < sync:
            why = ("the links are measured with every rank in the collective, but the buckets reduced under the "
                   "backward compete with it for the cores, and the simulator counts a collective as a wait that "
                   "takes no compute")
        else:
            why = ("the all-reduce figures are medians over the rounds' calibrations, taken under other loads than "
                   "these steps'")
        lines.append(f"* gloo runs its collectives on the CPU: {dp['mesh']}'s gradient sync waits {sync * 1e3:.1f} ms "
                     f"measured, {exposed * 1e3:.1f} ms simulated; {why}.")
    swaps = _swaps(rows)
    if swaps:
        lines.append(f"* ranking: {'; '.join(swaps)}; Spearman counts a swap whatever the gap.")
    return lines


def _swaps(rows: list[dict]) -> list[str]:
    """Pairs ordered one way by the measured step and the other by the simulated one, with their measured gap."""
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if (a["measured"] - b["measured"]) * (a["sim"] - b["sim"]) < 0:
                gap = abs(a["measured"] - b["measured"]) / min(a["measured"], b["measured"])
                out.append(f"{a['mesh']} and {b['mesh']} swap (measured {gap:.0%} apart)")
    return out


def _report(results: list[dict], args, elapsed_s: float) -> str:
    sections = "\n\n".join(_section(result) for result in results)
    return f"""# Simulator fidelity over device meshes (gloo ranks on this machine)

Model: `passes.zoo.mlp(depth={args.depth}, width={args.width}, batch={args.batch})` (fp32), MSE loss, AdamW;
schedule {SCHEDULE}, {args.microbatches} micro-batches for pipelines (1 otherwise), data parallel
"replicate"; every rank on one thread, gloo on 127.0.0.1. {args.warmup} warm-up steps per mesh,
then {args.rounds} rounds: a calibration, then per mesh (order rotated each round) the node times
and the contention, then {args.steps} timed steps, a barrier before each, a step's time the slowest
rank's.
Total run {elapsed_s:.0f} s.

The target (issue 12): simulated within 15% of measured for every 2-rank mesh; at 4 ranks, the
ratio and the ranking of meshes. Each section ends with where this run misses it, and why.

`simulated` is `plan.cost.step_time_s` of the same plan (cuts pinned) re-costed on a `DeviceSpec`
measured by the same ranks in the same run: links, FLOP/s, bandwidths and the runtime's overhead
per action as medians over the rounds, the node times (`measure_node_times`, rank 0 alone) and
the compute units the ranks share (`measure_contention`) measured just before that round's steps
of that mesh (median over rounds shown); `simulated / measured` is the median over rounds of each
round's ratio, with its range. `cores not shared` simulates the same plan on the median figures
with `node_compute_units=0` (every rank on its own core): how much the oversubscription explains.

{sections}

Measured parts: time inside the stage's forward and backward actions (a pipeline's waits for its
neighbour's activations or gradients are inside them, `of which receive`), the data-parallel
gradient sync's wait and copies after the last backward, and the optimizer step. Simulated: the
busiest stage's forward and backward on its own core (tensor-parallel collectives included), its
idle share in the schedule, the optimizer step as the ranks share cores, and what communication
the step waits for beyond the compute.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--no-write", action="store_true", help="print the table without writing it")
    parser.add_argument("--rank-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_out:
        _run_rank(args, args.rank_out)
        return
    argv = [f"--depth={args.depth}", f"--width={args.width}", f"--batch={args.batch}",
            f"--microbatches={args.microbatches}", f"--warmup={args.warmup}", f"--rounds={args.rounds}",
            f"--steps={args.steps}"]
    start = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in (int(w) for w in args.worlds.split(",")):
            results.append(_launch(world, argv, os.path.join(tmp, f"mesh{world}.json"), timeout_s=1800))
            with open(os.path.join(tmp, "raw.json"), "w") as f:
                json.dump(results, f)
    if not args.no_write:
        write_result("mesh.json", json.dumps(results))
    text = _report(results, args, time.monotonic() - start)
    if not args.no_write:
        write_result("mesh.md", text)
    print(text)


if __name__ == "__main__":
    main()
