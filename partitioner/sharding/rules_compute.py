"""Sharding rules of the ops that compute: matmuls (column- and row-parallel), attention (heads,
grouped KV heads), Hugging Face's grouped experts, einsum, embeddings and convolutions.

Registered in the table of ``rules`` (keyed by ATen overload, or a custom op's name); the same
contract: ``(trial, node) -> output layout``, ``NoRule`` to refuse, ``t.want`` to cut an operand.
"""
from __future__ import annotations

import torch
import torch.fx

from .layout import NoRule, Shard, make_shard, segments_of
from .rule_table import _agree, _shape, _sharded, rule

__all__ = ["conv_groups", "subscripts"]

aten = torch.ops.aten


# -- attention ---------------------------------------------------------------------------------

@rule(aten.scaled_dot_product_attention.default)
def _sdpa(t, node):
    q, k, v = node.args[:3]
    hd = len(_shape(q)) - 3
    layouts = [t.lay(a) for a in (q, k, v)]
    if any(s is not None and s.dim != hd for s in layouts):
        raise NoRule(f"{node.name}: attention sharded on dim {next(s.dim for s in layouts if s)}, not on heads")
    hq, hk = _shape(q)[hd], _shape(k)[hd]
    if hq == hk:
        target = _agree(t, node, [q, k, v], [hd] * 3)
    else:
        target = _grouped_heads(t, node, q, (k, v), hq, hk, hd)
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, torch.fx.Node):
        d = hd - (len(_shape(q)) - len(_shape(mask)))
        if d >= 0 and _shape(mask)[d] != 1:
            t.want(node, mask, target.moved(d))
    return target


def _grouped_heads(t, node, q, kv, hq: int, hk: int, hd: int) -> Shard:
    """GQA: q's local heads must map onto the local KV heads as the kernel maps them (q head j -> kv head
    j // (local q heads / local kv heads)); KV heads shared by several shards are held by each of them."""
    sq = t.lay(q)
    if sq is None or not sq.plain():
        raise NoRule(f"{node.name}: grouped KV heads with query heads not split one block n ways")
    n, g = t.n, hq // hk
    lq = hq // n
    for rep in sorted({t.lay(a).rep for a in kv if t.lay(a) is not None and not t.lay(a).segments} | set(range(1, n + 1))):
        if n % rep or hk % (n // rep):
            continue
        lk = hk // (n // rep)
        if lq % lk == 0 and all(((r * lq + j) // g) - (r // rep) * lk == j // (lq // lk)
                                for r in range(n) for j in range(lq)):
            target = Shard(hd, rep=rep)
            for a in kv:
                if t.lay(a) != target:
                    t.want(node, a, target)
            return sq
    raise NoRule(f"{node.name}: {hq} query heads and {hk} KV heads do not map onto {n} shards")


# -- matmuls -------------------------------------------------------------------------------------

def _contract(t, node, a, da, b, db):
    """``a`` (dim ``da``) and ``b`` (dim ``db``) are contracted: both cut the same plain way, partial sums."""
    s = t.lay(a) or t.lay(b)
    segs = [(z, 1) for z, _ in segments_of(s, _shape(a if t.lay(a) else b)[s.dim])]
    plain = make_shard(0, segs, folded=s.folded)
    for arg, d in ((a, da), (b, db)):
        if t.lay(arg) != plain.moved(d):
            t.want(node, arg, plain.moved(d))
    t.reduce.add(node)
    return None


@rule(aten.linear.default)
def _linear(t, node):
    x, w = node.args[:2]
    b = node.args[2] if len(node.args) > 2 else None
    sx, sw = _sharded(t, node, x), _sharded(t, node, w)
    nx = len(_shape(x))
    if t.lay(b) is not None:
        raise NoRule(f"{node.name}: linear with a sharded bias and no sharded weight")
    if (sx is not None and sx.dim == nx - 1) or (sw is not None and sw.dim == 1):
        if sw is not None and sw.dim != 1:
            raise NoRule(f"{node.name}: linear with sharded input features and output features")
        return _contract(t, node, x, nx - 1, w, 1)          # row-parallel: bias added after the all-reduce
    if sw is not None:                                       # column-parallel on a replicated input
        if sx is not None:
            raise NoRule(f"{node.name}: linear with a sharded weight on a sharded input")
        if isinstance(b, torch.fx.Node):
            t.want(node, b, sw.moved(0))
        return sw.moved(nx - 1)
    return sx


@rule(aten.addmm.default)
def _addmm(t, node):
    b, x, w = node.args[:3]
    if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        raise NoRule(f"{node.name}: addmm with alpha/beta")
    sx, sw = _sharded(t, node, x), _sharded(t, node, w)
    if t.lay(b) is not None:
        raise NoRule(f"{node.name}: addmm with a sharded bias")
    if (sx is not None and sx.dim == 1) or (sw is not None and sw.dim == 0):
        return _contract(t, node, x, 1, w, 0)
    if sw is not None:
        if sx is not None:
            raise NoRule(f"{node.name}: addmm with a sharded weight on a sharded input")
        if _shape(b)[-1] != 1:
            t.want(node, b, sw.moved(len(_shape(b)) - 1))
        return sw.moved(1)
    if len(_shape(b)) == 2 and _shape(b)[0] != 1:
        t.want(node, b, sx.moved(0))
    return sx


@rule(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _matmul(t, node):
    a, b = node.args[:2]
    return _batched_matmul(t, node, a, b)


def _batched_matmul(t, node, a, b):
    sa, sb = _sharded(t, node, a), _sharded(t, node, b)
    na, nb, no = len(_shape(a)), len(_shape(b)), len(_shape(node))
    if na < 2 or nb < 2:
        raise NoRule(f"{node.name}: matmul with a 1-D operand")
    role_a = None if sa is None else ("k" if sa.dim == na - 1 else "m" if sa.dim == na - 2 else sa.dim + no - na)
    role_b = None if sb is None else ("k" if sb.dim == nb - 2 else "n" if sb.dim == nb - 1 else sb.dim + no - nb)
    if "k" in (role_a, role_b):                     # contraction over the sharded dim: partial sums
        if role_a not in (None, "k") or role_b not in (None, "k"):
            raise NoRule(f"{node.name}: matmul operands sharded on different dims")
        return _contract(t, node, a, na - 1, b, nb - 2)
    if role_a == "m" and sb is None:
        return sa.moved(no - 2)
    if role_b == "n" and sa is None:
        return sb.moved(no - 1)
    if isinstance(role_a, int) or isinstance(role_b, int):
        d = role_a if isinstance(role_a, int) else role_b
        if role_a not in (None, d) or role_b not in (None, d):
            raise NoRule(f"{node.name}: matmul operands sharded on different dims")
        dims = [d - (no - na), d - (no - nb)]
        target = _agree(t, node, [a, b], [x if x >= 0 and _shape(arg)[x] != 1 else None
                                          for arg, x in zip((a, b), dims)])
        return target.moved(d)
    raise NoRule(f"{node.name}: matmul operands sharded on different dims")


@rule(aten.baddbmm.default)
def _baddbmm(t, node):
    """``beta * self + alpha * (b1 @ b2)`` (Bloom's ALiBi scores): a batched matmul, ``self`` cut like its output."""
    bias, b1, b2 = node.args[:3]
    if t.lay(bias) is not None:
        raise NoRule(f"{node.name}: baddbmm with a sharded self")
    out = _batched_matmul(t, node, b1, b2)
    if out is None:
        raise NoRule(f"{node.name}: baddbmm contracting the sharded dim (self would be added on every shard)")
    d = out.dim - (len(_shape(node)) - len(_shape(bias)))
    if d >= 0 and _shape(bias)[d] != 1:
        t.want(node, bias, out.moved(d))
    return out


@rule("transformers::grouped_mm_fallback")
def _grouped_mm(t, node):
    """Hugging Face's experts on CPU: ``x [S, in] @ W[e] [in, out]`` for the rows of each expert ``e``
    (``offs``). Column-parallel: ``W`` split on ``out``; row-parallel: ``x`` and ``W`` split on ``in``."""
    x, w = node.args[:2]
    sx, sw = _sharded(t, node, x), _sharded(t, node, w)
    if sw is not None and sw.dim == 0:
        raise NoRule(f"{node.name}: grouped matmul with its experts split (the offsets count every expert)")
    if (sx is not None and sx.dim == 1) or (sw is not None and sw.dim == 1):
        return _contract(t, node, x, 1, w, 1)
    if sx is not None:
        return sx
    return sw.moved(1)


@rule(aten.einsum.default)
def _einsum(t, node):
    """Sharded operands agree on one letter; kept in the output it stays sharded, contracted it gives partial sums."""
    parsed = subscripts(node)
    if parsed is None:
        raise NoRule(f"{node.name}: einsum with an ellipsis or a repeated letter")
    operands, subs, out = parsed
    letter = None
    for a, sub in zip(operands, subs):
        s = _sharded(t, node, a)
        if s is not None:
            if letter not in (None, sub[s.dim]):
                raise NoRule(f"{node.name}: einsum operands sharded on different letters")
            letter = sub[s.dim]
    dims = [sub.index(letter) if letter in sub and _shape(a)[sub.index(letter)] != 1 else None
            for a, sub in zip(operands, subs)]
    if letter not in out:
        first = next(a for a in operands if t.lay(a) is not None)
        plain = make_shard(0, [(z, 1) for z, _ in segments_of(t.lay(first), _shape(first)[t.lay(first).dim])],
                           folded=t.lay(first).folded)
        for a, d in zip(operands, dims):
            if d is not None and t.lay(a) != plain.moved(d):
                t.want(node, a, plain.moved(d))
        t.reduce.add(node)
        return None
    target = _agree(t, node, operands, dims)
    return target.moved(out.index(letter))


@rule(aten.embedding.default)
def _embedding(t, node):
    """A table split by rows (vocabulary-parallel: ids outside a shard's rows read zeros, partial sums), or by
    features (the output keeps them split)."""
    w, ids = node.args[:2]
    sw, si = _sharded(t, node, w), _sharded(t, node, ids)
    if si is not None:
        if sw is not None:
            raise NoRule(f"{node.name}: embedding with sharded ids and a sharded table")
        return si
    if sw.dim == 1:
        return sw.moved(len(_shape(node)) - 1)
    if not sw.plain():
        raise NoRule(f"{node.name}: embedding table split by rows in blocks or shared parts")
    t.reduce.add(node)
    t.vocab.add(node)
    return None


@rule(aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
def _convolution(t, node):
    """Channel-parallel: weight ``[out, in / groups, *k]`` split on ``out`` (column), or input and weight on
    ``in`` (row: partial sums); a depthwise conv keeps its split channels local."""
    x, w = node.args[:2]
    b = node.args[2] if len(node.args) > 2 else None
    groups = conv_groups(node)
    if node.target == aten.convolution.default and node.args[6]:
        raise NoRule(f"{node.name}: transposed convolution")
    sx, sw = _sharded(t, node, x), _sharded(t, node, w)
    if t.lay(b) is not None:
        raise NoRule(f"{node.name}: convolution with a sharded bias and no sharded weight")
    if sx is not None and sx.dim != 1:
        if sw is not None:
            raise NoRule(f"{node.name}: convolution with a sharded weight on an input sharded off its channels")
        return sx
    if groups != 1:                          # grouped (depthwise): whole groups per shard, no partial sums
        s = sx if sx is not None else sw
        if not s.plain() or (sw is not None and sw.dim != 0) or groups % t.n:
            raise NoRule(f"{node.name}: grouped convolution ({groups} groups) not split into whole groups "
                         f"n = {t.n} ways")
        if sx is None:
            t.want(node, x, Shard(1))
        if sw is None:
            t.want(node, w, Shard(0))
        if isinstance(b, torch.fx.Node):
            t.want(node, b, Shard(0))
        return Shard(1)                          # local groups: groups / n (rewrite)
    if sx is not None or (sw is not None and sw.dim == 1):
        if sw is not None and sw.dim != 1:
            raise NoRule(f"{node.name}: convolution with sharded input and output channels")
        return _contract(t, node, x, 1, w, 1)
    if sw.dim != 0:
        raise NoRule(f"{node.name}: convolution weight split off its channels")
    if isinstance(b, torch.fx.Node):
        t.want(node, b, sw)
    return sw.moved(1)


def conv_groups(node: torch.fx.Node) -> int:
    """The ``groups`` argument of a convolution node."""
    if node.target == aten.convolution.default:
        return node.args[8]
    return node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)


def subscripts(node: torch.fx.Node):
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

