"""``partition`` and ``load_plan``: the partitioner's entry points.

Reads a model (captured once and costed once with ``passes``); returns a ``Plan``. The mesh
and everything under it is chosen by ``search`` with the step simulator as the objective;
``build`` makes the modules of the chosen candidate only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from passes import capture, estimate
from passes._keys import ESTIMATE
from passes._util import module_paths
from passes.capture import normalize_inputs, signature_of
from passes.devices import DeviceSpec, get_device_spec
from .build import anchors_of, build_stages, param_table, positions_of, shared_params, state_keys, unplaced
from .pipeline import BALANCES, SCHEDULES, memory_model
from .plan import AXES, DP_MODES, PLAN_FORMAT, Decisions, Plan
from .schedules import INTERLEAVED
from .search import Candidate, Planner, meshes, search

__all__ = ["partition", "load_plan", "STRATEGIES"]

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "pipeline", "tensor", "data")


def partition(model_or_gm: nn.Module, n_devices: int, example_inputs: Any = (), example_kwargs: dict | None = None,
              *, strategy: str = "auto", mesh: dict | None = None, data_parallel: str | None = None,
              device: "str | DeviceSpec | None" = None, devices_per_node: int = 8, memory_limit: int | None = None,
              training: bool = True, n_microbatches: int | None = None, schedule: str | None = None,
              optimizer: str | None = "adamw", balance: str = "time", cuts: Sequence[str] | None = None,
              recompute: bool | None = None, n_virtual: int | None = None) -> Plan:
    """The fastest way to run ``model`` on ``n_devices``: a mesh ``dp x tp x pp`` and everything under it.

    Every candidate is scored by the simulated step of the global batch (compute, the
    schedule's bubbles, tensor/pipeline/data-parallel communication and its overlap) within
    ``memory_limit`` per device; pipeline cuts may fall anywhere in the graph's compute order
    (between attention and MLP, inside a block) and are exact for the cost model.

    Args:
        model_or_gm: an ``nn.Module`` or a graph from ``passes.capture``.
        n_devices: devices in all (``dp * tp * pp``).
        example_inputs, example_kwargs: one global batch, as the model takes it. They set the
            costs; the plan runs any batch size and sequence length the model accepts.
        strategy: "auto" (choose the mesh), "pipeline" (pp = n), "tensor" (tp = n), "data" (dp = n).
        mesh: pin the degrees, e.g. ``{"dp": 2, "tp": 2, "pp": 2}`` (missing axes are 1).
        data_parallel: "replicate" or "shard" (ZeRO-3 / FSDP2); None lets the planner choose.
        device: "h100", "a100", "h200", "cpu" or a ``DeviceSpec``; None is this machine (under
            ``torch.distributed``, rank 0 measures it and every rank plans with its figures).
        devices_per_node: devices sharing the fast link (tensor parallelism stays within them).
        memory_limit: bytes per device; None means the device's memory.
        training: plan a training step (backward, gradients, optimizer state) or inference.
        n_microbatches: micro-batches per data-parallel replica and step; None lets the planner choose.
        schedule: "1f1b", "gpipe" or "interleaved-1f1b" (each pipeline rank holds 2 or 4 stages, cut
            from the model as ``pp * v``; rank r holds stages r, r + pp, ...); None lets the planner choose.
        optimizer: "adamw", "sgd" or None: its state counts toward each device's memory.
        balance: "time" (compute + communication on ``device``) or "flops" for the pipeline cuts.
        cuts: pin the pipeline cuts yourself: node names or module paths (cut where the module
            starts), ``pp - 1`` of them, in order (with ``strategy="pipeline"`` or a mesh).
        recompute: recompute every block's activations in backward (full activation checkpointing per
            block; the runtime applies it): None where a candidate's activations do not fit otherwise,
            True always, False never.
        n_virtual: pipeline stages per pp rank with interleaved 1F1B (2 or more; 1: no interleaving);
            None lets the planner choose among 1, 2 and 4.

    Returns:
        A ``Plan``: ``plan(*inputs)`` runs it, ``plan.report()`` explains it, ``plan.candidates``
        lists the meshes tried.

    Raises:
        ValueError: bad arguments, more stages than places to cut, or no mesh that fits
            ``memory_limit`` (the message says what each candidate would need).

    Example:
        >>> from passes.zoo import tiny_gpt
        >>> model, inputs = tiny_gpt(n_layers=4)
        >>> plan = partition(model, 2, inputs, device="h100")
        >>> torch.testing.assert_close(plan(*inputs), model(*inputs))
    """
    fixed = _check_args(n_devices, strategy, mesh, data_parallel, schedule, balance, optimizer, memory_limit,
                        n_microbatches, cuts)
    if n_virtual is not None and (not isinstance(n_virtual, int) or isinstance(n_virtual, bool) or n_virtual < 1 or
                                  (n_virtual > 1 and schedule not in (None, INTERLEAVED)) or
                                  (n_virtual == 1 and schedule == INTERLEAVED)):
        raise ValueError(f"n_virtual={n_virtual!r} with schedule={schedule!r}: give 2 or more stages per pipeline rank "
                         f"with schedule={INTERLEAVED!r} (or None), or 1 with '1f1b' / 'gpipe'")
    if n_virtual is not None and n_virtual > 1:
        schedule = INTERLEAVED
    if schedule == INTERLEAVED and (cuts is not None or not training):
        raise ValueError(f"schedule={INTERLEAVED!r} " + ("chooses its own pp x v cuts; pin cuts with '1f1b' or "
                                                         "'gpipe'" if cuts is not None else
                                                         "is a training schedule; inference runs forwards only "
                                                         "(leave schedule=None)"))
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    spec = agreed_device_spec(device)
    # a model on the meta device only plans (its plan is applied to real weights by load_plan, which
    # captures them): a static capture costs the same and takes half the time
    gm = capture(model_or_gm, args, kwargs, dynamic=not _on_meta(model_or_gm))
    optimizer = optimizer if training else None
    start = time.perf_counter()
    # per-node costs do not depend on the optimizer (its state is the memory model's, per stage and mesh):
    # skip the fake warm-up step that creates it
    est = _estimate_once(gm, args, kwargs, spec, training, None)
    log.debug("captured and costed %s in %.1f s", est.model, time.perf_counter() - start)
    limit = memory_limit if memory_limit is not None else (spec.memory_bytes or None)
    planner = Planner(gm, spec, training, optimizer, balance=balance, memory_limit=limit,
                      devices_per_node=devices_per_node, batch=_batch_size(gm, args, kwargs),
                      precision=precision_of(gm))
    candidate_meshes = meshes(n_devices, devices_per_node=devices_per_node, fixed=fixed)
    if fixed is not None:
        _check_cuttable(planner, fixed, est.model)
    positions = _pinned_positions(planner.graphs(fixed["tp"]).costs, cuts, fixed["pp"]) if cuts is not None else None
    def plan_with(data_parallel, n_virtual, schedule) -> Plan:
        start = time.perf_counter()
        try:
            best, tried = search(planner, candidate_meshes, n_microbatches=n_microbatches, schedule=schedule,
                                 data_parallel=data_parallel, positions=positions, recompute=recompute,
                                 n_virtual=n_virtual)
        except ValueError as exc:
            raise ValueError(f"no plan of {est.model} on {n_devices} devices fits {exc}") from None
        best = _refined(planner, best, positions)
        log.debug("searched %d candidates in %.1f s", len(tried), time.perf_counter() - start)
        start = time.perf_counter()
        built = _build(planner, best, model_or_gm, est.model, strategy=strategy, tried=tried)
        log.debug("built the plan's modules in %.1f s", time.perf_counter() - start)
        return built

    plan = plan_with(data_parallel, n_virtual, schedule)
    tied = _tied_on_one_rank(plan)
    if tied is not None:       # FSDP would shard one tensor twice on a rank: interleave or shard, not both
        interleave_pinned = (n_virtual or 1) > 1 or schedule == INTERLEAVED
        if interleave_pinned and data_parallel == "shard":
            raise ValueError(f"{est.model}: parameter {tied[0]!r} is tied across stages {tied[1]}, which interleaving "
                             f"puts on one rank; data_parallel='shard' cannot shard one parameter for two stages of a "
                             f"rank. Use data_parallel='replicate', or schedule='1f1b'")
        log.info("%s: tied parameter %s on one rank under interleaving and sharding; planning again without %s",
                 est.model, tied[0], "sharding" if interleave_pinned else "interleaving")
        plan = plan_with("replicate", n_virtual, schedule) if interleave_pinned else \
            plan_with(data_parallel, 1, None if schedule == INTERLEAVED else schedule)
    _warn_batch_statistics(gm, plan)
    log.debug("plan:\n%s", plan.report())
    return plan


def _build(planner: Planner, best: Candidate, model: nn.Module, name: str, *, strategy: str, tried) -> Plan:
    """The plan of the chosen candidate: its stage and shard modules, costs and decisions."""
    mesh, m = best.mesh, best.n_microbatches
    g = planner.graphs(mesh["tp"], best.recompute)
    costs_mb = g.costs.at_fraction(1.0 / (mesh["dp"] * m))
    memory_of = memory_model(costs_mb, mesh["pp"] * best.n_virtual, training=planner.training, schedule=best.schedule,
                             n_microbatches=m, optimizer=planner.optimizer, dp=mesh["dp"], dp_mode=best.data_parallel,
                             unit_param_bytes=g.unit_param_bytes, precision=planner.precision,
                             n_virtual=best.n_virtual)
    shards = g.shards                                   # every tp rank's graph (built now, for the winner only)
    cut_graph = shards[0] if shards else planner.gm
    positions = list(best.positions)
    stages = build_stages(planner.gm, cut_graph, g.costs, positions, memory_of=memory_of, shard_graphs=shards,
                          balance=planner.balance)
    decisions = Decisions(
        mesh=dict(mesh), strategy=strategy, cuts=anchors_of(g.costs.order, positions),
        sharding=g.info.decisions() if g.info is not None else None, schedule=best.schedule, n_microbatches=m,
        data_parallel=best.data_parallel, training=planner.training, optimizer=planner.optimizer,
        memory_limit=planner.memory_limit, balance=planner.balance, device=planner.spec,
        devices_per_node=planner.devices_per_node, precision=planner.precision, recompute=best.recompute,
        n_virtual=best.n_virtual)
    gm = planner.gm
    modules = [s.module for s in stages]
    info = getattr(gm.graph._codegen, "pytree_info", None)
    times = g.costs.node_time
    return Plan(decisions=decisions, stages=stages, cost=best.cost, signature=signature_of(gm),
                out_spec=info.out_spec if info else None, model=name,
                lower_bound_s=max(float(times.sum()) / len(stages), float(times.max(initial=0.0))),
                # tied parameters by the graphs the ranks run: a tensor shard places a row-parallel bias after the
                # all-reduce, so a stage boundary can fall between a weight and its bias
                shared_params=shared_params([st.tp_shards[0].module if st.tp_shards else st.module for st in stages], gm),
                state_keys=state_keys(model, modules) if model is not gm else {},
                unplaced=unplaced(model, modules) if model is not gm else {},
                params=param_table(model), sharding=g.info, candidates=tuple(tried))


def _refined(planner: Planner, best: Candidate, pinned) -> Candidate:
    """The winner of a search at block boundaries, cut again exactly over every node where a better split's cuts
    can lie."""
    g = planner.graphs(best.mesh["tp"])
    if pinned is not None or g.allowed is None or best.mesh["pp"] == 1:
        return best
    fine = planner.evaluate(best.mesh, best.n_microbatches, best.schedule, best.data_parallel, near=best.positions,
                            recompute=best.recompute, n_virtual=best.n_virtual)
    if not fine.fits:
        return best
    # balance="flops" asks for the cuts that balance FLOPs, which the exact solve gives, even where the step is slower
    return fine if planner.balance == "flops" or fine.step_time_s <= best.step_time_s else best


def _check_cuttable(planner: Planner, mesh: dict, model: str) -> None:
    costs = planner.graphs(mesh["tp"]).costs
    n_nodes = len(costs.order)
    n_cuttable = int(costs.cuttable[1:n_nodes].sum())
    if mesh["pp"] - 1 > n_cuttable:
        raise ValueError(f"cannot cut {model} into {mesh['pp']} non-empty stages: its graph has {n_nodes} compute "
                         f"nodes and only {n_cuttable} places to cut; use at most {n_cuttable + 1} stages")


def _tied_on_one_rank(plan: Plan) -> tuple | None:
    """A parameter tied across two stages that interleaving puts on one rank, in a plan that shards over dp:
    (name, its stages), else None."""
    if plan.data_parallel != "shard" or plan.mesh["dp"] == 1 or plan.n_virtual == 1:
        return None
    pp = plan.mesh["pp"]
    for name, stages in plan.shared_params.items():
        if len({s % pp for s in stages}) < len(stages):
            return name, stages
    return None


def _on_meta(model: nn.Module) -> bool:
    tensors = list(model.parameters()) + list(model.buffers())
    return bool(tensors) and all(t.is_meta for t in tensors)


def precision_of(gm: torch.fx.GraphModule) -> str:
    """How training holds the state: "mixed" for a model whose floating parameters are bf16 or fp16 (fp32
    master weights and optimizer buffers beside them), "fp32" otherwise."""
    dtypes = {p.dtype for p in gm.parameters() if p.is_floating_point()}
    return "mixed" if dtypes and dtypes <= {torch.bfloat16, torch.float16} else "fp32"


def _batch_size(gm, args: tuple, kwargs: dict) -> int:
    """The example's global batch: dim 0 of the first tensor input (1 when there is none)."""
    for spec in signature_of(gm).inputs:
        if spec.kind == "tensor" and spec.example:
            return int(spec.example[0])
    return 1


def _estimate_once(gm, args, kwargs, spec, training, optimizer):
    """The graph's costs; an estimate already on the graph for the same device and step (forward, or forward
    and backward) is reused, whatever optimizer it assumed: per-node costs do not depend on it."""
    est = gm.meta.get(ESTIMATE)
    if est is not None and (est.device, est.training) == (spec, training):
        return est
    return estimate(gm, args, kwargs, device=spec, training=training, optimizer=optimizer)


def agreed_device_spec(device) -> DeviceSpec:
    """The ``DeviceSpec`` every rank plans with: a named device as is; this machine measured once.

    Under ``torch.distributed`` (a process group, or ``torchrun``'s environment, in which case the
    default group is initialised as the runtime would), rank 0 measures the machine and sends
    its figures to every rank, so ranks started together plan the same cuts.
    """
    if device is not None or torch.cuda.is_available():
        return get_device_spec(device)
    import os
    import torch.distributed as dist
    if not dist.is_available():
        return get_device_spec(None)
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ:
        import atexit
        dist.init_process_group("gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return get_device_spec(None)
    box = [get_device_spec(None).to_dict() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return DeviceSpec.from_dict(box[0])


def _fixed_mesh(strategy: str, mesh: dict | None, n: int) -> dict | None:
    if mesh is not None:
        return {axis: int(mesh.get(axis, 1)) for axis in AXES}
    return {"pipeline": {"dp": 1, "tp": 1, "pp": n}, "tensor": {"dp": 1, "tp": n, "pp": 1},
            "data": {"dp": n, "tp": 1, "pp": 1}}.get(strategy)


def _check_args(n_devices, strategy, mesh, data_parallel, schedule, balance, optimizer, memory_limit,
                n_microbatches, cuts) -> dict | None:
    if not isinstance(n_devices, int) or isinstance(n_devices, bool) or n_devices < 1:
        raise ValueError(f"n_devices must be a positive int, got {n_devices!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not available; use one of {STRATEGIES}")
    if mesh is not None:
        if not isinstance(mesh, dict) or set(mesh) - set(AXES) or \
                not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in mesh.values()):
            raise ValueError(f"mesh={mesh!r}: give positive ints for some of {AXES}, e.g. {{'dp': 2, 'pp': 2}}")
        product = math.prod(mesh.values())
        if product != n_devices:
            raise ValueError(f"mesh={mesh} has {product} devices but n_devices={n_devices}")
        if strategy not in ("auto",) and _fixed_mesh(strategy, None, n_devices) != _fixed_mesh("auto", mesh, n_devices):
            raise ValueError(f"strategy={strategy!r} and mesh={mesh} disagree; pass one of them")
    if data_parallel not in (None, *DP_MODES):
        raise ValueError(f"data_parallel={data_parallel!r}: use one of {DP_MODES} or None (the planner chooses)")
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not known; use one of {SCHEDULES} or None")
    if balance not in BALANCES:
        raise ValueError(f"balance={balance!r} is not known; use one of {BALANCES}")
    if optimizer not in (None, "sgd", "adamw"):
        raise ValueError(f"optimizer={optimizer!r} is not supported; use 'adamw', 'sgd' or None")
    if memory_limit is not None and not memory_limit > 0:
        raise ValueError(f"memory_limit must be a positive number of bytes, got {memory_limit!r}")
    if n_microbatches is not None and (not isinstance(n_microbatches, int) or n_microbatches < 1):
        raise ValueError(f"n_microbatches must be a positive int or None, got {n_microbatches!r}")
    fixed = _fixed_mesh(strategy, mesh, n_devices)
    if cuts is not None and fixed is None:
        raise ValueError("cuts=... pins a pipeline: pass strategy='pipeline' or a mesh with pp = len(cuts) + 1")
    return fixed


def _pinned_positions(costs, cuts: Sequence[str], n_stages: int) -> list[int]:
    """Positions of user-given cuts: node names, or module paths (cut before the module's first node)."""
    if len(cuts) != n_stages - 1:
        raise ValueError(f"cuts must name pp - 1 = {n_stages - 1} places, got {len(cuts)}: {list(cuts)}")
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
    return any(p == path or p.startswith(path + ".") for p in module_paths(node))


_BATCH_NORM = ("_native_batch_norm_legit_functional", "_native_batch_norm_legit", "native_batch_norm",
               "batch_norm", "cudnn_batch_norm", "_batch_norm_with_update")


def _warn_batch_statistics(gm, plan: Plan) -> None:
    """Batch statistics over a micro-batch (or a data-parallel share) are not the full batch's: say so."""
    if not plan.training or plan.mesh["dp"] * plan.n_microbatches == 1:
        return
    users = [n.name for n in gm.graph.nodes if n.op == "call_function" and
             getattr(getattr(n.target, "overloadpacket", None), "__name__", "") in _BATCH_NORM and _batch_stats(n)]
    if users:
        warnings.warn(f"{plan.model} normalises with batch statistics in training ({', '.join(users[:3])}); with "
                      f"{plan.mesh['dp']} data-parallel replicas x {plan.n_microbatches} micro-batches each "
                      f"normalises over 1/{plan.mesh['dp'] * plan.n_microbatches} of the batch, so training differs "
                      f"from one full-batch step (as with DDP without SyncBatchNorm). Put BatchNorm in eval mode, "
                      f"or plan with n_microbatches=1 and no data parallelism", stacklevel=3)


def _batch_stats(node) -> bool:
    """Whether a batch-norm node normalises with the batch's statistics (training=True)."""
    name = node.target.overloadpacket.__name__
    index = {"_native_batch_norm_legit_functional": 5, "_native_batch_norm_legit": 5, "native_batch_norm": 5,
             "batch_norm": 5, "cudnn_batch_norm": 5, "_batch_norm_with_update": None}.get(name)
    if index is None:
        return True
    value = node.args[index] if len(node.args) > index else node.kwargs.get("training", False)
    return bool(value)


def load_plan(path: str, model: nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None) -> Plan:
    """Apply a saved plan's decisions to ``model`` (same architecture) without planning again.

    Plan on the meta device, then load onto the real weights (an ``eval()`` model from
    ``from_pretrained`` included): the stages hold the model's own parameters. The model must
    have the plan's parameters (names, shapes, dtypes); cuts are found by node name, else by
    their module path and op; a tensor plan's analysis is rerun and must split the same
    parameters the same way.

    Raises:
        ValueError: the file is not an fxpart plan, or the model differs from the planned one
            (the message names the first differing parameter, or what no longer matches).
    """
    with open(path) as f:
        saved = json.load(f)
    if saved.get("format") != PLAN_FORMAT:
        raise ValueError(f"{path} is not an fxpart plan of this version (format {saved.get('format')!r}, expected "
                         f"{PLAN_FORMAT!r}); plan again with partition()")
    decisions = Decisions.from_dict(saved["decisions"])
    _check_params(saved["params"], param_table(model), path, saved.get("model", ""), type(model).__name__)
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    gm = capture(model, args, kwargs)
    _estimate_once(gm, args, kwargs, decisions.device, decisions.training, None)
    planner = Planner(gm, decisions.device, decisions.training, decisions.optimizer, balance=decisions.balance,
                      memory_limit=None, devices_per_node=decisions.devices_per_node,
                      batch=_batch_size(gm, args, kwargs), precision=decisions.precision)
    mesh = decisions.mesh
    g = planner.graphs(mesh["tp"])
    if decisions.sharding is not None:
        _check_sharding(decisions.sharding, g.info.decisions(), path, type(model).__name__)
    try:
        positions = positions_of(g.costs.order, decisions.cuts, g.costs.cuttable)
    except ValueError as exc:
        raise ValueError(f"{type(model).__name__} does not match the plan in {path}: {exc}; plan again with "
                         f"partition()") from None
    m = decisions.n_microbatches
    if planner.batch % (mesh["dp"] * m):
        # the example only sets the costs (the runtime splits whatever batch it is given): cost each
        # replica's micro-batch as that share of it
        planner.batch = mesh["dp"] * m
    best = planner.evaluate(mesh, m, decisions.schedule, decisions.data_parallel, positions=positions,
                            recompute=decisions.recompute, n_virtual=decisions.n_virtual)
    best = dataclasses.replace(best, n_microbatches=decisions.n_microbatches)
    if not best.fits:
        raise ValueError(f"the plan in {path} does not apply to {type(model).__name__}: {best.reason}")
    return _build(planner, best, model, saved.get("model", ""), strategy=decisions.strategy, tried=())


def _check_params(saved: dict, found: dict, path: str, planned: str, name: str) -> None:
    for key, value in saved.items():
        if key not in found:
            raise ValueError(f"{name} does not match the plan in {path} (planned for {planned}): it has no parameter "
                             f"{key!r}; plan again with partition()")
        if found[key] != value:
            raise ValueError(f"{name} does not match the plan in {path} (planned for {planned}): parameter {key!r} "
                             f"is {found[key][1]}{found[key][0]}, the plan's is {value[1]}{value[0]}; plan again with "
                             f"partition()")
    extra = [k for k in found if k not in saved]
    if extra:
        raise ValueError(f"{name} does not match the plan in {path} (planned for {planned}): it has parameters the "
                         f"plan does not, e.g. {extra[:3]}; plan again with partition()")


def _check_sharding(saved: dict, found: dict, path: str, name: str) -> None:
    want, got = saved.get("params", {}), found.get("params", {})
    for key in sorted(set(want) | set(got)):
        if want.get(key) != got.get(key):
            raise ValueError(f"{name} shards differently from the plan in {path}: parameter {key!r} is split "
                             f"{got.get(key) or 'not at all'} here, {want.get(key) or 'not at all'} in the plan "
                             f"([dim, blocks, rep, segments]); plan again with partition(..., strategy='tensor')")
