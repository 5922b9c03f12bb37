"""Pipeline partitioning: contiguous stages cut anywhere in the graph's compute order.

Reads a captured graph with ``node.meta["fxpart.cost"]`` (``passes.estimate``); writes
nothing on it. The cut positions minimise the slowest stage, where a stage costs its
compute (forward + backward when training) plus the time to receive and send what
crosses its two cuts, subject to a memory cap per device. The optimum is exact: a
dynamic programme over cut positions, vectorised over the stage's start.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx

from passes._keys import COST
from passes._util import fetch_attr, format_bytes, tensor_bytes
from .graph_split import ComputeOrder, build_stage, stage_outputs
from .plan import Plan, Stage, StageCost

__all__ = ["PipelineCosts", "solve_cuts", "build_plan", "fingerprint", "stage_modules", "state_keys"]

log = logging.getLogger(__name__)

SCHEDULES = ("1f1b", "gpipe")
BALANCES = ("time", "flops")
_OPT_STATE_PER_PARAM = {None: 0, "sgd": 0, "adamw": 2}


@dataclass
class PipelineCosts:
    """Prefix sums over the compute order that make any stage's cost O(1)."""
    order: ComputeOrder
    work: np.ndarray          # [n+1] prefix of the balanced quantity (seconds or FLOPs)
    comm: np.ndarray          # [n+1] seconds to move what crosses cut k (0 at both ends)
    cuttable: np.ndarray      # [n+1] bool
    params: np.ndarray        # [n+1] prefix of parameter bytes, each charged to its first reader
    saved: np.ndarray         # [n+1] prefix of activation bytes kept for backward
    out_bytes: np.ndarray     # [n] bytes each node allocates (transient peak proxy)
    crossing_bytes: list[int]
    unit_max: float           # the largest single node's work
    total: float
    buffers: np.ndarray | None = None   # [n+1] prefix of buffer and constant bytes, each charged to its first reader
    reread: tuple = ()        # (bytes, is parameter, reader positions) of tensors read at several positions (tied)

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, *, training: bool, link_Bps: float, balance: str) -> "PipelineCosts":
        order = ComputeOrder.of(gm)
        costs = [n.meta[COST] for n in order.nodes]
        if balance == "flops":
            work = np.array([c.flops + c.backward_flops for c in costs], dtype=np.float64)
        else:
            work = np.array([c.time_s for c in costs], dtype=np.float64)
        crossing, floats, ok = order.crossing()
        moved = np.array(crossing, dtype=np.float64) + (np.array(floats, dtype=np.float64) if training else 0)
        comm = moved / link_Bps if balance == "time" else np.zeros(len(crossing))
        comm[0] = comm[-1] = 0.0
        first_reader = np.zeros((2, len(order.nodes)))    # [parameters, buffers] charged to their first reader
        readers = _attr_readers(gm, order)
        for nbytes, is_param, positions in readers:
            first_reader[0 if is_param else 1, positions[0]] += nbytes
        saved = np.array([c.saved_bytes for c in costs], dtype=np.float64)
        return cls(order, _prefix(work), comm, np.array(ok), _prefix(first_reader[0]), _prefix(saved),
                   np.array([c.output_bytes for c in costs], dtype=np.float64), crossing,
                   float(work.max(initial=0.0)), float(work.sum()), buffers=_prefix(first_reader[1]),
                   reread=tuple(r for r in readers if len(r[2]) > 1))

    def held_bytes(self, starts: np.ndarray, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Parameter and buffer bytes of stages ``[start, end)`` for every start: each tensor they read, once."""
        params = self.params[end] - self.params[starts]
        buffers = self.buffers[end] - self.buffers[starts]
        for nbytes, is_param, positions in self.reread:
            # the prefix charged it to its first reader; a later stage that reads it again holds a replica
            after = np.searchsorted(positions, starts)
            replica = (positions[0] < starts) & (after < len(positions)) & \
                (positions[np.minimum(after, len(positions) - 1)] < end)
            if is_param:
                params = params + nbytes * replica
            else:
                buffers = buffers + nbytes * replica
        return params, buffers


def _attr_readers(gm: torch.fx.GraphModule, order: ComputeOrder) -> list[tuple[float, bool, np.ndarray]]:
    """(bytes, is parameter, sorted compute positions reading it) per distinct tensor (tied names share one)."""
    found: dict[int, tuple[float, bool, list[int]]] = {}
    for i, node in enumerate(order.nodes):
        for arg in node.all_input_nodes:
            if arg.op != "get_attr":
                continue
            t = fetch_attr(gm, arg.target)
            if not isinstance(t, torch.Tensor):
                continue
            positions = found.setdefault(id(t), (float(tensor_bytes(t)), isinstance(t, torch.nn.Parameter), []))[2]
            if not positions or positions[-1] != i:
                positions.append(i)
    return [(b, is_param, np.array(pos)) for b, is_param, pos in found.values()]


def _prefix(x: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(x)])


def lower_bound(costs: PipelineCosts, n_stages: int) -> float:
    """``max(total / n, largest node)``: no split can have a faster slowest stage."""
    return max(costs.total / n_stages, costs.unit_max)


def solve_cuts(costs: PipelineCosts, n_stages: int, *, memory_limit: float | None = None,
               memory_of=None) -> list[int]:
    """Cut positions (``n_stages - 1`` of them) minimising the slowest stage, exactly.

    ``memory_of(stage_index, starts, end) -> bytes`` (vectorised over the ``starts`` array)
    gives a stage's memory; stages above ``memory_limit`` are not allowed.

    Raises:
        ValueError: no split satisfies the cuttable positions and the memory limit.
    """
    n = len(costs.order)
    work, comm, ok = costs.work, costs.comm, costs.cuttable
    # best[k, j]: the least slowest-stage cost of nodes [0, j) cut into k + 1 stages
    best = np.full((n_stages, n + 1), np.inf)
    choice = np.zeros((n_stages, n + 1), dtype=np.int64)
    for k in range(n_stages):
        for j in range(k + 1, n + 1 - (n_stages - 1 - k)):
            if not ok[j]:
                continue
            starts = np.arange(k, j) if k else np.zeros(1, dtype=np.int64)
            stage = work[j] - work[starts] + comm[starts] + comm[j]
            cand = np.maximum(best[k - 1][starts], stage) if k else stage
            if memory_limit is not None:
                cand = np.where(memory_of(k, starts, j) > memory_limit, np.inf, cand)
            i = int(np.argmin(cand))
            best[k, j], choice[k, j] = cand[i], starts[i]
    if not np.isfinite(best[n_stages - 1, n]):
        raise ValueError("no feasible split")
    cuts, j = [], n
    for k in range(n_stages - 1, 0, -1):
        j = int(choice[k, j])
        cuts.append(j)
    return sorted(cuts)


def memory_model(costs: PipelineCosts, n_stages: int, *, training: bool, schedule: str, n_microbatches: int,
                 optimizer: str | None):
    """``memory_of(stage, starts, end)``: a stage's bytes for every start in ``starts`` (numpy)."""
    crossing = np.array(costs.crossing_bytes, dtype=np.float64)

    def memory_of(stage: int, starts: np.ndarray, end: int) -> np.ndarray:
        # largest single allocation in [start, end), for every start at once
        transient = np.maximum.accumulate(costs.out_bytes[:end][::-1])[::-1][starts]
        params, buffers = costs.held_bytes(starts, end)
        return stage_memory(params, buffers, costs.saved[end] - costs.saved[starts], transient,
                            crossing[starts] + crossing[end], stage, n_stages, training=training,
                            schedule=schedule, n_microbatches=n_microbatches, optimizer=optimizer)
    return memory_of


def fingerprint(gm: torch.fx.GraphModule) -> str:
    """A hash of the graph's structure (node names and ops) and parameter shapes: same architecture, same hash."""
    h = hashlib.sha256()
    for node in gm.graph.nodes:
        h.update(f"{node.op}:{node.name}:{getattr(node.target, '__name__', node.target)};".encode())
    for name, p in gm.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()[:16]


def build_plan(gm: torch.fx.GraphModule, costs: PipelineCosts, cuts: list[int], *, spec, training: bool,
               schedule: str, n_microbatches: int, optimizer: str | None, balance: str, model: str) -> Plan:
    """Stage GraphModules and their costs for the given cut positions."""
    order = costs.order
    bounds = [0] + list(cuts) + [len(order)]
    stages, holders = [], {}
    n_stages = len(bounds) - 1
    memory_of = memory_model(costs, n_stages, training=training, schedule=schedule, n_microbatches=n_microbatches,
                             optimizer=optimizer)
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        module = build_stage(order, start, end, name=f"Stage{index}")
        node_costs = [n.meta[COST] for n in order.nodes[start:end]]
        param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        saved = sum(c.saved_bytes for c in node_costs)
        memory = float(memory_of(index, np.array([start]), end)[0])   # the same model the solver bounded
        cost = StageCost(
            flops=sum(c.flops for c in node_costs), backward_flops=sum(c.backward_flops for c in node_costs),
            param_bytes=param_bytes, time_s=sum(c.time_s for c in node_costs),
            comm_s=float(costs.comm[start] + costs.comm[end]) if balance == "time" else
            float((_moved(costs, start, training) + _moved(costs, end, training)) / spec.link_bandwidth_Bps),
            memory_bytes=int(memory), saved_bytes=int(saved // max(n_microbatches, 1)),
            bytes_in=costs.crossing_bytes[start] if start else 0,
            bytes_out=costs.crossing_bytes[end] if end < len(order) else 0, n_nodes=end - start)
        for name, _ in module.named_parameters():
            holders.setdefault(id(fetch_attr(gm, name)), []).append((index, name))
        stages.append(Stage(index, module, cost, order.nodes[start].name, order.nodes[end - 1].name,
                            tuple(n.name for n in (stage_outputs(order, start) if start else [])),
                            tuple(n.name for n in stage_outputs(order, end)) if end < len(order) else ("(outputs)",)))
    shared = {entries[0][1]: [i for i, _ in entries] for entries in holders.values() if len(entries) > 1}
    info = getattr(gm.graph._codegen, "pytree_info", None)
    lb = lower_bound(costs, n_stages)
    if balance == "flops":   # report the bound in seconds like the stages
        lb = max(sum(s.cost.time_s for s in stages) / n_stages,
                 max(n.meta[COST].time_s for n in order.nodes))
    return Plan(strategy="pipeline", stages=stages, device=spec, training=training, schedule=schedule,
                n_microbatches=n_microbatches, lower_bound_s=lb,
                cuts=tuple(order.nodes[c].name for c in cuts), shared_params=shared,
                in_spec=info.in_spec if info else None, out_spec=info.out_spec if info else None,
                model=model, fingerprint=fingerprint(gm), balance=balance)


def stage_modules(gm: torch.fx.GraphModule, cuts: tuple[str, ...]) -> list[torch.fx.GraphModule]:
    """Stage GraphModules of ``gm`` cut before the nodes named ``cuts`` (as ``Plan.cuts`` records them).

    ``gm`` is another capture of the planned architecture (e.g. of one micro-batch): node names
    are matched, not positions, so a capture that drops a shape-specialised node (a size-1
    ``expand``) still maps.

    Raises:
        ValueError: a cut node is missing from ``gm`` or cannot be cut there.
    """
    order = ComputeOrder.of(gm)
    by_name = {n.name: i for i, n in enumerate(order.nodes)}
    ok = order.crossing()[2]
    positions = []
    for cut in cuts:
        pos = by_name.get(cut)
        if pos is None or not ok[pos]:
            raise ValueError(f"the cut before {cut!r} does not exist in the micro-batch capture of the model (its "
                             f"graph differs from the full batch's); use a larger micro-batch (batch / n_microbatches)")
        positions.append(pos)
    bounds = [0] + positions + [len(order)]
    return [build_stage(order, start, end, name=f"Stage{i}") for i, (start, end) in enumerate(zip(bounds, bounds[1:]))]


def state_keys(model: torch.nn.Module, modules: list[torch.nn.Module]) -> dict[str, str]:
    """``model.state_dict()`` key -> the name the stage ``modules`` hold that tensor under, by tensor identity.

    Tied tensors (an embedding and its head) have several keys and one name. A key whose
    tensor no stage holds keeps its own name (``full_state_dict`` then reports it missing).
    """
    held: dict[int, str] = {}
    for module in modules:
        for name, t in list(module.named_parameters(remove_duplicate=False)) + \
                list(module.named_buffers(remove_duplicate=False)):
            held.setdefault(id(t), name)
    return {key: held.get(id(t), key) for key, t in model.state_dict(keep_vars=True).items()}


def _moved(costs: PipelineCosts, k: int, training: bool) -> float:
    if k == 0 or k == len(costs.order):
        return 0.0
    return costs.crossing_bytes[k] * (2 if training else 1)


def in_flight(stage: int, n_stages: int, *, schedule: str, n_microbatches: int) -> int:
    """Micro-batches whose activations a stage holds at once: 1F1B keeps p - s (at most m), GPipe all m."""
    if schedule == "gpipe":
        return n_microbatches
    return min(n_stages - stage, n_microbatches)


def stage_memory(param_bytes, buffer_bytes, saved_bytes, transient_bytes, crossing_bytes, stage, n_stages, *,
                 training: bool, schedule: str, n_microbatches: int, optimizer: str | None):
    """Bytes one device needs for a stage (works on numpy arrays too).

    Training: parameters, their gradients and optimizer state, the activations of every
    micro-batch in flight, plus one micro-batch's largest transient buffer and the
    tensors crossing its cuts. Inference: parameters plus one batch's transients.
    """
    m = max(n_microbatches, 1)
    if not training:
        return param_bytes + buffer_bytes + (transient_bytes + crossing_bytes) / m
    per_param = 2 + _OPT_STATE_PER_PARAM[optimizer]
    inflight = in_flight(stage, n_stages, schedule=schedule, n_microbatches=m)
    return param_bytes * per_param + buffer_bytes + inflight * saved_bytes / m + (transient_bytes + 2 * crossing_bytes) / m


def explain_memory(costs: PipelineCosts, n_stages: int, memory_of, limit: float) -> str:
    """Per-stage memory of the time-optimal split, for the error message when nothing fits."""
    cuts = solve_cuts(costs, n_stages)
    bounds = [0] + cuts + [len(costs.order)]
    need = [float(memory_of(k, np.array([s]), e)[0]) for k, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return ", ".join(f"stage {k}: {format_bytes(b)}" for k, b in enumerate(need)) + \
        f" (limit {format_bytes(limit)})"
