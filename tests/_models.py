"""Tiny models for the partitioner tests: Hugging Face configs with random weights, no downloads.

Every factory returns ``(model, args, kwargs)`` with the model in eval mode (dropout 0) and
seeded weights, so two calls build the same model. ``device="meta"`` builds it on the meta
device (no weights) with inputs there too.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from passes import zoo

BATCH = 2
VOCAB = 1000


def _ids(seq: int, device: str = "cpu") -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, seq)).to(device)


def _build(make: Callable[[], nn.Module], device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    with torch.device(device):
        model = make()
    return model.eval()


def gpt2(device: str = "cpu", seq: int = 16):
    """GPT-2 with its LM head tied to the token embedding; 2 layers, d=64."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=seq, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    return _build(lambda: GPT2LMHeadModel(config), device), (_ids(seq, device),), {"use_cache": False}


def bert(device: str = "cpu", seq: int = 16):
    """BERT with its masked-LM head and an attention mask; 2 layers, d=64."""
    from transformers import BertConfig, BertForMaskedLM
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=VOCAB, max_position_embeddings=seq, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    mask = torch.ones(BATCH, seq, dtype=torch.long, device=device)
    return _build(lambda: BertForMaskedLM(config), device), (_ids(seq, device),), {"attention_mask": mask}


def llama(device: str = "cpu", seq: int = 16, hidden: int = 64):
    """Llama with grouped KV heads (4 query heads, 2 KV heads); 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                         max_position_embeddings=seq, attention_dropout=0.0, attn_implementation="eager")
    return _build(lambda: LlamaForCausalLM(config), device), (_ids(seq, device),), {"use_cache": False}


def t5(device: str = "cpu", seq: int = 16):
    """T5 encoder-decoder (2 + 2 layers, d=64) with ``decoder_input_ids`` as a keyword."""
    from transformers import T5Config, T5ForConditionalGeneration
    config = T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                      vocab_size=VOCAB, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                      attn_implementation="eager")
    kwargs = {"decoder_input_ids": _ids(seq // 2, device), "use_cache": False}
    return _build(lambda: T5ForConditionalGeneration(config), device), (_ids(seq, device),), kwargs


def vit(device: str = "cpu"):
    """ViT classifier on 32x32 images in 8x8 patches; 2 layers, d=64."""
    from transformers import ViTConfig, ViTForImageClassification
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, attn_implementation="eager")
    images = torch.randn(BATCH, 3, 32, 32).to(device)
    return _build(lambda: ViTForImageClassification(config), device), (images,), {}


def _zoo(factory: Callable, **sizes):
    torch.manual_seed(0)
    model, inputs = factory(**sizes)
    return model.eval(), inputs, {}


MODELS: dict[str, Callable] = {
    "gpt2": gpt2,
    "bert": bert,
    "llama": llama,
    "t5": t5,
    "vit": vit,
    "small_cnn": lambda: _zoo(zoo.small_cnn, batch=2, size=16),
    "mlp": lambda: _zoo(zoo.mlp, depth=8, width=64, batch=8),
    "moe": lambda: _zoo(zoo.moe, batch=2, seq=8, d_model=32),
}
