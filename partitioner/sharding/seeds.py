"""Seeds of tensor-parallel regions: the parameters a graph multiplies its activations by, found through
the ops that only move a parameter's elements (``t``, ``transpose``, ``permute``, ``index``), with
the dim of each that holds output features (experts, vocabulary rows, output channels).

Reads a captured graph's nodes and fake values; writes nothing. ``regions`` grows a region from
each group of seeds that multiply the same input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from passes._util import node_value
from .rule_table import _shape, op_name
from .rules_compute import subscripts

__all__ = ["MATMULS", "seed_input"]

aten = torch.ops.aten
MATMULS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default)
_CONVS = (aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
_GROUPED_MM = "transformers::grouped_mm_fallback"
# ops that only move a parameter's elements: a weight reached through them is still that parameter
_PARAM_VIEWS = (aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default, aten.index.Tensor,
                aten._to_copy.default, aten.to.dtype, aten.alias.default, aten.detach.default,
                aten.contiguous.default, aten.clone.default)



@dataclass(frozen=True)
class _Seed:
    node: torch.fx.Node       # the matmul, einsum, convolution or embedding (named in the report)
    param: torch.fx.Node      # the get_attr it multiplies by
    dim: int                  # the parameter's dim of output features (experts, vocabulary rows)
    kind: str                 # "column" | "expert" | "conv" | "vocab"
    input: torch.fx.Node      # the replicated activation it multiplies by (ids of an embedding)

    @property
    def name(self) -> str:
        return self.node.name


def _vocab_seed(node: torch.fx.Node, n: int):
    """An untied embedding table split by rows (Megatron's VocabParallelEmbedding), or why it stays whole."""
    w, ids = node.args[:2]
    val = node_value(w)
    if w.op != "get_attr" or not isinstance(val, torch.Tensor) or val.dim() != 2:
        return None, "embedding: its table is not a 2-D parameter: replicated"
    if not _is_input(ids):
        return None, "embedding: its ids are computed in the graph (positions, buckets), not token ids: replicated"
    if val.shape[0] % n:
        return None, f"embedding: vocabulary size {val.shape[0]} of {w.target} is not divisible by n = {n}: replicated"
    return _Seed(node, w, 0, "vocab", ids), None


def _is_input(node: torch.fx.Node) -> bool:
    """A graph input, possibly reshaped (GPT-2 views ``input_ids``)."""
    while node.op == "call_function" and node.target in (aten.view.default, aten.reshape.default,
                                                         aten._unsafe_view.default, aten.flatten.using_ints):
        node = node.args[0]
    return node.op == "placeholder"


def _param_chain(node) -> tuple[torch.fx.Node, list] | None:
    """``(parameter, [ops from it to node])`` when ``node`` only moves a parameter's elements; else None."""
    chain = []
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _PARAM_VIEWS:
        chain.append(node)
        node = node.args[0]
    if isinstance(node, torch.fx.Node) and node.op == "get_attr" and isinstance(node_value(node), torch.Tensor):
        return node, chain[::-1]
    return None


def _param_dim(chain: list, dim: int) -> int | None:
    """The parameter dim that dim ``dim`` of the chain's last value comes from (None: an indexed dim)."""
    for node in reversed(chain):
        nd = len(_shape(node))
        if node.target in (aten.t.default, aten.numpy_T.default):
            dim = nd - 1 - dim
        elif node.target == aten.transpose.int:
            d0, d1 = node.args[1] % nd, node.args[2] % nd
            dim = d1 if dim == d0 else d0 if dim == d1 else dim
        elif node.target == aten.permute.default:
            dim = node.args[1][dim] % nd
        elif node.target == aten.index.Tensor:
            used = [k for k, i in enumerate(node.args[1]) if i is not None]
            if used != list(range(len(used))):
                return None
            idx_nd = max(len(_shape(node.args[1][k])) for k in used)
            if dim < idx_nd:
                return None
            dim = dim - idx_nd + len(used)
    return dim


def _seed_of(node: torch.fx.Node) -> _Seed | None:
    """The parameter a matmul-like node multiplies by, and its dim of output features."""
    if node.op != "call_function":
        return None
    target = node.target
    if target == aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
        return None
    candidates = []                 # (weight operand, its dim of output features, kind, the other operand)
    if target == aten.linear.default:
        candidates = [(node.args[1], 0, "column", node.args[0])]
    elif target == aten.addmm.default:
        candidates = [(node.args[2], 1, "column", node.args[1])]
    elif target in (aten.mm.default, aten.matmul.default, aten.bmm.default):
        a, b = node.args[:2]
        if len(_shape(a)) >= 2 and len(_shape(b)) >= 2:
            candidates = [(b, len(_shape(b)) - 1, "column", a), (a, len(_shape(a)) - 2, "column", b)]
    elif op_name(target) == _GROUPED_MM:
        candidates = [(node.args[1], 2, "column", node.args[0])]
    elif target in _CONVS:
        candidates = [(node.args[1], 0, "conv", node.args[0])]
    for operand, dim, kind, x in candidates:
        found = _param_chain(operand)
        if found is None or _param_chain(x) is not None:
            continue
        param, chain = found
        pdim = _param_dim(chain, dim)
        if pdim is not None and node_value(param).dim() >= 2:
            return _Seed(node, param, pdim, kind, x)
    if target in (aten.einsum.default, aten.bmm.default, aten.matmul.default):
        expert = _expert_weight(node)
        if expert is not None:
            w, d = expert
            return _Seed(node, w, d, "expert", next(a for a in subscripts(node)[0] if a is not w))
    return None


def _expert_weight(node: torch.fx.Node):
    """``(parameter, dim)``: a >= 3-D parameter operand of an einsum/bmm and its batch dim (kept in the output,
    not one of its two matrix dims), e.g. the experts dim of MoE's ``w_in [E, d, f]``; None otherwise."""
    parsed = subscripts(node)
    if parsed is None:
        return None
    for w, sub in zip(*parsed[:2]):
        val = node_value(w)
        if w.op == "get_attr" and isinstance(val, torch.Tensor) and val.dim() >= 3:
            for d, letter in enumerate(sub[:-2]):
                if letter in parsed[2] and val.shape[d] > 1:
                    return w, d
    return None


def seed_input(seed: torch.fx.Node) -> torch.fx.Node:
    """The replicated activation a seed multiplies by its (split) parameter (an embedding: its ids)."""
    if seed.target == aten.embedding.default:
        return seed.args[1]
    return _seed_of(seed).input


def _seed_groups(gm) -> list[list[_Seed]]:
    """Seeds grouped by their input (q, k, v of one attention; gate and up of one MLP), in graph order;
    expert and convolution seeds group apart from column ones."""
    groups: dict = {}
    for node in gm.graph.nodes:
        seed = _seed_of(node)
        if seed is not None:
            groups.setdefault((seed.input, seed.kind), []).append(seed)
    return list(groups.values())
