"""fxpart runtime: execute a partition plan across processes with torch.distributed.

Schedules are data (``partitioner.schedules``, below both planner and runtime); ``Runner`` interprets them, one stage (or tensor shard) per rank.
"""
from .runner import Runner, StageError, merge_shards, merge_state_dicts
from .tensor_runner import TensorRunner
from .pipelining import PipeliningSchedule, pipelining_schedule
from partitioner.schedules import Action, gpipe, one_f_one_b, simulate, to_chrome_trace
from .launch import launch_local

__all__ = ["Runner", "TensorRunner", "StageError", "merge_shards", "merge_state_dicts", "pipelining_schedule", "PipeliningSchedule",
           "Action", "gpipe", "one_f_one_b", "simulate", "to_chrome_trace", "launch_local"]
