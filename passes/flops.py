"""FLOP rules per ATen op, with ``torch.utils.flop_counter``'s conventions.

Reads the op and its (fake) arguments; writes nothing. The formulas of
``torch.utils.flop_counter.flop_registry`` are reused as they are; this table adds
what it lacks:

* attention kernels it does not know (``_scaled_dot_product_flash_attention_for_cpu``
  and its backward: ``FlopCounterMode`` counts 0 for attention on CPU in torch 2.13),
* pre-decomposition ops seen in export graphs (``aten.linear``, ``aten.matmul``,
  ``aten.scaled_dot_product_attention``), which dispatch never reaches but a static
  reading of a graph does,
* custom ops that carry matmuls, keyed by their name (no import of their library):
  Hugging Face's MoE experts on CPU, ``transformers::grouped_mm_fallback`` (each row of the
  input times its expert's matrix) and its backward.

A multiply-add is 2 FLOPs; only matmul, convolution and attention families count,
as ``FlopCounterMode`` does. Every other op is 0 FLOPs by that convention.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils import flop_counter as _fc
from torch.utils._pytree import tree_map

__all__ = ["flop_rule", "count_flops", "has_flop_rule"]

aten = torch.ops.aten

_RULES: dict[Any, Callable[..., int]] = {}


def flop_rule(*targets):
    """Register ``fn(*arg_shapes, out_shape=...) -> int`` for the given op packets or overloads, or custom
    ops by name (``"namespace::op"``: the op's library need not be imported)."""
    def register(fn):
        for target in targets:
            _RULES[target] = fn
        return fn
    return register


def _shape(x):
    return x.shape if isinstance(x, torch.Tensor) else x


def _lookup(func):
    """Our rule (takes shapes) or the registry's (takes tensors), or None."""
    packet = getattr(func, "overloadpacket", func)
    ours = _RULES.get(func) or _RULES.get(packet)
    if ours is None and isinstance(func, torch._ops.OpOverload):
        ours = _RULES.get(func.name())
    if ours is not None:
        return lambda args, kwargs, out: ours(*tree_map(_shape, args), out_shape=_shape(out),
                                              **tree_map(_shape, kwargs))
    theirs = _fc.flop_registry.get(packet)
    if theirs is not None:
        return lambda args, kwargs, out: theirs(*args, out_val=out, **kwargs)
    return None


def has_flop_rule(func) -> bool:
    """True when ``func`` is a matmul, convolution or attention op we can count."""
    return _lookup(func) is not None


def count_flops(func, args: tuple, kwargs: dict, out: Any) -> int:
    """FLOPs of one call of ``func`` on these (fake or real) arguments; 0 outside the counted families."""
    rule = _lookup(func)
    return 0 if rule is None else int(rule(args, kwargs, out))


# -- attention on CPU: the same formulas FlopCounterMode uses for the CUDA kernels ------

@flop_rule(aten._scaled_dot_product_flash_attention_for_cpu, aten.scaled_dot_product_attention,
           aten._scaled_dot_product_attention_math)
def _sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(query, key, value)


@flop_rule(aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_backward_flop_count(grad_out, query, key, value)


# -- ops that decompose before dispatch but appear in export graphs -----------------------

@flop_rule(aten.linear)
def _linear(x, weight, bias=None, *, out_shape=None) -> int:
    # x [..., k] @ weight.T [k, n]: an (m x k) @ (k x n) matmul with m = prod(batch dims)
    m = 1
    for d in x[:-1]:
        m *= d
    return _fc.mm_flop((m, x[-1]), (weight[1], weight[0]))


@flop_rule(aten.matmul)
def _matmul(a, b, *, out_shape=None) -> int:
    # every output element is a dot product of length k = a[-1] (broadcast batch dims included)
    n_out = 1
    for d in out_shape:
        n_out *= d
    return 2 * n_out * a[-1]


# -- custom ops that carry matmuls ----------------------------------------------------------------

@flop_rule("transformers::grouped_mm_fallback")
def _grouped_mm(x, weight, offs, *, out_shape=None) -> int:
    # x [S, in]: each row times its expert's weight[e] [in, out] (rows grouped by ``offs``): S (in x out) MACs
    return _fc.mm_flop((x[0], x[1]), (weight[1], weight[2]))


@flop_rule("transformers::grouped_mm_fallback_backward")
def _grouped_mm_backward(x, weight, offs, grad_out, *, out_shape=None) -> int:
    # grad_input = grad_out @ weight[e].T and grad_weight[e] = x.T @ grad_out: two matmuls of the forward's size
    return 2 * _fc.mm_flop((x[0], x[1]), (weight[1], weight[2]))
