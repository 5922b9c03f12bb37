"""fxpart runtime: execute a partition plan across processes with torch.distributed.

Schedules are data (``runtime.schedules``); ``Runner`` interprets them, one stage per rank.
"""
from .runner import Runner, StageError
from .schedules import Action, gpipe, one_f_one_b, simulate, to_chrome_trace

__all__ = ["Runner", "StageError", "Action", "gpipe", "one_f_one_b", "simulate", "to_chrome_trace"]
