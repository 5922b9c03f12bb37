"""Split a captured graph at cut positions into stage GraphModules.

Reads a captured ``GraphModule`` (``passes.capture``) and cut positions in its compute
order; writes nothing on it. Each stage is a plain ``GraphModule`` whose inputs are the
values live at its first cut and whose outputs are the values live at its last cut, so a
tensor that skips stages (a residual, a mask) is passed along by every stage between its
producer and its users. A stage holds exactly the parameters and buffers its nodes read.

A graph captured with symbolic sizes computes them once (``sym_size`` of an input) and uses
them in every block's views. A stage recomputes such a size from a tensor it receives that
carries the same symbol in its shape; where none does (a flattened batch), the size is an
input of the stage, an int: every rank knows it from the batch's shapes
(``input_specs``), and in one process the stage before passes it along.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from passes._keys import EXAMPLE_VAL
from passes._util import fetch_attr, hint, node_value, tensor_bytes, tensors_of

_SYM_SIZE = torch.ops.aten.sym_size.int

__all__ = ["ComputeOrder", "build_stage", "stage_outputs", "symbolic_size", "input_specs"]

_NOT_COMPUTE = ("placeholder", "get_attr", "output")


@dataclass
class ComputeOrder:
    """The graph's compute nodes in order, with what is live across every cut position.

    Cut position ``k`` (1 <= k < n) lies between ``nodes[k-1]`` and ``nodes[k]``.
    """
    gm: torch.fx.GraphModule
    nodes: list[torch.fx.Node]
    position: dict[torch.fx.Node, int]       # compute node -> index; placeholders -> -1
    last_use: dict[torch.fx.Node, int]       # value -> index of its last user (n for the output)

    @classmethod
    def of(cls, gm: torch.fx.GraphModule) -> "ComputeOrder":
        nodes = [n for n in gm.graph.nodes if n.op not in _NOT_COMPUTE]
        position = {n: i for i, n in enumerate(nodes)}
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                position[n] = -1
        last_use: dict[torch.fx.Node, int] = {}
        for n in gm.graph.nodes:
            use = len(nodes) if n.op == "output" else position.get(n)
            if use is None:
                continue
            for arg in n.all_input_nodes:
                if arg in position:
                    last_use[arg] = max(last_use.get(arg, -1), use)
        return cls(gm, nodes, position, last_use)

    def __len__(self) -> int:
        return len(self.nodes)

    def live_at(self, k: int) -> list[torch.fx.Node]:
        """Values defined before cut ``k`` and used at or after it (graph order)."""
        return [v for v, last in self.last_use.items() if self.position[v] < k <= last]

    def crossing(self) -> tuple[list[int], list[int], list[bool]]:
        """Per cut position 0..n: bytes crossing, float bytes crossing (gradients flow back), and
        whether the cut is allowed: every crossing value is a tensor (not a tuple or a scalar) or a
        symbolic size the next stage can recompute, the node before it produces a tensor (a
        guard or an assert stays with what follows, so no stage is made of checks alone), and no
        tensor-parallel collective is between its issue and its ``wait_tensor``."""
        n = len(self.nodes)
        total = [0] * (n + 2)
        floats = [0] * (n + 2)
        bad = [0] * (n + 2)
        sizes = []
        for v, last in self.last_use.items():
            start, end = self.position[v] + 1, last   # crosses cuts start..end inclusive
            if start > end:
                continue
            if symbolic_size(v):
                sizes.append((v, start, end))
                continue
            val = node_value(v)
            if isinstance(val, torch.Tensor):
                b = tensor_bytes(val)
                fb = b if val.is_floating_point() else 0
            else:
                b = sum(tensor_bytes(t) for t in tensors_of(val))
                fb, bad[start], bad[end + 1] = 0, bad[start] + 1, bad[end + 1] - 1
            total[start] += b
            total[end + 1] -= b
            floats[start] += fb
            floats[end + 1] -= fb
        out_total, out_floats, ok = [], [], []
        run_t = run_f = run_b = 0
        for k in range(n + 1):
            run_t, run_f, run_b = run_t + total[k], run_f + floats[k], run_b + bad[k]
            out_total.append(run_t)
            out_floats.append(run_f)
            ok.append(run_b == 0)
        inputs = {sym for p in self.gm.graph.nodes if p.op == "placeholder" for sym, _ in _dim_symbols(p)}
        for v, last in self.last_use.items():     # a tensor whose size depends on data cannot be received
            start, end = self.position[v] + 1, last
            val = v.meta.get("val")
            if start <= end and isinstance(val, torch.Tensor) and any(
                    str(sym) not in inputs for d in val.shape if isinstance(d, torch.SymInt)
                    for sym in d.node.expr.free_symbols):
                for k in range(start, min(end, n) + 1):
                    ok[k] = False
        for v, start, end in sizes:
            needed = _expr_symbols(v)
            if not needed <= inputs:       # a data-dependent size: no rank can know it from the batch
                for k in range(start, min(end, n) + 1):
                    ok[k] = False
        for k in range(1, n):
            ok[k] = ok[k] and bool(tensors_of(node_value(self.nodes[k - 1])))
        for k, node in enumerate(self.nodes):     # a collective and the wait that completes it stay together
            if node.op == "call_function" and "wait_tensor" in str(node.target):
                issued = [self.position[a] for a in node.all_input_nodes if a in self.position]
                for j in range(min(issued, default=k) + 1, k + 1):
                    ok[j] = False
        ok[0] = ok[n] = True
        return out_total, out_floats, ok


def symbolic_size(node: torch.fx.Node) -> bool:
    """A node computing a symbolic size (a SymInt), which stages recompute rather than send."""
    return isinstance(node.meta.get("val"), torch.SymInt) and not node.meta["val"].node.expr.is_number


def _dim_symbols(node: torch.fx.Node) -> list[tuple[str, int]]:
    """(symbol, dim) for every dim of a tensor node whose size is exactly one symbol."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return []
    return [(str(d.node.expr), i) for i, d in enumerate(val.shape)
            if isinstance(d, torch.SymInt) and d.node.expr.is_symbol]


def _expr_symbols(node: torch.fx.Node) -> set[str]:
    return {str(sym) for sym in node.meta["val"].node.expr.free_symbols}


def input_specs(module: torch.fx.GraphModule, symbols: dict[str, int]) -> list[tuple] | None:
    """What each placeholder of a stage takes for a batch whose symbols are ``symbols``:
    ``("tensor", dtype, shape)`` or ``("int", value)``; None when a size depends on data.

    A placeholder whose example value was rewritten to another size (a tensor-parallel shard of
    a sharded activation) takes that size scaled the same way.
    """
    specs = []
    for node in module.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            value = _evaluate(val, symbols)
            if value is None:
                return None
            specs.append(("int", value))
        elif isinstance(val, torch.Tensor):
            local = node.meta.get(EXAMPLE_VAL)
            shape = []
            for i, d in enumerate(val.shape):
                size = _evaluate(d, symbols)
                if size is None:
                    return None
                if isinstance(local, torch.Tensor) and local.shape[i] != hint(d):
                    size = size * local.shape[i] // hint(d)
                shape.append(size)
            specs.append(("tensor", val.dtype, tuple(shape)))
        else:
            specs.append(("const", val))
    return specs


def _evaluate(d, symbols: dict[str, int]) -> int | None:
    if isinstance(d, int):
        return d
    expr = d.node.expr
    try:
        return int(expr.xreplace({sym: symbols[str(sym)] for sym in expr.free_symbols}))
    except (KeyError, TypeError):
        return None


def _size_symbols(node: torch.fx.Node) -> set[str] | None:
    """Symbols a size node's computation starts from (``sym_size`` of a dim that is one symbol);
    None when it reads anything else (it cannot be recomputed from a stage's inputs)."""
    out: set[str] = set()
    stack = [node]
    while stack:
        v = stack.pop()
        if v.op != "call_function":
            return None
        if v.target is _SYM_SIZE:
            expr = v.meta["val"].node.expr if isinstance(v.meta.get("val"), torch.SymInt) else None
            if expr is None or not expr.is_symbol:
                return None
            out.add(str(expr))
            continue
        if not all(isinstance(a.meta.get("val"), (torch.SymInt, int)) for a in v.all_input_nodes):
            return None
        stack.extend(v.all_input_nodes)
    return out


def build_stage(order: ComputeOrder, start: int, end: int, *, name: str = "stage") -> torch.fx.GraphModule:
    """A GraphModule running ``order.nodes[start:end]``: inputs live at ``start``, outputs live at ``end``.

    The last stage (``end == len(order)``) returns the model's flat outputs instead. Symbolic
    sizes defined before ``start`` are recomputed from the stage's tensor inputs.
    """
    gm = order.gm
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    live_in = order.live_at(start) if start > 0 else _placeholders(gm)
    carried = {sym for v in live_in for sym, _ in _dim_symbols(v)}
    sizes = [v for v in live_in if start > 0 and symbolic_size(v) and (_size_symbols(v) or {None}) <= carried]
    for v in live_in:
        if v not in sizes:
            env[v] = graph.placeholder(v.name)
            env[v].meta = dict(v.meta)
    for v in sizes:
        _recompute_size(v, graph, env)
    attrs: dict[str, torch.Tensor] = {}
    for node in order.nodes[start:end]:
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and arg not in env:
                env[arg] = graph.get_attr(arg.target)
                env[arg].meta = dict(arg.meta)
                attrs[arg.target] = fetch_attr(gm, arg.target)
            elif arg.op == "placeholder" and arg not in env:
                raise AssertionError(f"input {arg.name} not passed to stage [{start}, {end})")
        if node.op == "call_module":     # e.g. export's input guard, _guards_fn
            attrs[node.target] = gm.get_submodule(node.target)
        env[node] = graph.node_copy(node, lambda a: env[a])
    if end == len(order):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        graph.output(torch.fx.map_arg(out.args[0], lambda a: env[a]))
    else:
        graph.output(tuple(env[v] for v in stage_outputs(order, end)))
    graph.lint()
    stage = torch.fx.GraphModule(attrs, graph, class_name=name)
    for target, value in attrs.items():
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):   # buffers stay buffers (state_dict, .to())
            owner_path, _, leaf = target.rpartition(".")
            owner = stage.get_submodule(owner_path) if owner_path else stage
            delattr(owner, leaf)
            owner.register_buffer(leaf, value)
    return stage


def stage_outputs(order: ComputeOrder, k: int) -> list[torch.fx.Node]:
    """The values a stage ending at cut ``k`` passes on: what is live there, less the sizes the next stage
    recomputes from the tensors it receives."""
    live = order.live_at(k)
    carried = {sym for v in live for sym, _ in _dim_symbols(v)}
    return [v for v in live if not (symbolic_size(v) and (_size_symbols(v) or {None}) <= carried)]


def _recompute_size(v: torch.fx.Node, graph: torch.fx.Graph, env: dict) -> torch.fx.Node:
    """Copy ``v``'s size computation into ``graph``, its ``sym_size`` leaves reading the stage's own inputs."""
    if v in env:
        return env[v]
    if v.target is _SYM_SIZE:
        symbol = str(v.meta["val"].node.expr)
        for source, new in list(env.items()):
            if new.op == "placeholder":
                dim = next((d for s, d in _dim_symbols(source) if s == symbol), None)
                if dim is not None:
                    env[v] = graph.call_function(_SYM_SIZE, (new, dim))
                    env[v].meta = dict(v.meta)
                    return env[v]
        raise AssertionError(f"no input of the stage carries {symbol} for {v.format_node()}")
    for arg in v.all_input_nodes:
        _recompute_size(arg, graph, env)
    env[v] = graph.node_copy(v, lambda a: env[a])
    return env[v]


def _placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]
