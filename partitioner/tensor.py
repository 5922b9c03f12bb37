"""Tensor (Megatron) partitioning: ``n`` shards of one graph, weights split, all-reduces between.

Reads a captured, costed graph (``passes.capture``, ``passes.estimate``) and the layouts of
``sharding.analyze``; writes ``n`` shard GraphModules (never the input graph). Each shard
holds its slice of the sharded weights and the replicated ones; view/reshape/expand/split
sizes are rewritten to local sizes; every row-parallel matmul is followed by an explicit
``_c10d_functional.all_reduce`` + ``wait_tensor`` (its bias added once, after the reduce), as is a
sum over a sharded experts dim and a vocabulary-parallel embedding (ids outside a shard's rows
read zeros); a sharded model output (a vocabulary-parallel LM head) is all-gathered there
(``all_gather_into_tensor`` + ``wait_tensor``). Under ``torch.distributed`` those nodes are real
collectives; ``simulate`` runs all shards in lockstep in one process and sums or concatenates instead.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
import torch.fx

from passes._keys import COLLECTIVE, COST, LOCAL_SLICE, SHARD
from passes._util import fetch_attr, format_bytes, format_count, format_seconds, node_value, table, tensor_bytes
from .plan import Plan, Stage, StageCost
from .sharding import (ALL_GATHER, ALL_REDUCE, WAIT, Shard, Sharding, analyze, block_of, build_shard, seed_input,
                       simulate, sliced_params, whole_params)

__all__ = ["tensor_plan", "build_shard", "simulate", "TensorSharding", "ALL_REDUCE", "ALL_GATHER", "WAIT", "LOCAL_SLICE"]

log = logging.getLogger(__name__)
aten = torch.ops.aten
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
ALL_GATHER = torch.ops._c10d_functional.all_gather_into_tensor.default
WAIT = torch.ops._c10d_functional.wait_tensor.default
_SHAPE_ARG = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default)
_OPT_STATE = {None: 0, "sgd": 0, "adamw": 2}


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
        """What was split and how, by node name (JSON): what ``load_plan`` checks a model against."""
        return {"n": self.n, "column": list(self.column), "row": list(self.row), "expert": list(self.expert),
                "vocab": list(self.vocab), "gathered": list(self.gathered),
                "replicated": sorted(self.replicated)}

    @property
    def split_fraction(self) -> float:
        """Share of the model's parameter bytes that is split across the shards (what Megatron's plans split)."""
        return self.sharded_param_bytes / self.param_bytes if self.param_bytes else 0.0

    @property
    def sharded_fraction(self) -> float:
        """Largest shard's share of the split parameters (1/n when they divide evenly)."""
        return self.max_shard_sharded_bytes / self.sharded_param_bytes if self.sharded_param_bytes else 1.0

    def simulate(self, modules, flat):
        return simulate(modules, flat)

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


# -- the plan -----------------------------------------------------------------------------------

def _shard_cost(gm, sh: Sharding, module, *, training: bool, optimizer, link_Bps: float,
                fwd_bytes: int, bwd_bytes: int) -> StageCost:
    """A shard's costs: the graph's node costs, divided by n where the node works on sharded values."""
    flops = bflops = saved = 0
    time_s = 0.0
    n_nodes = 0
    for node in gm.graph.nodes:
        cost = node.meta.get(COST)
        if cost is None or node.op in ("placeholder", "get_attr", "output"):
            continue
        n_nodes += 1
        div = sh.parts(node)
        flops += cost.flops // div
        bflops += cost.backward_flops // div
        saved += cost.saved_bytes // div
        time_s += cost.time_s / div
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
    ring = 2 * (sh.n - 1) / sh.n                 # ring all-reduce moves 2 (n-1)/n of the tensor per device
    moved = ring * (fwd_bytes + (bwd_bytes if training else 0))
    per_param = 1 + ((1 + _OPT_STATE[optimizer]) if training else 0)
    return StageCost(flops=flops, backward_flops=bflops if training else 0, param_bytes=param_bytes, time_s=time_s,
                     comm_s=moved / link_Bps, memory_bytes=int(param_bytes * per_param + buffer_bytes
                                                               + (saved if training else 0)),
                     saved_bytes=saved if training else 0, bytes_in=int(moved), bytes_out=int(moved),
                     n_nodes=max(n_nodes, 1))


def tensor_plan(gm: torch.fx.GraphModule, n: int, *, spec, training: bool, optimizer, model: str,
                fingerprint: str) -> Plan:
    """Shard a captured, costed graph ``n`` ways (Megatron patterns found by ``analyze``)."""
    sh = analyze(gm, n, conv_flops_per_byte=lambda dtype: spec.flops_per_s(dtype) / spec.link_bandwidth_Bps)
    sliced = sliced_params(gm, sh)
    modules = [build_shard(gm, sh, r, sliced=sliced) for r in range(n)]
    collectives = tuple((block_of(node), node.name, tensor_bytes(node_value(node))) for node in sh.reduce)
    backward = tuple((block_of(seeds[0]), tuple(s.name for s in seeds), tensor_bytes(node_value(_input_of(seeds[0]))))
                     for seeds in _column_groups(sh))
    # an all-gather moves (n-1)/n of the tensor per device, half a ring all-reduce
    fwd_bytes = sum(b for *_, b in collectives) + sum(tensor_bytes(node_value(a)) for a in sh.gather) // 2
    bwd_bytes = sum(b for *_, b in backward)
    params = [node for node in sliced if isinstance(fetch_attr(gm, node.target), torch.nn.Parameter)]
    full = {id(fetch_attr(gm, node.target)): tensor_bytes(fetch_attr(gm, node.target)) for node in params}
    biggest = max((sum({id(fetch_attr(m, node.target)): tensor_bytes(fetch_attr(m, node.target))
                        for node in params}.values()) for m in modules), default=0)
    every = {id(v): tensor_bytes(v) for v in (fetch_attr(gm, node.target) for node in gm.graph.nodes
                                              if node.op == "get_attr") if isinstance(v, torch.nn.Parameter)}
    info = TensorSharding(
        n=n, column=tuple(s.name for s in gm.graph.nodes if s in sh.column),
        row=tuple(s.name for s in gm.graph.nodes if s in sh.reduce and s not in sh.vocab), replicated=dict(sh.replicated),
        expert=tuple(s.name for s in gm.graph.nodes if s in sh.expert),
        vocab=tuple(s.name for s in gm.graph.nodes if s in sh.vocab),
        gathered=tuple(s.name for s in gm.graph.nodes if s in sh.gather),
        collectives=collectives, backward_collectives=backward, sharded_param_bytes=sum(full.values()),
        max_shard_sharded_bytes=biggest, param_shards={node.target: shard for node, shard in sliced.items()},
        param_bytes=sum(every.values()), whole_params=whole_params(gm, sh, sliced))
    stages = []
    compute = [node for node in gm.graph.nodes if node.op not in ("placeholder", "get_attr", "output")]
    for r, module in enumerate(modules):
        _scale_costs(module, sh)
        cost = _shard_cost(gm, sh, module, training=training, optimizer=optimizer, link_Bps=spec.link_bandwidth_Bps,
                           fwd_bytes=fwd_bytes, bwd_bytes=bwd_bytes)
        stages.append(Stage(r, module, cost, compute[0].name if compute else "", compute[-1].name if compute else "",
                            tuple(p.name for p in gm.graph.nodes if p.op == "placeholder"), ("(outputs)",)))
    pytree_info = getattr(gm.graph._codegen, "pytree_info", None)
    if not sh.reduce:
        log.warning("tensor plan of %s: no matmul could be sharded; every shard replicates the whole model", model)
    return Plan(strategy="tensor", stages=stages, device=spec, training=training, schedule="none", n_microbatches=1,
                lower_bound_s=sum(s.cost.time_s for s in stages) / n, cuts=(),
                in_spec=pytree_info.in_spec if pytree_info else None,
                out_spec=pytree_info.out_spec if pytree_info else None, model=model, fingerprint=fingerprint,
                sharding=info)


_input_of = seed_input


def _column_groups(sh: Sharding) -> list[list]:
    groups: dict = {}
    for seed in sh.column | sh.expert:
        groups.setdefault(_input_of(seed), []).append(seed)
    return list(groups.values())


def _scale_costs(module, sh: Sharding) -> None:
    """Shard nodes carry their share of the original node's cost (drawings read it)."""
    for node in module.graph.nodes:
        cost = node.meta.get(COST)
        if cost is not None and (SHARD in node.meta or any(u.target is ALL_REDUCE for u in node.users)):
            node.meta[COST] = dataclasses.replace(cost, flops=cost.flops // sh.n,
                                                  backward_flops=cost.backward_flops // sh.n,
                                                  time_s=cost.time_s / sh.n)


def tensor_report(plan: Plan) -> str:
    """The tensor plan's table (one row per shard) and its sharding decisions."""
    info = plan.sharding
    rows = [(s.index, format_bytes(s.cost.param_bytes), format_count(s.cost.flops), format_count(s.cost.backward_flops),
             format_seconds(s.cost.time_s), format_seconds(s.cost.comm_s), format_bytes(s.cost.memory_bytes))
            for s in plan.stages]
    head = (f"tensor plan of {plan.model or 'model'}: {len(plan.stages)} shards on "
            f"{getattr(plan.device, 'name', plan.device)}, {'training' if plan.training else 'inference'}")
    body = table(["shard", "params", "FLOPs", "bwd FLOPs", "time", "comm", "memory"], rows, align="rrrrrrr")
    return "\n".join([head, "", body, "", info.report()])
