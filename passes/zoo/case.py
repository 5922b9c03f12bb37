"""``Case``: a model and an example batch, the unit every registry factory returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

__all__ = ["Case", "build", "token_ids"]


@dataclass
class Case:
    """A model and an example batch: ``case()`` is ``model(*args, **kwargs)``.

    Unpacks as ``model, args, kwargs = case``.
    """
    name: str
    model: nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def __call__(self):
        return self.model(*self.args, **self.kwargs)

    def __iter__(self):
        return iter((self.model, self.args, self.kwargs))


def build(device: str, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` under a fixed seed with ``device`` as the default device."""
    torch.manual_seed(0)
    with torch.device(device):
        return make()


def token_ids(batch: int, seq: int, vocab: int, device: str = "cpu") -> torch.Tensor:
    """Seeded random token ids of shape ``(batch, seq)`` (made on the CPU, then moved: meta has no values)."""
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
