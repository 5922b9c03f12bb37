"""``Runner``: run a pipeline ``Plan`` across processes, one stage per rank, with torch.distributed.

Reads a ``Plan`` (stage GraphModules, ``in_spec``/``out_spec``, ``shared_params``) and
interprets a schedule from ``partitioner.schedules``. Activations go forward and gradients
backward point-to-point between neighbouring ranks; every message is preceded by a small
int64 header giving each tensor's dtype and shape, so micro-batch shapes need not be
guessed from the plan's example batch.

Launch with ``torchrun --nproc-per-node <n_stages> script.py``.
"""
from __future__ import annotations

import atexit
import datetime
import hashlib
import logging
import os
import resource
import sys
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from passes._util import flatten_inputs, tensors_of

from partitioner.plan import concat_microbatches, split_microbatches

from partitioner.schedules import Action, make_schedule

__all__ = ["Runner", "StageError", "merge_state_dicts", "merge_shards"]

log = logging.getLogger(__name__)

_MAX_DIMS = 8
_HEADER = 2 + _MAX_DIMS          # dtype code, ndim, dims (padded)
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool]
_CODE = {dt: i for i, dt in enumerate(_DTYPES)}


class StageError(RuntimeError):
    """An action failed on one rank; the message names the rank, the stage and the action."""


class Runner:
    """Run a pipeline plan on ``len(plan.stages)`` ranks: rank r holds stage r only.

    A tensor plan (``plan.strategy == "tensor"``) gets a ``runtime.tensor_runner.TensorRunner``:
    rank r holds shard r, every rank takes the full inputs.

    Args:
        plan: a pipeline ``Plan`` from ``partitioner.partition``.
        schedule: ``"1f1b"`` or ``"gpipe"``.
        n_microbatches: micro-batches per ``step``; the batch must divide evenly.
        loss_fn: ``loss_fn(outputs, target_mb) -> scalar`` (mean-reduced for full-batch equivalence).
        optimizer_fn: ``optimizer_fn(params) -> torch.optim.Optimizer`` for this rank's parameters.
        timeout_s: process-group timeout, so a failure on one rank does not hang its peers forever
            (used when the Runner initialises the process group itself).

    Raises:
        ValueError: the world size differs from the number of stages, or a bad schedule.

    Example (``torchrun --nproc-per-node 2``):
        >>> runner = Runner(plan, n_microbatches=2, loss_fn=F.mse_loss,
        ...                 optimizer_fn=lambda ps: torch.optim.SGD(ps, lr=0.1))
        >>> loss = runner.step((x,), y)
    """

    _unit = "stage"          # what rank r holds of the plan

    def __new__(cls, plan=None, *args, **kwargs):
        if cls is Runner and getattr(plan, "strategy", None) == "tensor":   # one shard per rank
            from .tensor_runner import TensorRunner
            cls = TensorRunner
        return super().__new__(cls)

    def __init__(self, plan, *, schedule: str = "1f1b", n_microbatches: int | None = None,
                 loss_fn: Callable | None = None, optimizer_fn: Callable | None = None, timeout_s: float = 300.0,
                 track_memory: bool = False):
        if getattr(plan, "strategy", "pipeline") != "pipeline":
            raise ValueError(f"Runner runs pipeline plans; this plan's strategy is {plan.strategy!r}")
        if n_microbatches is None:   # a plan made with n_microbatches=m runs m micro-batches per batch
            n_microbatches = plan.n_microbatches if getattr(plan, "runs_microbatches", False) else 1
        if not isinstance(n_microbatches, int) or n_microbatches < 1:
            raise ValueError(f"n_microbatches must be a positive int, got {n_microbatches!r}")
        self.n_stages = len(plan.stages)
        self._init_process_group(timeout_s)
        self.rank = dist.get_rank()
        self.stage_index = self.rank
        self.device = self._pick_device()
        self._check_same_plan(plan, schedule, n_microbatches)
        self._example_shapes = list(getattr(plan, "microbatch_shapes", ())) or _placeholder_shapes(plan.stages[0].module)
        self._state_keys = dict(getattr(plan, "state_keys", {}) or {})
        # stage graphs have static shapes (inputs of another shape are refused): what a stage receives is
        # known from its placeholders, so messages need no shape header when every placeholder has one
        self._recv_specs = _placeholder_specs(plan.stages[self.rank].module)
        self._send_static = self.rank + 1 < self.n_stages and \
            _placeholder_specs(plan.stages[self.rank + 1].module) is not None
        self.module = plan.stages[self.rank].module.to(self.device)   # only our stage is kept
        self.estimated_memory_bytes = int(plan.stages[self.rank].cost.memory_bytes)
        self.in_spec, self.out_spec = plan.in_spec, plan.out_spec
        self.n_microbatches = n_microbatches
        self.schedule_name = schedule
        self.actions = make_schedule(schedule, self.n_stages, n_microbatches)[self.rank]
        self.loss_fn, self.optimizer_fn = loss_fn, optimizer_fn
        self.optimizer = None
        self._tied = self._tied_groups(plan.shared_params)
        self._pending: list = []
        self.track_memory = track_memory
        self.measured_peak_bytes: int | None = None   # last step's peak (track_memory or CUDA)
        self.activation_log: list[int] = []           # live micro-batches with saved activations, after each action

    # -- setup ----------------------------------------------------------------------------
    def _init_process_group(self, timeout_s: float) -> None:
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
        else:
            world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != self.n_stages:
            raise ValueError(f"the plan has {self.n_stages} {self._unit}s but the world size is {world}; launch "
                             f"with torchrun --nproc-per-node {self.n_stages} (one rank per {self._unit})")
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
            # we made it, we tear it down: a process that exits with gloo's threads still running aborts
            atexit.register(_destroy_process_group)

    def _check_same_plan(self, plan, schedule: str, n_microbatches: int) -> None:
        """Every rank must run the same plan: compare a digest of it before any pipeline traffic."""
        summary = self._plan_summary(plan, schedule, n_microbatches)
        digest = int.from_bytes(hashlib.sha256(summary.encode()).digest()[:8], "little", signed=True)
        mine = torch.tensor([digest], dtype=torch.int64, device=self.device)
        everyone = [torch.zeros_like(mine) for _ in range(self.n_stages)]
        dist.all_gather(everyone, mine)
        digests = [int(t.item()) for t in everyone]
        if len(set(digests)) > 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            raise ValueError(f"rank {self.rank}: the ranks do not run the same plan (ranks {differ} differ from rank 0 "
                             f"in the model graph, cuts, schedule or n_microbatches); build the plan identically on "
                             f"every rank, or save it once and load_plan it everywhere")

    def _plan_summary(self, plan, schedule: str, n_microbatches: int) -> str:
        return repr((getattr(plan, "fingerprint", ""), tuple(plan.cuts), self.n_stages, schedule, n_microbatches,
                     tuple(getattr(plan, "microbatch_shapes", ()))))

    def _pick_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _tied_groups(self, shared: dict) -> list:
        """Process groups for tied parameters, created in the same order on every rank."""
        groups = []
        params = dict(self.module.named_parameters())
        by_ranks: dict[tuple, Any] = {}
        for name, stages in sorted(shared.items()):
            ranks = tuple(sorted(stages))
            if ranks not in by_ranks:
                by_ranks[ranks] = dist.new_group(list(ranks))    # collective: every rank calls it
            if self.rank in ranks:
                if name not in params:
                    raise ValueError(f"tied parameter {name!r} is listed for stage {self.rank} but the stage holds "
                                     f"{sorted(params)[:8]}...; the plan's shared_params do not match its stages")
                groups.append((params[name], by_ranks[ranks]))
        return groups

    # -- public ----------------------------------------------------------------------------
    def forward(self, *inputs, **kwargs):
        """Run a batch through the pipeline (no gradients): ``n_microbatches`` micro-batches, or one
        batch of the planned micro-batch shape. Outputs are concatenated on dim 0.

        Every rank passes the same inputs (only rank 0 uses them) and returns the outputs.
        """
        flat = self._flatten(inputs, kwargs)
        flats = [flat] if _shapes(flat) == self._example_shapes else split_microbatches(flat, self.n_microbatches)
        self._check_shapes(flats[0], "forward")
        parts = []
        with torch.no_grad():
            for mb in range(len(flats)):
                parts.append(self._guarded(Action(self.rank, "F", mb),
                                           lambda: self._forward_values(flats, mb, train=False)))
        self._wait()
        result = [None]
        if self.rank == self.n_stages - 1:
            values = concat_microbatches(parts) if len(parts) > 1 else parts[0]
            result = [[v.detach().cpu() if isinstance(v, torch.Tensor) else v for v in values]]
        dist.broadcast_object_list(result, src=self.n_stages - 1,
                                   device=self.device if self.device.type == "cuda" else None)
        outs = [v.to(self.device) if isinstance(v, torch.Tensor) else v for v in result[0]]
        return self._unflatten(outs)

    __call__ = forward

    def step(self, inputs, target) -> float:
        """One training step over ``n_microbatches`` micro-batches; returns the mean loss on every rank.

        ``inputs``: a tuple of positional inputs (or one tensor, or a dict of keyword inputs);
        every tensor is split on dim 0. ``target`` is split the same way.
        """
        if self.optimizer_fn is None:
            raise ValueError("Runner.step needs optimizer_fn, e.g. optimizer_fn=lambda params: "
                             "torch.optim.SGD(params, lr=1e-3); none was given to Runner(...)")
        if self.loss_fn is None:   # checked on every rank, so no rank starts a step its peers refuse
            raise ValueError("Runner.step needs loss_fn(outputs, target_mb) -> scalar tensor; none was given to "
                             "Runner(...)")
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.optimizer is None and params:   # a stage of parameter-free ops has nothing to update
            self.optimizer = self.optimizer_fn(params)
        m = self.n_microbatches
        if isinstance(inputs, dict):
            args, kwargs = (), inputs
        elif isinstance(inputs, (tuple, list)):
            args, kwargs = tuple(inputs), {}
        else:
            args, kwargs = (inputs,), {}
        flats = [self._flatten(a, k) for a, k in zip(*_split((args, kwargs), m, "inputs"))]
        self._check_shapes(flats[0], "step")
        targets = _split(target, m, "target") if self.rank == self.n_stages - 1 else None
        self.module.train()
        with self._memory_tracker() as tracker:
            loss_sum = self._run_actions(flats, targets)
            self._sync_tied_grads()
            if self.optimizer is not None:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.measured_peak_bytes = tracker.peak_bytes()
        loss = (loss_sum / m).to(torch.float32)
        dist.broadcast(loss, src=self.n_stages - 1)
        return float(loss)

    def _run_actions(self, flats, targets) -> torch.Tensor:
        """Interpret this rank's schedule once; returns the sum of the micro-batch losses (last stage)."""
        state: dict[int, Any] = {}
        live = _LiveActivations()
        self.activation_log = []
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for action in self.actions:
            if action.kind == "F":
                with live.recording(action.microbatch):
                    state[action.microbatch] = self._guarded(
                        action, lambda: self._train_forward(action.microbatch, flats, targets))
                if self.rank == self.n_stages - 1:
                    loss_sum += state[action.microbatch][1].detach().to(torch.float64)
            else:
                self._guarded(action, lambda: self._train_backward(action.microbatch, state.pop(action.microbatch)))
            self.activation_log.append(live.count())
        self._wait()
        log.debug("rank %d: %d actions of %s done", self.rank, len(self.actions), self.schedule_name)
        return loss_sum

    def _memory_tracker(self):
        if self.device.type == "cuda":
            return _CudaPeak(self.device)
        if self.track_memory:
            return _StoragePeak(self.module, self.optimizer)
        return _NoPeak()

    def shard_state_dict(self) -> dict:
        """This rank's part of the model's state dict, under the model's own keys (tied aliases included)."""
        local = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        if not self._state_keys:
            return local
        return {key: local[name] for key, name in self._state_keys.items() if name in local}

    def save_shard(self, directory: str) -> str:
        """Write this rank's shard (model keys, optimizer state) to ``directory/shard-<rank>.pt``; returns the path.

        ``runtime.merge_shards(directory)`` joins the shards into one state dict.
        """
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"shard-{self.rank}.pt")
        optim = self.optimizer.state_dict() if self.optimizer is not None else None
        torch.save({"rank": self.rank, "n_stages": self.n_stages, "model": self.shard_state_dict(),
                    "optimizer": optim, "state_keys": self._state_keys, "split": self._split_keys()}, path)
        return path

    def load_shard(self, directory: str) -> None:
        """Load this rank's shard written by ``save_shard`` (parameters and, if present, optimizer state)."""
        saved = torch.load(os.path.join(directory, f"shard-{self.rank}.pt"), weights_only=False)
        if saved["n_stages"] != self.n_stages:
            raise ValueError(f"{directory} holds a checkpoint of {saved['n_stages']} stages; this plan has "
                             f"{self.n_stages}")
        names = dict(self._state_keys) or {k: k for k in saved["model"]}
        local = {name: saved["model"][key] for key, name in names.items() if key in saved["model"]}
        result = self.module.load_state_dict(local, strict=False)   # non-persistent buffers are not saved
        if result.unexpected_keys:
            raise ValueError(f"shard {self.rank} in {directory} holds {result.unexpected_keys[:8]}, which stage "
                             f"{self.stage_index} does not have; it was saved from another plan")
        if saved["optimizer"] is not None:
            if self.optimizer is None:
                self.optimizer = self.optimizer_fn([p for p in self.module.parameters() if p.requires_grad])
            self.optimizer.load_state_dict(saved["optimizer"])

    def _split_keys(self) -> dict:
        """Model key -> ``Shard`` of the tensors split across ranks (tensor plans); none in a pipeline."""
        return {}

    def full_state_dict(self) -> dict | None:
        """The whole model's state dict on rank 0, keys and order as ``model.state_dict()``; None elsewhere.

        Tied parameters appear under every key the model has for them (the plan's ``state_keys``);
        a plan made from a captured graph has the graph's names only.
        """
        gathered = [None] * self.n_stages if self.rank == 0 else None
        dist.gather_object(self.shard_state_dict(), gathered, dst=0)
        if self.rank != 0:
            return None
        return merge_state_dicts(gathered, list(self._state_keys) or None)

    def memory_report(self) -> list[dict]:
        """Measured peak memory next to the plan's estimate, one row per rank (on every rank).

        Measured over the last ``step``: CUDA, the allocator's peak (``max_memory_allocated``); CPU
        with ``track_memory=True``, the peak of live tensor storages (parameters, gradients,
        optimizer state, activations, temporaries, received tensors), counted by a dispatch mode. Otherwise the process's peak resident set size (``ru_maxrss``),
        which also counts the interpreter and torch.
        """
        if self.measured_peak_bytes is not None:
            measured = self.measured_peak_bytes
            how = "cuda.max_memory_allocated" if self.device.type == "cuda" else "live storages peak"
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            measured, how = (rss if sys.platform == "darwin" else rss * 1024), "ru_maxrss (whole process)"
        row = {"rank": self.rank, "stage": self.stage_index, "measured_peak_bytes": int(measured),
               "estimated_bytes": self.estimated_memory_bytes, "measured_by": how}
        rows = [None] * self.n_stages
        dist.all_gather_object(rows, row)
        return rows

    # -- pipeline pieces ----------------------------------------------------------------------------
    def _train_forward(self, mb: int, flats, targets):
        inputs = self._stage_inputs(mb, flats, train=True)
        outputs = self.module(*inputs)
        if self.rank == self.n_stages - 1:
            flat = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            loss = self.loss_fn(self._unflatten(flat), targets[mb])
            if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
                raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
            return inputs, loss
        self._send(outputs, mb, "F")
        return inputs, outputs

    def _train_backward(self, mb: int, saved) -> None:
        inputs, outputs = saved
        if self.rank == self.n_stages - 1:
            (outputs / self.n_microbatches).backward()
        else:
            floats = [t for t in outputs if t.is_floating_point()]
            grads = self._recv_tensors([(t.dtype, t.shape) for t in floats], self.rank + 1, mb, "B")
            pairs = [(t, g) for t, g in zip(floats, grads) if t.requires_grad]
            if pairs:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        if self.rank > 0:
            grads = [t.grad if t.grad is not None else torch.zeros_like(t)
                     for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
            self._send_tensors(grads, self.rank - 1, mb, "B")

    def _forward_values(self, flats, mb: int, *, train: bool):
        values = self.module(*self._stage_inputs(mb, flats, train=train))
        if self.rank < self.n_stages - 1:
            self._send(values, mb, "F")
            return None
        return list(values) if isinstance(values, (tuple, list)) else [values]

    def _stage_inputs(self, mb: int, flats, *, train: bool) -> list:
        if self.rank == 0:
            return [v.to(self.device) if isinstance(v, torch.Tensor) else v for v in flats[mb]]
        values = self._recv(self.rank - 1, mb, "F")
        if train:
            for v in values:
                if v.is_floating_point():
                    v.requires_grad_(True)
        return values

    def _sync_tied_grads(self) -> None:
        for param, group in self._tied:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=group)

    # -- communication ----------------------------------------------------------------------------
    def _send(self, values, mb: int, kind: str) -> None:
        values = list(values) if isinstance(values, (tuple, list)) else [values]
        for v in values:
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"stage {self.rank} sends a {type(v).__name__}; only tensors may cross a cut")
        if self._send_static:
            self._send_tensors(values, self.rank + 1, mb, kind)
            return
        header = torch.zeros(len(values) * _HEADER, dtype=torch.int64)
        for i, v in enumerate(values):
            if v.dim() > _MAX_DIMS or v.dtype not in _CODE:
                raise TypeError(f"cannot send a {v.dtype} tensor of shape {tuple(v.shape)} between stages")
            header[i * _HEADER:(i + 1) * _HEADER] = torch.tensor(
                [_CODE[v.dtype], v.dim()] + list(v.shape) + [0] * (_MAX_DIMS - v.dim()))
        self._send_tensors([header.to(self.device)] + values, self.rank + 1, mb, kind)

    def _recv(self, src: int, mb: int, kind: str) -> list[torch.Tensor]:
        if self._recv_specs is not None:
            return self._recv_tensors(self._recv_specs, src, mb, kind)
        n = len([n for n in self.module.graph.nodes if n.op == "placeholder"])
        header = self._recv_tensors([(torch.int64, (n * _HEADER,))], src, mb, kind, first_index=0)[0].cpu()
        specs = []
        for i in range(n):
            row = header[i * _HEADER:(i + 1) * _HEADER].tolist()
            specs.append((_DTYPES[row[0]], tuple(row[2:2 + row[1]])))
        return self._recv_tensors(specs, src, mb, kind, first_index=1)

    def _send_tensors(self, tensors, dst: int, mb: int, kind: str) -> None:
        for i, t in enumerate(tensors):
            t = t.detach().contiguous()
            self._pending.append((dist.isend(t, dst, tag=_tag(mb, kind, i)), t))

    def _recv_tensors(self, specs, src: int, mb: int, kind: str, first_index: int = 0) -> list[torch.Tensor]:
        out = [torch.empty(shape, dtype=dtype, device=self.device) for dtype, shape in specs]
        # post every receive at once so the transfers overlap, then wait for all
        works = [dist.irecv(buf, src, tag=_tag(mb, kind, first_index + i)) for i, buf in enumerate(out)]
        for work in works:
            work.wait()
        return out

    def _wait(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()

    # -- helpers ----------------------------------------------------------------------------
    def _guarded(self, action: Action, fn: Callable):
        try:
            return fn()
        except StageError:
            raise
        except Exception as e:
            raise StageError(f"rank {self.rank} (stage {self.stage_index}) failed at action {action} of "
                             f"schedule {self.schedule_name}: {type(e).__name__}: {e}") from e

    def _check_shapes(self, flat: list, where: str) -> None:
        """Stage graphs are specialised to the planned example batch: refuse other shapes on every rank."""
        got = [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in flat]
        if got != self._example_shapes:
            per = " per micro-batch" if where == "step" else ""
            raise ValueError(f"Runner.{where}: the inputs{per} have shapes {got}, but the plan's stage graphs were "
                             f"captured for {self._example_shapes}; partition with an example batch of the "
                             f"micro-batch size (batch / n_microbatches) and pass batches of "
                             f"n_microbatches x that size to step()")

    def _flatten(self, args: tuple, kwargs: dict) -> list:
        return flatten_inputs(self.in_spec, args, kwargs)

    def _unflatten(self, values: list):
        if self.out_spec is not None:
            return tree_unflatten(list(values), self.out_spec)
        return values[0] if len(values) == 1 else tuple(values)


def merge_state_dicts(parts: list[dict], keys: list[str] | None = None) -> dict:
    """One state dict from per-stage parts (a tied key held by several stages is taken once).

    Raises:
        KeyError: ``keys`` names a key no part holds.
    """
    merged: dict = {}
    for part in parts:
        for k, v in part.items():
            merged.setdefault(k, v)
    if keys is None:
        return merged
    missing = [k for k in keys if k not in merged]
    if missing:
        raise KeyError(f"no stage holds {missing[:8]} (of {len(missing)} keys): parameters no graph node reads "
                       f"are not placed on any stage")
    return {k: merged[k] for k in keys}


def merge_shards(directory: str) -> dict:
    """The whole model's state dict from the ``shard-<rank>.pt`` files ``Runner.save_shard`` wrote."""
    paths = sorted(p for p in os.listdir(directory) if p.startswith("shard-") and p.endswith(".pt"))
    shards = [torch.load(os.path.join(directory, p), weights_only=False) for p in paths]
    if not shards or len(shards) != shards[0]["n_stages"]:
        raise ValueError(f"{directory} holds {len(shards)} shards; the checkpoint needs "
                         f"{shards[0]['n_stages'] if shards else 'at least 1'}")
    merged = merge_state_dicts([s["model"] for s in shards], list(shards[0]["state_keys"]) or None)
    split = shards[0].get("split") or {}
    if split:                       # tensor plan: join every rank's slice of the split parameters
        from .tensor_runner import join_shards
        merged.update({key: join_shards([s["model"][key] for s in shards], shard) for key, shard in split.items()})
    return merged


class _LiveActivations:
    """Counts micro-batches whose saved-for-backward tensors are still alive (autograd saved_tensors_hooks)."""

    def __init__(self):
        self._live: dict[int, int] = {}

    def recording(self, mb: int):
        def pack(t):
            self._live[mb] = self._live.get(mb, 0) + 1
            return _Saved(t, self, mb)
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor)

    def release(self, mb: int) -> None:
        self._live[mb] -= 1

    def count(self) -> int:
        return sum(1 for n in self._live.values() if n > 0)


class _Saved:
    """A saved tensor; when autograd frees it (after the backward), its micro-batch holds one fewer."""
    __slots__ = ("tensor", "_owner", "_mb")

    def __init__(self, tensor, owner, mb):
        self.tensor, self._owner, self._mb = tensor, owner, mb

    def __del__(self):
        self._owner.release(self._mb)


class _NoPeak:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def peak_bytes(self):
        return None


class _CudaPeak(_NoPeak):
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def peak_bytes(self):
        return int(torch.cuda.max_memory_allocated(self.device))


class _StoragePeak(_NoPeak):
    """Peak bytes of live tensor storages over one step on the CPU: the parameters, gradients and
    optimizer state present at the start, plus every storage an op allocates inside (a
    ``TorchDispatchMode`` sees each op's outputs; a storage counts until it is freed).

    ``MemTracker`` refuses a module called several times per step (one call per micro-batch),
    so the runtime counts storages itself, as ``MemTracker`` does underneath.
    """

    def __init__(self, module, optimizer):
        from torch.multiprocessing.reductions import StorageWeakRef
        self._ref = StorageWeakRef
        self._live: dict[int, tuple] = {}
        held = list(module.parameters()) + list(module.buffers())
        held += [p.grad for p in module.parameters() if p.grad is not None]
        if optimizer is not None:
            held += [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        for t in held:
            self._add(t)
        self._current = self._peak = sum(n for _, n in self._live.values())
        self._mode = None

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._live:
            self._live[key] = (self._ref(storage), storage.nbytes())

    def _observe(self, out) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            del self._live[key]
        for t in tensors_of(out):
            if t.device.type != "meta":
                self._add(t)
        self._current = sum(n for _, n in self._live.values())
        self._peak = max(self._peak, self._current)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._observe(out)
                return out
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def peak_bytes(self):
        return int(self._peak)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _shapes(flat: list) -> list:
    return [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in flat]


def _placeholder_specs(gm: torch.fx.GraphModule) -> list[tuple] | None:
    """(dtype, shape) of every input of a stage graph, or None when one is not a tensor with a static shape."""
    specs = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor) or not all(isinstance(d, int) for d in val.shape):
                return None
            specs.append((val.dtype, tuple(val.shape)))
    return specs


def _placeholder_shapes(gm: torch.fx.GraphModule) -> list:
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    return [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in vals]


def _tag(mb: int, kind: str, index: int) -> int:
    return (mb * 2 + (kind == "B")) * 4096 + index


def _split(tree, m: int, what: str) -> list:
    """``m`` equal slices of every tensor in ``tree`` on dim 0 (other leaves are repeated)."""
    leaves, spec = tree_flatten(tree)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] % m:
            raise ValueError(f"{what}: dim 0 of a tensor of shape {tuple(leaf.shape)} does not split into "
                             f"n_microbatches={m} equal micro-batches")
    chunks = [leaf.chunk(m) if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else None for leaf in leaves]
    out = [tree_unflatten([c[i] if c is not None else leaf for c, leaf in zip(chunks, leaves)], spec)
           for i in range(m)]
    if what == "inputs":   # [(args, kwargs)] -> (args_list, kwargs_list)
        return [a for a, _ in out], [k for _, k in out]
    return out
