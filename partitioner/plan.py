"""``Plan``: the result of partitioning, which explains, draws, saves and runs itself.

Reads the stage GraphModules and their costs; writes JSON (``save``) and drawings.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx
from torch.utils._pytree import tree_unflatten

from passes._util import flatten_inputs, format_bytes, format_count, format_seconds, table

__all__ = ["Plan", "Stage", "StageCost", "PLAN_FORMAT", "split_microbatches", "concat_microbatches"]

PLAN_FORMAT = "fxpart.plan/1"


@dataclass(frozen=True)
class StageCost:
    """Costs of one stage on the example batch; ``time_s`` is compute (forward + backward when training)."""
    flops: int
    backward_flops: int
    param_bytes: int
    time_s: float
    comm_s: float             # sending and receiving what crosses its cuts, at the link bandwidth
    memory_bytes: int         # parameters (+ gradients, optimizer state) + in-flight activations
    saved_bytes: int          # activations one micro-batch keeps for backward
    bytes_in: int             # what crosses the cut before the stage, per example batch
    bytes_out: int            # what crosses the cut after it
    n_nodes: int

    def __post_init__(self):
        if self.n_nodes <= 0:
            raise ValueError("a stage must hold at least one node")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage (or tensor shard): a runnable GraphModule and its cost."""
    index: int
    module: torch.fx.GraphModule
    cost: StageCost
    first_node: str
    last_node: str
    inputs: tuple[str, ...]       # names of the values it receives
    outputs: tuple[str, ...]      # names of the values it sends on (the last stage: the model's outputs)

    @property
    def param_names(self) -> list[str]:
        return [name for name, _ in self.module.named_parameters()]


@dataclass(frozen=True)
class Plan:
    """A partition of a model: stages in order, their costs, and how to run them.

    ``plan(*inputs, **kwargs)`` runs every stage in order in this process and returns
    what the model returns. When ``runs_microbatches`` is set (``partition(...,
    n_microbatches=m)``), the stage modules were captured for one micro-batch (shapes in
    ``microbatch_shapes``): a full batch is then split into ``n_microbatches`` slices on dim 0,
    run slice by slice, and the outputs concatenated on dim 0 (0-d float outputs, such as a
    mean loss, are averaged).

    ``state_keys`` maps every key of the model's ``state_dict()`` (tied aliases included,
    in the model's order) to the name the stage modules hold that tensor under.
    """
    strategy: str
    stages: list[Stage]
    device: Any                                  # passes.DeviceSpec
    training: bool
    schedule: str
    n_microbatches: int
    lower_bound_s: float                         # max(total / n, largest node), compute only
    cuts: tuple[str, ...]                        # first node of every stage after the first
    shared_params: dict = field(default_factory=dict)   # parameter name -> stages holding it (tied)
    in_spec: Any = None
    out_spec: Any = None
    model: str = ""
    fingerprint: str = ""
    balance: str = "time"
    runs_microbatches: bool = False              # stage modules take batch / n_microbatches
    microbatch_shapes: tuple = ()                # flat input shapes the stage modules take (None: not a tensor)
    state_keys: dict = field(default_factory=dict)   # model state_dict key -> stage attribute name
    sharding: Any = None                         # tensor plans: partitioner.tensor.TensorSharding

    def __post_init__(self):
        if not self.stages:
            raise ValueError("a plan needs at least one stage")

    # -- running ----------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        flat = flatten_inputs(self.in_spec, args, kwargs)
        if self.runs_microbatches and _shapes(flat) != list(self.microbatch_shapes):
            parts = [self._run_flat(mb) for mb in split_microbatches(flat, self.n_microbatches)]
            values = concat_microbatches(parts)
        else:
            values = self._run_flat(flat)
        if self.out_spec is not None:
            return tree_unflatten(list(values), self.out_spec)
        return values

    def _run_flat(self, flat: list):
        if self.sharding is not None:            # tensor plan: all shards in lockstep, collectives simulated
            return tuple(self.sharding.simulate([s.module for s in self.stages], flat))
        values: Any = tuple(flat)
        for stage in self.stages:
            values = stage.module(*values)
        return values

    # -- explaining ----------------------------------------------------------------------------
    @property
    def bottleneck_s(self) -> float:
        """Time of the slowest stage, compute plus communication."""
        return max(s.cost.time_s + s.cost.comm_s for s in self.stages)

    @property
    def balance_ratio(self) -> float:
        """Slowest stage's compute over the lower bound ``max(total / n, largest node)`` (1.0 is optimal)."""
        return max(s.cost.time_s for s in self.stages) / self.lower_bound_s if self.lower_bound_s else 1.0

    def report(self) -> str:
        """A table with one row per stage, and the balance against the lower bound."""
        if self.sharding is not None:
            from .tensor import tensor_report
            return tensor_report(self)
        rows = []
        for s in self.stages:
            c = s.cost
            rows.append((s.index, c.n_nodes, f"{s.first_node} .. {s.last_node}", format_bytes(c.param_bytes),
                         format_count(c.flops), format_count(c.backward_flops), format_seconds(c.time_s),
                         format_seconds(c.comm_s), format_bytes(c.memory_bytes), format_bytes(c.bytes_in)))
        head = (f"{self.strategy} plan of {self.model or 'model'}: {len(self.stages)} stages on "
                f"{getattr(self.device, 'name', self.device)}, "
                f"{'training' if self.training else 'inference'}, schedule {self.schedule}, "
                f"{self.n_microbatches} micro-batches; balanced by {self.balance}")
        body = table(["stage", "nodes", "span", "params", "FLOPs", "bwd FLOPs", "time", "comm", "memory",
                      "bytes in"], rows, align="rrlrrrrrrr")
        tail = [f"slowest stage {format_seconds(self.bottleneck_s)} (compute + comm); compute / lower bound "
                f"{self.balance_ratio:.3f} (lower bound {format_seconds(self.lower_bound_s)})"]
        if self.shared_params:
            tail.append("shared (tied) parameters, kept in sync by the runtime: "
                        + ", ".join(f"{k} on stages {v}" for k, v in self.shared_params.items()))
        return "\n".join([head, "", body, ""] + tail)

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
            "format": PLAN_FORMAT, "strategy": self.strategy, "model": self.model,
            "fingerprint": self.fingerprint, "training": self.training, "schedule": self.schedule,
            "n_microbatches": self.n_microbatches, "balance": self.balance, "cuts": list(self.cuts),
            "lower_bound_s": self.lower_bound_s, "device": self.device.to_dict(),
            "shared_params": self.shared_params, "runs_microbatches": self.runs_microbatches,
            "microbatch_shapes": [list(s) if s is not None else None for s in self.microbatch_shapes],
            "state_keys": self.state_keys,
            "stages": [{"index": s.index, "first_node": s.first_node, "last_node": s.last_node,
                        "params": s.param_names, "cost": s.cost.to_dict()} for s in self.stages],
            **({"sharding": self.sharding.decisions()} if self.sharding is not None else {}),
        }

    def save(self, path: str) -> str:
        """Write the plan's decisions as JSON (apply them with ``partitioner.load_plan``)."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path


def _shapes(flat: list) -> list:
    return [tuple(v.shape) if isinstance(v, torch.Tensor) else None for v in flat]


def split_microbatches(flat: list, n_microbatches: int) -> list[list]:
    """``n_microbatches`` lists of flat inputs: every tensor with a dim 0 sliced evenly, other values repeated.

    Raises:
        ValueError: a tensor's dim 0 does not divide by ``n_microbatches``.
    """
    for v in flat:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] % n_microbatches:
            raise ValueError(f"dim 0 of an input of shape {tuple(v.shape)} does not split into "
                             f"n_microbatches={n_microbatches} equal micro-batches; pass a batch that divides")
    chunks = [v.chunk(n_microbatches) if isinstance(v, torch.Tensor) and v.dim() > 0 else None for v in flat]
    return [[c[i] if c is not None else v for c, v in zip(chunks, flat)] for i in range(n_microbatches)]


def concat_microbatches(parts: list) -> list:
    """Per-micro-batch flat outputs joined into one: tensors concatenated on dim 0, 0-d floats averaged."""
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
