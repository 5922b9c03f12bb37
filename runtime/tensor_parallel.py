"""Tensor parallelism at run time: Megatron's collectives as autograd functions on a shard's graph.

Reads a tensor shard's GraphModule (``partitioner``'s rewrite: explicit functional
``all_reduce`` / ``all_gather_into_tensor`` + ``wait_tensor`` nodes, ``fxpart.shard`` layouts on
sharded values); returns a copy whose collectives run on this rank's tensor-parallel group with
the right gradients. The functional collectives have no autograd formula (their backward is an
undocumented, deprecated pass-through), and nothing all-reduces the input gradient of a
column-parallel region, so ``megatron_graph`` rewrites them:

* ``g`` after each row-parallel matmul: all-reduce (sum) forward, identity backward;
* a gather at a sharded model output (a vocabulary-parallel head): all-gather forward, this
  rank's slice of the gradient backward;
* ``f`` on every replicated value that enters a sharded region (the input of a
  column-parallel group, a replicated tensor sliced or broadcast into sharded ops): identity
  forward, all-reduce (sum) backward.

Every tp rank then computes the same outputs and loss, each split parameter gets its own
slice of the gradient and each replicated parameter the full gradient (identical on every
tp rank), so each rank's optimizer step equals the unpartitioned model's. A stage of a
pipeline works the same: sharded activations crossing a cut arrive as sharded placeholders.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.distributed as dist
import torch.fx

from partitioner.sharding import ALL_GATHER, ALL_REDUCE, WAIT
from passes._keys import LOCAL_SLICE, SHARD

__all__ = ["reduce_from_region", "copy_to_region", "gather_from_region", "megatron_graph", "join_shards"]

log = logging.getLogger(__name__)


# -- Megatron's f and g ----------------------------------------------------------------------------

def _group(group_name: str):
    world = dist.group.WORLD
    if group_name == world.group_name:
        return world
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(group_name)


class _ReduceFromRegion(torch.autograd.Function):
    """g: sum the shards' partial results; the gradient is already the same on every rank."""

    @staticmethod
    def forward(ctx, x, group_name):
        out = x.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=_group(group_name))
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToRegion(torch.autograd.Function):
    """f: a replicated value enters a sharded region; each rank's gradient is a partial sum."""

    @staticmethod
    def forward(ctx, x, group_name):
        ctx.group_name = group_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=_group(ctx.group_name))
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    """Concatenate the shards' slices along dim 0; the gradient (the same on every rank) is sliced back."""

    @staticmethod
    def forward(ctx, x, group_size, group_name):
        group = _group(group_name)
        ctx.rank, ctx.group_size = dist.get_rank(group), group_size
        out = x.new_empty((group_size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.group_size)[ctx.rank].contiguous(), None, None


def gather_from_region(x: torch.Tensor, group_size: int, group_name: str) -> torch.Tensor:
    """All-gather along dim 0 forward, this rank's slice of the gradient backward."""
    return _GatherFromRegion.apply(x, group_size, group_name)


def reduce_from_region(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """All-reduce (sum) forward, identity backward (Megatron's g)."""
    return _ReduceFromRegion.apply(x, group_name)


def copy_to_region(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Identity forward, all-reduce (sum) backward (Megatron's f)."""
    return _CopyToRegion.apply(x, group_name)


def _region(graph: torch.fx.Graph) -> set:
    """Shard nodes that hold sharded or partial values: SHARD layouts, local slices, row-parallel outputs."""
    region = {node for node in graph.nodes if SHARD in node.meta or node.meta.get(LOCAL_SLICE)}
    region |= {node.args[0] for node in graph.nodes if node.target is ALL_REDUCE}
    return region


def _is_float(node) -> bool:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def megatron_graph(module: torch.fx.GraphModule, *, group_name: str, param_shards: dict) -> torch.fx.GraphModule:
    """A copy of shard ``module`` (same parameters) whose collectives are Megatron's f and g on ``group_name``.

    Args:
        module: a shard of a tensor plan (``plan.stages[r].module``).
        group_name: the process group to reduce over (``dist.group.WORLD.group_name`` for the default).
        param_shards: attribute name -> ``Shard`` of the parameters split when the shard was built
            (``plan.sharding.param_shards``); their gradients are local and never reduced.

    Returns:
        A new ``GraphModule`` sharing ``module``'s parameters and buffers.
    """
    gm = torch.fx.GraphModule(module, copy.deepcopy(module.graph), class_name=type(module).__name__)
    graph = gm.graph
    region = _region(graph)
    entered: dict = {}
    for node in list(graph.nodes):
        if node not in region:
            continue
        for arg in list(node.all_input_nodes):
            if arg in region or not _is_float(arg) or (arg.op == "get_attr" and arg.target in param_shards):
                continue
            if arg not in entered:
                with graph.inserting_after(arg):
                    entered[arg] = graph.call_function(copy_to_region, (arg, group_name))
                entered[arg].meta = {"val": arg.meta["val"]}
            node.replace_input_with(arg, entered[arg])
    for node in list(graph.nodes):
        if node.target is WAIT and isinstance(node.args[0], torch.fx.Node) and \
                node.args[0].target in (ALL_REDUCE, ALL_GATHER):
            reduce = node.args[0]
            with graph.inserting_before(node):
                g = graph.call_function(reduce_from_region, (reduce.args[0], group_name)) \
                    if reduce.target is ALL_REDUCE else \
                    graph.call_function(gather_from_region, (reduce.args[0], reduce.args[1], group_name))
            g.meta = dict(node.meta)
            node.replace_all_uses_with(g)
            graph.erase_node(node)
            if not reduce.users:
                graph.erase_node(reduce)
    leftover = [n.format_node() for n in graph.nodes if n.target in (ALL_REDUCE, ALL_GATHER, WAIT)]
    if leftover:
        raise ValueError(f"megatron_graph: collectives it cannot pair (all_reduce or all_gather_into_tensor, then "
                         f"wait_tensor): {leftover[:4]}")
    graph.lint()
    gm.recompile()
    log.debug("shard graph with f/g: %d f, %d g", len(entered),
              sum(n.target is reduce_from_region for n in graph.nodes))
    return gm


def join_shards(parts: list[torch.Tensor], shard) -> torch.Tensor:
    """The full tensor from every rank's slice under ``shard`` (dim ``shard.dim`` as ``(blocks, n, rest)``)."""
    d, blocks = shard.dim, shard.blocks
    if blocks == 1:
        return torch.cat(parts, dim=d)
    split = [p.reshape(*p.shape[:d], blocks, p.shape[d] // blocks, *p.shape[d + 1:]) for p in parts]
    joined = torch.cat(split, dim=d + 1)
    return joined.reshape(*parts[0].shape[:d], -1, *parts[0].shape[d + 1:])
