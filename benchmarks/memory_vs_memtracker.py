"""fxpart's cost model against PyTorch's own tools, on the test suite's models.

For each model of ``tests/conftest.py`` (tiny Hugging Face configs with random weights,
and ``passes.zoo`` models), in one process:

* memory: ``estimate(...).peak_bytes`` against ``MemTracker``'s peak for one steady-state
  AdamW training step (forward, ``loss.backward()``, ``opt.step()``, after a warm-up step)
  and for one forward under ``torch.no_grad()``; parameters, buffers, optimizer state and
  inputs counted on both sides;
* FLOPs: ``estimate(...).flops`` / ``.backward_flops`` against ``FlopCounterMode`` over the
  eager forward and over ``loss.backward()`` (loss: the sum of every float output).

Writes ``benchmarks/results/memory.md``. Run: ``python benchmarks/memory_vs_memtracker.py``
(about a minute on 2 cores).
"""
from __future__ import annotations

import sys
import time

import _common  # noqa: F401 - puts the repository root on sys.path
import torch
from _common import REPO, md_table, write_result

sys.path.insert(0, str(REPO / "tests"))
from conftest import MODELS, Case, gpt2, make_case  # noqa: E402 - the test suite's model factories
from reference import (flop_counter_flops, memtracker_inference_peak,  # noqa: E402
                       memtracker_training_peak)

from passes import capture, estimate  # noqa: E402


def measure(name: str) -> dict:
    """Estimated and measured peaks and FLOPs of one model."""
    case = make_case(name)
    gm = capture(case.model, case.args, case.kwargs)
    # the module: its peak is its eager forward's; the captured graph: values freed at their last use
    train = estimate(case.model, case.args, case.kwargs, training=True, optimizer="adamw")
    infer = estimate(case.model, case.args, case.kwargs)
    infer_graph = estimate(gm, case.args, case.kwargs)
    forward, backward = flop_counter_flops(make_case(name), training=True)
    return {
        "train": (train.peak_bytes, memtracker_training_peak(make_case(name))),
        "infer": (infer.peak_bytes, memtracker_inference_peak(make_case(name))),
        "infer_graph": (infer_graph.peak_bytes, memtracker_inference_peak(Case(name, gm, case.args, case.kwargs))),
        "forward": (train.flops, forward), "backward": (train.backward_flops, backward),
        "phase": train.peak_phase, "params": train.param_bytes,
    }


def _ratio(pair: tuple[int, int]) -> str:
    return f"{pair[0] / pair[1]:.4f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f}"


def _mflop(n: int) -> str:
    return f"{n / 1e6:.2f}"


def main() -> None:
    start = time.perf_counter()
    results = {name: measure(name) for name in MODELS}
    memory = md_table(
        ["model", "params MiB", "train: fxpart MiB", "train: MemTracker MiB", "train ratio", "fxpart peak in",
         "infer: fxpart MiB", "infer: MemTracker MiB", "infer ratio", "infer ratio, captured graph"],
        [(name, _mib(r["params"]), _mib(r["train"][0]), _mib(r["train"][1]), _ratio(r["train"]), r["phase"],
          _mib(r["infer"][0]), _mib(r["infer"][1]), _ratio(r["infer"]), _ratio(r["infer_graph"]))
         for name, r in results.items()])
    flops = md_table(
        ["model", "fwd: fxpart MFLOP", "fwd: FlopCounterMode MFLOP", "fwd ratio", "bwd: fxpart MFLOP",
         "bwd: FlopCounterMode MFLOP", "bwd ratio"],
        [(name, _mflop(r["forward"][0]), _mflop(r["forward"][1]), _ratio(r["forward"]), _mflop(r["backward"][0]),
          _mflop(r["backward"][1]), _ratio(r["backward"])) for name, r in results.items()])
    twin_forward, twin_backward = flop_counter_flops(gpt2(attn="eager"), training=True)
    sdpa = results["gpt2_sdpa"]
    text = "\n".join([
        "# Memory and FLOPs: fxpart estimate vs MemTracker and FlopCounterMode",
        "",
        f"torch {torch.__version__}, CPU, fp32, models in eval mode with dropout 0 (`small_cnn`: BatchNorm in "
        f"train mode), batch 2; sizes in `tests/conftest.py`. Ratio = fxpart / measured.",
        "",
        "## Peak memory",
        "",
        "Training: one steady-state AdamW step (forward, `loss.backward()`, `opt.step()`; AdamW state from a "
        "warm-up step; `zero_grad(set_to_none=True)` before). Inference: one forward under `torch.no_grad()`. "
        "MemTracker tracks the model, the optimizer and the inputs (`track_external`). The last column "
        "measures the captured graph (`capture(model)`, run eagerly) instead of the model.",
        "",
        memory,
        "",
        "`estimate(model)` takes its peak from the module's own forward run on fake tensors (eager Python: "
        "a tensor bound to a local variable lives until the name is rebound or the function returns), and "
        "FLOPs and per-node costs from the captured graph. The captured graph frees every value after its "
        "last use: GPT-2's graph peaks 10% lower than the eager model at inference (it drops the embeddings, "
        "the attention probabilities and the block's LayerNorm output early), `small_cnn`'s 13% lower. The "
        "last column estimates the captured graph (`estimate(capture(model))`) against MemTracker running "
        "that graph.",
        "",
        "## FLOPs",
        "",
        flops,
        "",
        f"`FlopCounterMode` counts 0 for the fused SDPA kernel on the CPU (torch 2.13): on `gpt2_sdpa` it "
        f"misses the attention. The same weights with eager attention count {_mflop(twin_forward)} MFLOP "
        f"forward (fxpart on `gpt2_sdpa`: {_mflop(sdpa['forward'][0])}) and {_mflop(twin_backward)} MFLOP "
        f"backward; fxpart's {_mflop(sdpa['backward'][0])} follows `FlopCounterMode`'s SDPA backward formula, "
        f"which charges 2.5x the attention forward (the scores are recomputed) instead of 2x.",
        "",
        f"Run time: {time.perf_counter() - start:.0f} s.",
    ])
    print(text)
    print(f"\nwrote {write_result('memory.md', text)}")


if __name__ == "__main__":
    main()
