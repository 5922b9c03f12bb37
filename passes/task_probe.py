"""What a fine-tuning task needs from each part of a model, measured on a few of its batches.

Reads a model, a few batches of the target task and a loss; trains each part of the model
briefly (a probe) and measures how much lower the held-out loss goes than when the head
trains alone. Writes nothing that lasts: every weight the probes change is put back, every
adapter they insert is taken out, and the caller's random state is left as it was.

The procedure, on the batches split into probe batches and held-out ones (the last
quarter, at least one; with a single batch it is both):

1. The head trains alone until the held-out loss stops falling (chunks of ``steps``
   steps, at most ``_MAX_WARMUP_CHUNKS``): a fresh or mismatched head first soaks up the
   gains that any trained part would buy (calibration), which would otherwise drown the
   differences between parts.
2. From there the head trains ``steps`` more steps: the reference drop.
3. Each part trains ``steps`` steps with the head from the same state, in each mode it is
   probed in (in full, and through adapters of the largest rank that fits): its score in
   that mode is its held-out drop beyond the reference, in nats (negative ones count as 0).
4. Before its probes, the mean gradient of each of the part's linear weights over the probe
   batches gives the share of its gradient energy that a rank-``r`` update can follow (the
   top ``r`` squared singular values over the total): a smaller rank than the one probed
   is expected to buy that share of the probed adapters' score.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .adapters import LoRALinear, set_submodule

__all__ = ["PartScore", "TaskScores", "probe_parts", "split_batches"]

log = logging.getLogger(__name__)

FULL = -1                  # a part's mode: trains in full; r > 0: rank-r adapters; 0: frozen
_MAX_WARMUP_CHUNKS = 6
_WARMUP_MIN_GAIN = 0.01    # relative held-out loss drop a warm-up chunk must buy to go on


@dataclass(frozen=True)
class PartScore:
    """One part's probes: the held-out loss drop each mode bought beyond the head's, and its gradient's spectrum."""
    part: str
    drops: dict[int, float]              # mode probed (FULL or a rank) -> nats below the reference (>= 0)
    raw_drops: dict[int, float]          # the same before clipping at 0
    energy: dict[int, float] = field(default_factory=dict)   # rank -> share of gradient energy (0..1)
    time_s: float = 0.0

    @property
    def loss_drop(self) -> float:
        """The drop of its most capable probe (in full if it was probed so)."""
        return self.drops[max(self.drops, key=_capacity)] if self.drops else 0.0

    def value(self, mode: int) -> float:
        """The score expected from training this part in ``mode``: measured where probed; a smaller
        rank than one probed gets that probe's drop times the share of energy the smaller rank keeps."""
        if mode == 0:
            return 0.0
        if mode in self.drops:
            return self.drops[mode]
        above = [r for r in self.drops if r > 0 and r > mode]
        if mode == FULL or not above:
            return 0.0
        probed = min(above)
        share, probed_share = self.energy.get(mode, 0.0), self.energy.get(probed, 0.0)
        return self.drops[probed] * min(share / probed_share, 1.0) if probed_share > 0 else 0.0


def _capacity(mode: int) -> float:
    return float("inf") if mode == FULL else mode


@dataclass(frozen=True)
class TaskScores:
    """What ``probe_parts`` measured: one ``PartScore`` per probed part, and the head's own drop."""
    parts: dict[str, PartScore]
    head_drop: float                     # held-out drop of the head alone (warm-up and reference)
    reference_drop: float                # of the reference: the head's last ``steps`` steps
    start_loss: float                    # held-out loss before any probe
    reference_loss: float                # held-out loss after the reference: what the parts can still remove
    n_probe_batches: int
    n_held_out_batches: int
    steps: int
    lr: float
    time_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def split_batches(data: Iterable) -> tuple[list, list]:
    """(probe batches, held-out batches): the last quarter (at least one) is held out; one batch is both."""
    batches = [_check_batch(b, i) for i, b in enumerate(data)]
    if not batches:
        raise ValueError("data has no batches; pass a few (inputs, target) batches of the target task, or data=None")
    if len(batches) == 1:
        return batches, batches
    n_held = max(1, len(batches) // 4)
    return batches[:-n_held], batches[-n_held:]


def _check_batch(batch: Any, i: int) -> tuple[tuple, Any]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"data[{i}] must be an (inputs, target) pair, got {type(batch).__name__}; inputs is a "
                        f"tuple like example_inputs, target what loss_fn(outputs, target) takes")
    inputs, target = batch
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    elif not isinstance(inputs, tuple):
        inputs = (inputs,)
    return inputs, target


def probe_parts(model: nn.Module, data: Iterable, loss_fn: Callable, *, parts: dict[str, list[str]],
                head: list[str], modes: dict[str, tuple[int, ...]], linears: dict[str, list[str]], ranks: tuple[int, ...],
                steps: int = 40, lr: float = 1e-3, kwargs: dict | None = None, seed: int = 0) -> TaskScores:
    """Score each part of ``model`` by what a short probe on the task's batches buys.

    Args:
        model: the model (trained in place during the probes, then put back as it was).
        data: ``(inputs, target)`` batches; ``loss_fn(model(*inputs, **kwargs), target)`` is the loss.
        parts: part name -> names of its parameters (``model.named_parameters()`` names).
        head: names of the head's parameters (they train in every probe; may be empty).
        modes: part name -> the modes to probe it in (FULL, and or a rank for its linear layers).
        linears: part name -> dotted paths of its linear layers (adapted in rank modes, and
            the layers whose gradient spectrum is measured).
        ranks: ranks to report the gradient energy share for.
        steps: optimizer steps per probe (AdamW at ``lr``).
        kwargs: keyword inputs passed with every batch.
        seed: seeds the adapters' initialisation and nothing else of the caller's.

    Returns:
        ``TaskScores``.
    """
    start = time.perf_counter()
    probe, held = split_batches(data)
    kwargs = dict(kwargs or {})
    params = dict(model.named_parameters())
    missing = [n for names in [head, *parts.values()] for n in names if n not in params]
    if missing:
        raise ValueError(f"probe_parts: no parameter named {missing[:3]} in {type(model).__name__}")
    run = _Runner(model, probe, held, loss_fn, kwargs, lr)
    flags = {n: p.requires_grad for n, p in params.items()}
    original_head = _snapshot(params, head)
    try:
        with torch.random.fork_rng(devices=_cuda_devices(params)):
            torch.manual_seed(seed)
            _freeze(params)
            start_loss = run.held_out()
            warm_loss = run.warm_up(params, head, steps) if head else start_loss
            warmed = _snapshot(params, head)
            ref_loss = run.train(params, head, steps) if head else warm_loss
            _restore(params, warmed)
            scores = {}
            for part, names in parts.items():
                scores[part] = _probe_one(run, model, params, part, names, head, warmed, modes[part],
                                          linears.get(part, []), ranks, steps, ref_loss)
                log.debug("probe %s: %s", part, scores[part])
    finally:
        _restore(params, original_head)
        for n, p in params.items():
            p.requires_grad_(flags[n])
    return TaskScores(parts=scores, head_drop=start_loss - ref_loss, reference_drop=warm_loss - ref_loss,
                      start_loss=start_loss, reference_loss=ref_loss, n_probe_batches=len(probe), n_held_out_batches=len(held) if held is not probe
                      else 0, steps=steps, lr=lr, time_s=time.perf_counter() - start)


def _probe_one(run: "_Runner", model, params, part, names, head, warmed, modes, linear_paths, ranks, steps,
               ref_loss) -> PartScore:
    start = time.perf_counter()
    energy = run.gradient_energy(model, params, linear_paths, ranks)
    raw = {mode: ref_loss - _probe_mode(run, model, params, names, head, warmed, mode, linear_paths, steps)
           for mode in modes}
    return PartScore(part=part, drops={m: max(d, 0.0) for m, d in raw.items()}, raw_drops=raw, energy=energy,
                     time_s=time.perf_counter() - start)


def _probe_mode(run: "_Runner", model, params, names, head, warmed, mode, linear_paths, steps) -> float:
    """Held-out loss after ``steps`` steps of the part in ``mode`` with the head; everything put back after."""
    saved = _snapshot(params, names)
    adapters = {}
    try:
        if mode == FULL:
            trained = list(names) + list(head)
        else:
            for path in linear_paths:
                adapters[path] = model.get_submodule(path)
                set_submodule(model, path, LoRALinear(adapters[path], mode))
            trained = [f"{p}.{w}" for p in linear_paths for w in ("lora_A", "lora_B")] + list(head)
        return run.train(dict(model.named_parameters()), trained, steps)
    finally:
        for path, layer in adapters.items():
            set_submodule(model, path, layer)
        _restore(params, saved)
        _restore(params, warmed)
        _freeze(params)


class _Runner:
    """Trains chosen parameters on the probe batches and evaluates on the held-out ones."""

    def __init__(self, model, probe, held, loss_fn, kwargs, lr):
        self.model, self.probe, self.held, self.loss_fn, self.kwargs, self.lr = model, probe, held, loss_fn, kwargs, lr
        self.cursor = 0

    def loss(self, batch) -> torch.Tensor:
        inputs, target = batch
        loss = self.loss_fn(self.model(*inputs, **self.kwargs), target)
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise ValueError(f"loss_fn(outputs, target) must return a one-element tensor, got "
                             f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}")
        return loss

    def held_out(self) -> float:
        with torch.no_grad():
            return sum(self.loss(b).item() for b in self.held) / len(self.held)

    def train(self, params: dict, names: list[str], steps: int) -> float:
        """``steps`` AdamW steps on ``names`` (the rest frozen); returns the held-out loss after them."""
        chosen = [params[n] for n in dict.fromkeys(names)]
        for p in chosen:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(chosen, lr=self.lr)
        for _ in range(steps):
            batch = self.probe[self.cursor % len(self.probe)]
            self.cursor += 1
            loss = self.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        del opt
        for p in chosen:
            p.requires_grad_(False)
        return self.held_out()

    def warm_up(self, params: dict, head: list[str], steps: int) -> float:
        """Train the head alone until a chunk of ``steps`` steps buys under 1% of the held-out loss."""
        loss = self.held_out()
        for _ in range(_MAX_WARMUP_CHUNKS):
            new = self.train(params, head, steps)
            gain, loss = loss - new, new
            if gain < _WARMUP_MIN_GAIN * abs(new):
                break
        return loss

    def gradient_energy(self, model, params, linear_paths, ranks) -> dict[int, float]:
        """Share of the linear weights' mean-gradient energy within the top-r singular values, per rank."""
        weights = [model.get_submodule(path).weight for path in linear_paths]
        if not weights:
            return {}
        for w in weights:
            w.requires_grad_(True)
        try:
            for batch in self.probe:
                self.loss(batch).backward()
            spectra = [torch.linalg.svdvals(w.grad.float().flatten(1)) ** 2 for w in weights]
        finally:
            for w in weights:
                w.grad = None
                w.requires_grad_(False)
        total = sum(s.sum().item() for s in spectra)
        if total <= 0:
            return {r: 0.0 for r in ranks}
        return {r: sum(s[:r].sum().item() for s in spectra) / total for r in ranks}


def _snapshot(params: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
    return {n: params[n].detach().clone() for n in dict.fromkeys(names)}


def _restore(params: dict, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, value in saved.items():
            params[n].copy_(value)


def _freeze(params: dict) -> None:
    for p in params.values():
        p.requires_grad_(False)


def _cuda_devices(params: dict) -> list[int]:
    return sorted({p.device.index or 0 for p in params.values() if p.device.type == "cuda"})
