"""python -m partitioner: cost a model's training step (or inference) and plan it on n devices.

Prints the cost per module, then the plan: the device mesh chosen (data x tensor x pipeline
parallel), one row per stage (FLOPs, time, memory, bytes crossing cuts), what each mesh axis
communicates and the candidates tried; and writes a drawing of the plan. Without --model it
plans a built-in 8-layer GPT (passes.zoo.tiny_gpt). With --model module:factory it imports
factory from module (the current directory is on the path); factory() returns (model,
example_inputs) or (model, example_inputs, example_kwargs). Build the model on the meta
device to plan hardware you do not have.

examples:
  python -m partitioner --devices 4 --draw plan.png
  python -m partitioner --strategy pipeline --devices 4 --microbatches 8 --schedule gpipe
  python -m partitioner --mesh dp=2,tp=2,pp=2 --data-parallel shard
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
    parser.add_argument("-n", "--devices", type=int, default=None,
                        help="number of devices (default 4, or the --mesh's product)")
    parser.add_argument("--strategy", default="auto", choices=["auto", "pipeline", "tensor", "data"],
                        help="auto: choose the mesh (default); pipeline / tensor / data: one axis")
    parser.add_argument("--mesh", default="", help="pin the degrees, e.g. dp=2,tp=2,pp=2")
    parser.add_argument("--data-parallel", default=None, choices=["replicate", "shard"],
                        help="data-parallel mode (default: the planner chooses)")
    parser.add_argument("--microbatches", type=int, default=None,
                        help="micro-batches per replica (default: the planner chooses)")
    parser.add_argument("--schedule", default=None, choices=["1f1b", "gpipe", "interleaved-1f1b"],
                        help="pipeline schedule (default: the planner chooses; interleaved-1f1b holds 2 or 4 stages "
                             "per pipeline rank)")
    parser.add_argument("--devices-per-node", type=int, default=8, help="devices sharing the fast link (default 8)")
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
    mesh = _mesh(args.mesh)
    n_devices = args.devices or (mesh["dp"] * mesh["tp"] * mesh["pp"] if mesh else 4)

    from passes import capture, estimate
    from passes.zoo import tiny_gpt
    from . import partition

    with _step("building the model"):
        if args.model:
            model, inputs, kwargs = _load(args.model)
        else:
            model, inputs = tiny_gpt(n_layers=8)
            kwargs = {}
    start = time.perf_counter()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    with _step("capturing and costing"):
        gm = capture(model, inputs, kwargs)            # once: partition reuses the graph and its costs
        est = estimate(gm, inputs, kwargs, device=args.device, training=not args.inference,
                       optimizer=None if args.inference else "adamw")
    print(est.report(depth=2), "\n")
    with _step(f"planning on {n_devices} devices"):
        plan = partition(gm, n_devices, inputs, kwargs, strategy=args.strategy, mesh=mesh,
                         data_parallel=args.data_parallel, device=args.device, training=not args.inference,
                         n_microbatches=args.microbatches, schedule=args.schedule,
                         devices_per_node=args.devices_per_node,
                         memory_limit=int(args.memory_limit_gb * 1e9) if args.memory_limit_gb else None)
    print(plan.report())
    print(f"\nplanned in {time.perf_counter() - start:.1f} s")
    if not any(p.is_meta for p in model.parameters()):
        with torch.no_grad():
            want = model(*inputs, **kwargs)
            same = torch.allclose(plan(*inputs, **kwargs), want, atol=1e-5) if isinstance(want, torch.Tensor) else None
        if same is not None:
            print(f"the plan run in this process (every stage and shard) reproduces the model's output: {same}")
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


def _mesh(text: str) -> dict | None:
    """``"dp=2,tp=2"`` -> ``{"dp": 2, "tp": 2, "pp": 1}``."""
    if not text:
        return None
    mesh = {"dp": 1, "tp": 1, "pp": 1}
    for part in text.split(","):
        axis, _, value = part.partition("=")
        if axis.strip() not in mesh or not value.strip().isdigit():
            raise SystemExit(f"--mesh {text!r}: write axis=degree pairs from dp, tp, pp, e.g. dp=2,tp=2,pp=2")
        mesh[axis.strip()] = int(value)
    return mesh


if __name__ == "__main__":
    raise SystemExit(main())
