"""Where a rank sits in a plan's mesh, and one process group per mesh axis.

Reads the plan's mesh ``{"dp", "tp", "pp"}`` and the process's rank; writes nothing. Ranks
are laid out ``(pp, dp, tp)`` with tp fastest-varying, as torchtitan orders its mesh: the tp
ranks of a stage are neighbours (one node's fast link), data-parallel replicas stride ``tp``,
pipeline neighbours stride ``dp * tp``. The groups come from ``init_device_mesh``. The default
process group is initialised from ``torchrun``'s environment when none exists (gloo on CPU,
NCCL on GPU) and destroyed at exit by whoever made it.
"""
from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Topology", "Coordinates", "init_process_group", "rank_of", "coordinates_of"]


@dataclass(frozen=True)
class Coordinates:
    """A rank's place in the mesh: its pipeline stage, data-parallel replica and tensor shard."""
    pp: int
    dp: int
    tp: int


def rank_of(mesh: dict, pp: int, dp: int, tp: int) -> int:
    return (pp * mesh["dp"] + dp) * mesh["tp"] + tp


def coordinates_of(mesh: dict, rank: int) -> Coordinates:
    tp = rank % mesh["tp"]
    dp = (rank // mesh["tp"]) % mesh["dp"]
    return Coordinates(pp=rank // (mesh["tp"] * mesh["dp"]), dp=dp, tp=tp)


def init_process_group(world_size: int, *, timeout_s: float, unit: str = "device") -> None:
    """Initialise the default group from the environment when none exists; check the world size.

    Raises:
        ValueError: the world size is not ``world_size`` (the message says how to launch).
    """
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != world_size:
        raise ValueError(f"the plan runs on {world_size} {unit}s but the world size is {world}; launch with "
                         f"torchrun --nproc-per-node {world_size} (one rank per {unit})")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        # we made it, we tear it down: a process that exits with gloo's threads still running aborts
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class Topology:
    """This rank's coordinates in the mesh and the process groups of its axes.

    ``group("tp")`` holds this stage's tensor shards of this replica, ``group("dp")`` the same
    shard of the same stage in every replica, ``group("pp")`` this replica's shard in every stage.
    """

    def __init__(self, mesh: dict, *, timeout_s: float = 300.0):
        self.mesh = {k: int(mesh[k]) for k in ("dp", "tp", "pp")}
        world = self.mesh["dp"] * self.mesh["tp"] * self.mesh["pp"]
        init_process_group(world, timeout_s=timeout_s)
        self.rank = dist.get_rank()
        self.world = world
        self.coords = coordinates_of(self.mesh, self.rank)
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        from torch.distributed.device_mesh import init_device_mesh
        self.device_mesh = init_device_mesh(self.device.type, (self.mesh["pp"], self.mesh["dp"], self.mesh["tp"]),
                                            mesh_dim_names=("pp", "dp", "tp"))

    def group(self, axis: str):
        return self.device_mesh[axis].get_group()

    def rank_of(self, pp: int | None = None, dp: int | None = None, tp: int | None = None) -> int:
        """The global rank at the given coordinates (this rank's where one is left out)."""
        c = self.coords
        return rank_of(self.mesh, c.pp if pp is None else pp, c.dp if dp is None else dp, c.tp if tp is None else tp)

    @property
    def first_stage(self) -> bool:
        return self.coords.pp == 0

    @property
    def last_stage(self) -> bool:
        return self.coords.pp == self.mesh["pp"] - 1

    def __str__(self) -> str:
        c = self.coords
        return f"rank {self.rank} (stage {c.pp}, replica {c.dp}, shard {c.tp})"
