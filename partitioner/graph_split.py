"""Split a captured graph at cut positions into stage GraphModules.

Reads a captured ``GraphModule`` (``passes.capture``) and cut positions in its compute
order; writes nothing on it. Each stage is a plain ``GraphModule`` whose inputs are the
values live at its first cut and whose outputs are the values live at its last cut, so a
tensor that skips stages (a residual, a mask) is passed along by every stage between its
producer and its users. A stage holds exactly the parameters and buffers its nodes read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from passes._util import fetch_attr, node_value, tensor_bytes, tensors_of

__all__ = ["ComputeOrder", "build_stage"]

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
        whether the cut is allowed: every crossing value is a tensor (not a tuple or a scalar), and
        the node before it produces a tensor (a guard or an assert stays with what follows, so no
        stage is made of checks alone)."""
        n = len(self.nodes)
        total = [0] * (n + 2)
        floats = [0] * (n + 2)
        bad = [0] * (n + 2)
        for v, last in self.last_use.items():
            start, end = self.position[v] + 1, last   # crosses cuts start..end inclusive
            if start > end:
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
        for k in range(1, n):
            ok[k] = ok[k] and bool(tensors_of(node_value(self.nodes[k - 1])))
        ok[0] = ok[n] = True
        return out_total, out_floats, ok


def build_stage(order: ComputeOrder, start: int, end: int, *, name: str = "stage") -> torch.fx.GraphModule:
    """A GraphModule running ``order.nodes[start:end]``: inputs live at ``start``, outputs live at ``end``.

    The last stage (``end == len(order)``) returns the model's flat outputs instead.
    """
    gm = order.gm
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for v in order.live_at(start) if start > 0 else _placeholders(gm):
        env[v] = graph.placeholder(v.name)
        env[v].meta = dict(v.meta)
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
        graph.output(tuple(env[v] for v in order.live_at(end)))
    graph.lint()
    stage = torch.fx.GraphModule(attrs, graph, class_name=name)
    for target, value in attrs.items():
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):   # buffers stay buffers (state_dict, .to())
            owner_path, _, leaf = target.rpartition(".")
            owner = stage.get_submodule(owner_path) if owner_path else stage
            delattr(owner, leaf)
            owner.register_buffer(leaf, value)
    return stage


def _placeholders(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]
