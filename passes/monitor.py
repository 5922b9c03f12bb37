"""``measure_step``: the memory a real training step uses, per module, beside its estimate.

Reads a model and a batch and runs one real training step (forward, loss, backward,
optimizer step) on a copy of the model; writes nothing on the model. Every storage the
step allocates is followed from allocation to release by the same dispatch-mode tracker
``simulate`` runs on fake tensors (``torch.distributed._tools.mem_tracker.MemTracker``
hooks every parameter and fails on frozen ones), so a measured figure and an estimated
one count the same things. The step's peak is the allocator's, which also sees buffers
kernels allocate and free inside themselves (a matmul's contiguous copy of a strided
input): on CUDA the caching allocator's (``torch.cuda.max_memory_allocated``), on the CPU
the CPU allocator's events recorded by ``torch.profiler`` (``profile_memory=True``), in
both cases less what the device held before that this step does not use. Where neither is
available (the profiler already running) it is the tracked storages' peak.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ._util import format_bytes, table
from .capture import normalize_inputs
from .estimate import Estimate
from .simulate import OPTIMIZERS, _Tracker, _warm_optimizer, step_loss

__all__ = ["measure_step", "MemoryReport"]

BACKWARD = "(backward)"
OPTIMIZER = "(optimizer)"
LOSS = "(loss)"


@dataclass(frozen=True)
class MemoryReport:
    """A measured training step: its peak and what each module allocated in the forward."""
    peak_bytes: int                     # the step's peak (CUDA: allocator's, else tracked storages)
    tracked_peak_bytes: int             # peak of the storages the step's ops allocated, plus resident state
    peak_phase: str                     # "forward", "backward" or "optimizer"
    peak_module: str
    peak_breakdown: dict[str, int]      # bytes by category at the tracked peak
    resident: dict[str, int]            # parameters, buffers, inputs, optimizer state before the step
    by_module: dict[str, dict[str, int]]   # module path -> {"output_bytes", "saved_bytes"} (forward)
    device: str
    optimizer: str | None = None
    loss: float = float("nan")
    peak_source: str = "tracked"        # "allocator": CUDA's or the CPU allocator's (profiler); "tracked": storages

    def grouped(self, depth: int | None = None) -> dict[str, dict[str, int]]:
        """``by_module`` summed over paths cut to ``depth`` components (as ``Estimate.by_module``)."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"output_bytes": 0, "saved_bytes": 0})
        for path, row in self.by_module.items():
            key = path if depth is None or path.startswith("(") else ".".join(path.split(".")[:depth])
            for k in ("output_bytes", "saved_bytes"):
                out[key or "(top)"][k] += row[k]
        return dict(out)

    def table(self, estimate: Estimate | None = None, *, depth: int | None = 3) -> str:
        """Per-module forward allocations and saved activations, measured and (if given) estimated."""
        measured = self.grouped(depth)
        estimated = {k: v for k, v in estimate.by_module(depth)} if estimate is not None else {}
        keys = list(estimated) + [k for k in measured if k not in estimated] if estimated else list(measured)
        rows = []
        for key in keys:
            m, e = measured.get(key, {}), estimated.get(key, {})
            if not (m.get("output_bytes") or m.get("saved_bytes") or e.get("output_bytes") or e.get("saved_bytes")):
                continue
            row = [key, format_bytes(m.get("output_bytes", 0)), format_bytes(m.get("saved_bytes", 0))]
            if estimate is not None:
                row += [format_bytes(e.get("output_bytes", 0)), format_bytes(e.get("saved_bytes", 0))]
            rows.append(row)
        total_saved = sum(v["saved_bytes"] for v in measured.values())
        peak = ["step peak", format_bytes(self.peak_bytes), format_bytes(total_saved)]
        headers = ["module", "measured out", "measured saved"]
        if estimate is not None:
            peak += [format_bytes(estimate.peak_bytes), format_bytes(estimate.activation_bytes)]
            headers += ["estimated out", "estimated saved"]
        rows.append(peak)
        head = (f"measured training step ({self.optimizer or 'no optimizer'}) on {self.device}: peak "
                f"{format_bytes(self.peak_bytes)} during {self.peak_phase} at {self.peak_module}")
        if estimate is not None:
            head += (f"; estimated {format_bytes(estimate.peak_bytes)} "
                     f"({(estimate.peak_bytes - self.peak_bytes) / max(self.peak_bytes, 1):+.1%})")
        return head + "\n\n" + table(headers, rows)

    def plot(self, path: str | Path, estimate: Estimate | None = None, *, depth: int | None = 2) -> Path:
        """Bar plot (PNG) of saved activations per module and the peak, measured beside estimated.

        Without matplotlib the table is written as text next to ``path`` (suffix ``.txt``);
        returns the path written.
        """
        path = Path(path)
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            path = path.with_suffix(".txt")
            path.write_text(self.table(estimate, depth=depth) + "\n")
            return path
        measured = self.grouped(depth)
        estimated = dict(estimate.by_module(depth)) if estimate is not None else {}
        keys = [k for k in (list(estimated) or list(measured))
                if measured.get(k, {}).get("saved_bytes") or estimated.get(k, {}).get("saved_bytes")]
        labels = keys + ["step peak"]
        meas = [measured.get(k, {}).get("saved_bytes", 0) for k in keys] + [self.peak_bytes]
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(labels)), 4))
        xs = range(len(labels))
        width = 0.4 if estimate is not None else 0.8
        ax.bar([x - width / 2 * (estimate is not None) for x in xs], [b / 2**20 for b in meas], width, label="measured")
        if estimate is not None:
            est = [estimated.get(k, {}).get("saved_bytes", 0) for k in keys] + [estimate.peak_bytes]
            ax.bar([x + width / 2 for x in xs], [b / 2**20 for b in est], width, label="estimated")
        ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("MiB (saved activations; last bar: step peak)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        return asdict(self)


def measure_step(model: nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None, *,
                 optimizer: str | None = "adamw", loss_fn: Callable | None = None,
                 copy_model: bool = True) -> MemoryReport:
    """Run one real training step and measure its memory, overall and per module.

    The optimizer's state is created first by a zero-gradient warm-up step, so the measured
    step is a steady-state one, as ``estimate(..., training=True, optimizer=...)`` assumes.
    Only parameters with ``requires_grad`` train.

    Args:
        model: the model (trained on a deep copy unless ``copy_model=False``).
        example_inputs, example_kwargs: the batch, on the model's device.
        optimizer: "adamw", "sgd" (PyTorch defaults) or None.
        loss_fn: reduces the outputs to the loss; None sums every floating-point output.
        copy_model: train a copy, leaving ``model``'s weights as they were.

    Returns:
        A ``MemoryReport``.

    Example:
        >>> rep = measure_step(torch.nn.Linear(64, 32), (torch.randn(8, 64),))
        >>> rep.peak_bytes > 0
        True
    """
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported; use one of {OPTIMIZERS} or None")
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    _check_not_meta(model, args, kwargs)
    model = copy.deepcopy(model) if copy_model else model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("measure_step: no parameter of the model requires grad, so there is no training step")
    opt = _warm_optimizer(optimizer, params)
    device = params[0].device
    tracker = _Tracker({})
    resident = tracker.track_resident(list(model.parameters()), list(model.buffers()), tree_flatten((args, kwargs))[0],
                                      opt)
    step = partial(_step, model, args, kwargs, tracker, opt, loss_fn, params)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        untracked = torch.cuda.memory_allocated(device) - tracker.live_total
        torch.cuda.reset_peak_memory_stats(device)
        loss = step()
        torch.cuda.synchronize(device)
        peak, source = torch.cuda.max_memory_allocated(device) - untracked, "allocator"
    elif device.type == "cpu" and _can_profile():
        loss, allocated = _cpu_allocator_peak(step)
        peak, source = sum(resident.values()) + allocated, "allocator"
    else:
        loss = step()
        peak, source = tracker.peak, "tracked"
    by_module = {k: {"output_bytes": v.output_bytes, "saved_bytes": v.saved_bytes}
                 for k, v in tracker.nodes.items() if v.output_bytes or v.saved_bytes}
    return MemoryReport(peak_bytes=peak, tracked_peak_bytes=tracker.peak, peak_phase=tracker.peak_at[0],
                        peak_module=tracker.peak_at[1] or "(top)", peak_breakdown=dict(tracker.peak_breakdown),
                        resident=resident, by_module=by_module, device=str(device), optimizer=optimizer,
                        loss=loss, peak_source=source)


def _check_not_meta(model: nn.Module, args: tuple, kwargs: dict) -> None:
    tensors = list(model.parameters()) + list(model.buffers()) + tree_flatten((args, kwargs))[0]
    on_meta = [t for t in tensors if isinstance(t, torch.Tensor) and t.is_meta]
    if on_meta:
        name = type(model).__name__
        raise ValueError(
            f"measure_step: {name} has {len(on_meta)} tensors (parameters, buffers or inputs) on the meta device, "
            f"which hold no data, so there is no real step to measure. Measure the model with real weights and "
            f"inputs (build it outside torch.device('meta'), or model.to_empty(device='cpu') then load a state "
            f"dict), or estimate the meta model's step with passes.estimate(model, example_inputs, training=True)")


def _can_profile() -> bool:
    """The profiler can record the CPU allocator's events here (it is not already running)."""
    return torch.profiler.kineto_available() and not torch.autograd.profiler._is_profiler_enabled


def _cpu_allocator_peak(step: Callable[[], Any]) -> tuple[Any, int]:
    """``step()`` under the profiler: its result and the peak of bytes the CPU allocator handed out
    during it above what was allocated before. This counts what no dispatched op shows: buffers
    kernels allocate and free inside themselves (a matmul's copy of a strided input, attention
    scratch)."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():   # kineto writes a line to the process's stderr as it starts and stops
        prof.start()
    try:
        result = step()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return result, peak


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 to /dev/null (what C++ libraries print bypasses ``sys.stderr``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _step(model, args, kwargs, tracker: _Tracker, opt, loss_fn, params) -> float:
    """forward (each op charged to the innermost running module), loss, backward, optimizer step."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[str] = []

    def enter(module, _args):
        stack.append(names.get(module, "?"))
        tracker.owner = stack[-1]

    def leave(module, _args, _out):
        stack.pop()
        tracker.owner = stack[-1] if stack else LOSS

    hooks = [m.register_forward_pre_hook(enter) for m in names] + [m.register_forward_hook(leave) for m in names]
    hooks += [p.register_post_accumulate_grad_hook(lambda p: tracker.recategorize(p.grad, "grad")) for p in params]
    try:
        with tracker, torch.enable_grad():
            tracker.phase = "forward"
            with tracker.saving():
                out = model(*args, **kwargs)
            tracker.owner = LOSS
            loss = step_loss(out, loss_fn)
            del out
            tracker.phase, tracker.owner = "backward", BACKWARD
            # backward ops have no module: charge them to one row, not to the last module
            tracker.autograd_owner.clear()
            loss.backward()
            value = loss.item()
            del loss
            if opt is not None:
                tracker.phase, tracker.owner = "optimizer", OPTIMIZER
                opt.step()
    finally:
        for h in hooks:
            h.remove()
    return value


