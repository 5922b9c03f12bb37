"""Hugging Face models built from small configs with random weights (no downloads).

Every factory takes ``device`` and sizes as keywords and returns a ``Case``. Models are in
eval mode with every dropout probability 0 and eager attention (``FlopCounterMode`` sees no
fused kernel on the CPU) unless ``attn="sdpa"`` or ``dropout`` say otherwise. Weights are
seeded, so two calls build the same model. Needs ``transformers`` (the ``hf`` extra).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .case import Case, build, token_ids

__all__ = ["gpt2", "bert", "llama", "t5", "vit"]


def _build(device: str, make: Callable[[], nn.Module]) -> nn.Module:
    return build(device, make).eval()


def gpt2(device: str = "cpu", *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, seq: int = 16,
         batch: int = 2, vocab: int = 1000, attn: str = "eager", dropout: float = 0.0,
         n_positions: int | None = None) -> Case:
    """GPT-2 with its LM head tied to the token embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                        n_positions=n_positions or max(seq, 1024), resid_pdrop=dropout, embd_pdrop=dropout,
                        attn_pdrop=dropout, bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    model = _build(device, lambda: GPT2LMHeadModel(config))
    return Case(f"gpt2_{attn}", model, (token_ids(batch, seq, vocab, device),), {"use_cache": False})


def bert(device: str = "cpu", *, seq: int = 16, batch: int = 2, hidden: int = 64, vocab: int = 1000) -> Case:
    """BERT with its masked-LM head and an attention mask; 2 layers, 4 heads."""
    from transformers import BertConfig, BertForMaskedLM
    config = BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden,
                        vocab_size=vocab, max_position_embeddings=max(seq, 64), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = _build(device, lambda: BertForMaskedLM(config))
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    return Case("bert", model, (token_ids(batch, seq, vocab, device),), {"attention_mask": mask})


def llama(device: str = "cpu", *, seq: int = 16, batch: int = 2, hidden: int = 64, n_layers: int = 2,
          n_heads: int = 4, n_kv_heads: int = 2, vocab: int = 1000, attn: str = "eager") -> Case:
    """Llama with grouped KV heads (4 query heads share 2 KV heads by default)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=n_layers,
                         num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, vocab_size=vocab,
                         max_position_embeddings=max(seq, 256), attention_dropout=0.0, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0, attn_implementation=attn)
    model = _build(device, lambda: LlamaForCausalLM(config))
    return Case("llama", model, (token_ids(batch, seq, vocab, device),), {"use_cache": False})


def t5(device: str = "cpu", *, seq: int = 16, decoder_seq: int | None = None, batch: int = 2,
       vocab: int = 1000) -> Case:
    """T5 encoder-decoder (2 + 2 layers, d=64, 4 heads) with ``decoder_input_ids`` as a keyword."""
    from transformers import T5Config, T5ForConditionalGeneration
    config = T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                      vocab_size=vocab, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1, attn_implementation="eager")
    model = _build(device, lambda: T5ForConditionalGeneration(config))
    kwargs = {"decoder_input_ids": token_ids(batch, decoder_seq or seq // 2, vocab, device), "use_cache": False}
    return Case("t5", model, (token_ids(batch, seq, vocab, device),), kwargs)


def vit(device: str = "cpu", *, image_size: int = 32, batch: int = 2) -> Case:
    """ViT classifier on images in 8x8 patches; 2 layers, d=64, 4 heads, 10 labels."""
    from transformers import ViTConfig, ViTForImageClassification
    config = ViTConfig(image_size=image_size, patch_size=8, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = _build(device, lambda: ViTForImageClassification(config))
    torch.manual_seed(1)
    images = torch.randn(batch, 3, image_size, image_size).to(device)
    return Case("vit", model, (images,))
