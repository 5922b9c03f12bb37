"""The rewrite behind ``recompute``: regions of a captured graph, their levels, and the checkpointed module.

Reads a captured ``GraphModule`` and the ``StepTrace`` of its unmodified training step;
writes nothing on them. ``find_regions`` cuts the graph into regions (one per block: a
contiguous run of nodes under one ``ModuleList``/``Sequential`` child, from
``nn_module_stack``) and gives each a table of levels; ``build`` returns a copy of the graph
(sharing its parameters) in which every region above level 0 is fused into a submodule run
under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``.

Levels: 0 = no checkpoint; 1 = checkpoint keeping the outputs of every computing op (FLOPs
> 0: matmuls, attention) of the region's kept nodes and recomputing the rest (norms,
pointwise, views, dropout); each further level recomputes one more node, most bytes per
FLOP first; the last keeps nothing (a plain checkpoint).

What a checkpoint keeps is chosen per op by a selective checkpoint policy
(``create_selective_checkpoint_contexts``), which caches the op's output in the forward and
hands it back in the recomputation. Three kinds of op are never cached, so that the
recomputation is the forward again:

* ops that draw random numbers (dropout's ``bernoulli_``, fused attention with dropout):
  recomputed in the same order from the random state the checkpoint saved
  (``preserve_rng_state``), they draw the same numbers;
* ops that write into an argument (in place), and, from the graph, nodes whose output a later
  node writes into: a cached tensor must not change before the recomputation reads it (on the
  CPU, dropout fills an ``empty_like`` in place: caching it failed with "Tensor cached during
  selective activation checkpoint has been mutated");
* ops that compute nothing (views, copies, pointwise): cheaper to redo than to keep.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ._keys import CAPTURE
from ._util import block_path, written_bases
from .flops import count_flops
from .simulate import NodeTrace, StepTrace, _call_target

PREFIX = "_fxpart_region_"


@dataclass
class Region:
    """A run of graph nodes that is checkpointed as one, and what each of its levels predicts."""
    name: str                 # module path ("transformer.h.0")
    nodes: list[torch.fx.Node]
    order: list[str]          # nodes kept at level 1, the first recomputed first
    gains: list[int]          # predicted bytes freed by each level step (len = n_levels - 1; may be <= 0)
    costs: list[int]          # predicted extra FLOPs of each level step
    draws_random: bool        # its checkpoint keeps the random-number generators' states to replay them

    @property
    def n_levels(self) -> int:
        return len(self.gains) + 1

    def kept(self, level: int) -> tuple[str, ...] | None:
        """Nodes whose computing ops' outputs the checkpoint keeps (None: not checkpointed)."""
        return None if level == 0 else tuple(self.order[level - 1:])


def find_regions(gm: torch.fx.GraphModule, trace: StepTrace) -> list[Region]:
    """Maximal runs of compute nodes under one indexed module, with their level tables.

    A module entered twice, and a run that writes in place into a value from outside it (its
    recomputation would write again), are left as they are."""
    runs: list[tuple[str | None, list[torch.fx.Node]]] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        key = _region_key(node)
        if runs and runs[-1][0] == key:
            runs[-1][1].append(node)
        else:
            runs.append((key, [node]))
    regions, seen = [], set()
    for key, nodes in runs:
        if key is None or key in seen:
            continue
        seen.add(key)
        if _writes_outside(nodes):
            continue
        regions.append(_level_table(key, nodes, trace))
    return [r for r in regions if any(g > 0 for g in r.gains)]


def _region_key(node: torch.fx.Node) -> str | None:
    """The path of the first indexed module (a ``ModuleList``/``Sequential`` child) holding ``node``."""
    return block_path(node)


def _writes_outside(nodes: list[torch.fx.Node]) -> bool:
    inside = set(nodes)
    return any(w not in inside for n in nodes for w in written_bases(n))


def _level_table(name: str, nodes: list[torch.fx.Node], trace: StepTrace) -> Region:
    """Levels of one region, with predicted bytes freed and FLOPs added by each step."""
    costs: dict[str, NodeTrace] = {n.name: trace.nodes.get(n.name, NodeTrace()) for n in nodes}
    needed = _needed_in_backward(nodes, costs)
    written = {w.name for n in nodes for w in written_bases(n)}
    computing = [n.name for n in nodes if costs[n.name].flops > 0 and n.name in needed]
    keepable = [n for n in computing if costs[n].flop_output_bytes > 0 and n not in written]
    # most bytes freed per recomputed FLOP first
    order = sorted(keepable, key=lambda n: -costs[n].flop_output_bytes / costs[n].flops)
    saved = sum(c.saved_bytes for c in costs.values())
    kept = sum(costs[n].flop_output_bytes for n in order)
    never_kept = sum(costs[n].flops for n in computing if n not in keepable)
    return Region(name, nodes, order, gains=[saved - kept] + [costs[n].flop_output_bytes for n in order],
                  costs=[never_kept] + [costs[n].flops for n in order],
                  draws_random=any(_draws_random(n.target, n.args, n.kwargs) for n in nodes))


def _needed_in_backward(nodes: list[torch.fx.Node], costs: dict[str, NodeTrace]) -> set[str]:
    """Nodes the checkpoint's recomputation must rerun: those with a saved tensor at or after them
    in the region. The rest (e.g. the last matmul before a residual add) are never rerun, since
    non-reentrant checkpoint stops once every saved tensor is back, so keeping them buys nothing."""
    needed: set[str] = set()
    inside = {n.name for n in nodes}
    for node in reversed(nodes):
        # a region output is kept by its consumers outside, not recomputed
        saved_inside = costs[node.name].saved_bytes > 0 and all(u.name in inside for u in node.users)
        if saved_inside or any(u.name in needed for u in node.users if u.name in inside):
            needed.add(node.name)
    return needed


# -- the checkpointed module ----------------------------------------------------------------

class Checkpointed(nn.Module):
    """Runs a fused region under non-reentrant checkpoint, keeping the computing ops' outputs of ``kept`` nodes.

    ``preserve_rng_state``: save the random-number generators' states before the forward and
    restore them for the recomputation (a region that draws random numbers needs it; the states
    cost memory until the region's backward, 5 KiB for the CPU generator)."""

    def __init__(self, region: torch.fx.GraphModule, kept: tuple[str, ...], *, preserve_rng_state: bool):
        super().__init__()
        self.region = region
        self.kept = frozenset(kept)
        self.preserve_rng_state = preserve_rng_state

    def forward(self, *args):
        current = [None]   # the region node now running: the policy decides per node
        options = dict(use_reentrant=False, preserve_rng_state=self.preserve_rng_state)
        if self.kept:
            options["context_fn"] = partial(create_selective_checkpoint_contexts, partial(_policy, self.kept, current))
        return checkpoint(_run_region, self.region, current, *args, **options)


def _policy(kept: frozenset, current: list, ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if current[0] in kept and _keepable(func, args, kwargs, ctx.op_output):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _keepable(func, args: tuple, kwargs: dict, output: Any) -> bool:
    """An op whose output a checkpoint may cache: it computes, writes into nothing, draws no random numbers."""
    schema = getattr(func, "_schema", None)
    if schema is None or schema.is_mutable or _draws_random(func, args, kwargs):
        return False
    return count_flops(func, args, kwargs, output) > 0


def _draws_random(func, args: tuple, kwargs: dict) -> bool:
    """An op (or a graph node's target) that draws random numbers: a seeded op, unless it is a
    dropout or an attention whose dropout is off (``train=False``, ``p`` or ``dropout_p`` 0).
    Arguments that are graph nodes count as drawing."""
    if torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ()):
        return False
    values = {arg.name: args[i] if i < len(args) else kwargs.get(arg.name, arg.default_value)
              for i, arg in enumerate(func._schema.arguments)}
    if values.get("train") is False:
        return False
    p = values.get("dropout_p", values.get("p") if "dropout" in func._schema.name else None)
    return p is None or isinstance(p, torch.fx.Node) or bool(p)


class _NamingInterpreter(torch.fx.Interpreter):
    """Runs a region node by node, telling the policy which node is running."""

    def __init__(self, gm: torch.fx.GraphModule, current: list):
        super().__init__(gm, garbage_collect_values=True)
        self.current = current

    def run_node(self, node: torch.fx.Node) -> Any:
        self.current[0] = node.name
        return super().run_node(node)

    def call_function(self, target, args, kwargs):
        return _call_target(target, args, kwargs)   # on meta tensors, attention as a real device runs it


def _run_region(region: torch.fx.GraphModule, current: list, *args):
    return _NamingInterpreter(region, current).run(*args)


def rng_state_bytes(gm: torch.fx.GraphModule) -> int:
    """Bytes of the generator states a checkpoint preserving them keeps: the CPU's and each accelerator's."""
    devices = {t.device for t in list(gm.parameters()) + list(gm.buffers()) if t.device.type not in ("cpu", "meta")}
    return torch.get_rng_state().nbytes + sum(torch.get_device_module(d).get_rng_state(d).nbytes for d in devices)


def build(gm: torch.fx.GraphModule, regions: list[Region], levels: tuple[int, ...]) -> torch.fx.GraphModule:
    """A copy of ``gm`` (sharing its parameters) with each region above level 0 checkpointed."""
    graph = copy.deepcopy(gm.graph)
    new = torch.fx.GraphModule(gm, graph)
    new.meta.update({k: v for k, v in gm.meta.items() if k == CAPTURE})
    by_name = {n.name: n for n in graph.nodes}
    chosen = [(r, lv) for r, lv in zip(regions, levels) if lv > 0]
    if not chosen:
        return new
    partitions = [{by_name[n.name]: None for n in r.nodes} for r, _ in chosen]
    new = fuse_by_partitions(new, partitions, prefix=PREFIX, always_return_tuple=True)
    for i, (region, level) in enumerate(chosen):
        setattr(new, f"{PREFIX}{i}", Checkpointed(getattr(new, f"{PREFIX}{i}"), region.kept(level),
                                                  preserve_rng_state=region.draws_random))
    new.graph.lint()
    new.recompile()
    return new
