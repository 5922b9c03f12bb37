"""The pipeline driver: one rank interprets its stage's list of schedule actions.

Reads the rank's stage module (a tensor shard's, rewritten with Megatron's collectives, when
tp > 1) and its actions (``partitioner.schedules``); sends activations forward and gradients
backward point to point, to the rank holding the same replica and shard of the neighbouring
stage. Every rank sees the same batch, so it knows the shapes of what it will receive (and the
sizes a stage takes as ints) from the batch's own sizes (``partitioner.graph_split.input_specs``):
no shape header travels. (The partitioner never cuts where a crossing size depends on data.)
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.distributed as dist

from partitioner.graph_split import input_specs
from partitioner.schedules import Action

__all__ = ["StageDriver", "StageError"]

log = logging.getLogger(__name__)

class StageError(RuntimeError):
    """An action failed on one rank; the message names the rank, the stage and the action."""


class StageDriver:
    """Runs one stage's actions on this rank: forward and backward of micro-batches, sends and receives.

    Args:
        module: what this rank computes of the stage.
        graph: the stage's GraphModule (its placeholders say what the stage receives).
        stage: the stage's index; ``n_stages`` how many there are.
        prev_rank, next_rank: the ranks holding the neighbouring stages (same replica and shard).
        device: where tensors live.
        where: this rank in words, for errors.
    """

    def __init__(self, module, *, graph, stage: int, n_stages: int, prev_rank: int | None, next_rank: int | None,
                 device: torch.device, where: str):
        self.module = module
        self.graph = graph          # the stage's GraphModule (``module`` may wrap it): what its inputs are
        self.stage, self.n_stages = stage, n_stages
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.device = device
        self.where = where
        self._pending: list = []

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.n_stages - 1

    # -- a training step -------------------------------------------------------------------
    def train(self, actions: list[Action], flats: list[list], symbols: list[dict], targets, *,
              loss_fn: Callable, unflatten: Callable, before_last_backward: Callable, scale: float,
              live=None) -> torch.Tensor:
        """Run ``actions`` once; returns the sum of this stage's micro-batch losses (0 off the last stage).

        ``flats[mb]`` are the model's flat inputs of micro-batch ``mb`` (used by the first stage),
        ``symbols[mb]`` their sizes by symbol (used by every stage to know what it receives).
        """
        state: dict[int, Any] = {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        last_backward = max((i for i, a in enumerate(actions) if a.kind == "B"), default=-1)
        log_live = []
        for i, action in enumerate(actions):
            mb = action.microbatch
            if action.kind == "F":
                ctx = live.recording(mb) if live is not None else _null()
                with ctx:
                    state[mb] = self._guarded(action, lambda: self._forward(mb, flats, symbols, targets, loss_fn,
                                                                          unflatten, train=True))
                if self.last:
                    loss_sum += state[mb][1].detach().to(torch.float64)
            else:
                if i == last_backward:
                    before_last_backward()
                self._guarded(action, lambda: self._backward(mb, state.pop(mb), symbols[mb], scale))
            if live is not None:
                log_live.append(live.count())
        self.wait()
        self.live_log = log_live
        return loss_sum

    def infer(self, flats: list[list], symbols: list[dict]) -> list:
        """Forward of every micro-batch (no gradients); the last stage returns their flat outputs."""
        parts = []
        with torch.no_grad():
            for mb in range(len(flats)):
                out = self._guarded(Action(self.stage, "F", mb),
                                    lambda: self._forward(mb, flats, symbols, None, None, None, train=False))
                if self.last:
                    parts.append(out)
        self.wait()
        return parts

    # -- pieces ---------------------------------------------------------------------------------
    def _forward(self, mb: int, flats, symbols, targets, loss_fn, unflatten, *, train: bool):
        inputs = self._inputs(mb, flats, symbols[mb], train=train)
        outputs = self.module(*inputs)
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        if not self.last:
            self._send([v for v in outputs if isinstance(v, torch.Tensor)], self.next_rank, mb, "F")
            return (inputs, outputs) if train else None
        if not train:
            return [v.detach() if isinstance(v, torch.Tensor) else v for v in outputs]
        loss = loss_fn(unflatten(outputs), targets[mb])
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        return inputs, loss

    def _backward(self, mb: int, saved, symbols: dict, scale: float) -> None:
        inputs, outputs = saved
        if self.last:
            (outputs * scale).backward()
        else:
            floats = [t for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
            grads = self._recv_tensors([(t.dtype, t.shape) for t in floats], self.next_rank, mb, "B")
            pairs = [(t, g) for t, g in zip(floats, grads) if t.requires_grad]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        if not self.first:
            grads = [t.grad if t.grad is not None else torch.zeros_like(t)
                     for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
            self._send(grads, self.prev_rank, mb, "B")

    def _inputs(self, mb: int, flats, symbols: dict, *, train: bool) -> list:
        if self.first:
            return [v.to(self.device) if isinstance(v, torch.Tensor) else v for v in flats[mb]]
        specs = input_specs(self.graph, symbols)
        if specs is None:
            raise StageError(f"{self.where}: the size of a tensor this stage receives depends on data, which the "
                             f"runtime cannot know before receiving it; cut the model elsewhere (cuts=...)")
        tensors = self._recv_tensors([(s[1], s[2]) for s in specs if s[0] == "tensor"], self.prev_rank, mb, "F")
        received = iter(tensors)
        values = [next(received) if s[0] == "tensor" else s[1] for s in specs]
        if train:
            for v in values:
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    v.requires_grad_(True)
        return values

    # -- communication ------------------------------------------------------------------------------
    def _send(self, tensors: list, dst: int, mb: int, kind: str) -> None:
        for i, t in enumerate(tensors):
            t = t.detach().contiguous()
            self._pending.append((dist.isend(t, dst, tag=_tag(mb, kind, i)), t))

    def _recv_tensors(self, specs, src: int, mb: int, kind: str) -> list[torch.Tensor]:
        out = [torch.empty(shape, dtype=dtype, device=self.device) for dtype, shape in specs]
        # post every receive at once so the transfers overlap, then wait for all
        works = [dist.irecv(buf, src, tag=_tag(mb, kind, i)) for i, buf in enumerate(out)]
        for work in works:
            work.wait()
        return out

    def wait(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    def _guarded(self, action: Action, fn: Callable):
        try:
            return fn()
        except StageError:
            raise
        except Exception as e:
            raise StageError(f"{self.where} failed at action {action}: {type(e).__name__}: {e}") from e


def _tag(mb: int, kind: str, index: int) -> int:
    return (mb * 2 + (kind == "B")) * 4096 + index


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
