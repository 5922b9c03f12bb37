"""python -m partitioner: cost a model's training step (or inference) and cut it into pipeline stages.

Prints the cost per module, then one row per stage (FLOPs, time, memory, bytes crossing
cuts), and writes a drawing of the plan. Without --model it plans a built-in 8-layer
GPT (passes.zoo.tiny_gpt). With --model module:factory it imports factory from module
(the current directory is on the path); factory() returns (model, example_inputs) or
(model, example_inputs, example_kwargs). Build the model on the meta device to plan
hardware you do not have.

examples:
  python -m partitioner --devices 4 --draw plan.png
  python -m partitioner --model mypkg.models:make --devices 8 --device h200 --save plan.json
  python -m partitioner --chart stages.png --timeline timeline.png   (needs matplotlib; .txt without)
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import sys
import threading
import time

import torch


@contextlib.contextmanager
def _step(what: str):
    """A spinner with elapsed seconds on stderr while ``what`` runs, when stderr is a terminal; else silent."""
    if not sys.stderr.isatty():
        yield
        return
    done = threading.Event()
    start = time.perf_counter()

    def spin():
        for frame in itertools.cycle("|/-\\"):
            sys.stderr.write(f"\r{frame} {what} ({time.perf_counter() - start:.0f} s)")
            sys.stderr.flush()
            if done.wait(0.2):
                break
    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        sys.stderr.write(f"\r{what}: {time.perf_counter() - start:.1f} s\033[K\n")
        sys.stderr.flush()


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
    parser.add_argument("--depth", type=int, default=2, help="module path depth of the drawing's boxes (default 2)")
    parser.add_argument("--save", default="", help="write the plan's decisions here as JSON")
    parser.add_argument("--chart", default="", help="per-stage time and memory bars (.png/.svg with matplotlib, .txt)")
    parser.add_argument("--timeline", default="",
                        help="the 1F1B schedule in time: .png/.svg (matplotlib), .json (Chrome trace) or .txt")
    args = parser.parse_args(argv)

    from passes import estimate
    from passes.zoo import tiny_gpt
    from . import partition

    with _step("building the model"):
        if args.model:
            model, inputs, kwargs = _load(args.model)
        else:
            model, inputs = tiny_gpt(n_layers=8)
            kwargs = {}
    start = time.perf_counter()
    with _step("capturing and costing"):
        est = estimate(model, inputs, kwargs, device=args.device, training=not args.inference,
                       optimizer=None if args.inference else "adamw")
    print(est.report(depth=2), "\n")
    with _step(f"partitioning into {args.devices} stages"):
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
        with _step("drawing"):
            path = plan.draw(args.draw, depth=args.depth)
        print(f"drawing: {path}")
    if args.chart:
        from .draw import stage_chart
        stage_chart(plan, args.chart)
        print(f"stage chart: {args.chart}")
    if args.timeline:
        from .draw import schedule_timeline
        timeline = schedule_timeline(plan, args.timeline)
        print(f"timeline: {args.timeline} (step {timeline.total_s * 1e3:.3f} ms, "
              f"bubble {max(timeline.bubble_fraction):.0%})")
    if args.save:
        print(f"plan saved: {plan.save(args.save)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
