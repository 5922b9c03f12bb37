"""Drawings of plans: the stage graph (DOT; SVG/PNG with Graphviz), per-stage bars, the schedule.

Reads a ``Plan`` (its stage GraphModules and the costs in ``node.meta["fxpart.cost"]``);
writes files. Nodes are grouped by module (cut to ``depth`` path components) so a
12-layer model reads per block; stages are clusters; edges that cross a cut carry their
bytes. ``stage_chart`` draws time and memory per stage against the device's memory
(matplotlib when installed, else text bars); ``schedule_timeline`` lays the pipeline
schedule out in time (``partitioner.schedules.simulate``) as a PNG/SVG, a Chrome trace or text.
The DOT helpers are ``passes.draw``'s, shared with graph drawings.
"""
from __future__ import annotations

from pathlib import Path

import pydot
import torch

from passes._keys import COLLECTIVE, COST
from passes._util import format_bytes, format_count, format_seconds
from passes.draw import module_group, render, value_bytes, write_dot

__all__ = ["plan_dot", "tensor_dot", "draw_plan", "render", "stage_chart", "schedule_timeline", "mesh_caption"]

_COLORS = ["#dbe9f6", "#fde2c8", "#d9f0d3", "#f3d1e6", "#fff2b3", "#d0e0e3", "#e6d5f5", "#f9d6d5"]


def mesh_caption(plan) -> str:
    """One line: the mesh, what each axis holds, and the simulated step."""
    mesh = plan.mesh
    parts = [f"mesh dp{mesh['dp']} x tp{mesh['tp']} x pp{mesh['pp']} = {plan.n_devices} x "
             f"{getattr(plan.device, 'name', plan.device)}"]
    if mesh["pp"] > 1:
        per = f", {plan.n_virtual} per rank" if plan.n_virtual > 1 else ""
        parts.append(f"{len(plan.stages)} stages ({plan.schedule}{per}, {plan.n_microbatches} micro-batches)")
    if mesh["tp"] > 1:
        parts.append(f"{mesh['tp']} tensor shards per stage")
    if mesh["dp"] > 1:
        parts.append(f"{mesh['dp']} {plan.data_parallel}d replicas of each")
    parts.append(f"step {format_seconds(plan.cost.step_time_s)}, {format_bytes(plan.cost.peak_bytes)} per device")
    return "; ".join(parts)


def plan_dot(plan, *, depth: int = 3) -> pydot.Dot:
    """A DOT graph of the plan: one cluster per stage, one box per module group; a lone tensor-parallel
    stage as its shards side by side. The title gives the mesh."""
    if plan.mesh["tp"] > 1 and plan.mesh["pp"] == 1:
        return tensor_dot(plan, depth=depth)
    dot = pydot.Dot("plan", graph_type="digraph", rankdir="TB", fontname="Helvetica", compound="true",
                    label=f"{plan.model}: {mesh_caption(plan)}; balance {plan.balance_ratio:.3f} x lower bound",
                    labelloc="t")
    producer: dict[str, str] = {}   # value name -> group box id
    edges: set[tuple[str, str]] = set()
    cut_edges: list[tuple[str, str, str]] = []   # (last box of stage s - 1, first box of stage s, label)
    last_box = None
    for stage in plan.stages:
        color = _COLORS[stage.index % len(_COLORS)]
        c = stage.cost
        cluster = pydot.Cluster(f"stage{stage.index}", style="filled", fillcolor=color, fontname="Helvetica",
                                label=f"stage {stage.index}: {format_count(c.flops + c.backward_flops, 'FLOP')}, "
                                      f"{format_seconds(c.time_s)}, {format_bytes(c.memory_bytes)}")
        groups: dict[str, list] = {}
        for node in stage.module.graph.nodes:
            if node.op in ("call_function", "call_module"):
                groups.setdefault(module_group(node, depth), []).append(node)
        boxes = {name: f"s{stage.index}_{name}".replace(".", "_").replace("(", "").replace(")", "")
                 for name in groups}
        for name, nodes in groups.items():
            flops = sum(n.meta[COST].flops for n in nodes if COST in n.meta)
            cluster.add_node(pydot.Node(boxes[name], label=f"{name}\\n{len(nodes)} ops, {format_count(flops, 'FLOP')}",
                                        shape="box", style="filled", fillcolor="white", fontname="Helvetica"))
            producer.update((node.name, boxes[name]) for node in nodes)
        # edges only once every box of the stage is known: groups are not in data-flow order
        for name, nodes in groups.items():
            for node in nodes:
                for arg in node.all_input_nodes:
                    src = producer.get(arg.name)
                    if src is not None and src != boxes[name] and arg.op != "placeholder":
                        edges.add((src, boxes[name]))
        # what crosses the cut before this stage travels from the previous stage only (values that skip
        # stages are passed along), so one edge per cut, from its last box to this stage's first
        received = [n for n in stage.module.graph.nodes if n.op == "placeholder"]
        if last_box is not None and groups:
            label = f"{format_bytes(sum(value_bytes(n) for n in received))} ({len(received)} tensors)"
            cut_edges.append((last_box, next(iter(boxes.values())), label))
        last_compute = [n for n in stage.module.graph.nodes if n.op in ("call_function", "call_module")]
        last_box = producer.get(last_compute[-1].name) if last_compute else last_box
        dot.add_subgraph(cluster)
    for src, dst in edges:
        dot.add_edge(pydot.Edge(src, dst))
    for src, dst, label in cut_edges:
        dot.add_edge(pydot.Edge(src, dst, label=label, color="#c0392b", penwidth="2", fontname="Helvetica"))
    dot.add_node(pydot.Node("legend", shape="note", fontname="Helvetica",
                            label="box: module group (ops, forward FLOPs)\\ncluster: stage (fwd+bwd FLOPs, "
                                  "time, memory)\\nred edge: what crosses a cut (bytes per batch, tensors)"))
    return dot


def tensor_dot(plan, *, depth: int = 3) -> pydot.Dot:
    """A tensor plan: shards side by side (one cluster each), collectives as shared nodes between them."""
    from .sharding import ALL_GATHER, ALL_REDUCE, WAIT
    collective_ops = {ALL_REDUCE: "all-reduce (sum)", ALL_GATHER: "all-gather"}
    dot = pydot.Dot("plan", graph_type="digraph", rankdir="TB", fontname="Helvetica", compound="true",
                    label=f"{plan.model}: {mesh_caption(plan)}", labelloc="t")
    collectives: dict[str, pydot.Node] = {}
    edges: set[tuple[str, str]] = set()
    for stage in plan.stages[0].shards:
        c = stage.cost
        cluster = pydot.Cluster(f"shard{stage.index}", style="filled", fillcolor=_COLORS[stage.index % len(_COLORS)],
                                fontname="Helvetica", label=f"shard {stage.index}: {format_bytes(c.param_bytes)} params, "
                                f"{format_count(c.flops + c.backward_flops, 'FLOP')}, {format_seconds(c.time_s)}")
        box_of: dict[str, str] = {}
        groups: dict[str, list] = {}
        for node in stage.module.graph.nodes:
            if node.op == "call_function" and node.target not in (ALL_REDUCE, ALL_GATHER, WAIT):
                groups.setdefault(module_group(node, depth), []).append(node)
        for name, nodes in groups.items():
            box = f"s{stage.index}_" + "".join(ch if ch.isalnum() else "_" for ch in name)
            flops = sum(n.meta[COST].flops for n in nodes if COST in n.meta)
            cluster.add_node(pydot.Node(box, label=f"{name}\\n{len(nodes)} ops, {format_count(flops, 'FLOP')}",
                                        shape="box", style="filled", fillcolor="white", fontname="Helvetica"))
            box_of.update((n.name, box) for n in nodes)
        for node in stage.module.graph.nodes:
            if node.op != "call_function" or node.target not in collective_ops:
                continue
            info = node.meta.get(COLLECTIVE, {})
            key = f"collective_{node.name}"
            collectives.setdefault(key, pydot.Node(
                key, label=f"{collective_ops[node.target]}\\n{info.get('block', '')}\\n"
                           f"{format_bytes(info.get('bytes', 0))}",
                shape="ellipse", style="filled", fillcolor="#f5b7b1", fontname="Helvetica"))
            src = box_of.get(node.args[0].name)
            if src:
                edges.add((src, key))
            for wait in node.users:
                for user in wait.users:
                    if user.name in box_of:
                        edges.add((key, box_of[user.name]))
        for node in stage.module.graph.nodes:   # data flow between module groups inside the shard
            for arg in node.all_input_nodes:
                a, b = box_of.get(arg.name), box_of.get(node.name)
                if a and b and a != b:
                    edges.add((a, b))
        dot.add_subgraph(cluster)
    for node in collectives.values():
        dot.add_node(node)
    for src, dst in sorted(edges):
        red = src.startswith("collective_") or dst.startswith("collective_")
        dot.add_edge(pydot.Edge(src, dst, **({"color": "#c0392b", "penwidth": "2"} if red else {})))
    dot.add_node(pydot.Node("legend", shape="note", fontname="Helvetica",
                            label="cluster: shard (params, fwd+bwd FLOPs, time)\\nbox: module group (ops, FLOPs)"
                                  "\\nred ellipse: collective joining every shard (bytes per batch)"))
    return dot


def draw_plan(plan, path: str, *, depth: int = 3) -> str:
    """Write the plan to ``path`` as .dot, .svg or .png (by suffix); returns the path."""
    return write_dot(plan_dot(plan, depth=depth), path)


def stage_chart(plan, path: str | Path | None = None, *, memory_limit: float | None = None) -> str:
    """Time (compute + communication) and memory per stage, memory against the device's limit.

    Args:
        plan: a ``Plan``.
        path: a .png/.svg (needs matplotlib), or .txt; None returns the text chart only.
        memory_limit: bytes per device drawn as the limit; None: the plan's device memory.

    Returns:
        The path written, or the text chart when ``path`` is None or .txt.
    """
    limit = memory_limit if memory_limit is not None else getattr(plan.device, "memory_bytes", 0)
    suffix = str(path).rsplit(".", 1)[-1].lower() if path is not None else "txt"
    if suffix in ("png", "svg"):
        return _stage_chart_matplotlib(plan, path, limit)
    text = _stage_chart_text(plan, limit)
    if path is not None:
        Path(path).write_text(text + "\n")
    return text


def _stage_chart_text(plan, limit: float, width: int = 40) -> str:
    stages = plan.stages
    t_max = max(s.cost.time_s + s.cost.comm_s for s in stages) or 1.0
    m_max = max([s.cost.memory_bytes for s in stages] + [limit]) or 1.0
    lines = [f"time per stage ('#' compute, '~' comm; slowest {format_seconds(t_max)})"]
    for s in stages:
        n_c, n_m = round(width * s.cost.time_s / t_max), round(width * s.cost.comm_s / t_max)
        lines.append(f"  stage {s.index:>2} |{'#' * n_c}{'~' * n_m:<{width - n_c}}| "
                     f"{format_seconds(s.cost.time_s)} + {format_seconds(s.cost.comm_s)}")
    lines.append("memory per stage" + (f" ('|' marks the limit, {format_bytes(limit)})" if limit else ""))
    mark = round(width * limit / m_max) if limit else None
    for s in stages:
        bar = list(("=" * round(width * s.cost.memory_bytes / m_max)).ljust(width + 1))
        if mark is not None:
            bar[min(mark, width)] = "|"
        over = "  OVER" if limit and s.cost.memory_bytes > limit else ""
        lines.append(f"  stage {s.index:>2} [{''.join(bar)}] {format_bytes(s.cost.memory_bytes)}{over}")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("PNG/SVG charts need matplotlib (pip install matplotlib); a .txt path or "
                           "path=None gives the text chart") from None
    return plt


def _stage_chart_matplotlib(plan, path, limit: float) -> str:
    plt = _pyplot()
    idx = [s.index for s in plan.stages]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.2))
    compute = [s.cost.time_s * 1e3 for s in plan.stages]
    ax_t.bar(idx, compute, color="#4c72b0", label="compute")
    ax_t.bar(idx, [s.cost.comm_s * 1e3 for s in plan.stages], bottom=compute, color="#dd8452", label="comm")
    ax_t.axhline(plan.lower_bound_s * 1e3, color="gray", ls="--", lw=1, label="lower bound")
    ax_t.set(title="time per step (ms)", xlabel="stage", xticks=idx)
    ax_t.legend(fontsize=8)
    mem = [s.cost.memory_bytes for s in plan.stages]
    scale, unit = next(((b, u) for b, u in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")) if max(mem) >= b),
                       (1, "B"))
    bars = ax_m.bar(idx, [m / scale for m in mem], color="#55a868")
    ax_m.bar_label(bars, [format_bytes(m) for m in mem], fontsize=7)
    if limit and limit <= 3 * max(mem):
        ax_m.axhline(limit / scale, color="#c44e52", lw=1.5, label=f"device limit {format_bytes(limit)}")
        ax_m.legend(fontsize=8)
    # a limit far above every stage would flatten the bars: the title says it instead
    off_scale = f", limit {format_bytes(limit)} off scale" if limit and limit > 3 * max(mem) else ""
    ax_m.set(title=f"memory ({unit}){off_scale}", xlabel="stage", xticks=idx)
    fig.suptitle(f"{plan.model or 'model'}: {len(plan.stages)} stages on {getattr(plan.device, 'name', plan.device)}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def schedule_timeline(plan, path: str | Path | None = None, *, schedule: str | None = None,
                      n_microbatches: int | None = None):
    """Lay the plan's pipeline schedule out in time, per stage, with the stages' forward/backward times.

    Args:
        plan: a ``Plan``.
        path: .png/.svg (matplotlib), .json (Chrome trace: chrome://tracing, Perfetto) or .txt; None: nothing.
        schedule: "1f1b", "gpipe" or "interleaved-1f1b" (a plan with several stages per rank); None: the plan's.
        n_microbatches: None: the plan's, at least one per pipeline rank (so the pipeline fills).

    Returns:
        The ``partitioner.schedules.Timeline`` (bubble fraction, in-flight micro-batches per stage).
    """
    from .schedules import format_schedule, make_schedule, simulate, to_chrome_trace
    n, v = plan.mesh["pp"], plan.n_virtual
    n_mb = n_microbatches or max(plan.n_microbatches, n)
    actions = make_schedule(schedule or plan.schedule, n, n_mb, v)
    fwd, bwd = zip(*(_stage_times(stage) for stage in plan.stages))
    timeline = simulate(actions, [t / n_mb for t in fwd], [t / n_mb for t in bwd])
    suffix = str(path).rsplit(".", 1)[-1].lower() if path is not None else ""
    if suffix == "json":
        Path(path).write_text(to_chrome_trace(timeline))
    elif suffix in ("png", "svg"):
        _timeline_matplotlib(plan, timeline, path, schedule or plan.schedule, n_mb)
    elif path is not None:
        Path(path).write_text("\n".join(format_schedule(actions)) + "\n" + str(timeline) + "\n")
    return timeline


def _stage_times(stage) -> tuple[float, float]:
    """Forward and backward seconds of a stage on the example batch, from its nodes' costs."""
    costs = [n.meta[COST] for n in stage.module.graph.nodes if COST in n.meta]
    if costs:
        return sum(c.forward_time_s for c in costs), sum(c.backward_time_s for c in costs)
    return stage.cost.time_s / 3, 2 * stage.cost.time_s / 3   # backward ~ twice the forward


def _timeline_matplotlib(plan, timeline, path, schedule: str, n_microbatches: int) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(timeline.spans)))
    cmap = plt.get_cmap("tab10")
    for s, spans in enumerate(timeline.spans):
        for sp in spans:
            color = cmap(sp.action.microbatch % 10)
            ax.barh(s, (sp.end_s - sp.start_s) * 1e3, left=sp.start_s * 1e3, color=color,
                    alpha=1.0 if sp.action.kind == "F" else 0.55, edgecolor="black", lw=0.5,
                    hatch=None if sp.action.kind == "F" else "//")
            label = str(sp.action) if sp.action.stage == s else f"{sp.action}.{sp.action.stage}"
            ax.text((sp.start_s + sp.end_s) / 2 * 1e3, s, label, ha="center", va="center", fontsize=7)
    rows = [f"stage {s}" if plan.n_virtual == 1 else f"pp rank {s}" for s in range(len(timeline.spans))]
    ax.set(yticks=range(len(timeline.spans)), yticklabels=rows,
           xlabel="ms", title=f"{schedule}, {n_microbatches} micro-batches: step {format_seconds(timeline.total_s)}, "
                              f"bubble {max(timeline.bubble_fraction):.0%} (F solid, B hatched)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
