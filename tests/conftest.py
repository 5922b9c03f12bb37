"""Small models for the tests, built from configs with random weights (no downloads).

Every factory returns a fresh ``Case`` with seeded weights and inputs: the model, its
positional inputs and its keyword inputs. Hugging Face models are in eval mode with every
dropout probability 0 and eager attention (``FlopCounterMode`` sees no fused kernel on the
CPU), except ``gpt2_sdpa``; ``passes.zoo`` models are as built (``small_cnn``'s BatchNorm
uses batch statistics). ``device="meta"`` builds
the same model on the meta device (no weights), for planning without memory.
``MODELS`` maps a short name to its factory; the ``case_name`` fixture runs a test
once per model, and the session-wide ``captured`` and ``estimates`` fixtures capture and
cost each model once (capture is the slow part of the suite).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

from passes import capture, estimate, zoo

BATCH = 2
VOCAB = 1000


@dataclass
class Case:
    """A model and an example batch: ``model(*args, **kwargs)``."""
    name: str
    model: nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def __call__(self):
        return self.model(*self.args, **self.kwargs)


def _ids(seq: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, seq))


def _build(device: str, make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = make()
    return model.eval()


def gpt2(device: str = "cpu", *, attn: str = "eager", seq: int = 64) -> Case:
    """GPT-2 with a tied embedding and head: 2 layers, d=128, 4 heads (the ANCHORS.md model)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=VOCAB,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        attn_implementation=attn)
    model = _build(device, lambda: GPT2LMHeadModel(config))
    return Case(f"gpt2_{attn}", model, (_ids(seq),), {"use_cache": False})


def bert(device: str = "cpu", *, seq: int = 32) -> Case:
    """BERT with its masked-LM head: 2 layers, d=64, 4 heads."""
    from transformers import BertConfig, BertForMaskedLM
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=VOCAB, max_position_embeddings=seq, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = _build(device, lambda: BertForMaskedLM(config))
    return Case("bert", model, (_ids(seq),), {"attention_mask": torch.ones(BATCH, seq, dtype=torch.long)})


def llama(device: str = "cpu", *, seq: int = 32) -> Case:
    """Llama with grouped KV heads (4 query heads share 2 KV heads): 2 layers, d=64."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=seq,
                         attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0,
                         attn_implementation="eager")
    model = _build(device, lambda: LlamaForCausalLM(config))
    return Case("llama", model, (_ids(seq),), {"use_cache": False})


def t5(device: str = "cpu", *, seq: int = 32, decoder_seq: int = 16) -> Case:
    """T5 encoder-decoder: 2 + 2 layers, d=64, 4 heads; ``decoder_input_ids`` as a keyword."""
    from transformers import T5Config, T5ForConditionalGeneration
    config = T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                      vocab_size=VOCAB, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1, attn_implementation="eager")
    model = _build(device, lambda: T5ForConditionalGeneration(config))
    return Case("t5", model, (_ids(seq),), {"decoder_input_ids": _ids(decoder_seq), "use_cache": False})


def vit(device: str = "cpu", *, image_size: int = 32) -> Case:
    """ViT classifier: 32x32 images in 8x8 patches, 2 layers, d=64, 4 heads."""
    from transformers import ViTConfig, ViTForImageClassification
    config = ViTConfig(image_size=image_size, patch_size=8, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = _build(device, lambda: ViTForImageClassification(config))
    return Case("vit", model, (torch.randn(BATCH, 3, image_size, image_size),))


def _zoo(name: str, factory: Callable, device: str, **sizes) -> Case:
    """A ``passes.zoo`` model and its inputs, both made on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):
        model, inputs = factory(**sizes)
    return Case(name, model, inputs)


def small_cnn(device: str = "cpu") -> Case:
    """``zoo.small_cnn``: conv + BatchNorm residual blocks (train mode: batch statistics)."""
    return _zoo("small_cnn", zoo.small_cnn, device, batch=BATCH, size=16)


def mlp(device: str = "cpu") -> Case:
    """``zoo.mlp``: 4 x (Linear + GELU), width 128."""
    return _zoo("mlp", zoo.mlp, device, depth=4, width=128, batch=16)


def moe(device: str = "cpu") -> Case:
    """``zoo.moe``: a top-2 of 4 experts feed-forward layer, d=64."""
    return _zoo("moe", zoo.moe, device, batch=BATCH, seq=16, d_model=64, n_experts=4)


MODELS: dict[str, Callable[..., Case]] = {
    "gpt2_eager": gpt2,
    "gpt2_sdpa": lambda device="cpu": gpt2(device, attn="sdpa"),
    "bert": bert,
    "llama": llama,
    "t5": t5,
    "vit": vit,
    "small_cnn": small_cnn,
    "mlp": mlp,
    "moe": moe,
}


def make_case(name: str, device: str = "cpu") -> Case:
    """A fresh model of ``MODELS[name]`` (seeded weights) with its example batch."""
    return MODELS[name](device)


@pytest.fixture(params=list(MODELS))
def case_name(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def captured():
    """``captured(name) -> (case, gm)``: each model captured once per session (do not train ``case.model``)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            case = make_case(name)
            cache[name] = case, capture(case.model, case.args, case.kwargs)
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
