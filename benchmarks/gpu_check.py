"""Estimate vs measurement on a real GPU: GPT-2 small, bf16, one AdamW training step.

For a session that has a GPU (an H200 through the ``device`` tool). Compares
``estimate(model, ..., device=<spec>, training=True, optimizer="adamw")`` with:

* the whole training step (forward, backward of ``logits.sum()``, ``AdamW.step()``),
  timed with CUDA events, median of ``--steps`` after ``--warmup`` steps;
* the step's peak memory, ``torch.cuda.max_memory_allocated`` after a reset (the
  optimizer state already exists, as in the estimate's steady-state step);
* each transformer block's forward time (CUDA events around the block, median).

Writes ``benchmarks/results/gpu_check.md``. Without CUDA it prints why and exits 0.
``--dry-run`` runs the same code on CPU with a tiny GPT-2 (spec measured on the CPU,
no memory figures) and prints the table without writing it.

Run on the GPU machine: ``python3 benchmarks/gpu_check.py`` (about a minute).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import _common  # noqa: F401 - puts the repository root on sys.path
import torch
from _common import md_table, median, write_result

from passes import estimate, get_device_spec
from passes._util import format_bytes


@dataclass(frozen=True)
class Setup:
    device: str          # torch device the model runs on
    spec: str            # DeviceSpec name the estimate uses
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    batch: int
    seq: int
    dtype: torch.dtype = torch.bfloat16


def gpu_setup(args) -> Setup:
    return Setup("cuda", args.spec, 12, 768, 12, 50257, args.batch, args.seq)


def dry_run_setup(args) -> Setup:
    return Setup("cpu", "cpu", 2, 128, 4, 1000, 2, 64)


def build(setup: Setup):
    """GPT-2 (random weights, train mode: dropout as in training) on ``setup.device``, and token ids."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=setup.n_layer, n_embd=setup.n_embd, n_head=setup.n_head,
                        vocab_size=setup.vocab, n_positions=max(1024, setup.seq), bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).to(device=setup.device, dtype=setup.dtype)
    ids = torch.randint(0, setup.vocab, (setup.batch, setup.seq), device=setup.device)
    return model, ids


class Clock:
    """Elapsed seconds between two marks: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) * 1e-3
        return end - start


def train_step(model, ids, opt) -> None:
    # the estimate's default loss: the sum of the model's floating-point output (the logits)
    opt.zero_grad(set_to_none=True)
    model(ids, use_cache=False).logits.sum().backward()
    opt.step()


def measure_step(model, ids, setup: Setup, *, warmup: int, steps: int) -> tuple[float, int | None]:
    """(median step seconds, peak bytes of one steady-state step or None on CPU)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)   # PyTorch's default kernels (foreach on CUDA)
    clock = Clock(setup.device)
    for _ in range(warmup):
        train_step(model, ids, opt)
    peak = None
    if setup.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        train_step(model, ids, opt)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    times = []
    for _ in range(steps):
        start = clock.mark()
        train_step(model, ids, opt)
        times.append(clock.seconds(start, clock.mark()))
    return median(times), peak


def measure_blocks(model, ids, setup: Setup, *, warmup: int, steps: int) -> list[float]:
    """Median forward seconds of each transformer block (hooks mark its start and end)."""
    clock = Clock(setup.device)
    marks: dict[int, list] = {i: [] for i in range(len(model.transformer.h))}
    handles = []
    for i, block in enumerate(model.transformer.h):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: marks[i].append([clock.mark()])))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: marks[i][-1].append(clock.mark())))
    with torch.no_grad():
        for _ in range(warmup + steps):
            model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return [median(clock.seconds(s, e) for s, e in pairs[warmup:]) for pairs in marks.values()]


def estimated_blocks(est, n_layer: int) -> list[float]:
    """Estimated forward seconds of each block: its nodes' roofline forward times."""
    def in_block(module: str, i: int) -> bool:
        return module == f"transformer.h.{i}" or module.startswith(f"transformer.h.{i}.")

    return [sum(r.forward_time_s for r in est.nodes if in_block(r.module, i)) for i in range(n_layer)]


def report(setup: Setup, est, step_s: float, peak: int | None, blocks: list[float], est_blocks: list[float]) -> str:
    peak_cells = ["n/a (CPU)", "n/a"] if peak is None else [format_bytes(peak), f"{est.peak_bytes / peak:.2f}x"]
    totals = md_table(["quantity", "estimated", "measured", "estimated / measured"], [
        ["training step (fwd + bwd + AdamW)", f"{est.time_s * 1e3:.2f} ms", f"{step_s * 1e3:.2f} ms",
         f"{est.time_s / step_s:.2f}x"],
        ["peak memory of the step", format_bytes(est.peak_bytes), *peak_cells],
        ["forward of all blocks", f"{sum(est_blocks) * 1e3:.2f} ms", f"{sum(blocks) * 1e3:.2f} ms",
         f"{sum(est_blocks) / sum(blocks):.2f}x"],
    ])
    per_block = md_table(["block", "estimated us", "measured us", "estimated / measured"],
                         [(i, f"{e * 1e6:.0f}", f"{m * 1e6:.0f}", f"{e / m:.2f}x")
                          for i, (e, m) in enumerate(zip(est_blocks, blocks))])
    where = torch.cuda.get_device_name() if setup.device == "cuda" else "CPU (dry run)"
    return "\n".join([
        f"# GPU check: estimate vs measurement ({where})", "",
        f"GPT-2 ({setup.n_layer} layers, n_embd {setup.n_embd}), {str(setup.dtype).removeprefix('torch.')}, "
        f"batch {setup.batch}, seq {setup.seq}, train mode; estimate on DeviceSpec {est.device.name!r}; "
        f"torch {torch.__version__}.", "",
        totals, "",
        f"Estimated peak during {est.peak_phase}: " + ", ".join(
            f"{k} {format_bytes(v)}" for k, v in sorted(est.peak_breakdown.items(), key=lambda kv: -kv[1])), "",
        "## Forward time per block (no_grad)", "", per_block, "",
    ])


def run(setup: Setup, args) -> str:
    model, ids = build(setup)
    est = estimate(model, (ids,), device=get_device_spec(setup.spec), training=True, optimizer="adamw")
    step_s, peak = measure_step(model, ids, setup, warmup=args.warmup, steps=args.steps)
    blocks = measure_blocks(model, ids, setup, warmup=args.warmup, steps=args.steps)
    return report(setup, est, step_s, peak, blocks, estimated_blocks(est, setup.n_layer))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="same code on CPU with a tiny GPT-2; writes nothing")
    parser.add_argument("--spec", default="h200", help="DeviceSpec for the estimate on the GPU (default h200)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; run it on a GPU machine, or pass --dry-run "
              "to exercise the code on CPU")
        return 0
    setup = dry_run_setup(args) if args.dry_run else gpu_setup(args)
    text = run(setup, args)
    print(text)
    if not args.dry_run:
        print(f"wrote {write_result('gpu_check.md', text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
