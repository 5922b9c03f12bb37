"""Run a plan's stages under ``torch.distributed.pipelining``'s schedules (GPipe, 1F1B, interleaved, zero bubble).

Reads a pipeline ``Plan`` (stage GraphModules, ``shared_params``, its input signature and
``out_spec``); builds one ``PipelineStage`` per stage this rank holds. The stage modules are
used as they are (no copy); they take any batch size, so they run micro-batches of
``batch / m``. Tied parameters (an embedding and its head on different ranks) get their
gradients summed across the ranks holding them, which ``pipelining`` itself does not do.

>>> sched = pipelining_schedule(plan, dist.get_rank(), "1F1B", n_microbatches=4, loss_fn=F.mse_loss)
>>> opt = torch.optim.SGD(sched.parameters(), lr=0.1)
>>> loss = sched.step((x,), y, opt)
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.fx
from torch.utils._pytree import tree_unflatten


__all__ = ["pipelining_schedule", "PipeliningSchedule", "SINGLE_STAGE", "MULTI_STAGE"]

SINGLE_STAGE = ("GPipe", "1F1B")                               # one stage per rank
MULTI_STAGE = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble")   # several per rank
_V_SHAPED = ("ZBVZeroBubble",)                                  # rank r holds stages r and 2p - 1 - r


class PipeliningSchedule:
    """A ``torch.distributed.pipelining`` schedule over a plan's stages, with tied-gradient sync.

    ``schedule`` and ``stages`` are torch's objects; ``step`` runs one training step.
    """

    def __init__(self, schedule, stages: list, stage_indices: list[int], n_stages: int, signature, tied: list,
                 last_rank: int):
        self.schedule, self.stages, self.stage_indices = schedule, stages, stage_indices
        self._last_rank = last_rank
        self.n_stages, self.signature, self._tied = n_stages, signature, tied

    def parameters(self) -> list[torch.nn.Parameter]:
        """This rank's parameters, each once (stages on one rank may share a tied parameter)."""
        seen, out = set(), []
        for stage in self.stages:
            for p in stage.submod.parameters():
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    out.append(p)
        return out

    def step(self, inputs, target, optimizer: torch.optim.Optimizer | None = None, **kwargs) -> float | None:
        """One step over the whole batch; returns the mean micro-batch loss on every rank.

        ``inputs``: positional inputs (a tuple or one tensor); every rank may pass them, only the
        rank holding stage 0 uses them. Gradients of tied parameters are summed across ranks,
        then ``optimizer`` (if given) steps and zeroes them.
        """
        args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
        flat = self.signature.flatten(tuple(args), kwargs)
        losses: list = []
        has_first, has_last = 0 in self.stage_indices, self.n_stages - 1 in self.stage_indices
        call_args = flat if has_first else ()
        self.schedule.step(*call_args, target=target if has_last else None, losses=losses if has_last else None)
        for param, group in self._tied:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=group)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss = torch.stack([l.detach().float() for l in losses]).mean() if has_last else torch.zeros(())
        dist.broadcast(loss, src=self._last_rank)
        return float(loss)


def pipelining_schedule(plan, rank: int, schedule: str = "1F1B", *, n_microbatches: int,
                        loss_fn: Callable | None = None, device: torch.device | None = None,
                        group=None) -> PipeliningSchedule:
    """Build ``PipelineStage``s from ``plan``'s stage modules for ``rank`` and a torch schedule over them.

    Args:
        plan: a ``Plan`` with tp = dp = 1 (``strategy="pipeline"``).
        rank: this process's rank in the default (or given) process group.
        schedule: ``"GPipe"`` or ``"1F1B"`` (one stage per rank: ``len(plan.stages) == world``), or
            ``"Interleaved1F1B"``, ``"LoopedBFS"``, ``"InterleavedZeroBubble"`` (rank r holds stages
            r, r + world, ...) or ``"ZBVZeroBubble"`` (rank r holds stages r and 2 * world - 1 - r).
        n_microbatches: micro-batches per step.
        loss_fn: ``loss_fn(outputs, target_mb)`` on the model's outputs (unflattened); mean-reduced
            losses give full-batch gradients (torch scales gradients by 1 / n_microbatches).

    Raises:
        ValueError: an unknown schedule, or a stage count the schedule cannot place on the world.
    """
    from torch.distributed import pipelining as pp
    if plan.mesh["tp"] > 1 or plan.mesh["dp"] > 1:
        raise ValueError(f"pipelining_schedule runs pipeline-only plans; this plan's mesh is {plan.mesh}: run it with "
                         f"runtime.Runner")
    for stage in plan.stages[1:]:
        sizes = [n.name for n in stage.module.graph.nodes if n.op == "placeholder"
                 and not isinstance(n.meta.get("val"), torch.Tensor)]
        if sizes:
            raise ValueError(f"stage {stage.index} takes sizes {sizes} (ints) from the stage before, and "
                             f"torch.distributed.pipelining passes only tensors between stages; run the plan with "
                             f"runtime.Runner, or pin cuts where every size can be read off a tensor (cuts=...)")
    world = dist.get_world_size(group)
    n_stages = len(plan.stages)
    indices = _stage_indices(schedule, rank, world, n_stages)
    device = device or torch.device("cpu")
    stages = [pp.PipelineStage(_contiguous_outputs(plan.stages[i].module.to(device)), i, n_stages, device,
                               group=group) for i in indices]
    wrapped = None if loss_fn is None else _model_loss(loss_fn, plan.out_spec)
    cls = getattr(pp, f"Schedule{schedule}")
    torch_schedule = cls(stages[0] if schedule in SINGLE_STAGE else stages, n_microbatches, loss_fn=wrapped)
    tied = _tied_groups(plan.shared_params, stages, indices, schedule, world, n_stages)
    return PipeliningSchedule(torch_schedule, stages, indices, n_stages, plan.signature, tied,
                              _owner(n_stages - 1, schedule, world))


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _contiguous_grad(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return _ContiguousGrad.apply(x)
    return x


def _contiguous_outputs(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule sharing ``gm``'s parameters whose tensor outputs are contiguous (gloo sends no strided views)."""
    graph = torch.fx.Graph()
    env: dict = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":   # gradients sent back to the previous stage must be contiguous too
            env[node] = graph.call_function(_contiguous_grad, (graph.node_copy(node, lambda a: env[a]),))
            env[node].meta = dict(node.meta)
        elif node.op == "output":
            outs = node.args[0]
            seq = outs if isinstance(outs, (tuple, list)) else (outs,)
            made = tuple(graph.call_method("contiguous", (env[o],)) if isinstance(o, torch.fx.Node) else o for o in seq)
            graph.output(made if isinstance(outs, (tuple, list)) else made[0])
        else:
            env[node] = graph.node_copy(node, lambda a: env[a])
    return torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def _stage_indices(schedule: str, rank: int, world: int, n_stages: int) -> list[int]:
    if schedule not in SINGLE_STAGE + MULTI_STAGE:
        raise ValueError(f"schedule={schedule!r} is not supported; use one of {SINGLE_STAGE + MULTI_STAGE}")
    if schedule in SINGLE_STAGE:
        if n_stages != world:
            raise ValueError(f"{schedule} runs one stage per rank: the plan has {n_stages} stages for {world} ranks; "
                             f"plan with partition(..., schedule='1f1b') for one stage per rank, or run a multi-stage "
                             f"schedule ({', '.join(MULTI_STAGE)})")
        return [rank]
    if n_stages % world or n_stages == world:
        raise ValueError(f"{schedule} needs several stages per rank: partition into a multiple of {world} "
                         f"(e.g. {2 * world}) stages, got {n_stages}")
    if schedule in _V_SHAPED:
        if n_stages != 2 * world:
            raise ValueError(f"{schedule} places 2 stages per rank: partition into {2 * world} stages")
        return [rank, 2 * world - 1 - rank]
    return list(range(rank, n_stages, world))


def _owner(stage: int, schedule: str, world: int) -> int:
    if schedule in _V_SHAPED and stage >= world:
        return 2 * world - 1 - stage
    return stage % world


def _tied_groups(shared: dict, stages: list, indices: list[int], schedule: str, world: int, n_stages: int) -> list:
    """(parameter, process group) for each tied parameter held on several ranks; made in the same order everywhere."""
    groups, by_ranks = [], {}
    for name, holders in sorted(shared.items()):
        ranks = tuple(sorted({_owner(s, schedule, world) for s in holders}))
        if len(ranks) < 2:
            continue   # one rank holds every copy: they are one Parameter object, gradients already add
        if ranks not in by_ranks:
            by_ranks[ranks] = dist.new_group(list(ranks))
        mine = [st for st, i in zip(stages, indices) if i in holders]
        if mine:
            groups.append((dict(mine[0].submod.named_parameters())[name], by_ranks[ranks]))
    return groups


def _model_loss(loss_fn: Callable, out_spec):
    def loss(outputs, target):
        flat = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
        return loss_fn(tree_unflatten(flat, out_spec) if out_spec is not None else
                       (flat[0] if len(flat) == 1 else tuple(flat)), target)
    return loss
