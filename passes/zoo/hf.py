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

__all__ = ["gpt2", "bert", "llama", "t5", "vit", "mistral", "qwen2", "gemma", "phi3", "falcon", "mixtral",
           "qwen2_moe", "gptj", "gpt_neox", "bloom", "opt", "deberta", "bart", "whisper", "resnet"]


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


# -- the families people train (tensor-plan anchors): tiny configs, random weights ------------------

def _lm(name: str, config_cls: str, model_cls: str, device: str, *, seq: int, batch: int, vocab: int,
        **config) -> Case:
    """A causal LM ``model_cls`` from ``config_cls(**config)`` on a batch of token ids."""
    import transformers
    config = getattr(transformers, config_cls)(vocab_size=vocab, attn_implementation=config.pop("attn", "eager"),
                                               **config)
    model = _build(device, lambda: getattr(transformers, model_cls)(config))
    return Case(name, model, (token_ids(batch, seq, vocab, device),), {"use_cache": False})


_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=64, attention_dropout=0.0, bos_token_id=0, eos_token_id=0,
                   pad_token_id=0)


def mistral(device: str = "cpu", *, seq: int = 16, batch: int = 2, vocab: int = 1000, n_kv_heads: int = 2,
            attn: str = "eager") -> Case:
    """Mistral: grouped KV heads (4 query heads share 2 KV heads), untied head."""
    return _lm("mistral", "MistralConfig", "MistralForCausalLM", device, seq=seq, batch=batch, vocab=vocab,
               num_key_value_heads=n_kv_heads, attn=attn, **_LLAMA_LIKE)


def qwen2(device: str = "cpu", *, seq: int = 16, batch: int = 2, vocab: int = 1000, n_kv_heads: int = 2,
          tie: bool = False) -> Case:
    """Qwen2: grouped KV heads with q/k/v biases; ``tie=True`` ties the head (the small Qwen2 models)."""
    return _lm("qwen2", "Qwen2Config", "Qwen2ForCausalLM", device, seq=seq, batch=batch, vocab=vocab,
               num_key_value_heads=n_kv_heads, tie_word_embeddings=tie, **_LLAMA_LIKE)


def gemma(device: str = "cpu", *, seq: int = 16, batch: int = 2, vocab: int = 1000, n_kv_heads: int = 2) -> Case:
    """Gemma: grouped KV heads, embedding scaled by sqrt(d), LM head tied to the embedding."""
    return _lm("gemma", "GemmaConfig", "GemmaForCausalLM", device, seq=seq, batch=batch, vocab=vocab,
               num_key_value_heads=n_kv_heads, head_dim=16, **_LLAMA_LIKE)


def phi3(device: str = "cpu", *, seq: int = 16, batch: int = 2, vocab: int = 1000, n_kv_heads: int = 4) -> Case:
    """Phi-3: fused ``qkv_proj`` (sliced into q, k, v) and fused ``gate_up_proj`` (chunked)."""
    return _lm("phi3", "Phi3Config", "Phi3ForCausalLM", device, seq=seq, batch=batch, vocab=vocab,
               num_key_value_heads=n_kv_heads, resid_pdrop=0.0, embd_pdrop=0.0,
               **{k: v for k, v in _LLAMA_LIKE.items() if k != "eos_token_id"}, eos_token_id=0)


def falcon(device: str = "cpu", *, seq: int = 16, batch: int = 2, vocab: int = 1000,
           new_decoder_architecture: bool = False) -> Case:
    """Falcon: fused query_key_value, multi-query attention, head tied to the embedding (``x @ W.T`` in the
    head); ``new_decoder_architecture=True`` is Falcon-40B's grouped layout."""
    extra = dict(num_kv_heads=4) if new_decoder_architecture else {}
    return _lm("falcon", "FalconConfig", "FalconForCausalLM", device, seq=seq, batch=batch, vocab=vocab,
               hidden_size=64, num_hidden_layers=2, num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0,
               new_decoder_architecture=new_decoder_architecture, bos_token_id=0, eos_token_id=0,
               max_position_embeddings=64, **extra)


def mixtral(device: str = "cpu", *, seq: int = 16, batch: int = 2, vocab: int = 1000, n_experts: int = 4,
            experts: str | None = None) -> Case:
    """Mixtral: 4 experts, top-2 routing, 2 KV heads. ``experts="batched_mm"`` runs the experts as batched
    matmuls on ``W[expert_ids]``; the default (grouped) path captures them as ``transformers::grouped_mm_fallback``."""
    extra = {"experts_implementation": experts} if experts else {}
    return _lm("mixtral", "MixtralConfig", "MixtralForCausalLM", device, seq=seq, batch=batch, vocab=vocab,
               num_key_value_heads=2, num_local_experts=n_experts, num_experts_per_tok=2, router_jitter_noise=0.0,
               **_LLAMA_LIKE, **extra)


def qwen2_moe(device: str = "cpu", *, seq: int = 16, batch: int = 2, vocab: int = 1000, n_experts: int = 4,
              experts: str | None = None) -> Case:
    """Qwen2-MoE: 4 routed experts (top-2) and a shared expert scaled by a 1-output sigmoid gate."""
    extra = {"experts_implementation": experts} if experts else {}
    return _lm("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", device, seq=seq, batch=batch, vocab=vocab,
               num_key_value_heads=2, num_experts=n_experts, num_experts_per_tok=2, moe_intermediate_size=32,
               shared_expert_intermediate_size=128, **_LLAMA_LIKE, **extra)


def gptj(device: str = "cpu", *, seq: int = 16, batch: int = 2, vocab: int = 1000) -> Case:
    """GPT-J: parallel attention and MLP on one LayerNorm output, rotary code with ``stack``, untied head."""
    return _lm("gptj", "GPTJConfig", "GPTJForCausalLM", device, seq=seq, batch=batch, vocab=vocab, n_embd=64,
               n_layer=2, n_head=4, rotary_dim=8, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
               bos_token_id=0, eos_token_id=0)


def gpt_neox(device: str = "cpu", *, seq: int = 16, batch: int = 2, vocab: int = 1000) -> Case:
    """GPT-NeoX (Pythia): fused query_key_value viewed per head and chunked into q, k, v; untied head."""
    return _lm("gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", device, seq=seq, batch=batch, vocab=vocab,
               hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=64, attention_dropout=0.0, hidden_dropout=0.0, bos_token_id=0, eos_token_id=0)


def bloom(device: str = "cpu", *, seq: int = 16, batch: int = 2, vocab: int = 1000) -> Case:
    """Bloom: ALiBi attention through ``baddbmm``, fused query_key_value, head tied to the embedding."""
    return _lm("bloom", "BloomConfig", "BloomForCausalLM", device, seq=seq, batch=batch, vocab=vocab, hidden_size=64,
               n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0, eos_token_id=0)


def opt(device: str = "cpu", *, seq: int = 16, batch: int = 2, vocab: int = 1000) -> Case:
    """OPT: learned positions, head tied to the embedding."""
    return _lm("opt", "OPTConfig", "OPTForCausalLM", device, seq=seq, batch=batch, vocab=vocab, hidden_size=64,
               num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, max_position_embeddings=64, dropout=0.0,
               attention_dropout=0.0, word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0, pad_token_id=1)


def deberta(device: str = "cpu", *, seq: int = 16, batch: int = 2, vocab: int = 1000) -> Case:
    """DeBERTa-v2 masked LM: disentangled relative attention (``gather`` of position scores), tied head."""
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM
    config = DebertaV2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             max_position_embeddings=64, relative_attention=True, position_buckets=16,
                             max_relative_positions=32, pos_att_type=["p2c", "c2p"], pad_token_id=0)
    model = _build(device, lambda: DebertaV2ForMaskedLM(config))
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    return Case("deberta", model, (token_ids(batch, seq, vocab, device),), {"attention_mask": mask})


def bart(device: str = "cpu", *, seq: int = 16, decoder_seq: int = 8, batch: int = 2, vocab: int = 1000) -> Case:
    """Bart encoder-decoder (2 + 2 layers, d=64, 4 heads): cross-attention on the encoder output, tied head."""
    from transformers import BartConfig, BartForConditionalGeneration
    config = BartConfig(vocab_size=vocab, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                        attn_implementation="eager")
    model = _build(device, lambda: BartForConditionalGeneration(config))
    kwargs = {"decoder_input_ids": token_ids(batch, decoder_seq, vocab, device), "use_cache": False}
    return Case("bart", model, (token_ids(batch, seq, vocab, device),), kwargs)


def whisper(device: str = "cpu", *, frames: int = 32, decoder_seq: int = 8, batch: int = 2, vocab: int = 1000) -> Case:
    """Whisper: two ``conv1d`` over mel frames, encoder-decoder with cross-attention, tied head."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    config = WhisperConfig(vocab_size=vocab, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_source_positions=frames // 2, max_target_positions=64,
                           dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0,
                           bos_token_id=0, eos_token_id=0, decoder_start_token_id=0, attn_implementation="eager")
    model = _build(device, lambda: WhisperForConditionalGeneration(config))
    torch.manual_seed(1)
    features = torch.randn(batch, 16, frames).to(device)
    kwargs = {"decoder_input_ids": token_ids(batch, decoder_seq, vocab, device), "use_cache": False}
    return Case("whisper", model, (features,), kwargs)


def resnet(device: str = "cpu", *, image_size: int = 32, batch: int = 2) -> Case:
    """ResNet image classifier (basic blocks, BatchNorm, 2 stages of 16 and 32 channels, 10 labels)."""
    from transformers import ResNetConfig, ResNetForImageClassification
    config = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                          layer_type="basic", num_labels=10)
    model = _build(device, lambda: ResNetForImageClassification(config))
    torch.manual_seed(1)
    images = torch.randn(batch, 3, image_size, image_size).to(device)
    return Case("resnet", model, (images,))
