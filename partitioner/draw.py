"""Drawings of plans: DOT text always (pydot), SVG/PNG when Graphviz's ``dot`` is installed.

Reads a ``Plan`` (its stage GraphModules and the costs in ``node.meta["fxpart.cost"]``);
writes a file. Nodes are grouped by module (cut to ``depth`` path components) so a
12-layer model reads per block; stages are clusters; edges that cross a cut carry their
bytes.
"""
from __future__ import annotations

import shutil
from collections import defaultdict

import pydot
import torch

from passes._keys import COST
from passes._util import format_bytes, format_count, format_seconds, node_value, tensor_bytes, tensors_of

__all__ = ["plan_dot", "draw_plan", "render"]

_COLORS = ["#dbe9f6", "#fde2c8", "#d9f0d3", "#f3d1e6", "#fff2b3", "#d0e0e3", "#e6d5f5", "#f9d6d5"]


def _group(node: torch.fx.Node, depth: int) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return ".".join(path.split(".")[:depth]) or "(top)"
    return "(top)"


def plan_dot(plan, *, depth: int = 3) -> pydot.Dot:
    """A DOT graph of the plan: one cluster per stage, one box per module group."""
    dot = pydot.Dot("plan", graph_type="digraph", rankdir="TB", fontname="Helvetica", compound="true",
                    label=f"{plan.model}: {len(plan.stages)} {plan.strategy} stages on "
                          f"{getattr(plan.device, 'name', plan.device)}, balance {plan.balance_ratio:.3f} x lower bound",
                    labelloc="t")
    producer: dict[str, str] = {}   # value name -> group box id
    edges: dict[tuple[str, str], int] = defaultdict(int)
    for stage in plan.stages:
        color = _COLORS[stage.index % len(_COLORS)]
        c = stage.cost
        cluster = pydot.Cluster(f"stage{stage.index}", style="filled", fillcolor=color, fontname="Helvetica",
                                label=f"stage {stage.index}: {format_count(c.flops + c.backward_flops, 'FLOP')}, "
                                      f"{format_seconds(c.time_s)}, {format_bytes(c.memory_bytes)}")
        groups: dict[str, list] = {}
        for node in stage.module.graph.nodes:
            if node.op in ("call_function", "call_module"):
                groups.setdefault(_group(node, depth), []).append(node)
        for name, nodes in groups.items():
            box = f"s{stage.index}_{name}".replace(".", "_").replace("(", "").replace(")", "")
            flops = sum(n.meta[COST].flops for n in nodes if COST in n.meta)
            cluster.add_node(pydot.Node(box, label=f"{name}\\n{len(nodes)} ops, {format_count(flops, 'FLOP')}",
                                        shape="box", style="filled", fillcolor="white", fontname="Helvetica"))
            for node in nodes:
                producer[node.name] = box
                for arg in node.all_input_nodes:
                    src = producer.get(arg.name)
                    if src is not None and src != box:
                        edges[(src, box)] += 0
        for node in stage.module.graph.nodes:   # values received from an earlier stage
            if node.op == "placeholder" and node.name in producer:
                users = [producer[u.name] for u in node.users if u.name in producer and u.op != "output"]
                for dst in set(users):
                    if producer[node.name] != dst:
                        edges[(producer[node.name], dst)] += _bytes(node)
        dot.add_subgraph(cluster)
    for (src, dst), nbytes in edges.items():
        attrs = {"label": format_bytes(nbytes), "color": "#c0392b", "penwidth": "2",
                 "fontname": "Helvetica"} if nbytes else {}
        dot.add_edge(pydot.Edge(src, dst, **attrs))
    dot.add_node(pydot.Node("legend", shape="note", fontname="Helvetica",
                            label="box: module group (ops, forward FLOPs)\\ncluster: stage (fwd+bwd FLOPs, "
                                  "time, memory)\\nred edge: tensors crossing a cut (bytes per batch)"))
    return dot


def _bytes(node: torch.fx.Node) -> int:
    return sum(tensor_bytes(t) for t in tensors_of(node_value(node)))


def render(dot: pydot.Dot, fmt: str) -> bytes:
    """SVG or PNG bytes from Graphviz's ``dot``; RuntimeError when Graphviz is not installed."""
    if shutil.which("dot") is None:
        raise RuntimeError(f"writing {fmt} needs Graphviz's `dot` (apt-get install graphviz); .dot files work without it")
    return dot.create(format=fmt)


def draw_plan(plan, path: str, *, depth: int = 3) -> str:
    """Write the plan to ``path`` as .dot, .svg or .png (by suffix); returns the path."""
    dot = plan_dot(plan, depth=depth)
    suffix = str(path).rsplit(".", 1)[-1].lower()
    if suffix == "dot":
        data = dot.to_string().encode()
    elif suffix in ("svg", "png"):
        data = render(dot, suffix)
    else:
        raise ValueError(f"cannot draw to {path!r}: use a .dot, .svg or .png suffix")
    with open(path, "wb") as f:
        f.write(data)
    return str(path)
