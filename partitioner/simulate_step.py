"""Step time and per-device memory of a plan on a cluster: the objective the planner minimises.

Reads per-stage timings of one micro-batch (``StageTiming``, from the cost model on the graph a
device runs, tensor-parallel collectives included) and the mesh; writes nothing. The step is
the schedule laid out micro-batch by micro-batch (``schedules.simulate``: bubbles, and each
stage's sends to its neighbour on the pipeline link), then data-parallel gradient
synchronisation and the optimizer step:

* replicate: a ring all-reduce of the stage's gradients in buckets (25 MiB, as DDP) issued
  while the last micro-batch's backward runs; only what outlasts that backward, and at least
  the last bucket, is exposed;
* shard (ZeRO-3 / FSDP2, one group per block): parameters all-gathered before use (once per
  step in a pipeline, which keeps them gathered; before every micro-batch's forward and again
  before its backward for a lone stage, which reshards after each block) with the next block's
  gather overlapping the current block's compute, and gradients reduce-scattered under the
  last backward.

Links follow the mesh order ``(pp, dp, tp)`` with tp fastest-varying (as torchtitan lays it
out): a tp group of ``tp`` neighbouring ranks stays in a node when it fits, a dp group strides
``tp`` ranks, pipeline neighbours ``dp * tp`` ranks; a group that leaves a node of
``devices_per_node`` runs at the inter-node bandwidth.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .comm import all_gather_s, all_reduce_s, link_of, reduce_scatter_s, send_s
from .pipeline import state_per_param_byte
from .plan import AxisCost, PlanCost
from .schedules import make_schedule, simulate

__all__ = ["StageTiming", "simulate_plan", "BUCKET_BYTES"]

BUCKET_BYTES = 25 * 2**20      # DDP's default bucket_cap_mb


@dataclass(frozen=True)
class StageTiming:
    """One stage on one device, for one micro-batch (except the parameter bytes)."""
    forward_s: float
    backward_s: float
    send_bytes: float          # activations sent to the next stage (gradients of the floats come back)
    grad_bytes: float          # floating-point activations sent (their gradients return the same size)
    collective_s: float        # of forward_s + backward_s: tensor-parallel collectives
    param_bytes: float         # this device's parameters of the stage (a tp shard's)
    collective_bytes: float = 0.0   # what those collectives move per device
    n_units: int = 1           # blocks the stage holds (gather/bucket granularity)
    memory_bytes: float = 0.0


def simulate_plan(timings: list[StageTiming], *, mesh: dict, schedule: str, n_microbatches: int,
                  data_parallel: str, spec, devices_per_node: int, training: bool,
                  optimizer: str | None, precision: str = "fp32") -> PlanCost:
    """The simulated step of the global batch on ``mesh`` and the largest per-device memory."""
    pp, dp, tp = mesh["pp"], mesh["dp"], mesh["tp"]
    m = n_microbatches
    pp_link = link_of(spec, pp, stride=dp * tp, devices_per_node=devices_per_node) if pp > 1 else None
    dp_link = link_of(spec, dp, stride=tp, devices_per_node=devices_per_node)
    sends = [send_s(t.send_bytes, pp_link) if pp_link else 0.0 for t in timings]
    forward = [t.forward_s for t in timings]
    backward = [t.backward_s if training else 0.0 for t in timings]
    actions = make_schedule(schedule if training else "gpipe", pp, m)
    if not training:
        actions = [[a for a in stage if a.kind == "F"] for stage in actions]
    timeline = simulate(actions, forward, [b or 1e-12 for b in backward] if training else 0.0, send_s=sends)
    ends = [spans[-1].end_s if spans else 0.0 for spans in timeline.spans]

    dp_rows, exposed, opt_s = [], [], []
    for t, end in zip(timings, ends):
        sync, hidden = _dp_sync(t, dp, data_parallel, dp_link, training=training, m=m, pp=pp,
                                grad_scale=2.0 if precision == "mixed" else 1.0)
        dp_rows.append(sync)
        exposed.append(hidden)
        opt_s.append(_optimizer_s(t.param_bytes / (dp if data_parallel == "shard" else 1), optimizer, spec,
                                  precision) if training else 0.0)
    finish = [end + e + o for end, e, o in zip(ends, exposed, opt_s)]
    step = max(finish)
    busiest = max(range(pp), key=lambda s: m * (timings[s].forward_s + timings[s].backward_s))
    axes = _axes(timings, sends, dp_rows, exposed, mesh=mesh, m=m, training=training, data_parallel=data_parallel)
    peaks = tuple(int(t.memory_bytes) for t in timings)
    return PlanCost(step_time_s=step, peak_bytes=max(peaks), stage_peak_bytes=peaks,
                    compute_s=m * (timings[busiest].forward_s + timings[busiest].backward_s),
                    bubble_fraction=timeline.bubble_fraction[busiest], optimizer_s=max(opt_s), axes=axes)


def _dp_sync(t: StageTiming, dp: int, mode: str, link, *, training: bool, m: int, pp: int = 1,
             grad_scale: float = 1.0) -> tuple[tuple, float]:
    """((what, bytes per device, seconds), exposed seconds) of one stage's data-parallel traffic per step.

    ``grad_scale``: gradient bytes per parameter byte (2: fp32 gradients of a bf16 model). Sharded:
    a lone stage (``pp == 1``) reshards after each block, so every micro-batch gathers every block
    before its forward and again before its backward, each gather hidden under the block before
    it but the first; a pipeline stage gathers once per step and keeps its parameters.
    """
    if dp <= 1 or not training:
        return ("", 0, 0.0), 0.0
    nbytes = t.param_bytes * grad_scale
    units = max(t.n_units, 1)
    if mode == "replicate":
        buckets = max(math.ceil(nbytes / BUCKET_BYTES), 1)
        total = all_reduce_s(nbytes, dp, link)
        hidden = max(total - t.backward_s, total / buckets)
        return ("gradient all-reduce", int(2 * (dp - 1) / dp * nbytes), total), hidden
    gather = all_gather_s(t.param_bytes, dp, link)          # parameters travel in their own dtype
    scatter = reduce_scatter_s(nbytes, dp, link)
    if pp == 1:
        n_gathers = 2 * m
        exposed = m * (max(gather - t.forward_s, gather / units) + max(gather - t.backward_s, gather / units))
    else:
        n_gathers = 1
        exposed = max(gather - t.forward_s, gather / units)
    exposed += max(scatter - t.backward_s, scatter / units)
    moved = int((n_gathers * t.param_bytes + nbytes) * (dp - 1) / dp)
    return ("parameter all-gather + gradient reduce-scatter", moved, n_gathers * gather + scatter), exposed


def _optimizer_s(param_bytes: float, optimizer: str | None, spec, precision: str = "fp32") -> float:
    """The optimizer's sweep: it reads parameters and gradients, reads and writes its state, writes parameters
    (and, in mixed precision, reads and writes the fp32 master weights and copies them to the half-precision ones)."""
    touched = 2 * state_per_param_byte(optimizer, precision) + 1
    return touched * param_bytes / (spec.memory_bandwidth_Bps * spec.memory_efficiency)


def _axes(timings, sends, dp_rows, exposed, *, mesh, m, training, data_parallel) -> tuple[AxisCost, ...]:
    rows = []
    if mesh["tp"] > 1:
        total = max(m * t.collective_s for t in timings)
        nbytes = max(m * t.collective_bytes for t in timings)
        rows.append(AxisCost("tp", "all-reduce of row-parallel outputs" + (" and input gradients" if training else ""),
                             int(nbytes), total, total))
    if mesh["pp"] > 1:
        nbytes = max(m * (t.send_bytes + (t.grad_bytes if training else 0)) for t in timings)
        total = max(m * s * (2 if training else 1) for s in sends)
        rows.append(AxisCost("pp", "activations forward" + (", gradients backward" if training else ""),
                             int(nbytes), total, total))     # on the schedule's critical path
    if mesh["dp"] > 1 and training:
        worst = max(range(len(dp_rows)), key=lambda i: dp_rows[i][2])
        what, nbytes, total = dp_rows[worst]
        rows.append(AxisCost("dp", what + f" ({data_parallel})", nbytes, total, exposed[worst]))
    return tuple(rows)
