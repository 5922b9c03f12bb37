"""fxpart runtime: execute a plan across processes with torch.distributed, one rank per device of its mesh.

Schedules are data (``partitioner.schedules``, below both planner and runtime); ``Runner``
composes this rank's place in the mesh (``topology``), its stage's tensor shard with Megatron's
collectives (``tensor_parallel``), data-parallel gradient averaging or FSDP2 sharding
(``data_parallel``), the schedule's actions (``pipeline``), memory measurement (``memory``) and
checkpoints (``checkpoint``).
"""
from partitioner.schedules import Action, gpipe, one_f_one_b, simulate, to_chrome_trace

from .checkpoint import merge_shards, merge_state_dicts
from .launch import launch_local, run_local
from .pipeline import StageError
from .pipelining import PipeliningSchedule, pipelining_schedule
from .runner import Runner
from .topology import Topology

__all__ = ["Runner", "StageError", "Topology", "merge_shards", "merge_state_dicts", "pipelining_schedule",
           "PipeliningSchedule", "Action", "gpipe", "one_f_one_b", "simulate", "to_chrome_trace", "launch_local",
           "run_local"]
