"""Plain-text reports of a ``Plan``: the mesh and its step, a table per stage (and per shard), what each
mesh axis communicates, tensor sharding decisions, and the candidates the planner tried.

Reads a ``Plan``; writes nothing.
"""
from __future__ import annotations

from passes._util import format_bytes, format_count, format_seconds, table

__all__ = ["plan_report"]


def plan_report(plan) -> str:
    mesh = plan.mesh
    head = (f"{plan.strategy} plan of {plan.model or 'model'} on {plan.n_devices} x "
            f"{getattr(plan.device, 'name', plan.device)}: mesh dp={mesh['dp']} x tp={mesh['tp']} x pp={mesh['pp']}, "
            f"{'training' if plan.training else 'inference'}"
            + (f", schedule {plan.schedule}" if mesh["pp"] > 1 else "")
            + (f" ({plan.n_virtual} stages per pipeline rank: rank r holds stages r, r + {mesh['pp']}, ...)"
               if plan.n_virtual > 1 else "")
            + f", {plan.n_microbatches} micro-batch{'es' if plan.n_microbatches > 1 else ''} per replica"
            + (f", data parallel: {plan.data_parallel}" if mesh["dp"] > 1 else "")
            + (", every block recomputed in backward" if plan.decisions.recompute else ""))
    c = plan.cost
    lines = [head, "",
             f"step (simulated, global batch): {format_seconds(c.step_time_s)}; busiest pipeline rank computes "
             f"{format_seconds(c.compute_s)}, bubble {c.bubble_fraction:.1%}, optimizer {format_seconds(c.optimizer_s)}; "
             f"peak memory per device {format_bytes(c.peak_bytes)}", "", _stage_table(plan)]
    if plan.mesh["tp"] > 1:
        lines += ["", _shard_table(plan)]
    if c.axes:
        rows = [(a.axis, a.what, format_bytes(a.bytes_per_step), format_seconds(a.time_s),
                 format_seconds(a.exposed_s), "yes" if a.overlapped else "no") for a in c.axes]
        lines += ["", "communication per step, by mesh axis (bytes per device):",
                  table(["axis", "what", "bytes", "time", "exposed", "overlapped"], rows, align="llrrrl")]
    if plan.mesh["pp"] > 1:
        lines += ["", f"slowest stage {format_seconds(plan.bottleneck_s)} (compute + comm); compute / lower bound "
                      f"{plan.balance_ratio:.3f} (lower bound {format_seconds(plan.lower_bound_s)})"]
    if plan.shared_params:
        lines.append("shared (tied) parameters, kept in sync by the runtime: "
                     + ", ".join(f"{k} on stages {v}" for k, v in plan.shared_params.items()))
    if plan.sharding is not None:
        lines += ["", plan.sharding.report()]
    if len(plan.candidates) > 1:
        lines += ["", candidates_report(plan)]
    return "\n".join(lines)


def _stage_table(plan) -> str:
    rows = []
    pp, many = plan.mesh["pp"], plan.n_virtual > 1
    for s in plan.stages:
        c = s.cost
        rows.append(((s.index % pp,) if many else ()) + (
                    s.index, c.n_nodes, f"{s.first_node} .. {s.last_node}", format_bytes(c.param_bytes),
                    format_count(c.flops), format_count(c.backward_flops), format_seconds(c.time_s),
                    format_seconds(c.comm_s), format_bytes(c.memory_bytes), format_bytes(c.bytes_in)))
    head = ["stage", "nodes", "span", "params", "FLOPs", "bwd FLOPs", "time", "comm", "memory", "bytes in"]
    out = table((["pp rank"] if many else []) + head, rows, align=("r" if many else "") + "rrlrrrrrrr")
    if many:
        out += "\n(memory: the stage's share; a pp rank holds the sum of its stages')"
    return out


def _shard_table(plan) -> str:
    rows = []
    for s in plan.stages:
        for sh in s.shards:
            c = sh.cost
            rows.append((s.index, sh.index, format_bytes(c.param_bytes), format_seconds(c.time_s),
                         format_seconds(c.collective_s), format_bytes(c.memory_bytes)))
    return "tensor shards (per device):\n" + table(["stage", "shard", "params", "time", "collectives", "memory"],
                                                  rows, align="rrrrrr")


def candidates_report(plan) -> str:
    """Every candidate tried, fastest first, the rejected ones with their reasons."""
    fitting = sorted((c for c in plan.candidates if c.fits), key=lambda c: c.step_time_s)
    rejected = [c for c in plan.candidates if not c.fits]
    best = fitting[0].step_time_s if fitting else None
    rows = [(c.label(), format_seconds(c.step_time_s), f"{c.step_time_s / best:.2f}x" if best else "",
             format_bytes(c.peak_bytes), f"{c.bubble_fraction:.1%}", format_seconds(c.comm_s)) for c in fitting[:15]]
    lines = [f"candidates ({len(fitting)} fit, {len(rejected)} rejected), fastest first:",
             table(["mesh", "step", "vs best", "peak/device", "bubble", "comm"], rows, align="lrrrrr")]
    if len(fitting) > 15:
        lines.append(f"... {len(fitting) - 15} more")
    reasons = {}
    for c in rejected:
        reasons.setdefault(c.reason.split(":")[0], []).append(c.label())
    for reason, labels in list(reasons.items())[:8]:
        lines.append(f"rejected ({len(labels)}): {reason}: {', '.join(labels[:4])}{' ...' if len(labels) > 4 else ''}")
    return "\n".join(lines)
