"""Data parallelism of one stage (or tensor shard) across its replicas, in a plan's two modes.

Reads a stage's module and its data-parallel process group; writes gradients (replicate) or
wraps the module (shard).

* ``replicate``: every replica holds the stage's parameters; ``GradSync`` averages gradients
  over the replicas the way DDP does: parameters in buckets (about 25 MiB, in reverse order of
  first use, the order backward finishes them), and a bucket's all-reduce starts, without
  waiting, as soon as the last micro-batch's backward has produced every gradient in it, so
  communication overlaps the rest of the backward. DDP itself cannot serve a pipeline stage:
  its reducer expects each forward's backward before the next forward, which 1F1B breaks.
* ``shard`` (ZeRO-3 / FSDP2): ``torch.distributed.fsdp.fully_shard`` splits parameters,
  gradients and optimizer state over the replicas, gathers parameters before use and
  reduce-scatters gradients; ``set_requires_gradient_sync`` keeps the gradients of all but the
  last micro-batch local. As torchtitan wraps each transformer block, the stage's graph is
  split into one submodule per block (``split_by_block``), each its own FSDP group, so one
  block's parameters are gathered at a time and the next block's gather overlaps the current
  block's compute; what lies outside blocks stays with the stage's root group, and a
  parameter several blocks read (a tied embedding and head) is kept whole on every replica with
  its gradient averaged like a replicated one (``replicated_params``). A lone stage reshards after its forward; a
  pipeline stage keeps its parameters gathered across its micro-batches (as torchtitan does
  with pipelining).
"""
from __future__ import annotations

import warnings

import torch
import torch.utils.checkpoint
import torch.distributed as dist

__all__ = ["GradSync", "shard_module", "BUCKET_BYTES"]

BUCKET_BYTES = 25 * 2**20


class GradSync:
    """Bucketed, overlapped gradient averaging over a data-parallel group.

    ``arm()`` before the last backward of a step; ``finish()`` after it waits for every bucket
    and leaves each parameter's ``.grad`` averaged over the group.
    """

    def __init__(self, params: list[torch.nn.Parameter], group, *, bucket_bytes: int = BUCKET_BYTES):
        self.group = group
        self.size = dist.get_world_size(group)
        self.buckets: list[list[torch.nn.Parameter]] = []
        current, nbytes = [], 0
        for p in reversed([p for p in params if p.requires_grad]):
            current.append(p)
            nbytes += p.numel() * p.element_size()
            if nbytes >= bucket_bytes:
                self.buckets.append(current)
                current, nbytes = [], 0
        if current:
            self.buckets.append(current)
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self._pending: list[int] = [0] * len(self.buckets)
        self._works: dict[int, tuple] = {}
        self._armed = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready) for b in self.buckets for p in b]

    def arm(self) -> None:
        """The next backward is the step's last: launch each bucket as soon as its gradients are final."""
        self._armed = True
        self._pending = [len(b) for b in self.buckets]
        self._works = {}

    def _ready(self, param: torch.nn.Parameter) -> None:
        if not self._armed:
            return
        i = self._bucket_of[id(param)]
        self._pending[i] -= 1
        if self._pending[i] == 0:
            self._launch(i)

    def _launch(self, i: int) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.buckets[i]]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self._works[i] = (dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True), flat)

    def finish(self) -> None:
        """Wait for every bucket (launching any a parameter's missing gradient held back) and average."""
        if self.size == 1:
            self._armed = False
            return
        for i in range(len(self.buckets)):
            if i not in self._works:
                self._launch(i)
        for i, (work, flat) in sorted(self._works.items()):
            work.wait()
            flat /= self.size
            offset = 0
            for p in self.buckets[i]:
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p).clone() if p.grad is None else \
                    p.grad.copy_(flat[offset:offset + n].view_as(p))
                offset += n
        self._works = {}
        self._armed = False


def shard_module(module: torch.fx.GraphModule, device_mesh, *, reshard_after_forward: bool,
                 recompute: bool = False, keep_whole: tuple = ()) -> torch.nn.Module:
    """``fully_shard`` a stage's graph over the data-parallel axis of ``device_mesh`` (FSDP2), one group per block.

    Returns the wrapping module (``Units``); ``original_names(module)`` maps its parameter and
    buffer names back to the stage graph's, ``replicated_params(module)`` lists the parameters
    left whole (read by several blocks, or named in ``keep_whole``: a weight tied across stages,
    whose gradient is summed with the other stages' whole), whose gradients the caller averages.
    """
    from torch.distributed.fsdp import fully_shard
    units = split_by_block(module, recompute=recompute)
    # FSDP2 warns for every unit returning a view: an in-place op on it would drop the unit's pre-backward
    # hook. A unit works on a copy of any input it writes in place (_copy_written_inputs), and the Runner
    # refuses a loss_fn that writes the outputs in place, so the warning is silenced for our units only.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \((FSDPUnit\d+|FSDPUnits)\) returned a view",
                            category=UserWarning)
    shared = units.shared_params() | set(keep_whole)
    for unit in units.units:
        own = list(unit.parameters())
        if own and any(p not in shared for p in own):
            fully_shard(unit, mesh=device_mesh, reshard_after_forward=reshard_after_forward,
                        ignored_params={p for p in own if p in shared} or None)
    # in the module's order, the same on every replica (a set's order follows object ids, which differ between
    # processes, and GradSync all-reduces its buckets element by element)
    units.meta["fxpart.replicated"] = list({id(p): p for p in units.parameters() if p in shared}.values())
    return fully_shard(units, mesh=device_mesh, reshard_after_forward=reshard_after_forward,
                       ignored_params=shared or None)


def replicated_params(module: torch.nn.Module) -> list:
    """Parameters a sharded stage keeps whole on every replica (see ``shard_module``)."""
    meta = getattr(module, "meta", None)
    return list(meta.get("fxpart.replicated", [])) if isinstance(meta, dict) else []


class Units(torch.nn.Module):
    """A stage's graph as a sequence of GraphModules (one per block, and the parts between) run in turn.

    Each unit holds the parameters its nodes read; values live across a boundary are passed
    along (``partitioner.graph_split``), so the units together compute what the graph does.
    Units in ``recompute`` keep only their inputs for backward and run their forward again there
    (``Recomputed``: ``torch.utils.checkpoint``, non-reentrant, random state replayed, so dropout
    draws the same).
    """

    def __init__(self, units: list[torch.fx.GraphModule], names: dict, recompute: tuple = ()):
        super().__init__()
        # recomputed units are wrapped before any fully_shard, so FSDP's gathers sit outside the
        # checkpointed region and run again when it does (as torchtitan orders AC and FSDP)
        self.units = torch.nn.ModuleList(Recomputed(u) if i in recompute else u for i, u in enumerate(units))
        self.meta = {"fxpart.names": names}

    def forward(self, *args):
        values = args
        for i, unit in enumerate(self.units):
            values = unit(*values)
            if i < len(self.units) - 1:
                values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
        return values

    def shared_params(self) -> set:
        """Parameters several units read (a tied embedding and head): left to the root's FSDP group."""
        seen, shared = set(), set()
        for unit in self.units:
            for p in unit.parameters():
                (shared if p in seen else seen).add(p)
        return shared


class Recomputed(torch.nn.Module):
    """A module that keeps only its inputs for backward and runs its forward again there."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.inner(*args)
        return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False)


def _copy_written_inputs(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` working on a copy of each input it writes in place (directly or through a view of it).

    FSDP2 passes a unit's inputs through an autograd function and hooks its outputs; autograd forbids
    writing in place into that function's outputs, and a write into a view output drops the hook.
    """
    from passes._util import copy_for_writers, written_bases
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    written = {w for n in gm.graph.nodes for w in written_bases(n)}
    for node in (n for n in inputs if n in written):
        copy_for_writers(gm.graph, node, after=inputs[-1])
    if written & set(inputs):
        gm.recompile()
    return gm


def split_by_block(gm: torch.fx.GraphModule, *, recompute: bool = False) -> Units:
    """``gm`` cut where a block (``layers.3``) begins or ends, at the first place a cut is allowed.

    ``recompute``: the units that are blocks recompute their activations in backward (the plan's
    ``recompute`` decision; what ``PipelineCosts.checkpointed`` costs).
    """
    from partitioner.graph_split import ComputeOrder, build_stage
    from passes._util import block_path
    order = ComputeOrder.of(gm)
    ok = order.crossing()[2]
    for v in _parameter_views(gm):       # a unit's parameter is freed (resharded) once it has run
        if v in order.position:
            for k in range(order.position[v] + 1, min(order.last_use.get(v, -1), len(order)) + 1):
                ok[k] = False
    cuts, previous = [], None
    for k, node in enumerate(order.nodes):
        block = block_path(node)
        if block != previous and k > 0:
            cut = next((j for j in range(k, len(order)) if ok[j]), None)
            if cut is not None and (not cuts or cut > cuts[-1]) and 0 < cut < len(order):
                cuts.append(cut)
        previous = block
    bounds = [0] + cuts + [len(order)]
    units = [_copy_written_inputs(build_stage(order, s, e, name=f"Unit{i}"))
             for i, (s, e) in enumerate(zip(bounds, bounds[1:]))]
    blocks = tuple(i for i, (s, e) in enumerate(zip(bounds, bounds[1:]))
                   if sum(block_path(n) is not None for n in order.nodes[s:e]) * 2 > e - s)
    original = {id(t): name for name, t in list(gm.named_parameters(remove_duplicate=False)) +
                list(gm.named_buffers(remove_duplicate=False))}
    wrapper = Units(units, {}, recompute=blocks if recompute else ())
    wrapper.meta["fxpart.names"] = {name: original.get(id(t), name) for name, t in
                                    list(wrapper.named_parameters(remove_duplicate=False)) +
                                    list(wrapper.named_buffers(remove_duplicate=False))}
    return wrapper


def _parameter_views(gm: torch.fx.GraphModule) -> set:
    """Nodes whose value may share a parameter's storage: views of it (``t``, ``view``, ``expand``, a split's
    piece) and the tensor-parallel functions that pass it through (``copy_to_region``). Under FSDP such a
    value must not leave the unit that holds the parameter: the unit frees its gathered parameters after
    its forward, and the next unit would read freed memory."""
    from passes._util import fetch_attr
    views = {node for node in gm.graph.nodes
             if node.op == "get_attr" and isinstance(fetch_attr(gm, node.target), torch.nn.Parameter)}
    params = set(views)
    for node in gm.graph.nodes:
        if node.op != "call_function" or not node.args or node.args[0] not in views:
            continue
        others = [a for a in node.all_input_nodes if a is not node.args[0]]
        aliasing = getattr(node.target, "is_view", None)
        if not others and (aliasing or aliasing is None):    # a view op, getitem, or a Python function
            views.add(node)
    return views - params


def original_names(module: torch.nn.Module) -> dict:
    """Name in a (possibly wrapped) stage module -> the stage graph's own name (identity when not wrapped)."""
    meta = getattr(module, "meta", None)
    return meta.get("fxpart.names", {}) if isinstance(meta, dict) else {}
