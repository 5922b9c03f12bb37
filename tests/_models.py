"""The partitioner tests' models: the registry's (``passes.zoo``) at small sizes, all in eval mode.

``MODELS[name]()`` returns a ``Case`` (unpacks as ``model, args, kwargs``); ``device="meta"``
builds the same model with no weights.
"""
from __future__ import annotations

import functools

from passes import zoo

# name -> (registry model, sizes)
_SIZES = {
    "gpt2": ("gpt2", {}),
    "bert": ("bert", {}),
    "llama": ("llama", {}),
    "t5": ("t5", {}),
    "vit": ("vit", {}),
    "small_cnn": ("small_cnn", dict(batch=2, size=16)),
    "mlp": ("mlp", dict(depth=8, width=64, batch=8)),
    "moe": ("moe", dict(batch=2, seq=8, d_model=32)),
}


def _make(name: str, device: str = "cpu", **sizes) -> zoo.Case:
    model, defaults = _SIZES[name]
    case = zoo.make(model, device, **{**defaults, **sizes})
    case.model.eval()
    return case


MODELS = {name: functools.partial(_make, name) for name in _SIZES}
gpt2, bert, llama = MODELS["gpt2"], MODELS["bert"], MODELS["llama"]
