"""``estimate``: FLOPs, memory and time of a model, per node and in total.

Reads a model or a captured graph; writes ``node.meta[COST]`` (a ``NodeCost``) on every
node of the captured graph and ``gm.meta[ESTIMATE]`` (the ``Estimate``).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.fx
from torch import nn

from ._keys import COST, ESTIMATE
from ._util import format_bytes, format_count, format_seconds, module_path, node_value, table, tensors_of
from .capture import capture, normalize_inputs
from .devices import DeviceSpec, get_device_spec
from .simulate import OPTIMIZERS, simulate, simulate_module
from .timing import roofline_s

log = logging.getLogger(__name__)

__all__ = ["estimate", "Estimate", "NodeCost", "annotate_costs"]


@dataclass(frozen=True)
class NodeCost:
    """Costs of one graph node on the example batch (``time_s`` = forward + backward when training)."""
    name: str
    op: str
    module: str
    shape: str
    dtype: str
    flops: int
    backward_flops: int
    output_bytes: int        # new storage the forward allocates (views: 0)
    saved_bytes: int         # of that, what is kept for the backward
    param_bytes: int         # parameters and buffers this node reads directly (get_attr)
    forward_time_s: float
    backward_time_s: float
    time_s: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Estimate:
    """Result of ``estimate``: totals, peak memory with its breakdown, and one ``NodeCost`` per node."""
    flops: int
    backward_flops: int
    param_bytes: int
    time_s: float
    peak_bytes: int
    training: bool
    optimizer: str | None
    device: DeviceSpec
    nodes: list[NodeCost]
    peak_breakdown: dict = field(default_factory=dict)
    peak_phase: str = ""
    peak_node: str = ""
    activation_bytes: int = 0          # saved for backward (training) at the end of the forward
    uncounted_ops: dict = field(default_factory=dict)
    model: str = ""
    graph_peak_bytes: int = 0          # the captured graph's peak (values freed at their last use)
    peak_source: str = "graph"         # "eager": peak_bytes is the module's eager forward (Python locals
                                       # live until rebound); "graph": the captured graph's

    def by_module(self, depth: int | None = None) -> list[tuple[str, dict]]:
        """Totals per module path (cut to ``depth`` components), in graph order."""
        groups: dict[str, dict] = defaultdict(lambda: defaultdict(float))
        # compute nodes first, so modules come in execution order (parameters sit at the graph's top)
        for row in sorted(self.nodes, key=lambda r: r.op in ("get_attr", "placeholder")):
            key = row.module if depth is None else ".".join(row.module.split(".")[:depth])
            for attr in ("flops", "backward_flops", "output_bytes", "saved_bytes", "param_bytes", "time_s"):
                groups[key or "(top)"][attr] += getattr(row, attr)
        return [(k, dict(v)) for k, v in groups.items()]

    def report(self, *, per_node: bool = False, depth: int | None = 3) -> str:
        """A plain-text table per module (or per node) with totals and the peak's breakdown."""
        mode = f"training step ({self.optimizer or 'no optimizer'})" if self.training else "inference forward"
        head = [f"{self.model or 'model'}: {mode} on {self.device.name}",
                f"  forward {format_count(self.flops, 'FLOP')}, backward {format_count(self.backward_flops, 'FLOP')}, "
                f"parameters {format_bytes(self.param_bytes)}, time {format_seconds(self.time_s)}",
                f"  peak memory {format_bytes(self.peak_bytes)} during {self.peak_phase} at {self.peak_node}: "
                + ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(self.peak_breakdown.items(),
                                                                        key=lambda kv: -kv[1]))]
        if self.peak_source == "eager" and self.graph_peak_bytes != self.peak_bytes:
            head.append(f"  (the module's eager forward; the captured graph, which frees values at their last "
                        f"use, peaks at {format_bytes(self.graph_peak_bytes)})")
        if per_node:
            rows = [(r.name, r.op, r.shape, format_count(r.flops), format_count(r.backward_flops),
                     format_bytes(r.output_bytes), format_bytes(r.saved_bytes), format_seconds(r.time_s))
                    for r in self.nodes if r.op not in ("placeholder", "output")]
            body = table(["node", "op", "shape", "FLOPs", "bwd FLOPs", "out bytes", "saved", "time"], rows,
                         align="lllrrrrr")
        else:
            rows = [(k, format_count(v["flops"]), format_count(v["backward_flops"]), format_bytes(v["param_bytes"]),
                     format_bytes(v["saved_bytes"]), format_seconds(v["time_s"]))
                    for k, v in self.by_module(depth)]
            rows.append(("total", format_count(self.flops), format_count(self.backward_flops),
                         format_bytes(self.param_bytes), format_bytes(self.activation_bytes),
                         format_seconds(self.time_s)))
            body = table(["module", "FLOPs", "bwd FLOPs", "params", "saved act.", "time"], rows)
        lines = head + ["", body]
        if self.uncounted_ops:
            lines += ["", "ops with no FLOP rule (counted as 0 FLOPs): "
                      + ", ".join(f"{k} x{v}" for k, v in sorted(self.uncounted_ops.items()))]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()

    def _repr_pretty_(self, p, cycle):  # IPython
        p.text(self.report())


def estimate(model_or_gm: nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None, *,
             device: "str | DeviceSpec | None" = None, training: bool = False, optimizer: str | None = None,
             loss_fn: Callable | None = None, node_times: dict[str, float] | None = None) -> Estimate:
    """Estimate FLOPs, peak memory and time of one forward or one training step.

    Nothing is computed for real: the step runs on fake tensors, so a model on the meta
    device (no weights) works, and a real one allocates no activation memory.

    Args:
        model_or_gm: an ``nn.Module`` (captured with ``capture``) or an already captured graph.
        example_inputs, example_kwargs: the example batch.
        device: "h100", "a100", "h200", "cpu" (measured), a ``DeviceSpec``, or None for this machine.
        training: estimate forward + backward (+ optimizer step) instead of a forward under no_grad.
        optimizer: None, "sgd" or "adamw" (training only; its state counts as resident).
        loss_fn: reduces the model's outputs to the loss; None sums every floating-point output.
        node_times: measured forward seconds per node name (``timing.measure_node_times``),
            replacing the roofline for those nodes.

    Returns:
        An ``Estimate``; the graph's nodes also carry their ``NodeCost`` in ``node.meta[COST]``.

    Raises:
        ValueError: an unknown optimizer or device, or ``optimizer`` without ``training``.

    Example:
        >>> est = estimate(torch.nn.Linear(64, 32), (torch.randn(8, 64),))
        >>> est.flops
        32768
    """
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported; use one of {OPTIMIZERS} or None")
    if optimizer is not None and not training:
        raise ValueError(f"optimizer={optimizer!r} only applies to a training step; pass training=True")
    spec = get_device_spec(device)
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    gm = capture(model_or_gm, args, kwargs, dynamic=False)    # costs are of the example's shapes
    trace = simulate(gm, args, kwargs, training=training, optimizer=optimizer, loss_fn=loss_fn,
                     foreach=spec.foreach_optimizer)
    rows = annotate_costs(gm, trace, spec, training=training, node_times=node_times)
    peak = trace
    if gm is not model_or_gm:   # a module: its eager forward keeps Python locals alive past their last use
        peak = _eager_trace(model_or_gm, args, kwargs, training=training, optimizer=optimizer, loss_fn=loss_fn,
                            foreach=spec.foreach_optimizer) or trace
    est = Estimate(
        flops=trace.total_flops, backward_flops=trace.total_backward_flops,
        param_bytes=_param_bytes(gm), time_s=sum(r.time_s for r in rows) + _extra_time(trace, spec, rows),
        peak_bytes=peak.peak_bytes, training=training, optimizer=optimizer, device=spec, nodes=rows,
        peak_breakdown=dict(peak.peak_breakdown), peak_phase=peak.peak_phase, peak_node=peak.peak_node,
        activation_bytes=sum(r.saved_bytes for r in rows), uncounted_ops=dict(trace.uncounted_ops),
        model=gm.meta.get("fxpart.capture", {}).get("model", type(model_or_gm).__name__),
        graph_peak_bytes=trace.peak_bytes, peak_source="eager" if peak is not trace else "graph")
    gm.meta[ESTIMATE] = est
    return est


def _eager_trace(model: nn.Module, args: tuple, kwargs: dict, **step):
    """The step through the module's own forward on fakes, or None when that forward cannot run on
    fakes (data-dependent Python such as ``Tensor.item()``, common on the meta device)."""
    try:
        return simulate_module(model, args, kwargs, **step)
    except Exception:  # noqa: BLE001 - the captured graph's peak stands in, and says so (peak_source)
        log.debug("eager simulation of %s failed; using the graph's peak", type(model).__name__, exc_info=True)
        return None


def annotate_costs(gm: torch.fx.GraphModule, trace, spec: DeviceSpec, *, training: bool,
                   node_times: dict[str, float] | None = None) -> list[NodeCost]:
    """Write a ``NodeCost`` into ``node.meta[COST]`` for every node; returns them in graph order."""
    node_times = node_times or {}
    params = dict(gm.named_parameters(remove_duplicate=False)) | dict(gm.named_buffers(remove_duplicate=False))
    rows = []
    for node in gm.graph.nodes:
        t = trace.nodes.get(node.name)
        flops, bflops = (t.flops, t.backward_flops) if t else (0, 0)
        # a backward that allocated (gradients, temporaries) launched kernels even at 0 FLOPs
        has_backward = bool(t and (t.backward_flops or t.backward_bytes))
        fwd, bwd = roofline_s(node, flops, bflops, spec, has_backward=has_backward)
        if node.name in node_times:
            measured = node_times[node.name]
            bwd = bwd * measured / fwd if fwd else bwd
            fwd = measured
        if not training:
            bwd = 0.0
        val = node_value(node)
        tensors = tensors_of(val)
        cost = NodeCost(
            name=node.name, op=_op_name(node), module=_module_path(node),
            shape=" ".join(str(tuple(x.shape)) for x in tensors[:2]),
            dtype=str(tensors[0].dtype).removeprefix("torch.") if tensors else "",
            flops=flops, backward_flops=bflops if training else 0,
            output_bytes=t.output_bytes if t else 0, saved_bytes=t.saved_bytes if t else 0,
            param_bytes=_attr_bytes(node, params), forward_time_s=fwd, backward_time_s=bwd, time_s=fwd + bwd)
        node.meta[COST] = cost
        rows.append(cost)
    return rows


def _extra_time(trace, spec: DeviceSpec, rows: list[NodeCost]) -> float:
    """Work outside graph nodes: the loss and autograd bookkeeping, and the optimizer's sweep over parameters."""
    extra = trace.nodes.get("(optimizer)")
    if extra is None:
        return 0.0
    # the optimizer streams parameters, gradients and state through memory once or twice
    return (2 * trace.resident.get("optimizer", 0) + 3 * trace.resident.get("param", 0)) / spec.memory_bandwidth_Bps


def _param_bytes(gm: torch.fx.GraphModule) -> int:
    return sum(p.numel() * p.element_size() for p in gm.parameters())


def _attr_bytes(node: torch.fx.Node, params: dict) -> int:
    if node.op != "get_attr":
        return 0
    t = params.get(node.target)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return target.overloadpacket.__name__ if target._overloadname == "default" else \
                f"{target.overloadpacket.__name__}.{target._overloadname}"
        return getattr(target, "__name__", str(target))
    return node.op


def _module_path(node: torch.fx.Node) -> str:
    path = module_path(node)
    if not path and node.op == "get_attr":
        return node.target.rpartition(".")[0]
    return path
