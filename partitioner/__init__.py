"""fxpart partitioner: choose a device mesh (data, tensor and pipeline parallelism) for a captured graph.

>>> from partitioner import partition
>>> from passes.zoo import tiny_gpt
>>> model, inputs = tiny_gpt(n_layers=4)
>>> plan = partition(model, 2, inputs, strategy="pipeline", device="h100")
>>> len(plan.stages), plan.mesh
(2, {'dp': 1, 'tp': 1, 'pp': 2})
"""
from .partition import STRATEGIES, agreed_device_spec, load_plan, partition
from .plan import AxisCost, Decisions, Plan, PlanCost, Stage, StageCost, StageShard
from .search import Candidate

__all__ = ["partition", "load_plan", "Plan", "Stage", "StageShard", "StageCost", "PlanCost", "AxisCost", "Decisions",
           "Candidate", "STRATEGIES", "agreed_device_spec"]
