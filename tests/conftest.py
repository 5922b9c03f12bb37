"""Small models for the tests, from the one registry (``passes.zoo``), with random weights.

``MODELS`` maps a short name to a factory ``(device="cpu") -> Case`` at the sizes the cost
tests use (the GPT-2 is ANCHORS.md's: 2 layers, d=128, 4 heads, vocab 1000, batch 2, seq 64).
Hugging Face models are in eval mode with every dropout probability 0 and eager attention
(``FlopCounterMode`` sees no fused kernel on the CPU), except ``gpt2_sdpa``; ``small_cnn``'s
BatchNorm uses batch statistics (train mode). ``device="meta"`` builds the same model with no
weights. The ``case_name`` fixture runs a test once per model, and the session-wide
``captured`` and ``estimates`` fixtures capture and cost each model once (capture is the slow
part of the suite).
"""
from __future__ import annotations

import functools

import pytest
import torch

from passes import capture, estimate, zoo
from passes.zoo import Case

__all__ = ["Case", "MODELS", "make_case", "gpt2"]

# name -> (registry model, sizes)
_SIZES = {
    "gpt2_eager": ("gpt2", dict(n_embd=128, seq=64)),
    "gpt2_sdpa": ("gpt2_sdpa", dict(n_embd=128, seq=64)),
    "bert": ("bert", dict(seq=32)),
    "llama": ("llama", dict(seq=32)),
    "t5": ("t5", dict(seq=32, decoder_seq=16)),
    "vit": ("vit", {}),
    "small_cnn": ("small_cnn", dict(batch=2, size=16)),
    "mlp": ("mlp", dict(depth=4, width=128, batch=16)),
    "moe": ("moe", dict(batch=2, seq=16, d_model=64, n_experts=4)),
}


def _factory(name: str):
    model, sizes = _SIZES[name]
    return functools.partial(zoo.make, model, **sizes)


MODELS = {name: _factory(name) for name in _SIZES}


def gpt2(device: str = "cpu", *, attn: str = "eager") -> Case:
    """The cost suite's GPT-2 with the given attention implementation."""
    return zoo.make("gpt2", device, attn=attn, n_embd=128, seq=64)


def make_case(name: str, device: str = "cpu") -> Case:
    """A fresh model of ``MODELS[name]`` (seeded weights) with its example batch."""
    return MODELS[name](device)


@pytest.fixture(params=list(MODELS))
def case_name(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def captured():
    """``captured(name) -> (case, gm)``: each model captured once per session (do not train ``case.model``),
    with static shapes as ``estimate(model)`` captures it, so the two cost the same graph."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            case = make_case(name)
            cache[name] = case, capture(case.model, case.args, case.kwargs, dynamic=False)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def estimates(captured):
    """``estimates(name, training=...) -> Estimate`` of the captured graph; training means an AdamW step."""
    cache: dict = {}

    def get(name: str, *, training: bool):
        if (name, training) not in cache:
            case, gm = captured(name)
            cache[name, training] = estimate(gm, case.args, case.kwargs, training=training,
                                             optimizer="adamw" if training else None)
        return cache[name, training]
    return get


@pytest.fixture(scope="session")
def module_estimates():
    """``module_estimates(name, training=...) -> Estimate`` of the model itself (its peak: the eager forward's)."""
    cache: dict = {}

    def get(name: str, *, training: bool):
        if (name, training) not in cache:
            case = make_case(name)
            cache[name, training] = estimate(case.model, case.args, case.kwargs, training=training,
                                             optimizer="adamw" if training else None)
        return cache[name, training]
    return get


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on a small shared machine: OpenMP threads waiting for each other cost more than the work.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)
