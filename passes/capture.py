"""Capture a model as an ATen-level ``torch.fx.GraphModule`` whose nodes carry fake values.

Reads an ``nn.Module`` (eager, ``symbolic_trace``d or handed over by Dynamo) and example
inputs; writes ``gm.meta[CAPTURE]`` (how it was captured). Nodes keep PyTorch's own
``val`` and ``nn_module_stack`` meta, which every later pass reads.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import traceback
from typing import Any

import torch
import torch.fx
from torch import nn

from ._keys import CAPTURE
from ._util import node_value

__all__ = ["capture", "CaptureError", "is_captured"]

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """No capture method could turn the model into an ATen graph."""


def capture(model: nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None) -> torch.fx.GraphModule:
    """Capture ``model`` as an ATen-level GraphModule with fake values on every node.

    Tries ``torch.export`` non-strict first (it traces Hugging Face models, which
    ``torch.fx.symbolic_trace`` cannot), then strict (Dynamo). A graph that is
    already ATen-level with ``val`` meta is returned as is.

    Args:
        model: the ``nn.Module`` to capture. Its parameters may live on the meta device.
        example_inputs: positional inputs (a tuple; a single tensor is accepted too).
        example_kwargs: keyword inputs.

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

    errors = []
    for method in ("export-nonstrict", "export-strict"):
        try:
            with _no_kv_cache(model):
                ep = torch.export.export(model, args, kwargs, strict=(method == "export-strict"))
        except Exception as exc:  # noqa: BLE001 - every failure is reported below
            log.debug("capture with %s failed", method, exc_info=True)
            errors.append((method, exc))
            continue
        gm = ep.module()
        gm.meta[CAPTURE] = {"model": type(model).__name__, "method": method}
        return gm
    raise CaptureError(_explain_failure(model, errors)) from errors[0][1]


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
