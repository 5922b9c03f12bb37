"""``finetune``: choose what trains and what freezes so a training step fits a memory budget.

Reads a model and an example batch; captures it once and costs every candidate on that
one graph with ``estimate`` (candidates differ in which parameters have ``requires_grad``
and, for low-rank adapters, in nodes inserted by ``insert_lora``). Writes, for the chosen
candidate only, ``requires_grad`` on the model's parameters and ``LoRALinear`` wrappers
around the adapted layers; returns a ``FinetunePlan``.

Candidates, from the most trained to the least:

* everything (full fine-tuning);
* the last ``k`` repeated blocks (the longest ``nn.ModuleList``/``nn.Sequential``) plus
  the head (every parameter last used after the blocks: final norm, LM head, a tied
  embedding, a new classifier);
* the head only;
* low-rank adapters (rank ``r``, ``B = 0`` so outputs start unchanged) on every linear
  layer (``nn.Linear``, Hugging Face ``Conv1D``) of the last ``k`` blocks, with the head
  when the head alone fits, else without.

Peak memory is assumed non-decreasing in ``k`` and ``r`` (more saved activations, more
gradients and optimizer state), so each family is searched along its frontier instead of
costing every candidate; the winner is the candidate with the most trainable parameters
whose estimated peak fits. A larger budget never trains fewer parameters.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ._util import format_bytes, format_count, format_seconds, table
from .capture import capture, normalize_inputs
from .estimate import Estimate, _module_path, estimate

__all__ = ["finetune", "FinetunePlan", "Candidate", "LoRALinear", "insert_lora", "attach_classifier",
           "attach_lm_head", "Classifier", "NewHead", "RANKS"]

RANKS = (1, 2, 4, 8, 16, 32, 64, 128)


# -- adapters and heads (module level) ---------------------------------------------------------

class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))``: a frozen linear layer (``nn.Linear`` or HF ``Conv1D``) and a
    trainable low-rank update. ``B`` starts at zero, so the output starts unchanged."""

    def __init__(self, base: nn.Module, rank: int, *, alpha: float | None = None):
        super().__init__()
        d_in, d_out = _linear_dims(base)
        self.base = base
        self.rank = rank
        self.scale = (alpha if alpha is not None else 2 * rank) / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, dtype=w.dtype, device=w.device))
        if not w.is_meta:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the same ops, in the same order, as insert_lora's graph rewrite (so the estimate is this step's)
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Module:
        """The base layer with the update folded into its weight (for inference)."""
        delta = (self.lora_B @ self.lora_A) * self.scale        # [out, in]
        base = copy.deepcopy(self.base)
        with torch.no_grad():
            base.weight += delta if isinstance(base, nn.Linear) else delta.t()
        return base


class NewHead(nn.Linear):
    """A freshly initialised output layer (``attach_classifier``, ``attach_lm_head``): always trains."""


class Classifier(nn.Module):
    """A backbone returning hidden states ``[batch, seq, d]``, pooled, then a ``NewHead``."""

    def __init__(self, backbone: nn.Module, d_model: int, n_classes: int, pool: str):
        super().__init__()
        self.backbone = backbone
        self.pool = pool
        self.head = NewHead(d_model, n_classes)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        hidden = _first_tensor(self.backbone(*args, **kwargs))
        mask = kwargs.get("attention_mask")
        return self.head(_pool(hidden, self.pool, mask))


def attach_classifier(model: nn.Module, n_classes: int, *, pool: str = "mean", head: str | None = None) -> Classifier:
    """Replace a model's output layer by pooling and a new ``n_classes`` classifier.

    The output layer (``head``, or the HF output embeddings, or the last ``nn.Linear`` /
    ``lm_head`` / ``head`` attribute) becomes ``nn.Identity``, so the model returns hidden
    states; those are pooled over the sequence and classified. ``finetune`` always trains
    the new classifier.

    Args:
        model: a sequence model returning ``[batch, seq, d]`` logits (or an HF output with ``.logits``).
        n_classes: number of classes.
        pool: "mean" (over positions, honouring an ``attention_mask`` keyword), "last"
            (last unmasked position, for causal models) or "first" (the [CLS] position).
        head: dotted name of the output layer to replace; None finds it.

    Returns:
        A ``Classifier``; calling it returns ``[batch, n_classes]`` logits.

    Example:
        >>> clf = attach_classifier(TinyGPT(), 3, pool="last")
        >>> clf(torch.randint(0, 1000, (2, 8))).shape
        torch.Size([2, 3])
    """
    if pool not in ("mean", "last", "first"):
        raise ValueError(f"pool={pool!r}; use 'mean', 'last' or 'first'")
    name, layer = _output_layer(model, head)
    d_in, _ = _linear_dims(layer)
    _set_submodule(model, name, nn.Identity())
    clf = Classifier(model, d_in, n_classes, pool)
    return clf.to(device=layer.weight.device, dtype=layer.weight.dtype)


def attach_lm_head(model: nn.Module, vocab_size: int, *, head: str | None = None) -> nn.Module:
    """Give a language model a new, untied output vocabulary of ``vocab_size`` tokens (in place).

    The input embeddings are left alone (a new vocabulary for outputs: new labels, a new
    tokenizer's targets); the new head starts at N(0, 0.02) and ``finetune`` always trains it.

    Returns:
        ``model``, whose output layer is now a ``NewHead(d, vocab_size, bias=False)``.
    """
    name, layer = _output_layer(model, head)
    d_in, _ = _linear_dims(layer)
    new = NewHead(d_in, vocab_size, bias=False).to(device=layer.weight.device, dtype=layer.weight.dtype)
    nn.init.normal_(new.weight, std=0.02)
    _set_submodule(model, name, new)
    return model


def _pool(hidden: torch.Tensor, pool: str, mask: torch.Tensor | None) -> torch.Tensor:
    if pool == "first":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(1) if pool == "mean" else hidden[:, -1]
    mask = mask.to(hidden.dtype)
    if pool == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    last = (mask.sum(1).long() - 1).clamp(min=0)                          # right padding
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def _output_layer(model: nn.Module, name: str | None) -> tuple[str, nn.Module]:
    modules = dict(model.named_modules())
    if name is None and hasattr(model, "get_output_embeddings"):
        out = model.get_output_embeddings()
        name = next((n for n, m in modules.items() if m is out), None) if out is not None else None
    if name is None:
        name = next((n for n in ("lm_head", "head") if isinstance(modules.get(n), nn.Linear)), None)
    if name is None:
        name = next((n for n, m in reversed(modules.items()) if _is_linear(m)), None)
    if name is None or name not in modules or not _is_linear(modules[name]):
        raise ValueError(f"no linear output layer {name!r} in {type(model).__name__}; pass head='<dotted name>'")
    return name, modules[name]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"     # HF GPT-2's transposed linear


def _linear_dims(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features): nn.Linear stores [out, in], HF Conv1D [in, out]."""
    w = m.weight
    return (w.shape[1], w.shape[0]) if isinstance(m, nn.Linear) else (w.shape[0], w.shape[1])


# -- adapters (graph level) --------------------------------------------------------------------

def insert_lora(gm: torch.fx.GraphModule, *, targets: dict[str, tuple[torch.Tensor, torch.Tensor]],
                scale: float) -> torch.fx.GraphModule:
    """Add ``scale * (x @ A.T) @ B.T`` to the output of each target layer of a captured graph.

    Args:
        gm: a captured graph (``capture``) whose nodes carry ``nn_module_stack``.
        targets: module path ("blocks.3.qkv") -> (A ``[r, in]``, B ``[out, r]``) parameters,
            registered on ``gm`` as ``<path>.lora_A`` / ``<path>.lora_B``.
        scale: the update's factor (``alpha / r``).

    Returns:
        ``gm``, rewritten in place and recompiled.
    """
    for path, (a, b) in targets.items():
        inside = [n for n in gm.graph.nodes if n.op == "call_function" and _module_path(n) == path]
        if not inside:
            raise ValueError(f"insert_lora: no node of module {path!r} in the graph")
        members = set(inside)
        x = next(arg for n in inside for arg in n.all_input_nodes if arg not in members and arg.op != "get_attr")
        out = inside[-1]
        _assign(gm, f"{path}.lora_A", a)
        _assign(gm, f"{path}.lora_B", b)
        users = list(out.users)
        with gm.graph.inserting_after(out):
            get_a = gm.graph.get_attr(f"{path}.lora_A")
        with gm.graph.inserting_after(get_a):
            get_b = gm.graph.get_attr(f"{path}.lora_B")
        with gm.graph.inserting_after(get_b):
            down = gm.graph.call_function(torch.ops.aten.linear.default, (x, get_a))
        with gm.graph.inserting_after(down):
            up = gm.graph.call_function(torch.ops.aten.linear.default, (down, get_b))
        with gm.graph.inserting_after(up):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (up, scale))
        with gm.graph.inserting_after(scaled):
            total = gm.graph.call_function(torch.ops.aten.add.Tensor, (out, scaled))
        for node in (get_a, get_b, down, up, scaled, total):
            node.meta["nn_module_stack"] = dict(out.meta.get("nn_module_stack", {}))
        for user in users:
            user.replace_input_with(out, total)
    gm.graph.lint()
    gm.recompile()
    return gm


def _assign(root: nn.Module, target: str, param: torch.Tensor) -> None:
    *parents, attr = target.split(".")
    mod = root
    for part in parents:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    mod.register_parameter(attr, param)


def _copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new graph over the same parameter tensors (a rewrite of the copy leaves ``gm`` alone)."""
    new = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta.update(gm.meta)
    return new


# -- candidates and plan -----------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """What trains: ``n_blocks`` last blocks (all their parameters, or adapters of ``rank``), the head,
    or everything (``full``)."""
    n_blocks: int = 0
    rank: int = 0               # 0: the blocks train in full; > 0: only rank-``rank`` adapters train
    head: bool = True
    full: bool = False
    n_trainable_params: int = 0

    def __post_init__(self):
        if self.n_blocks < 0 or self.rank < 0:
            raise ValueError(f"n_blocks and rank must be >= 0, got {self.n_blocks}, {self.rank}")

    def describe(self) -> str:
        if self.full:
            return "full fine-tuning"
        parts = []
        if self.n_blocks and self.rank:
            parts.append(f"rank-{self.rank} adapters on the last {self.n_blocks} block(s)")
        elif self.n_blocks:
            parts.append(f"the last {self.n_blocks} block(s)")
        if self.head:
            parts.append("the head")
        return " + ".join(parts) or "nothing"


@dataclass(frozen=True)
class FinetunePlan:
    """Result of ``finetune``: what trains, the step's estimate, and the model ready to train."""
    candidate: Candidate
    trainable: tuple[str, ...]
    estimate: Estimate
    full_estimate: Estimate
    module: nn.Module = field(repr=False)
    memory_limit_bytes: int = 0
    n_params: int = 0
    n_costed: int = 0           # candidates estimated during the search

    def __post_init__(self):
        if self.estimate.peak_bytes > self.memory_limit_bytes:
            raise ValueError(f"plan peaks at {self.estimate.peak_bytes} B over its limit {self.memory_limit_bytes} B")

    @property
    def n_trainable_params(self) -> int:
        return self.candidate.n_trainable_params

    def report(self) -> str:
        est, full = self.estimate, self.full_estimate
        rows = [("trainable parameters", format_count(self.n_trainable_params),
                 format_count(self.n_params), f"{self.n_trainable_params / max(self.n_params, 1):.1%}"),
                ("step peak memory", format_bytes(est.peak_bytes), format_bytes(full.peak_bytes),
                 f"{est.peak_bytes / max(full.peak_bytes, 1):.1%}"),
                ("step time", format_seconds(est.time_s), format_seconds(full.time_s),
                 f"{est.time_s / max(full.time_s, 1e-30):.1%}")]
        names = ", ".join(self.trainable[:6]) + (f", ... ({len(self.trainable)} tensors)"
                                                 if len(self.trainable) > 6 else "")
        return "\n".join([
            f"fine-tuning plan: {self.candidate.describe()} "
            f"(limit {format_bytes(self.memory_limit_bytes)}, {est.optimizer or 'no optimizer'}, "
            f"{self.n_costed} candidates costed)",
            "", table(["", "this plan", "full fine-tuning", "ratio"], rows), "", f"trains: {names}"])

    def __str__(self) -> str:
        return self.report()

    def _repr_pretty_(self, p, cycle):  # IPython
        p.text(self.report())

    def to_dict(self) -> dict:
        return {"candidate": self.candidate.__dict__, "trainable": list(self.trainable),
                "peak_bytes": self.estimate.peak_bytes, "full_peak_bytes": self.full_estimate.peak_bytes,
                "time_s": self.estimate.time_s, "full_time_s": self.full_estimate.time_s,
                "memory_limit_bytes": self.memory_limit_bytes, "n_params": self.n_params}


# -- the pass ----------------------------------------------------------------------------------

def finetune(model: nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None, *,
             memory_limit: int, optimizer: str | None = "adamw", loss_fn: Callable | None = None,
             ranks: tuple[int, ...] = RANKS, device=None) -> FinetunePlan:
    """Choose what trains (last blocks, head, low-rank adapters) so a training step fits ``memory_limit``.

    Every candidate is costed with ``estimate(..., training=True, optimizer=optimizer)`` on one
    capture of ``model``; the one training the most parameters within the limit is applied to
    ``model`` in place: frozen parameters get ``requires_grad=False``, adapted layers become
    ``LoRALinear`` (outputs unchanged until the adapters train).

    Args:
        model: an ``nn.Module`` (possibly from ``attach_classifier`` / ``attach_lm_head``).
        example_inputs, example_kwargs: the training batch.
        memory_limit: bytes the step may peak at (parameters, gradients, optimizer state,
            activations, temporaries), as ``estimate`` computes it.
        optimizer: "adamw", "sgd" or None.
        loss_fn: reduces the model's outputs to the loss; None sums floating-point outputs.
        ranks: adapter ranks to consider.
        device: device spec for the estimate's times (None: this machine).

    Returns:
        A ``FinetunePlan``.

    Raises:
        ValueError: no candidate fits; the message names the smallest reachable peak.

    Example:
        >>> model, inputs = tiny_gpt()
        >>> full = estimate(model, inputs, training=True, optimizer="adamw").peak_bytes
        >>> plan = finetune(model, inputs, memory_limit=full // 2)
        >>> plan.estimate.peak_bytes <= full // 2
        True
    """
    if not isinstance(model, nn.Module) or isinstance(model, torch.fx.GraphModule):
        raise TypeError(f"finetune() needs the eager nn.Module (it returns it ready to train), "
                        f"got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs, example_kwargs)
    search = _Search(model, args, kwargs, optimizer=optimizer, loss_fn=loss_fn, device=device,
                     ranks=tuple(sorted(ranks)))
    try:
        best, est = search.best(int(memory_limit))
        full_est = search.cost(search.full)
    finally:
        search.restore()
    _apply(model, search, best)
    trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    return FinetunePlan(best, trainable, est, full_est, model, int(memory_limit),
                        search.n_params, len(search.costs))


class _Search:
    """The candidates of one model and their estimates (cached), all on one capture."""

    def __init__(self, model, args, kwargs, *, optimizer, loss_fn, device, ranks):
        self.args, self.kwargs = args, kwargs
        self.options = dict(training=True, optimizer=optimizer, loss_fn=loss_fn, device=device)
        self.params = dict(model.named_parameters())                 # deduplicated: tied weights once
        self.saved_flags = {n: p.requires_grad for n, p in self.params.items()}
        self.n_params = sum(p.numel() for p in self.params.values())
        self.gm = capture(model, args, kwargs)
        self.blocks = _repeated_blocks(model)
        self.n_blocks = n_blocks = len(self.blocks)
        self.block_params, self.head_params = _groups(self.gm, self.params, self.blocks)
        self.new_head = any(isinstance(m, NewHead) for m in model.modules())
        self.linears = [[(_join(block, n), _linear_dims(m))
                         for n, m in model.get_submodule(block).named_modules() if _is_linear(m)]
                        for block in self.blocks]
        self.ranks = tuple(r for r in ranks if all(r < min(d) for blk in self.linears for _, d in blk)) or ranks[:1]
        self.full = Candidate(full=True, n_blocks=n_blocks, n_trainable_params=self.n_params)
        self.costs: dict[Candidate, Estimate] = {}

    def restore(self) -> None:
        for n, p in self.params.items():
            p.requires_grad_(self.saved_flags[n])

    # candidates
    def suffix(self, k: int) -> Candidate:
        n = sum(self.params[p].numel() for p in self.trained_names(k, 0, True))
        return Candidate(n_blocks=k, head=True, n_trainable_params=n)

    def lora(self, k: int, r: int, head: bool) -> Candidate:
        n = sum(r * (d_in + d_out) for blk in self.linears[self.n_blocks - k:] for _, (d_in, d_out) in blk)
        n += sum(self.params[p].numel() for p in self.head_params) if head else 0
        return Candidate(n_blocks=k, rank=r, head=head, n_trainable_params=n)

    def trained_names(self, k: int, rank: int, head: bool) -> set[str]:
        names = set(self.head_params) if head else set()
        if not rank:
            for i in range(self.n_blocks - k, self.n_blocks):
                names |= self.block_params[i]
        return names

    # costing
    def cost(self, cand: Candidate) -> Estimate:
        if cand not in self.costs:
            trained = set(self.params) if cand.full else self.trained_names(cand.n_blocks, cand.rank, cand.head)
            for n, p in self.params.items():
                p.requires_grad_(n in trained)
            gm = self.gm
            if cand.rank:
                gm = _copy_graph_module(self.gm)
                insert_lora(gm, targets=self._adapters(cand), scale=2.0)
            self.costs[cand] = estimate(gm, self.args, self.kwargs, **self.options)
        return self.costs[cand]

    def _adapters(self, cand: Candidate) -> dict:
        some = next(iter(self.params.values()))
        targets = {}
        for blk in self.linears[self.n_blocks - cand.n_blocks:]:
            for path, (d_in, d_out) in blk:
                targets[path] = (nn.Parameter(torch.zeros(cand.rank, d_in, dtype=some.dtype, device=some.device)),
                                 nn.Parameter(torch.zeros(d_out, cand.rank, dtype=some.dtype, device=some.device)))
        return targets

    def fits(self, cand: Candidate, limit: int) -> bool:
        return self.cost(cand).peak_bytes <= limit

    # search
    def best(self, limit: int) -> tuple[Candidate, Estimate]:
        head_only = self.suffix(0)
        head_fits = bool(self.head_params) and self.fits(head_only, limit)
        ladder = [head_only] + [self.suffix(k) for k in range(1, self.n_blocks + 1)] + [self.full]
        best = _last_fitting(ladder, lambda c: self.fits(c, limit)) if head_fits else None
        if self.n_blocks and (head_fits or not self.new_head):
            best = self._lora_frontier(limit, head=head_fits, best=best)
        if best is None:
            raise ValueError(self._nothing_fits(limit))
        return best, self.cost(best)

    def _lora_frontier(self, limit: int, *, head: bool, best: Candidate | None) -> Candidate | None:
        """Walk the staircase of the largest fitting rank per number of adapted blocks (it only falls
        as blocks are added), costing only candidates that would train more than ``best``."""
        top = len(self.ranks) - 1
        for k in range(1, self.n_blocks + 1):
            while top >= 0:
                cand = self.lora(k, self.ranks[top], head)
                if best is not None and cand.n_trainable_params <= best.n_trainable_params:
                    break                   # this rank and every smaller one train no more than best
                if self.fits(cand, limit):
                    best = cand
                    break
                top -= 1
            if top < 0:
                break
        return best

    def _nothing_fits(self, limit: int) -> str:
        smallest = []
        if self.head_params:
            smallest.append(self.suffix(0))
        if self.n_blocks:
            smallest.append(self.lora(1, self.ranks[0], head=False) if not self.new_head
                            else self.lora(1, self.ranks[0], head=True))
        if not smallest:
            smallest.append(self.full)
        cand = min(smallest, key=lambda c: self.cost(c).peak_bytes)
        return (f"finetune: no candidate fits memory_limit={limit} B ({format_bytes(limit)}); the smallest "
                f"reachable step peaks at {self.cost(cand).peak_bytes} B ({format_bytes(self.cost(cand).peak_bytes)}) "
                f"training {cand.describe()}. Raise memory_limit, shrink the batch, or use recompute()")


def _last_fitting(ladder: list[Candidate], fits: Callable[[Candidate], bool]) -> Candidate | None:
    """Binary search on a ladder whose peak memory only grows."""
    lo, hi = 0, len(ladder) - 1
    if not fits(ladder[lo]):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(ladder[mid]) else (lo, mid - 1)
    return ladder[lo]


def _repeated_blocks(model: nn.Module) -> list[str]:
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
    nodes = list(gm.graph.nodes)
    for i, node in enumerate(nodes):
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


def _apply(model: nn.Module, search: _Search, cand: Candidate) -> None:
    """Make ``model`` train what ``cand`` says: flags on parameters, adapters around linear layers."""
    trained = set(search.params) if cand.full else search.trained_names(cand.n_blocks, cand.rank, cand.head)
    for n, p in search.params.items():
        p.requires_grad_(n in trained)
    if cand.rank:
        for blk in search.linears[search.n_blocks - cand.n_blocks:]:
            for path, _ in blk:
                _set_submodule(model, path, LoRALinear(model.get_submodule(path), cand.rank))
