"""Per-op sharding rules: how a layout ``Shard(dim, blocks)`` passes through one ATen op.

A table keyed by ATen overload (``@rule(...)``); each rule takes the trial region and the
node and returns the output's layout (None: replicated), or raises ``_NoRule`` so the
region is dropped whole. Reads fake values (``node.meta["val"]``); writes nothing. The
analysis that grows regions with these rules is ``regions``; a rule's first argument is its ``_Trial``.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx

from passes._util import node_value


__all__ = ["Shard", "rule", "reshape_layout"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Shard:
    """Dim ``dim`` viewed as ``(blocks, n, rest)``; shard r holds ``[:, r, :]``."""
    dim: int
    blocks: int = 1


class _NoRule(Exception):
    """This node cannot keep its input sharded; the message says why."""


def _subscripts(node: torch.fx.Node):
    """``(operands, their subscripts, output subscript)`` of an einsum, bmm or batched matmul (None otherwise)."""
    if node.target == aten.einsum.default:
        eq, operands = node.args[0], list(node.args[1])
        if "..." in eq or not all(isinstance(a, torch.fx.Node) for a in operands):
            return None
        lhs, arrow, out = eq.replace(" ", "").partition("->")
        subs = lhs.split(",")
        if not arrow:
            out = "".join(sorted(c for c in set(lhs) - {","} if lhs.count(c) == 1))
        if any(len(set(x)) != len(x) for x in subs) or len(subs) != len(operands):
            return None             # a repeated letter takes a diagonal
        return operands, subs, out
    if node.target in (aten.bmm.default, aten.matmul.default):
        a, b = node.args[:2]
        na, nb = len(_shape(a)), len(_shape(b))
        if na < 2 or nb < 2:
            return None
        nbatch = max(na, nb) - 2
        batch = "abcdefgh"[:nbatch]
        return [a, b], [batch[nbatch - (na - 2):] + "mk", batch[nbatch - (nb - 2):] + "kn"], batch + "mn"
    return None


# -- rules: (trial, node) -> output layout (None: replicated); raise _NoRule to drop the region ------

_RULES: dict[Callable, Callable] = {}


def rule(*ops):
    def register(fn):
        for op in ops:
            _RULES[op] = fn
        return fn
    return register


def _shape(node) -> tuple:
    return tuple(node_value(node).shape)


def _tensor_args(node):
    return [a for a in node.all_input_nodes if isinstance(node_value(a), torch.Tensor)]


@rule(aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
      aten.alias.default, aten.detach.default, aten.contiguous.default, aten.where.ScalarOther,
      aten.where.ScalarSelf, aten.__and__.Tensor, aten.__or__.Tensor, aten.masked_fill.Scalar,
      aten.masked_fill.Tensor, aten.type_as.default, aten.lift_fresh_copy.default)
def _pointwise(t: "_Trial", node):
    """Elementwise with broadcasting: every sharded input on the same (right-aligned) dim; replicated
    inputs that span that dim are sliced locally."""
    out_nd = len(_shape(node))
    target = None
    for a in _tensor_args(node):
        s = t.lay(a)
        if s is not None:
            if not isinstance(s, Shard):
                raise _NoRule(f"{node.name}: a multi-output value used directly")
            aligned = Shard(s.dim + out_nd - len(_shape(a)), s.blocks)
            if target not in (None, aligned):
                raise _NoRule(f"{node.name}: inputs sharded on different dims {target} and {aligned}")
            target = aligned
    for a in _tensor_args(node):
        if t.lay(a) is None:
            shape = _shape(a)
            d = target.dim - (out_nd - len(shape))
            if d >= 0 and shape[d] != 1:
                t.want(node, a, Shard(d, target.blocks))
    return target


@rule(aten._assert_tensor_metadata.default)
def _no_output(t, node):
    return None


@rule(aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default)
def _fresh(t, node):
    return None


@rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
      aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _reshape(t: "_Trial", node):
    s = t.lay(node.args[0])
    return reshape_layout(_shape(node.args[0]), _shape(node), s, t.n, node)


def reshape_layout(in_shape, out_shape, s: Shard, n: int, node=None) -> Shard:
    """Where a sharded dim lands through a reshape (the flat order of elements is kept)."""
    for in_dims, out_dims in _dim_groups(in_shape, out_shape):
        if s.dim not in in_dims:
            continue
        pos = in_dims.index(s.dim)
        outer = math.prod(in_shape[d] for d in in_dims[:pos])
        inner = math.prod(in_shape[d] for d in in_dims[pos + 1:])
        blocks = outer * s.blocks
        chunk = in_shape[s.dim] // (s.blocks * n) * inner
        for k, d in enumerate(out_dims):
            before = math.prod(out_shape[e] for e in out_dims[:k])
            after = math.prod(out_shape[e] for e in out_dims[k + 1:])
            if blocks % before == 0 and chunk % after == 0 and \
                    out_shape[d] == (blocks // before) * n * (chunk // after) and out_shape[d] > 1:
                return Shard(d, blocks // before)
        name = node.name if node is not None else "reshape"
        raise _NoRule(f"{name}: reshape {list(in_shape)} -> {list(out_shape)} splits the sharded dim "
                      f"(size {in_shape[s.dim]}) into {[out_shape[d] for d in out_dims]}: no part divisible by "
                      f"n = {n}{f' within {s.blocks} blocks' if s.blocks > 1 else ''} (e.g. fewer heads than shards)")
    raise AssertionError(f"dim {s.dim} not found in {in_shape}")


def _dim_groups(a, b) -> list[tuple[list[int], list[int]]]:
    """Pair runs of dims of ``a`` and ``b`` with equal products (trailing size-1 dims join the run)."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        ga, gb, pa, pb = [], [], 1, 1
        if i < len(a):
            pa, i = pa * a[i], i + 1
            ga.append(i - 1)
        if j < len(b):
            pb, j = pb * b[j], j + 1
            gb.append(j - 1)
        while pa != pb:
            if pa < pb:
                pa, i = pa * a[i], i + 1
                ga.append(i - 1)
            else:
                pb, j = pb * b[j], j + 1
                gb.append(j - 1)
        while i < len(a) and a[i] == 1 and not (j < len(b) and b[j] == 1):
            ga.append(i)
            i += 1
        while j < len(b) and b[j] == 1 and not (i < len(a) and a[i] == 1):
            gb.append(j)
            j += 1
        groups.append((ga, gb))
    return groups


@rule(aten.expand.default)
def _expand(t: "_Trial", node):
    s = t.lay(node.args[0])
    d = s.dim + len(_shape(node)) - len(_shape(node.args[0]))
    return Shard(d, s.blocks)


@rule(aten.transpose.int, aten.t.default)
def _transpose(t: "_Trial", node):
    s = t.lay(node.args[0])
    nd = len(_shape(node))
    d0, d1 = (node.args[1] % nd, node.args[2] % nd) if node.target == aten.transpose.int else (0, 1)
    return Shard(d1 if s.dim == d0 else d0 if s.dim == d1 else s.dim, s.blocks)


@rule(aten.permute.default)
def _permute(t: "_Trial", node):
    s = t.lay(node.args[0])
    dims = [d % len(node.args[1]) for d in node.args[1]]
    return Shard(dims.index(s.dim), s.blocks)


@rule(aten.slice.Tensor)
def _slice(t: "_Trial", node):
    s = t.lay(node.args[0])
    shape = _shape(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
    if dim == s.dim and _shape(node) != shape:
        raise _NoRule(f"{node.name}: slices the sharded dim {dim}")
    return s


@rule(aten.select.int)
def _select(t: "_Trial", node):
    s = t.lay(node.args[0])
    dim = node.args[1] % len(_shape(node.args[0]))
    if dim == s.dim:
        raise _NoRule(f"{node.name}: selects along the sharded dim")
    return Shard(s.dim - (dim < s.dim), s.blocks)


@rule(aten.split.Tensor, aten.split_with_sizes.default)
def _split(t: "_Trial", node):
    s = t.lay(node.args[0])
    shape = _shape(node.args[0])
    dim = (node.args[2] if len(node.args) > 2 else 0) % len(shape)
    outs = [tuple(v.shape) for v in node_value(node)]
    if dim != s.dim:
        return tuple(s for _ in outs)
    sizes = [o[dim] for o in outs]
    block = shape[dim] // s.blocks
    if any(z % block for z in sizes):
        exc = _NoRule(f"{node.name}: splits the sharded dim into {sizes}, not along its {s.blocks} block(s)")
        exc.blocks = shape[dim] // math.gcd(*sizes)
        raise exc
    for z in sizes:
        if z % (t.n * (z // block)):
            raise _NoRule(f"{node.name}: split part {z} not divisible by n = {t.n}")
    return tuple(Shard(dim, z // block) for z in sizes)


@rule(operator.getitem)
def _getitem(t: "_Trial", node):
    s = t.lay(node.args[0])
    return s[node.args[1]] if isinstance(s, tuple) else None


@rule(aten.cat.default)
def _cat(t: "_Trial", node):
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(_shape(node))
    target = next(t.lay(a) for a in node.args[0] if t.lay(a) is not None)
    if target.dim == dim:
        raise _NoRule(f"{node.name}: concatenates along the sharded dim")
    for a in node.args[0]:
        if t.lay(a) is None:
            t.want(node, a, target)
        elif t.lay(a) != target:
            raise _NoRule(f"{node.name}: inputs sharded differently")
    return target


@rule(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default)
def _reduce_dims(t: "_Trial", node):
    s = t.lay(node.args[0])
    nd = len(_shape(node.args[0]))
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None or dims == []:
        raise _NoRule(f"{node.name}: reduces every dim, the sharded one included")
    dims = [d % nd for d in ([dims] if isinstance(dims, int) else dims)]
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if s.dim in dims and node.target == aten.sum.dim_IntList:     # each shard's sum is a partial sum
        t.reduce.add(node)
        return None
    if s.dim in dims:
        raise _NoRule(f"{node.name}: reduces over the sharded dim (e.g. a norm over a sharded hidden size)")
    return Shard(s.dim - (0 if keep else sum(d < s.dim for d in dims)), s.blocks)


@rule(aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default)
def _softmax(t: "_Trial", node):
    s = t.lay(node.args[0])
    if node.args[1] % len(_shape(node)) == s.dim:
        raise _NoRule(f"{node.name}: softmax over the sharded dim")
    return s


@rule(aten.layer_norm.default)
def _layer_norm(t: "_Trial", node):
    s = t.lay(node.args[0])
    if s is None or s.dim >= len(_shape(node)) - len(node.args[1]):
        raise _NoRule(f"{node.name}: layer norm over the sharded dim, or a sharded weight")
    return s


@rule(aten.scaled_dot_product_attention.default)
def _sdpa(t: "_Trial", node):
    q, k, v = node.args[:3]
    lays = [t.lay(a) for a in (q, k, v)]
    target = next(s for s in lays if s is not None)
    if target.dim != len(_shape(q)) - 3:
        raise _NoRule(f"{node.name}: attention sharded on dim {target.dim}, not on heads")
    gqa = _shape(q)[-3] != _shape(k)[-3]
    if gqa and target.blocks != 1:
        raise _NoRule(f"{node.name}: grouped KV heads with fused blocks")
    for a, s in zip((q, k, v), lays):
        if s is None:
            if gqa:
                raise _NoRule(f"{node.name}: grouped KV heads with replicated q, k or v")
            t.want(node, a, target)
        elif s != target:
            raise _NoRule(f"{node.name}: q, k, v sharded differently")
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, torch.fx.Node):
        shape = _shape(mask)
        d = target.dim - (len(_shape(q)) - len(shape))
        if d >= 0 and shape[d] != 1:
            t.want(node, mask, Shard(d, target.blocks))
    return target


@rule(aten.linear.default)
def _linear(t: "_Trial", node):
    x, w = node.args[:2]
    b = node.args[2] if len(node.args) > 2 else None
    s = t.lay(x)
    if s is None or t.lay(w) is not None or t.lay(b) is not None:
        raise _NoRule(f"{node.name}: linear with a sharded weight or bias")
    if s.dim == len(_shape(x)) - 1:        # row-parallel: contract the sharded features
        t.want(node, w, Shard(1, s.blocks))
        t.reduce.add(node)
        return None
    return s


@rule(aten.addmm.default)
def _addmm(t: "_Trial", node):
    b, x, w = node.args[:3]
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        raise _NoRule(f"{node.name}: addmm with alpha/beta")
    s = t.lay(x)
    if s is None or t.lay(w) is not None or t.lay(b) is not None:
        raise _NoRule(f"{node.name}: addmm with a sharded weight or bias")
    if s.dim == 1:
        t.want(node, w, Shard(0, s.blocks))
        t.reduce.add(node)
        return None
    if len(_shape(b)) == 2 and _shape(b)[0] != 1:
        t.want(node, b, Shard(0, s.blocks))
    return s


@rule(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(t: "_Trial", node):
    a, b = node.args[:2]
    sa, sb = t.lay(a), t.lay(b)
    na, nb, no = len(_shape(a)), len(_shape(b)), len(_shape(node))
    if na < 2 or nb < 2:
        raise _NoRule(f"{node.name}: matmul with a 1-D operand")
    role_a = None if sa is None else ("k" if sa.dim == na - 1 else "m" if sa.dim == na - 2 else ("batch", sa.dim + no - na))
    role_b = None if sb is None else ("k" if sb.dim == nb - 2 else "n" if sb.dim == nb - 1 else ("batch", sb.dim + no - nb))
    if "k" in (role_a, role_b):                     # contraction over the sharded dim: partial sums
        s = sa if role_a == "k" else sb
        if role_a not in (None, "k") or role_b not in (None, "k") or (sa and sb and sa != sb):
            raise _NoRule(f"{node.name}: matmul operands sharded on different dims")
        if sa is None:
            t.want(node, a, Shard(na - 1, s.blocks))
        if sb is None:
            t.want(node, b, Shard(nb - 2, s.blocks))
        t.reduce.add(node)
        return None
    if role_a == "m" and sb is None:
        return Shard(no - 2, sa.blocks)
    if role_b == "n" and sa is None:
        return Shard(no - 1, sb.blocks)
    if isinstance(role_a, tuple) or isinstance(role_b, tuple):
        target = role_a if isinstance(role_a, tuple) else role_b
        s = sa if sa is not None else sb
        for arg, lay, nd, role in ((a, sa, na, role_a), (b, sb, nb, role_b)):
            if lay is None:
                d = target[1] - (no - nd)
                if d >= 0 and _shape(arg)[d] != 1:
                    t.want(node, arg, Shard(d, s.blocks))
            elif role != target or lay.blocks != s.blocks:
                raise _NoRule(f"{node.name}: matmul operands sharded on different dims")
        return Shard(target[1], s.blocks)
    raise _NoRule(f"{node.name}: matmul operands sharded on different dims")


@rule(aten.einsum.default)
def _einsum(t: "_Trial", node):
    """Sharded operands agree on one letter; kept in the output it stays sharded, contracted it gives partial sums."""
    parsed = _subscripts(node)
    if parsed is None:
        raise _NoRule(f"{node.name}: einsum with an ellipsis or a repeated letter")
    operands, subs, out = parsed
    letter, blocks = None, None
    for a, sub in zip(operands, subs):
        s = t.lay(a)
        if s is not None:
            if not isinstance(s, Shard) or (letter, blocks) not in ((None, None), (sub[s.dim], s.blocks)):
                raise _NoRule(f"{node.name}: einsum operands sharded on different letters")
            letter, blocks = sub[s.dim], s.blocks
    for a, sub in zip(operands, subs):
        if t.lay(a) is None and letter in sub and _shape(a)[sub.index(letter)] != 1:
            t.want(node, a, Shard(sub.index(letter), blocks))
    if letter in out:
        return Shard(out.index(letter), blocks)
    t.reduce.add(node)
    return None
