"""Layouts: how one dim of a value is split over ``n`` tensor-parallel shards, and how a layout
moves through a reshape.

Reads nothing from a graph; pure arithmetic on shapes and ``Shard`` values. The rules
(``rules``), the region analysis (``regions``), the shard rewrite (``rewrite``) and the
runtime (``join_shards``) all read layouts through these helpers.

Sizes are the example's (ints). A graph captured with symbolic batch and sequence sizes also
gives its symbolic shapes (``SymInt``s); a reshape checks with them that the layout it finds
holds at every size, not only at the example's (``reshape_layout``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import sympy
import torch

__all__ = ["Shard", "segments_of", "make_shard", "local_size", "take_ranges", "reshape_layout", "NoRule",
           "is_static", "same_size"]


@dataclass(frozen=True)
class Shard:
    """Dim ``dim`` viewed as ``(blocks, n / rep, rest)``; shard r holds ``[:, r // rep, :]``.

    ``blocks`` > 1: a fused dim of equal parts, each split on its own (GPT-2's ``c_attn``: q | k | v).
    ``rep`` > 1: shards in groups of ``rep`` hold the same part (KV heads shared by the query heads
    of several shards, Megatron's KV replication); ``rep == n`` is a whole copy on every shard.
    ``segments``: a fused dim of unequal parts (Phi-3's q | k | v with fewer KV heads, Falcon's
    multi-query ``query_key_value``): ``((global size, rep), ...)``, each part split as above;
    ``blocks`` and ``rep`` are then unused.
    ``folded``: the blocks are a symbolic dim (the batch) folded into this one (``[batch * heads]``
    of Bloom's and ``nn.MultiheadAttention``'s ``bmm``, a ``repeat`` by the batch size): each
    block's size is fixed, their number follows the dim's size at run time; ``blocks`` is their
    number at the example's sizes.
    """
    dim: int
    blocks: int = 1
    rep: int = 1
    segments: tuple = ()
    folded: bool = False

    def moved(self, dim: int) -> "Shard":
        """The same split on another dim (a transpose, a permute, a new leading dim)."""
        return dataclasses.replace(self, dim=dim)

    def plain(self) -> bool:
        """Split n ways in one block: what a contraction or a model output needs."""
        return not self.segments and self.blocks == 1 and self.rep == 1 and not self.folded

    def whole(self, n: int) -> bool:
        """Every shard holds all of it (each part shared by all n shards), e.g. Falcon's one KV head."""
        return all(rep == n for _, rep in (self.segments or [(0, self.rep)]))


class NoRule(Exception):
    """A node cannot keep its input sharded; the message says why. ``hints`` are seed layouts to try
    instead (``{"blocks": b}``, ``{"reps": (r, ...)}`` per part, or ``{"fractions": ((frac, rep), ...)}``)."""

    def __init__(self, message: str, hints: list | None = None):
        super().__init__(message)
        self.hints = hints or []


def segments_of(s: Shard, size: int, n: int | None = None) -> list[tuple[int, int]]:
    """``[(global size, rep), ...]`` of the parts of a dim of ``size`` under ``s``."""
    if s.segments:
        return list(s.segments)
    return [(size // s.blocks, s.rep)] * s.blocks


def make_shard(dim: int, segments: list[tuple[int, int]], *, folded: bool = False) -> Shard:
    """The canonical ``Shard`` of these parts: ``blocks``/``rep`` when they are all alike. ``folded``: their
    number follows a symbolic dim (they must then be alike)."""
    if len(set(segments)) == 1:
        return Shard(dim, len(segments), segments[0][1], folded=folded)
    assert not folded, f"a folded layout of unequal parts {segments}"
    return Shard(dim, segments=tuple(segments))


def local_size(s: Shard, size: int, n: int) -> int:
    """Size of the sharded dim on one shard."""
    return sum(z // (n // rep) for z, rep in segments_of(s, size))


def divides(s: Shard, size: int, n: int) -> bool:
    """Every part of the dim splits evenly into its ``n / rep`` pieces."""
    return all(z % (n // rep) == 0 and rep <= n and n % rep == 0 for z, rep in segments_of(s, size))


def take_ranges(dst: Shard, size: int, r: int, n: int, src: Shard | None = None) -> list[tuple[int, int]]:
    """Ranges ``[start, stop)`` of shard r's local value under ``src`` (None: the whole value) that
    make its value under ``dst`` (``src``'s parts, each with a rep dividing ``src``'s)."""
    dst_segs = segments_of(dst, size)
    src_segs = [(z, n) for z, _ in dst_segs] if src is None else segments_of(src, size)
    if [z for z, _ in src_segs] != [z for z, _ in dst_segs]:
        raise ValueError(f"cannot narrow {src} to {dst}: their parts differ")
    ranges, offset = [], 0
    for (z, rep_src), (_, rep_dst) in zip(src_segs, dst_segs):
        sub = rep_src // rep_dst                       # dst pieces within one src piece
        chunk = z // (n // rep_dst)
        idx = (r // rep_dst) % sub
        ranges.append((offset + idx * chunk, offset + (idx + 1) * chunk))
        offset += z // (n // rep_src)
    merged = [ranges[0]]
    for a, b in ranges[1:]:
        if a == merged[-1][1]:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def narrows(src: Shard, dst: Shard, size: int) -> bool:
    """True when ``dst`` can be cut locally out of ``src`` (same dim and parts, reps dividing)."""
    if src.dim != dst.dim or src.folded != dst.folded:
        return False
    a, b = segments_of(src, size), segments_of(dst, size)
    return [z for z, _ in a] == [z for z, _ in b] and all(ra % rb == 0 for (_, ra), (_, rb) in zip(a, b))


# -- reshapes ---------------------------------------------------------------------------------

def reshape_layout(in_shape, out_shape, s: Shard, n: int, node=None, *, sym_in=None, sym_out=None) -> Shard:
    """Where a sharded dim lands through a reshape (the flat order of elements is kept).

    ``in_shape``/``out_shape`` are the example's sizes; ``sym_in``/``sym_out`` the graph's symbolic
    ones (None: static): the layout found at the example must hold at every size (``_at_every_size``).
    Raises ``NoRule`` (with hints: fused blocks, or shards sharing heads) when no output dim
    holds whole pieces of every part, or when the pieces depend on the symbolic sizes.
    """
    name = node.name if node is not None else "reshape"
    for in_dims, out_dims in _dim_groups(in_shape, out_shape):
        if s.dim not in in_dims:
            continue
        pos = in_dims.index(s.dim)
        outer = _prod(in_shape[d] for d in in_dims[:pos])
        inner = _prod(in_shape[d] for d in in_dims[pos + 1:])
        flat = [(z * inner, rep) for _ in range(_int(outer)) for z, rep in segments_of(s, in_shape[s.dim])]
        hints = []
        symbolic = sym_in is not None and sym_out is not None
        for k, d in enumerate(out_dims):
            before = _prod(out_shape[e] for e in out_dims[:k])
            after = _prod(out_shape[e] for e in out_dims[k + 1:])
            found = _fit(flat, before, out_shape[d], after, n)
            if isinstance(found, list) and out_shape[d] > 1:
                out = make_shard(d, found)
                if not symbolic:
                    return out
                return _at_every_size(out, s, in_shape, (in_dims, pos), (out_dims, k), sym_in, sym_out, name)
            # a hint read off symbolic sizes would re-seed a layout that holds at the example only
            if isinstance(found, dict) and out_shape[d] > 1 and not (symbolic and _symbolic_group(
                    sym_in, in_dims, sym_out, out_dims)):
                hints.append(found)
        hints.sort(key=lambda h: "reps" in h)        # keep every shard distinct where a fused split allows
        raise NoRule(f"{name}: reshape {list(in_shape)} -> {list(out_shape)} splits the sharded dim "
                     f"(size {in_shape[s.dim]}) into {[out_shape[d] for d in out_dims]}: no part divisible by "
                     f"n = {n}{f' within {len(segments_of(s, in_shape[s.dim]))} blocks' if not s.plain() else ''}"
                     f" (e.g. fewer heads than shards)", hints)
    raise AssertionError(f"dim {s.dim} not found in {in_shape}")


def _at_every_size(out: Shard, s: Shard, in_shape, group_in, group_out, sym_in, sym_out, name) -> Shard:
    """``out`` (found at the example's sizes) as it holds at every size of the symbolic dims: the reshape
    cuts the group's elements into parts (``s``'s, once per element of the dims outside it, scaled by
    those inside); the output dim holds ``count`` of them per element of its outer dims, each of size
    ``part``. A symbolic ``count`` of fixed-size parts folds the batch into the dim (``folded``); one part
    of symbolic size stays one part; anything else holds at the example only: ``NoRule``."""
    (in_dims, pos), (out_dims, k) = group_in, group_out
    if not _symbolic_group(sym_in, in_dims, sym_out, out_dims):
        return out
    where = f"{name}: reshape {list(sym_in)} -> {list(sym_out)}"
    if sympy.expand(_sym_prod(sym_in, in_dims) - _sym_prod(sym_out, out_dims)) != 0:
        raise NoRule(f"{where} groups dims {in_dims} into {out_dims} only at the example's sizes")
    if s.folded:                       # fixed-size blocks, as many as the size holds
        part = sympy.Integer(in_shape[s.dim] // s.blocks)
        n_parts = _expr(sym_in[s.dim]) / part
    else:
        n_parts = sympy.Integer(len(segments_of(s, in_shape[s.dim])))
        part = _expr(sym_in[s.dim]) / n_parts
    count = _sym_prod(sym_in, in_dims[:pos]) * n_parts / _sym_prod(sym_out, out_dims[:k])
    part = part * _sym_prod(sym_in, in_dims[pos + 1:]) / _sym_prod(sym_out, out_dims[k + 1:])
    if not (_whole(count) and _whole(part)):
        raise NoRule(f"{where}: the sharded dim's parts ({count} of size {part} per output element) fit the "
                     f"output dims at the example's sizes only")
    if is_static(count) and is_static(part):
        return out
    if is_static(part) and not out.segments:
        return dataclasses.replace(out, folded=True)
    if count == 1:
        return out
    what = "unequal parts" if out.segments else f"{count} parts of size {part}"
    raise NoRule(f"{where} leaves the sharded dim in {what}: a layout that changes with the symbolic sizes")


def _symbolic_group(sym_in, in_dims, sym_out, out_dims) -> bool:
    return not all(is_static(sym_in[d]) for d in in_dims) or not all(is_static(sym_out[d]) for d in out_dims)


def _sym_prod(shape, dims):
    return _prod(_expr(shape[d]) for d in dims)


def _whole(expr) -> bool:
    """No symbolic size divides it: an integer at every size (``s0 * 4``, not ``2 / s0``)."""
    return not sympy.fraction(sympy.together(expr))[1].free_symbols


def is_static(x) -> bool:
    """Whether a size (an int, a ``SymInt`` or a sympy expression of sizes) is the same at every size."""
    return not sympy.sympify(_expr(x)).free_symbols


def same_size(a, b) -> bool:
    """Whether two sizes (ints or ``SymInt``s) are equal at every size."""
    return sympy.expand(_expr(a) - _expr(b)) == 0


def _expr(x):
    """A size as a sympy expression: a ``SymInt``'s symbolic expression, an int as an ``Integer``."""
    if isinstance(x, torch.SymInt):
        return x.node.expr
    return sympy.Integer(x) if isinstance(x, int) else x


def _fit(flat, before, size, after, n):
    """The parts of an output dim of ``size`` (``before`` elements outside it, ``after`` inside) that the
    flat parts make, as a list; a hint (dict) when another seed layout would make them; else None."""
    if not all(isinstance(x, int) for x in (before, size, after)) or any(z % after for z, _ in flat):
        return None
    scaled = [(z // after, rep) for z, rep in flat]
    period, acc = [], 0
    for z, rep in scaled:                   # the parts of one period of ``size``
        if acc >= size:
            break
        period.append((z, rep))
        acc += z
    if acc != size or scaled != period * before:
        if len(flat) == 1 and before > 1 and size * before == scaled[0][0]:
            return {"blocks": before}        # one part, cut into ``before`` equal blocks (q | k | v)
        return None
    if all(z % (n // rep) == 0 for z, rep in period):
        return period
    # shards sharing a part hold whole rows of it (whole KV heads): the fewest sharers per part
    return {"reps": tuple(max(rep, n // math.gcd(z, n)) for z, rep in period)}


def _prod(xs):
    out = 1
    for x in xs:
        out = out * x
    return out


def _int(x) -> int:
    return x if isinstance(x, int) else int(x)


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


def join_shards_like(parts: list, shard: Shard, cat) -> object:
    """The whole tensor from every shard's piece under ``shard`` (``cat(list, dim)`` joins; pieces are
    tensors indexed by shard). Shards that share a part give it once."""
    n, d = len(parts), shard.dim
    local = parts[0].shape[d]
    if shard.segments:
        segs = list(shard.segments)
    else:
        size = local * (n // shard.rep)
        segs = segments_of(shard, size)
    out, offset = [], 0
    for z, rep in segs:
        piece = z // (n // rep)
        out += [p.narrow(d, offset, piece) for p in parts[::rep]]
        offset += piece
    return cat(out, d)
