"""The sharding rule table: rules keyed by ATen overload (or a custom op's name), and the helpers rules share.

``rules`` (elementwise, shape and movement ops) and ``rules_compute`` (matmuls, attention,
convolutions, embeddings) fill the table with ``@rule(...)``; ``rule_for`` finds a node's rule.
Reads fake values through ``passes._util.node_value``; writes nothing.
"""
from __future__ import annotations

import torch

from passes._util import node_value
from .layout import NoRule, Shard, is_static, narrows

__all__ = ["rule", "rule_for", "op_name", "sym_shape", "POINTWISE"]

POINTWISE = "<pointwise>"       # the rule of ops tagged pointwise that have none of their own


def op_name(target) -> str:
    """``"aten::mm"``, ``"transformers::grouped_mm_fallback"``: the key of a custom op's rules."""
    return target.name() if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


_RULES: dict = {}


def rule(*ops):
    """Register a rule for ATen overloads (or custom ops by name: ``"namespace::op"``)."""
    def register(fn):
        for op in ops:
            _RULES[op] = fn
        return fn
    return register


def rule_for(target):
    """The rule of ``target``: by overload, by custom-op name, elementwise by its ``pointwise`` tag; else None."""
    found = _RULES.get(target)
    if found is None and isinstance(target, torch._ops.OpOverload):
        found = _RULES.get(target.name())
        if found is None and torch.Tag.pointwise in target.tags:
            found = _RULES.get(POINTWISE)
    return found


def _shape(node) -> tuple:
    return tuple(node_value(node).shape)


def sym_shape(node) -> tuple:
    """The shape a node's value has at every size: ``SymInt`` where the capture left a dim symbolic."""
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else _shape(node)


def _static_dim(t, node, arg, dim: int, what: str) -> None:
    """Refuse an op that cuts the sharded dim ``dim`` of ``arg`` at positions read at the example's sizes,
    when that dim's size is symbolic (the batch folded into it)."""
    size = sym_shape(arg)[dim]
    if t.lay(arg).folded or not is_static(size):
        raise NoRule(f"{node.name}: {what} the sharded dim of {arg.name}, whose size {size} is symbolic "
                     f"(the pieces would hold at the example's sizes only)")


def _tensor_args(node):
    return [a for a in node.all_input_nodes if isinstance(node_value(a), torch.Tensor)]


def _sharded(t, node, arg) -> Shard:
    s = t.lay(arg)
    if s is not None and not isinstance(s, Shard):
        raise NoRule(f"{node.name}: a multi-output value used directly")
    return s


def _agree(t, node, args, dims) -> Shard | None:
    """The one layout ``args`` (on right-aligned ``dims`` of the output) share: sharded ones narrowed to the
    finest among them, replicated ones that span the dim cut locally. None when none is sharded. A value
    every shard holds whole (``rep == n``) broadcasts like a replicated one."""
    target, size = None, None
    for a, d in zip(args, dims):
        s = _sharded(t, node, a)
        if s is None or (s.whole(t.n) and (d is None or d < 0 or s.dim != d)):
            continue
        if s.dim != d:
            raise NoRule(f"{node.name}: inputs sharded on different dims")
        if target is None or narrows(target.moved(d), s, _shape(a)[d]):
            target, size = s, _shape(a)[d]
        elif not narrows(s, target.moved(d), size):
            raise NoRule(f"{node.name}: inputs split differently ({target} and {s})")
    if target is None:
        return None
    for a, d in zip(args, dims):
        if d is None or d < 0:
            continue
        s = t.lay(a)
        if (s is None and _shape(a)[d] != 1) or (s is not None and s != target.moved(d) and _shape(a)[d] != 1):
            t.want(node, a, target.moved(d))
    return target
