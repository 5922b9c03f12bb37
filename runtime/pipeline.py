"""The pipeline driver: one rank interprets its list of schedule actions.

Reads the rank's stage modules (one, or several under interleaved 1F1B; a tensor shard's,
rewritten with Megatron's collectives, when tp > 1) and its actions (``partitioner.schedules``);
sends activations forward and gradients backward point to point, to the rank holding the same
replica and shard of the neighbouring stage. Every rank sees the same batch, so it knows the shapes of what it will receive (and the
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

__all__ = ["StageDriver", "StageError", "Chunks"]

log = logging.getLogger(__name__)

class StageError(RuntimeError):
    """An action failed on one rank; the message names the rank, the stage and the action."""


class Chunks(torch.nn.Module):
    """The stages one pipeline rank holds under interleaved 1F1B (rank r: stages r, r + pp, ...), as one module.

    ``parameters()`` gives each parameter once (stages on one rank may share a tied one);
    ``original_names`` (``meta["fxpart.names"]``) maps ``stages.<s>.<name>`` back to the stage
    graphs' own names, so state dicts and checkpoints read as with one stage.
    """

    def __init__(self, modules: dict[int, torch.nn.Module]):
        super().__init__()
        self.stages = torch.nn.ModuleDict({str(s): m for s, m in modules.items()})
        names = {}
        for s, m in modules.items():
            inner = getattr(m, "meta", None)
            inner = inner.get("fxpart.names", {}) if isinstance(inner, dict) else {}
            for n, _ in list(m.named_parameters(remove_duplicate=False)) + list(m.named_buffers(remove_duplicate=False)):
                names[f"stages.{s}.{n}"] = inner.get(n, n)
        self.meta = {"fxpart.names": names}

    def forward(self, *args):
        raise RuntimeError("Chunks holds several pipeline stages; run each through StageDriver")


class StageDriver:
    """Runs one rank's schedule actions: forward and backward of micro-batches of the stages it holds,
    sends and receives.

    Args:
        stages: stage index -> ``(module, graph)``: what this rank computes of the stage, and the
            stage's GraphModule (its placeholders say what the stage receives). One stage, or several
            under interleaved 1F1B.
        n_stages: how many stages the pipeline has.
        rank_of_stage: the rank holding a stage with this rank's replica and shard.
        device: where tensors live.
        where: this rank in words, for errors.
    """

    def __init__(self, stages: dict[int, tuple], *, n_stages: int, rank_of_stage: Callable[[int], int],
                 device: torch.device, where: str):
        self.modules = {s: module for s, (module, _) in stages.items()}
        self.graphs = {s: graph for s, (_, graph) in stages.items()}
        self.n_stages = n_stages
        self.rank_of_stage = rank_of_stage
        self.device = device
        self.where = where
        self._pending: list = []
        self._posted: dict[tuple, tuple] = {}      # (stage, mb, kind) -> (receive works, buffers), posted ahead
        self.live_log: list[int] = []

    # -- a training step -------------------------------------------------------------------
    def train(self, actions: list[Action], flats: list[list], symbols: list[dict], targets, *,
              loss_fn: Callable, unflatten: Callable, before_last_backward: Callable, scale: float,
              live=None) -> torch.Tensor:
        """Run ``actions`` once; returns the sum of the last stage's micro-batch losses (0 elsewhere).

        ``flats[mb]`` are the model's flat inputs of micro-batch ``mb`` (used by the first stage),
        ``symbols[mb]`` their sizes by symbol (used by every stage to know what it receives).
        ``before_last_backward(stage)`` runs before each stage's last backward of the step.
        """
        state: dict[tuple, Any] = {}
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        last_backward = {a.stage: i for i, a in enumerate(actions) if a.kind == "B"}
        log_live = []
        for i, action in enumerate(actions):
            s, mb = action.stage, action.microbatch
            self._post_ahead(actions[i + 1:i + 1 + LOOKAHEAD], symbols, state)
            if action.kind == "F":
                ctx = live.recording((s, mb)) if live is not None else _null()
                with ctx:
                    state[s, mb] = self._guarded(action, lambda: self._forward(s, mb, flats, symbols, targets, loss_fn,
                                                                             unflatten, train=True))
                if s == self.n_stages - 1:
                    loss_sum += state[s, mb][1].detach().to(torch.float64)
            else:
                if last_backward[s] == i:
                    before_last_backward(s)
                self._guarded(action, lambda: self._backward(s, mb, state.pop((s, mb)), scale))
            if live is not None:
                log_live.append(live.count())
        self.wait()
        self.live_log = log_live
        return loss_sum

    def infer(self, flats: list[list], symbols: list[dict]) -> list:
        """Forward of every micro-batch through this rank's stages (no gradients); the rank holding the
        last stage returns their flat outputs."""
        parts = []
        with torch.no_grad():
            for mb in range(len(flats)):
                for s in sorted(self.modules):
                    out = self._guarded(Action(s, "F", mb),
                                        lambda: self._forward(s, mb, flats, symbols, None, None, None, train=False))
                    if s == self.n_stages - 1:
                        parts.append(out)
        self.wait()
        return parts

    # -- pieces ---------------------------------------------------------------------------------
    def _forward(self, s: int, mb: int, flats, symbols, targets, loss_fn, unflatten, *, train: bool):
        inputs = self._inputs(s, mb, flats, symbols[mb], train=train)
        outputs = self.modules[s](*inputs)
        outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        if s < self.n_stages - 1:
            self._send([v for v in outputs if isinstance(v, torch.Tensor)], s + 1, mb, "F")
            return (inputs, outputs) if train else None
        if not train:
            return [v.detach() if isinstance(v, torch.Tensor) else v for v in outputs]
        versions = [v._version if isinstance(v, torch.Tensor) else None for v in outputs]
        loss = loss_fn(unflatten(outputs), targets[mb])
        if _is_sharded(self.modules[s]) and any(isinstance(v, torch.Tensor) and v._version != k
                                                 for v, k in zip(outputs, versions)):
            raise RuntimeError("loss_fn wrote the model's outputs in place; on a data_parallel='shard' stage that "
                               "drops FSDP's pre-backward hook (its parameters are not gathered for backward). "
                               "Use out-of-place ops in loss_fn (out = out * mask, not out *= mask)")
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        return inputs, loss

    def _backward(self, s: int, mb: int, saved, scale: float) -> None:
        inputs, outputs = saved
        if s == self.n_stages - 1:
            (outputs * scale).backward()
        else:
            floats = [t for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
            grads = self._recv_tensors([(t.dtype, t.shape) for t in floats], s, mb, "B")
            pairs = [(t, g) for t, g in zip(floats, grads) if t.requires_grad]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        if s > 0:
            grads = [t.grad if t.grad is not None else torch.zeros_like(t)
                     for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
            self._send(grads, s - 1, mb, "B")

    def _inputs(self, s: int, mb: int, flats, symbols: dict, *, train: bool) -> list:
        if s == 0:
            return [v.to(self.device) if isinstance(v, torch.Tensor) else v for v in flats[mb]]
        specs = input_specs(self.graphs[s], symbols)
        if specs is None:
            raise StageError(f"{self.where}: the size of a tensor stage {s} receives depends on data, which the "
                             f"runtime cannot know before receiving it; cut the model elsewhere (cuts=...)")
        tensors = self._recv_tensors([(x[1], x[2]) for x in specs if x[0] == "tensor"], s, mb, "F")
        received = iter(tensors)
        values = [next(received) if x[0] == "tensor" else x[1] for x in specs]
        if train:
            for v in values:
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    v.requires_grad_(True)
        return values

    # -- communication ------------------------------------------------------------------------------
    def _post_ahead(self, upcoming: list[Action], symbols: list[dict], state: dict) -> None:
        """Post the receives of the next actions now, so their transfers run under this action's compute:
        a point-to-point transfer starts only once its receive is posted (gloo), and would otherwise add
        its whole latency to the action that waits for it. Sizes come from the batch (forward) or the
        stage's own outputs of that micro-batch (backward)."""
        for a in upcoming:
            key = (a.stage, a.microbatch, a.kind)
            if key in self._posted:
                continue
            if a.kind == "F" and a.stage > 0:
                specs = input_specs(self.graphs[a.stage], symbols[a.microbatch])
                if specs is None:
                    continue                      # sizes known only from data: received when needed (and refused)
                specs = [(x[1], x[2]) for x in specs if x[0] == "tensor"]
            elif a.kind == "B" and a.stage < self.n_stages - 1 and (a.stage, a.microbatch) in state:
                outputs = state[a.stage, a.microbatch][1]
                specs = [(t.dtype, t.shape) for t in outputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
            else:
                continue
            self._posted[key] = self._post(specs, a.stage, a.microbatch, a.kind)

    def _post(self, specs, stage: int, mb: int, kind: str) -> tuple:
        src = self.rank_of_stage(stage - 1 if kind == "F" else stage + 1)
        out = [torch.empty(shape, dtype=dtype, device=self.device) for dtype, shape in specs]
        works = [dist.irecv(buf, src, tag=_tag(stage, self.n_stages, mb, kind, i)) for i, buf in enumerate(out)]
        return works, out

    def _send(self, tensors: list, to_stage: int, mb: int, kind: str) -> None:
        """Activations (``"F"``) or input gradients (``"B"``) for stage ``to_stage``, on the rank holding it."""
        dst = self.rank_of_stage(to_stage)
        for i, t in enumerate(tensors):
            t = t.detach().contiguous()
            self._pending.append((dist.isend(t, dst, tag=_tag(to_stage, self.n_stages, mb, kind, i)), t))

    def _recv_tensors(self, specs, stage: int, mb: int, kind: str) -> list[torch.Tensor]:
        """What stage ``stage`` receives: from the stage before it (``"F"``) or after it (``"B"``); posted ahead
        (``_post_ahead``) or now, every tensor at once so the transfers overlap, then waited for."""
        works, out = self._posted.pop((stage, mb, kind), None) or self._post(specs, stage, mb, kind)
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
            raise StageError(f"{self.where} failed at action {action} of stage {action.stage}: "
                             f"{type(e).__name__}: {e}") from e


LOOKAHEAD = 2       # actions whose receives are posted before they run


def _tag(stage: int, n_stages: int, mb: int, kind: str, index: int) -> int:
    """One tag per (receiving stage, micro-batch, direction, tensor): stages on one rank never mix."""
    return ((mb * n_stages + stage) * 2 + (kind == "B")) * 4096 + index


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _is_sharded(module: torch.nn.Module) -> bool:
    """Whether ``module`` is ``fully_shard``-ed (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)
