"""Small built-in models (no downloads, no extra packages).

Each factory returns ``(model, example_inputs)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyGPT", "tiny_gpt", "mlp", "MoE", "moe", "small_cnn"]


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        # [b, s, d] -> [b, heads, s, d / heads]
        q, k, v = (t.view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A GPT in the style of nanoGPT: token and position embeddings, pre-norm blocks, tied head."""

    def __init__(self, vocab_size: int = 1000, d_model: int = 128, n_heads: int = 4, n_layers: int = 4,
                 max_seq: int = 256):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_seq, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def tiny_gpt(n_layers: int = 4, d_model: int = 128, n_heads: int = 4, batch: int = 2, seq: int = 64,
             vocab_size: int = 1000, device: str | torch.device = "cpu"):
    """A TinyGPT and a batch of token ids."""
    with torch.device(device):
        model = TinyGPT(vocab_size, d_model, n_heads, n_layers, max_seq=max(seq, 256))
    return model, (torch.randint(0, vocab_size, (batch, seq), device=device),)


def mlp(depth: int = 8, width: int = 256, batch: int = 32):
    """A deep MLP (Linear + GELU) and a batch."""
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers), (torch.randn(batch, width),)


class MoE(nn.Module):
    """A top-k mixture-of-experts feed-forward layer with a softmax router (token-choice)."""

    def __init__(self, d_model: int = 64, n_experts: int = 4, top_k: int = 2, d_ff: int = 128):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(n_experts, d_model, d_ff) / math.sqrt(d_model))
        self.w_out = nn.Parameter(torch.randn(n_experts, d_ff, d_model) / math.sqrt(d_ff))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        tokens = x.reshape(-1, d)
        weights, chosen = self.router(tokens).softmax(-1).topk(self.top_k, dim=-1)
        # dense dispatch: every expert sees every token, masked by its routing weight;
        # static shapes keep the graph capturable, at n_experts / top_k times the FLOPs
        gate = torch.zeros(tokens.shape[0], self.w_in.shape[0], dtype=x.dtype, device=x.device)
        gate = gate.scatter(1, chosen, weights)
        hidden = F.gelu(torch.einsum("td,edf->etf", tokens, self.w_in))
        out = torch.einsum("etf,efd->etd", hidden, self.w_out)
        return (out * gate.t().unsqueeze(-1)).sum(0).reshape(b, s, d)


def moe(batch: int = 4, seq: int = 32, d_model: int = 64, n_experts: int = 4):
    """An MoE layer and a batch."""
    return MoE(d_model, n_experts), (torch.randn(batch, seq, d_model),)


def small_cnn(batch: int = 4, size: int = 32, n_classes: int = 10):
    """A ResNet-style CNN (conv, BatchNorm, residual blocks, pooling, linear head) and a batch of images."""

    class Residual(nn.Module):
        def __init__(self, ch: int):
            super().__init__()
            self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(ch)
            self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(ch)

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            return F.relu(x + self.bn2(self.conv2(y)))

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Residual(16), nn.Conv2d(16, 32, 3, stride=2, padding=1), Residual(32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, n_classes))
    return model, (torch.randn(batch, 3, size, size),)
