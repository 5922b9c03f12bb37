"""Per-op sharding rules: how a layout ``Shard`` passes through one ATen op (elementwise, shape and
movement ops here; matmuls, attention, convolutions and embeddings in ``rules_compute``).

A table keyed by ATen overload (``@rule(...)``; a custom op by its name, e.g.
``"transformers::grouped_mm_fallback"``); each rule takes the trial region and the node and
returns the output's layout (None: replicated, or a partial sum the rule marks for an
all-reduce), or raises ``NoRule`` so the region's seeds that reach the node are dropped. A
rule asks for a replicated operand (or one split more coarsely) to be cut locally with
``t.want``. Reads fake values (``node.meta["val"]``) through ``passes._util.node_value`` (the
example's sizes), and their symbolic shapes (``sym_shape``) where a layout depends on them;
writes nothing. Sizes of dims that are not sharded may be symbolic (``SymInt``); a sharded dim
of symbolic size (the batch folded into heads) passes only the rules that reason about it.
"""
from __future__ import annotations

import operator
from fractions import Fraction

import torch
import torch.fx

from passes._util import node_value
from .layout import NoRule, Shard, is_static, make_shard, narrows, reshape_layout, same_size, segments_of
from .rule_table import (POINTWISE, _agree, _shape, _sharded, _static_dim, _tensor_args, op_name, rule, rule_for,
                         sym_shape)

__all__ = ["Shard", "rule", "rule_for", "reshape_layout", "NoRule", "op_name", "sym_shape"]

aten = torch.ops.aten


# -- elementwise, shape and movement ops --------------------------------------------------------------

@rule(POINTWISE, aten.dropout.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default,
      aten.alias.default, aten.detach.default, aten.contiguous.default, aten.clone.default, aten.where.ScalarOther,
      aten.where.ScalarSelf, aten.__and__.Tensor, aten.__or__.Tensor, aten.masked_fill.Scalar,
      aten.masked_fill.Tensor, aten.type_as.default, aten.lift_fresh_copy.default, aten.hardswish_.default,
      aten.hardswish.default, aten.hardsigmoid_.default, aten.hardsigmoid.default, aten.relu_.default,
      aten.silu_.default, aten.gelu_.default, aten.hardtanh_.default)
def _pointwise(t, node):
    """Elementwise with broadcasting: every sharded input on the same (right-aligned) dim; replicated
    inputs that span that dim are cut locally."""
    out_nd = len(_shape(node))
    args = _tensor_args(node)
    sharded = [(a, t.lay(a)) for a in args if t.lay(a) is not None]
    if any(not isinstance(s, Shard) for _, s in sharded):
        raise NoRule(f"{node.name}: a multi-output value used directly")
    if not sharded:
        return None
    a0, s0 = next(((a, s) for a, s in sharded if not s.whole(t.n)), sharded[0])
    out_dim = s0.dim + out_nd - len(_shape(a0))
    dims = [out_dim - (out_nd - len(_shape(a))) for a in args]
    target = _agree(t, node, args, dims) or s0
    return target.moved(out_dim)


@rule(aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default)
def _like(t, node):
    """A fresh tensor shaped like a sharded one: each shard's is its piece (the same constant everywhere)."""
    return _sharded(t, node, node.args[0])


@rule(aten._assert_tensor_metadata.default, aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default,
      aten.new_full.default, aten.sym_size.int)
def _fresh(t, node):
    """Sized by its arguments (whole on every shard), or a size that is not the sharded dim's."""
    if node.target == aten.sym_size.int and node.args[1] % len(_shape(node.args[0])) == t.lay(node.args[0]).dim:
        raise NoRule(f"{node.name}: reads the size of the sharded dim")
    return None


@rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
      aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _reshape(t, node):
    x = node.args[0]
    return reshape_layout(_shape(x), _shape(node), _sharded(t, node, x), t.n, node,
                          sym_in=sym_shape(x), sym_out=sym_shape(node))


@rule(aten.expand.default, aten.broadcast_to.default)
def _expand(t, node):
    s = t.lay(node.args[0])
    return s.moved(s.dim + len(_shape(node)) - len(_shape(node.args[0])))


@rule(aten.transpose.int, aten.t.default, aten.numpy_T.default)
def _transpose(t, node):
    s = t.lay(node.args[0])
    nd = len(_shape(node))
    d0, d1 = (node.args[1] % nd, node.args[2] % nd) if node.target == aten.transpose.int else (0, nd - 1)
    return s.moved(d1 if s.dim == d0 else d0 if s.dim == d1 else s.dim)


@rule(aten.permute.default)
def _permute(t, node):
    s = t.lay(node.args[0])
    dims = [d % len(node.args[1]) for d in node.args[1]]
    return s.moved(dims.index(s.dim))


@rule(aten.movedim.int)
def _movedim(t, node):
    s = t.lay(node.args[0])
    nd = len(_shape(node))
    order = list(range(nd))
    src, dst = node.args[1] % nd, node.args[2] % nd
    order.insert(dst, order.pop(src))
    return s.moved(order.index(s.dim))


def _pieces(s: Shard, size: int, bounds: list[int], node, t) -> list:
    """The layouts of the pieces ``[bounds[i], bounds[i+1])`` of a sharded dim; a hint to re-seed when a
    bound cuts through a part."""
    segs = segments_of(s, size)
    edges = [0]
    for z, _ in segs:
        edges.append(edges[-1] + z)
    if all(b in edges for b in bounds):
        out = []
        for a, b in zip(bounds, bounds[1:]):
            i, j = edges.index(a), edges.index(b)
            out.append((make_shard(s.dim, segs[i:j]), i if j == i + 1 else None))
        return out
    cuts = sorted(set(edges) | set(bounds))
    fractions = tuple((Fraction(b - a, size), next(rep for (z, rep), e in zip(segs, edges) if e <= a < e + z))
                      for a, b in zip(cuts, cuts[1:]))
    raise NoRule(f"{node.name}: cuts the sharded dim at {bounds[1:-1]}, through its parts "
                 f"{[z for z, _ in segs]}", [{"fractions": fractions}])


@rule(aten.slice.Tensor)
def _slice(t, node):
    s = _sharded(t, node, node.args[0])
    shape = _shape(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
    if dim != s.dim:
        return s
    size = shape[dim]
    start, end = (list(node.args[2:4]) + [None, None])[:2]
    step = node.args[4] if len(node.args) > 4 else 1
    if same_size(sym_shape(node)[dim], sym_shape(node.args[0])[dim]):
        return s                                      # slices nothing off, at every size
    if any(isinstance(a, torch.fx.Node) for a in (start, end, step)):
        raise NoRule(f"{node.name}: slices the sharded dim at symbolic positions "
                     f"{[a.name if isinstance(a, torch.fx.Node) else a for a in (start, end, step)]}")
    _static_dim(t, node, node.args[0], dim, "slices")
    start = 0 if start is None else start + size if start < 0 else min(start, size)
    end = size if end is None else end + size if end < 0 else min(end, size)
    if step != 1 or end <= start:
        raise NoRule(f"{node.name}: slices the sharded dim with step {step}, or to nothing")
    bounds = sorted({0, start, end, size})
    out, seg = _pieces(s, size, bounds, node, t)[bounds.index(start)]
    if seg is not None:
        t.note_segment(node, None, seg)
    return out


@rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)
def _split(t, node):
    s = _sharded(t, node, node.args[0])
    shape = _shape(node.args[0])
    dim = (node.args[2] if node.target != aten.unbind.int and len(node.args) > 2 else
           node.args[1] if node.target == aten.unbind.int and len(node.args) > 1 else 0) % len(shape)
    outs = [tuple(v.shape) for v in node_value(node)]
    if dim != s.dim:
        if node.target == aten.unbind.int:
            return tuple(s.moved(s.dim - (dim < s.dim)) for _ in outs)
        return tuple(s for _ in outs)
    if node.target == aten.unbind.int:
        raise NoRule(f"{node.name}: unbinds the sharded dim")
    _static_dim(t, node, node.args[0], dim, "splits")
    bounds = [0]
    for o in outs:
        bounds.append(bounds[-1] + o[dim])
    pieces = _pieces(s, shape[dim], bounds, node, t)
    for i, (_, seg) in enumerate(pieces):
        if seg is not None:
            t.note_segment(node, i, seg)
    return tuple(p for p, _ in pieces)


@rule(operator.getitem)
def _getitem(t, node):
    s = t.lay(node.args[0])
    if isinstance(s, tuple):
        t.pass_segment(node.args[0], node, node.args[1])
        return s[node.args[1]]
    return None


@rule(aten.select.int)
def _select(t, node):
    s = _sharded(t, node, node.args[0])
    dim = node.args[1] % len(_shape(node.args[0]))
    if dim == s.dim:
        raise NoRule(f"{node.name}: selects along the sharded dim")
    return s.moved(s.dim - (dim < s.dim))


@rule(aten.cat.default)
def _cat(t, node):
    args = list(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(_shape(node))
    first = next(t.lay(a) for a in args if t.lay(a) is not None)
    if first.dim != dim:
        return _agree(t, node, args, [first.dim] * len(args))
    if any(t.lay(a) is None for a in args):          # a replicated piece would need cutting by parts
        raise NoRule(f"{node.name}: concatenates a replicated tensor along the sharded dim")
    for a in args:
        _static_dim(t, node, a, dim, "concatenates along")
    segs = [seg for a in args for seg in segments_of(t.lay(a), _shape(a)[dim])]
    return make_shard(dim, segs)                      # each shard's pieces, in order: the parts concatenated


@rule(aten.stack.default)
def _stack(t, node):
    args = list(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(_shape(node))
    first = next(t.lay(a) for a in args if t.lay(a) is not None)
    target = _agree(t, node, args, [first.dim] * len(args))
    return target.moved(target.dim + (target.dim >= dim))


@rule(aten.repeat.default)
def _repeat(t, node):
    """Copies of the input along each dim: along the sharded one each copy is one more block of the input's
    parts (each shard repeats its own piece). A symbolic number of copies (Hugging Face's ``repeat`` by the
    batch size) of fixed-size parts folds the batch into the dim; of unequal or symbolic-size parts, refused."""
    x = node.args[0]
    s = _sharded(t, node, x)
    repeats = list(node.args[1])
    d = s.dim + len(repeats) - len(_shape(x))
    k = repeats[d]
    if k == 1:
        return s.moved(d)
    parts, size = segments_of(s, _shape(x)[s.dim]), sym_shape(x)[s.dim]
    times = k if isinstance(k, int) else k.name
    if not s.folded and not is_static(size):
        raise NoRule(f"{node.name}: repeats {times} times the sharded dim of {x.name}, of symbolic size {size}: "
                     f"blocks whose size changes with the symbolic sizes")
    if isinstance(k, int) and not s.folded:
        return make_shard(d, parts * k)                  # each copy is one more block
    if s.segments:
        raise NoRule(f"{node.name}: repeats {times} times the sharded dim of {x.name}, in unequal parts "
                     f"{[z for z, _ in parts]}: a symbolic number of unequal blocks")
    copies = _shape(node)[d] // _shape(x)[s.dim]        # at the example's sizes
    return make_shard(d, parts * copies, folded=True)


@rule(aten.index.Tensor)
def _index(t, node):
    """``x[..., idx, ...]`` with replicated index tensors on dims that are not sharded."""
    x, indices = node.args[0], list(node.args[1])
    s = _sharded(t, node, x)
    if s is None or any(isinstance(i, torch.fx.Node) and t.lay(i) is not None for i in indices):
        raise NoRule(f"{node.name}: indexes with a sharded index tensor")
    used = [k for k, i in enumerate(indices) if i is not None]
    if s.dim in used:
        return _index_as_slice(t, node, x, s, indices)
    idx_nd = max(len(_shape(indices[k])) for k in used)
    before = sum(1 for k in used if k < s.dim)
    if used == list(range(used[0], used[-1] + 1)):      # adjacent: the index dims replace them in place
        return s if s.dim < used[0] else s.moved(s.dim - len(used) + idx_nd)
    return s.moved(idx_nd + s.dim - before)             # apart: the index dims go first


def _index_as_slice(t, node, x, s, indices):
    """``x[..., [4], :]`` on the sharded dim with a constant run of positions (Falcon's one KV head): a slice."""
    k = s.dim
    values = t.constant(indices[k]) if len(indices) == k + 1 and all(i is None for i in indices[:k]) else None
    if values is None or values.dim() != 1 or values.numel() == 0:
        raise NoRule(f"{node.name}: indexes the sharded dim (not with a constant run of positions)")
    _static_dim(t, node, x, k, "indexes")
    size = _shape(x)[k]
    pos = [int(v) % size for v in values.tolist()]
    if pos != list(range(pos[0], pos[0] + len(pos))):
        raise NoRule(f"{node.name}: indexes the sharded dim at scattered positions {pos}")
    start, end = pos[0], pos[-1] + 1
    bounds = sorted({0, start, end, size})
    out, seg = _pieces(s, size, bounds, node, t)[bounds.index(start)]
    if seg is not None:
        t.note_segment(node, None, seg)
    t.as_slice(node, k, start, end)
    return out


@rule(aten.gather.default)
def _gather(t, node):
    x, dim, index = node.args[:3]
    dim = dim % len(_shape(x))
    s = t.lay(x) if t.lay(x) is not None else t.lay(index)
    if s.dim == dim:
        raise NoRule(f"{node.name}: gathers along the sharded dim")
    if _shape(x)[s.dim] != _shape(index)[s.dim]:
        raise NoRule(f"{node.name}: input and index differ in size on the sharded dim")
    return _agree(t, node, [x, index], [s.dim, s.dim])


@rule(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default)
def _reduce_dims(t, node):
    s = _sharded(t, node, node.args[0])
    nd = len(_shape(node.args[0]))
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None or dims == []:
        raise NoRule(f"{node.name}: reduces every dim, the sharded one included")
    dims = [d % nd for d in ([dims] if isinstance(dims, int) else dims)]
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if s.dim in dims and node.target == aten.sum.dim_IntList:     # each shard's sum is a partial sum
        unshared = make_shard(s.dim, [(z, 1) for z, _ in segments_of(s, _shape(node.args[0])[s.dim])],
                              folded=s.folded)
        if unshared != s:
            t.want(node, node.args[0], unshared)
        t.reduce.add(node)
        return None
    if s.dim in dims:
        raise NoRule(f"{node.name}: reduces over the sharded dim (e.g. a norm over a sharded hidden size)")
    return s.moved(s.dim - (0 if keep else sum(d < s.dim for d in dims)))


@rule(aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
      aten._safe_softmax.default)
def _softmax(t, node):
    s = _sharded(t, node, node.args[0])
    if node.args[1] % len(_shape(node)) == s.dim:
        raise NoRule(f"{node.name}: softmax over the sharded dim")
    return s


@rule(aten.layer_norm.default, aten.rms_norm.default)
def _layer_norm(t, node):
    s = _sharded(t, node, node.args[0])
    if s is None or s.dim >= len(_shape(node)) - len(node.args[1]):
        raise NoRule(f"{node.name}: layer norm over the sharded dim, or a sharded weight")
    return s


@rule(aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default, aten.avg_pool1d.default,
      aten.avg_pool2d.default, aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default,
      aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default, aten.adaptive_max_pool2d.default,
      aten.max_pool2d_with_indices.default, aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec)
def _spatial(t, node):
    """Pooling and resampling act on the trailing spatial dims: channels (or batch) split stay split."""
    s = _sharded(t, node, node.args[0])
    nd = len(_shape(node.args[0]))
    spatial = {"1d": 1, "2d": 2, "3d": 3}[next(k for k in ("1d", "2d", "3d") if k in str(node.target))]
    if s.dim >= nd - spatial:
        raise NoRule(f"{node.name}: pools over the sharded dim")
    outs = node_value(node)
    return tuple(s for _ in outs) if isinstance(outs, (tuple, list)) else s


@rule(aten.pad.default, aten.constant_pad_nd.default, aten.reflection_pad1d.default, aten.reflection_pad2d.default,
      aten.reflection_pad3d.default, aten.replication_pad1d.default, aten.replication_pad2d.default,
      aten.replication_pad3d.default)
def _pad(t, node):
    """Padding widens the last ``len(pad) // 2`` dims (TF-style "same" convolutions, Swin's windows): a value
    split on an earlier dim stays split."""
    s = _sharded(t, node, node.args[0])
    if s is None:
        return None
    padded = len(node.args[1]) // 2
    if s.dim >= len(_shape(node)) - padded:
        raise NoRule(f"{node.name}: pads the sharded dim")
    return s


@rule(aten._native_batch_norm_legit_no_training.default, aten._native_batch_norm_legit.default,
      aten._native_batch_norm_legit_functional.default, aten.batch_norm.default)
def _batch_norm(t, node):
    """Per-channel statistics and affine: a channel-sharded input keeps them local (each cut to its channels)."""
    x = node.args[0]
    s = _sharded(t, node, x)
    if s is None or s.dim != 1:
        raise NoRule(f"{node.name}: batch norm with a sharded weight, or an input sharded off its channels")
    for a in node.args[1:5]:
        if isinstance(a, torch.fx.Node):
            t.want(node, a, s.moved(0))
    if node.target == aten.batch_norm.default:
        return s
    return tuple(s if k == 0 else s.moved(0) for k in range(len(node_value(node))))
