"""``recompute``: fit a training step under a peak-memory budget by recomputing activations.

Reads a model (captured with ``capture``) and example inputs; returns a new
``GraphModule`` that shares the model's parameters and whose regions (one per block) are
fused into submodules run under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``
with a selective policy keeping the outputs of chosen matmul/attention nodes
(``passes._recompute_regions``: regions, levels, what a checkpoint keeps and why). The
original graph is not modified; the plan is in ``module.meta["fxpart.recompute"]`` (a
``RecomputePlan``).

The budget is on the peak of one training step as ``passes.simulate`` measures it, which
is what the allocator sees: parameters, buffers, inputs, activations, gradients, transient
buffers of the forward, the loss and the backward, and the copies kernels make inside
themselves. The optimizer's state and step are outside it (simulate with ``optimizer=`` to
add them).

The search walks one path of candidates, from no recomputation to every region at its
last level: each step raises one region to the level with the most predicted bytes freed
per extra FLOP, looking ahead over its higher levels (0-FLOP steps first). The path depends
on the model, not on the budget. Along it, a candidate is simulated with fake tensors
(exact peak, backward recomputation included) when its predicted peak, corrected by the
last simulated error, fits; if no simulated one fits, every candidate on the path is
simulated. So a budget fails only below the smallest peak on the path, which the error
names, and every budget at or above it is met. Then level steps the budget does not need
are undone, most FLOPs first, and the fitting candidate with the fewest simulated FLOPs is
returned.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.fx
from torch import nn

from ._recompute_regions import Region, build, find_regions, rng_state_bytes
from ._util import format_bytes, format_count
from .capture import capture, normalize_inputs
from .simulate import StepTrace, simulate

__all__ = ["recompute", "RecomputePlan"]

log = logging.getLogger(__name__)

PLAN = "fxpart.recompute"
_MAX_PRUNE_TRIALS = 24    # simulations spent undoing unneeded steps once a candidate fits


@dataclass(frozen=True)
class RecomputePlan:
    """What ``recompute`` chose: per region, the level and the nodes whose outputs it keeps."""
    regions: tuple[str, ...]                 # region names ("blocks.0", ...), in graph order
    levels: tuple[int, ...]                  # 0: no checkpoint, 1: keep all matmuls, ..., last: keep nothing
    saved_nodes: tuple[tuple[str, ...] | None, ...]   # per region: nodes kept (None: no checkpoint)
    peak_bytes: int                          # simulated peak of the step (and generator states checkpoints keep)
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


# -- the search ---------------------------------------------------------------------------

Levels = tuple[int, ...]


class _Search:
    """The path of candidates for one model, and their simulated steps (memoized)."""

    def __init__(self, gm, args, kwargs, loss_fn, regions: list[Region], base: StepTrace):
        self.gm, self.args, self.kwargs, self.loss_fn, self.regions = gm, args, kwargs, loss_fn, regions
        self.base = base
        self.path = _path(regions)
        self.traces: dict[Levels, StepTrace] = {self.path[0]: base}
        self.rng_state_bytes = rng_state_bytes(gm)

    def trace(self, levels: Levels) -> StepTrace:
        if levels not in self.traces:
            candidate = build(self.gm, self.regions, levels)
            self.traces[levels] = simulate(candidate, self.args, self.kwargs, training=True, loss_fn=self.loss_fn)
            log.debug("recompute: levels %s -> peak %s", levels, format_bytes(self.traces[levels].peak_bytes))
        return self.traces[levels]

    def peak(self, levels: Levels) -> int:
        """The simulated peak, plus the generator states the checkpoints of random regions keep (the
        simulator does not see them: no dispatched op allocates them)."""
        random = sum(lv > 0 and r.draws_random for r, lv in zip(self.regions, levels))
        return self.trace(levels).peak_bytes + random * self.rng_state_bytes

    def predicted(self, levels: Levels) -> int:
        return self.base.peak_bytes - sum(sum(r.gains[:lv]) for r, lv in zip(self.regions, levels))

    def flops(self, levels: Levels) -> int:
        trace = self.traces[levels]
        return trace.total_flops + trace.total_backward_flops

    def cheapest_fitting(self, budget: float) -> Levels:
        """Of the simulated candidates that fit, the one with the fewest FLOPs (then the lowest peak)."""
        fitting = [lv for lv in self.traces if self.peak(lv) <= budget]
        return min(fitting, key=lambda lv: (self.flops(lv), self.peak(lv)))


def _path(regions: list[Region]) -> list[Levels]:
    """Candidates from no recomputation to every region at its last level, one move at a time."""
    levels = [0] * len(regions)
    path = [tuple(levels)]
    while (move := _next_move(regions, levels)) is not None:
        region, level = move
        levels[region] = level
        path.append(tuple(levels))
    return path


def _next_move(regions: list[Region], levels: list[int]) -> tuple[int, int] | None:
    """(region, level to raise it to) with the most predicted bytes freed per extra FLOP, 0-FLOP moves
    first. Every higher level of a region is looked at: a step that frees nothing by itself (keeping
    an attention's scores costs what recomputing its softmax frees) may open steps that do."""
    best, best_key = None, None
    for i, (region, level) in enumerate(zip(regions, levels)):
        gain = cost = 0
        for target in range(level + 1, region.n_levels):
            gain += region.gains[target - 1]
            cost += region.costs[target - 1]
            key = (cost == 0 and gain > 0, gain / max(cost, 1))
            if best_key is None or key > best_key:
                best, best_key = (i, target), key
    return best


def _walk(search: _Search, budget: float) -> Levels | None:
    """The first candidate on the path that fits, simulating those predicted to fit first."""
    offset = 0    # simulated minus predicted peak of the last simulated candidate
    for levels in search.path[1:]:
        if search.predicted(levels) + offset <= budget:
            peak = search.peak(levels)
            if peak <= budget:
                return levels
            offset = peak - search.predicted(levels)
    for levels in search.path[1:]:   # the predictions missed it, if anything fits: try every candidate
        if search.peak(levels) <= budget:
            return levels
    return None


def _prune(search: _Search, levels: Levels, budget: float) -> None:
    """Simulate the candidate with each level step undone that the budget may not need, most FLOPs first."""
    current, tried, trials = list(levels), set(), 0
    while trials < _MAX_PRUNE_TRIALS:
        steps = sorted(((r.costs[lv - 1], -i) for i, (r, lv) in enumerate(zip(search.regions, current))
                        if lv > 0 and (i, lv) not in tried), reverse=True)
        if not steps:
            return
        i = -steps[0][1]
        tried.add((i, current[i]))
        trial = list(current)
        trial[i] -= 1
        trials += tuple(trial) not in search.traces
        if search.peak(tuple(trial)) <= budget:
            current = trial


def recompute(model_or_gm: nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None, *,
              peak_bytes: int, loss_fn: Callable | None = None) -> torch.fx.GraphModule:
    """A module computing what the model does whose training step peaks at or under ``peak_bytes``.

    Activations are recomputed in the backward (PyTorch's non-reentrant checkpoint with a
    selective per-op policy) instead of being saved, as little as the budget allows. Random
    ops (dropout) are recomputed from the random state the checkpoint saved, so they draw
    the numbers the forward drew.

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
        ValueError: the budget cannot be met; the message names the smallest reachable peak,
            and every budget at or above it is met.

    Example:
        >>> from passes.zoo import tiny_gpt
        >>> model, inputs = tiny_gpt(n_layers=2)
        >>> base = estimate(model, inputs, training=True).peak_bytes
        >>> fitted = recompute(model, inputs, peak_bytes=int(0.7 * base))
        >>> estimate(fitted, inputs, training=True).peak_bytes <= 0.7 * base
        True
    """
    if isinstance(peak_bytes, bool) or not isinstance(peak_bytes, (int, float)) or peak_bytes <= 0:
        raise ValueError(f"peak_bytes must be a positive number of bytes, got {peak_bytes!r}")
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    gm = capture(model_or_gm, args, kwargs)
    base = simulate(gm, args, kwargs, training=True, loss_fn=loss_fn)
    search = _Search(gm, args, kwargs, loss_fn, find_regions(gm, base), base)
    if base.peak_bytes > peak_bytes:
        levels = _walk(search, peak_bytes)
        if levels is None:
            raise ValueError(_unreachable(search, peak_bytes))
        _prune(search, levels, peak_bytes)
    return _finish(search, search.cheapest_fitting(peak_bytes))


def _unreachable(search: _Search, budget: float) -> str:
    smallest = min(search.peak(levels) for levels in search.path)
    if not search.regions:
        where = ("no region to recompute: no node runs under an indexed module (a ModuleList or Sequential "
                 "child), or every such run writes in place into a value from outside it")
    else:
        where = (f"over {len(search.path)} candidates, from saving everything to recomputing all "
                 f"{len(search.regions)} regions ({search.regions[0].name} ... {search.regions[-1].name})")
    return (f"recompute: peak_bytes={budget} ({format_bytes(budget)}) cannot be met; the smallest reachable "
            f"peak is {smallest} bytes ({format_bytes(smallest)}), from {format_bytes(search.base.peak_bytes)} "
            f"without recomputation ({where}). Raise peak_bytes to at least {smallest}, or shrink the batch")


def _finish(search: _Search, levels: Levels) -> torch.fx.GraphModule:
    module = build(search.gm, search.regions, levels)
    module.meta[PLAN] = RecomputePlan(
        regions=tuple(r.name for r in search.regions), levels=levels,
        saved_nodes=tuple(r.kept(lv) for r, lv in zip(search.regions, levels)),
        peak_bytes=search.peak(levels), baseline_peak_bytes=search.base.peak_bytes,
        extra_flops=search.flops(levels) - search.flops(search.path[0]),
        baseline_flops=search.flops(search.path[0]))
    log.debug("%s", module.meta[PLAN])
    return module
