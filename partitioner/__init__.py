"""fxpart partitioner: cut a captured graph into pipeline stages.

>>> from partitioner import partition
>>> from passes.zoo import tiny_gpt
>>> model, inputs = tiny_gpt(n_layers=4)
>>> plan = partition(model, 2, inputs, device="h100")
>>> len(plan.stages)
2
"""
from .partition import STRATEGIES, load_plan, partition
from .plan import Plan, Stage, StageCost

__all__ = ["partition", "load_plan", "Plan", "Stage", "StageCost", "STRATEGIES"]
