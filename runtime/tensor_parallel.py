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
  forward, all-reduce (sum) backward;
* on a parameter whose pieces are shared by groups of shards (KV heads replicated across the
  shards of their query heads, ``Shard.rep``): identity forward, the gradient summed within
  each group backward (each shard's is the part its own query heads contribute).

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
from partitioner.sharding.layout import Shard, join_shards_like, segments_of
from passes._keys import LOCAL_SLICE, SHARD
from passes._util import copy_for_writers, written_bases

# torch 2.13 deprecates all_gather_into_tensor for all_gather_single; older releases have only the former
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

__all__ = ["reduce_from_region", "copy_to_region", "gather_from_region", "sum_in_replicas",
           "vocab_parallel_cross_entropy", "megatron_graph", "join_shards"]

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
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.group_size)[ctx.rank].contiguous(), None, None


class _SumInReplicas(torch.autograd.Function):
    """A parameter whose parts are shared by groups of ``rep`` shards: each shard's gradient of a shared part
    is what its own computation contributes; the group's sum is the part's gradient."""

    @staticmethod
    def forward(ctx, p, layout, group_name):
        ctx.shard, ctx.group_name = Shard(*layout), group_name
        return p.view_as(p)

    @staticmethod
    def backward(ctx, grad):
        group = _group(ctx.group_name)
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        d, offset, pieces = ctx.shard.dim, 0, []
        size = grad.shape[d] * n // ctx.shard.rep if not ctx.shard.segments else None
        for z, rep in segments_of(ctx.shard, size):
            piece = grad.narrow(d, offset, z // (n // rep))
            offset += piece.shape[d]
            if rep > 1:     # all-reduce over every shard with each group's sum in its own slot
                slots = piece.new_zeros((n // rep, *piece.shape))
                slots[rank // rep] = piece
                dist.all_reduce(slots, op=dist.ReduceOp.SUM, group=group)
                piece = slots[rank // rep]
            pieces.append(piece)
        return torch.cat(pieces, d), None, None


def sum_in_replicas(p: torch.Tensor, layout: tuple, group_name: str) -> torch.Tensor:
    """Identity forward; backward, the gradient of each part shared by ``rep`` shards summed over them.
    ``layout``: the parameter's ``Shard`` fields ``(dim, blocks, rep, segments)`` (plain data in the graph)."""
    return _SumInReplicas.apply(p, layout, group_name)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron's cross-entropy over logits split by vocabulary: max, target logit and sum of exponentials
    are all-reduced (three tensors of one value per token), never the logits."""

    @staticmethod
    def forward(ctx, logits, target, group_name, ignore_index):
        group = _group(group_name)
        rank, local = dist.get_rank(group), logits.shape[-1]
        start = rank * local
        logits = logits.float()
        top = logits.max(dim=-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - top.unsqueeze(-1)
        mine = (target >= start) & (target < start + local)
        index = (target - start).clamp(0, local - 1).unsqueeze(-1)
        picked = shifted.gather(-1, index).squeeze(-1).masked_fill(~mine, 0.0)
        exp = shifted.exp()
        total = exp.sum(dim=-1)
        dist.all_reduce(picked, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        keep = target != ignore_index
        count = keep.sum().clamp(min=1)
        loss = ((total.log() - picked) * keep).sum() / count
        ctx.save_for_backward(exp / total.unsqueeze(-1), index, mine & keep, keep, count)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, index, mine, keep, count = ctx.saved_tensors
        g = softmax * keep.unsqueeze(-1)
        g.scatter_add_(-1, index, -mine.unsqueeze(-1).to(g.dtype))
        return g * (grad / count), None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, target: torch.Tensor, group_name: str = "0", *,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits split by vocabulary across the group (rank r holds classes
    ``[r V/n, (r+1) V/n)`` in its last dim), without gathering them: the loss on every rank, each rank's
    gradient for its own slice.

    Args:
        local_logits: ``[..., V / n]`` this rank's slice (``megatron_graph(..., vocab_parallel_outputs=True)``).
        target: ``[...]`` class ids in ``[0, V)`` (``ignore_index`` skipped).
        group_name: the tensor-parallel process group.

    Example:
        >>> loss_fn = lambda out, t: vocab_parallel_cross_entropy(out.logits, t, "0")   # doctest: +SKIP
    """
    return _VocabParallelCrossEntropy.apply(local_logits, target, group_name, ignore_index)


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


def megatron_graph(module: torch.fx.GraphModule, *, group_name: str, param_shards: dict,
                   vocab_parallel_outputs: bool = False) -> torch.fx.GraphModule:
    """A copy of shard ``module`` (same parameters) whose collectives are Megatron's f and g on ``group_name``.

    Args:
        module: a shard of a tensor plan (``plan.stages[r].module``).
        group_name: the process group to reduce over (``dist.group.WORLD.group_name`` for the default).
        param_shards: attribute name -> ``Shard`` of the parameters split when the shard was built
            (``plan.sharding.param_shards``); their gradients are local and never reduced.
        vocab_parallel_outputs: keep outputs split by vocabulary (an LM head's logits) as each rank's slice
            instead of gathering them, for ``vocab_parallel_cross_entropy``.

    Returns:
        A new ``GraphModule`` sharing ``module``'s parameters and buffers.
    """
    gm = torch.fx.GraphModule(module, copy.deepcopy(module.graph), class_name=type(module).__name__)
    graph = gm.graph
    for node in list(graph.nodes):       # parameters whose parts groups of shards share
        shard = param_shards.get(node.target) if node.op == "get_attr" else None
        if shard is not None and any(rep > 1 for _, rep in (shard.segments or [(0, shard.rep)])):
            with graph.inserting_after(node):
                layout = (shard.dim, shard.blocks, shard.rep, tuple(shard.segments))
                summed = graph.call_function(sum_in_replicas, (node, layout, group_name))
            summed.meta = dict(node.meta)
            node.replace_all_uses_with(summed, delete_user_cb=lambda user: user is not summed)
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
                if reduce.target is ALL_REDUCE:
                    g = graph.call_function(reduce_from_region, (reduce.args[0], group_name))
                elif vocab_parallel_outputs:          # the slice stays local: movedim there and back cancel
                    g = graph.call_function(torch.ops.aten.alias.default, (reduce.args[0],))
                else:
                    g = graph.call_function(gather_from_region, (reduce.args[0], reduce.args[1], group_name))
            g.meta = dict(node.meta)
            node.replace_all_uses_with(g)
            graph.erase_node(node)
            if not reduce.users:
                graph.erase_node(reduce)
    _copy_where_written(graph)
    leftover = [n.format_node() for n in graph.nodes if n.target in (ALL_REDUCE, ALL_GATHER, WAIT)]
    if leftover:
        raise ValueError(f"megatron_graph: collectives it cannot pair (all_reduce or all_gather_into_tensor, then "
                         f"wait_tensor): {leftover[:4]}")
    graph.lint()
    gm.recompile()
    log.debug("shard graph with f/g: %d f, %d g", len(entered),
              sum(n.target is reduce_from_region for n in graph.nodes))
    return gm


def _copy_where_written(graph: torch.fx.Graph) -> None:
    """f returns a view of its input (identity forward); autograd forbids writing in place into a custom
    Function's view output (RegNet's in-place ReLU on a slice of it). Such an f gets a copy first."""
    written = {w for node in graph.nodes for w in written_bases(node)}
    for node in [n for n in graph.nodes if n.target in (copy_to_region, sum_in_replicas) and n in written]:
        copy_for_writers(graph, node, after=node)


def join_shards(parts: list[torch.Tensor], shard) -> torch.Tensor:
    """The full tensor from every rank's slice under ``shard`` (its parts in order; a part shared by ``rep``
    ranks is taken once)."""
    return join_shards_like(parts, shard, lambda pieces, d: torch.cat(pieces, dim=d))
