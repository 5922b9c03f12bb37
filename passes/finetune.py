"""``finetune``: choose what trains and what freezes so a training step fits memory and time budgets.

Reads a model, an example batch and, optionally, a few batches of the target task; writes,
for the chosen candidate only, ``requires_grad`` on the model's parameters and
``LoRALinear`` wrappers around the adapted layers; returns a ``FinetunePlan``.

Every candidate is costed on one capture of the model with ``estimate`` (peak memory and
step time on ``device``): a frozen prefix saves no activations, no gradients and no
optimizer state, and needs no backward. Each repeated block is frozen, trains in full, or
trains through rank-``r`` adapters on its linear layers; the head (a new classifier or LM
head always) trains or not; full fine-tuning trains everything.

* Without ``data`` the choice is by budget alone: the candidate training the most
  parameters that fits (the last ``k`` blocks and the head, or adapters on the last ``k``
  blocks).
* With ``data`` the choice follows the task: ``task_probe.probe_parts`` measures how much
  each block buys on held-out batches when it trains briefly (in full, or through adapters
  where only those fit), and the gradient spectrum of its layers says how much of that
  adapters of each rank can follow. The candidate whose blocks' values sum highest within
  the budgets wins: training the first block may be worth its activations when the task's
  signal sits there, and blocks that buy nothing stay frozen. When one block alone (in one
  mode) removes nearly all the loss left (``_SATURATED``), it trains alone: the most capable
  such mode, then the cheapest step.

The low-rank adapters and task heads live in ``passes.adapters`` (re-exported here), the
search in ``passes._finetune_search``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx
from torch import nn

from ._finetune_search import Candidate, Space, best_value, most_parameters
from ._util import format_bytes, format_count, format_seconds, table
from .adapters import (Classifier, LoRALinear, NewHead, attach_classifier, attach_lm_head, insert_lora,
                       set_submodule)
from .capture import normalize_inputs
from .estimate import Estimate
from .task_probe import FULL, TaskScores, probe_parts, split_batches

__all__ = ["finetune", "FinetunePlan", "Candidate", "PartDecision", "FULL", "RANKS", "DATA_RANKS",
           # re-exported from passes.adapters
           "LoRALinear", "insert_lora", "attach_classifier", "attach_lm_head", "Classifier", "NewHead"]

RANKS = (1, 2, 4, 8, 16, 32, 64, 128)        # adapter ranks considered without task data
DATA_RANKS = (4, 16, 64)                     # with task data (each block is costed at each of them)
# With task data, blocks whose probe bought less than this share of the best block's drop stay frozen:
# trained beside the block that matters they mostly fit the probe batches' noise, and they can take the
# easy part of the loss before it does (measured: adapters on the later blocks kept the first block of
# benchmarks/finetune.py's early task from learning its remap at lr 1e-3; it learns it alone).
_MIN_SHARE = 0.5
# A part whose probe removes at least this share of the loss left after the head's own training removes
# all of it, as far as the probes can tell (what is left is their noise). When one part alone does, it
# trains alone: more parts beside it would fit that noise and compete with it (measured: on the late task
# of benchmarks/finetune.py every block removed 99-100% of the loss left, and the search, packing adapters
# beside the first block in full, trained to 72% accuracy on one seed where the last block alone got 100%).
_SATURATED = 0.95


@dataclass(frozen=True)
class PartDecision:
    """One row of a plan's table: a part, what the task data said of it, what it costs, what was decided."""
    part: str
    n_params: int
    score: float | None           # held-out loss drop its probe bought beyond the head's (nats); None: no data
    probed: str                   # how it was probed: "full", "rank 16", "" (not probed)
    extra_bytes: int              # step peak over the head-only step, this part alone as decided (frozen: in full)
    extra_time_s: float           # step time over the head-only step, likewise
    decision: str                 # "full", "rank 16", "frozen", "trains (new head)", ...
    why: str


@dataclass(frozen=True)
class FinetunePlan:
    """Result of ``finetune``: what trains, why, the step's estimate, and the model ready to train."""
    candidate: Candidate
    trainable: tuple[str, ...]
    estimate: Estimate
    full_estimate: Estimate
    module: nn.Module = field(repr=False)
    memory_limit_bytes: int = 0
    time_limit_s: float | None = None
    n_params: int = 0
    n_costed: int = 0                       # candidates estimated during the search
    parts: tuple[PartDecision, ...] = ()
    block_names: tuple[str, ...] = ()
    scores: TaskScores | None = field(default=None, repr=False)
    value: float | None = None              # sum of the chosen parts' values, at most the loss left (task data)

    def __post_init__(self):
        if self.estimate.peak_bytes > self.memory_limit_bytes:
            raise ValueError(f"plan peaks at {self.estimate.peak_bytes} B over its limit {self.memory_limit_bytes} B")
        if self.time_limit_s is not None and self.estimate.time_s > self.time_limit_s:
            raise ValueError(f"plan's step takes {self.estimate.time_s} s over its limit {self.time_limit_s} s")

    @property
    def n_trainable_params(self) -> int:
        return self.candidate.n_trainable_params

    def report(self) -> str:
        est, full = self.estimate, self.full_estimate
        rows = [("trainable parameters", format_count(self.n_trainable_params),
                 format_count(self.n_params), f"{self.n_trainable_params / max(self.n_params, 1):.1%}"),
                ("step peak memory", format_bytes(est.peak_bytes), format_bytes(full.peak_bytes),
                 f"{est.peak_bytes / max(full.peak_bytes, 1):.1%}"),
                ("step time", format_seconds(est.time_s), format_seconds(full.time_s),
                 f"{est.time_s / max(full.time_s, 1e-30):.1%}")]
        limits = f"limit {format_bytes(self.memory_limit_bytes)}"
        if self.time_limit_s is not None:
            limits += f" and {format_seconds(self.time_limit_s)} per step"
        how = "by the task's probes" if self.scores is not None else "by budget (no task data)"
        names = ", ".join(self.trainable[:6]) + (f", ... ({len(self.trainable)} tensors)"
                                                 if len(self.trainable) > 6 else "")
        lines = [f"fine-tuning plan: {self.candidate.describe()} ({limits}, "
                 f"{est.optimizer or 'no optimizer'}, chosen {how}, {self.n_costed} candidates costed)",
                 "", table(["", "this plan", "full fine-tuning", "ratio"], rows)]
        if self.parts:
            lines += ["", self.part_table(), "+bytes, +time: the step's peak and time over the head-only step's "
                      "when the part alone trains as decided (in full when frozen); the head's row: the head-only step"]
        if self.scores is not None:
            s = self.scores
            lines += ["", f"score: held-out loss drop (nats) of {s.steps} AdamW steps (lr {s.lr:g}) of the part "
                          f"and the head beyond the head's own, on {s.n_probe_batches} probe and "
                          f"{s.n_held_out_batches} held-out batches ({format_seconds(s.time_s)} in all)"]
        return "\n".join(lines + ["", f"trains: {names}"])

    def part_table(self) -> str:
        rows = [(p.part, format_count(p.n_params), "-" if p.score is None else f"{p.score:.3f}", p.probed or "-",
                 format_bytes(p.extra_bytes), format_seconds(p.extra_time_s), p.decision, p.why) for p in self.parts]
        return table(["part", "params", "score", "probed", "+bytes", "+time", "decision", "why"], rows,
                     align="lrrlrrll")

    def __str__(self) -> str:
        return self.report()

    def _repr_pretty_(self, p, cycle):  # IPython
        p.text(self.report())

    def to_dict(self) -> dict:
        return {"candidate": self.candidate.__dict__, "trainable": list(self.trainable),
                "peak_bytes": self.estimate.peak_bytes, "full_peak_bytes": self.full_estimate.peak_bytes,
                "time_s": self.estimate.time_s, "full_time_s": self.full_estimate.time_s,
                "memory_limit_bytes": self.memory_limit_bytes, "time_limit_s": self.time_limit_s,
                "n_params": self.n_params, "value": self.value, "parts": [p.__dict__ for p in self.parts]}


def finetune(model: nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None, *,
             memory_limit: int, time_limit: float | None = None, data: Iterable | None = None,
             optimizer: str | None = "adamw", loss_fn: Callable | None = None, ranks: tuple[int, ...] | None = None,
             device=None, probe_steps: int = 40, probe_lr: float = 1e-3,
             scores: TaskScores | None = None) -> FinetunePlan:
    """Choose what trains (blocks in full or through adapters, the head) so a step fits the budgets.

    Args:
        model: an ``nn.Module`` (possibly from ``attach_classifier`` / ``attach_lm_head``).
        example_inputs, example_kwargs: the training batch the budgets are for.
        memory_limit: bytes the step may peak at (parameters, gradients, optimizer state,
            activations, temporaries), as ``estimate`` computes it.
        time_limit: seconds the step may take on ``device`` (the cost model's time); None: no limit.
        data: a few batches of the target task, ``(inputs, target)`` pairs with ``inputs`` a
            tuple like ``example_inputs``; non-tensor ``example_kwargs`` (flags such as
            ``use_cache=False``) go with every batch. The blocks are probed on them (see the
            module docstring); None chooses by budget alone.
        optimizer: "adamw", "sgd" or None.
        loss_fn: with ``data``, ``loss_fn(outputs, target)`` (the step is costed with the first
            batch's target); without, ``loss_fn(outputs)``; None sums floating-point outputs.
        ranks: adapter ranks to consider (default ``RANKS``, with data ``DATA_RANKS``).
        device: device spec for the estimate's times (None: this machine).
        probe_steps, probe_lr: AdamW steps and learning rate of each probe; use the learning
            rate you will fine-tune with.
        scores: the ``plan.scores`` of an earlier call on the same model and data, to choose
            under other budgets without probing again.

    Returns:
        A ``FinetunePlan``; ``plan.module`` is ``model``, ready to train.

    Raises:
        ValueError: nothing fits; the message names the smallest reachable peak.

    Example:
        >>> model, inputs = tiny_gpt()
        >>> full = estimate(model, inputs, training=True, optimizer="adamw").peak_bytes
        >>> plan = finetune(model, inputs, memory_limit=full // 2)
        >>> plan.estimate.peak_bytes <= full // 2
        True
    """
    if not isinstance(model, nn.Module) or isinstance(model, torch.fx.GraphModule):
        raise TypeError(f"finetune() needs the eager nn.Module (it returns it ready to train), "
                        f"got {type(model).__name__}")
    memory_limit = _positive("memory_limit", memory_limit)
    time_limit = None if time_limit is None else _positive("time_limit", time_limit)
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    batches = None
    if data is not None or scores is not None:
        if loss_fn is None:
            raise TypeError("finetune(data=...) needs loss_fn(outputs, target) to score the task's batches")
        batches = list(data) if data is not None else None
        if batches is not None and not args:
            args = split_batches(batches)[0][0][0]
    step_loss = _step_loss(loss_fn, batches)
    space = Space(model, args, kwargs, optimizer=optimizer, loss_fn=step_loss, device=device)
    ranks = space.usable_ranks(tuple(sorted(ranks or (DATA_RANKS if batches or scores else RANKS))))
    value = None
    try:
        if batches is None and scores is None:
            best = most_parameters(space, ranks, memory_limit, time_limit)
        else:
            best, scores, value = _by_task(space, model, batches, scores, loss_fn, kwargs, ranks,
                                                     memory_limit, time_limit, probe_steps, probe_lr)
        if best is None:
            raise ValueError(_nothing_fits(space, ranks, memory_limit, time_limit))
        n_costed = len(space.costs)
        est, full_est = space.cost(best), space.cost(space.full)
        parts = _part_table(space, best, scores)
    finally:
        space.restore()
    _apply(model, space, best)
    trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    return FinetunePlan(best, trainable, est, full_est, model, memory_limit, time_limit, space.n_params,
                        n_costed, parts, tuple(space.blocks), scores, value)


def _by_task(space: Space, model, batches, scores, loss_fn, kwargs, ranks, memory_limit, time_limit,
             probe_steps, probe_lr):
    """Probe the blocks on the task's batches (unless ``scores`` are given), then search by value."""
    head = bool(space.head_params) and space.fits(space.suffix(0), memory_limit, time_limit)
    modes = [tuple(m for m in (FULL, *ranks) if space.fits(space.single(j, m, head), memory_limit, None))
             for j in range(space.n_blocks)]
    if scores is None:
        # each block in full and through the largest adapters that fit it alone
        probe_modes = {space.blocks[j]: tuple(m for m in (FULL, max([r for r in ms if r > 0], default=0)) if m in ms)
                       for j, ms in enumerate(modes) if ms}
        scores = probe_parts(model, batches, loss_fn,
                             parts={b: sorted(space.block_params[j]) for j, b in enumerate(space.blocks) if b in probe_modes},
                             head=sorted(space.head_params) if head else [], modes=probe_modes,
                             linears={b: [p for p, _ in space.linears[j]] for j, b in enumerate(space.blocks)},
                             ranks=ranks, steps=probe_steps, lr=probe_lr,
                             kwargs={k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
    values = _values(space, scores, ranks)
    cap = scores.reference_loss
    best = best_value(space, values, modes, head, memory_limit, time_limit, cap=cap)
    if best is None:
        return None, scores, None
    total = sum(values[j].get(m, 0.0) for j, m in enumerate(best.modes))
    if not best.full and best.n_blocks > 1 and total >= _SATURATED * cap:
        best = _one_part(space, values, modes, head, cap, memory_limit, time_limit) or best
        total = sum(values[j].get(m, 0.0) for j, m in enumerate(best.modes))
    # saturated plans count as removing all the loss left, so a larger budget never reports less
    return best, scores, cap if total >= _SATURATED * cap else min(total, cap)


def _one_part(space: Space, values, modes, head: bool, cap: float, memory_limit: int,
              time_limit: float | None) -> Candidate | None:
    """The one block (in one mode) whose value alone removes the loss left, within the budgets: the
    most capable mode (in full, then the largest rank), then the smallest peak, then the shortest step
    (a later block: less backward); None: no one block does."""
    enough = [space.single(j, m, head) for j in range(space.n_blocks) for m in modes[j]
              if m != 0 and values[j].get(m, 0.0) >= _SATURATED * cap]
    enough = [c for c in enough if space.fits(c, memory_limit, time_limit)]
    capacity = lambda c: max(float("inf") if m == FULL else m for m in c.modes)  # noqa: E731
    return min(enough, key=lambda c: (-capacity(c), space.cost(c).peak_bytes, space.cost(c).time_s), default=None)


def _values(space: Space, scores: TaskScores, ranks: tuple[int, ...]) -> list[dict[int, float]]:
    """Per block, mode -> value; a block that buys under ``_MIN_SHARE`` of the best block's drop gets none."""
    best = max([s.loss_drop for s in scores.parts.values()], default=0.0)
    return [{m: scores.parts[b].value(m) for m in (FULL, *ranks)}
            if b in scores.parts and scores.parts[b].loss_drop >= _MIN_SHARE * best > 0 else {}
            for b in space.blocks]


def _part_table(space: Space, best: Candidate, scores: TaskScores | None) -> tuple[PartDecision, ...]:
    head = best.head or best.full
    base = space.cost(space.make((0,) * space.n_blocks, True)) if space.head_params else None
    rows = []
    for j, block in enumerate(space.blocks):
        mode = FULL if best.full else best.modes[j]
        est = space.cost(space.single(j, mode if mode else FULL, best.head))
        score = scores.parts.get(block) if scores is not None else None
        n = sum(space.params[p].numel() for p in space.block_params[j])
        rows.append(PartDecision(
            part=block, n_params=n, score=None if scores is None else (score.loss_drop if score else 0.0),
            probed="" if score is None else ", ".join(_mode_name(m) for m in score.drops),
            extra_bytes=est.peak_bytes - (base.peak_bytes if base else 0),
            extra_time_s=est.time_s - (base.time_s if base else 0.0),
            decision=_mode_name(mode), why=_why(space, best, j, mode, scores, score)))
    if space.head_params:
        n = sum(space.params[p].numel() for p in space.head_params)
        decision = "trains (new head)" if space.new_head else ("full" if head else "frozen")
        rows.append(PartDecision("head: " + _short(sorted(space.head_params)), n, None, "",
                                 base.peak_bytes if base else 0, base.time_s if base else 0.0, decision,
                                 "a new head always trains" if space.new_head else
                                 ("everything trains" if best.full else "part of every candidate")))
    return tuple(rows)


def _why(space: Space, best: Candidate, j: int, mode: int, scores, score) -> str:
    if best.full:
        return "full fine-tuning fits"
    if scores is None:
        return "in the largest suffix that fits" if mode else "below the trained suffix"
    if score is None:
        return "does not fit even alone"
    if mode == 0:
        top = max(s.loss_drop for s in scores.parts.values())
        if score.loss_drop <= 0:
            return "bought nothing on the probe"
        if score.loss_drop < _MIN_SHARE * top:
            return f"bought under {_MIN_SHARE:.0%} of the best block's drop"
        if best.n_blocks == 1:
            k = next(i for i, m in enumerate(best.modes) if m != 0)
            alone = scores.parts.get(space.blocks[k])
            if alone is not None and alone.value(best.modes[k]) >= _SATURATED * scores.reference_loss:
                return f"block {k} alone removes the loss left (>= {_SATURATED:.0%})"
        return "other parts buy more for the budget"
    return "its score is among the highest the budget buys"


def _mode_name(mode: int) -> str:
    return "full" if mode == FULL else "frozen" if mode == 0 else f"rank {mode}"


def _short(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f", ... ({len(names)})" if len(names) > 3 else "")


def _step_loss(loss_fn: Callable | None, batches: list | None) -> Callable | None:
    """The one-argument loss the estimate calls: ``loss_fn(outputs, first target)`` with task data."""
    if loss_fn is None or batches is None:
        return loss_fn
    target = split_batches(batches)[0][0][1]
    return lambda outputs: loss_fn(outputs, target)


def _positive(name: str, value) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return int(value) if name == "memory_limit" else float(value)


def _nothing_fits(space: Space, ranks: tuple[int, ...], memory_limit: int, time_limit: float | None) -> str:
    smallest = []
    if space.head_params:
        smallest.append(space.suffix(0))
    if space.n_blocks:
        smallest.append(space.suffix(1, ranks[0], head=space.new_head))
    if not smallest:
        smallest.append(space.full)
    cand = min(smallest, key=lambda c: space.cost(c).peak_bytes)
    est = space.cost(cand)
    what = (f"no candidate fits memory_limit={memory_limit} B ({format_bytes(memory_limit)})"
            + (f" and time_limit={time_limit} s" if time_limit is not None else ""))
    return (f"finetune: {what}; the smallest reachable step peaks at {est.peak_bytes} B "
            f"({format_bytes(est.peak_bytes)}) and takes {format_seconds(est.time_s)}, training "
            f"{cand.describe()}. Raise the limits, shrink the batch, or use recompute()")


def _apply(model: nn.Module, space: Space, cand: Candidate) -> None:
    """Make ``model`` train what ``cand`` says: flags on parameters, adapters around linear layers."""
    trained = set(space.params) if cand.full else space.trained_names(cand.modes, cand.head)
    for n, p in space.params.items():
        p.requires_grad_(n in trained)
    for blk, rank in zip(space.linears, cand.modes):
        for path, _ in blk if rank > 0 and not cand.full else ():
            set_submodule(model, path, LoRALinear(model.get_submodule(path), rank))
