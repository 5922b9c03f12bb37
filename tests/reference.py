"""What PyTorch's own tools measure on the eager model: the references fxpart's estimates are held to.

* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over the eager forward, and over
  ``loss.backward()`` of fxpart's default loss (the sum of ``.sum()`` of every
  floating-point output that requires grad).
* Memory: ``torch.distributed._tools.mem_tracker.MemTracker`` peak on the CPU, for one
  steady-state training step (a warm-up step creates the AdamW state first) or one
  forward under ``torch.no_grad()``. Parameters, buffers, optimizer state and the
  example inputs are registered with ``track_external`` (fxpart counts the inputs as
  resident too; without them MemTracker would not see the input tensors at all).

The eager runs use one thread: these models' ops are tiny, and on a small shared machine
OpenMP threads waiting for each other cost more than the work (3x the suite's time).

Used by ``tests/test_costs.py`` and ``benchmarks/memory_vs_memtracker.py``.
"""
from __future__ import annotations

import functools

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["default_loss", "flop_counter_flops", "memtracker_training_peak", "memtracker_inference_peak"]

_CPU = torch.device("cpu")


def _one_thread(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        n_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n_threads)
    return wrapper


def default_loss(outputs) -> torch.Tensor:
    """fxpart's loss when ``loss_fn`` is None: the sum of ``.sum()`` of every float output needing grad."""
    floats = [t for t in tree_flatten(outputs)[0]
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    loss = floats[0].sum()
    for t in floats[1:]:
        loss = loss + t.sum()
    return loss


@_one_thread
def flop_counter_flops(case, *, training: bool = False) -> tuple[int, int]:
    """(forward, backward) FLOPs that ``FlopCounterMode`` counts on ``case``'s eager model."""
    with torch.set_grad_enabled(training), FlopCounterMode(display=False) as forward:
        outputs = case()
    if not training:
        return forward.get_total_flops(), 0
    loss = default_loss(outputs)
    del outputs
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    case.model.zero_grad(set_to_none=True)
    return forward.get_total_flops(), backward.get_total_flops()


def _inputs(case) -> list[torch.Tensor]:
    return [t for t in tree_flatten((case.args, case.kwargs))[0] if isinstance(t, torch.Tensor)]


@_one_thread
def memtracker_training_peak(case) -> int:
    """MemTracker's peak bytes of one steady-state AdamW step: forward, ``loss.backward()``, ``opt.step()``."""
    model = case.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    default_loss(case()).backward()   # warm-up: AdamW's state exists from here on
    opt.step()
    opt.zero_grad()                   # set_to_none: gradients are allocated again in the backward
    tracker = MemTracker()
    tracker.track_external(model, opt, *_inputs(case))
    with tracker:
        loss = default_loss(case())
        loss.backward()
        del loss
        opt.step()
    opt.zero_grad()
    return tracker.get_tracker_snapshot("peak")[_CPU]["Total"]


@_one_thread
def memtracker_inference_peak(case) -> int:
    """MemTracker's peak bytes of one forward under ``torch.no_grad()``."""
    tracker = MemTracker()
    tracker.track_external(case.model, *_inputs(case))
    with tracker, torch.no_grad():
        outputs = case()
        del outputs
    return tracker.get_tracker_snapshot("peak")[_CPU]["Total"]
