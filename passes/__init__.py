"""fxpart passes: capture a model as an ATen graph and annotate it with costs.

>>> from passes import capture, estimate
>>> from passes.zoo import tiny_gpt
>>> model, inputs = tiny_gpt()
>>> est = estimate(model, inputs, training=True, optimizer="adamw", device="h100")
>>> est.flops > 0
True
"""
import logging as _logging
import os as _os

from .capture import CaptureError, capture, is_captured
from .devices import DEVICES, DeviceSpec, get_device_spec
from .estimate import Estimate, NodeCost, annotate_costs, estimate
from .timing import measure_node_times
from .backend import FxpartBackend, GraphRecord, compile_backend, register_backends as _register_backends
from . import draw
from .finetune import (Candidate, Classifier, FinetunePlan, LoRALinear, NewHead, attach_classifier, attach_lm_head,
                       finetune, insert_lora)
from .monitor import MemoryReport, measure_step
from .fit import FitResult, FitRound, fit_memory
from .recompute import RecomputePlan, recompute

__all__ = ["capture", "CaptureError", "is_captured", "estimate", "Estimate", "NodeCost", "annotate_costs",
           "DeviceSpec", "get_device_spec", "DEVICES", "measure_node_times", "compile_backend", "FxpartBackend",
           "GraphRecord", "draw", "finetune", "FinetunePlan", "Candidate", "LoRALinear", "insert_lora",
           "attach_classifier", "attach_lm_head", "Classifier", "NewHead", "measure_step", "MemoryReport",
           "recompute", "RecomputePlan", "fit_memory", "FitResult", "FitRound"]

_register_backends()   # backend="fxpart" (Inductor) and "fxpart_eager"; safe to run again

if _os.environ.get("FXPART_DEBUG") == "1":
    for _name in ("passes", "partitioner", "runtime"):
        _logging.getLogger(_name).setLevel(_logging.DEBUG)
    _logging.basicConfig()
