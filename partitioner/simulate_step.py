"""Step time and per-device memory of a plan on a cluster: the objective the planner minimises.

Reads per-stage timings of one micro-batch (``StageTiming``, from the cost model on the graph a
device runs, tensor-parallel collectives included) and the mesh; writes nothing. The step is
the schedule laid out micro-batch by micro-batch (``schedules.simulate``: bubbles, and each
stage's sends to its neighbour on the pipeline link), then data-parallel gradient
synchronisation and the optimizer step:

* replicate: a ring all-reduce of the stage's gradients in buckets (25 MiB, as DDP), each issued
  once the last micro-batch's backward has finished its gradients; only what outlasts that
  backward, and at least the last bucket, is exposed, then the gradients are copied out of the
  buckets (the runtime's copies in and out, at memory bandwidth);
* shard (ZeRO-3 / FSDP2, one group per block): parameters all-gathered before use (once per
  step in a pipeline, which keeps them gathered; before every micro-batch's forward and again
  before its backward for a lone stage, which reshards after each block) with the next block's
  gather overlapping the current block's compute, and gradients reduce-scattered under the
  last backward.

A stage running several micro-batches accumulates their weight gradients: every backward after the
step's first adds into the gradients the earlier ones left (autograd's in-place add: two reads and a
write of the stage's gradients at memory bandwidth; the first backward's gradients are stored as
they are, ``zero_grad(set_to_none=True)``), spread here over the stage's backwards.

Each action also pays the runtime's host work around its kernels (``DeviceSpec.action_overhead_s``:
measured on a CPU, hidden on a GPU). Ranks that share compute units (a CPU host running more ranks than cores:
``DeviceSpec.node_compute_units``) are laid out by ``timeshare``: whatever computes at a moment
shares the units, so a stage computes at full speed in another's bubble and at ``units / ranks``
of it when every rank computes; waits (collectives, receives) take no compute.

With interleaved 1F1B a pipeline rank holds ``v`` stages (``r, r + p, ...``): the schedule is laid
out stage by stage, and what a rank holds, synchronises and steps is the sum of its stages.

Links follow the mesh order ``(pp, dp, tp)`` with tp fastest-varying (as torchtitan lays it
out): a tp group of ``tp`` neighbouring ranks stays in a node when it fits, a dp group strides
``tp`` ranks, pipeline neighbours ``dp * tp`` ranks; a group that leaves a node of
``devices_per_node`` runs at the inter-node bandwidth.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .comm import all_gather_s, all_reduce_s, link_of, reduce_scatter_s, send_s
from .pipeline import state_per_param_byte
from .plan import AxisCost, PlanCost
from .schedules import make_schedule, simulate
from .timeshare import Task, layout

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
    collective_forward_s: float | None = None    # of collective_s, the forward's (None: half)


def simulate_plan(timings: list[StageTiming], *, mesh: dict, schedule: str, n_microbatches: int,
                  data_parallel: str, spec, devices_per_node: int, training: bool,
                  optimizer: str | None, precision: str = "fp32", n_virtual: int = 1) -> PlanCost:
    """The simulated step of the global batch on ``mesh`` and the largest per-device memory.

    ``timings``: one per stage, ``pp * n_virtual`` of them (``n_virtual`` stages per pipeline rank
    with interleaved 1F1B); memory per device is the sum of its stages'.
    """
    pp, dp, tp = mesh["pp"], mesh["dp"], mesh["tp"]
    m = n_microbatches
    pp_link = link_of(spec, pp, stride=dp * tp, devices_per_node=devices_per_node) if pp > 1 else None
    dp_link = link_of(spec, dp, stride=tp, devices_per_node=devices_per_node, collective=True)
    sends = [send_s(t.send_bytes, pp_link) if pp_link else 0.0 for t in timings]
    actions = make_schedule(schedule if training or n_virtual > 1 else "gpipe", pp, m, n_virtual)
    if not training:
        actions = [[a for a in stage if a.kind == "F"] for stage in actions]
    grad_scale = 2.0 if precision == "mixed" else 1.0
    if training and m > 1:
        timings = [replace(t, backward_s=t.backward_s + _accumulate_s(t.param_bytes * grad_scale, m, spec))
                   for t in timings]
    per_stage = timings
    timings = [_on_rank(per_stage[r::pp]) for r in range(pp)]     # what each pipeline rank holds
    capacity = _capacity(spec, mesh, devices_per_node)
    slowdown = max(1.0, pp / capacity)              # of compute while every rank computes

    dp_rows, waits, copies, opt_s = [], [], [], []
    for t in timings:
        sync, wait, copy = _dp_sync(t, dp, data_parallel, dp_link, training=training, m=m, pp=pp,
                                    grad_scale=grad_scale, spec=spec, slowdown=slowdown)
        dp_rows.append(sync)
        waits.append(wait)
        copies.append(copy)
        opt_s.append(_optimizer_s(t.param_bytes / (dp if data_parallel == "shard" else 1), optimizer, spec,
                                  precision) if training else 0.0)
    exposed = [w + c * slowdown for w, c in zip(waits, copies)]
    overhead = spec.action_overhead_s
    if capacity < pp:
        finish, bubbles = _shared_step(actions, per_stage, sends, waits, copies, opt_s, capacity, training=training,
                                       overhead=overhead)
    else:
        forward = [t.forward_s + overhead for t in per_stage]
        backward = [t.backward_s + overhead if training else 0.0 for t in per_stage]
        timeline = simulate(actions, forward, [b or 1e-12 for b in backward] if training else 0.0, send_s=sends)
        ends = [spans[-1].end_s if spans else 0.0 for spans in timeline.spans]
        finish = [end + w + c + o for end, w, c, o in zip(ends, waits, copies, opt_s)]
        bubbles = timeline.bubble_fraction
    step = max(finish)
    busiest = max(range(pp), key=lambda s: m * (timings[s].forward_s + timings[s].backward_s))
    rank_sends = [sum(sends[r::pp]) for r in range(pp)]
    axes = _axes(timings, rank_sends, dp_rows, exposed, mesh=mesh, m=m, training=training,
                 data_parallel=data_parallel)
    peaks = tuple(int(t.memory_bytes) for t in timings)
    return PlanCost(step_time_s=step, peak_bytes=max(peaks), stage_peak_bytes=peaks,
                    compute_s=m * (timings[busiest].forward_s + timings[busiest].backward_s),
                    bubble_fraction=bubbles[busiest], optimizer_s=max(opt_s) * slowdown, axes=axes)


def _on_rank(stages: list[StageTiming]) -> StageTiming:
    """One pipeline rank's stages as one (interleaved 1F1B: ``v`` of them): times, bytes and memory summed."""
    if len(stages) == 1:
        return stages[0]
    total = lambda f: sum(f(t) for t in stages)          # noqa: E731
    forward = [t.collective_forward_s for t in stages]
    return StageTiming(forward_s=total(lambda t: t.forward_s), backward_s=total(lambda t: t.backward_s),
                       send_bytes=total(lambda t: t.send_bytes), grad_bytes=total(lambda t: t.grad_bytes),
                       collective_s=total(lambda t: t.collective_s), param_bytes=total(lambda t: t.param_bytes),
                       collective_bytes=total(lambda t: t.collective_bytes), n_units=total(lambda t: t.n_units),
                       memory_bytes=total(lambda t: t.memory_bytes),
                       collective_forward_s=None if None in forward else sum(forward))


def _capacity(spec, mesh: dict, devices_per_node: int) -> float:
    """How many pipeline stages' ranks can compute at full speed at once: all of them (``pp``) unless the
    ranks of a node share fewer compute units than they are (``DeviceSpec.node_compute_units``)."""
    world = mesh["pp"] * mesh["dp"] * mesh["tp"]
    ranks = min(world, devices_per_node)          # on one node
    units = spec.node_compute_units
    if not units or units >= ranks:
        return float(mesh["pp"])
    return units * mesh["pp"] / ranks


def _shared_step(actions, timings, sends, waits, copies, opt_s, capacity: float, *,
                 training: bool, overhead: float = 0.0) -> tuple[list[float], list[float]]:
    """(when each rank ends its step, its idle share until its last action) with ranks sharing compute units
    (``timeshare``): an action computes, then waits for its tensor-parallel collectives; after the last one
    a rank waits for its gradients' all-reduce, copies them out of the buckets and steps its optimizer.
    ``timings`` and ``sends`` are per stage; ``actions`` per rank."""
    rank_of = {a.stage: r for r, row in enumerate(actions) for a in row}
    n_stages = len(timings)
    tasks = []
    for r, row_actions in enumerate(actions):
        row = []
        for a in row_actions:
            s, t = a.stage, timings[a.stage]
            coll_f = t.collective_s / 2 if t.collective_forward_s is None else t.collective_forward_s
            coll_b = t.collective_s - coll_f
            key = (a.kind, s, a.microbatch)
            if a.kind == "F":
                after = ((rank_of[s - 1], ("F", s - 1, a.microbatch)),) if s > 0 else ()
                row.append(Task(key, max(t.forward_s - coll_f, 0.0) + overhead, coll_f, after))
            else:
                after = ((r, ("F", s, a.microbatch)),) + \
                    (((rank_of[s + 1], ("B", s + 1, a.microbatch)),) if s < n_stages - 1 else ())
                row.append(Task(key, max(t.backward_s - coll_b, 0.0) + overhead, coll_b, after))
        if training:
            row += [Task("sync", copies[r], waits[r]), Task("optimizer", opt_s[r])]
        tasks.append(row)
    pp = len(actions)
    rank_sends = [max(sends[r::pp]) for r in range(pp)]     # a rank's stages send alike
    spans = layout(tasks, capacity=capacity, send_s=rank_sends)
    finish = [max((end for _, end in sp.values()), default=0.0) for sp in spans]
    bubbles = []
    for sp in spans:
        work = [v for k, v in sp.items() if isinstance(k, tuple)]
        end = max((e for _, e in work), default=0.0)
        bubbles.append(max(1.0 - sum(e - b for b, e in work) / end, 0.0) if end else 0.0)   # not -1e-16
    return finish, bubbles


def _dp_sync(t: StageTiming, dp: int, mode: str, link, *, training: bool, m: int, pp: int = 1,
             grad_scale: float = 1.0, spec=None, slowdown: float = 1.0) -> tuple[tuple, float, float]:
    """((what, bytes per device, seconds), exposed wait, copy seconds) of one stage's data-parallel traffic per step.

    ``grad_scale``: gradient bytes per parameter byte (2: fp32 gradients of a bf16 model). Replicated:
    gradients all-reduced in buckets as the last backward (``slowdown`` times its own time, for ranks
    sharing compute units) finishes them, and copied into and out of the buckets (``copy``: device
    work). Sharded: a lone stage (``pp == 1``) reshards after each block, so every micro-batch gathers
    every block before its forward and again before its backward, each gather hidden under the block
    before it but the first (the last backward's gathers share the link with the gradients'
    reduce-scatter); a pipeline stage gathers once per step and keeps its parameters.
    """
    if dp <= 1 or not training:
        return ("", 0, 0.0), 0.0, 0.0
    nbytes = t.param_bytes * grad_scale
    units = max(t.n_units, 1)
    if mode == "replicate":
        total = all_reduce_s(nbytes, dp, link)
        wait = _bucket_tail_s(nbytes, t.backward_s * slowdown, dp, link)
        copy = _bucket_copy_s(nbytes, spec) if spec is not None else 0.0
        return ("gradient all-reduce", int(2 * (dp - 1) / dp * nbytes), total), wait, copy
    gather = all_gather_s(t.param_bytes, dp, link)          # parameters travel in their own dtype
    scatter = reduce_scatter_s(nbytes, dp, link)
    if pp == 1:
        # the last backward gathers the next block while it reduce-scatters the one before, on one link
        n_gathers = 2 * m
        exposed = m * max(gather - t.forward_s, gather / units) \
            + (m - 1) * max(gather - t.backward_s, gather / units) \
            + max(gather + scatter - t.backward_s, (gather + scatter) / units)
    else:
        n_gathers = 1
        exposed = max(gather - t.forward_s, gather / units) + max(scatter - t.backward_s, scatter / units)
    moved = int((n_gathers * t.param_bytes + nbytes) * (dp - 1) / dp)
    return ("parameter all-gather + gradient reduce-scatter", moved, n_gathers * gather + scatter), exposed, 0.0


def _bucket_tail_s(nbytes: float, backward_s: float, dp: int, link) -> float:
    """How long the gradients' all-reduce outlasts the last backward: buckets of ``BUCKET_BYTES`` in the order
    the backward finishes them, each ready once the backward has gone through its share of the parameters
    (evenly in time), reduced one after another. At least the last bucket's all-reduce is exposed.

    Closed form: the full buckets' queue ends at ``max(ready_1 + n * t, ready_n + t)`` (ready times
    grow linearly, so the busiest start is the first or the last), then the last bucket follows.
    """
    if nbytes <= 0:
        return 0.0
    full, last = divmod(nbytes, BUCKET_BYTES)
    if last == 0:
        full, last = full - 1, BUCKET_BYTES
    full = int(full)
    queue = 0.0
    if full:
        each = all_reduce_s(BUCKET_BYTES, dp, link)
        queue = max(backward_s * BUCKET_BYTES / nbytes + full * each, backward_s * full * BUCKET_BYTES / nbytes + each)
    return max(queue, backward_s) + all_reduce_s(last, dp, link) - backward_s


def _accumulate_s(grad_bytes: float, m: int, spec) -> float:
    """Per backward, the gradient accumulation of ``m`` micro-batches: ``m - 1`` in-place adds (two reads and a
    write of every gradient byte) spread over the ``m`` backwards."""
    return 3 * grad_bytes * (m - 1) / m / (spec.memory_bandwidth_Bps * spec.memory_efficiency)


def _bucket_copy_s(nbytes: float, spec) -> float:
    """The runtime's bucket copies (``runtime.data_parallel.GradSync``): gradients concatenated into the flat
    buckets, averaged in place and copied back, each a read and a write of every gradient byte."""
    return 6 * nbytes / (spec.memory_bandwidth_Bps * spec.memory_efficiency)


def _optimizer_s(param_bytes: float, optimizer: str | None, spec, precision: str = "fp32") -> float:
    """The optimizer's sweep: it reads parameters and gradients, reads and writes its state, writes parameters
    (and, in mixed precision, reads and writes the fp32 master weights and copies them to the half-precision ones),
    at the spec's optimizer bandwidth (measured where PyTorch's optimizer is not one fused kernel)."""
    touched = 2 * state_per_param_byte(optimizer, precision) + 1
    return touched * param_bytes / (spec.optimizer_bandwidth_Bps or spec.memory_bandwidth_Bps * spec.memory_efficiency)


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
