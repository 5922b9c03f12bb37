"""``partition`` and ``load_plan``: the partitioner's entry points.

Reads a model (captured and costed with ``passes``); returns a ``Plan``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from passes import capture, estimate
from passes._keys import COST
from passes._util import flatten_inputs, format_bytes
from passes.capture import normalize_inputs
from passes.devices import DeviceSpec, get_device_spec
from .pipeline import (BALANCES, SCHEDULES, PipelineCosts, build_plan, explain_memory, fingerprint, lower_bound,
                       memory_model, solve_cuts, stage_modules, state_keys)
from .plan import PLAN_FORMAT, Plan

__all__ = ["partition", "load_plan", "STRATEGIES"]

log = logging.getLogger(__name__)

STRATEGIES = ("pipeline", "tensor")


def partition(model_or_gm: nn.Module, n_devices: int, example_inputs: Any = (), example_kwargs: dict | None = None,
              *, strategy: str = "pipeline", device: "str | DeviceSpec | None" = None,
              memory_limit: int | None = None, training: bool = True, schedule: str = "1f1b",
              n_microbatches: int | None = None, optimizer: str | None = "adamw", balance: str = "time",
              cuts: Sequence[str] | None = None) -> Plan:
    """Cut a model into ``n_devices`` pipeline stages with the slowest stage as fast as possible.

    Cuts may fall anywhere in the graph's compute order (between attention and MLP, inside
    a block), not only between layers. The split is optimal for the cost model: each
    stage costs its compute plus the communication across its cuts, and every device
    stays under ``memory_limit``.

    Args:
        model_or_gm: an ``nn.Module`` or a graph from ``passes.capture``.
        n_devices: number of stages, one per device.
        example_inputs, example_kwargs: the example batch (the whole batch of one step).
        strategy: "pipeline" (contiguous stages) or "tensor" (one shard per device: column/row-parallel
            matmul pairs, attention by heads, all-reduces between; what matches no pattern is replicated).
        device: "h100", "a100", "h200", "cpu" or a ``DeviceSpec``; None is this machine.
        memory_limit: bytes per device; None means the device's memory.
        training: plan a training step (backward, gradients, optimizer state) or inference.
        schedule: "1f1b" or "gpipe": how many micro-batches a stage keeps activations for.
        n_microbatches: micro-batches per step (default ``n_devices``). When given (> 1), the stage
            modules are built from a capture of one micro-batch (every tensor input sliced to
            ``batch / n_microbatches`` on dim 0), so they run micro-batches, as the runtime does;
            costs still come from the whole batch. ``plan(*inputs)`` still takes the whole batch.
        optimizer: "adamw", "sgd" or None: its state counts toward each stage's memory.
        balance: "time" (compute + communication on ``device``) or "flops" (forward + backward FLOPs).
        cuts: pin the cuts yourself: node names (or module paths, cut where the module starts),
            ``n_devices - 1`` of them, in order.

    Returns:
        A ``Plan``: ``plan(*inputs)`` runs it, ``plan.report()`` explains it.

    Raises:
        ValueError: bad arguments, more devices than places to cut, or a memory limit no split
            meets (the message says what each stage would need).

    Example:
        >>> from passes.zoo import tiny_gpt
        >>> model, inputs = tiny_gpt(n_layers=4)
        >>> plan = partition(model, 2, inputs, device="h100")
        >>> torch.testing.assert_close(plan(*inputs), model(*inputs))
    """
    _check_args(n_devices, strategy, schedule, balance, optimizer, memory_limit)
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    spec = get_device_spec(device)
    gm = capture(model_or_gm, args, kwargs)
    est = _estimate_once(gm, args, kwargs, spec, training, optimizer if training else None)
    if strategy == "tensor":
        return _tensor_partition(model_or_gm, gm, n_devices, spec=spec, training=training,
                                 optimizer=optimizer if training else None, memory_limit=memory_limit, model=est.model)
    costs = PipelineCosts.of(gm, training=training, link_Bps=spec.link_bandwidth_Bps, balance=balance)
    n_nodes = len(costs.order)
    n_cuttable = int(costs.cuttable[1:n_nodes].sum())
    if n_devices - 1 > n_cuttable:
        raise ValueError(f"cannot cut {est.model} into {n_devices} non-empty stages: its graph has {n_nodes} compute "
                         f"nodes and only {n_cuttable} places to cut; use at most {n_cuttable + 1} devices")
    m = n_microbatches or n_devices
    limit = memory_limit if memory_limit is not None else (spec.memory_bytes or None)
    memory_of = memory_model(costs, n_devices, training=training, schedule=schedule, n_microbatches=m,
                             optimizer=optimizer if training else None)
    if cuts is not None:
        positions = _pinned_positions(costs, cuts, n_devices)
    else:
        try:
            positions = solve_cuts(costs, n_devices, memory_limit=limit, memory_of=memory_of)
        except ValueError:
            need = explain_memory(costs, n_devices, memory_of, limit)
            raise ValueError(
                f"no split of {est.model} into {n_devices} stages fits memory_limit={format_bytes(limit)} per device; "
                f"the fastest split needs {need}. Try more devices, more micro-batches (n_microbatches), a smaller "
                f"batch, schedule='1f1b', or passes.recompute to save activations") from None
    plan = build_plan(gm, costs, positions, spec=spec, training=training, schedule=schedule, n_microbatches=m,
                      optimizer=optimizer if training else None, balance=balance, model=est.model)
    plan = _for_model(plan, model_or_gm, gm, args, kwargs, microbatched=(n_microbatches or 1) > 1)
    log.debug("pipeline plan:\n%s", plan.report())
    return plan


def _tensor_partition(model_or_gm, gm, n_devices: int, *, spec, training: bool, optimizer, memory_limit,
                      model: str) -> Plan:
    """``strategy="tensor"``: n shards of every layer (Megatron column/row-parallel pairs, attention by heads)."""
    from .tensor import tensor_plan
    name = model
    plan = tensor_plan(gm, n_devices, spec=spec, training=training, optimizer=optimizer, model=name,
                       fingerprint=fingerprint(gm))
    limit = memory_limit if memory_limit is not None else (spec.memory_bytes or None)
    need = max(s.cost.memory_bytes for s in plan.stages)
    if limit is not None and need > limit:
        raise ValueError(f"the tensor plan of {name} on {n_devices} shards needs {format_bytes(need)} per device "
                         f"({', '.join(format_bytes(s.cost.memory_bytes) for s in plan.stages)}), over "
                         f"memory_limit={format_bytes(limit)}; try more devices, a smaller batch or "
                         f"strategy='pipeline'")
    # shards hold every tensor under its own state_dict name (split ones are slices of it)
    keys = state_keys(model_or_gm, [s.module for s in plan.stages]) if model_or_gm is not gm else {}
    return dataclasses.replace(plan, state_keys=keys)


def _for_model(plan: Plan, model: nn.Module, gm: torch.fx.GraphModule, args: tuple, kwargs: dict, *,
               microbatched: bool) -> Plan:
    """Record the model's state_dict keys; rebuild the stages from a micro-batch capture when asked."""
    keys = state_keys(model, [s.module for s in plan.stages]) if model is not gm else {}
    if not microbatched:
        return dataclasses.replace(plan, state_keys=keys, microbatch_shapes=_flat_shapes(plan, args, kwargs))
    m = plan.n_microbatches
    mb_args, mb_kwargs = _first_microbatch((args, kwargs), m)
    mb_gm = capture(model, mb_args, mb_kwargs) if model is not gm else None
    if mb_gm is None:
        raise ValueError("partition(..., n_microbatches=m) needs the nn.Module (not a captured graph) to capture "
                         "one micro-batch; pass the model, or plan on a micro-batch example with n_microbatches=1")
    if fingerprint(mb_gm) != plan.fingerprint:
        log.debug("the micro-batch capture differs from the full batch's; cuts are mapped by node name")
    modules = stage_modules(mb_gm, plan.cuts)
    stages = [dataclasses.replace(stage, module=module) for stage, module in zip(plan.stages, modules)]
    keys = state_keys(model, modules)
    return dataclasses.replace(plan, stages=stages, runs_microbatches=True, state_keys=keys,
                               microbatch_shapes=_flat_shapes(plan, mb_args, mb_kwargs))


def _flat_shapes(plan: Plan, args: tuple, kwargs: dict) -> tuple:
    flat = flatten_inputs(plan.in_spec, args, kwargs)
    return tuple(tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in flat)


def _first_microbatch(tree, m: int):
    """``tree`` with every tensor of a dim 0 sliced to its first ``1/m`` (the batch must divide)."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            if v.shape[0] % m:
                raise ValueError(f"n_microbatches={m} does not divide the example batch: an input has shape "
                                 f"{tuple(v.shape)}; pick n_microbatches dividing dim 0")
            return v[: v.shape[0] // m]
        return v
    return torch.utils._pytree.tree_map(cut, tree)


def _estimate_once(gm, args, kwargs, spec, training, optimizer):
    """The graph's costs; an estimate already on the graph for the same device and step is reused."""
    from passes._keys import ESTIMATE
    est = gm.meta.get(ESTIMATE)
    if est is not None and (est.device, est.training, est.optimizer) == (spec, training, optimizer):
        return est
    return estimate(gm, args, kwargs, device=spec, training=training, optimizer=optimizer)


def _check_args(n_devices, strategy, schedule, balance, optimizer, memory_limit) -> None:
    if not isinstance(n_devices, int) or isinstance(n_devices, bool) or n_devices < 1:
        raise ValueError(f"n_devices must be a positive int, got {n_devices!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not available; use one of {STRATEGIES}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not known; use one of {SCHEDULES}")
    if balance not in BALANCES:
        raise ValueError(f"balance={balance!r} is not known; use one of {BALANCES}")
    if optimizer not in (None, "sgd", "adamw"):
        raise ValueError(f"optimizer={optimizer!r} is not supported; use 'adamw', 'sgd' or None")
    if memory_limit is not None and memory_limit <= 0:
        raise ValueError(f"memory_limit must be a positive number of bytes, got {memory_limit!r}")


def _pinned_positions(costs: PipelineCosts, cuts: Sequence[str], n_devices: int) -> list[int]:
    """Positions of user-given cuts: node names, or module paths (cut before the module's first node)."""
    if len(cuts) != n_devices - 1:
        raise ValueError(f"cuts must name n_devices - 1 = {n_devices - 1} places, got {len(cuts)}: {list(cuts)}")
    order = costs.order
    by_name = {n.name: i for i, n in enumerate(order.nodes)}
    positions = []
    for cut in cuts:
        pos = by_name.get(cut)
        if pos is None:
            pos = next((i for i, n in enumerate(order.nodes) if _in_module(n, cut)), None)
        if pos is None or pos == 0:
            raise ValueError(f"cut {cut!r} is neither a node name nor a module path of the graph (or it is the "
                             f"first node); node names look like {order.nodes[len(order.nodes) // 2].name!r}")
        if not costs.cuttable[pos]:
            raise ValueError(f"cannot cut before {order.nodes[pos].name!r}: a tuple or scalar crosses there, or "
                             f"the node before it produces no tensor; pick a neighbouring node")
        positions.append(pos)
    if positions != sorted(set(positions)):
        raise ValueError(f"cuts must be distinct and in graph order, got {list(cuts)} at positions {positions}")
    return positions


def _in_module(node: torch.fx.Node, path: str) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    return any(p == path or p.startswith(path + ".") for p, _ in stack.values())


def load_plan(path: str, model: nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None) -> Plan:
    """Apply a saved plan's decisions to ``model`` (same architecture) without planning again.

    Plan on the meta device, then load onto the real weights: the stages hold the
    model's own parameters. Pipeline plans reuse the saved cuts; tensor plans rerun the
    (deterministic) sharding analysis and check that it reproduces every saved decision.

    Raises:
        ValueError: the file is not an fxpart plan, or the model's graph (or, for a tensor
            plan, its sharding) does not match it.
    """
    with open(path) as f:
        saved = json.load(f)
    if saved.get("format") != PLAN_FORMAT:
        raise ValueError(f"{path} is not an fxpart plan (format {saved.get('format')!r}, expected {PLAN_FORMAT!r})")
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    gm = capture(model, args, kwargs)
    if fingerprint(gm) != saved["fingerprint"]:
        raise ValueError(f"{type(model).__name__} does not match the plan in {path} (planned for {saved['model']}): "
                         f"its graph or parameter shapes differ; plan again with partition()")
    from passes.devices import DeviceSpec
    spec = DeviceSpec.from_dict(saved["device"])
    training = saved["training"]
    estimate(gm, args, kwargs, device=spec, training=training, optimizer="adamw" if training else None)
    if saved["strategy"] == "tensor":
        return _load_tensor_plan(saved, path, model, gm, spec, training)
    costs = PipelineCosts.of(gm, training=training, link_Bps=spec.link_bandwidth_Bps, balance=saved["balance"])
    n_stages = len(saved["stages"])
    positions = _pinned_positions(costs, saved["cuts"], n_stages)
    plan = build_plan(gm, costs, positions, spec=spec, training=training, schedule=saved["schedule"],
                      n_microbatches=saved["n_microbatches"], optimizer="adamw" if training else None,
                      balance=saved["balance"], model=saved["model"])
    return _for_model(plan, model, gm, args, kwargs, microbatched=saved.get("runs_microbatches", False))


def _load_tensor_plan(saved: dict, path: str, model: nn.Module, gm, spec, training: bool) -> Plan:
    """A tensor plan's shards for ``model``: the sharding analysis (deterministic, pattern-based) is
    rerun on this model's graph and must reproduce every saved decision."""
    plan = _tensor_partition(model, gm, saved["sharding"]["n"], spec=spec, training=training,
                             optimizer="adamw" if training else None, memory_limit=None, model=saved["model"])
    found = plan.sharding.decisions()
    differ = [k for k in saved["sharding"] if found.get(k) != saved["sharding"][k]]
    if differ:
        raise ValueError(f"{type(model).__name__} shards differently from the plan in {path} ({', '.join(differ)} "
                         f"differ: saved {[saved['sharding'][k] for k in differ]}, found {[found[k] for k in differ]}); "
                         f"plan again with partition(..., strategy='tensor')")
    return plan
