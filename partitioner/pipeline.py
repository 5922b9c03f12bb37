"""Pipeline partitioning: contiguous stages cut anywhere in the graph's compute order.

Reads a captured graph with ``node.meta["fxpart.cost"]`` (``passes.estimate``); writes
nothing on it. The cut positions minimise the slowest stage, where a stage costs its
compute (forward + backward when training) plus the time to receive and send what
crosses its two cuts, subject to a memory cap per device. The optimum is exact: a
dynamic programme over cut positions, vectorised over the stage's start.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx

from passes._keys import COST
from passes._util import block_path, fetch_attr, format_bytes, module_path, tensor_bytes
from .graph_split import ComputeOrder
from .schedules import INTERLEAVED, in_flight_by_stage, make_schedule

__all__ = ["PipelineCosts", "solve_cuts", "unit_boundaries", "memory_model", "stage_memory", "state_per_param_byte", "lower_bound",
           "in_flight", "explain_memory",
           "SCHEDULES", "BALANCES", "OPT_STATE_PER_PARAM"]

log = logging.getLogger(__name__)

SCHEDULES = ("1f1b", "gpipe", INTERLEAVED)
BALANCES = ("time", "flops")
OPT_STATE_PER_PARAM = {None: 0, "sgd": 0, "adamw": 2}


@dataclass
class PipelineCosts:
    """Prefix sums over the compute order that make any stage's cost O(1).

    Costs are of the example batch on one device (``fraction`` 1). ``at_fraction(f)`` gives the
    costs of one micro-batch that is ``f`` of it: time shrinks with the batch except each node's
    ``fixed`` part (kernel launches and reading its weights), bytes of activations and crossings
    shrink in proportion.
    """
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
    node_time: np.ndarray | None = None    # [n] seconds of each node (forward + backward) on the whole example
    node_fixed: np.ndarray | None = None   # [n] of that, what does not shrink with the batch
    node_forward: np.ndarray | None = None  # [n] of node_time, the forward's
    fraction: float = 1.0
    link_Bps: float = 0.0

    @classmethod
    def of(cls, gm: torch.fx.GraphModule, *, training: bool, link_Bps: float, balance: str,
           spec=None) -> "PipelineCosts":
        order = ComputeOrder.of(gm)
        costs = [n.meta[COST] for n in order.nodes]
        node_time = np.array([c.time_s for c in costs], dtype=np.float64)
        node_fixed = np.array([_fixed_s(n, c, spec, training) for n, c in zip(order.nodes, costs)]) \
            if spec is not None else np.zeros(len(costs))
        if balance == "flops":
            work = np.array([c.flops + c.backward_flops for c in costs], dtype=np.float64)
        else:
            work = node_time
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
                   reread=tuple(r for r in readers if len(r[2]) > 1), node_time=node_time,
                   node_fixed=np.minimum(node_fixed, node_time), link_Bps=link_Bps,
                   node_forward=np.array([c.forward_time_s for c in costs], dtype=np.float64))

    def at_fraction(self, f: float) -> "PipelineCosts":
        """The costs of a micro-batch that is ``f`` of the example batch (time-balanced costs only)."""
        if f == self.fraction:
            return self
        scale = f / self.fraction
        if self.node_time is None or not self.link_Bps:   # FLOP-balanced: FLOPs shrink in proportion
            work = self.work * scale
            return dataclasses.replace(self, work=work, comm=self.comm * scale, unit_max=self.unit_max * scale,
                                       total=self.total * scale, fraction=f)
        node = f * (self.node_time - self.node_fixed) + self.node_fixed
        return dataclasses.replace(self, work=_prefix(node), comm=self.comm * scale, saved=self.saved * scale,
                                   out_bytes=self.out_bytes * scale, unit_max=float(node.max(initial=0.0)),
                                   total=float(node.sum()), fraction=f,
                                   crossing_bytes=[b * scale for b in self.crossing_bytes])

    def checkpointed(self) -> "PipelineCosts":
        """These costs with every block recomputed in backward (full activation checkpointing per block,
        torchtitan's and Megatron-LM's "full" recompute; what ``runtime`` applies when a plan says so).

        A block (``layers.3``) keeps only what enters it (the bytes crossing its first position); its
        backward runs its forward again first, so its nodes cost forward + forward + backward, and
        while it does, all of one block's activations are live (a transient at its first node).
        Nodes outside blocks (embeddings, head) keep their activations. Time-balanced costs only.
        """
        if self.node_time is None or self.node_forward is None or self.fraction != 1.0:
            raise ValueError("checkpointed() needs the time-balanced costs of the whole example")
        keys = [block_path(n) for n in self.order.nodes]
        saved = np.diff(self.saved)
        out_bytes = self.out_bytes.copy()
        node_time = self.node_time.copy()
        start = 0
        for k in range(1, len(keys) + 1):
            if k < len(keys) and keys[k] == keys[start]:
                continue
            if keys[start] is not None:                     # the block [start, k)
                out_bytes[start] = max(out_bytes[start], float(saved[start:k].sum()))
                saved[start:k] = 0.0
                saved[start] = float(self.crossing_bytes[start])
                node_time[start:k] += self.node_forward[start:k]
            start = k
        work = _prefix(node_time)
        return dataclasses.replace(self, work=work, saved=_prefix(saved), out_bytes=out_bytes, node_time=node_time,
                                   unit_max=float(node_time.max(initial=0.0)), total=float(node_time.sum()))

    def largest_output(self, starts: np.ndarray, end) -> np.ndarray:
        """The largest single allocation of nodes ``[start, end)`` for every start (and end, broadcast):
        a sparse table answers each pair in O(1). Pairs with ``start >= end`` give a meaningless value."""
        table = self.__dict__.get("_max_table")
        if table is None:
            table = [self.out_bytes]
            while 2 ** len(table) <= len(self.out_bytes):
                prev, half = table[-1], 2 ** (len(table) - 1)
                table.append(np.maximum(prev[:-half], prev[half:]))
            self.__dict__["_max_table"] = table
        starts, end = np.broadcast_arrays(np.asarray(starts), np.asarray(end))
        level = np.floor(np.log2(np.maximum(end - starts, 1))).astype(np.int64)
        out = np.zeros(starts.shape)
        for k in np.unique(level):
            pick = level == k
            row = table[k]
            first = np.clip(starts[pick], 0, len(row) - 1)
            last = np.clip(end[pick] - 2 ** k, 0, len(row) - 1)
            out[pick] = np.maximum(row[first], row[last])
        return out

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
               memory_of=None, allowed: np.ndarray | None = None, windows: list | None = None) -> list[int]:
    """Cut positions (``n_stages - 1`` of them) minimising the slowest stage, exactly.

    ``memory_of(stage_index, starts, ends) -> bytes`` (numpy, broadcasting ``starts`` against
    ``ends``) gives a stage's memory; stages above ``memory_limit`` are not allowed. ``allowed``
    restricts the cuts to those positions (block and sub-block boundaries of a deep model);
    ``windows[k]`` the k-th cut to those positions (where an optimum's k-th cut must lie).
    A dynamic programme over stages, each step one vectorised (start x end) sweep in column
    blocks: O(stages x positions^2) element operations, or the sum of adjacent windows' products.

    Raises:
        ValueError: no split satisfies the cuttable positions and the memory limit.
    """
    n = len(costs.order)
    pos = np.flatnonzero(costs.cuttable)
    if allowed is not None:
        pos = np.intersect1d(pos, allowed)
    if windows is not None:
        pos = np.intersect1d(pos, np.concatenate([np.asarray(w, dtype=np.int64) for w in windows] + [[0]]))
    pos = np.union1d(pos[(pos > 0) & (pos < n)], [0, n]).astype(np.int64)
    size = len(pos)
    if size <= n_stages:
        raise ValueError("no feasible split")
    work, comm = costs.work[pos], costs.comm[pos]
    everything = np.arange(1, size)
    # ends[k]: indices (into pos) where stage k may end; the last stage ends at the graph's end
    ends = [everything if windows is None else np.flatnonzero(np.isin(pos, windows[k]) & (pos > 0) & (pos < n))
            for k in range(n_stages - 1)] + [np.array([size - 1])]
    # best[k, j]: the least slowest-stage cost of nodes [0, pos[j]) cut into k + 1 stages
    best = np.full((n_stages, size), np.inf)
    choice = np.zeros((n_stages, size), dtype=np.int64)
    for k in range(n_stages):
        rows = np.array([0]) if k == 0 else ends[k - 1][np.isfinite(best[k - 1, ends[k - 1]])]
        if not len(rows) or not len(ends[k]):
            raise ValueError("no feasible split")
        block = max(1, 4_000_000 // len(rows))
        for first in range(0, len(ends[k]), block):
            cols = ends[k][first:first + block]
            stage = work[None, cols] - work[rows, None] + comm[rows, None] + comm[None, cols]     # [start, end]
            if k > 0:
                stage = np.maximum(best[k - 1, rows][:, None], stage)
            cand = np.where(rows[:, None] < cols[None, :], stage, np.inf)
            if memory_limit is not None:
                live = np.isfinite(cand).any(axis=1)          # memory only where a start can be used
                need = np.full(cand.shape, np.inf)
                need[live] = memory_of(k, pos[rows[live]][:, None], pos[None, cols])
                cand = np.where(need > memory_limit, np.inf, cand)
            pick = np.argmin(cand, axis=0)
            best[k, cols] = cand[pick, np.arange(len(cols))]
            choice[k, cols] = rows[pick]
    if not np.isfinite(best[n_stages - 1, size - 1]):
        raise ValueError("no feasible split")
    cuts, j = [], size - 1
    for k in range(n_stages - 1, 0, -1):
        j = int(choice[k, j])
        cuts.append(int(pos[j]))
    return sorted(cuts)


def unit_boundaries(order: ComputeOrder) -> np.ndarray:
    """Positions where a block (``layers.3``) or a part of one (its attention, its MLP, a norm) begins:
    the places to cut a deep model when cutting inside those parts gains little."""
    keys = []
    for node in order.nodes:
        block = block_path(node)
        path = module_path(node)
        if block is None:
            keys.append(path.split(".")[0] if path else "")
        else:
            rest = path[len(block):].lstrip(".").split(".")[0]
            keys.append(f"{block}.{rest}")
    return np.array([k for k in range(1, len(keys)) if keys[k] != keys[k - 1]], dtype=np.int64)


def memory_model(costs: PipelineCosts, n_stages: int, *, training: bool, schedule: str, n_microbatches: int,
                 optimizer: str | None, dp: int = 1, dp_mode: str = "replicate", unit_param_bytes: float = 0.0,
                 precision: str = "fp32", n_virtual: int = 1):
    """``memory_of(stage, starts, end)``: a stage's bytes per device for every start in ``starts`` (numpy).

    ``costs`` are those of one micro-batch (``PipelineCosts.at_fraction``); ``dp``/``dp_mode`` say how
    the parameter state is held; ``unit_param_bytes`` is the largest block's parameters (what a
    sharded data-parallel stage gathers at a time when it reshards after each block). With interleaved
    1F1B (``n_stages = pp * n_virtual``) a device holds ``n_virtual`` stages: its memory is their sum.
    """
    crossing = np.array(costs.crossing_bytes, dtype=np.float64)

    def memory_of(stage: int, starts: np.ndarray, end) -> np.ndarray:     # ``end`` an int, or an array broadcast
        transient = costs.largest_output(starts, end)      # largest single allocation in [start, end)
        params, buffers = costs.held_bytes(starts, end)
        return stage_memory(params, buffers, costs.saved[end] - costs.saved[starts], transient,
                            crossing[starts] + crossing[end], stage, n_stages, training=training,
                            schedule=schedule, n_microbatches=n_microbatches, optimizer=optimizer, dp=dp,
                            dp_mode=dp_mode, unit_param_bytes=unit_param_bytes, precision=precision,
                            n_virtual=n_virtual)
    return memory_of


def in_flight(stage: int, n_stages: int, *, schedule: str, n_microbatches: int, n_virtual: int = 1) -> int:
    """Micro-batches whose activations a stage holds at once: 1F1B keeps p - s (at most m), GPipe all m;
    interleaved 1F1B (``n_stages = p * n_virtual``) what its rank's warm-up leaves in flight on it."""
    if schedule == "gpipe":
        return n_microbatches
    if schedule == INTERLEAVED:
        return _interleaved_in_flight(n_stages // n_virtual, n_microbatches, n_virtual)[stage]
    return min(n_stages - stage, n_microbatches)


@functools.lru_cache(maxsize=256)
def _interleaved_in_flight(pp: int, m: int, v: int) -> tuple[int, ...]:
    peaks: dict[int, int] = {}
    for actions in make_schedule(INTERLEAVED, pp, m, v):
        peaks.update(in_flight_by_stage(actions))
    return tuple(peaks[s] for s in range(pp * v))


def state_per_param_byte(optimizer: str | None, precision: str) -> float:
    """Bytes of training state per byte of parameters.

    ``"fp32"``: the parameter, its gradient, the optimizer's buffers. ``"mixed"`` (a bf16/fp16
    model trained as Megatron-LM and FSDP2's ``MixedPrecisionPolicy`` do): the half-precision
    parameter, an fp32 gradient, fp32 master weights and fp32 optimizer buffers: 18 bytes per
    parameter with AdamW.
    """
    slots = OPT_STATE_PER_PARAM[optimizer]
    if precision == "mixed":
        return 1 + 2 + 2 + 2 * slots
    return 2 + slots


def stage_memory(param_bytes, buffer_bytes, saved_bytes, transient_bytes, crossing_bytes, stage, n_stages, *,
                 training: bool, schedule: str, n_microbatches: int, optimizer: str | None, dp: int = 1,
                 dp_mode: str = "replicate", unit_param_bytes: float = 0.0, precision: str = "fp32",
                 n_virtual: int = 1):
    """Bytes one device needs for a stage (works on numpy arrays too); activations are one micro-batch's.

    Training: parameters, their gradients and optimizer state (replicated: all of them; sharded
    over ``dp`` ranks: ``1/dp`` of them plus the gathered working set: one block's parameters and
    gradients when a lone stage reshards after each block, the whole stage's in a pipeline,
    which keeps them gathered across its micro-batches), the activations of every micro-batch
    in flight, one micro-batch's largest transient buffer and the tensors crossing its cuts.
    Inference: parameters plus one micro-batch's transients.
    """
    m = max(n_microbatches, 1)
    if not training:
        return param_bytes + buffer_bytes + transient_bytes + crossing_bytes
    state = param_bytes * state_per_param_byte(optimizer, precision)
    if dp_mode == "shard" and dp > 1:
        gathered = 2 * param_bytes if n_stages > 1 else 2 * np.minimum(unit_param_bytes or param_bytes, param_bytes)
        state = state / dp + gathered
    inflight = in_flight(stage, n_stages, schedule=schedule, n_microbatches=m, n_virtual=n_virtual)
    return state + buffer_bytes + inflight * saved_bytes + transient_bytes + 2 * crossing_bytes


def explain_memory(costs: PipelineCosts, n_stages: int, memory_of, allowed=None) -> tuple[float, str]:
    """The largest per-stage memory of the time-optimal split, and every stage's, for when nothing fits."""
    cuts = solve_cuts(costs, n_stages, allowed=allowed)
    bounds = [0] + cuts + [len(costs.order)]
    need = [float(memory_of(k, np.array([s]), e)[0]) for k, (s, e) in enumerate(zip(bounds[:-1], bounds[1:]))]
    return max(need), ", ".join(f"stage {k}: {format_bytes(b)}" for k, b in enumerate(need))


def _fixed_s(node, cost, spec, training: bool) -> float:
    """The part of a node's time that a smaller batch does not shrink: launches and reading its weights."""
    if not cost.time_s:
        return 0.0
    weights = sum(tensor_bytes(fetch_attr(node.graph.owning_module, a.target)) for a in node.all_input_nodes
                  if a.op == "get_attr" and isinstance(fetch_attr(node.graph.owning_module, a.target), torch.Tensor))
    launches = 1 + (2 if training and cost.backward_time_s else 0)
    reads = 1 + (2 if training and cost.backward_time_s else 0)
    return launches * spec.launch_s + reads * weights / spec.memory_bandwidth_Bps
