"""``fit_memory``: make one training step fit a memory limit as measured, not as estimated.

Reads a model and an example batch; runs real training steps (``monitor.measure_step``, on
copies) and returns a module whose measured step peaks at or under the limit, trying in turn:

* the model itself, when it already fits;
* ``recompute``'s module: activations recomputed in the backward, everything still trains
  (it shares the model's parameters);
* when recomputation cannot get there (the optimizer step's own peak, parameters with
  their gradients and state, is over the limit): a copy of the model with parts frozen
  (and adapters inserted) by ``finetune``;
* both: parts frozen for a looser budget, then recomputation of what is left.

Writes nothing on the model.

Each round hands the cost model a budget, builds the candidate, and measures its step. The
cost model can be a few percent off the device (allocator rounding and caching, kernels'
workspaces, buffers the simulation misses), so a measured overshoot tightens the next
round's budget by the measured-over-estimated ratio of the round, until the measured
peak fits or no strategy reaches the budget.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from torch import nn

from ._util import format_bytes, table
from .capture import normalize_inputs
from .estimate import estimate
from .finetune import finetune
from .monitor import measure_step
from .recompute import PLAN, recompute

__all__ = ["fit_memory", "FitResult", "FitRound"]

log = logging.getLogger(__name__)

_MARGIN = 0.005          # each tightened budget sits this fraction under the measured overshoot
STRATEGIES = ("recompute", "freeze", "freeze+recompute")
_LOOSER = (1.5, 1.2)     # freeze+recompute: what trains is chosen for these multiples of the budget


@dataclass(frozen=True)
class FitRound:
    """One round: the budget the cost model was given, what it built, its estimated and measured peaks."""
    strategy: str                       # "as is", "recompute", "freeze" or "freeze+recompute"
    budget_bytes: int                   # handed to recompute / finetune (the optimizer's state included)
    estimated_peak_bytes: int           # the cost model's peak of the round's step, optimizer included
    measured_peak_bytes: int            # a real step's
    what: str = ""                      # the recompute plan or the parts that train


@dataclass(frozen=True)
class FitResult:
    """Result of ``fit_memory``: the module, its measured peak, and every round it took."""
    module: nn.Module = field(repr=False)
    limit_bytes: int = 0
    measured_peak_bytes: int = 0
    rounds: tuple[FitRound, ...] = ()

    def __post_init__(self):
        if self.measured_peak_bytes > self.limit_bytes:
            raise ValueError(f"fit measured {self.measured_peak_bytes} B over its limit {self.limit_bytes} B")

    @property
    def strategy(self) -> str:
        return self.rounds[-1].strategy if self.rounds else "as is"

    def __str__(self) -> str:
        rows = [(i, r.strategy, format_bytes(r.budget_bytes), format_bytes(r.estimated_peak_bytes),
                 format_bytes(r.measured_peak_bytes), "yes" if r.measured_peak_bytes <= self.limit_bytes else "no",
                 r.what) for i, r in enumerate(self.rounds)]
        head = (f"fit_memory: measured peak {format_bytes(self.measured_peak_bytes)} under the limit "
                f"{format_bytes(self.limit_bytes)} by {self.strategy}, {len(self.rounds)} rounds")
        return head + "\n\n" + table(["round", "strategy", "budget", "estimated", "measured", "fits", "what"], rows,
                                     align="rlrrrll")

    def to_dict(self) -> dict:
        return {"limit_bytes": self.limit_bytes, "measured_peak_bytes": self.measured_peak_bytes,
                "rounds": [asdict(r) for r in self.rounds]}


def fit_memory(model: nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None, *, limit: int,
               loss_fn: Callable | None = None, optimizer: str | None = "adamw", max_rounds: int = 8,
               measure: Callable[..., int] | None = None) -> FitResult:
    """Make one training step of ``model`` fit ``limit`` bytes as measured on its device.

    Recomputation first (the same parameters all train), then freezing what trains; each
    candidate is checked with a real step and the budget tightened until the measured peak fits.

    Args:
        model: an eager ``nn.Module`` on the device to fit (CPU: every storage the step
            allocates is followed; CUDA: the caching allocator's peak).
        example_inputs, example_kwargs: the training batch.
        limit: bytes the step may peak at: parameters, gradients, optimizer state (``optimizer``),
            activations and temporaries.
        loss_fn: reduces the model's outputs to the loss; None sums floating-point outputs.
        optimizer: "adamw", "sgd" or None.
        max_rounds: measured steps at most, the unmodified one included.
        measure: ``measure(module, args, kwargs, optimizer=..., loss_fn=...) -> bytes``; the
            default is ``measure_step(...).peak_bytes`` on a copy of the module.

    Returns:
        A ``FitResult``: ``.module`` (called like the model), ``.measured_peak_bytes``, ``.rounds``.

    Raises:
        ValueError: no round fit; the message names the smallest peak measured and estimated,
            and what would fit.

    Example:
        >>> model, inputs = tiny_gpt(n_layers=2, seq=128)
        >>> peak = measure_step(model, inputs).peak_bytes
        >>> fit = fit_memory(model, inputs, limit=int(0.8 * peak))
        >>> fit.measured_peak_bytes <= 0.8 * peak
        True
    """
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
        raise ValueError(f"limit must be a positive number of bytes, got {limit!r}")
    if not isinstance(max_rounds, int) or max_rounds < 1:
        raise ValueError(f"max_rounds must be an int >= 1, got {max_rounds!r}")
    limit = int(limit)
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    measure = measure or _measure
    step = dict(loss_fn=loss_fn, optimizer=optimizer)
    est = estimate(model, args, kwargs, training=True, **step)
    rounds = [FitRound("as is", limit, est.peak_bytes, measure(model, args, kwargs, **step))]
    if rounds[0].measured_peak_bytes <= limit:
        return FitResult(model, limit, rounds[0].measured_peak_bytes, tuple(rounds))
    budget = _tightened(limit, limit, rounds[0])
    strategies, unreachable = list(STRATEGIES), {}
    opt_state = est.peak_breakdown.get("optimizer", 0)
    while len(rounds) < max_rounds and strategies:
        built = _build(strategies[0], model, args, kwargs, budget, opt_state, step)
        if isinstance(built, str):          # this strategy cannot reach the budget: the next one
            log.debug("fit_memory: %s", built)
            unreachable[strategies.pop(0)] = built
            continue
        module, estimated, what = built
        rounds.append(FitRound(strategies[0], budget, estimated, measure(module, args, kwargs, **step), what))
        log.debug("fit_memory: %s", rounds[-1])
        if rounds[-1].measured_peak_bytes <= limit:
            return FitResult(module, limit, rounds[-1].measured_peak_bytes, tuple(rounds))
        budget = _tightened(budget, limit, rounds[-1])
    raise ValueError(_failure(limit, rounds, unreachable, max_rounds))


def _measure(module: nn.Module, args: tuple, kwargs: dict, *, optimizer, loss_fn) -> int:
    return measure_step(module, args, kwargs, optimizer=optimizer, loss_fn=loss_fn).peak_bytes


def _tightened(budget: int, limit: int, last: FitRound) -> int:
    """The next budget for the cost model. After the unmodified step: the limit in the cost model's
    units (scaled by estimated over measured, when the measurement ran over the estimate). After a
    candidate built to fit ``budget``: the candidate's own estimate scaled by how far over the limit
    its step measured (not ``budget``: a candidate can sit well under its budget, and a budget
    shrunk from above it would build the same candidate again), and under ``budget`` in any case."""
    if last.strategy == "as is":
        return int(limit * min(last.estimated_peak_bytes / max(last.measured_peak_bytes, 1), 1.0))
    scaled = last.estimated_peak_bytes * limit / max(last.measured_peak_bytes, 1)
    return min(int(scaled * (1 - _MARGIN)), budget - 1)


def _build(strategy: str, model, args, kwargs, budget: int, opt_state: int, step: dict):
    """(module, estimated peak with the optimizer, description), or why ``strategy`` cannot reach ``budget``."""
    if strategy == "recompute":
        return _recompute(model, args, kwargs, budget, opt_state, step)
    if strategy == "freeze":
        try:
            plan = finetune(copy.deepcopy(model), args, kwargs, memory_limit=budget, **step)
        except ValueError as err:
            return str(err)
        return plan.module, plan.estimate.peak_bytes, f"trains {plan.candidate.describe()}"
    # freeze+recompute: what trains is chosen for a looser budget, then recomputation brings it under
    why = "freeze+recompute: no looser budget gave a frozen model that recomputation brings under the budget"
    for looser in _LOOSER:
        try:
            plan = finetune(copy.deepcopy(model), args, kwargs, memory_limit=int(looser * budget), **step)
        except ValueError:
            continue
        built = _recompute(plan.module, args, kwargs, budget, plan.estimate.peak_breakdown.get("optimizer", 0), step)
        if not isinstance(built, str):
            module, peak, what = built
            return module, peak, f"trains {plan.candidate.describe()}; {what}"
        why = f"freeze+recompute, training {plan.candidate.describe()}: {built}"
    return why


def _recompute(model, args, kwargs, budget: int, opt_state: int, step: dict):
    try:    # recompute's budget leaves out the optimizer's state, which stays resident
        module = recompute(model, args, kwargs, peak_bytes=max(budget - opt_state, 1), loss_fn=step["loss_fn"])
    except ValueError as err:
        return f"{err} (recompute's figures leave out the optimizer's state, {format_bytes(opt_state)})"
    est = estimate(module, args, kwargs, training=True, **step)
    if est.peak_bytes > budget:     # the optimizer step's own peak (not activations) is over
        return (f"recompute: the step still peaks at {est.peak_bytes} B ({format_bytes(est.peak_bytes)}) "
                f"during {est.peak_phase}, over the budget {budget} B: recomputation cannot lower it")
    plan = module.meta[PLAN]
    levels = ", ".join(str(lv) for lv in plan.levels)
    return module, est.peak_bytes, f"recompute levels ({levels}), +{plan.extra_flops / max(plan.baseline_flops, 1):.1%} FLOPs"


def _failure(limit: int, rounds: list[FitRound], unreachable: dict[str, str], max_rounds: int) -> str:
    best = min(rounds, key=lambda r: r.measured_peak_bytes)
    why = f"in {max_rounds} rounds (max_rounds)" if len(unreachable) < 2 else "by recomputation or freezing"
    lines = [f"fit_memory: limit={limit} B ({format_bytes(limit)}) not met {why}; the smallest peak measured was "
             f"{best.measured_peak_bytes} B ({format_bytes(best.measured_peak_bytes)}, {best.strategy}"
             f"{': ' + best.what if best.what else ''})."]
    lines += [f"  {reason}" for reason in unreachable.values()]
    lines.append("It would take a larger limit (at least the smallest reachable peak above), a smaller batch or "
                 "sequence, or less optimizer state (optimizer='sgd' keeps none)")
    return "\n".join(lines)
