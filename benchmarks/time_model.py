"""How good is the time model on this CPU? Roofline and measured per-node times vs reality.

Builds a small Hugging Face GPT-2 from its config (random weights, fp32, eval), captures it,
and compares three per-node figures for its forward on the example batch:

* ``roofline``: ``estimate(gm, ..., device="cpu")`` (roofline from this CPU's measured spec);
* ``alone``: ``measure_node_times`` (each op timed alone, median of repeats and rounds);
* ``in forward``: each op's own time inside the real forward (``torch.profiler``, median).

The matmul-class nodes (FLOPs > 0: addmm, linear, attention) are compared per node
(relative error, Spearman rank correlation); the whole forward is compared against the
roofline total and against ``estimate(..., node_times=alone)``. Writes
``benchmarks/results/time_model.md``. Run: ``python benchmarks/time_model.py`` (~20 s).
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from dataclasses import replace

import _common  # noqa: F401 - puts the repository root on sys.path
import torch
from _common import md_table, median, spearman, write_result

from passes import DeviceSpec, capture, estimate, measure_node_times
from passes.devices import measure_cpu


def build_gpt2(*, n_layer: int, n_embd: int, n_head: int, vocab: int, batch: int, seq: int):
    """A GPT-2 with random weights in eval mode, and a batch of token ids."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()   # bos/eos ids outside a 1000-token vocabulary: harmless here
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab, n_positions=seq,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval(), torch.randint(0, vocab, (batch, seq))


def forward_seconds(gm, ids, *, runs: int) -> list[float]:
    """Wall times of ``runs`` real forwards (after one warm-up)."""
    times = []
    with torch.no_grad():
        gm(ids)
        for _ in range(runs):
            start = time.perf_counter()
            gm(ids)
            times.append(time.perf_counter() - start)
    return times


def profiled_node_seconds(gm, ids) -> dict[str, float]:
    """Each ATen node's own time inside one real forward, from the profiler.

    The profiler's top-level ``aten::`` events come in graph order, so the i-th event of an
    op is the i-th graph node of that op; an op whose counts disagree is left out.
    """
    from torch.profiler import ProfilerActivity, profile

    nodes_by_op = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            nodes_by_op["aten::" + node.target.overloadpacket.__name__].append(node.name)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        gm(ids)
    events_by_op = defaultdict(list)
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        top_level = ev.cpu_parent is None or not ev.cpu_parent.name.startswith("aten::")
        if top_level and ev.name in nodes_by_op:
            events_by_op[ev.name].append(ev.cpu_time_total * 1e-6)
    return {name: seconds for op, names in nodes_by_op.items() if len(events_by_op[op]) == len(names)
            for name, seconds in zip(names, events_by_op[op])}


def median_per_node(runs: list[dict[str, float]]) -> dict[str, float]:
    return {name: median(r[name] for r in runs if name in r) for name in runs[0]}


def median_spec(specs: list[DeviceSpec]) -> DeviceSpec:
    """A CPU spec whose figures are the medians of several measurements."""
    flops = {dtype: median(s.peak_flops[dtype] for s in specs) for dtype in specs[0].peak_flops}
    bandwidth = median(s.memory_bandwidth_Bps for s in specs)
    return replace(specs[0], peak_flops=flops, memory_bandwidth_Bps=bandwidth, link_bandwidth_Bps=bandwidth / 4)


def measure_interleaved(gm, ids, args) -> dict:
    """Every measurement in rounds, interleaved, so a busy spell of this shared machine hits them alike."""
    specs, alone, in_fwd, forward = [], [], [], []
    for _ in range(args.rounds):
        measure_cpu.cache_clear()
        specs.append(measure_cpu())
        alone.append(measure_node_times(gm, (ids,), repeats=args.repeats))
        in_fwd += [profiled_node_seconds(gm, ids) for _ in range(args.runs)]
        forward += forward_seconds(gm, ids, runs=args.runs)
    return {"spec": median_spec(specs), "alone": median_per_node(alone), "in_fwd": median_per_node(in_fwd),
            "forward_s": median(forward), "specs": specs}


def compare(est: dict[str, float], truth: dict[str, float], names: list[str]) -> list:
    """[nodes, median and max relative error, Spearman's rho] of ``est`` against ``truth`` over ``names``."""
    names = [n for n in names if n in est and truth.get(n)]
    errs = [abs(est[n] - truth[n]) / truth[n] for n in names]
    rho = spearman([est[n] for n in names], [truth[n] for n in names])
    return [len(names), f"{median(errs):.1%}", f"{max(errs):.1%}", f"{rho:.2f}"]


def run(args) -> str:
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    model, ids = build_gpt2(n_layer=args.layers, n_embd=args.embd, n_head=args.heads, vocab=args.vocab,
                            batch=args.batch, seq=args.seq)
    gm = capture(model, (ids,))
    m = measure_interleaved(gm, ids, args)
    est = estimate(gm, (ids,), device=m["spec"])
    override = estimate(gm, (ids,), device=m["spec"], node_times=m["alone"])
    roofline = {r.name: r.forward_time_s for r in est.nodes}
    matmuls = [r.name for r in est.nodes if r.flops > 0]
    others = [r.name for r in est.nodes if r.flops == 0 and r.forward_time_s > 0]
    text = report(args, m, est, override, roofline, matmuls, others)
    fp32 = [s.flops_per_s(torch.float32) / 1e9 for s in m["specs"]]
    return text + (f"\n\nNoise: fp32 matmul peak measured {min(fp32):.0f}-{max(fp32):.0f} GFLOP/s over the rounds; "
                   f"load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end. "
                   f"Benchmark wall time: {time.perf_counter() - t0:.1f} s.\n")


def report(args, m, est, override, roofline, matmuls, others) -> str:
    spec, alone, in_fwd, forward_s = m["spec"], m["alone"], m["in_fwd"], m["forward_s"]
    per_node = md_table(["node", "op", "output", "GFLOP", "roofline us", "alone us", "in forward us",
                         "roofline vs alone"],
                        [(r.name, r.op, r.shape, f"{r.flops / 1e9:.3f}", f"{roofline[r.name] * 1e6:.0f}",
                          f"{alone[r.name] * 1e6:.0f}", f"{in_fwd.get(r.name, float('nan')) * 1e6:.0f}",
                          f"{roofline[r.name] / alone[r.name] - 1:+.1%}")
                         for r in est.nodes if r.name in matmuls])
    nodes = md_table(["estimate", "truth", "nodes", "median rel. err", "max rel. err", "Spearman"], [
        ["roofline", "alone", *compare(roofline, alone, matmuls)],
        ["roofline", "in forward", *compare(roofline, in_fwd, matmuls)],
        ["alone", "in forward", *compare(alone, in_fwd, matmuls)],
        ["roofline (other ops)", "alone", *compare(roofline, alone, others)],
        ["roofline (other ops)", "in forward", *compare(roofline, in_fwd, others)],
    ])
    totals = [("real `gm` forward (median)", forward_s),
              ("`estimate(device=<measured cpu spec>)` roofline", est.time_s),
              ("`estimate(..., node_times=alone)`", override.time_s),
              ("sum of ops timed alone", sum(alone.values())),
              ("roofline, matmul nodes only", sum(roofline[n] for n in matmuls)),
              ("in forward (profiler), matmul nodes only", sum(in_fwd.get(n, 0) for n in matmuls))]
    whole = md_table(["forward", "ms", "vs real forward"],
                     [(label, f"{s * 1e3:.2f}", f"{s / forward_s:.2f}x") for label, s in totals])
    return "\n".join([
        "# Time model on this CPU",
        "",
        f"GPT-2 from config: {args.layers} layers, n_embd {args.embd}, {args.heads} heads, vocab {args.vocab}, "
        f"batch {args.batch}, seq {args.seq}, fp32, eval, forward under no_grad; torch {torch.__version__}, "
        f"torch threads: {torch.get_num_threads()}.",
        f"CPU spec (measured): fp32 {spec.flops_per_s(torch.float32) / 1e9:.0f} GFLOP/s, "
        f"copy bandwidth {spec.memory_bandwidth_Bps / 1e9:.1f} GB/s, launch {spec.launch_s * 1e6:.0f} us.",
        f"Measured in {args.rounds} interleaved rounds (medians over all): CPU spec once per round; alone: "
        f"`measure_node_times` ({args.repeats} repeats per round); in forward: the profiler's time of each "
        f"top-level ATen op (children included), {args.runs} forwards per round; real forward: {args.runs} per round.",
        "", "## Per node, matmul-class nodes (FLOPs > 0)", "", nodes,
        "", "Anchor (ANCHORS.md): roofline errs 7-17% on matmuls, 47-67% on other ops; Spearman 0.81 (roofline) "
        "vs 0.94 (ops timed alone).",
        "", "## Whole forward", "", whole,
        "", "Anchor: ops timed alone undershoot the total by ~40%.",
        "", "## Every matmul-class node", "", per_node,
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine a second thread waits on "
                             "whichever core is busy, which swamps what is measured)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved measurement rounds (medians over all)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of measure_node_times per round")
    parser.add_argument("--runs", type=int, default=5, help="real and profiled forwards per round")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = run(args)
    print(text)
    print(f"wrote {write_result('time_model.md', text)}")


if __name__ == "__main__":
    main()
