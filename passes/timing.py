"""Time per node: a roofline from a ``DeviceSpec``, or measured times that override it.

Reads node values (shapes, dtypes) and the FLOPs of a simulated step; writes nothing
(``passes.estimate`` stores the result in ``node.meta[COST]``).

The roofline of one kernel is ``max(flops / peak_flops(dtype), bytes / bandwidth) +
launch``, where ``bytes`` is what the node reads and writes. Views and metadata ops
launch nothing and take no time. A backward pays twice the forward's memory traffic
(it reads the saved inputs and the incoming gradient, and writes gradients).
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.fx

from ._util import node_value, tensor_bytes, tensors_of
from .devices import DeviceSpec

__all__ = ["roofline_s", "node_io_bytes", "measure_node_times"]


def node_io_bytes(node: torch.fx.Node) -> int:
    """Bytes a node's kernel reads and writes (0 for views and non-compute nodes)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) or _is_view(node.target):
        return 0
    read = sum(tensor_bytes(t) for arg in node.all_input_nodes for t in tensors_of(node_value(arg)))
    written = sum(tensor_bytes(t) for t in tensors_of(node_value(node)))
    return read + written


def _is_view(op: torch._ops.OpOverload) -> bool:
    returns = op._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _is_attention(node: torch.fx.Node) -> bool:
    name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
    return "attention" in name or "flash" in name or "efficient_attention" in name


def _dtype(node: torch.fx.Node) -> torch.dtype:
    for arg in node.all_input_nodes:
        for t in tensors_of(node_value(arg)):
            if t.is_floating_point():
                return t.dtype
    return torch.float32


def roofline_s(node: torch.fx.Node, flops: int, backward_flops: int, spec: DeviceSpec, *,
               has_backward: bool | None = None) -> tuple[float, float]:
    """(forward seconds, backward seconds) of one node on ``spec``.

    ``has_backward``: whether autograd ran kernels for the node's backward; None means
    ``backward_flops > 0``. Norms, activations and embeddings count 0 FLOPs but their
    backward still moves memory, so pass True for them.
    """
    io = node_io_bytes(node)
    if io == 0 and flops == 0:
        return 0.0, 0.0
    peak = spec.flops_per_s(_dtype(node)) * (spec.attention_efficiency if _is_attention(node) else
                                             spec.matmul_efficiency)
    bandwidth = spec.memory_bandwidth_Bps * spec.memory_efficiency
    forward = max(flops / peak, io / bandwidth) + spec.launch_s
    backward = 0.0
    if backward_flops or has_backward:
        backward = max(backward_flops / peak, 2 * io / bandwidth) + 2 * spec.launch_s
    return forward, backward


def measure_node_times(gm: torch.fx.GraphModule, example_inputs: tuple = (), example_kwargs: dict | None = None,
                       *, repeats: int = 5) -> dict[str, float]:
    """Forward seconds of every compute node, each timed alone on real tensors (median of ``repeats``).

    Pass the result as ``estimate(..., node_times=...)`` to replace the roofline. Timing
    each op alone ranks nodes well but misses what overlaps or caches across ops.
    """
    from .simulate import _flat_inputs

    times: dict[str, list[float]] = {}

    class _Timer(torch.fx.Interpreter):
        def run_node(self, node):
            if node.op != "call_function":
                return super().run_node(node)
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            start = time.perf_counter()
            out = node.target(*args, **kwargs)
            times.setdefault(node.name, []).append(time.perf_counter() - start)
            return out

    flat = _flat_inputs(gm, tuple(example_inputs), dict(example_kwargs or {}))
    with torch.no_grad():
        for _ in range(repeats + 1):
            _Timer(gm).run(*flat)
    return {name: sorted(ts[1:])[len(ts[1:]) // 2] for name, ts in times.items()}
