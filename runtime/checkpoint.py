"""Whole and sharded state of a model trained over a mesh.

Reads each rank's module (a stage's tensor shard, possibly sharded over its data-parallel
replicas as DTensors) and the plan's ``state_keys`` (model key -> the name the stage holds it
under) and split parameters; writes files (``save_shard``) and returns state dicts under the
model's own keys. Joining runs the three axes backwards: a data-parallel shard is gathered
along dim 0 (``fully_shard``'s layout), a tensor shard joined along its split dim (fused q|k|v
block by block), and the stages merged (a tied parameter held by several stages taken once).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .tensor_parallel import join_shards

__all__ = ["local_state", "gather_full_state", "merge_state_dicts", "merge_shards", "shard_file"]


def local_state(module: torch.nn.Module, *, full_over_dp: bool, names: dict | None = None) -> dict:
    """This rank's tensors by the stage graph's names, on the CPU; ``full_over_dp`` gathers data-parallel
    shards (a collective every replica must join), else each DTensor gives its local piece. ``names`` maps
    a wrapped module's names back to the stage graph's (``data_parallel.original_names``)."""
    names = names or {}
    out = {}
    for name, t in module.state_dict().items():
        if hasattr(t, "full_tensor"):
            t = t.full_tensor() if full_over_dp else t.to_local()
        out[names.get(name, name)] = t.detach().cpu()
    return out


def gather_full_state(local: dict, *, coords, mesh: dict, state_keys: dict, split: dict,
                      unplaced: dict | None = None) -> dict | None:
    """The whole model's state dict on rank 0 (None elsewhere) from every rank's ``local`` state.

    ``split`` maps a model key to the ``Shard`` layout of a tensor-parallel split parameter;
    ``unplaced`` (``plan.unplaced``) holds the entries no stage holds.
    """
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(((coords.pp, coords.dp, coords.tp), local), parts, dst=0)
    if dist.get_rank() != 0:
        return None
    return assemble([p for p in parts], mesh=mesh, state_keys=state_keys, split=split, unplaced=unplaced)


def assemble(parts: list, *, mesh: dict, state_keys: dict, split: dict, dp_sharded: dict | None = None,
             unplaced: dict | None = None) -> dict:
    """One state dict from ``[((pp, dp, tp), state by module name), ...]`` of every rank.

    ``dp_sharded``: module name -> True for tensors whose pieces are data-parallel shards
    (concatenated along dim 0 over the replicas); otherwise replica 0's copy is taken.
    ``unplaced``: model key -> tensor for the entries no stage holds (nothing reads them).
    """
    unplaced = unplaced or {}
    by = {coords: state for coords, state in parts}
    out: dict = {}
    keys = list(state_keys) or sorted({k for _, s in parts for k in s})
    for key in keys:
        name = state_keys.get(key, key)
        for pp in range(mesh["pp"]):
            if name not in by.get((pp, 0, 0), {}):
                continue
            shards = []
            for tp in range(mesh["tp"]):
                pieces = [by[(pp, dp, tp)][name] for dp in range(mesh["dp"])]
                shards.append(torch.cat(pieces) if dp_sharded and dp_sharded.get(name) else pieces[0])
            out[key] = join_shards(shards, split[key]) if key in split and mesh["tp"] > 1 else shards[0]
            break
        else:
            if key in unplaced:
                out[key] = unplaced[key].detach().cpu().clone()
                continue
            raise KeyError(f"no stage holds {key!r} (module name {name!r}): parameters no graph node reads are not "
                           f"placed on any stage")
    return out


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


def shard_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"shard-{rank}.pt")


def merge_shards(directory: str) -> dict:
    """The whole model's state dict from the ``shard-<rank>.pt`` files ``Runner.save_shard`` wrote (any mesh).

    Raises:
        ValueError: shards are missing or come from different plans.
    """
    paths = sorted(p for p in os.listdir(directory) if p.startswith("shard-") and p.endswith(".pt"))
    shards = [torch.load(os.path.join(directory, p), weights_only=False) for p in paths]
    if not shards:
        raise ValueError(f"{directory} holds no shard-<rank>.pt files")
    mesh = shards[0]["mesh"]
    world = mesh["dp"] * mesh["tp"] * mesh["pp"]
    if len(shards) != world or any(s["mesh"] != mesh for s in shards):
        raise ValueError(f"{directory} holds {len(shards)} shards of meshes {sorted({str(s['mesh']) for s in shards})}; "
                         f"a checkpoint of mesh {mesh} needs {world}")
    parts = [(tuple(s["coords"]), s["model"]) for s in shards]
    dp_sharded = {name: True for s in shards for name in (s.get("dp_sharded") or {})}   # every stage's
    return assemble(parts, mesh=mesh, state_keys=shards[0]["state_keys"], split=shards[0]["split"],
                    dp_sharded=dp_sharded, unplaced={k: t for s in shards for k, t in (s.get("unplaced") or {}).items()})
