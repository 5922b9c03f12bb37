"""``Runner``: run a ``Plan`` over its mesh, one rank per device, with torch.distributed.

Composes the runtime's parts for this rank: its place in the mesh (``topology``), what it
computes (its stage's tensor shard, with Megatron's collectives on its tp group:
``tensor_parallel``), how its replicas stay in step (``data_parallel``: bucketed, overlapped
gradient averaging, or FSDP2 sharding), the schedule's actions (``pipeline``), tied-weight
gradients summed between the stages holding them, memory measurement (``memory``) and the
whole or sharded state (``checkpoint``).

Launch with ``torchrun --nproc-per-node <plan.n_devices> script.py``; every rank builds the same
plan (or ``load_plan``s the same file) and passes the same global batch.
"""
from __future__ import annotations

import hashlib
import logging
import os
import resource
import sys
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten, tree_unflatten

from partitioner.plan import concat_outputs, split_batch
from partitioner.schedules import SCHEDULES, make_schedule
from .checkpoint import gather_full_state, local_state, merge_shards, merge_state_dicts, shard_file
from .data_parallel import GradSync, original_names, replicated_params, shard_module, split_by_block
from .memory import LiveActivations, peak_tracker
from .pipeline import Chunks, StageDriver, StageError
from .tensor_parallel import megatron_graph
from .topology import Topology

__all__ = ["Runner", "StageError", "merge_state_dicts", "merge_shards"]

log = logging.getLogger(__name__)


class Runner:
    """Train or run a plan on ``plan.n_devices`` ranks; rank r holds only its place in the mesh.

    Args:
        plan: a ``Plan`` from ``partitioner.partition`` or ``load_plan``.
        schedule: ``"1f1b"`` or ``"gpipe"``; None takes the plan's.
        n_microbatches: micro-batches per data-parallel replica and step; None takes the plan's.
            Any batch that splits into ``dp * n_microbatches`` equal parts runs.
        loss_fn: ``loss_fn(outputs, target_mb) -> scalar`` (mean-reduced for full-batch equivalence).
        optimizer_fn: ``optimizer_fn(params) -> torch.optim.Optimizer`` for this rank's parameters.
        timeout_s: process-group timeout, so a failure on one rank does not hang its peers forever
            (used when the Runner initialises the process group itself).
        track_memory: measure each step's peak on the CPU (CUDA always measures).

    Raises:
        ValueError: the world size is not the plan's device count, a bad schedule or micro-batch
            count, or the ranks' plans differ.

    Example (``torchrun --nproc-per-node 2``):
        >>> runner = Runner(plan, n_microbatches=2, loss_fn=F.mse_loss,
        ...                 optimizer_fn=lambda ps: torch.optim.SGD(ps, lr=0.1))
        >>> loss = runner.step((x,), y)
    """

    def __init__(self, plan, *, schedule: str | None = None, n_microbatches: int | None = None,
                 loss_fn: Callable | None = None, optimizer_fn: Callable | None = None, timeout_s: float = 300.0,
                 track_memory: bool = False):
        schedule = schedule or plan.schedule
        n_microbatches = plan.n_microbatches if n_microbatches is None else n_microbatches
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not known; use one of {sorted(SCHEDULES)}")
        if not isinstance(n_microbatches, int) or n_microbatches < 1:
            raise ValueError(f"n_microbatches must be a positive int, got {n_microbatches!r}")
        self.plan, self.mesh = plan, plan.mesh
        pp, v = self.mesh["pp"], plan.n_virtual
        schedules = make_schedule(schedule, pp, n_microbatches, v)    # refuses a schedule the plan cannot run
        self.topology = Topology(self.mesh, timeout_s=timeout_s)
        self.rank, self.device = self.topology.rank, self.topology.device
        c = self.coords = self.topology.coords
        self.schedule_name, self.n_microbatches = schedule, n_microbatches
        self.actions = schedules[c.pp]
        self._check_same_plan(schedule, n_microbatches)
        self.stage_index = c.pp                        # this rank's place on the pipeline axis
        self.stage_indices = [c.pp + k * pp for k in range(v)]   # the stages it holds (interleaved: several)
        pieces = {s: (plan.stages[s].tp_shards[c.tp] if plan.stages[s].tp_shards else plan.stages[s])
                  for s in self.stage_indices}
        self.estimated_memory_bytes = int(sum(piece.cost.memory_bytes for piece in pieces.values()))
        self._graphs = {s: self._local_graph(piece) for s, piece in pieces.items()}   # only this rank's pieces
        self._tied = self._tied_groups(plan.shared_params)
        modules, self._syncs = self._replicas(plan)
        self._chunks = modules
        self.module = modules[c.pp] if v == 1 else Chunks(modules)
        self.driver = StageDriver({s: (modules[s], self._graphs[s]) for s in self.stage_indices}, n_stages=pp * v,
                                  rank_of_stage=lambda s: self.topology.rank_of(pp=s % pp), device=self.device,
                                  where=str(self.topology))
        self.loss_fn, self.optimizer_fn = loss_fn, optimizer_fn
        self.optimizer = None
        self.track_memory = track_memory
        self.measured_peak_bytes: int | None = None   # last step's peak (track_memory or CUDA)
        self.activation_log: list[int] = []           # live micro-batches with saved activations, after each action

    # -- setup ----------------------------------------------------------------------------
    def _check_same_plan(self, schedule: str, n_microbatches: int) -> None:
        """Every rank must run the same plan: compare a digest of it before any pipeline traffic."""
        summary = repr((self.plan.decisions.to_dict()["mesh"], self.plan.cuts, self.plan.n_virtual, schedule,
                        n_microbatches, self.plan.data_parallel, (self.plan.decisions.sharding or {}).get("params"),
                        sorted(self.plan.params.items())))
        digest = int.from_bytes(hashlib.sha256(summary.encode()).digest()[:8], "little", signed=True)
        mine = torch.tensor([digest], dtype=torch.int64, device=self.device)
        everyone = [torch.zeros_like(mine) for _ in range(self.topology.world)]
        dist.all_gather(everyone, mine)
        digests = [int(t.item()) for t in everyone]
        if len(set(digests)) > 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            raise ValueError(f"rank {self.rank}: the ranks do not run the same plan (ranks {differ} differ from rank 0 "
                             f"in the mesh, cuts, sharding, schedule, n_microbatches or model); build the plan "
                             f"identically on every rank, or save it once and load_plan it everywhere")

    def _local_graph(self, piece) -> torch.fx.GraphModule:
        graph = piece.module.to(self.device)
        if self.mesh["tp"] > 1:
            graph = megatron_graph(graph, group_name=self.topology.group("tp").group_name,
                                   param_shards=dict(self.plan.sharding.param_shards))
        return graph

    def _replicas(self, plan) -> tuple[dict, dict]:
        """Per stage this rank holds: the module it runs (sharded over dp with FSDP2, or its graph, its blocks
        recomputed in backward when the plan says so), and the gradient averaging armed before the stage's
        last backward (``GradSync``: replicated parameters)."""
        recompute, dp = bool(plan.decisions.recompute), self.mesh["dp"]
        shard = dp > 1 and plan.data_parallel == "shard"
        owners: dict[int, list] = {}
        for s, graph in self._graphs.items():
            for p in graph.parameters():
                owners.setdefault(id(p), []).append(s)
        across = sorted({tuple(stages) for stages in owners.values() if len(stages) > 1})
        if across and shard:
            raise ValueError(f"rank {self.rank} holds stages {across[0]} that share a parameter (tied weights); "
                             f"data_parallel='shard' cannot shard one parameter for two stages on one rank: plan with "
                             f"data_parallel='replicate', or schedule='1f1b'")
        modules, syncs = {}, {}
        group = self.topology.group("dp") if dp > 1 else None
        for s, graph in self._graphs.items():
            if shard:
                tied = dict(graph.named_parameters())
                modules[s] = shard_module(graph, self.topology.device_mesh["dp"],
                                          reshard_after_forward=self.mesh["pp"] == 1, recompute=recompute,
                                          keep_whole=tuple(tied[name] for name in plan.shared_params if name in tied))
                whole = replicated_params(modules[s])
                if whole:                              # read by several blocks: replicated, gradients averaged
                    syncs[s] = [GradSync(whole, group)]
            else:
                # recomputed blocks run as units that share the graph's parameters, so GradSync hooks them alike
                modules[s] = split_by_block(graph, recompute=True) if recompute else graph
        if dp > 1 and not shard:
            if across:          # a tied parameter in two of this rank's stages: one sync, before the last backward
                last = next(a.stage for a in reversed(self.actions) if a.kind == "B")
                params = list({id(p): p for g in self._graphs.values() for p in g.parameters()}.values())
                syncs[last] = [GradSync(params, group)]
            else:
                syncs = {s: [GradSync(list(g.parameters()), group)] for s, g in self._graphs.items()}
        return modules, syncs

    def _tied_groups(self, shared: dict) -> list:
        """Process groups for tied parameters: per (replica, shard), the ranks holding a stage with it; made in
        the same order on every rank (``new_group`` is collective). Stages of one rank share the parameter
        itself, so a tied weight all of whose stages sit on one rank needs no group."""
        groups = []
        params = {name for g in self._graphs.values() for name, _ in g.named_parameters()}
        made: dict[tuple, object] = {}
        pp = self.mesh["pp"]
        for name, stages in sorted(shared.items()):
            for dp in range(self.mesh["dp"]):
                for tp in range(self.mesh["tp"]):
                    ranks = tuple(sorted({self.topology.rank_of(pp=s % pp, dp=dp, tp=tp) for s in stages}))
                    if len(ranks) == 1:
                        continue
                    if ranks not in made:
                        made[ranks] = dist.new_group(list(ranks))
                    if self.rank in ranks:
                        if name not in params:
                            raise ValueError(f"tied parameter {name!r} is listed for stages {self.stage_indices} but they "
                                             f"hold {sorted(params)[:8]}...; the plan's shared_params do not "
                                             f"match its stages")
                        groups.append((name, made[ranks]))
        return groups

    # -- public ----------------------------------------------------------------------------
    def step(self, inputs, target, **kwargs) -> float:
        """One training step of the global batch; returns the mean loss on every rank.

        ``inputs``: a tuple of positional inputs (or one tensor, or a dict of keyword inputs);
        ``kwargs`` the model's keyword inputs, as in ``model(*inputs, **kwargs)`` (keyword constants
        the plan was captured with, such as ``use_cache=False``, may be left out). Every rank passes the same batch; each
        data-parallel replica takes its share and splits it into ``n_microbatches``; ``target`` is
        split the same way. The loss is the mean of ``loss_fn`` over all micro-batches.
        """
        if self.optimizer_fn is None:
            raise ValueError("Runner.step needs optimizer_fn, e.g. optimizer_fn=lambda params: "
                             "torch.optim.SGD(params, lr=1e-3); none was given to Runner(...)")
        if self.loss_fn is None:   # checked on every rank, so no rank starts a step its peers refuse
            raise ValueError("Runner.step needs loss_fn(outputs, target_mb) -> scalar tensor; none was given to "
                             "Runner(...)")
        mbs, symbols = self._microbatches(inputs, kwargs)
        targets = self._targets(target) if self.topology.last_stage else None
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.optimizer is None and params:   # a stage of parameter-free ops has nothing to update
            self.optimizer = self.optimizer_fn(params)
        self.module.train()
        m = self.n_microbatches
        for module in self._chunks.values():
            if hasattr(module, "set_requires_gradient_sync"):
                module.set_requires_gradient_sync(m == 1)
        live = LiveActivations()
        with peak_tracker(self.device, self.module, self.optimizer, track=self.track_memory) as tracker:
            loss_sum = self.driver.train(self.actions, mbs, symbols, targets, loss_fn=self.loss_fn,
                                         unflatten=self._unflatten, before_last_backward=self._last_backward,
                                         scale=1.0 / m, live=live)
            for syncs in self._syncs.values():
                for sync in syncs:
                    sync.finish()
            self._sync_tied_grads()
            if self.optimizer is not None:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.activation_log = self.driver.live_log
        self.measured_peak_bytes = tracker.peak_bytes()
        owner = self.topology.last_stage and self.coords.tp == 0
        total = (loss_sum if owner else torch.zeros_like(loss_sum)).to(torch.float32)
        dist.all_reduce(total)
        return float(total) / (self.mesh["dp"] * m)

    def forward(self, *inputs, **kwargs):
        """The model's outputs for a batch (no gradients), on every rank; every rank passes the same inputs."""
        mbs, symbols = self._microbatches(inputs, kwargs)
        parts = self.driver.infer(mbs, symbols)
        mine = None
        if self.topology.last_stage and self.coords.tp == 0:
            values = concat_outputs(parts) if len(parts) > 1 else parts[0]
            mine = [v.detach().cpu() if isinstance(v, torch.Tensor) else v for v in values]
        everyone = [None] * self.topology.world
        dist.all_gather_object(everyone, mine)
        replicas = [everyone[self.topology.rank_of(pp=self.mesh["pp"] - 1, dp=d, tp=0)] for d in range(self.mesh["dp"])]
        values = concat_outputs(replicas) if len(replicas) > 1 else replicas[0]
        return self._unflatten([v.to(self.device) if isinstance(v, torch.Tensor) else v for v in values])

    __call__ = forward

    def full_state_dict(self) -> dict | None:
        """The whole model's state dict on rank 0, keys and order as ``model.state_dict()``; None elsewhere.

        Tied parameters appear under every key the model has for them; split parameters joined.
        """
        local = local_state(self.module, full_over_dp=True, names=original_names(self.module))
        return gather_full_state(local, coords=self.coords, mesh=self.mesh, state_keys=self._state_keys(),
                                 split=self._split_keys(), unplaced=self.plan.unplaced)

    def shard_state_dict(self) -> dict:
        """This rank's tensors under the model's own keys (tensor slices as held; data-parallel shards gathered)."""
        local = local_state(self.module, full_over_dp=True, names=original_names(self.module))
        names = self._state_keys() or {k: k for k in local}
        return {key: local[name] for key, name in names.items() if name in local}

    def save_shard(self, directory: str) -> str:
        """Write this rank's shard (its pieces of the parameters, its optimizer state) to
        ``directory/shard-<rank>.pt``; ``runtime.merge_shards(directory)`` joins any mesh's shards."""
        os.makedirs(directory, exist_ok=True)
        path = shard_file(directory, self.rank)
        names = original_names(self.module)
        model = local_state(self.module, full_over_dp=False, names=names)
        dp_sharded = {names.get(k, k): True for k, t in self.module.state_dict().items() if hasattr(t, "full_tensor")}
        optim = self.optimizer.state_dict() if self.optimizer is not None else None
        torch.save({"rank": self.rank, "mesh": self.mesh, "coords": (self.coords.pp, self.coords.dp, self.coords.tp),
                    "model": model, "optimizer": optim, "state_keys": self._state_keys(), "split": self._split_keys(),
                    "dp_sharded": dp_sharded,
                    "unplaced": {k: t.cpu() for k, t in self.plan.unplaced.items()} if self.rank == 0 else {}}, path)
        return path

    def load_shard(self, directory: str) -> None:
        """Load this rank's shard written by ``save_shard`` from the same mesh (parameters, optimizer state)."""
        saved = torch.load(shard_file(directory, self.rank), weights_only=False)
        if saved["mesh"] != self.mesh:
            raise ValueError(f"{directory} holds a checkpoint of mesh {saved['mesh']}; this plan's is {self.mesh}: "
                             f"merge it with runtime.merge_shards and load the merged state into the model instead")
        names = original_names(self.module)
        state = {names.get(k, k): t for k, t in self.module.state_dict().items()}
        unexpected = [k for k in saved["model"] if k not in state]
        if unexpected:
            raise ValueError(f"shard {self.rank} in {directory} holds {unexpected[:8]}, which this rank's stage "
                             f"{self.stage_index} does not have; it was saved from another plan")
        with torch.no_grad():
            for name, value in saved["model"].items():
                target = state[name]
                (target.to_local() if hasattr(target, "to_local") else target).copy_(value)
        if saved["optimizer"] is not None:
            if self.optimizer is None:
                self.optimizer = self.optimizer_fn([p for p in self.module.parameters() if p.requires_grad])
            self.optimizer.load_state_dict(saved["optimizer"])

    def memory_report(self) -> list[dict]:
        """Measured peak memory next to the plan's estimate, one row per rank (on every rank).

        Measured over the last ``step``: CUDA, the allocator's peak (``max_memory_allocated``); CPU
        with ``track_memory=True``, the peak of live tensor storages (parameters, gradients,
        optimizer state, activations, temporaries, received tensors). Otherwise there is no
        per-step measure on the CPU, and the row says so (``measured_peak_bytes`` None, and the
        whole process's peak resident set in ``process_rss_bytes``, which counts the interpreter
        and torch too).
        """
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        how = None
        if self.measured_peak_bytes is not None:
            how = "cuda.max_memory_allocated" if self.device.type == "cuda" else "live storages peak"
        row = {"rank": self.rank, "stage": self.stage_index, "stages": list(self.stage_indices), "replica": self.coords.dp, "shard": self.coords.tp,
               "measured_peak_bytes": self.measured_peak_bytes, "estimated_bytes": self.estimated_memory_bytes,
               "measured_by": how or "not measured (Runner(track_memory=True) measures on the CPU)",
               "process_rss_bytes": int(rss)}
        rows = [None] * self.topology.world
        dist.all_gather_object(rows, row)
        return rows

    # -- pieces ----------------------------------------------------------------------------
    def _microbatches(self, inputs, kwargs: dict) -> tuple[list, list]:
        """This replica's micro-batches (flat, checked) and their sizes by symbol."""
        if isinstance(inputs, dict):
            inputs, kwargs = (), {**inputs, **kwargs}
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        flat = self.plan.signature.flatten(args, kwargs)
        parts = self.mesh["dp"] * self.n_microbatches
        mbs = split_batch(flat, parts, what="Runner inputs")[self.coords.dp * self.n_microbatches:
                                                              (self.coords.dp + 1) * self.n_microbatches]
        for mb in mbs:
            self.plan.signature.check(mb)
        return mbs, [self.plan.signature.bind(mb) for mb in mbs]

    def _targets(self, target) -> list:
        leaves, spec = tree_flatten(target)
        parts = self.mesh["dp"] * self.n_microbatches
        split = split_batch(leaves, parts, what="target")
        mine = split[self.coords.dp * self.n_microbatches:(self.coords.dp + 1) * self.n_microbatches]
        return [tree_unflatten(part, spec) for part in mine]

    def _last_backward(self, stage: int) -> None:
        for sync in self._syncs.get(stage, ()):
            sync.arm()
        if hasattr(self._chunks[stage], "set_requires_gradient_sync"):
            self._chunks[stage].set_requires_gradient_sync(True)

    def _sync_tied_grads(self) -> None:
        names = original_names(self.module)
        params = {names.get(k, k): p for k, p in self.module.named_parameters()}
        for name, group in self._tied:
            param = params[name]
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)

    def _state_keys(self) -> dict:
        return dict(self.plan.state_keys or {})

    def _split_keys(self) -> dict:
        """Model key -> ``Shard`` of the parameters split across tensor-parallel ranks."""
        if self.mesh["tp"] == 1 or self.plan.sharding is None:
            return {}
        shards = self.plan.sharding.param_shards
        names = self._state_keys() or {name: name for name in shards}
        return {key: shards[name] for key, name in names.items() if name in shards}

    def _unflatten(self, values: list):
        if self.plan.out_spec is not None:
            return tree_unflatten(list(values), self.plan.out_spec)
        return values[0] if len(values) == 1 else tuple(values)
