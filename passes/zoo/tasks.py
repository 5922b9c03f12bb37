"""Synthetic fine-tuning tasks whose signal sits at a known depth, and the model they start from.

Everything is generated (no downloads). Sequences of ``seq`` tokens from a vocabulary of
``vocab``; a fixed random bit ``h(token)`` per token. The starting point: a ``TinyGPT``
classifier (``attach_classifier``, mean pooling, two outputs) trained on "pretraining":
predict both bits ``h(x[0])`` and ``h(x[1])`` (binary cross-entropy). Its early blocks learn
to read the tokens' bits, later ones carry them to every position.

Fine-tuning tasks (the metric is accuracy on fresh samples; chance is 50%):

* ``"recoded"`` (the signal sits early): the same bits, but the inputs are re-encoded by a
  fixed permutation of the vocabulary, as after a change of tokenizer. The map from token to
  bit has to be relearnt where the tokens are read, in an early block; the blocks after it
  see bits already computed from the wrong tokens.
* ``"xor"`` (the signal sits late): the label is ``h(x[0]) XOR h(x[1])`` on unchanged inputs.
  The pretrained blocks already carry both bits; a non-linear combination of them is needed
  on top, which the blocks after the first can learn and the linear head alone cannot.

>>> model = pretrained_classifier(d_model=32, n_layers=2, steps=50)
>>> x, y = TASKS["xor"].sample(8, seed=0)
>>> model(x).shape, y.shape
(torch.Size([8, 2]), torch.Size([8]))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .builtin import TinyGPT

__all__ = ["Task", "TASKS", "pretrained_classifier", "VOCAB", "SEQ"]

VOCAB, SEQ = 32, 8
_BITS = torch.randint(0, 2, (VOCAB,), generator=torch.Generator().manual_seed(5))
_RECODE = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))


def _tokens(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=gen)


def _both_bits(x: torch.Tensor) -> torch.Tensor:
    return torch.stack([_BITS[x[:, 0]], _BITS[x[:, 1]]], 1).float()


def _bits_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target)


def _bits_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    return ((logits > 0).float() == target).float().mean().item()


def _class_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    return (logits.argmax(-1) == target).float().mean().item()


@dataclass(frozen=True)
class Task:
    """A synthetic task: ``sample(n, seed)`` -> (token ids ``[n, SEQ]``, targets), its loss and metric."""
    name: str
    make: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]    # tokens -> (inputs, targets)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric: Callable[[torch.Tensor, torch.Tensor], float]
    where: str                                                            # where its signal sits

    def sample(self, n: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.make(_tokens(n, torch.Generator().manual_seed(seed)))

    def batches(self, n_batches: int, batch: int, *, seed: int) -> list[tuple[tuple[torch.Tensor], torch.Tensor]]:
        """``(inputs, target)`` batches as ``finetune(data=...)`` takes them."""
        x, y = self.sample(n_batches * batch, seed=seed)
        return [((x[i:i + batch],), y[i:i + batch]) for i in range(0, len(x), batch)]


TASKS = {
    "pretrain": Task("pretrain", lambda x: (x, _both_bits(x)), _bits_loss, _bits_accuracy, "-"),
    "recoded": Task("recoded", lambda x: (_RECODE[x], _both_bits(x)), _bits_loss, _bits_accuracy, "early"),
    "xor": Task("xor", lambda x: (x, (_BITS[x[:, 0]] ^ _BITS[x[:, 1]]).long()),
                lambda logits, y: F.cross_entropy(logits, y), _class_accuracy, "late"),
}


def pretrained_classifier(*, d_model: int = 384, n_layers: int = 4, n_heads: int = 4, steps: int = 400,
                          batch: int = 16, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """A ``TinyGPT`` classifier (2 outputs, mean pooling) trained ``steps`` AdamW steps on ``"pretrain"``."""
    from ..adapters import attach_classifier
    torch.manual_seed(seed)
    model = attach_classifier(TinyGPT(VOCAB, d_model, n_heads, n_layers, max_seq=SEQ), 2, pool="mean")
    task, gen = TASKS["pretrain"], torch.Generator().manual_seed(10_000 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        x, y = task.make(_tokens(batch, gen))
        loss = task.loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model
