"""Models for demos, tests and benchmarks: one registry, no downloads.

Built-in models (``TinyGPT``, ``mlp``, ``MoE``, ``small_cnn``) need nothing beyond torch;
their factories return ``(model, example_inputs)``. ``MODELS`` maps a short name to a
factory ``(device="cpu", **sizes) -> Case`` over both the built-in models and Hugging Face
families built from small configs (``transformers`` needed for those). ``make(name)``
builds one; ``device="meta"`` builds it with no weights, for planning.

>>> case = make("mlp", depth=2, width=16, batch=4)
>>> tuple(case().shape)
(4, 16)
"""
from __future__ import annotations

from typing import Callable

import torch

from . import hf
from .builtin import MoE, TinyGPT, mlp, moe, small_cnn, tiny_gpt
from .case import Case, build
from .families import ListMoE, MHAViT, list_moe, mha_vit

__all__ = ["TinyGPT", "tiny_gpt", "mlp", "MoE", "moe", "small_cnn", "MHAViT", "mha_vit", "ListMoE", "list_moe", "Case",
           "MODELS", "make"]


def _builtin(name: str, factory: Callable, *, train: bool = False):
    def make_case(device: str = "cpu", **sizes) -> Case:
        torch.manual_seed(0)
        with torch.device(device):
            model, inputs = factory(**sizes)
        return Case(name, model if train else model.eval(), tuple(inputs))
    make_case.__doc__ = factory.__doc__
    return make_case


MODELS: dict[str, Callable[..., Case]] = {
    "gpt2": hf.gpt2,
    "gpt2_sdpa": lambda device="cpu", **sizes: hf.gpt2(device, attn="sdpa", **sizes),
    "bert": hf.bert,
    "llama": hf.llama,
    "t5": hf.t5,
    "vit": hf.vit,
    **{name: getattr(hf, name) for name in ("mistral", "qwen2", "gemma", "phi3", "falcon", "mixtral", "qwen2_moe", "gptj",
                                            "gpt_neox", "bloom", "opt", "deberta", "bart", "whisper", "resnet")},
    "tiny_gpt": _builtin("tiny_gpt", tiny_gpt),
    "mlp": _builtin("mlp", mlp),
    "moe": _builtin("moe", moe),
    "small_cnn": _builtin("small_cnn", small_cnn, train=True),   # BatchNorm uses batch statistics
    "mha_vit": _builtin("mha_vit", mha_vit),
    "list_moe": _builtin("list_moe", list_moe),
}


def make(name: str, device: str = "cpu", **sizes) -> Case:
    """A fresh, seeded ``Case`` of the registry's model ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in MODELS:
        raise ValueError(f"no model {name!r} in the zoo; known: {sorted(MODELS)}")
    return MODELS[name](device, **sizes)
