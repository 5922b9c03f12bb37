"""``Plan``: a device mesh ``dp x tp x pp`` and the decisions under it, with the modules that run them.

Reads nothing from graphs itself: ``partitioner.build`` makes the stage and shard GraphModules
from the ``Decisions`` and a costed graph; ``partitioner.simulate_step`` gives ``PlanCost``.
Writes JSON (``save``; ``partitioner.load_plan`` applies it to a model) and drawings.

The decisions are plain data (``Decisions.to_dict`` round-trips through JSON): the mesh, the
cut anchors, the tensor sharding by parameter name, the schedule, micro-batches, data-parallel
mode, optimizer, memory limit and device. Pipeline-only (``{"dp": 1, "tp": 1, "pp": n}``),
tensor-only and data-only plans are corner cases of the same ``Plan``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_unflatten

from .schedules import INTERLEAVED

__all__ = ["Plan", "Stage", "StageShard", "StageCost", "PlanCost", "AxisCost", "Decisions", "PLAN_FORMAT", "AXES",
           "DP_MODES", "split_batch", "concat_outputs"]

PLAN_FORMAT = "fxpart.plan/2"
AXES = ("dp", "tp", "pp")
DP_MODES = ("replicate", "shard")


@dataclass(frozen=True)
class Decisions:
    """Everything a plan decided, as plain data: what ``load_plan`` re-applies without planning again.

    ``cuts`` holds one anchor per cut (``{"node", "module", "op", "index"}``: the first node of the
    next stage, and where it sits in the model, so a capture whose node names shift still maps);
    ``sharding`` the tensor-parallel decisions (parameter name -> ``[dim, blocks]`` and the
    matmul lists), None when ``tp == 1``.
    """
    mesh: dict
    strategy: str = "pipeline"
    cuts: tuple = ()
    sharding: dict | None = None
    schedule: str = "1f1b"
    n_microbatches: int = 1
    data_parallel: str = "replicate"
    training: bool = True
    optimizer: str | None = "adamw"
    memory_limit: int | None = None
    balance: str = "time"
    device: Any = None                 # passes.DeviceSpec
    devices_per_node: int = 8
    precision: str = "fp32"            # "mixed": half-precision parameters, fp32 gradients, master weights, moments
    recompute: bool = False            # every block's activations recomputed in backward (the runtime applies it)
    n_virtual: int = 1                 # pipeline stages per pp rank (interleaved 1F1B: rank r holds r, r + pp, ...)

    def __post_init__(self):
        if set(self.mesh) != set(AXES) or not all(isinstance(v, int) and v >= 1 for v in self.mesh.values()):
            raise ValueError(f"mesh must give a positive int for each of {AXES}, got {self.mesh}")
        if self.data_parallel not in DP_MODES:
            raise ValueError(f"data_parallel={self.data_parallel!r}: use one of {DP_MODES}")
        if not isinstance(self.n_microbatches, int) or self.n_microbatches < 1:
            raise ValueError(f"n_microbatches must be a positive int, got {self.n_microbatches!r}")
        if not isinstance(self.n_virtual, int) or self.n_virtual < 1 or (self.n_virtual > 1) != \
                (self.schedule == INTERLEAVED):
            raise ValueError(f"n_virtual={self.n_virtual!r} stages per pipeline rank with schedule={self.schedule!r}: "
                             f"interleaved-1f1b holds 2 or more, every other schedule 1")
        if len(self.cuts) != self.n_stages - 1:
            raise ValueError(f"a mesh with pp={self.mesh['pp']} and {self.n_virtual} stage(s) per rank needs "
                             f"{self.n_stages - 1} cuts, got {len(self.cuts)}")

    @property
    def n_stages(self) -> int:
        """Pipeline stages: ``pp`` times the stages each pipeline rank holds."""
        return self.mesh["pp"] * self.n_virtual

    @property
    def n_devices(self) -> int:
        return self.mesh["dp"] * self.mesh["tp"] * self.mesh["pp"]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["cuts"] = [dict(c) for c in self.cuts]
        d["device"] = self.device.to_dict() if self.device is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Decisions":
        from passes.devices import DeviceSpec
        d = dict(d)
        d["cuts"] = tuple(dict(c) for c in d.get("cuts", ()))
        d["device"] = DeviceSpec.from_dict(d["device"]) if d.get("device") else None
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class StageCost:
    """Costs of one stage (or one tensor shard of it) on the example batch.

    ``time_s`` is compute (forward + backward when training) of the whole example batch on one
    device, tensor-parallel collectives included; ``comm_s`` sending and receiving what crosses
    its cuts; ``memory_bytes`` what one device holding it needs (parameters, gradients, optimizer
    state as the data-parallel mode keeps them, in-flight activations).
    """
    flops: int
    backward_flops: int
    param_bytes: int
    time_s: float
    comm_s: float
    memory_bytes: int
    saved_bytes: int          # activations one micro-batch keeps for backward
    bytes_in: int             # what crosses the cut before the stage, per example batch
    bytes_out: int            # what crosses the cut after it
    n_nodes: int
    collective_s: float = 0.0  # of time_s: tensor-parallel collectives

    def __post_init__(self):
        if self.n_nodes <= 0:
            raise ValueError("a stage must hold at least one node")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StageShard:
    """One tensor-parallel shard of a stage: the GraphModule tp rank ``index`` runs, and its cost."""
    index: int
    module: torch.fx.GraphModule
    cost: StageCost


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: the GraphModule computing it whole, its cost, and its tensor shards.

    ``shards`` has one ``StageShard`` per tp rank; with tp = 1 it is ``[stage]`` itself.
    """
    index: int
    module: torch.fx.GraphModule
    cost: StageCost
    first_node: str
    last_node: str
    inputs: tuple[str, ...]       # names of the values it receives
    outputs: tuple[str, ...]      # names of the values it sends on (the last stage: the model's outputs)
    tp_shards: tuple = ()

    @property
    def shards(self) -> list:
        return list(self.tp_shards) if self.tp_shards else [self]

    @property
    def param_names(self) -> list[str]:
        return [name for name, _ in self.module.named_parameters()]


@dataclass(frozen=True)
class AxisCost:
    """What one mesh axis communicates in a step: bytes per device, seconds, and how much hides under compute."""
    axis: str
    what: str
    bytes_per_step: int
    time_s: float
    exposed_s: float

    @property
    def overlapped(self) -> bool:
        return self.exposed_s < self.time_s


@dataclass(frozen=True)
class PlanCost:
    """The simulated step of the global batch on the mesh, and memory per device."""
    step_time_s: float
    peak_bytes: int                       # the largest per-device peak
    stage_peak_bytes: tuple[int, ...]     # per pipeline rank (every device of a rank's stages holds the same)
    compute_s: float                      # the busiest pipeline rank's compute per step
    bubble_fraction: float                # idle share of the busiest pipeline rank in the schedule
    optimizer_s: float
    axes: tuple[AxisCost, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes"] = [asdict(a) for a in self.axes]
        return d


@dataclass(frozen=True)
class Plan:
    """A device mesh and the decisions under it, with the modules that run them.

    ``plan(*inputs, **kwargs)`` runs every stage (every tensor shard in lockstep, collectives
    computed over the shards) in this process and returns what the model returns; it takes
    any batch size and sequence length the captured graph accepts (``plan.signature``).
    ``state_keys`` maps every key of the model's ``state_dict()`` (tied aliases included, in
    the model's order) to the name the stage modules hold that tensor under.
    """
    decisions: Decisions
    stages: list[Stage]
    cost: PlanCost
    signature: Any = None                 # passes.signature.InputSignature of the captured graph
    out_spec: Any = None
    model: str = ""
    lower_bound_s: float = 0.0            # max(total / stages, largest node): no cut can beat it
    shared_params: dict = field(default_factory=dict)   # tied parameter -> stages holding it
    state_keys: dict = field(default_factory=dict)
    unplaced: dict = field(default_factory=dict)        # model key -> tensor no stage holds (nothing reads it)
    params: dict = field(default_factory=dict)          # model parameter name -> [shape, dtype]: what the plan depends on
    sharding: Any = None                  # tp > 1: partitioner.tensor.TensorSharding (what was split, why not)
    candidates: tuple = ()                # strategy="auto": partitioner.search.Candidate per mesh tried

    def __post_init__(self):
        if not self.stages:
            raise ValueError("a plan needs at least one stage")
        if len(self.stages) != self.decisions.n_stages:
            raise ValueError(f"the mesh has pp={self.decisions.mesh['pp']} with {self.decisions.n_virtual} stage(s) per "
                             f"rank but the plan has {len(self.stages)} stages")

    # -- the decisions, read through ------------------------------------------------------------
    @property
    def strategy(self) -> str:
        return self.decisions.strategy

    @property
    def mesh(self) -> dict:
        return dict(self.decisions.mesh)

    @property
    def n_devices(self) -> int:
        return self.decisions.n_devices

    @property
    def device(self):
        return self.decisions.device

    @property
    def training(self) -> bool:
        return self.decisions.training

    @property
    def schedule(self) -> str:
        return self.decisions.schedule

    @property
    def n_microbatches(self) -> int:
        return self.decisions.n_microbatches

    @property
    def n_virtual(self) -> int:
        """Pipeline stages each pp rank holds: 1, or ``v`` with interleaved 1F1B (rank r: stages r, r + pp, ...)."""
        return self.decisions.n_virtual

    @property
    def data_parallel(self) -> str:
        return self.decisions.data_parallel

    @property
    def optimizer(self) -> str | None:
        return self.decisions.optimizer

    @property
    def balance(self) -> str:
        return self.decisions.balance

    @property
    def cuts(self) -> tuple[str, ...]:
        """First node of every stage after the first (node names of the graph the cuts were made in)."""
        return tuple(c["node"] for c in self.decisions.cuts)

    @property
    def in_spec(self):
        return self.signature.in_spec if self.signature is not None else None

    # -- running ----------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        flat = self.signature.flatten(args, kwargs) if self.signature is not None else list(args)
        values = self.run_flat(flat)
        if self.out_spec is not None:
            return tree_unflatten(list(values), self.out_spec)
        return values

    def run_flat(self, flat: list) -> tuple:
        """Every stage in order on flat inputs; returns the flat outputs.

        Tensor shards of a stage run in lockstep, each on its own inputs (a sharded activation
        crossing a cut differs per shard), collectives computed over them.
        """
        from .sharding import simulate_shards
        per_shard = [list(flat)] * self.mesh["tp"]
        for stage in self.stages:
            if stage.tp_shards:
                per_shard = simulate_shards([s.module for s in stage.tp_shards], per_shard)
            else:
                per_shard = [stage.module(*per_shard[0])]
            per_shard = [list(v) if isinstance(v, (tuple, list)) else [v] for v in per_shard]
        return tuple(per_shard[0])

    # -- explaining ----------------------------------------------------------------------------
    @property
    def bottleneck_s(self) -> float:
        """Time of the slowest stage on the example batch, compute plus communication."""
        return max(s.cost.time_s + s.cost.comm_s for s in self.stages)

    @property
    def balance_ratio(self) -> float:
        """Slowest stage's compute over the lower bound ``max(total / pp, largest node)`` (1.0 is optimal)."""
        return max(s.cost.time_s for s in self.stages) / self.lower_bound_s if self.lower_bound_s else 1.0

    def report(self) -> str:
        """Tables per stage (and per shard), the mesh's axes with what each communicates, and the choice."""
        from .report import plan_report
        return plan_report(self)

    def __str__(self) -> str:
        return self.report()

    def _repr_pretty_(self, p, cycle):
        p.text(self.report())

    def _repr_svg_(self):
        from .draw import plan_dot, render
        try:
            return render(plan_dot(self), "svg").decode()
        except RuntimeError:
            return None

    def draw(self, path: str, **kwargs) -> str:
        """Write the plan as ``.dot``, ``.svg`` or ``.png`` (by suffix); returns the path."""
        from .draw import draw_plan
        return draw_plan(self, path, **kwargs)

    # -- saving ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT, "model": self.model, "decisions": self.decisions.to_dict(),
            "params": self.params, "state_keys": self.state_keys, "shared_params": self.shared_params,
            "signature": self.signature.to_dict() if self.signature is not None else None,
            "cost": self.cost.to_dict(), "lower_bound_s": self.lower_bound_s,
            "stages": [{"index": s.index, "first_node": s.first_node, "last_node": s.last_node,
                        "params": s.param_names, "cost": s.cost.to_dict(),
                        "shards": [sh.cost.to_dict() for sh in s.tp_shards]} for s in self.stages],
        }

    def save(self, path: str) -> str:
        """Write the plan's decisions as JSON (apply them with ``partitioner.load_plan``)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    def with_candidates(self, candidates) -> "Plan":
        return replace(self, candidates=tuple(candidates))


def split_batch(flat: list, n: int, *, what: str = "inputs") -> list[list]:
    """``n`` lists of flat inputs: every tensor with a dim 0 sliced evenly, other values repeated.

    Raises:
        ValueError: a tensor's dim 0 does not divide by ``n``.
    """
    for v in flat:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] % n:
            raise ValueError(f"{what}: dim 0 of a tensor of shape {tuple(v.shape)} does not split into {n} equal "
                             f"parts (data-parallel replicas x micro-batches); pass a batch that divides")
    chunks = [v.chunk(n) if isinstance(v, torch.Tensor) and v.dim() > 0 else None for v in flat]
    return [[c[i] if c is not None else v for c, v in zip(chunks, flat)] for i in range(n)]


def concat_outputs(parts: list) -> list:
    """Per-part flat outputs joined into one: tensors concatenated on dim 0, 0-d floats averaged."""
    parts = [list(p) if isinstance(p, (tuple, list)) else [p] for p in parts]
    joined = []
    for values in zip(*parts):
        first = values[0]
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            joined.append(torch.cat(values))
        elif isinstance(first, torch.Tensor) and first.is_floating_point():
            joined.append(torch.stack(values).mean())
        else:
            joined.append(first)
    return joined
