"""Drawings of a captured (optionally costed) graph; the DOT helpers every drawing shares.

Reads a ``GraphModule``: ``nn_module_stack`` to group nodes by module, ``node.meta[COST]``
(``passes.estimate``) for costs. Writes files: DOT text always (pydot), SVG/PNG when
Graphviz's ``dot`` is installed. ``partitioner.draw`` draws plans with the same helpers.

>>> from passes import capture, estimate
>>> from passes.zoo import tiny_gpt
>>> model, inputs = tiny_gpt(n_layers=2)
>>> gm = capture(model, inputs)
>>> _ = estimate(gm, inputs)
>>> drawing = draw_graph(gm, None, depth=2)      # one box per block; drawing.save("gpt.svg")
>>> "cluster_blocks" in drawing.to_string()
True
"""
from __future__ import annotations

import re
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pydot
import torch
import torch.fx

from ._keys import COST
from ._util import format_bytes, format_count, format_seconds, module_path, node_value, tensor_bytes, tensors_of

__all__ = ["draw_graph", "graph_dot", "Drawing", "module_path", "module_group", "render", "write_dot", "value_bytes"]

FONT = "Helvetica"
_HOT = (0xF4, 0xA2, 0x61)    # fill of the node that takes the most time; cooler nodes fade to white


def module_group(node: torch.fx.Node, depth: int | None) -> str:
    """The module path cut to ``depth`` components ("(top)" for code outside any submodule)."""
    path = [p for p in module_path(node).split(".") if p]
    return ".".join(path if depth is None else path[:depth]) or "(top)"


def value_bytes(node: torch.fx.Node) -> int:
    """Bytes of every tensor a node produces (from its fake value)."""
    return sum(tensor_bytes(t) for t in tensors_of(node_value(node)))


def render(dot: pydot.Dot, fmt: str) -> bytes:
    """SVG or PNG bytes from Graphviz's ``dot``; RuntimeError when Graphviz is not installed."""
    if shutil.which("dot") is None:
        raise RuntimeError(f"writing {fmt} needs Graphviz's `dot` (apt-get install graphviz); .dot files work without it")
    return dot.create(format=fmt)


def write_dot(dot: pydot.Dot, path: str | Path) -> str:
    """Write ``dot`` to ``path`` as .dot, .svg or .png (by suffix); returns the path."""
    suffix = str(path).rsplit(".", 1)[-1].lower()
    if suffix == "dot":
        data = dot.to_string().encode()
    elif suffix in ("svg", "png"):
        data = render(dot, suffix)
    else:
        raise ValueError(f"cannot draw to {str(path)!r}: use a .dot, .svg or .png suffix")
    Path(path).write_bytes(data)
    return str(path)


@dataclass
class Drawing:
    """A DOT graph that saves itself (``save``) and displays inline in Jupyter (``_repr_svg_``)."""
    dot: pydot.Dot
    path: str | None = None

    def save(self, path: str | Path) -> str:
        self.path = write_dot(self.dot, path)
        return self.path

    def to_string(self) -> str:
        return self.dot.to_string()

    def _repr_svg_(self):
        try:
            return render(self.dot, "svg").decode()
        except RuntimeError:
            return None

    def __str__(self) -> str:
        return self.path or self.to_string()


@dataclass
class _Item:
    """One drawn box: a single node, or every node of a module collapsed at the drawing's depth."""
    ident: str
    title: str
    clusters: tuple[str, ...]        # enclosing module prefixes, outermost first
    nodes: list = field(default_factory=list)
    collapsed: bool = False


def draw_graph(gm: torch.fx.GraphModule, path: str | Path | None = None, *, depth: int | None = None,
               costs: bool = True) -> Drawing:
    """Draw a captured graph, modules as nested clusters, collapsed to one box each below ``depth``.

    Args:
        gm: a graph from ``capture``, a Dynamo backend or ``symbolic_trace``.
        path: where to write (.dot, .svg, .png by suffix); None writes nothing.
        depth: module path components kept (2: "blocks.0" is one box); None draws every node.
        costs: label boxes with the costs ``passes.estimate`` left in ``node.meta["fxpart.cost"]``
            (FLOPs forward + backward, output bytes, time) and shade them by time.

    Returns:
        A ``Drawing`` (``.save(path)``, inline SVG in Jupyter).

    Raises:
        ValueError: a suffix other than .dot/.svg/.png. RuntimeError: SVG/PNG without Graphviz.
    """
    drawing = Drawing(graph_dot(gm, depth=depth, costs=costs))
    if path is not None:
        drawing.save(path)
    return drawing


def graph_dot(gm: torch.fx.GraphModule, *, depth: int | None = None, costs: bool = True) -> pydot.Dot:
    """The ``pydot.Dot`` that ``draw_graph`` writes."""
    if depth is not None and depth < 0:
        raise ValueError(f"depth must be None or >= 0, got {depth}")
    items, item_of = _items(gm, depth)
    total_s = sum(_cost(n, "time_s") for item in items.values() for n in item.nodes) if costs else 0.0
    name = gm.meta.get("fxpart.capture", {}).get("model", type(gm).__name__)
    dot = pydot.Dot("graph", graph_type="digraph", rankdir="TB", fontname=FONT, labelloc="t", newrank="true",
                    label=f"{name}: {len(gm.graph.nodes)} nodes" + (f", depth {depth}" if depth is not None else "")
                    + (f", {_cost_text(list(_all_nodes(items)))}" if costs and total_s else ""))
    clusters: dict[tuple, pydot.Cluster] = {}
    for item in items.values():
        parent = _cluster(dot, clusters, item.clusters, items, costs)
        parent.add_node(_box(item, costs, total_s))
    for (src, dst), values in _edges(gm, item_of).items():
        nbytes = sum(value_bytes(n) for n in values)
        label = format_bytes(nbytes) if costs and depth is not None and nbytes else ""
        dot.add_edge(pydot.Edge(src, dst, label=label, fontname=FONT, fontsize="9", color="#555555"))
    dot.add_node(pydot.Node("legend", shape="note", fontname=FONT, fontsize="10", label=_legend(depth, costs)))
    return dot


def _all_nodes(items: dict) -> list:
    return [n for item in items.values() for n in item.nodes]


def _items(gm: torch.fx.GraphModule, depth: int | None) -> tuple[dict[str, _Item], dict[str, str]]:
    items: dict[str, _Item] = {}
    item_of: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" or _is_state_input(node) or node.target == "_guards_fn":
            continue
        path = [p for p in module_path(node).split(".") if p] if node.op not in ("placeholder", "output") else []
        if depth is not None and len(path) >= depth and (path or node.op not in ("placeholder", "output")):
            prefix = ".".join(path[:depth]) or "(model)"
            key = "m_" + re.sub(r"\W", "_", prefix)
            item = items.setdefault(key, _Item(key, prefix, _prefixes(path[:max(depth - 1, 0)]), collapsed=True))
        else:
            key = "n_" + node.name
            item = items.setdefault(key, _Item(key, node.name, _prefixes(path)))
        item.nodes.append(node)
        item_of[node.name] = key
    return items, item_of


def _prefixes(path: list[str]) -> tuple[str, ...]:
    return tuple(".".join(path[:i]) for i in range(1, len(path) + 1))


def _is_state_input(node: torch.fx.Node) -> bool:
    """A Dynamo placeholder that is a parameter or buffer (drawn as nothing, like get_attr)."""
    return node.op == "placeholder" and ("_parameters_" in node.name or "_buffers_" in node.name)


def _cluster(dot, clusters: dict, prefixes: tuple[str, ...], items, costs: bool):
    parent = dot
    for i, prefix in enumerate(prefixes):
        key = prefixes[:i + 1]
        if key not in clusters:
            inside = [n for item in items.values() if item.clusters[:i + 1] == key for n in item.nodes]
            label = prefix + (f"\n{_cost_text(inside)}" if costs and _has_costs(inside) else "")
            cluster = pydot.Cluster(re.sub(r"\W", "_", prefix), label=label, fontname=FONT, fontsize="11",
                                    style="rounded,filled", fillcolor=("#f4f6fa", "#e8ecf4")[i % 2], color="#8899aa")
            parent.add_subgraph(cluster)
            clusters[key] = cluster
        parent = clusters[key]
    return parent


def _box(item: _Item, costs: bool, total_s: float) -> pydot.Node:
    node = item.nodes[0]
    if item.collapsed:
        lines = [item.title, f"{len(item.nodes)} ops"]
        shape = "box3d"
    elif node.op in ("placeholder", "output"):
        val = tensors_of(node_value(node))
        lines = [node.name if node.op == "output" else f"input {node.name}"] + \
            ([str(tuple(val[0].shape))] if val else [])
        shape = "ellipse"
    else:
        target = getattr(node.target, "__name__", str(node.target))
        lines = [node.name, target]
        shape = "box"
    fill = "white"
    if costs and _has_costs(item.nodes) and node.op not in ("placeholder", "output"):
        lines.append(_cost_text(item.nodes))
        share = sum(_cost(n, "time_s") for n in item.nodes) / total_s if total_s else 0.0
        fill = "#" + "".join(f"{round(255 - (255 - c) * min(1.0, share * 4)):02x}" for c in _HOT)
    return pydot.Node(item.ident, label="\n".join(lines), shape=shape, style="filled", fillcolor=fill,
                      fontname=FONT, fontsize="10")


def _edges(gm: torch.fx.GraphModule, item_of: dict[str, str]) -> dict[tuple[str, str], set]:
    edges: dict[tuple[str, str], set] = defaultdict(set)
    for node in gm.graph.nodes:
        dst = item_of.get(node.name)
        for arg in node.all_input_nodes:
            src = item_of.get(arg.name)
            if dst and src and src != dst:
                edges[(src, dst)].add(arg)
    return edges


def _cost(node: torch.fx.Node, attr: str) -> float:
    cost = node.meta.get(COST)
    return getattr(cost, attr) if cost is not None else 0


def _has_costs(nodes) -> bool:
    return any(COST in n.meta for n in nodes)


def _cost_text(nodes) -> str:
    flops = sum(_cost(n, "flops") + _cost(n, "backward_flops") for n in nodes)
    out = sum(_cost(n, "output_bytes") for n in nodes)
    return f"{format_count(flops, 'FLOP')}, {format_bytes(out)}, {format_seconds(sum(_cost(n, 'time_s') for n in nodes))}"


def _legend(depth: int | None, costs: bool) -> str:
    lines = ["cluster: module (its nodes' totals)",
             f"3-D box: a module at depth {depth}, its ops collapsed" if depth is not None else "box: one graph node",
             "ellipse: graph input / output"]
    if costs:
        lines += ["costs: FLOPs (fwd + bwd), bytes allocated, time", "shade: share of the total time",
                  "edge label: bytes flowing between boxes" if depth is not None else ""]
    return "\n".join(line for line in lines if line)
