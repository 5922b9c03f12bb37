"""``recompute``: fit a training step under a peak-memory budget by recomputing activations.

Reads a model (captured with ``capture``) and example inputs; returns a new
``GraphModule`` that shares the model's parameters and whose contiguous regions of
the ATen graph (one per block: a run of nodes under one ``ModuleList``/``Sequential``
child, from ``nn_module_stack``) are fused into submodules and run under
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, with a selective
checkpoint policy (``create_selective_checkpoint_contexts``) that keeps the outputs of
the chosen matmul/attention nodes (``MUST_SAVE``) and recomputes the rest
(``PREFER_RECOMPUTE``). The original graph is not modified; the plan is in
``module.meta["fxpart.recompute"]`` (a ``RecomputePlan``).

The budget is on the peak of one training step as ``passes.simulate`` measures it:
parameters, buffers, inputs, activations, gradients and transient buffers of the
forward, the loss and the backward. The optimizer's state and step are outside it
(simulate with ``optimizer=`` to add them).

The search: every region has levels of increasing recomputation: 0 = no checkpoint,
1 = checkpoint saving every matmul/attention output (recomputes only 0-FLOP ops:
norms, pointwise, views), then one more matmul/attention output recomputed per level,
most bytes per FLOP first, down to a plain checkpoint (everything recomputed). A greedy
walk raises the level with the most predicted bytes freed per extra FLOP (0-FLOP moves
first), checks each candidate that is predicted to fit with the fake-tensor simulator
(exact peak, backward recomputation included), then drops moves the budget does not
need, most FLOPs first.
"""
from __future__ import annotations

import copy
import logging
import re
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.fx
from torch import nn
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ._keys import CAPTURE
from ._util import format_bytes, format_count
from .capture import capture, normalize_inputs
from .simulate import StepTrace, simulate

__all__ = ["recompute", "RecomputePlan"]

log = logging.getLogger(__name__)

PLAN = "fxpart.recompute"
_MAX_SIMULATIONS = 40


@dataclass(frozen=True)
class RecomputePlan:
    """What ``recompute`` chose: per region, the level and the node outputs it keeps."""
    regions: tuple[str, ...]                 # region names ("blocks.0", ...), in graph order
    levels: tuple[int, ...]                  # 0: no checkpoint, 1: save all matmuls, ..., n_levels - 1: save nothing
    saved_nodes: tuple[tuple[str, ...] | None, ...]   # per region: node outputs kept (None: no checkpoint)
    peak_bytes: int                          # simulated peak of the step
    baseline_peak_bytes: int                 # simulated peak without recomputation
    extra_flops: int                         # recomputed FLOPs (forward ops rerun in the backward)
    baseline_flops: int                      # forward + backward FLOPs without recomputation

    def __post_init__(self):
        if not len(self.regions) == len(self.levels) == len(self.saved_nodes):
            raise ValueError("regions, levels and saved_nodes must have one entry per region")

    def __str__(self) -> str:
        lines = [f"recompute: peak {format_bytes(self.peak_bytes)} (from {format_bytes(self.baseline_peak_bytes)}), "
                 f"+{format_count(self.extra_flops, 'FLOP')} "
                 f"(+{100 * self.extra_flops / max(self.baseline_flops, 1):.1f}%)"]
        for name, level, saved in zip(self.regions, self.levels, self.saved_nodes):
            what = "saved as is" if saved is None else (
                "recomputed (checkpoint)" if not saved else "checkpoint keeping " + ", ".join(saved))
            lines.append(f"  {name}: level {level}, {what}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


# -- regions and their levels -------------------------------------------------------------

@dataclass
class _Region:
    name: str
    nodes: list[torch.fx.Node]
    order: list[str]          # flop nodes, the first recomputed first
    gains: list[int]          # predicted bytes freed by each level step (len = n_levels - 1)
    costs: list[int]          # extra FLOPs of each level step

    def saved(self, level: int) -> tuple[str, ...] | None:
        return None if level == 0 else tuple(self.order[level - 1:])


def _region_key(node: torch.fx.Node) -> str | None:
    """The path of the first indexed module (a ``ModuleList``/``Sequential`` child) holding ``node``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = path.removeprefix("L['self'].").replace("L['self']", "")
    match = re.match(r"^(.*?(?:^|\.)\d+)(?:\.|$)", path)
    return match.group(1) if match else None


def _find_regions(gm: torch.fx.GraphModule, trace: StepTrace) -> list[_Region]:
    """Maximal runs of compute nodes under one indexed module, with their level table."""
    runs: list[tuple[str, list[torch.fx.Node]]] = []
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
        if key is None or key in seen:    # a module entered twice is left as is
            continue
        seen.add(key)
        regions.append(_level_table(key, nodes, trace))
    return [r for r in regions if r.order or sum(r.gains)]


def _level_table(name: str, nodes: list[torch.fx.Node], trace: StepTrace) -> _Region:
    """Levels of one region, with predicted bytes freed and FLOPs added by each step."""
    costs = {n.name: trace.nodes[n.name] for n in nodes}
    needed = _needed_in_backward(nodes, costs)
    flop_nodes = [n.name for n in nodes
                  if costs[n.name].flops > 0 and costs[n.name].output_bytes > 0 and n.name in needed]
    # most bytes freed per recomputed FLOP first
    order = sorted(flop_nodes, key=lambda n: -costs[n].output_bytes / costs[n].flops)
    saved = sum(c.saved_bytes for c in costs.values())
    kept = sum(costs[n].output_bytes for n in flop_nodes)
    gains = [max(saved - kept, 0)] + [costs[n].output_bytes for n in order]
    return _Region(name, nodes, order, gains, [0] + [costs[n].flops for n in order])


def _needed_in_backward(nodes: list[torch.fx.Node], costs: dict) -> set[str]:
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


# -- building a candidate -----------------------------------------------------------------

class _Checkpointed(nn.Module):
    """Runs a fused region under non-reentrant checkpoint, keeping the outputs of ``saved`` nodes."""

    def __init__(self, region: torch.fx.GraphModule, saved: tuple[str, ...]):
        super().__init__()
        self.region = region
        self.saved = frozenset(saved)

    def forward(self, *args):
        if not self.saved:
            return checkpoint(self.region, *args, use_reentrant=False)
        current = [None]   # the region node now running: the policy decides per node
        context_fn = partial(create_selective_checkpoint_contexts, partial(_policy, self.saved, current))
        return checkpoint(_run_naming_nodes, self.region, current, *args, use_reentrant=False,
                          context_fn=context_fn)


def _policy(saved: frozenset, current: list, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # views cost nothing to redo and alias what they view
    if current[0] in saved and not op.is_view:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class _NamingInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, current: list):
        super().__init__(gm, garbage_collect_values=True)
        self.current = current

    def run_node(self, node: torch.fx.Node) -> Any:
        self.current[0] = node.name
        return super().run_node(node)


def _run_naming_nodes(region: torch.fx.GraphModule, current: list, *args):
    return _NamingInterpreter(region, current).run(*args)


def _build(gm: torch.fx.GraphModule, regions: list[_Region], levels: list[int]) -> torch.fx.GraphModule:
    """A copy of ``gm`` (sharing its parameters) with each region above level 0 checkpointed."""
    graph = copy.deepcopy(gm.graph)
    new = torch.fx.GraphModule(gm, graph)
    new.meta.update({k: v for k, v in gm.meta.items() if k == CAPTURE})
    by_name = {n.name: n for n in graph.nodes}
    chosen = [(r, lv) for r, lv in zip(regions, levels) if lv > 0]
    if not chosen:
        return new
    partitions = [{by_name[n.name]: None for n in r.nodes} for r, _ in chosen]
    new = fuse_by_partitions(new, partitions, prefix="_fxpart_region_", always_return_tuple=True)
    for i, (region, level) in enumerate(chosen):
        sub = getattr(new, f"_fxpart_region_{i}")
        setattr(new, f"_fxpart_region_{i}", _Checkpointed(sub, region.saved(level)))
    new.graph.lint()
    new.recompile()
    return new


# -- the search ---------------------------------------------------------------------------

class _Search:
    """Simulates candidates (memoized) for one model and budget."""

    def __init__(self, gm, args, kwargs, loss_fn, regions: list[_Region]):
        self.gm, self.args, self.kwargs, self.loss_fn, self.regions = gm, args, kwargs, loss_fn, regions
        self.cache: dict[tuple[int, ...], StepTrace] = {}

    def trace(self, levels) -> StepTrace:
        key = tuple(levels)
        if key not in self.cache:
            if len(self.cache) >= _MAX_SIMULATIONS:
                raise _OutOfSimulations
            candidate = _build(self.gm, self.regions, list(key))
            self.cache[key] = simulate(candidate, self.args, self.kwargs, training=True, loss_fn=self.loss_fn)
            log.debug("recompute: levels %s -> peak %s", key, format_bytes(self.cache[key].peak_bytes))
        return self.cache[key]

    def fits(self, levels, budget: int) -> bool:
        return self.trace(levels).peak_bytes <= budget

    def extra_flops(self, levels) -> int:
        return sum(r.costs[i] for r, lv in zip(self.regions, levels) for i in range(lv))


class _OutOfSimulations(Exception):
    pass


def _next_move(regions: list[_Region], levels: list[int]) -> int | None:
    """The region whose next level frees the most predicted bytes per extra FLOP (0-FLOP steps first)."""
    best, best_key = None, None
    for i, (region, level) in enumerate(zip(regions, levels)):
        if level >= len(region.gains):
            continue
        gain, cost = region.gains[level], region.costs[level]
        key = (cost == 0, gain / max(cost, 1), -i)
        if gain > 0 and (best_key is None or key > best_key):
            best, best_key = i, key
    return best


def _greedy(search: _Search, budget: int, baseline: int) -> list[int] | None:
    regions = search.regions
    levels = [0] * len(regions)
    offset = 0    # simulated minus predicted peak of the last simulated candidate
    while True:
        predicted = baseline - sum(sum(r.gains[:lv]) for r, lv in zip(regions, levels)) + offset
        if predicted <= budget:
            peak = search.trace(levels).peak_bytes
            if peak <= budget:
                return levels
            offset += peak - predicted
        move = _next_move(regions, levels)
        if move is None:
            return None
        levels[move] += 1


def _prune(search: _Search, levels: list[int], budget: int) -> list[int]:
    """Undo level steps the budget does not need, the most FLOPs first."""
    levels = list(levels)
    tried = set()
    while True:
        steps = sorted(((r.costs[lv - 1], -i, i) for i, (r, lv) in enumerate(zip(search.regions, levels))
                        if lv > 0 and (i, lv) not in tried), reverse=True)
        if not steps:
            return levels
        _, _, i = steps[0]
        tried.add((i, levels[i]))
        trial = list(levels)
        trial[i] -= 1
        try:
            if search.fits(trial, budget):
                levels = trial
        except _OutOfSimulations:
            return levels


def recompute(model_or_gm: nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None, *,
              peak_bytes: int, loss_fn: Callable | None = None) -> torch.fx.GraphModule:
    """A module computing what the model does whose training step peaks at or under ``peak_bytes``.

    Activations are recomputed in the backward (PyTorch's non-reentrant checkpoint with a
    selective per-op policy) instead of being saved, as little as the budget allows.

    Args:
        model_or_gm: an ``nn.Module`` or a graph from ``capture``.
        example_inputs, example_kwargs: the example batch the budget is for.
        peak_bytes: budget for the peak of one forward + loss + backward: parameters, buffers,
            inputs, activations, gradients and temporaries (optimizer state excluded).
        loss_fn: reduces the outputs to the loss; None sums every floating-point output.

    Returns:
        A ``GraphModule`` sharing the model's parameters, called like the model, with the
        same outputs and gradients; its plan is ``module.meta["fxpart.recompute"]``.

    Raises:
        ValueError: the budget cannot be met; the message names the smallest reachable peak.

    Example:
        >>> from passes.zoo import tiny_gpt
        >>> model, inputs = tiny_gpt(n_layers=2)
        >>> base = estimate(model, inputs, training=True).peak_bytes
        >>> fitted = recompute(model, inputs, peak_bytes=int(0.7 * base))
        >>> estimate(fitted, inputs, training=True).peak_bytes <= 0.7 * base
        True
    """
    if not isinstance(peak_bytes, (int, float)) or peak_bytes <= 0:
        raise ValueError(f"peak_bytes must be a positive number of bytes, got {peak_bytes!r}")
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    gm = capture(model_or_gm, args, kwargs)
    base = simulate(gm, args, kwargs, training=True, loss_fn=loss_fn)
    regions = _find_regions(gm, base)
    search = _Search(gm, args, kwargs, loss_fn, regions)
    search.cache[(0,) * len(regions)] = base
    if base.peak_bytes <= peak_bytes:
        levels = [0] * len(regions)
    else:
        try:
            levels = _greedy(search, peak_bytes, base.peak_bytes)
        except _OutOfSimulations:
            levels = None
        if levels is None:
            raise ValueError(_unreachable(search, peak_bytes, base.peak_bytes))
        levels = _prune(search, levels, peak_bytes)
    return _finish(search, levels, base)


def _unreachable(search: _Search, budget: int, baseline: int) -> str:
    full = tuple(len(r.gains) for r in search.regions)
    search.cache.pop(full, None)   # always simulated, even past the simulation limit
    search.cache[full] = simulate(_build(search.gm, search.regions, list(full)), search.args, search.kwargs,
                                  training=True, loss_fn=search.loss_fn)
    smallest = min(t.peak_bytes for t in search.cache.values())
    return (f"recompute: peak_bytes={budget} ({format_bytes(budget)}) cannot be met; the smallest reachable "
            f"peak is {smallest} bytes ({format_bytes(smallest)}), from {format_bytes(baseline)} without "
            f"recomputation ({len(search.regions)} regions, every one fully recomputed). Raise peak_bytes to at "
            f"least {smallest}, or shrink the batch")


def _finish(search: _Search, levels: list[int], base: StepTrace) -> torch.fx.GraphModule:
    module = _build(search.gm, search.regions, levels)
    trace = search.trace(levels)
    module.meta[PLAN] = RecomputePlan(
        regions=tuple(r.name for r in search.regions), levels=tuple(levels),
        saved_nodes=tuple(r.saved(lv) for r, lv in zip(search.regions, levels)),
        peak_bytes=trace.peak_bytes, baseline_peak_bytes=base.peak_bytes,
        extra_flops=trace.total_flops + trace.total_backward_flops - base.total_flops - base.total_backward_flops,
        baseline_flops=base.total_flops + base.total_backward_flops)
    log.debug("%s", module.meta[PLAN])
    return module
