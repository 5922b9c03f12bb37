"""Built-in models in the shapes of common families that need no extra package: a torchvision-style
ViT on ``nn.MultiheadAttention`` (packed ``in_proj``) and a mixture of experts kept as an
``nn.ModuleList`` with a router and dense dispatch (``torch.stack`` of every expert's output).

Each factory returns ``(model, example_inputs)``, as ``builtin``'s do.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["MHAViT", "mha_vit", "ListMoE", "list_moe"]


class _EncoderBlock(nn.Module):
    """torchvision's ``EncoderBlock``: pre-norm ``nn.MultiheadAttention`` and an MLP, batch first."""

    def __init__(self, hidden: int, n_heads: int, mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden)
        self.self_attention = nn.MultiheadAttention(hidden, n_heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp), nn.GELU(), nn.Linear(mlp, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class MHAViT(nn.Module):
    """torchvision's ``VisionTransformer`` layout: conv patch embedding, class token, learned positions."""

    def __init__(self, image_size: int = 32, patch: int = 8, hidden: int = 96, n_heads: int = 12,
                 n_layers: int = 2, mlp: int = 192, n_classes: int = 12):
        super().__init__()
        self.patch, self.hidden = patch, hidden
        self.conv_proj = nn.Conv2d(3, hidden, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden))
        seq = (image_size // patch) ** 2 + 1
        self.pos_embedding = nn.Parameter(torch.randn(1, seq, hidden) * 0.02)
        self.layers = nn.ModuleList(_EncoderBlock(hidden, n_heads, mlp) for _ in range(n_layers))
        self.ln = nn.LayerNorm(hidden)
        self.heads = nn.Linear(hidden, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        x = self.conv_proj(images).reshape(n, self.hidden, -1).permute(0, 2, 1)     # [n, patches, hidden]
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.pos_embedding
        for layer in self.layers:
            x = layer(x)
        return self.heads(self.ln(x)[:, 0])


def mha_vit(batch: int = 2, image_size: int = 32, hidden: int = 96, n_heads: int = 12):
    """A torchvision-style ViT (12 heads of 8) and a batch of images."""
    return MHAViT(image_size, hidden=hidden, n_heads=n_heads), (torch.randn(batch, 3, image_size, image_size),)


class ListMoE(nn.Module):
    """Experts as an ``nn.ModuleList`` of MLPs; a softmax router weighs every expert's output (dense
    dispatch: each expert sees every token; ``torch.stack`` gathers their outputs)."""

    def __init__(self, d_model: int = 32, n_experts: int = 4, d_ff: int = 64):
        super().__init__()
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
                                     for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.router(x).softmax(-1)                             # [b, s, experts]
        outs = torch.stack([expert(x) for expert in self.experts], -2)   # [b, s, experts, d]
        return (outs * weights.unsqueeze(-1)).sum(-2)


def list_moe(batch: int = 2, seq: int = 8, d_model: int = 32, n_experts: int = 4):
    """A ModuleList mixture of experts and a batch."""
    return ListMoE(d_model, n_experts), (torch.randn(batch, seq, d_model),)
