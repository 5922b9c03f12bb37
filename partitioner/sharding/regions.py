"""Sharding analysis: which values of a captured graph are split across ``n`` tensor-parallel shards.

Reads a captured ATen graph (``passes.capture``: fake values in ``node.meta["val"]``); writes
nothing on it. Returns a ``Sharding``: the layout of every sharded value (parameters included:
they are cut when a shard is built), the replicated (or coarser-split) values to cut locally,
and the nodes whose output is a partial sum (an all-reduce follows).

A region grows from its seed parameters (``Shard`` layouts, see ``layout``) through the per-op
rules (``rules``) until every path ends in a partial sum or the model's output:

* column-parallel: a parameter multiplied into a replicated input (``linear``, ``addmm``,
  ``mm``/``matmul``/``bmm`` with the parameter on either side, reached through ``t``,
  ``transpose``, ``permute`` or an ``index`` of it: Falcon's ``x @ W.T``, MoE's ``W[expert_ids]``,
  Hugging Face's ``grouped_mm_fallback`` experts), split by output features;
* expert-parallel: an einsum/bmm whose >= 3-D parameter splits on a batch dim (MoE ``[E, d, f]``);
* channel-parallel: a convolution split by output channels;
* vocabulary-parallel: an embedding table split by rows; a table tied to an LM head is split by
  the head's region, both together (masked lookup + all-reduce; logits split by vocabulary).

Seeds that multiply the same input form one group (q, k, v of one attention). A group grows as
one region; a member whose path reaches an op without a rule, or an indivisible shape, is shed
(stays replicated, with the reason) and the others grow again. A failing reshape or split
suggests another seed layout (fused ``blocks``, KV heads shared by ``rep`` shards, unequal
``segments``), tried before shedding. Two groups whose regions meet (cross-attention k/v and
q) merge into one.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.fx

from passes._util import fetch_attr, node_value, tensor_bytes
from .layout import NoRule, Shard, divides, is_static, make_shard, narrows, segments_of
from .rules import reshape_layout  # noqa: F401  (importing rules and rules_compute fills the rule table)
from .rules_compute import conv_groups  # noqa: F401
from .rule_table import _shape, op_name, rule_for, sym_shape
from .seeds import (_CONVS, _GROUPED_MM, _PARAM_VIEWS, MATMULS, _param_chain, _param_dim, _Seed, _seed_groups,
                    _vocab_seed, seed_input)

__all__ = ["Shard", "Sharding", "analyze", "seed_input", "MATMULS", "whole_params"]

aten = torch.ops.aten
_HEAVY = MATMULS + _CONVS + (aten.einsum.default, aten.scaled_dot_product_attention.default,
                             aten.embedding.default, aten.baddbmm.default)
@dataclass
class Sharding:
    """Decisions of ``analyze``: what each shard holds and where the collectives go."""
    n: int
    layout: dict = field(default_factory=dict)        # node -> Shard | tuple: sharded values (parameters too)
    convert: dict = field(default_factory=dict)       # (user, arg node) -> Shard: cut arg locally for user
    reduce: dict = field(default_factory=dict)        # partial-sum node -> its group's seed names
    groups: list = field(default_factory=list)        # committed seed groups: [(seed names, region size)]
    column: set = field(default_factory=set)          # column-parallel seed nodes
    expert: set = field(default_factory=set)          # expert-parallel seed nodes (parameter split on a batch dim)
    conv: set = field(default_factory=set)            # channel-parallel convolution seeds
    vocab: set = field(default_factory=set)           # vocabulary-parallel embeddings (in ``reduce`` too)
    gather: set = field(default_factory=set)          # sharded values all-gathered at the model's output
    replicated: dict = field(default_factory=dict)    # matmul-like node name -> why it stays replicated
    slices: dict = field(default_factory=dict)        # index node -> (dim, start, end): a constant run, sliced

    def sharded(self, node) -> bool:
        return node in self.layout or node in self.reduce

    def parts(self, node) -> int:
        """Distinct pieces a node's work is cut into (``n``; fewer where shards share KV heads)."""
        s = self.layout.get(node)
        if isinstance(s, Shard):
            return self.n // max([rep for _, rep in s.segments] if s.segments else [s.rep])
        return self.n if node in self.reduce or node in self.layout else 1


class _Collide(Exception):
    """A trial reached a node of a committed region: the two groups merge."""

    def __init__(self, other):
        super().__init__("collides with a committed region")
        self.other = other


# -- the analysis -----------------------------------------------------------------------------

def analyze(gm: torch.fx.GraphModule, n: int, *, conv_flops_per_byte=None) -> Sharding:
    """Find Megatron regions (column-parallel seeds closed by row-parallel matmuls) in ``gm`` for ``n`` shards.

    ``conv_flops_per_byte(dtype)``: the FLOPs a channel-parallel convolution region must save per byte it
    all-reduces to pay (a device's break-even); None splits every convolution a rule allows.
    """
    state = _State(gm, n)
    state.conv_flops_per_byte = conv_flops_per_byte
    for group in _seed_groups(gm):
        if not any(state.owner.get(s.node) for s in group):
            state.place(group)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.embedding.default and node not in state.owner:
            seed, why = _vocab_seed(node, n)
            if seed is None:
                state.replicated.setdefault(node.name, why)
            else:
                state.place([seed])
    result = state.result()
    for node in gm.graph.nodes:
        if node.op == "call_function" and (node.target in _HEAVY or op_name(node.target) == _GROUPED_MM) \
                and not result.sharded(node) and node.name not in result.replicated:
            result.replicated[node.name] = _why_not_seed(node)
    return result


def _why_not_seed(node) -> str:
    if node.target == aten.einsum.default:
        return ("einsum: multiplies by no parameter with a batch dim to split (expert parallelism), and is in "
                "no sharded region: replicated")
    if node.target == aten.embedding.default:
        return "embedding: its table is split by no region: replicated"
    if node.target in _CONVS:
        return "convolution: its weight is split by no region (see its seed's reason): replicated"
    return ("not in a sharded region: its projections stayed replicated (see their reasons), or it "
            "multiplies by no parameter")


# -- placing seed groups ------------------------------------------------------------------------

class _State:
    """Committed regions, and the search that places one seed group (hints, shedding, merging)."""

    def __init__(self, gm, n: int):
        self.gm, self.n = gm, n
        self.index = {node: i for i, node in enumerate(gm.graph.nodes)}
        self.owner: dict = {}          # node -> committed trial
        self.trials: list = []
        self.replicated: dict = {}
        self.conv_flops_per_byte = None
        by_tensor: dict = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                by_tensor.setdefault(id(fetch_attr(gm, node.target)), []).append(node)
        self.aliases = {a: [b for b in group if b is not a] for group in by_tensor.values() for a in group}

    def aliased(self, param) -> bool:
        """Another get_attr node reads the same tensor and is used: cutting one would untie them."""
        return any(b.users for b in self.aliases.get(param, ()))

    def place(self, seeds: list[_Seed]) -> None:
        """Grow, and commit, the region of one seed group; members that cannot shard are shed with a reason."""
        search, attempts = _Search(self, seeds), 0
        while attempts < 12 + 6 * len(search.seeds):      # each layout hint or shed seed is one attempt
            attempts += 1
            trial = _Trial(self, search.opts)
            try:
                trial.grow(search.seeds)
            except _Collide as exc:
                self._uncommit(exc.other)
                search.merge(exc.other)
                continue
            except NoRule as exc:
                if search.retry(exc):
                    continue
                return
            why = self._conv_pays(trial)
            if why is None:
                self._commit(trial)
            for s in search.seeds:
                self.replicated.pop(s.name, None)
                if why:
                    self.replicated[s.name] = why
            return
        for s in search.seeds:
            self.replicated.setdefault(s.name, "no layout found within the search limit: replicated")

    def _conv_pays(self, trial) -> str | None:
        """Why a region of convolutions only (ResNet's, not Whisper's conv + attention) does not pay: the
        compute it splits is worth less time than its all-reduces take. None when it pays."""
        if self.conv_flops_per_byte is None or any(s.kind != "conv" for s in trial.seeds):
            return None
        flops = sum(_conv_flops(node) for node in list(trial.layout) + list(trial.reduce)
                    if node.op == "call_function" and node.target in _CONVS)
        moved = sum(tensor_bytes(node_value(node)) for node in trial.reduce)
        dtype = node_value(trial.seeds[0].param).dtype
        # time saved flops (1 - 1/n) / peak against a ring all-reduce's 2 (n - 1) / n bytes / link
        need = 2 * self.conv_flops_per_byte(dtype)
        if moved and flops / moved < need:
            return (f"channel-parallel convolutions do not pay here: they split {flops / moved:.0f} FLOPs per "
                    f"all-reduced byte, the device needs {need:.0f} (compute / link bandwidth): replicated")
        return None

    def _commit(self, trial) -> None:
        self.trials.append(trial)
        for node in trial.nodes():
            self.owner[node] = trial

    def _uncommit(self, trial) -> None:
        self.trials.remove(trial)
        for node in trial.nodes():
            self.owner.pop(node, None)

    def result(self) -> Sharding:
        out = Sharding(self.n)
        for trial in sorted(self.trials, key=lambda t: min(self.index[s.node] for s in t.seeds)):
            names = tuple(s.name for s in trial.seeds)
            out.layout.update(trial.layout)
            out.convert.update(trial.convert)
            for node in trial.reduce:
                out.reduce[node] = names
            out.vocab |= trial.vocab
            out.gather |= trial.gather
            out.slices.update(trial.slices)
            for s in trial.seeds:
                {"column": out.column, "expert": out.expert, "conv": out.conv, "vocab": out.vocab}[s.kind].add(s.node)
                if s.kind == "conv":
                    out.column.add(s.node)
            out.groups.append((names, len(trial.layout)))
        out.replicated = dict(self.replicated)
        return out


class _Search:
    """The layouts tried for one seed group: each seed's current layout (its parts as fractions of its dim,
    with their reps), the hints still to try, those tried, and the seeds still in the group."""

    def __init__(self, state: _State, seeds: list):
        self.state, self.seeds = state, list(seeds)
        self.opts = {s: ((Fraction(1), 1),) for s in seeds}
        self.pending: dict = {s: [] for s in seeds}
        self.tried: dict = {s: {self.opts[s]} for s in seeds}

    def merge(self, other) -> None:
        """Take in the seeds (and layouts) of a committed region this group's region met."""
        for s in other.seeds:
            if s not in self.opts:
                self.seeds.append(s)
                self.opts[s] = other.opts[s]
                self.pending[s], self.tried[s] = [], {self.opts[s]}

    def retry(self, exc: NoRule) -> bool:
        """After a failure: move the seeds that reach it to their next layout, or shed them (with the
        reason). False when no seed is left."""
        culprits = [s for s in self.seeds if s in getattr(exc, "origin", ())] or list(self.seeds)
        segments = getattr(exc, "segments", [])
        segment = segments[0] if len(segments) == 1 else None
        for s in culprits:
            # a failing part of a fused projection (a KV head of q | k | v) may still be held whole,
            # the smallest parts first; the latest layout's hints go first (depth first)
            fallback = [{"reps": (self.state.n,), "segment": i}
                        for i in sorted(segments, key=lambda i: self.opts[s][i][0] if i < len(self.opts[s]) else 0)]
            self.pending[s][:0] = [(self.opts[s], hint, segment) for hint in exc.hints or fallback]
        if self._advance(culprits):
            return True
        for s in culprits:
            self.state.replicated[s.name] = str(exc)
        self.seeds = [s for s in self.seeds if s not in culprits]
        return bool(self.seeds)

    def _advance(self, culprits) -> bool:
        """Move the culprits with untried hints to their next layout; False when none has one left."""
        moved = False
        for s in culprits:
            while self.pending[s]:
                base, hint, segment = self.pending[s].pop(0)
                new = _apply_hint(base, hint, segment)
                if new is not None and new not in self.tried[s]:
                    self.tried[s].add(new)
                    self.opts[s] = new
                    moved = True
                    break
        return moved


def _conv_flops(node) -> int:
    """2 x output elements x (input channels per group x kernel elements) of a convolution."""
    out, w = node_value(node), node_value(node.args[1])
    return 2 * out.numel() * w[0].numel()


def _apply_hint(base: tuple, hint: dict, segment) -> tuple | None:
    """A seed layout (parts as fractions of the dim, with their reps) changed as ``hint`` suggests."""
    segment = hint.get("segment", segment)
    if "blocks" in hint:
        reps = {rep for _, rep in base}
        return ((Fraction(1, hint["blocks"]), max(reps)),) * hint["blocks"]
    if "fractions" in hint:               # new parts start unshared; later failures say which to share
        return tuple((f, 1) for f, _ in hint["fractions"])
    if "reps" in hint:
        reps = hint["reps"]
        if len(reps) == len(base):
            return tuple((f, max(rep, r)) for (f, rep), r in zip(base, reps))
        if len(reps) == 1 and segment is not None and segment < len(base):
            return tuple((f, max(rep, reps[0]) if k == segment else rep) for k, (f, rep) in enumerate(base))
        return tuple((f, max(rep, *reps)) for f, rep in base)
    return None


class _Trial:
    """One speculative region grown from a seed group; committed only if every path closes."""

    def __init__(self, state: _State, opts: dict):
        self.state, self.n, self.opts = state, state.n, dict(opts)
        self.seeds: list = []
        self.layout: dict = {}
        self.convert: dict = {}
        self.reduce: set = set()
        self.vocab: set = set()
        self.gather: set = set()
        self.origin: dict = {}          # node -> seeds whose region reaches it
        self.segment: dict = {}         # node (or (node, output index)) -> the seed part it holds
        self.adopted: set = set()       # parameter views cut by a ``want`` (owned like region nodes)
        self.slices: dict = {}          # index node -> (dim, start, end)

    def nodes(self):
        return set(self.layout) | self.reduce | self.adopted | {u for u, _ in self.convert}

    # -- growth -----------------------------------------------------------------------------
    def grow(self, seeds: list[_Seed]) -> None:
        self.seeds = list(seeds)
        heap, seen = [], set()
        for seed in seeds:
            self._seed(seed, heap)
        while heap:
            _, node = heapq.heappop(heap)
            if node in seen:
                continue
            seen.add(node)
            owner = self.state.owner.get(node)
            if owner is not None:
                raise _Collide(owner)
            self.origin[node] = frozenset().union(*(self.origin.get(a, ()) for a in node.all_input_nodes))
            try:
                out = self._visit(node)
            except NoRule as exc:
                exc.origin = self.origin[node]
                exc.segments = sorted({self.segment[a] for a in node.all_input_nodes if a in self.segment})
                raise
            if out is not None:
                self.layout[node] = out
                if node not in self.segment:
                    src = next((a for a in node.all_input_nodes if a in self.layout), None)
                    if src in self.segment and isinstance(out, Shard):
                        self.segment[node] = self.segment[src]
                for user in node.users:
                    heapq.heappush(heap, (self.state.index[user], user))

    def _visit(self, node):
        if node.op == "output":
            self._gather_outputs(node)
            return None
        if node.op != "call_function":
            raise NoRule(f"{node.format_node()} is not an ATen call")
        ins = [self.layout[a] for a in node.all_input_nodes if a in self.layout]
        if ins and all(isinstance(s, Shard) and s.whole(self.n) for s in ins):
            return self._whole(node)           # every shard holds its inputs whole: it computes all of it
        rule = rule_for(node.target)
        if rule is None:
            raise NoRule(f"{node.name} ({op_name(node.target)}) has no sharding rule")
        return rule(self, node)

    def _whole(self, node):
        val = node_value(node)
        if isinstance(val, torch.Tensor):
            return Shard(0, rep=self.n) if val.dim() else None
        if isinstance(val, (tuple, list)) and all(isinstance(v, torch.Tensor) and v.dim() for v in val):
            return tuple(Shard(0, rep=self.n) for _ in val)
        return None

    def _seed(self, seed: _Seed, heap) -> None:
        size = node_value(seed.param).shape[seed.dim]
        parts = []
        for frac, rep in self.opts[seed]:
            z = frac * size
            if z.denominator != 1:
                raise self._fail(seed, f"{seed.name}: dim {seed.dim} of {seed.param.target} (size {size}) does not "
                                       f"cut into parts {[str(f) for f, _ in self.opts[seed]]}")
            parts.append((int(z), rep))
        shard = make_shard(seed.dim, parts)
        if not divides(shard, size, self.n):
            raise self._fail(seed, f"{seed.name}: dim {seed.dim} of {seed.param.target} has size {size}, not "
                                   f"divisible by n = {self.n}{f' in {len(parts)} blocks' if len(parts) > 1 else ''}")
        if self.state.owner.get(seed.param) is not None:
            raise _Collide(self.state.owner[seed.param])
        if self.state.aliased(seed.param):
            raise self._fail(seed, f"{seed.name}: {seed.param.target} is read under two names "
                                   f"({', '.join(a.target for a in self.state.aliases[seed.param])}): not split")
        if self.layout.get(seed.param, shard) != shard:
            raise self._fail(seed, f"{seed.name}: {seed.param.target} is split two ways by one group")
        self.layout[seed.param] = shard
        self.origin[seed.param] = self.origin.get(seed.param, frozenset()) | {seed}
        for user in seed.param.users:
            heapq.heappush(heap, (self.state.index[user], user))

    @staticmethod
    def _fail(seed, message) -> NoRule:
        exc = NoRule(message)
        exc.origin = frozenset({seed})
        return exc

    def _gather_outputs(self, output: torch.fx.Node) -> None:
        """Sharded model outputs are all-gathered (a vocabulary-parallel head)."""
        for arg in output.all_input_nodes:
            s = self.layout.get(arg)
            if s is None:
                continue
            if not isinstance(s, Shard) or not s.plain():
                raise NoRule(f"{arg.name}: a fused, blocked or shared-part value reaches the model's output "
                             f"(its gradient would reach every shard whole)")
            self.gather.add(arg)

    # -- what rules call -------------------------------------------------------------------
    def lay(self, arg):
        """``arg``'s layout as the rules see it: None when replicated, or held whole by every shard."""
        s = self.layout.get(arg) if isinstance(arg, torch.fx.Node) else None
        return None if isinstance(s, Shard) and s.whole(self.n) else s

    def want(self, user, arg, shard: Shard) -> None:
        """``user`` needs ``arg`` cut to ``shard``: a replicated value (or one split more coarsely) is cut
        locally; a parameter read only through views is cut once, when the shard is built."""
        if not isinstance(arg, torch.fx.Node):
            raise NoRule(f"{user.name}: a constant would need slicing")
        size = _shape(arg)[shard.dim]
        if not divides(shard, size, self.n):
            raise NoRule(f"{user.name}: dim {shard.dim} of {arg.name} has size {size}, not divisible by "
                         f"n = {self.n}{' in its blocks' if not shard.plain() else ''}")
        sym = sym_shape(arg)[shard.dim]
        if not is_static(sym) and not shard.folded and (shard.segments or shard.blocks > 1):
            raise NoRule(f"{user.name}: would cut dim {shard.dim} of {arg.name}, of symbolic size {sym}, into "
                         f"{len(segments_of(shard, size))} parts whose sizes change with it")
        current = self.lay(arg)
        if current is not None:
            if not narrows(current, shard, size):
                raise NoRule(f"{user.name}: needs {arg.name} split as {shard}, but it is split as {current}")
        elif arg not in self.layout and self._adopt(user, arg, shard):
            return
        self.convert[(user, arg)] = shard

    def _adopt(self, user, arg, shard: Shard) -> bool:
        """Cut a parameter that reaches ``user`` only through views (Falcon's ``t(W)``) at build time."""
        found = _param_chain(arg)
        if found is None:
            return False
        param, chain = found
        path = [param, *chain]
        if any(len(a.users) != 1 for a in path) or next(iter(arg.users)) is not user:
            return False
        if any(self.state.owner.get(a) is not None or a in self.layout for a in path) or self.state.aliased(param):
            return False
        pdim = _param_dim(chain, shard.dim)
        if pdim is None:
            return False
        cut = shard.moved(pdim)
        if not divides(cut, _shape(param)[pdim], self.n):
            return False
        self.layout[param] = cut
        for node in chain:
            self.layout[node] = self._visit(node)
        if self.layout[arg] != shard:
            for node in path:
                del self.layout[node]
            return False
        self.adopted.update(path)
        for node in path:
            self.origin[node] = self.origin.get(user, frozenset())
        return True

    def constant(self, node) -> torch.Tensor | None:
        """The value of a constant tensor input (a lifted ``x[..., [4]]`` index), when it has real data."""
        while isinstance(node, torch.fx.Node) and node.op == "call_function" and \
                node.target in (aten.lift_fresh_copy.default, aten._to_copy.default, aten.alias.default):
            node = node.args[0]
        if not (isinstance(node, torch.fx.Node) and node.op == "get_attr"):
            return None
        value = fetch_attr(self.state.gm, node.target)
        if not isinstance(value, torch.Tensor) or value.is_meta or \
                isinstance(value, torch._subclasses.fake_tensor.FakeTensor):
            return None
        return value

    def as_slice(self, node, dim: int, start: int, end: int) -> None:
        self.slices[node] = (dim, start, end)

    def note_segment(self, node, index, seg: int) -> None:
        """``node`` (output ``index``) holds part ``seg`` of its input's parts (a slice of q | k | v)."""
        self.segment[node if index is None else (node, index)] = seg

    def pass_segment(self, src, node, index) -> None:
        if (src, index) in self.segment:
            self.segment[node] = self.segment[(src, index)]


def whole_params(gm: torch.fx.GraphModule, sh: Sharding, sliced: dict) -> dict[str, str]:
    """Every parameter of two or more dims that no shard cuts (``sliced``: those it does), with why."""
    cut = {id(fetch_attr(gm, node.target)) for node in sliced}
    out = {}
    for node in gm.graph.nodes:
        value = fetch_attr(gm, node.target) if node.op == "get_attr" else None
        if not isinstance(value, torch.nn.Parameter) or value.dim() < 2 or id(value) in cut or not node.users:
            continue
        readers = _readers(node)
        why = [f"{r.name}: {sh.replicated[r.name]}" for r in readers if r.name in sh.replicated]
        if not why:
            ops = sorted({op_name(r.target).replace("aten::", "") for r in readers})
            why = [f"read by {', '.join(ops)}, which start no split (a position table, a class token, a scale)"]
        out[node.target] = why[0]
    return out


def _readers(param: torch.fx.Node) -> list:
    """The nodes that use a parameter, looking through the ops that only move its elements."""
    out, moved, todo = [], {param}, list(param.users)
    while todo:
        user = todo.pop(0)
        if user.op == "call_function" and user.target in _PARAM_VIEWS and user.args[0] in moved:
            moved.add(user)
            todo.extend(user.users)
        elif user not in out:
            out.append(user)
    return out
