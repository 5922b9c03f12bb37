"""Tensor (Megatron) partitioning: ``n`` shards of one graph, weights split, all-reduces between.

Reads a captured, costed graph (``passes.capture``, ``passes.estimate``) and the layouts of
``sharding_rules.analyze``; writes ``n`` shard GraphModules (never the input graph). Each shard
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
import re
from dataclasses import dataclass, field

import torch
import torch.fx

from passes._keys import COLLECTIVE, COST, LOCAL_SLICE, SHARD
from passes._util import fetch_attr, format_bytes, format_count, format_seconds, node_value, table, tensor_bytes
from .plan import Plan, Stage, StageCost
from .sharding_rules import Shard, Sharding, analyze, seed_input

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

    def decisions(self) -> dict:
        """What was split and how, by node name (JSON): what ``load_plan`` checks a model against."""
        return {"n": self.n, "column": list(self.column), "row": list(self.row), "expert": list(self.expert),
                "vocab": list(self.vocab), "gathered": list(self.gathered),
                "replicated": sorted(self.replicated)}

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
                 f"split parameters: {format_bytes(self.sharded_param_bytes)}; the largest shard holds "
                 f"{self.sharded_fraction:.3f} of them (1/n = {1 / self.n:.3f})"]
        rows = [(b, f, bw, format_bytes(nb)) for b, f, bw, nb in self.per_block()]
        if rows:
            lines += ["", "collectives per block (forward: all-reduce of each row-parallel output; backward: "
                          "all-reduce of each column-parallel group's input gradient):",
                      table(["block", "fwd all-reduce", "bwd all-reduce", "fwd bytes"], rows, align="lrrr")]
        if self.replicated:
            lines += ["", "replicated (every shard computes them in full):"]
            lines += [f"  {name}: {why}" for name, why in self.replicated.items()]
        return "\n".join(lines)


# -- building shards ----------------------------------------------------------------------------

def _local(x, shape, shard: Shard, r: int, n: int, call):
    """Shard ``r`` of ``x`` (a tensor or a graph node of ``shape``) under ``shard``; ``call(op, args)`` applies an op."""
    d, blocks = shard.dim, shard.blocks
    chunk = shape[d] // (blocks * n)
    if blocks == 1:
        return call(aten.slice.Tensor, (x, d, r * chunk, (r + 1) * chunk))
    x = call(aten.view.default, (x, [*shape[:d], blocks, n * chunk, *shape[d + 1:]]))
    x = call(aten.slice.Tensor, (x, d + 1, r * chunk, (r + 1) * chunk))
    return call(aten.reshape.default, (x, [*shape[:d], blocks * chunk, *shape[d + 1:]]))


def _sliced_params(gm, sh: Sharding) -> dict:
    """get_attr node -> Shard, where every user wants the parameter sliced the same way (else sliced at run time)."""
    wanted: dict = {}
    for (user, arg), shard in sh.convert.items():
        if arg.op == "get_attr":
            wanted.setdefault(arg, set()).add(shard)
    return {arg: next(iter(s)) for arg, s in wanted.items()
            if len(s) == 1 and all((u, arg) in sh.convert for u in arg.users)}


def build_shard(gm: torch.fx.GraphModule, sh: Sharding, r: int, *, group_name: str = "0",
                sliced: dict | None = None) -> torch.fx.GraphModule:
    """Shard ``r`` of ``gm`` as a plain GraphModule: local weights, local shapes, explicit all-reduces."""
    n = sh.n
    sliced = _sliced_params(gm, sh) if sliced is None else sliced
    graph = torch.fx.Graph()
    env: dict = {}
    attrs: dict = {}
    local_of: dict = {}

    def call(op, args):
        new = graph.call_function(op, tuple(args))
        new.meta[LOCAL_SLICE] = True
        return new

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = graph.placeholder(node.name)
        elif node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if node in sliced:
                local = _local(value.detach(), tuple(value.shape), sliced[node], r, n, lambda op, a: op(*a))
                value = torch.nn.Parameter(local.clone(), requires_grad=value.requires_grad) \
                    if isinstance(value, torch.nn.Parameter) else local.clone()
            attrs[node.target] = value
            env[node] = graph.get_attr(node.target)
        elif node.op == "call_module":
            attrs[node.target] = gm.get_submodule(node.target)
            env[node] = graph.node_copy(node, lambda a: env[a])
        elif node.op == "output":
            gathered = {a: _emit_gather(graph, a, env[a], sh.layout[a].dim, n, group_name) for a in sh.gather}
            env[node] = graph.output(torch.fx.map_arg(node.args[0], lambda a: gathered.get(a, env[a])))
        else:
            def arg_of(a, user=node):
                shard = sh.convert.get((user, a))
                if shard is None or a in sliced:
                    return env[a]
                key = (a, shard)
                if key not in local_of:
                    local_of[key] = _local(env[a], tuple(node_value(a).shape), shard, r, n, call)
                return local_of[key]
            env[node] = _emit_reduce(graph, node, arg_of, group_name, r=r, n=n) if node in sh.reduce else \
                _copy_local(graph, node, arg_of, sh)
        env[node].meta.update({k: v for k, v in node.meta.items() if k not in env[node].meta})
        if node in sh.layout:
            env[node].meta[SHARD] = sh.layout[node]
    graph.lint()
    return _module(attrs, graph, f"Shard{r}")


def _module(attrs: dict, graph: torch.fx.Graph, name: str) -> torch.fx.GraphModule:
    module = torch.fx.GraphModule(attrs, graph, class_name=name)
    for target, value in attrs.items():     # buffers stay buffers (state_dict, .to())
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            owner_path, _, leaf = target.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            delattr(owner, leaf)
            owner.register_buffer(leaf, value)
    return module


def _copy_local(graph, node, arg_of, sh: Sharding):
    """Copy ``node``; a sharded view/reshape/expand/split gets its local sizes."""
    new = graph.node_copy(node, arg_of)
    src = node.args[0] if node.args else None
    if node.target in _SHAPE_ARG and node in sh.layout and src in sh.layout:
        sizes = list(new.args[1])
        d = sh.layout[node].dim
        if isinstance(sizes[d], int) and sizes[d] != -1:
            sizes[d] //= sh.n
        new.args = (new.args[0], sizes, *new.args[2:])
    elif node.target in (aten.split.Tensor, aten.split_with_sizes.default) and src in sh.layout:
        dim = (node.args[2] if len(node.args) > 2 else 0) % node_value(src).dim()
        if dim == sh.layout[src].dim:
            sizes = new.args[1]
            sizes = sizes // sh.n if isinstance(sizes, int) else [z // sh.n for z in sizes]
            new.args = (new.args[0], sizes, *new.args[2:])
    return new


def _emit_reduce(graph, node, arg_of, group_name: str, *, r: int, n: int):
    """A row-parallel matmul on local operands, all-reduced (sum) over the shards, then its bias once."""
    target, args = node.target, node.args
    bias = None
    if target == aten.embedding.default:
        y = _local_lookup(graph, node, arg_of, r=r, n=n)
    elif target == aten.linear.default:
        y = graph.call_function(target, (arg_of(args[0]), arg_of(args[1])))
        bias = args[2] if len(args) > 2 else None
    elif target == aten.addmm.default:
        y = graph.call_function(aten.mm.default, (arg_of(args[1]), arg_of(args[2])))
        bias = args[0]
    else:                   # mm, bmm, matmul, einsum, a sum over the sharded dim: copied on local operands
        y = graph.node_copy(node, arg_of)
    y.meta = dict(node.meta)
    nbytes = tensor_bytes(node_value(node))
    reduced = graph.call_function(ALL_REDUCE, (y, "sum", group_name))
    out = graph.call_function(WAIT, (reduced,))
    for new in (reduced, out):
        new.meta = {k: v for k, v in node.meta.items() if k != COST}
    reduced.meta[COLLECTIVE] = {"kind": "all_reduce", "bytes": nbytes, "block": _block(node)}
    if isinstance(bias, torch.fx.Node):
        out = graph.call_function(aten.add.Tensor, (out, arg_of(bias)))
        out.meta = {k: v for k, v in node.meta.items() if k != COST}
    return out


def _emit_gather(graph, node, local, dim: int, n: int, group_name: str):
    """The full value of sharded ``node`` on every shard: gathered along dim 0, so the sharded dim moves there."""
    front = graph.call_function(aten.movedim.int, (local, dim, 0))
    front = graph.call_function(aten.contiguous.default, (front,))
    gathered = graph.call_function(ALL_GATHER, (front, n, group_name))
    out = graph.call_function(WAIT, (gathered,))
    out = graph.call_function(aten.movedim.int, (out, 0, dim))
    gathered.meta[COLLECTIVE] = {"kind": "all_gather", "bytes": tensor_bytes(node_value(node)), "block": _block(node)}
    out.meta["val"] = node_value(node)
    return out


def _local_lookup(graph, node, arg_of, *, r: int, n: int):
    """Shard r's rows ``[start, end)`` of an embedding table: ids outside them look up row 0, then read zeros."""
    weight, ids, *rest = node.args
    chunk = node_value(weight).shape[0] // n
    start, end = r * chunk, (r + 1) * chunk

    def call(op, *a):
        new = graph.call_function(op, a)
        new.meta[LOCAL_SLICE] = True         # inside the region: the runner adds no f between these
        return new

    ids = arg_of(ids)
    mask = call(aten.bitwise_or.Tensor, call(aten.lt.Scalar, ids, start), call(aten.ge.Scalar, ids, end))
    local = call(aten.masked_fill.Scalar, call(aten.sub.Scalar, ids, start), mask, 0)
    if rest and rest[0] != -1:               # padding_idx: local on the shard holding it, else none
        rest[0] = rest[0] - start if start <= rest[0] < end else -1
    y = call(aten.embedding.default, arg_of(weight), local, *rest)
    return call(aten.masked_fill.Scalar, y, call(aten.unsqueeze.default, mask, -1), 0.0)


# -- running in one process ---------------------------------------------------------------------

def simulate(modules: list[torch.fx.GraphModule], flat: list):
    """Run every shard node by node in lockstep; an all-reduce sums the shards' values. Returns shard 0's outputs."""
    interps = [torch.fx.Interpreter(m) for m in modules]
    lists = [list(m.graph.nodes) for m in modules]
    inputs = iter(flat)
    for nodes in zip(*lists):
        first = nodes[0]
        if first.op == "placeholder":
            value = next(inputs)
            for interp, node in zip(interps, nodes):
                interp.env[node] = value
        elif first.op == "output":
            return torch.fx.map_arg(first.args[0], lambda a: interps[0].env[a])
        elif first.op == "call_function" and first.target is ALL_REDUCE:
            total = sum(interp.env[node.args[0]] for interp, node in zip(interps, nodes))
            for interp, node in zip(interps, nodes):
                interp.env[node] = total
        elif first.op == "call_function" and first.target is ALL_GATHER:
            total = torch.cat([interp.env[node.args[0]] for interp, node in zip(interps, nodes)])
            for interp, node in zip(interps, nodes):
                interp.env[node] = total
        elif first.op == "call_function" and first.target is WAIT:
            for interp, node in zip(interps, nodes):
                interp.env[node] = interp.env[node.args[0]]
        else:
            for interp, node in zip(interps, nodes):
                interp.env[node] = interp.run_node(node)
    raise AssertionError("shard graphs have no output node")


# -- the plan -----------------------------------------------------------------------------------

def _block(node: torch.fx.Node) -> str:
    """The transformer block a node belongs to: its module path up to the first layer index."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "(top)"
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)
    m = re.match(r"(.*?\.\d+)(\.|$)", path)
    return m.group(1) if m else path or "(top)"


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
        div = sh.n if sh.sharded(node) else 1
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
    sh = analyze(gm, n)
    sliced = _sliced_params(gm, sh)
    modules = [build_shard(gm, sh, r, sliced=sliced) for r in range(n)]
    collectives = tuple((_block(node), node.name, tensor_bytes(node_value(node))) for node in sh.reduce)
    backward = tuple((_block(seeds[0]), tuple(s.name for s in seeds), tensor_bytes(node_value(_input_of(seeds[0]))))
                     for seeds in _column_groups(sh))
    # an all-gather moves (n-1)/n of the tensor per device, half a ring all-reduce
    fwd_bytes = sum(b for *_, b in collectives) + sum(tensor_bytes(node_value(a)) for a in sh.gather) // 2
    bwd_bytes = sum(b for *_, b in backward)
    full = {node: tensor_bytes(fetch_attr(gm, node.target)) for node in sliced}
    biggest = max((sum(tensor_bytes(fetch_attr(m, node.target)) for node in sliced) for m in modules), default=0)
    info = TensorSharding(
        n=n, column=tuple(s.name for s in gm.graph.nodes if s in sh.column),
        row=tuple(s.name for s in gm.graph.nodes if s in sh.reduce and s not in sh.vocab), replicated=dict(sh.replicated),
        expert=tuple(s.name for s in gm.graph.nodes if s in sh.expert),
        vocab=tuple(s.name for s in gm.graph.nodes if s in sh.vocab),
        gathered=tuple(s.name for s in gm.graph.nodes if s in sh.gather),
        collectives=collectives, backward_collectives=backward, sharded_param_bytes=sum(full.values()),
        max_shard_sharded_bytes=biggest, param_shards={node.target: shard for node, shard in sliced.items()})
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
