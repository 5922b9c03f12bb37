"""Rewrite a captured graph into shard ``r`` of a tensor-parallel plan.

Reads a captured graph and the ``Sharding`` of ``regions.analyze``; writes new shard
GraphModules (never the input graph). Each shard holds its slice of the sharded weights and
the replicated ones; view/reshape/expand/split sizes are rewritten to local sizes; every
row-parallel matmul is followed by an explicit ``_c10d_functional.all_reduce`` +
``wait_tensor`` (its bias added once, after the reduce), as is a sum over a sharded experts
dim and a vocabulary-parallel embedding (ids outside a shard's rows read zeros); a sharded
model output (a vocabulary-parallel LM head) is all-gathered there (``all_gather_into_tensor``
+ ``wait_tensor``). Under ``torch.distributed`` those nodes are real collectives;
``simulate`` runs all shards in lockstep in one process and sums or concatenates instead.
"""
from __future__ import annotations

import operator
import re

import torch
import torch.fx

from passes._keys import COLLECTIVE, COST, LOCAL_SLICE, ORIGIN, SHARD
from passes._util import block_path, fetch_attr, module_path, node_value, tensor_bytes
from .layout import Shard, is_static, local_size, segments_of, take_ranges
from .regions import Sharding
from .rule_table import sym_shape
from .rules_compute import conv_groups

__all__ = ["build_shard", "sliced_params", "simulate", "simulate_shards", "block_of", "ALL_REDUCE", "ALL_GATHER", "WAIT"]

aten = torch.ops.aten
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
ALL_GATHER = torch.ops._c10d_functional.all_gather_into_tensor.default
WAIT = torch.ops._c10d_functional.wait_tensor.default
_SHAPE_ARG = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
              aten.broadcast_to.default)
_CONVS = (aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


# -- building shards ----------------------------------------------------------------------------

def _local(x, shape, shard: Shard, r: int, n: int, call, src: Shard | None = None, sym_size=None):
    """Shard ``r`` of ``x`` (a tensor or a graph node; ``shape`` its global shape at the example's sizes)
    under ``shard``, cut from ``x``'s own layout ``src`` (None: ``x`` is whole); ``call(op, args)`` applies
    an op. ``sym_size``: the sharded dim's size at every size (a ``SymInt`` when symbolic; None: static)."""
    d = shard.dim
    if shard.folded:
        return _local_blocks(x, shape[d] // shard.blocks, shard, r, n, call, src)
    if sym_size is not None and not is_static(sym_size):
        return _local_run(x, shard, r, n, call, src)
    ranges = take_ranges(shard, shape[d], r, n, src)
    pieces = [call(aten.slice.Tensor, (x, d, a, b)) for a, b in ranges]
    return pieces[0] if len(pieces) == 1 else call(aten.cat.default, (pieces, d))


def _local_blocks(x, block: int, shard: Shard, r: int, n: int, call, src: Shard | None):
    """Shard ``r`` of a dim of blocks of ``block`` elements whose number follows the batch (``folded``):
    ``[..., k * block, ...]`` viewed as ``[..., k, block, ...]``, each block cut alike, folded back."""
    d = shard.dim
    one, one_src = Shard(d, rep=shard.rep), None if src is None else Shard(d, rep=src.rep)
    held = block if src is None else local_size(one_src, block, n)       # x's own block
    blocks = call(aten.unflatten.int, (x, d, [-1, held]))
    pieces = [call(aten.slice.Tensor, (blocks, d + 1, a, b)) for a, b in take_ranges(one, block, r, n, one_src)]
    piece = pieces[0] if len(pieces) == 1 else call(aten.cat.default, (pieces, d + 1))
    return call(aten.flatten.using_ints, (piece, d, d + 1))


def _local_run(x, shard: Shard, r: int, n: int, call, src: Shard | None):
    """Shard ``r`` of one part of symbolic size: its range is a fixed fraction of ``x``'s length on the
    dim, read when the shard runs (``sym_size``)."""
    assert not shard.segments and shard.blocks == 1, f"{shard} on a dim of symbolic size"
    units = n if src is None else src.rep          # x's length, in n-ths of the whole dim
    (a, b), = take_ranges(shard, n, r, n, src)
    length = call(aten.sym_size.int, (x, shard.dim))
    # the same nodes on every shard (shard 0's start too): ``simulate_shards`` runs them in lockstep
    start, end = (call(operator.floordiv, (call(operator.mul, (length, at)), units)) for at in (a, b))
    return call(aten.slice.Tensor, (x, shard.dim, start, end))


def sliced_params(gm, sh: Sharding) -> dict:
    """get_attr node -> Shard: parameters cut when a shard is built (those in a region's layout, and those
    every user wants cut the same way); the others are cut at run time where needed."""
    out = {node: s for node, s in sh.layout.items() if node.op == "get_attr" and isinstance(s, Shard)}
    wanted: dict = {}
    for (user, arg), shard in sh.convert.items():
        if arg.op == "get_attr" and arg not in out:
            wanted.setdefault(arg, set()).add(shard)
    out.update({arg: next(iter(s)) for arg, s in wanted.items()
                if len(s) == 1 and all((u, arg) in sh.convert for u in arg.users)})
    by_tensor = {id(fetch_attr(gm, node.target)): shard for node, shard in out.items()}
    for node in gm.graph.nodes:            # unused aliases of a cut tensor (a tied head's second name)
        if node.op == "get_attr" and node not in out and id(fetch_attr(gm, node.target)) in by_tensor:
            out[node] = by_tensor[id(fetch_attr(gm, node.target))]
    return out


def build_shard(gm: torch.fx.GraphModule, sh: Sharding, r: int, *, group_name: str = "0",
                sliced: dict | None = None) -> torch.fx.GraphModule:
    """Shard ``r`` of ``gm`` as a plain GraphModule: local weights, local shapes, explicit all-reduces."""
    n = sh.n
    sliced = sliced_params(gm, sh) if sliced is None else sliced
    graph = torch.fx.Graph()
    env: dict = {}
    attrs: dict = {}
    local_of: dict = {}

    def call(op, args):
        new = graph.call_function(op, tuple(args))
        new.meta[LOCAL_SLICE] = True
        return new

    cut: dict = {}                 # id of a full tensor -> its local piece (aliases share one)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if node in sliced:
                if id(value) not in cut:
                    local = _local(value.detach(), tuple(value.shape), sliced[node], r, n, lambda op, a: op(*a))
                    cut[id(value)] = torch.nn.Parameter(local.clone(), requires_grad=value.requires_grad) \
                        if isinstance(value, torch.nn.Parameter) else local.clone()
                value = cut[id(value)]
            attrs[node.target] = value
            env[node] = graph.get_attr(node.target)
        elif node.op == "call_module":
            attrs[node.target] = gm.get_submodule(node.target)
            env[node] = graph.node_copy(node, lambda a: env[a])
        elif node.op == "output":
            gathered = {a: _emit_gather(graph, a, env[a], sh.layout[a].dim, n, group_name) for a in sh.gather}
            env[node] = graph.output(torch.fx.map_arg(node.args[0], lambda a: gathered.get(a, env[a])))
        else:
            def arg_of(a, user=node):
                shard = sh.convert.get((user, a))
                if shard is None or (a in sliced and a not in sh.layout):
                    return env[a]
                src = sh.layout.get(a)
                src = None if src is not None and src.whole(n) else src
                key = (a, shard)
                if key not in local_of:
                    local_of[key] = _local(env[a], tuple(node_value(a).shape), shard, r, n, call, src,
                                           sym_shape(a)[shard.dim])
                return local_of[key]
            env[node] = _emit_reduce(graph, node, arg_of, group_name, r=r, n=n) if node in sh.reduce else \
                _copy_local(graph, node, arg_of, sh)
        env[node].meta.update({k: v for k, v in node.meta.items() if k not in env[node].meta})
        env[node].meta[ORIGIN] = node.name
        if node in sh.layout:
            env[node].meta[SHARD] = sh.layout[node]
    graph.lint()
    return _module(attrs, graph, f"Shard{r}")


def _module(attrs: dict, graph: torch.fx.Graph, name: str) -> torch.fx.GraphModule:
    module = torch.fx.GraphModule(attrs, graph, class_name=name)
    for target, value in attrs.items():     # buffers stay buffers (state_dict, .to())
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            owner_path, _, leaf = target.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            delattr(owner, leaf)
            owner.register_buffer(leaf, value)
    return module


def _copy_local(graph, node, arg_of, sh: Sharding):
    """Copy ``node``; a sharded view/reshape/expand/split/slice gets its local sizes."""
    new = graph.node_copy(node, arg_of)
    if node.target in _CONVS and conv_groups(node) != 1 and node in sh.layout:
        pos, local = (8 if node.target == aten.convolution.default else 6), conv_groups(node) // sh.n
        if len(new.args) > pos:                    # whole groups per shard
            new.args = (*new.args[:pos], local, *new.args[pos + 1:])
        else:
            new.kwargs = {**new.kwargs, "groups": local}
        return new
    src = node.args[0] if node.args else None
    s_in = sh.layout.get(src) if isinstance(src, torch.fx.Node) else None
    if not isinstance(s_in, Shard):
        return new
    n, s_out = sh.n, sh.layout.get(node)
    if node.target in _SHAPE_ARG and isinstance(s_out, Shard):
        sizes = list(new.args[1])
        sizes[s_out.dim] = _local_dim(graph, new, sizes[s_out.dim], s_out, n)
        new.args = (new.args[0], sizes, *new.args[2:])
    elif node.target == aten.unflatten.int and isinstance(s_out, Shard):
        dim = node.args[1] % node_value(src).dim()
        sizes = list(new.args[2])
        k = s_out.dim - dim
        if 0 <= k < len(sizes):
            sizes[k] = _local_dim(graph, new, sizes[k], s_out, n)
        new.args = (new.args[0], node.args[1], sizes)
    elif node.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        dim = (node.args[2] if len(node.args) > 2 else 0) % node_value(src).dim()
        if dim == s_in.dim:
            sizes = [local_size(s, v.shape[dim], n) for s, v in zip(s_out, node_value(node))]
            new.target = aten.split_with_sizes.default
            new.args = (new.args[0], sizes, dim)
    elif node.target == aten.slice.Tensor:
        dim = (node.args[1] if len(node.args) > 1 else 0) % node_value(src).dim()
        size = node_value(src).shape[dim]
        if dim == s_in.dim and node_value(node).shape[dim] != size:
            start = _start(node, size)
            offset = _local_offset(s_in, size, start, n)
            length = local_size(s_out, node_value(node).shape[dim], n)
            new.args = (new.args[0], dim, offset, offset + length)
    elif node in sh.slices:                        # a constant run of positions on the sharded dim
        dim, start, end = sh.slices[node]
        size = node_value(src).shape[dim]
        offset = _local_offset(s_in, size, start, n)
        new.target = aten.slice.Tensor
        new.args = (new.args[0], dim, offset, offset + local_size(s_out, end - start, n))
    return new


def _local_dim(graph, new, size, shard: Shard, n: int):
    """A shape argument's size of the sharded dim, made local: an int at once, -1 (inferred) as is, a
    symbolic size (a graph node: Bloom's ``batch * heads``) divided when the shard runs (before ``new``)."""
    if not isinstance(size, torch.fx.Node):
        return size if size == -1 else local_size(shard, size, n)
    assert not shard.segments, f"{new.format_node()}: unequal parts {shard.segments} on a dim of symbolic size"
    with graph.inserting_before(new):          # every part alike: rep / n of each
        local = graph.call_function(operator.floordiv, (size, n // shard.rep))
    local.meta[LOCAL_SLICE] = True
    return local


def _start(node, size: int) -> int:
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    return start + size if start < 0 else min(start, size)


def _local_offset(s: Shard, size: int, start: int, n: int) -> int:
    """Where global position ``start`` (a boundary between parts) lies in a shard's local value."""
    offset, edge = 0, 0
    for z, rep in segments_of(s, size):
        if edge >= start:
            break
        offset += z // (n // rep)
        edge += z
    return offset


def _emit_reduce(graph, node, arg_of, group_name: str, *, r: int, n: int):
    """A row-parallel matmul on local operands, all-reduced (sum) over the shards, then its bias once."""
    target, args = node.target, node.args
    bias = None
    if target == aten.embedding.default:
        y = _local_lookup(graph, node, arg_of, r=r, n=n)
    elif target == aten.linear.default:
        y = graph.call_function(target, (arg_of(args[0]), arg_of(args[1])))
        bias = args[2] if len(args) > 2 else None
    elif target == aten.addmm.default:
        y = graph.call_function(aten.mm.default, (arg_of(args[1]), arg_of(args[2])))
        bias = args[0]
    elif target in _CONVS and len(args) > 2 and args[2] is not None:
        y = graph.node_copy(node, arg_of)
        y.args = (*y.args[:2], None, *y.args[3:])
        bias = args[2]
    else:                   # mm, bmm, matmul, einsum, a sum over the sharded dim: copied on local operands
        y = graph.node_copy(node, arg_of)
    y.meta = dict(node.meta)
    nbytes = tensor_bytes(node_value(node))
    reduced = graph.call_function(ALL_REDUCE, (y, "sum", group_name))
    out = graph.call_function(WAIT, (reduced,))
    for new in (reduced, out):
        new.meta = {k: v for k, v in node.meta.items() if k != COST}
    reduced.meta[COLLECTIVE] = {"kind": "all_reduce", "bytes": nbytes, "block": block_of(node)}
    if isinstance(bias, torch.fx.Node):
        b = arg_of(bias)
        if target in _CONVS:           # [C] -> [C, 1, ...]: one value per channel of an [N, C, *spatial] output
            b = graph.call_function(aten.view.default, (b, [-1] + [1] * (node_value(node).dim() - 2)))
        out = graph.call_function(aten.add.Tensor, (out, b))
        out.meta = {k: v for k, v in node.meta.items() if k != COST}
    return out


def _emit_gather(graph, node, local, dim: int, n: int, group_name: str):
    """The full value of sharded ``node`` on every shard: gathered along dim 0, so the sharded dim moves there."""
    front = graph.call_function(aten.movedim.int, (local, dim, 0))
    front = graph.call_function(aten.contiguous.default, (front,))
    gathered = graph.call_function(ALL_GATHER, (front, n, group_name))
    out = graph.call_function(WAIT, (gathered,))
    out = graph.call_function(aten.movedim.int, (out, 0, dim))
    gathered.meta[COLLECTIVE] = {"kind": "all_gather", "bytes": tensor_bytes(node_value(node)), "block": block_of(node)}
    out.meta["val"] = node_value(node)
    return out


def _local_lookup(graph, node, arg_of, *, r: int, n: int):
    """Shard r's rows ``[start, end)`` of an embedding table: ids outside them look up row 0, then read zeros."""
    weight, ids, *rest = node.args
    chunk = node_value(weight).shape[0] // n
    start, end = r * chunk, (r + 1) * chunk

    def call(op, *a):
        new = graph.call_function(op, a)
        new.meta[LOCAL_SLICE] = True         # inside the region: the runner adds no f between these
        return new

    ids = arg_of(ids)
    mask = call(aten.bitwise_or.Tensor, call(aten.lt.Scalar, ids, start), call(aten.ge.Scalar, ids, end))
    local = call(aten.masked_fill.Scalar, call(aten.sub.Scalar, ids, start), mask, 0)
    if rest and rest[0] != -1:               # padding_idx: local on the shard holding it, else none
        rest[0] = rest[0] - start if start <= rest[0] < end else -1
    y = call(aten.embedding.default, arg_of(weight), local, *rest)
    return call(aten.masked_fill.Scalar, y, call(aten.unsqueeze.default, mask, -1), 0.0)


# -- running in one process ---------------------------------------------------------------------

def simulate(modules: list[torch.fx.GraphModule], flat: list):
    """Run every shard node by node in lockstep; an all-reduce sums the shards' values. Returns shard 0's outputs."""
    return simulate_shards(modules, [flat] * len(modules))[0]


def simulate_shards(modules: list[torch.fx.GraphModule], inputs: list[list]) -> list:
    """Run every shard in lockstep on its own flat inputs (``inputs[r]`` for shard r); returns each shard's outputs.

    Collectives are computed over the shards: an all-reduce sums their values, an all-gather
    concatenates them on dim 0.
    """
    interps = [torch.fx.Interpreter(m) for m in modules]
    lists = [list(m.graph.nodes) for m in modules]
    feeds = [iter(flat) for flat in inputs]
    for nodes in zip(*lists):
        first = nodes[0]
        if first.op == "placeholder":
            for interp, node, feed in zip(interps, nodes, feeds):
                interp.env[node] = next(feed)
        elif first.op == "output":
            return [torch.fx.map_arg(node.args[0], lambda a, i=interp: i.env[a]) for interp, node in zip(interps, nodes)]
        elif first.op == "call_function" and first.target is ALL_REDUCE:
            total = sum(interp.env[node.args[0]] for interp, node in zip(interps, nodes))
            for interp, node in zip(interps, nodes):      # each shard its own copy: the model may add_ into it
                interp.env[node] = total.clone()
        elif first.op == "call_function" and first.target is ALL_GATHER:
            total = torch.cat([interp.env[node.args[0]] for interp, node in zip(interps, nodes)])
            for interp, node in zip(interps, nodes):
                interp.env[node] = total.clone()
        elif first.op == "call_function" and first.target is WAIT:
            for interp, node in zip(interps, nodes):
                interp.env[node] = interp.env[node.args[0]]
        else:
            for interp, node in zip(interps, nodes):
                interp.env[node] = interp.run_node(node)
    raise AssertionError("shard graphs have no output node")


def block_of(node: torch.fx.Node) -> str:
    """The transformer block a node belongs to: its module path up to the first layer index."""
    return block_path(node) or module_path(node) or "(top)"
