"""The search behind ``finetune``: a model's parts, the candidates over them, and their costs.

Reads a model and an example batch; captures it once and costs every candidate on that one
graph with ``estimate`` (candidates differ in which parameters have ``requires_grad`` and,
for adapters, in nodes inserted by ``insert_lora``). Writes ``requires_grad`` on the model's
parameters while costing and puts the caller's flags back (``restore``).

Parts: the repeated blocks (the longest ``nn.ModuleList``/``nn.Sequential``), the head
(every parameter outside them last used after them: final norm, LM head, a tied
embedding, a new classifier) and the rest (embeddings before the blocks), which trains only
in full fine-tuning. A block is frozen, trains in full, or trains through rank-``r``
adapters on each of its linear layers.

Two searches:

* ``most_parameters`` (no task data): the candidate training the most parameters within
  the budgets, from today's families (the last ``k`` blocks and the head; rank-``r``
  adapters on the last ``k`` blocks), each searched along its frontier, since peak memory
  and time only grow with ``k`` and ``r``.
* ``best_value`` (task data): the candidate whose parts' measured values sum highest
  within the budgets. Candidates are visited best value first (each block's modes sorted by
  value); one is costed only when a lower bound on its peak (the largest peak of its parts
  trained alone; parameters, gradients and optimizer state of all its parts) fits, and the
  first that fits wins. Feasibility only grows with the budgets and values do not depend on
  them, so a larger budget never yields a lower value.
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx
from torch import nn

from ._util import format_bytes
from .adapters import NewHead, copy_graph_module, insert_lora, is_linear, linear_dims
from .capture import capture
from .estimate import Estimate, _module_path, estimate
from .task_probe import FULL

log = logging.getLogger(__name__)

_MAX_ESTIMATES = 64            # candidates costed by best_value before it settles for the best found
_MAX_VISITS = 200_000
_OPTIMIZER_STATES = {"adamw": 2, "sgd": 0, None: 0}    # state tensors per trained parameter (SGD: no momentum)


@dataclass(frozen=True)
class Candidate:
    """What trains: per block ``modes`` (0 frozen, ``FULL`` in full, ``r`` rank-r adapters), the head,
    or everything (``full``: embeddings too)."""
    modes: tuple[int, ...] = ()
    head: bool = True
    full: bool = False
    n_trainable_params: int = 0

    def __post_init__(self):
        bad = [m for m in self.modes if not isinstance(m, int) or m < FULL]
        if bad:
            raise ValueError(f"block modes must be 0 (frozen), {FULL} (full) or a rank > 0, got {bad}")

    @property
    def n_blocks(self) -> int:
        """Blocks that train (in full or through adapters)."""
        return sum(m != 0 for m in self.modes)

    def describe(self) -> str:
        if self.full:
            return "full fine-tuning"
        parts = []
        full = [i for i, m in enumerate(self.modes) if m == FULL]
        if full:
            parts.append(f"block{'s' if len(full) > 1 else ''} {_ranges(full)} in full")
        for rank in sorted({m for m in self.modes if m > 0}, reverse=True):
            idx = [i for i, m in enumerate(self.modes) if m == rank]
            parts.append(f"rank-{rank} adapters on block{'s' if len(idx) > 1 else ''} {_ranges(idx)}")
        if self.head:
            parts.append("the head")
        return " + ".join(parts) or "nothing"


def _ranges(idx: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (block indices in graph order)."""
    runs, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            runs.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(runs)


class Space:
    """One model's parts and the estimates of its candidates (cached), all on one capture."""

    def __init__(self, model: nn.Module, args: tuple, kwargs: dict, *, optimizer, loss_fn, device):
        self.args, self.kwargs, self.optimizer = args, kwargs, optimizer
        self.options = dict(training=True, optimizer=optimizer, loss_fn=loss_fn, device=device)
        self.params = dict(model.named_parameters())                 # deduplicated: tied weights once
        self.saved_flags = {n: p.requires_grad for n, p in self.params.items()}
        self.n_params = sum(p.numel() for p in self.params.values())
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.params.values())
        self.gm = capture(model, args, kwargs)
        self.blocks = repeated_blocks(model)
        self.n_blocks = len(self.blocks)
        self.block_params, self.head_params = _groups(self.gm, self.params, self.blocks)
        self.new_head = any(isinstance(m, NewHead) for m in model.modules())
        self.linears = [[(_join(block, n), linear_dims(m))
                         for n, m in model.get_submodule(block).named_modules() if is_linear(m)]
                        for block in self.blocks]
        self.costs: dict[Candidate, Estimate] = {}

    def restore(self) -> None:
        for n, p in self.params.items():
            p.requires_grad_(self.saved_flags[n])

    def usable_ranks(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        """Ranks below every adapted layer's smaller dimension (else an adapter is no cheaper)."""
        return tuple(r for r in ranks if all(r < min(d) for blk in self.linears for _, d in blk)) or ranks[:1]

    # candidates
    @property
    def full(self) -> Candidate:
        return Candidate((FULL,) * self.n_blocks, head=True, full=True, n_trainable_params=self.n_params)

    def make(self, modes: tuple[int, ...], head: bool) -> Candidate:
        n = sum(self.params[p].numel() for p in self.trained_names(modes, head))
        n += sum(m * (d_in + d_out) for blk, m in zip(self.linears, modes) if m > 0 for _, (d_in, d_out) in blk)
        return Candidate(tuple(modes), head=head, n_trainable_params=n)

    def suffix(self, k: int, mode: int = FULL, head: bool = True) -> Candidate:
        return self.make((0,) * (self.n_blocks - k) + (mode,) * k, head)

    def single(self, j: int, mode: int, head: bool) -> Candidate:
        modes = [0] * self.n_blocks
        modes[j] = mode
        return self.make(tuple(modes), head)

    def trained_names(self, modes: tuple[int, ...], head: bool) -> set[str]:
        names = set(self.head_params) if head else set()
        for i, m in enumerate(modes):
            if m == FULL:
                names |= self.block_params[i]
        return names

    def adapter_bytes(self, j: int, rank: int) -> int:
        size = next(iter(self.params.values())).element_size()
        return sum(rank * (d_in + d_out) for _, (d_in, d_out) in self.linears[j]) * size

    # costing
    def cost(self, cand: Candidate) -> Estimate:
        if cand not in self.costs:
            trained = set(self.params) if cand.full else self.trained_names(cand.modes, cand.head)
            for n, p in self.params.items():
                p.requires_grad_(n in trained)
            gm = self.gm
            if any(m > 0 for m in cand.modes):
                gm = copy_graph_module(self.gm)
                insert_lora(gm, targets=self._adapters(cand), scale=2.0)
            self.costs[cand] = estimate(gm, self.args, self.kwargs, **self.options)
            log.debug("finetune: %s -> peak %s", cand.describe(), format_bytes(self.costs[cand].peak_bytes))
        return self.costs[cand]

    def _adapters(self, cand: Candidate) -> dict:
        some = next(iter(self.params.values()))
        targets = {}
        for blk, rank in zip(self.linears, cand.modes):
            for path, (d_in, d_out) in blk if rank > 0 else ():
                targets[path] = (nn.Parameter(torch.zeros(rank, d_in, dtype=some.dtype, device=some.device)),
                                 nn.Parameter(torch.zeros(d_out, rank, dtype=some.dtype, device=some.device)))
        return targets

    def fits(self, cand: Candidate, memory_limit: int, time_limit: float | None) -> bool:
        est = self.cost(cand)
        return est.peak_bytes <= memory_limit and (time_limit is None or est.time_s <= time_limit)


# -- without task data: the most parameters ---------------------------------------------------

def most_parameters(space: Space, ranks: tuple[int, ...], memory_limit: int,
                    time_limit: float | None) -> Candidate | None:
    """The candidate training the most parameters within the budgets, from the suffix and adapter families."""
    fits = lambda c: space.fits(c, memory_limit, time_limit)  # noqa: E731
    head_only = space.suffix(0)
    head_fits = bool(space.head_params) and fits(head_only)
    ladder = [head_only] + [space.suffix(k) for k in range(1, space.n_blocks + 1)] + [space.full]
    best = _last_fitting(ladder, fits) if head_fits else None
    if space.n_blocks and (head_fits or not space.new_head):
        best = _adapter_frontier(space, ranks, fits, head=head_fits, best=best)
    return best


def _adapter_frontier(space: Space, ranks, fits, *, head: bool, best: Candidate | None) -> Candidate | None:
    """Walk the staircase of the largest fitting rank per number of adapted blocks (it only falls
    as blocks are added), costing only candidates that would train more than ``best``."""
    top = len(ranks) - 1
    for k in range(1, space.n_blocks + 1):
        while top >= 0:
            cand = space.suffix(k, ranks[top], head)
            if best is not None and cand.n_trainable_params <= best.n_trainable_params:
                break                   # this rank and every smaller one train no more than best
            if fits(cand):
                best = cand
                break
            top -= 1
        if top < 0:
            break
    return best


def _last_fitting(ladder: list[Candidate], fits: Callable[[Candidate], bool]) -> Candidate | None:
    """Binary search on a ladder whose peak memory and time only grow."""
    lo, hi = 0, len(ladder) - 1
    if not fits(ladder[lo]):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(ladder[mid]) else (lo, mid - 1)
    return ladder[lo]


# -- with task data: the most value -----------------------------------------------------------

def best_value(space: Space, values: list[dict[int, float]], modes: list[tuple[int, ...]], head: bool,
               memory_limit: int, time_limit: float | None, *, cap: float = float("inf")) -> Candidate | None:
    """The candidate with the highest value that fits (None: nothing does): the sum of its blocks'
    ``values[j][mode]``, at most ``cap`` (the loss left to remove); among equal values, the larger sum.

    ``modes[j]``: block j's modes worth considering (each fitting when block j trains alone).
    """
    if space.fits(space.full, memory_limit, time_limit):
        return space.full
    options = [_pareto(space, j, values[j], modes[j], head) for j in range(space.n_blocks)]
    # at the optimizer step every trained byte has its gradient and optimizer state beside it
    per_byte = 1 + _OPTIMIZER_STATES.get(space.optimizer, 2)
    head_bytes = sum(space.params[n].numel() * space.params[n].element_size() for n in space.head_params)
    resident = space.param_bytes + (per_byte * head_bytes if head else 0)

    def key(idx) -> tuple[float, float, tuple]:
        total = sum(options[j][i][1] for j, i in enumerate(idx))
        return -min(total, cap), -total, idx

    def lower_bound(idx) -> tuple[int, float]:
        chosen = [(j, options[j][i][0]) for j, i in enumerate(idx) if options[j][i][0] != 0]
        singles = [space.cost(space.single(j, m, head)) for j, m in chosen]
        state = sum(per_byte * (_block_bytes(space, j) if m == FULL else space.adapter_bytes(j, m)) for j, m in chosen)
        return (max([resident + state] + [e.peak_bytes for e in singles]),
                max([0.0] + [e.time_s for e in singles]))

    start = tuple(0 for _ in options)
    heap, seen, n_costed, n_visits = [key(start)], {start}, 0, 0
    while heap and n_costed < _MAX_ESTIMATES and n_visits < _MAX_VISITS:
        *_, idx = heapq.heappop(heap)
        n_visits += 1
        modes_now = tuple(options[j][i][0] for j, i in enumerate(idx))
        if head or any(modes_now):
            peak_lb, time_lb = lower_bound(idx)
            if peak_lb <= memory_limit and (time_limit is None or time_lb <= time_limit):
                cand = space.make(modes_now, head)
                n_costed += 1
                if space.fits(cand, memory_limit, time_limit):
                    return cand
        for j in range(len(idx)):
            if idx[j] + 1 < len(options[j]):
                child = idx[:j] + (idx[j] + 1,) + idx[j + 1:]
                if child not in seen:
                    seen.add(child)
                    heapq.heappush(heap, key(child))
    if heap:
        log.info("finetune: search stopped after %d candidates costed; taking the best single part", n_costed)
        return _best_single(space, options, head, memory_limit, time_limit)
    return None


def _pareto(space: Space, j: int, values: dict[int, float], modes: tuple[int, ...], head: bool):
    """Block j's (mode, value) options, best value first, each cheaper than every better one; frozen last."""
    ranked = sorted(((m, values.get(m, 0.0)) for m in modes if m != 0),
                    key=lambda mv: (-mv[1], space.cost(space.single(j, mv[0], head)).peak_bytes))
    kept, cheapest = [], None
    for mode, value in ranked:
        peak = space.cost(space.single(j, mode, head)).peak_bytes
        if value > 0 and (cheapest is None or peak < cheapest):
            kept.append((mode, value))
            cheapest = peak
    return kept + [(0, 0.0)]


def _best_single(space: Space, options, head: bool, memory_limit: int, time_limit: float | None):
    fitting = [(v, space.single(j, m, head)) for j, opts in enumerate(options) for m, v in opts if m != 0]
    fitting = [(v, c) for v, c in fitting if space.fits(c, memory_limit, time_limit)]
    if fitting:
        return max(fitting, key=lambda vc: vc[0])[1]
    head_only = space.make((0,) * space.n_blocks, True)
    return head_only if head and space.fits(head_only, memory_limit, time_limit) else None


def _block_bytes(space: Space, j: int) -> int:
    return sum(space.params[n].numel() * space.params[n].element_size() for n in space.block_params[j])


# -- the model's structure --------------------------------------------------------------------

def repeated_blocks(model: nn.Module) -> list[str]:
    """Paths of the children holding parameters of the longest ``nn.ModuleList`` (else ``nn.Sequential``)."""
    for kind in (nn.ModuleList, nn.Sequential):
        best: list[str] = []
        for name, m in model.named_modules():
            if type(m) is kind:
                children = [_join(name, c) for c, mod in m.named_children() if any(True for _ in mod.parameters())]
                if len(children) >= 2 and len(children) > len(best):
                    best = children
        if best:
            return best
    return []


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _inside(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _groups(gm: torch.fx.GraphModule, params: dict, blocks: list[str]):
    """Parameter names per block, and the head: parameters outside the blocks last used after them."""
    last_use, block_end = {}, -1
    for i, node in enumerate(gm.graph.nodes):
        if node.op == "call_function" and any(_inside(_module_path(node), b) for b in blocks):
            block_end = i
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                last_use[arg.target] = i
    block_params = [{n for n in params if _inside(n, b)} for b in blocks]
    in_blocks = set().union(*block_params) if block_params else set()
    uses = {}
    for target, i in last_use.items():
        p = _get(gm, target)
        if p is not None:
            uses[id(p)] = max(uses.get(id(p), -1), i)
    head = {n for n, p in params.items() if n not in in_blocks and uses.get(id(p), -1) > block_end}
    return block_params, head


def _get(gm: nn.Module, target: str):
    try:
        return gm.get_parameter(target)
    except AttributeError:
        return None
