"""Choosing the mesh: every ``dp x tp x pp`` and what goes under it, scored by the step simulator.

Reads a captured, costed graph; writes nothing. ``Planner`` holds what every candidate shares
(the graph's costs, and per tensor-parallel degree its shard graphs and their pipeline costs,
each computed once); ``evaluate`` scores one candidate (mesh, micro-batches, schedule,
data-parallel mode): the exact cuts for its micro-batch under the memory limit, then the
simulated step (``simulate_step``). ``search`` tries them all and keeps the fastest that fits.
"""
from __future__ import annotations

import logging
import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from passes._util import block_path, format_bytes, format_seconds
from .pipeline import (PipelineCosts, explain_memory, memory_model, solve_cuts, state_per_param_byte,
                       unit_boundaries)
from .plan import DP_MODES
from .schedules import INTERLEAVED, SCHEDULES
from .simulate_step import StageTiming, simulate_plan

__all__ = ["Planner", "Candidate", "meshes", "search"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One mesh and what goes under it, with its simulated step, or the reason it was rejected."""
    mesh: dict
    n_microbatches: int
    schedule: str
    data_parallel: str
    step_time_s: float = math.inf
    peak_bytes: int = 0
    bubble_fraction: float = 0.0
    comm_s: float = 0.0                   # communication time of the step (all axes, before overlap)
    recompute: bool = False               # every block's activations recomputed in backward
    positions: tuple = ()                 # cut positions in the graph a device runs
    cost: object = None                   # plan.PlanCost
    reason: str = ""                      # why it was rejected ("" when it fits)
    need_bytes: float = 0.0               # rejected for memory: the largest device's need
    need_text: str = ""                   # and every stage's
    n_virtual: int = 1                    # stages per pipeline rank (interleaved 1F1B)

    @property
    def fits(self) -> bool:
        return not self.reason

    def label(self) -> str:
        mesh = " x ".join(f"{k}{self.mesh[k]}" for k in ("dp", "tp", "pp"))
        extra = f", {self.data_parallel}" if self.mesh["dp"] > 1 else ""
        sched = f", {self.schedule}" if self.mesh["pp"] > 1 else ""
        sched += f" v={self.n_virtual}" if self.n_virtual > 1 else ""
        again = ", recompute" if self.recompute else ""
        return f"{mesh}, m={self.n_microbatches}{sched}{extra}{again}"

    def summary(self) -> str:
        if self.reason:
            return f"{self.label()}: rejected, {self.reason}"
        return (f"{self.label()}: step {format_seconds(self.step_time_s)}, peak {format_bytes(self.peak_bytes)}, "
                f"bubble {self.bubble_fraction:.1%}, comm {format_seconds(self.comm_s)}")


@dataclass
class _Graphs:
    """What one tensor-parallel degree needs: the shard graphs (tp > 1) and the pipeline costs of the first."""
    info: object
    sharded: object                # tensor.ShardedGraph (tp > 1) or None
    costs: PipelineCosts
    forward_share: np.ndarray      # [n+1] prefix of forward seconds (whole example), to split stage time
    unit_param_bytes: float
    allowed: np.ndarray | None     # cut positions of a deep graph (block and sub-block boundaries), or None: any
    blocks: np.ndarray | None = None   # per node in compute order, its block's number (-1: outside blocks)
    flops: PipelineCosts | None = None  # balance="flops": FLOP costs the cuts balance (the step is still timed)

    def n_units(self, start: int, end: int) -> int:
        """Blocks among nodes ``[start, end)`` (at least 1): a stage's FSDP groups and gradient buckets."""
        codes = self.blocks[start:end]
        return max(1, len(np.unique(codes[codes >= 0])))

    @property
    def shards(self) -> list | None:
        return self.sharded.modules() if self.sharded is not None else None


COARSE_ABOVE = 1500      # a graph with more cut positions than this is searched at block boundaries first


@dataclass
class Planner:
    """Everything the candidates of one model share; ``evaluate`` scores one of them."""
    gm: torch.fx.GraphModule
    spec: object
    training: bool
    optimizer: str | None
    balance: str = "time"
    memory_limit: float | None = None
    devices_per_node: int = 8
    batch: int = 1                          # the example's global batch (dim 0)
    precision: str = "fp32"                 # "mixed": a bf16/fp16 model with fp32 master weights and moments
    _graphs: dict = field(default_factory=dict)
    _cuts: dict = field(default_factory=dict)

    def graphs(self, tp: int, recompute: bool = False) -> _Graphs:
        key = (tp, recompute)
        if key not in self._graphs:
            if recompute:
                g = self.graphs(tp)
                self._graphs[key] = dataclasses.replace(g, costs=g.costs.checkpointed())
            else:
                self._graphs[key] = self._make_graphs(tp)
        return self._graphs[key]

    def _make_graphs(self, tp: int) -> _Graphs:
        info, sharded, graph = None, None, self.gm
        if tp > 1:
            from .tensor import shard_graph
            sharded = shard_graph(self.gm, tp, spec=self.spec, training=self.training,
                                  devices_per_node=self.devices_per_node)
            info, graph = sharded.info, sharded.module(0)
        costs = PipelineCosts.of(graph, training=self.training, link_Bps=self.spec.link_bandwidth_Bps,
                                 balance="time", spec=self.spec)
        flops = None if self.balance == "time" else \
            PipelineCosts.of(graph, training=self.training, link_Bps=self.spec.link_bandwidth_Bps, balance=self.balance)
        forward = np.concatenate([[0.0], np.cumsum(costs.node_forward)])
        n_cuttable = int(costs.cuttable.sum())
        allowed = unit_boundaries(costs.order) if n_cuttable > COARSE_ABOVE else None
        keys = [_block_key(n) for n in costs.order.nodes]
        number = {k: i for i, k in enumerate(dict.fromkeys(k for k in keys if k))}
        blocks = np.array([number.get(k, -1) for k in keys], dtype=np.int64)
        return _Graphs(info, sharded, costs, forward, _largest_unit_params(costs, keys), allowed, blocks, flops)

    # -- one candidate ------------------------------------------------------------------------
    def evaluate(self, mesh: dict, n_microbatches: int, schedule: str, data_parallel: str, *,
                 positions: list[int] | None = None, near: tuple | None = None, quick: bool = True,
                 recompute: bool = False, n_virtual: int = 1, beat: Candidate | None = None) -> Candidate:
        """Score one candidate: cuts for its micro-batch under the memory limit, then the simulated step.

        A deep graph's cuts are searched at block and sub-block boundaries; with ``near`` (cuts found
        so), at every node where a cut of a split as balanced as those can lie (``_windows``). ``quick`` rejects a mesh whose parameter
        state alone exceeds the memory limit without cutting it (False: cut it, to say what each
        stage would need). ``recompute``: every block recomputed in backward (``PipelineCosts.checkpointed``).
        ``n_virtual``: stages per pipeline rank (interleaved 1F1B): ``pp * n_virtual`` stages, a rank's memory
        the sum of its stages' (cut under the limit by giving each stage its share of its rank's memory at
        the fastest cuts). ``beat``: the best candidate found so far; where the fastest cuts do not fit,
        the step they would take is simulated first, and a candidate no faster than ``beat`` even there is
        rejected without searching cuts under the limit (those are never better balanced).
        """
        dp, tp, pp, m, v = mesh["dp"], mesh["tp"], mesh["pp"], n_microbatches, n_virtual
        n_stages = pp * v
        base = Candidate(dict(mesh), m, schedule, data_parallel, recompute=recompute, n_virtual=v)
        if self.batch % (dp * m):
            return _reject(base, f"the batch of {self.batch} does not split into dp x micro-batches = {dp * m}")
        if v > 1 and m % pp:
            return _reject(base, f"interleaved 1F1B needs micro-batches in groups of pp={pp}, not m={m}")
        g = self.graphs(tp, recompute)
        if tp > 1 and not g.info.row and not g.info.expert:
            return _reject(base, _nothing_shards(g.info, tp))
        n_cuttable = int(g.costs.cuttable[1:len(g.costs.order)].sum())
        if g.allowed is not None and near is None and positions is None:
            n_cuttable = min(n_cuttable, len(g.allowed))
        if n_stages - 1 > n_cuttable:
            return _reject(base, f"the graph has only {n_cuttable} places to cut, not {n_stages - 1}")
        floor = self._state_floor(g, mesh, data_parallel)
        if quick and self.memory_limit is not None and floor > self.memory_limit:
            return _reject(base, f"does not fit memory_limit={format_bytes(self.memory_limit)}: parameters and "
                                 f"optimizer state alone need {format_bytes(floor)} per device", floor,
                           f"at least {format_bytes(floor)} for parameters and optimizer state")
        costs = g.costs.at_fraction(1.0 / (dp * m))
        memory_of = memory_model(costs, n_stages, training=self.training, schedule=schedule, n_microbatches=m,
                                 optimizer=self.optimizer, dp=dp, dp_mode=data_parallel,
                                 unit_param_bytes=g.unit_param_bytes, precision=self.precision, n_virtual=v)
        limit = self.memory_limit
        if positions is None:
            # balance="flops": cuts by FLOPs (in proportion for any micro-batch), the step timed as always
            balanced = costs if g.flops is None else g.flops
            allowed = g.allowed if near is None else None
            windows = None if near is None else _windows(balanced, near, n_stages)
            positions = self._fastest_cuts(tp, n_stages, balanced, allowed, recompute, windows, near)   # any schedule
            bounds = [0] + list(positions) + [len(costs.order)]
            need = [memory_of(k, np.array([s]), e)[0] for k, (s, e) in enumerate(zip(bounds, bounds[1:]))]
            per_rank = [sum(need[r::pp]) for r in range(pp)]
            if limit is not None and max(per_rank) > limit and beat is not None:
                unlimited = self._simulate(g, costs, memory_of, mesh, schedule, m, data_parallel, v, positions)
                if unlimited.step_time_s >= beat.step_time_s:
                    return _reject(base, f"cannot beat {beat.label()} ({format_seconds(beat.step_time_s)}): even its "
                                         f"fastest cuts, which do not fit, take {format_seconds(unlimited.step_time_s)}")
            if limit is not None and max(per_rank) > limit:
                # a rank's stages share its memory: each stage may hold its share of the rank's need at the
                # fastest cuts (the sum then fits; with one stage per rank, the whole limit)
                share = np.array([need[k] / per_rank[k % pp] for k in range(n_stages)])
                try:
                    positions = solve_cuts(balanced, n_stages, memory_limit=limit, allowed=allowed, windows=windows,
                                           memory_of=memory_of if v == 1 else
                                           (lambda k, starts, ends: memory_of(k, starts, ends) / share[k]))
                except ValueError:
                    if v > 1:
                        text = ", ".join(f"rank {r}: {format_bytes(b)}" for r, b in enumerate(per_rank))
                        return _reject(base, f"does not fit memory_limit={format_bytes(limit)}: its fastest cuts need "
                                             f"{text}", max(per_rank), text)
                    need, text = explain_memory(costs, n_stages, memory_of, allowed=allowed)
                    return _reject(base, f"does not fit memory_limit={format_bytes(limit)}: needs {text}", need, text)
        timings = self._timings(g, costs, memory_of, positions)
        per_rank = [sum(t.memory_bytes for t in timings[r::pp]) for r in range(pp)]
        if limit is not None and max(per_rank) > limit:
            text = ", ".join(f"stage {k}: {format_bytes(b)}" for k, b in enumerate(per_rank)) if v == 1 else \
                ", ".join(f"rank {r} (stages {', '.join(map(str, range(r, n_stages, pp)))}): {format_bytes(b)}"
                          for r, b in enumerate(per_rank))
            return _reject(base, f"does not fit memory_limit={format_bytes(limit)}: needs {text}", max(per_rank), text)
        cost = self._simulate(g, costs, memory_of, mesh, schedule, m, data_parallel, v, positions, timings)
        return Candidate(dict(mesh), m, schedule, data_parallel, step_time_s=cost.step_time_s, peak_bytes=cost.peak_bytes,
                         bubble_fraction=cost.bubble_fraction, comm_s=sum(a.time_s for a in cost.axes),
                         positions=tuple(positions), cost=cost, recompute=recompute, n_virtual=v)

    def _timings(self, g: _Graphs, costs: PipelineCosts, memory_of, positions) -> list[StageTiming]:
        bounds = [0] + list(positions) + [len(costs.order)]
        return [self._timing(g, costs, memory_of, k, s, e) for k, (s, e) in enumerate(zip(bounds, bounds[1:]))]

    def _simulate(self, g: _Graphs, costs: PipelineCosts, memory_of, mesh: dict, schedule: str, m: int,
                  data_parallel: str, v: int, positions, timings: list[StageTiming] | None = None):
        """The simulated step of a candidate at the given cuts."""
        return simulate_plan(timings or self._timings(g, costs, memory_of, positions), mesh=mesh, schedule=schedule,
                             n_microbatches=m, data_parallel=data_parallel, spec=self.spec,
                             devices_per_node=self.devices_per_node, training=self.training,
                             optimizer=self.optimizer, precision=self.precision, n_virtual=v)

    def compute_floor(self, mesh: dict, n_microbatches: int, recompute: bool = False, n_virtual: int = 1) -> float:
        """A lower bound of a candidate's step from its compute alone, whatever the cuts.

        With stage times ``t_s`` (per micro-batch, summing to ``T``), stage ``s`` cannot start before
        the first micro-batch's forward has crossed the stages before it, runs ``m`` micro-batches,
        and the last one's backward must still cross them: the step is at least
        ``max_s (t_0 + ... + t_{s-1} + m t_s)``. The cuts that minimise that make it equal for every
        stage (``t_s = V/m (1 - 1/m)^s``), so no split does better than ``V = T / (1 - (1 - 1/m)^pp)``
        (``m T / pp`` and more with few micro-batches; ``T`` with one). Interleaved 1F1B shortens the
        fill and drain, so there only what holds for any schedule: the busiest rank computes at least
        ``m T / pp``, and one micro-batch crosses every stage there and back (``T``).
        """
        if self.batch % (mesh["dp"] * n_microbatches):
            return 0.0
        g = self.graphs(mesh["tp"], recompute)
        if mesh["tp"] > 1 and not g.info.row and not g.info.expert:
            return 0.0
        m, pp = n_microbatches, mesh["pp"]
        per_microbatch = g.costs.at_fraction(1.0 / (mesh["dp"] * m)).total
        if n_virtual > 1:
            return max(per_microbatch, m * per_microbatch / pp)
        return per_microbatch / (1.0 - (1.0 - 1.0 / m) ** pp)

    def _fastest_cuts(self, tp: int, pp: int, costs: PipelineCosts, allowed, recompute: bool = False,
                      windows: list | None = None, near: tuple | None = None) -> list[int]:
        """The cuts minimising the slowest stage with no memory limit, per (tp, pp, micro-batch size) and the
        grid (``allowed``) or the windows around the cuts ``near``."""
        key = (tp, pp, costs.fraction, recompute, None if allowed is None else (len(allowed), int(allowed.sum())), near)
        if key not in self._cuts:
            self._cuts[key] = solve_cuts(costs, pp, allowed=allowed, windows=windows)
        return self._cuts[key]

    def _state_floor(self, g: _Graphs, mesh: dict, data_parallel: str) -> float:
        """A lower bound of any stage's parameter and optimizer state per device (the stages share it evenly
        at best), to reject meshes without cutting."""
        if not self.training:
            return 0.0
        state = float(g.costs.params[-1]) * state_per_param_byte(self.optimizer, self.precision) / mesh["pp"]
        return state / mesh["dp"] if data_parallel == "shard" else state

    def _timing(self, g: _Graphs, costs: PipelineCosts, memory_of, k: int, start: int, end: int) -> StageTiming:
        time = float(costs.work[end] - costs.work[start])
        whole = float(g.costs.work[end] - g.costs.work[start])
        share = float(g.forward_share[end] - g.forward_share[start]) / whole if whole else 1.0
        nodes = costs.order.nodes[start:end]
        collective = [n.meta["fxpart.cost"] for n in nodes if n.meta["fxpart.cost"].op in ("all_reduce", "all_gather")]
        fraction = costs.fraction
        params, _ = costs.held_bytes(np.array([start]), end)
        floats = _float_crossing(costs, end)
        return StageTiming(forward_s=time * share, backward_s=time * (1 - share) if self.training else 0.0,
                           send_bytes=float(costs.crossing_bytes[end]) if end < len(costs.order) else 0.0,
                           grad_bytes=floats, collective_s=fraction * sum(c.time_s for c in collective),
                           collective_bytes=fraction * sum(c.output_bytes for c in collective),
                           collective_forward_s=fraction * sum(c.forward_time_s for c in collective),
                           param_bytes=float(params[0]), n_units=g.n_units(start, end),
                           memory_bytes=float(memory_of(k, np.array([start]), end)[0]))


def _windows(costs: PipelineCosts, cuts: tuple, n_stages: int) -> list[np.ndarray]:
    """Per cut, every position where that cut of a split at least as balanced as ``cuts`` can lie, whatever the grid.

    With ``B`` the slowest stage of ``cuts`` (work and sends), a split whose stages all cost at most ``B`` puts its
    k-th cut where the prefix of work is within ``[total - (n - k) B, k B]`` (the k stages before it and the
    n - k after it each hold at most ``B`` of work). The exact solver over these windows finds the exact
    optimum; a coarse split close to it leaves narrow windows.
    """
    n = len(costs.order)
    bounds = [0, *cuts, n]
    slowest = max(costs.work[e] - costs.work[s] + costs.comm[s] + costs.comm[e] for s, e in zip(bounds, bounds[1:]))
    slowest *= 1.0 + 1e-9
    prefix = costs.work[1:n]
    return [np.union1d(np.flatnonzero((prefix >= costs.work[n] - (n_stages - k) * slowest) & (prefix <= k * slowest))
                       + 1, [cut]) for k, cut in enumerate(cuts, start=1)]


def _reject(base: Candidate, reason: str, need: float = 0.0, text: str = "") -> Candidate:
    return Candidate(base.mesh, base.n_microbatches, base.schedule, base.data_parallel, reason=reason,
                     need_bytes=need, need_text=text, recompute=base.recompute, n_virtual=base.n_virtual)


def _float_crossing(costs: PipelineCosts, end: int) -> float:
    if end >= len(costs.order):
        return 0.0
    return float(costs.crossing_bytes[end])     # gradients of the floats crossing: at most the same bytes


def _block_key(node) -> str:
    return block_path(node) or ""


def _largest_unit_params(costs: PipelineCosts, keys: list[str]) -> float:
    """What a sharded stage holds gathered at once: the largest block's (``...layers.3``) parameters and
    those outside blocks (the root group's: embeddings, head, final norm)."""
    per: dict[str, float] = {}
    prefix = costs.params
    for i, node in enumerate(costs.order.nodes):
        per[keys[i]] = per.get(keys[i], 0.0) + float(prefix[i + 1] - prefix[i])
    root = per.pop("", 0.0)
    return max(per.values(), default=0.0) + root


# -- the search ---------------------------------------------------------------------------------

def meshes(n_devices: int, *, devices_per_node: int = 8, fixed: dict | None = None) -> list[dict]:
    """Every ``{"dp", "tp", "pp"}`` with product ``n_devices`` (tp within a node when it can be), or the fixed one."""
    if fixed is not None:
        return [dict(fixed)]
    out = []
    for tp in _divisors(n_devices):
        for pp in _divisors(n_devices // tp):
            out.append({"dp": n_devices // tp // pp, "tp": tp, "pp": pp})
    in_node = [mesh for mesh in out if mesh["tp"] <= devices_per_node]
    return in_node or out


def search(planner: Planner, candidate_meshes: list[dict], *, n_microbatches: int | None, schedule: str | None,
           data_parallel: str | None, positions: list[int] | None = None,
           recompute: bool | None = None, n_virtual: int | None = None) -> tuple[Candidate, list[Candidate]]:
    """The fastest candidate that fits, and every candidate tried (with the rejected ones' reasons).

    ``positions`` pins the cuts (one mesh only). ``recompute``: None tries recomputing every block
    for a candidate whose activations do not fit (and only then); True always, False never.
    ``n_virtual`` pins the stages per pipeline rank (1: no interleaving); None tries 1, 2 and 4.

    Raises:
        ValueError: no candidate fits; the message says what the closest ones need.
    """
    tried, best = [], None

    def score(mesh, m, sched, mode, again: bool, v: int) -> Candidate:
        floor = planner.compute_floor(mesh, m, again, v)
        if best is not None and floor >= best.step_time_s and (len(candidate_meshes) > 1 or v > 1):
            return _reject(Candidate(dict(mesh), m, sched, mode, recompute=again, n_virtual=v),
                           f"cannot beat {best.label()} ({format_seconds(best.step_time_s)}): its busiest stage "
                           f"computes at least {format_seconds(floor)}")
        return planner.evaluate(mesh, m, sched, mode, positions=positions, recompute=again, n_virtual=v,
                                beat=best if len(candidate_meshes) > 1 or v > 1 else None)

    # the meshes whose compute alone is least first, so that a good step found early rules out the rest
    ordered = sorted(candidate_meshes, key=lambda mesh: planner.compute_floor(mesh, 1, bool(recompute)))
    for mesh in ordered:
        best_here = None
        for m in _microbatch_counts(planner.batch, mesh, n_microbatches):
            options = _schedules(planner, mesh, m, schedule, pinned=positions is not None, n_virtual=n_virtual)
            for mode in ([data_parallel] if data_parallel else (DP_MODES if mesh["dp"] > 1 else ("replicate",))):
                plain = None                     # this (mesh, m, mode) under one stage per rank, tried first
                for sched, v in options:
                    again = bool(recompute)
                    if v > 1 and plain is not None:
                        why = _interleaving_cannot_help(plain, v, best)
                        if why:
                            tried.append(_reject(Candidate(dict(mesh), m, sched, mode, recompute=plain.recompute,
                                                           n_virtual=v), why))
                            continue
                        again = plain.recompute or again
                    c = score(mesh, m, sched, mode, again, v)
                    if recompute is None and not again and _activations_too_big(c):
                        tried.append(c)
                        c = score(mesh, m, sched, mode, True, v)
                    tried.append(c)
                    if v == 1:
                        plain = c
                    if c.fits and (best_here is None or c.step_time_s < best_here.step_time_s):
                        best_here = c
                    if c.fits and (best is None or c.step_time_s < best.step_time_s):
                        best = c
        log.debug("mesh %s: best %s", mesh, best_here.summary() if best_here else "none fits")
    fitting = [c for c in tried if c.fits]
    if not fitting:
        by_memory = [c for c in tried if c.need_bytes]
        if by_memory:          # what the least demanding one needs, stage by stage
            least = min(by_memory, key=lambda c: c.need_bytes)
            tried.append(planner.evaluate(least.mesh, least.n_microbatches, least.schedule, least.data_parallel,
                                          positions=positions, quick=False, recompute=least.recompute,
                                          n_virtual=least.n_virtual))
        raise ValueError(_nothing_fits(tried, planner.memory_limit))
    best = min(fitting, key=lambda c: (c.step_time_s, c.peak_bytes))
    return best, tried


VIRTUAL = (2, 4)      # stages per rank interleaved 1F1B tries


def _interleaving_cannot_help(plain: Candidate, v: int, best: Candidate | None) -> str:
    """Why interleaving ``v`` stages per rank is not worth evaluating, given the same candidate under 1F1B ("" if
    it is). It keeps more micro-batch stages in flight than 1F1B, so where 1F1B's activations do not fit
    (recomputed or not) neither do its; and it shortens the fill and drain by ``1 - 1/v`` of 1F1B's bubble
    for ``v`` times the sends, so a 1F1B step that minus that share is no faster than the best found is
    skipped (the rule ignores what finer cuts may gain in balance)."""
    if not plain.fits:
        return ("holds more micro-batches in flight than 1F1B, whose activations do not fit either"
                if _activations_too_big(plain) else "")
    if best is None:
        return ""
    bound = plain.step_time_s * (1.0 - plain.bubble_fraction * (1.0 - 1.0 / v))
    if bound >= best.step_time_s:
        return (f"cannot beat {best.label()} ({format_seconds(best.step_time_s)}): interleaving shortens its "
                f"1F1B bubble ({plain.bubble_fraction:.0%} of {format_seconds(plain.step_time_s)}) by 1 - 1/{v} at most")
    return ""


def _schedules(planner: Planner, mesh: dict, m: int, schedule: str | None, *, pinned: bool = False,
               n_virtual: int | None = None) -> list[tuple]:
    """(schedule, stages per rank) to try under one mesh and micro-batch count. GPipe is never chosen by
    itself (1F1B's bubble with more in flight); interleaved 1F1B with 2 and 4 stages per rank (or
    ``n_virtual``) when the micro-batches go round in groups of ``pp`` (or when asked for, to say why
    it cannot)."""
    pp = mesh["pp"]
    if pp == 1:
        return [("1f1b" if schedule in (None, INTERLEAVED) else schedule, 1)]
    asked = schedule == INTERLEAVED or (n_virtual or 1) > 1
    out = [] if asked else [(schedule or "1f1b", 1)]
    if planner.training and not pinned and schedule in (None, INTERLEAVED) and n_virtual != 1 and \
            (m % pp == 0 or asked):
        out += [(INTERLEAVED, v) for v in ([n_virtual] if n_virtual else VIRTUAL)]
    return out


def _nothing_shards(info, tp: int) -> str:
    """Why a tensor degree is refused: no region shards, with the first reasons the analysis gave."""
    why = list(dict.fromkeys(info.replicated.values()))
    first = "; ".join(why[:2]) + (f"; and {len(why) - 2} more" if len(why) > 2 else "")
    return (f"nothing in the graph shards {tp} ways" + (f" ({len(info.replicated)} matmuls or convolutions stay "
            f"whole: {first})" if why else "") + "; plan with strategy='pipeline' or 'data', or mesh={'tp': 1, ...}")


def _activations_too_big(c: Candidate) -> bool:
    """Rejected for memory once cut (not for its parameter state alone, which recomputing cannot shrink)."""
    return not c.fits and c.need_bytes > 0 and not c.need_text.startswith("at least")


def _nothing_fits(tried: list[Candidate], limit) -> str:
    """Why no candidate fits: the least memory any needed (when memory was the reason), then every reason."""
    by_memory = [c for c in tried if c.need_bytes]
    head = ""
    if by_memory:
        staged = [c for c in by_memory if c.need_text.startswith("stage")]
        least = min(staged or by_memory, key=lambda c: c.need_bytes)
        head = (f"memory_limit={format_bytes(limit)} per device; the least memory needs {least.need_text} "
                f"({least.label()}). Try more devices, more micro-batches (n_microbatches), a smaller batch, "
                f"data_parallel='shard', or passes.recompute to save activations\n")
    lines = sorted({c.summary() for c in tried})
    return (head or "any mesh: every candidate was rejected\n") + "candidates:\n  " + "\n  ".join(lines[:12]) + (f"\n  ... {len(lines) - 12} more" if len(lines) > 12
                                                                   else "")


def _microbatch_counts(batch: int, mesh: dict, pinned: int | None) -> list[int]:
    if pinned is not None:
        return [pinned]
    per_replica = batch // mesh["dp"] if batch % mesh["dp"] == 0 else 0
    if per_replica == 0:
        return [1]
    counts = [d for d in _divisors(per_replica) if d <= 64]
    if mesh["pp"] == 1:
        counts = [d for d in counts if d <= 8]     # gradient accumulation, only to save activation memory
    return counts


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


SCHEDULE_NAMES = tuple(SCHEDULES)
