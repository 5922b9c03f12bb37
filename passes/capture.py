"""Capture a model as an ATen-level ``torch.fx.GraphModule`` whose nodes carry fake values.

Reads an ``nn.Module`` (eager, ``symbolic_trace``d or handed over by Dynamo) and example
inputs; writes ``gm.meta[CAPTURE]`` (how it was captured). Nodes keep PyTorch's own
``val`` and ``nn_module_stack`` meta, which every later pass reads.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import signal
import threading
import traceback
from typing import Any

import torch
import torch.fx
from torch import nn

from ._keys import CAPTURE, SIGNATURE
from ._util import node_value
from .signature import InputSignature

__all__ = ["capture", "CaptureError", "is_captured", "signature_of"]

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """No capture method could turn the model into an ATen graph."""


def capture(model: nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None, *,
            dynamic: bool = True, symbolic_limit_s: float | None = None) -> torch.fx.GraphModule:
    """Capture ``model`` as an ATen-level GraphModule with fake values on every node.

    Tries ``torch.export`` non-strict first (it traces Hugging Face models, which
    ``torch.fx.symbolic_trace`` cannot), then strict (Dynamo). With ``dynamic`` (the
    default) every dimension of every tensor input is offered to export as dynamic
    (``Dim.AUTO``): the dimensions the model's code does not fix (batch, sequence length,
    image size under adaptive pooling) stay symbolic, so the graph runs other batch sizes
    and lengths; the others are specialised to the example. If that capture fails, or torch's
    shape reasoning takes longer than ``symbolic_limit_s`` (Swin's window arithmetic on a
    symbolic image size: 90 s for a 2-block model, 6 minutes for Swin-T, against 1.6 s static),
    only the batch dimension (dim 0 of each input) stays symbolic; failing that, every size is
    static. The signature says which and why. A graph that is already ATen-level with ``val``
    meta is returned as is.

    Costs read the example's sizes either way (``passes._util.node_value``).
    ``gm.meta["fxpart.signature"]`` (an ``InputSignature``) says, input by input and
    dimension by dimension, what the graph accepts.

    Args:
        model: the ``nn.Module`` to capture. Its parameters may live on the meta device.
        example_inputs: positional inputs (a tuple; a single tensor is accepted too).
        example_kwargs: keyword inputs.
        dynamic: keep the dimensions the model allows symbolic (False: every size as in the example).
        symbolic_limit_s: seconds the capture with every dimension symbolic may take before it is given up
            for the batch dimension alone; None: ``SYMBOLIC_LIMIT_S`` (30 s, or the environment variable
            ``FXPART_SYMBOLIC_CAPTURE_S``). Enforced on the main thread only (a timer signal).

    Returns:
        A ``GraphModule`` that, called like ``model``, returns what ``model`` returns
        (same pytree structure, same values).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or the inputs do not fit its ``forward``.
        CaptureError: no method could capture the model; the message names the
            model, the failing op or line, and what to try.

    Example:
        >>> gm = capture(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
        >>> [n.target for n in gm.graph.nodes if n.op == "call_function"]
        [<OpOverload(op='aten.linear', overload='default')>]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"capture() needs a torch.nn.Module, got {type(model).__name__}; wrap a function in an "
            f"nn.Module whose forward calls it")
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    if is_captured(model):
        return model
    _check_signature(model, args, kwargs)
    args, kwargs = _inputs_on_model_device(model, args, kwargs)

    limit = _symbolic_limit() if symbolic_limit_s is None else symbolic_limit_s
    errors = []
    attempts = [("export-nonstrict", "every"), ("export-nonstrict", "batch")] if dynamic else []
    attempts += [("export-nonstrict", None), ("export-strict", None)]
    for method, symbolic in attempts:
        shapes = _dynamic_shapes(model, args, kwargs, batch_only=symbolic == "batch") if symbolic else None
        try:
            with _no_kv_cache(model), _time_limit(limit if symbolic == "every" else None):
                ep = torch.export.export(model, args, kwargs, strict=(method == "export-strict"),
                                         dynamic_shapes=shapes)
        except (Exception, _TimeUp) as exc:  # noqa: BLE001 - every failure is reported below
            log.debug("capture with %s (symbolic: %s) failed", method, symbolic, exc_info=True)
            errors.append((method + (f" with {symbolic} dimension symbolic" if symbolic else ""), exc))
            continue
        gm = ep.module()
        gm.meta[CAPTURE] = {"model": type(model).__name__, "method": method, "dynamic": symbolic is not None,
                            "symbolic": symbolic}
        reason = "" if symbolic == "every" else ("captured with dynamic=False" if not dynamic else
                                                 _why_not_symbolic(errors[0][1]))
        if symbolic == "batch":
            reason = f"only the batch dimension varies: {reason}"
        gm.meta[SIGNATURE] = InputSignature.of(gm, model=model, ranges=ep.range_constraints, static_reason=reason)
        if errors:
            (log.warning if isinstance(errors[0][1], _TimeUp) else log.info)(
                "captured %s with %s (%s)", type(model).__name__,
                "a symbolic batch only" if symbolic == "batch" else "static shapes", reason)
        return gm
    raise CaptureError(_explain_failure(model, errors)) from errors[0][1]


SYMBOLIC_LIMIT_S = 30.0


def _symbolic_limit() -> float:
    value = os.environ.get("FXPART_SYMBOLIC_CAPTURE_S")
    try:
        return float(value) if value else SYMBOLIC_LIMIT_S
    except ValueError:
        raise ValueError(f"FXPART_SYMBOLIC_CAPTURE_S={value!r} is not a number of seconds") from None


class _TimeUp(BaseException):
    """The symbolic capture ran past its limit. A BaseException, so no ``except Exception`` inside torch's
    tracing swallows it on the way out."""

    def __init__(self, limit: float):
        super().__init__(f"torch's shape reasoning took over {limit:g} s with every dimension symbolic "
                         f"(capture(..., symbolic_limit_s=...) or FXPART_SYMBOLIC_CAPTURE_S allows longer)")


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise ``_TimeUp`` in the main thread after ``seconds`` (a real-time timer); no limit elsewhere, or when
    the process already uses SIGALRM."""
    usable = (seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None)
              and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise _TimeUp(seconds)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def signature_of(gm: torch.fx.GraphModule) -> InputSignature:
    """The ``InputSignature`` of a captured graph (recorded by ``capture``, else read off its placeholders)."""
    sig = gm.meta.get(SIGNATURE)
    if sig is None:
        sig = gm.meta[SIGNATURE] = InputSignature.of(gm)
    return sig


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, *, batch_only: bool = False):
    """``Dim.AUTO`` on every dim of every tensor input (``batch_only``: on dim 0, the others static), by the
    forward's parameter names."""
    auto, static = torch.export.Dim.AUTO, torch.export.Dim.STATIC

    def spec(value):
        if isinstance(value, torch.Tensor):
            return tuple(auto if d == 0 or not batch_only else static for d in range(value.dim())) \
                if value.dim() else None
        return None

    def tree(value):
        return torch.utils._pytree.tree_map(spec, value)
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return (tree(tuple(args)), tree(dict(kwargs))) if not kwargs else None
    params = inspect.signature(model.forward).parameters
    out = {}
    for name, value in bound.arguments.items():
        kind = params[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(tree(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: tree(v) for k, v in value.items()}
        else:
            out[name] = tree(value)
    return out


def _why_not_symbolic(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, _TimeUp) else f"export with dynamic shapes failed: {_first_line(exc)}"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def is_captured(gm: Any) -> bool:
    """True for a GraphModule that is ATen-level and has fake values on its nodes."""
    if not isinstance(gm, torch.fx.GraphModule):
        return False
    if CAPTURE in gm.meta:
        return True
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    return bool(calls) and all(
        isinstance(n.target, torch._ops.OpOverload) or n.target.__module__ == "_operator" for n in calls
    ) and all(node_value(n) is not None for n in calls) and not any(n.op == "call_module" for n in gm.graph.nodes)


def normalize_inputs(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    """Accept a tuple, a list or a single tensor as positional inputs."""
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    elif not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError(f"example_kwargs must be a dict or None, got {type(example_kwargs).__name__}")
    return example_inputs, dict(example_kwargs or {})


def _check_signature(model: nn.Module, args: tuple, kwargs: dict) -> None:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(
            f"example inputs do not fit {type(model).__name__}.forward{sig}: {exc}. Pass "
            f"example_inputs as a tuple of positional arguments and example_kwargs as a dict") from None


def _inputs_on_model_device(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A model built on the meta device is planned with meta inputs (no data needed)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if not tensors or not all(t.is_meta for t in tensors):
        return args, kwargs

    def to_meta(x):
        return x.to("meta") if isinstance(x, torch.Tensor) else x

    return torch.utils._pytree.tree_map(to_meta, (args, kwargs))


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module):
    """Hugging Face models build a KV cache object export cannot return; turn it off."""
    config = getattr(model, "config", None)
    old = getattr(config, "use_cache", None)
    if old:
        config.use_cache = False
    try:
        yield
    finally:
        if old:
            config.use_cache = old


def _explain_failure(model: nn.Module, errors: list[tuple[str, Exception]]) -> str:
    lines = [f"could not capture {type(model).__name__} as an ATen graph."]
    for method, exc in errors:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        lines.append(f"  {method}: {type(exc).__name__}: {first[:300]}")
        where = _user_frame(exc)
        if where:
            lines.append(f"    at {where}")
    data_dependent = any("data-dependent" in str(exc) or type(exc).__name__.startswith("GuardOnDataDependent")
                         for _, exc in errors)
    if model.training and data_dependent:
        lines.append(
            f"{type(model).__name__} is in training mode, where some models branch in Python on random draws "
            f"(LayerDrop, SpecAugment masks, router jitter), which no graph can hold: capture it after "
            f"model.eval(), or set those probabilities to 0 (e.g. config.layerdrop=0, mask_time_prob=0).")
    lines.append(
        "Try: make data-dependent Python control flow tensor-free (or use torch.cond), make sure "
        "example_inputs/example_kwargs are what forward() expects, pass use_cache=False to Hugging Face "
        "models, or capture a submodule. Set FXPART_DEBUG=1 for the full tracebacks.")
    return "\n".join(lines)


def _user_frame(exc: Exception) -> str | None:
    """The innermost traceback frame outside torch: usually the line of model code that failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename and "/passes/" not in f.filename]
    if not user:
        return None
    f = user[-1]
    return f"{f.filename}:{f.lineno} ({f.line})"
