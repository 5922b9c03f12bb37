"""Small helpers shared by every pass: reading fake values, sizes, and tables.

Reads ``node.meta["val"]`` (export/AOT), ``node.meta["example_value"]`` (Dynamo)
or ``node.meta["tensor_meta"]`` (shape propagation); writes nothing.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Sequence

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_map

from ._keys import EXAMPLE_VAL

__all__ = ["node_value", "hint", "is_symbolic", "module_path", "module_paths", "block_path", "written_bases",
           "copy_for_writers", "tensors_of", "tensor_bytes", "fetch_attr", "flatten_inputs", "format_bytes",
           "format_count", "format_seconds", "table"]


def node_value(node: torch.fx.Node) -> Any:
    """The value a node produces on the example batch, from whichever dialect captured it (None if unknown).

    A graph captured with symbolic batch or sequence sizes carries symbolic fakes; this returns
    them at the example's sizes (meta tensors with the sizes and strides the example had, plain
    ints for SymInts), so every cost and shape reads the example. The graph's own ``val`` is not
    changed; the example value is cached under ``fxpart.example_val``, where a rewrite that
    changes a value's size (a tensor-parallel shard) records the new one.
    """
    cached = node.meta.get(EXAMPLE_VAL)
    if cached is not None:
        return cached
    val = _raw_value(node)
    if val is None or not is_symbolic(val):
        return val
    cached = node.meta[EXAMPLE_VAL] = _at_example(val)
    return cached


def _raw_value(node: torch.fx.Node) -> Any:
    for key in ("val", "example_value"):
        if key in node.meta:
            return node.meta[key]
    return node.meta.get("tensor_meta")


def hint(x: Any) -> Any:
    """A SymInt/SymFloat/SymBool at its example value (the value it had when captured); others unchanged."""
    for kind, cast in ((torch.SymInt, int), (torch.SymFloat, float), (torch.SymBool, bool)):
        if isinstance(x, kind):
            value = x.node.hint
            if value is None:
                value = x.node.shape_env.size_hint(x.node.expr)
            return cast(value)
    return x


def is_symbolic(value: Any) -> bool:
    """Whether a value (or any tensor size or stride inside it) is symbolic."""
    for v in tree_flatten(value)[0]:
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return True
        if isinstance(v, torch.Tensor) and not all(isinstance(d, int) for d in (*v.shape, *_strides(v))):
            return True
    return False


def _strides(t: torch.Tensor) -> tuple:
    try:
        return tuple(t.stride())
    except RuntimeError:          # sparse and other layouts without strides
        return ()


def _at_example(value: Any) -> Any:
    def concrete(v):
        if isinstance(v, torch.Tensor) and is_symbolic(v):
            sizes = [hint(d) for d in v.shape]
            strides = [hint(d) for d in _strides(v)] or None
            if strides is None:
                return torch.empty(sizes, dtype=v.dtype, device="meta")
            return torch.empty_strided(sizes, strides, dtype=v.dtype, device="meta")
        return hint(v)
    return tree_map(concrete, value)


def module_paths(node: torch.fx.Node) -> list[str]:
    """Every module enclosing the code that made ``node``, outermost first, as dotted paths, any dialect
    (export: ``blocks.0.fc``; Dynamo: ``L['self'].blocks[0].fc``); none for code outside submodules."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) else str(value)
        if str(key).startswith("_empty_nn_module_stack") or path.startswith("_empty_nn_module_stack"):
            continue
        path = re.sub(r"^L\['[^']*'\]\.?", "", path)
        path = re.sub(r"\[(\d+)\]|\['([^']*)'\]", lambda m: "." + (m.group(1) or m.group(2)), path)
        path = path.replace("_modules.", "").strip(".")
        if path:
            out.append(path)
    return out


def module_path(node: torch.fx.Node) -> str:
    """The innermost module of the code that made ``node`` (``transformer.h.0.attn``); "" outside any."""
    paths = module_paths(node)
    return paths[-1] if paths else ""


def block_path(node: torch.fx.Node) -> str | None:
    """The block holding ``node``: its module path up to the first index (``transformer.h.3`` of a
    ``ModuleList``/``Sequential``); None outside such blocks."""
    match = re.match(r"^(.*?(?:^|\.)\d+)(?:\.|$)", module_path(node))
    return match.group(1) if match else None


def written_bases(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes whose values ``node`` writes into (in place or ``out=``), followed back through views."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return []
    written = []
    for i, arg in enumerate(schema.arguments):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.fx.Node):
            while getattr(value.target, "is_view", False) and value.args and isinstance(value.args[0], torch.fx.Node):
                value = value.args[0]
            written.append(value)
    return written


def copy_for_writers(graph: torch.fx.Graph, node: torch.fx.Node, *, after: torch.fx.Node) -> torch.fx.Node:
    """Insert ``clone(node)`` after ``after`` and route every user of ``node`` through it (so in-place writes
    land on the copy); returns the copy."""
    with graph.inserting_after(after):
        copy = graph.call_function(torch.ops.aten.clone.default, (node,))
    copy.meta = dict(node.meta)
    node.replace_all_uses_with(copy, delete_user_cb=lambda user: user is not copy)
    return copy


def tensors_of(value: Any) -> list[torch.Tensor]:
    """Every tensor inside a (possibly nested) value."""
    return [v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements a tensor addresses (not of its whole storage), at the example's sizes."""
    return hint(t.numel()) * t.element_size()


def fetch_attr(module: torch.nn.Module, target: str) -> Any:
    """The object at a dotted ``get_attr`` target ("blocks.0.fc.weight")."""
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def flatten_inputs(in_spec: Any, args: tuple, kwargs: dict, *, names: Sequence[str] | None = None) -> list:
    """Flat graph inputs from ``(args, kwargs)``: by the graph's pytree ``in_spec`` (export), else
    positionally, keyword inputs taken by placeholder ``names`` when given."""
    if in_spec is not None:
        import torch.fx._pytree as fx_pytree
        return list(fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), in_spec))
    if kwargs:
        if names is None:
            raise TypeError("this graph takes positional inputs only")
        return list(args) + [kwargs[name] for name in names[len(args):]]
    return list(args)


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; binary units as torch.cuda.memory_summary prints them."""
    if n < 1024:
        return f"{int(n)} B"
    exp = min(int(math.log(abs(n), 1024)), 5)
    return f"{n / 1024 ** exp:.2f} {' KMGTP'[exp]}iB"


def format_count(n: float, unit: str = "") -> str:
    """1.5e9 -> '1.50 G'; decimal prefixes for FLOPs and parameter counts."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:g} {unit}".rstrip()


def format_seconds(s: float) -> str:
    """Seconds in the most readable unit."""
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if s >= scale:
            return f"{s / scale:.2f} {unit}"
    return f"{s * 1e9:.0f} ns"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, align: str | None = None) -> str:
    """A plain-text table; ``align`` has one of 'l'/'r' per column (numbers right by default)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def fmt(cells):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align))

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
