"""Sharding analysis: which values of a captured graph are split across ``n`` tensor-parallel shards.

Reads a captured ATen graph (``passes.capture``: fake values in ``node.meta["val"]``); writes
nothing on it. Returns a ``Sharding``: the layout of every sharded value, the parameters to
slice, the replicated activations to slice locally, and the matmuls whose output is a partial
sum (row-parallel: an all-reduce follows).

A layout ``Shard(dim, blocks)`` says: view ``dim`` (size ``D``) as ``(blocks, n, D / (blocks n))``;
shard ``r`` holds ``[:, r, :]``. ``blocks`` is 1 for a plain split, 3 for GPT-2's fused
``c_attn`` (q | k | v, each split by heads). Regions grow forward from seeds through per-op
rules (a table keyed by ATen op, in ``rules``):

* column-parallel: a parameter matmul on a replicated input, split by output features;
* expert-parallel: an einsum/bmm whose >= 3-D parameter splits on a batch dim (the experts dim
  of MoE weights ``[E, d, f]``); replicated operands spanning that dim are sliced locally;
* vocabulary-parallel embedding: a table split by rows, token ids a graph input (a region of
  one node whose output is a partial sum); a tied table stays whole.

Row-parallel matmuls, einsums contracting the sharded dim and sums over it close a region
(partial sums: an all-reduce follows). A sharded value that reaches the model's output is
all-gathered there (a vocabulary-parallel LM head), unless its weight is tied. A region that
reaches an op without a rule or an indivisible shape is dropped whole, so its matmuls stay
replicated.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch
import torch.fx

from passes._util import node_value
from .rules import _RULES, Shard, _NoRule, _pointwise, _shape, _subscripts

__all__ = ["Shard", "Sharding", "analyze", "seed_input", "MATMULS"]

aten = torch.ops.aten
MATMULS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default)
_HEAVY = MATMULS + (aten.einsum.default, aten.scaled_dot_product_attention.default, aten.conv2d.default,
                    aten.convolution.default, aten.embedding.default)






@dataclass
class Sharding:
    """Decisions of ``analyze``: what each shard holds and where the collectives go."""
    n: int
    layout: dict = field(default_factory=dict)        # node -> Shard | tuple (multi-output) of sharded values
    convert: dict = field(default_factory=dict)       # (user, arg node) -> Shard: slice a replicated input locally
    reduce: dict = field(default_factory=dict)        # row-parallel node -> its group's seed names
    groups: list = field(default_factory=list)        # committed seed groups: [(seed names, region size)]
    column: set = field(default_factory=set)          # column-parallel seed nodes
    expert: set = field(default_factory=set)          # expert-parallel seed nodes (parameter split on a batch dim)
    vocab: set = field(default_factory=set)           # vocabulary-parallel embeddings (in ``reduce`` too)
    gather: set = field(default_factory=set)          # sharded values all-gathered at the model's output
    replicated: dict = field(default_factory=dict)    # matmul-like node name -> why it stays replicated

    def sharded(self, node) -> bool:
        return node in self.layout or node in self.reduce


# -- the analysis -----------------------------------------------------------------------------

def analyze(gm: torch.fx.GraphModule, n: int) -> Sharding:
    """Find Megatron regions (column-parallel seeds closed by row-parallel matmuls) in ``gm`` for ``n`` shards."""
    result = Sharding(n)
    index = {node: i for i, node in enumerate(gm.graph.nodes)}
    for group in _seed_groups(gm, result):
        if any(result.sharded(s) for s in group):
            continue
        reason, blocks = None, 1
        for _ in range(3):        # a fused projection (q|k|v) reveals its block count at the split
            trial = _Trial(result, index, n)
            try:
                trial.grow(group, blocks)
            except _NoRule as exc:
                reason, hint = str(exc), getattr(exc, "blocks", None)
                if hint and hint != blocks:
                    blocks = hint
                    continue
                break
            trial.commit(group)
            reason = None
            break
        if reason:
            for s in group:
                result.replicated[s.name] = reason
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.embedding.default and not result.sharded(node):
            _vocab_parallel(node, result)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _HEAVY and not result.sharded(node) \
                and node.name not in result.replicated:
            result.replicated[node.name] = _why_not_seed(node, result)
    return result


def _vocab_parallel(node: torch.fx.Node, result: Sharding) -> None:
    """Split an embedding table by rows (Megatron's VocabParallelEmbedding), or say why it stays whole."""
    w, ids = node.args[:2]
    val = node_value(w)
    why = None
    if w.op != "get_attr" or not isinstance(val, torch.Tensor) or val.dim() != 2:
        why = "embedding: its table is not a 2-D parameter"
    elif not _is_input(ids):
        why = "embedding: its ids are computed in the graph (positions, buckets), not token ids"
    elif val.shape[0] % result.n:
        why = f"embedding: vocabulary size {val.shape[0]} of {w.target} is not divisible by n = {result.n}"
    elif any(u is not node for u in w.users):
        others = ", ".join(u.name for u in w.users if u is not node)
        why = f"embedding: {w.target} is tied (also read by {others}); tied tables are not split"
    if why:
        result.replicated[node.name] = why + ": replicated"
        return
    result.convert[(node, w)] = Shard(0)
    result.reduce[node] = (node.name,)
    result.vocab.add(node)
    result.groups.append(((node.name,), 1))


def _is_input(node: torch.fx.Node) -> bool:
    """A graph input, possibly reshaped (GPT-2 views ``input_ids``)."""
    while node.op == "call_function" and node.target in (aten.view.default, aten.reshape.default,
                                                         aten._unsafe_view.default, aten.flatten.using_ints):
        node = node.args[0]
    return node.op == "placeholder"


def _param_weight(node: torch.fx.Node) -> torch.fx.Node | None:
    """The 2-D parameter a matmul multiplies by (linear: [out, in]; addmm/mm/matmul: [in, out])."""
    pos = {aten.linear.default: 1, aten.addmm.default: 2, aten.mm.default: 1, aten.matmul.default: 1}.get(node.target)
    if pos is None or len(node.args) <= pos:
        return None
    w = node.args[pos]
    val = node_value(w) if isinstance(w, torch.fx.Node) else None
    if isinstance(w, torch.fx.Node) and w.op == "get_attr" and isinstance(val, torch.Tensor) and val.dim() == 2:
        return w
    return None


def _activation(node: torch.fx.Node) -> torch.fx.Node:
    return node.args[1] if node.target == aten.addmm.default else node.args[0]




def _expert_weight(node: torch.fx.Node):
    """``(parameter, dim)``: a >= 3-D parameter operand of an einsum/bmm and its batch dim (kept in the output,
    not one of its two matrix dims), e.g. the experts dim of MoE's ``w_in [E, d, f]``; None otherwise."""
    parsed = _subscripts(node)
    if parsed is None:
        return None
    for w, sub in zip(*parsed[:2]):
        val = node_value(w)
        if w.op == "get_attr" and isinstance(val, torch.Tensor) and val.dim() >= 3:
            for d, letter in enumerate(sub[:-2]):
                if letter in parsed[2] and val.shape[d] > 1:
                    return w, d
    return None


def seed_input(seed: torch.fx.Node) -> torch.fx.Node:
    """The replicated activation a seed multiplies by its (split) parameter."""
    if seed.target in (aten.linear.default, aten.addmm.default) or _param_weight(seed) is not None:
        return _activation(seed)
    w, _ = _expert_weight(seed)
    return next(a for a in _subscripts(seed)[0] if a is not w)


def _seed_groups(gm, result) -> list[list[torch.fx.Node]]:
    """Parameter matmuls grouped by their input (q, k, v of one attention; gate and up of one MLP), in order;
    expert-parallel seeds group apart (a router reads the same input but cannot split the same way)."""
    groups: dict[torch.fx.Node, list] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and _param_weight(node) is not None:
            x = _activation(node)
            if node.target == aten.addmm.default and (node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1):
                continue
            groups.setdefault((x, "column"), []).append(node)
        elif node.op == "call_function" and _expert_weight(node) is not None:
            groups.setdefault((seed_input(node), "expert"), []).append(node)
    return list(groups.values())


def _why_not_seed(node, result) -> str:
    if node.target == aten.einsum.default:
        return ("einsum: multiplies by no parameter with a batch dim to split (expert parallelism), and is in "
                "no sharded region: replicated")
    if node.target in (aten.conv2d.default, aten.convolution.default):
        return "convolution has no sharding rule: replicated"
    if node.target == aten.scaled_dot_product_attention.default or node.target in MATMULS:
        return ("not in a sharded region: its projections stayed replicated (see their reasons), or it "
                "multiplies by no parameter")
    return "no rule"


class _Trial:
    """One speculative region grown from a seed group; committed only if every path closes."""

    def __init__(self, result: Sharding, index: dict, n: int):
        self.result, self.index, self.n = result, index, n
        self.layout: dict = {}
        self.convert: dict = {}
        self.reduce: set = set()
        self.expert_seeds: set = set()
        self.gather: set = set()

    # -- growth -----------------------------------------------------------------------------
    def grow(self, seeds: list[torch.fx.Node], blocks: int) -> None:
        heap = []
        for seed in seeds:
            self._seed(seed, blocks)
            self._push_users(heap, seed)
        seen = set(seeds)
        while heap:
            _, node = heapq.heappop(heap)
            if node in seen:
                continue
            seen.add(node)
            if node in self.result.layout or node in self.result.reduce:
                raise _NoRule(f"{node.name} is already in another sharded region")
            if node.op == "output":
                self._gather_outputs(node, seeds)
                continue
            if node.op != "call_function":
                raise _NoRule(f"{node.format_node()} is not an ATen call")
            out = self._rule(node)
            if out is not None:
                self.layout[node] = out
                self._push_users(heap, node)

    def _gather_outputs(self, output: torch.fx.Node, seeds) -> None:
        """Sharded model outputs are all-gathered (a vocabulary-parallel head), unless a weight is tied."""
        for seed in seeds:
            w = _param_weight(seed)
            others = [u.name for u in (w.users if w is not None else ()) if (u, w) not in self.convert]
            if others:
                raise _NoRule(f"{seed.name}: a sharded value reaches the model's output and {w.target} is tied "
                              f"(also read by {', '.join(others)}): a vocabulary-parallel head would split both")
        for arg in output.all_input_nodes:
            s = self.lay(arg)
            if s is None:
                continue
            if not isinstance(s, Shard) or s.blocks != 1:
                raise _NoRule(f"{arg.name}: a fused (blocked) value reaches the model's output")
            self.gather.add(arg)

    def _push_users(self, heap, node) -> None:
        for user in node.users:
            heapq.heappush(heap, (self.index[user], user))

    def _seed(self, seed: torch.fx.Node, blocks: int) -> None:
        if _param_weight(seed) is None:
            return self._seed_expert(seed, blocks)
        w = _param_weight(seed)
        out_dim = 0 if seed.target == aten.linear.default else 1        # weight dim holding output features
        self._need_div(w, out_dim, blocks, seed)
        self.convert[(seed, w)] = Shard(out_dim, blocks)
        bias = seed.args[2] if seed.target == aten.linear.default and len(seed.args) > 2 else \
            seed.args[0] if seed.target == aten.addmm.default else None
        if isinstance(bias, torch.fx.Node):
            if node_value(bias).dim() != 1:
                raise _NoRule(f"{seed.name}: a 2-D bias is not sharded")
            self.convert[(seed, bias)] = Shard(0, blocks)
        self.layout[seed] = Shard(node_value(seed).dim() - 1, blocks)

    def _seed_expert(self, seed: torch.fx.Node, blocks: int) -> None:
        """Split the parameter on its batch dim; the other operands keep the full dim or get a local slice."""
        w, d = _expert_weight(seed)
        operands, subs, out = _subscripts(seed)
        letter = subs[operands.index(w)][d]
        self._need_div(w, d, blocks, seed)
        self.convert[(seed, w)] = Shard(d, blocks)
        for a, sub in zip(operands, subs):
            if a is not w and letter in sub and _shape(a)[sub.index(letter)] != 1:
                self.want(seed, a, Shard(sub.index(letter), blocks))
        self.layout[seed] = Shard(out.index(letter), blocks)
        self.expert_seeds.add(seed)

    def _need_div(self, node, dim, blocks, where) -> None:
        size = node_value(node).shape[dim]
        if size % (blocks * self.n):
            raise _NoRule(f"{where.name}: dim {dim} of {node.name} has size {size}, not divisible by "
                          f"{'blocks x ' if blocks > 1 else ''}n = {blocks * self.n}")

    def lay(self, arg):
        return self.layout.get(arg) if isinstance(arg, torch.fx.Node) else None

    def want(self, user, arg, shard: Shard) -> None:
        """``arg`` is replicated; ``user`` needs it sliced to ``shard`` (a parameter is sliced once, at build)."""
        if not isinstance(arg, torch.fx.Node):
            raise _NoRule(f"{user.name}: a constant would need slicing")
        self._need_div(arg, shard.dim, shard.blocks, user)
        self.convert[(user, arg)] = shard

    def _rule(self, node):
        rule = _RULES.get(node.target)
        if rule is None:
            if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags:
                rule = _pointwise
            else:
                raise _NoRule(f"{node.name} ({getattr(node.target, '__name__', node.target)}) has no sharding rule")
        return rule(self, node)

    # -- commit -----------------------------------------------------------------------------
    def commit(self, seeds) -> None:
        r = self.result
        r.layout.update(self.layout)
        r.convert.update(self.convert)
        for node in self.reduce:
            r.reduce[node] = tuple(s.name for s in seeds)
        r.expert.update(self.expert_seeds)
        r.gather.update(self.gather)
        r.column.update(s for s in seeds if s not in self.expert_seeds)
        r.groups.append((tuple(s.name for s in seeds), len(self.layout)))
