"""Low-rank adapters and task heads for fine-tuning, as modules and as a graph rewrite.

Reads a model (or a captured graph); writes new modules into it: ``LoRALinear`` around a
linear layer (``nn.Linear`` or Hugging Face ``Conv1D``), a new classifier or LM output
layer (``attach_classifier``, ``attach_lm_head``); ``insert_lora`` adds the same update to a
captured graph, so the cost model prices exactly the step the module will run.
"""
from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .estimate import _module_path

__all__ = ["LoRALinear", "NewHead", "Classifier", "attach_classifier", "attach_lm_head", "insert_lora",
           "is_linear", "linear_dims", "set_submodule", "copy_graph_module"]


# -- adapters and heads (module level) ---------------------------------------------------------

class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))``: a frozen linear layer (``nn.Linear`` or HF ``Conv1D``) and a
    trainable low-rank update. ``B`` starts at zero, so the output starts unchanged."""

    def __init__(self, base: nn.Module, rank: int, *, alpha: float | None = None):
        super().__init__()
        d_in, d_out = linear_dims(base)
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
    d_in, _ = linear_dims(layer)
    set_submodule(model, name, nn.Identity())
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
    d_in, _ = linear_dims(layer)
    new = NewHead(d_in, vocab_size, bias=False).to(device=layer.weight.device, dtype=layer.weight.dtype)
    nn.init.normal_(new.weight, std=0.02)
    set_submodule(model, name, new)
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
        name = next((n for n, m in reversed(modules.items()) if is_linear(m)), None)
    if name is None or name not in modules or not is_linear(modules[name]):
        raise ValueError(f"no linear output layer {name!r} in {type(model).__name__}; pass head='<dotted name>'")
    return name, modules[name]


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"     # HF GPT-2's transposed linear


def linear_dims(m: nn.Module) -> tuple[int, int]:
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


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new graph over the same parameter tensors (a rewrite of the copy leaves ``gm`` alone)."""
    new = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta.update(gm.meta)
    return new
