"""``python -m partitioner``: plan a model into pipeline stages and show the plan.

Without ``--model`` it plans the built-in GPT (passes.zoo.tiny_gpt). With
``--model module:factory`` it imports ``factory`` from ``module``; the factory returns
``(model, example_inputs)`` or ``(model, example_inputs, example_kwargs)``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch


def _load(spec: str):
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--model {spec!r}: expected module:factory, e.g. mypkg.models:make_model")
    sys.path.insert(0, ".")
    factory = getattr(importlib.import_module(module_name), attr)
    built = factory()
    if not isinstance(built, tuple) or len(built) not in (2, 3):
        raise SystemExit(f"{spec}() must return (model, example_inputs) or (model, example_inputs, example_kwargs)")
    return built if len(built) == 3 else (*built, {})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m partitioner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="module:factory returning (model, inputs[, kwargs]); default: built-in GPT")
    parser.add_argument("-n", "--devices", type=int, default=4, help="number of pipeline stages (default 4)")
    parser.add_argument("--device", default="h100", help="h100, h200, a100 or cpu (default h100)")
    parser.add_argument("--inference", action="store_true", help="plan inference instead of training")
    parser.add_argument("--memory-limit-gb", type=float, help="memory per device in GB (default: the device's)")
    parser.add_argument("--draw", default="plan.dot", help="write the drawing here (.dot, .svg, .png); '' to skip")
    parser.add_argument("--save", default="", help="write the plan's decisions here as JSON")
    args = parser.parse_args(argv)

    from passes import estimate
    from passes.zoo import tiny_gpt
    from . import partition

    if args.model:
        model, inputs, kwargs = _load(args.model)
    else:
        model, inputs = tiny_gpt(n_layers=8)
        kwargs = {}
    start = time.perf_counter()
    est = estimate(model, inputs, kwargs, device=args.device, training=not args.inference,
                   optimizer=None if args.inference else "adamw")
    print(est.report(depth=2), "\n")
    plan = partition(model, args.devices, inputs, kwargs, device=args.device, training=not args.inference,
                     memory_limit=int(args.memory_limit_gb * 1e9) if args.memory_limit_gb else None)
    print(plan.report())
    print(f"\nplanned in {time.perf_counter() - start:.1f} s")
    if not any(p.is_meta for p in model.parameters()):
        with torch.no_grad():
            same = torch.allclose(plan(*inputs, **kwargs), model(*inputs, **kwargs)) \
                if isinstance(model(*inputs, **kwargs), torch.Tensor) else None
        if same is not None:
            print(f"stages run in order reproduce the model's output: {same}")
    if args.draw:
        print(f"drawing: {plan.draw(args.draw)}")
    if args.save:
        print(f"plan saved: {plan.save(args.save)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
