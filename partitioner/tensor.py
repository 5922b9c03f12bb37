"""Tensor (Megatron) parallelism of a whole graph: ``n`` shard graphs, and what they decided.

Reads a captured, costed graph (``passes.capture``, ``passes.estimate``); the region analysis
and the rewrite are ``partitioner.sharding``'s. ``shard_graph`` returns the ``n`` shard
GraphModules (never changing the input graph) with every node costed for its shard: sharded
nodes carry ``1/n`` of the original's FLOPs, time and bytes and their local example value
(``fxpart.example_val``); collectives carry their time on the tensor-parallel link (ring
formulas of ``partitioner.comm``: the forward all-reduce after a row-parallel matmul, and in
training the backward all-reduce of the region's input gradient); nodes the rewrite inserted
(local slices, bias adds) cost nothing. Pipeline cuts are then chosen on shard 0 like on any
costed graph. ``TensorSharding`` is what was split and why the rest was not.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
import torch.fx

from passes._keys import COLLECTIVE, COST, EXAMPLE_VAL, LOCAL_SLICE, ORIGIN, SHARD
from passes._util import fetch_attr, format_bytes, node_value, table, tensor_bytes, tensors_of
from passes.estimate import NodeCost
from passes.timing import roofline_s
from .comm import all_gather_s, all_reduce_s, link_of
from .sharding import (ALL_GATHER, ALL_REDUCE, WAIT, Shard, Sharding, analyze, block_of, build_shard, local_size,
                       seed_input, sliced_params, whole_params)

__all__ = ["shard_graph", "ShardedGraph", "TensorSharding"]

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass(frozen=True)
class TensorSharding:
    """What a tensor plan decided: sharded and replicated matmuls, collectives, parameter split."""
    n: int
    column: tuple[str, ...]                 # column-parallel matmuls (weights split by output features)
    row: tuple[str, ...]                    # row-parallel matmuls (split by input features; all-reduce after)
    replicated: dict                        # matmul-like node -> why it stays replicated
    collectives: tuple                      # (block, node, bytes) of every forward all-reduce
    backward_collectives: tuple             # (block, seed nodes, bytes): input-gradient all-reduce per column group
    sharded_param_bytes: int                # full bytes of the parameters that are split
    max_shard_sharded_bytes: int            # the largest shard's bytes of those
    group_name: str = "0"                   # process group the all-reduce nodes name (the default group)
    param_shards: dict = field(default_factory=dict)   # shard attribute name -> Shard: parameters split at build
    vocab: tuple[str, ...] = ()             # vocabulary-parallel embeddings (table split by rows; all-reduce after)
    gathered: tuple[str, ...] = ()          # sharded outputs all-gathered at the model's output (vocab-parallel head)
    expert: tuple[str, ...] = ()            # expert-parallel einsums/bmms (parameter split on a batch dim, e.g. experts)
    param_bytes: int = 0                    # bytes of every parameter of the graph (tied ones once)
    whole_params: dict = field(default_factory=dict)   # parameter of >= 2 dims no shard cuts -> why

    def decisions(self) -> dict:
        """What was split and how (JSON): the split parameters by name with their ``[dim, blocks, rep, segments]``, which
        is what the plan depends on and what ``load_plan`` checks a model against, and the matmul lists."""
        return {"n": self.n, "params": {k: [v.dim, v.blocks, v.rep, [list(seg) for seg in v.segments]]
                                        for k, v in sorted(self.param_shards.items())},
                "column": list(self.column), "row": list(self.row), "expert": list(self.expert),
                "vocab": list(self.vocab), "gathered": list(self.gathered), "replicated": sorted(self.replicated)}

    @property
    def split_fraction(self) -> float:
        """Share of the model's parameter bytes that is split across the shards (what Megatron's plans split)."""
        return self.sharded_param_bytes / self.param_bytes if self.param_bytes else 0.0

    @property
    def sharded_fraction(self) -> float:
        """Largest shard's share of the split parameters (1/n when they divide evenly)."""
        return self.max_shard_sharded_bytes / self.sharded_param_bytes if self.sharded_param_bytes else 1.0

    def per_block(self) -> list[tuple[str, int, int, int]]:
        """(block, forward all-reduces, backward all-reduces, forward bytes) per transformer block."""
        blocks: dict[str, list[int]] = {}
        for block, _, nbytes in self.collectives:
            row = blocks.setdefault(block, [0, 0, 0])
            row[0] += 1
            row[2] += nbytes
        for block, _, _ in self.backward_collectives:
            blocks.setdefault(block, [0, 0, 0])[1] += 1
        return [(b, *v) for b, v in blocks.items()]

    def report(self) -> str:
        lines = [f"sharded: {len(self.column)} column-parallel matmuls {list(self.column)}",
                 *([f"         {len(self.expert)} expert-parallel matmuls {list(self.expert)} (parameters split "
                    f"on a batch dim, e.g. the experts; a sum over it is a partial sum, all-reduced)"]
                   if self.expert else []),
                 *([f"         {len(self.vocab)} vocabulary-parallel embeddings {list(self.vocab)} (table split "
                    f"by rows; ids outside a shard's rows look up zeros; all-reduce after each)"]
                   if self.vocab else []),
                 *([f"         {len(self.gathered)} outputs all-gathered {list(self.gathered)} (column-parallel "
                    f"up to the model's output, e.g. a vocabulary-parallel LM head)"] if self.gathered else []),
                 f"         {len(self.row)} row-parallel matmuls {list(self.row)} (all-reduce after each; "
                 f"bias added once after it)",
                 f"split parameters: {format_bytes(self.sharded_param_bytes)}"
                 f"{f' ({self.split_fraction:.1%} of {format_bytes(self.param_bytes)})' if self.param_bytes else ''}"
                 f"; the largest shard holds {self.sharded_fraction:.3f} of them (1/n = {1 / self.n:.3f})"]
        rows = [(b, f, bw, format_bytes(nb)) for b, f, bw, nb in self.per_block()]
        if rows:
            lines += ["", "collectives per block (forward: all-reduce of each row-parallel output; backward: "
                          "all-reduce of each column-parallel group's input gradient):",
                      table(["block", "fwd all-reduce", "bwd all-reduce", "fwd bytes"], rows, align="lrrr")]
        if self.replicated:
            lines += ["", "replicated (every shard computes them in full):"]
            lines += [f"  {name}: {why}" for name, why in self.replicated.items()]
        if self.whole_params:
            lines += ["", "parameters every shard holds whole:"]
            lines += [f"  {name}: {why}" for name, why in self.whole_params.items()]
        return "\n".join(lines)


@dataclass
class ShardedGraph:
    """A graph's ``n`` tensor shards, built (and costed) on demand: planning needs shard 0 only."""
    gm: torch.fx.GraphModule
    info: TensorSharding
    sharding: Sharding
    sliced: dict
    spec: object
    link: tuple
    training: bool
    _modules: dict = field(default_factory=dict)

    def module(self, r: int) -> torch.fx.GraphModule:
        if r not in self._modules:
            module = build_shard(self.gm, self.sharding, r, sliced=self.sliced)
            _cost_shard(module, self.sharding, self.spec, self.link, training=self.training)
            self._modules[r] = module
        return self._modules[r]

    def modules(self) -> list[torch.fx.GraphModule]:
        return [self.module(r) for r in range(self.info.n)]


def shard_graph(gm: torch.fx.GraphModule, n: int, *, spec, training: bool,
                devices_per_node: int = 8) -> ShardedGraph:
    """Shard a captured, costed graph ``n`` ways (Megatron patterns found by ``sharding.analyze``).

    Returns the decisions and the shard GraphModules (built when first asked for), every node
    costed for its shard.
    """
    sh = analyze(gm, n, conv_flops_per_byte=lambda dtype: spec.flops_per_s(dtype) / spec.link_bandwidth_Bps)
    sliced = sliced_params(gm, sh)
    link = link_of(spec, n, devices_per_node=devices_per_node, collective=True)
    collectives = tuple((block_of(node), node.name, tensor_bytes(node_value(node))) for node in sh.reduce)
    backward = tuple((block_of(seeds[0]), tuple(s.name for s in seeds), tensor_bytes(node_value(seed_input(seeds[0]))))
                     for seeds in _column_groups(sh))
    params = [node for node in sliced if isinstance(fetch_attr(gm, node.target), torch.nn.Parameter)]
    full = {id(fetch_attr(gm, node.target)): (tensor_bytes(fetch_attr(gm, node.target)), node) for node in params}
    local = sum(nbytes * local_size(sliced[node], fetch_attr(gm, node.target).shape[sliced[node].dim], n)
                // fetch_attr(gm, node.target).shape[sliced[node].dim] for nbytes, node in full.values())
    every = {id(v): tensor_bytes(v) for v in (fetch_attr(gm, node.target) for node in gm.graph.nodes
                                              if node.op == "get_attr") if isinstance(v, torch.nn.Parameter)}
    info = TensorSharding(
        n=n, column=tuple(s.name for s in gm.graph.nodes if s in sh.column),
        row=tuple(s.name for s in gm.graph.nodes if s in sh.reduce and s not in sh.vocab),
        replicated=dict(sh.replicated), expert=tuple(s.name for s in gm.graph.nodes if s in sh.expert),
        vocab=tuple(s.name for s in gm.graph.nodes if s in sh.vocab),
        gathered=tuple(s.name for s in gm.graph.nodes if s in sh.gather),
        collectives=collectives, backward_collectives=backward,
        sharded_param_bytes=sum(b for b, _ in full.values()), max_shard_sharded_bytes=local,
        param_shards={node.target: shard for node, shard in sliced.items()},
        param_bytes=sum(every.values()), whole_params=whole_params(gm, sh, sliced))
    if not sh.reduce:      # the search rejects this degree and says why (plan.candidates); no plan replicates it all
        log.debug("tensor analysis: no matmul or convolution shards %d ways", n)
    return ShardedGraph(gm, info, sh, sliced, spec, link, training)


def _column_groups(sh: Sharding) -> list[list]:
    groups: dict = {}
    for seed in sh.column | sh.expert:
        groups.setdefault(seed_input(seed), []).append(seed)
    return list(groups.values())


def _cost_shard(module: torch.fx.GraphModule, sh: Sharding, spec, link, *, training: bool) -> None:
    """Give every compute node of a shard its cost and, for sharded values, its local example value."""
    inputs = {seed_input(s).name: tensor_bytes(node_value(seed_input(s))) for s in sh.column | sh.expert}
    for node in module.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        layout = node.meta.get(SHARD)
        if layout is not None:
            node.meta[EXAMPLE_VAL] = _local_value(node_value(node), layout, sh.n)
        cost = node.meta.get(COST)
        if node.target in (ALL_REDUCE, ALL_GATHER):
            node.meta[COST] = _collective_cost(node, sh.n, spec, link, training, inputs)
        elif node.meta.get(LOCAL_SLICE) or node.target is WAIT:
            node.meta[COST] = _free(node)
        elif cost is None:              # made by the rewrite (a row-parallel bias added after the all-reduce)
            node.meta[COST] = _roofline(node, spec, training)
        elif layout is not None or any(u.target is ALL_REDUCE for u in node.users):
            parts = sh.parts(node) if node in sh.layout or node in sh.reduce else sh.n
            node.meta[COST] = dataclasses.replace(
                cost, flops=cost.flops // parts, backward_flops=cost.backward_flops // parts,
                output_bytes=cost.output_bytes // parts, saved_bytes=cost.saved_bytes // parts,
                forward_time_s=cost.forward_time_s / parts, backward_time_s=cost.backward_time_s / parts,
                time_s=cost.time_s / parts)


def _local_value(val, layout, n: int):
    """``val`` (a tensor, or a tuple for multi-output nodes) at one shard's sizes."""
    if isinstance(layout, tuple):
        return tuple(_local_value(v, l, n) if l is not None else v for v, l in zip(val, layout))
    if not isinstance(val, torch.Tensor) or not isinstance(layout, Shard):
        return val
    shape = list(val.shape)
    shape[layout.dim] = local_size(layout, shape[layout.dim], n)
    return torch.empty(shape, dtype=val.dtype, device="meta")


def _collective_cost(node, n: int, spec, link, training: bool, inputs: dict) -> NodeCost:
    """An all-reduce: forward on the row-parallel output, and in training the region's input-gradient
    all-reduce (Megatron's f), charged here; an all-gather of a sharded output gathers forward only."""
    info = node.meta.get(COLLECTIVE, {})
    nbytes = info.get("bytes", 0)
    if node.target is ALL_REDUCE:
        forward = all_reduce_s(nbytes, n, link)
        backward = all_reduce_s(nbytes, n, link) if training else 0.0
    else:
        forward, backward = all_gather_s(nbytes, n, link), 0.0
    return NodeCost(name=node.name, op=info.get("kind", "collective"), module=info.get("block", ""), shape="",
                    dtype="", flops=0, backward_flops=0, output_bytes=nbytes, saved_bytes=0, param_bytes=0,
                    forward_time_s=forward, backward_time_s=backward, time_s=forward + backward)


def _roofline(node, spec, training: bool) -> NodeCost:
    """A node the rewrite added, costed by the roofline (no FLOPs: element-wise, memory-bound)."""
    if node.op != "call_function":
        return _free(node)
    forward, backward = roofline_s(node, 0, 0, spec, has_backward=training)
    return dataclasses.replace(_free(node), output_bytes=sum(tensor_bytes(t) for t in tensors_of(node_value(node))),
                               forward_time_s=forward, backward_time_s=backward, time_s=forward + backward)


def _free(node) -> NodeCost:
    val = node_value(node)
    nbytes = sum(tensor_bytes(t) for t in tensors_of(val))
    return NodeCost(name=node.name, op=str(getattr(node.target, "__name__", node.target)), module="", shape="",
                    dtype="", flops=0, backward_flops=0, output_bytes=nbytes if node.meta.get(LOCAL_SLICE) else 0,
                    saved_bytes=0, param_bytes=0, forward_time_s=0.0, backward_time_s=0.0, time_s=0.0)
