"""Decisions + a costed graph -> the stage and shard GraphModules of a plan, with their costs.

Reads a captured, costed graph (tp = 1) or its shard graphs (``tensor.shard_graph``, tp > 1)
and cut positions; writes new GraphModules (never the input graphs). Cuts are chosen in the
graph each device runs (shard 0 when tp > 1: its nodes carry their shard's costs and local
sizes); every shard is cut at the same node names, and the whole-stage module (``Stage.module``,
the stage unsharded) at the input graph's node each cut starts from (``fxpart.origin``).

A cut is saved as an anchor ``{"node", "module", "op", "index"}``: the node's name, its module
path, its op, and its index among the nodes of that module and op. ``positions_of`` finds a cut
by name, else by anchor, so a capture whose node names shift (a mode or device that adds a
``contiguous``) still maps.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx

from passes._keys import COST, ORIGIN
from passes._util import fetch_attr, module_path
from .graph_split import ComputeOrder, build_stage, stage_outputs
from .pipeline import PipelineCosts
from .plan import Stage, StageCost, StageShard

__all__ = ["anchors_of", "positions_of", "build_stages", "state_keys", "unplaced", "param_table", "shared_params"]


def _op(node: torch.fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def anchors_of(order: ComputeOrder, positions: list[int]) -> tuple[dict, ...]:
    """One anchor per cut position (the first node of the stage it starts)."""
    out = []
    for pos in positions:
        node = order.nodes[pos]
        key = (module_path(node), _op(node))
        index = sum(1 for n in order.nodes[:pos] if (module_path(n), _op(n)) == key)
        out.append({"node": node.name, "module": key[0], "op": key[1], "index": index})
    return tuple(out)


def positions_of(order: ComputeOrder, anchors, cuttable) -> list[int]:
    """Cut positions of ``anchors`` in ``order``: by node name, else by (module, op, index).

    Raises:
        ValueError: an anchor matches no node where a cut is allowed (the message names it).
    """
    by_name = {n.name: i for i, n in enumerate(order.nodes)}
    by_anchor: dict[tuple, list[int]] = {}
    for i, n in enumerate(order.nodes):
        by_anchor.setdefault((module_path(n), _op(n)), []).append(i)
    positions = []
    for anchor in anchors:
        pos = by_name.get(anchor["node"])
        if pos is not None and (module_path(order.nodes[pos]), _op(order.nodes[pos])) != \
                (anchor.get("module", module_path(order.nodes[pos])), anchor.get("op", _op(order.nodes[pos]))):
            pos = None                      # the name now belongs to another node: match by anchor
        if pos is None and "module" in anchor:
            same = by_anchor.get((anchor["module"], anchor["op"]), [])
            pos = same[anchor["index"]] if anchor["index"] < len(same) else None
        if pos is None or pos == 0 or not cuttable[pos]:
            raise ValueError(f"the cut before {anchor['node']!r} ({anchor.get('op')} #{anchor.get('index')} in "
                             f"{anchor.get('module') or 'the top module'!r}) has no place in this graph")
        positions.append(pos)
    return positions


def build_stages(gm: torch.fx.GraphModule, cut_graph: torch.fx.GraphModule, costs: PipelineCosts,
                 positions: list[int], *, memory_of, shard_graphs: list | None = None,
                 balance: str = "time") -> list[Stage]:
    """The plan's stages for cuts at ``positions`` of ``cut_graph`` (``costs`` of its example batch).

    ``memory_of(stage, starts, end)`` gives each device's memory (``pipeline.memory_model``);
    ``shard_graphs``, when tp > 1, are every tp rank's graph (``cut_graph`` is the first).
    """
    order = costs.order
    bounds = [0] + list(positions) + [len(order)]
    names = [order.nodes[p].name for p in positions]
    whole = _whole_stage_modules(gm, order, positions) if shard_graphs else None
    per_shard = [_cut_by_name(g, names) for g in shard_graphs] if shard_graphs else None
    stages = []
    for index, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        module = build_stage(order, start, end, name=f"Stage{index}")
        memory = int(memory_of(index, np.array([start]), end)[0])
        cost = _cost(order.nodes[start:end], module, costs, start, end, memory)
        inputs = tuple(n.name for n in (stage_outputs(order, start) if start else []))
        outputs = tuple(n.name for n in stage_outputs(order, end)) if end < len(order) else ("(outputs)",)
        first, last = order.nodes[start].name, order.nodes[end - 1].name
        if shard_graphs is None:
            stages.append(Stage(index, module, cost, first, last, inputs, outputs))
            continue
        shards = tuple(StageShard(r, modules[index], _shard_cost(cost, modules[index]))
                       for r, modules in enumerate(per_shard))
        total = _whole_cost(whole[index], cost)
        stages.append(Stage(index, whole[index], total, first, last, inputs, outputs, tp_shards=shards))
    return stages


def _cost(nodes, module, costs: PipelineCosts, start: int, end: int, memory: int) -> StageCost:
    node_costs = [n.meta[COST] for n in nodes]
    collective = sum(c.time_s for c in node_costs if c.op in ("all_reduce", "all_gather"))
    return StageCost(
        flops=sum(c.flops for c in node_costs), backward_flops=sum(c.backward_flops for c in node_costs),
        param_bytes=sum(p.numel() * p.element_size() for p in module.parameters()),
        time_s=sum(c.time_s for c in node_costs), comm_s=float(costs.comm[start] + costs.comm[end]),
        memory_bytes=memory, saved_bytes=int(costs.saved[end] - costs.saved[start]),
        bytes_in=int(costs.crossing_bytes[start]) if start else 0,
        bytes_out=int(costs.crossing_bytes[end]) if end < len(costs.order) else 0,
        n_nodes=end - start, collective_s=collective)


def _shard_cost(cost: StageCost, module) -> StageCost:
    """A shard's cost: its own parameters; time, memory and traffic as the cut graph's (every shard is alike)."""
    from dataclasses import replace
    return replace(cost, param_bytes=sum(p.numel() * p.element_size() for p in module.parameters()))


def _whole_cost(module, shard_cost: StageCost) -> StageCost:
    """The stage as a whole: its unsharded FLOPs and parameters; time and memory per device (with tp)."""
    from dataclasses import replace
    node_costs = [n.meta[COST] for n in module.graph.nodes if COST in n.meta
                  and n.op not in ("placeholder", "get_attr", "output")]
    return replace(shard_cost, flops=sum(c.flops for c in node_costs),
                   backward_flops=sum(c.backward_flops for c in node_costs),
                   param_bytes=sum(p.numel() * p.element_size() for p in module.parameters()))


def _cut_by_name(graph: torch.fx.GraphModule, names: list[str]) -> list[torch.fx.GraphModule]:
    order = ComputeOrder.of(graph)
    by_name = {n.name: i for i, n in enumerate(order.nodes)}
    bounds = [0] + [by_name[name] for name in names] + [len(order)]
    return [build_stage(order, s, e, name=f"Stage{i}") for i, (s, e) in enumerate(zip(bounds, bounds[1:]))]


def _whole_stage_modules(gm: torch.fx.GraphModule, shard_order: ComputeOrder, positions: list[int]) -> list:
    """The unsharded stages of ``gm``: each cut at the input graph's node the shard's cut starts from."""
    order = ComputeOrder.of(gm)
    by_name = {n.name: i for i, n in enumerate(order.nodes)}
    ok = order.crossing()[2]
    mapped = []
    for pos in positions:
        origin = next((by_name[n.meta[ORIGIN]] for n in shard_order.nodes[pos:]
                       if n.meta.get(ORIGIN) in by_name), len(order))
        while origin < len(order) and not ok[origin]:
            origin += 1
        mapped.append(min(max(origin, (mapped[-1] + 1) if mapped else 1), len(order) - 1))
    bounds = [0] + mapped + [len(order)]
    return [build_stage(order, s, e, name=f"Stage{i}") for i, (s, e) in enumerate(zip(bounds, bounds[1:]))]


def state_keys(model: torch.nn.Module, modules: list[torch.nn.Module]) -> dict[str, str]:
    """``model.state_dict()`` key -> the name the stage ``modules`` hold that tensor under, by tensor identity.

    Tied tensors (an embedding and its head) have several keys and one name. A key whose
    tensor no stage holds keeps its own name (``full_state_dict`` then reports it missing).
    """
    held = _held(modules)
    return {key: held.get(id(t), key) for key, t in model.state_dict(keep_vars=True).items()}


def _held(modules: list[torch.nn.Module]) -> dict[int, str]:
    """id of every tensor the stage ``modules`` hold -> the first name it is held under."""
    held: dict[int, str] = {}
    for module in modules:
        for name, t in list(module.named_parameters(remove_duplicate=False)) + \
                list(module.named_buffers(remove_duplicate=False)):
            held.setdefault(id(t), name)
    return held


def unplaced(model: torch.nn.Module, modules: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` entries no stage holds, because no graph node reads them (an eval-mode BatchNorm's
    ``num_batches_tracked``, an unused head): training never changes them, so the plan keeps them (shared, not
    copied) for ``full_state_dict`` and merged checkpoints."""
    held = _held(modules)
    return {key: t.detach() for key, t in model.state_dict(keep_vars=True).items() if id(t) not in held}


def param_table(module: torch.nn.Module) -> dict[str, list]:
    """Parameter name -> ``[shape, dtype]``: what a plan depends on, for ``load_plan`` to check."""
    return {name: [list(p.shape), str(p.dtype).removeprefix("torch.")]
            for name, p in module.named_parameters(remove_duplicate=False)}


def shared_params(modules: list[torch.fx.GraphModule], gm: torch.fx.GraphModule) -> dict[str, list[int]]:
    """Parameters held by several stages (tied weights): name -> the stages holding it."""
    holders: dict[int, list] = {}
    for index, module in enumerate(modules):
        for name, _ in module.named_parameters():
            holders.setdefault(id(fetch_attr(gm, name)), []).append((index, name))
    return {entries[0][1]: [i for i, _ in entries] for entries in holders.values() if len(entries) > 1}
