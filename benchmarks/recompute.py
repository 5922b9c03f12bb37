"""Recomputation frontier: ``passes.recompute`` against PyTorch's checkpointing tools.

An 8-layer TinyGPT (``passes.zoo``: d=128, 4 heads, batch 8, seq 256, tied head), one
training step (forward, loss = sum of the logits, ``loss.backward()``; no optimizer), in
one process, for: no checkpointing; ``checkpoint`` around every block;
``checkpoint_sequential`` over the blocks with 2, 4 and 8 segments; PyTorch's min-cut
partitioner (``torch.compile(backend="aot_eager")`` under
``torch._functorch.config.activation_memory_budget`` 0.5 and 0.2); and
``passes.recompute`` with budgets of 0.6x, 0.37x and 0.27x of the measured peak of the
unmodified step.

Measured for each, on real tensors:

* peak: the CPU allocator's, from its events recorded by ``torch.profiler``
  (``profile_memory=True``, as ``passes.measure_step`` measures), over forward + backward,
  plus the parameters and inputs allocated before; gradients set to None before the step.
  It sees what no dispatched op shows: the LM head's backward copies the gradient of
  ``logits.sum()`` (an expanded scalar, zero strides) into a logits-sized buffer.
  ``MemTracker`` (which follows dispatched ops' storages, so misses that copy) is shown
  beside it for the eager rows;
* FLOPs: ``FlopCounterMode`` over forward + backward. On CPU it counts 0 for attention
  (``_scaled_dot_product_flash_attention_for_cpu`` and its backward), so those two ops
  get the formulas ``FlopCounterMode`` itself uses for the CUDA attention kernels
  (``custom_mapping``); every variant is counted the same way. Dynamo runs a compiled
  model eagerly when a dispatch mode is active at the call, so for the min-cut rows the
  counter is entered inside the compiled forward and backward graphs instead (a no-op
  compiler that wraps each graph).

Writes ``benchmarks/results/recompute.md``. Run: ``python benchmarks/recompute.py``
(about 4 minutes on 2 cores).
"""
from __future__ import annotations

import contextlib
import time

import _common  # noqa: F401 - puts the repository root on sys.path
import torch
from _common import md_table, write_result
import torch._functorch.config
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils import flop_counter as fc
from torch.utils.checkpoint import checkpoint, checkpoint_sequential
from torch.utils.flop_counter import FlopCounterMode

from passes import capture  # noqa: E402
from passes.monitor import _cpu_allocator_peak  # noqa: E402
from passes.recompute import PLAN, recompute  # noqa: E402
from passes.simulate import simulate  # noqa: E402
from passes.zoo import tiny_gpt  # noqa: E402

aten = torch.ops.aten
N_LAYERS, BATCH, SEQ = 8, 8, 256
FRACTIONS = (0.6, 0.37, 0.27)   # of the measured peak of the unmodified step


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return fc.sdpa_backward_flop_count(grad_out, query, key, value)


_ATTENTION_ON_CPU = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
                     aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward}


def _blocks_forward(model, idx, run_blocks):
    """TinyGPT's forward with the blocks run by ``run_blocks(x)``."""
    pos = torch.arange(idx.shape[1], device=idx.device)
    x = run_blocks(model.wte(idx) + model.wpe(pos))
    return model.head(model.ln_f(x))


def _every_block(model):
    def run(x):
        for block in model.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x
    return lambda idx: _blocks_forward(model, idx, run)


def _sequential(model, n_segments):
    return lambda idx: _blocks_forward(
        model, idx, lambda x: checkpoint_sequential(model.blocks, n_segments, x, use_reentrant=False))


def _allocator_peak(model, inputs, step) -> int:
    """The CPU allocator's peak over ``step()``, plus the parameters and inputs allocated before."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in list(model.parameters()) + list(inputs)}
    _, allocated = _cpu_allocator_peak(step)
    return sum(storages.values()) + allocated


def _train_step(forward, inputs) -> None:
    loss = forward(*inputs).sum()
    loss.backward()
    del loss


_INSIDE_GRAPHS: list = []   # context managers entered around every compiled graph's run


def _measured(gm, example_inputs):
    """aot_eager's compiler (``boxed_nop``), with ``_INSIDE_GRAPHS`` entered while the graph runs:
    Dynamo runs the model eagerly when a dispatch mode is already active at the call."""
    run_graph = boxed_nop(gm, example_inputs)

    def run(args):
        with contextlib.ExitStack() as stack:
            for cm in _INSIDE_GRAPHS:
                stack.enter_context(cm)
            return run_graph(args)
    run._boxed_call = True
    return run


def _min_cut(model, inputs, budget):
    """``aot_eager`` (aot_autograd, no-op compilers, min-cut partitioner), measurable from inside."""
    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=_measured, bw_compiler=_measured,
                           partition_fn=min_cut_rematerialization_partition, keep_inference_input_mutations=True)
    with torch._functorch.config.patch(activation_memory_budget=budget):
        compiled = torch.compile(model, backend=backend)
        compiled(*inputs).sum().backward()   # compile forward and backward before measuring
    model.zero_grad(set_to_none=True)
    return compiled


def measure(model, inputs, forward) -> tuple[int, int]:
    """(allocator peak, FLOPs) of one forward + backward of ``forward``, after a warm-up."""
    model.zero_grad(set_to_none=True)
    _train_step(forward, inputs)
    model.zero_grad(set_to_none=True)
    peak = _allocator_peak(model, inputs, lambda: _train_step(forward, inputs))
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False, custom_mapping=_ATTENTION_ON_CPU) as counter:
        _train_step(forward, inputs)
    model.zero_grad(set_to_none=True)
    return peak, counter.get_total_flops()


def memtracker_peak(model, inputs, forward) -> int:
    """MemTracker's peak of the same step. Run after every other measurement: its instrumentation stays on
    the model's parameters after its context exits and adds a gradient-sized buffer to later steps."""
    tracker = MemTracker()
    tracker.track_external(model, *inputs)
    with tracker:
        _train_step(forward, inputs)
    model.zero_grad(set_to_none=True)
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def measure_compiled(model, inputs, compiled) -> tuple[int, int]:
    """The same for a compiled model (the profiler does not stop Dynamo; the FLOP counter runs inside its graphs)."""
    peak = _allocator_peak(model, inputs, lambda: _train_step(compiled, inputs))
    model.zero_grad(set_to_none=True)
    flops = 0
    forward_counter = FlopCounterMode(display=False, custom_mapping=_ATTENTION_ON_CPU)
    _INSIDE_GRAPHS[:] = [forward_counter]   # entering a counter resets it: one per graph
    loss = compiled(*inputs).sum()
    flops += forward_counter.get_total_flops()
    backward_counter = FlopCounterMode(display=False, custom_mapping=_ATTENTION_ON_CPU)
    _INSIDE_GRAPHS[:] = [backward_counter]
    loss.backward()
    flops += backward_counter.get_total_flops()
    _INSIDE_GRAPHS.clear()
    model.zero_grad(set_to_none=True)
    return peak, flops


def main() -> None:
    torch.manual_seed(0)
    torch._dynamo.config.cache_size_limit = 64
    model, inputs = tiny_gpt(n_layers=N_LAYERS, batch=BATCH, seq=SEQ)
    start = time.perf_counter()
    model_gm = capture(model, inputs)
    simulated = simulate(model_gm, inputs, {}, training=True).peak_bytes
    variants = [("none", model), ("checkpoint every block", _every_block(model))]
    variants += [(f"`checkpoint_sequential`, {k} segments", _sequential(model, k)) for k in (2, 4, 8)]
    results, budgets, plans, eager = {}, {}, {}, dict(variants)
    for name, forward in variants:
        results[name] = measure(model, inputs, forward)
    for budget in (0.5, 0.2):
        compiled = _min_cut(model, inputs, budget)
        results[f"min-cut (`torch.compile`, aot_eager), budget {budget}"] = measure_compiled(model, inputs, compiled)
    torch._dynamo.reset()
    base_peak, base_flops = results["none"]
    for fraction in FRACTIONS:
        name = f"`recompute`, budget {fraction}x"
        budgets[name] = int(fraction * base_peak)
        t0 = time.perf_counter()
        fitted = recompute(model_gm, inputs, peak_bytes=budgets[name])
        plans[fraction] = (fitted.meta[PLAN], time.perf_counter() - t0)
        results[name] = measure(model, inputs, fitted)
        eager[name] = fitted
    memtracker = {name: memtracker_peak(model, inputs, forward) for name, forward in eager.items()}
    rows = []
    for name, (peak, flops) in results.items():
        budget = budgets.get(name)
        rows.append((name, f"{peak / 2**20:.1f}", f"{peak / base_peak:.3f}x",
                     "-" if budget is None else f"{budget / 2**20:.1f}",
                     "-" if budget is None else f"{peak / budget:.3f}",
                     f"{memtracker[name] / 2**20:.1f}" if name in memtracker else "-", f"{flops / 1e9:.2f}",
                     f"+{100 * (flops - base_flops) / base_flops:.1f}%"))
    elapsed = time.perf_counter() - start
    plan_lines = [f"- {fraction}x: levels {plan.levels} (simulated peak {plan.peak_bytes / base_peak:.3f}x of the "
                  f"measured unmodified peak, +{100 * plan.extra_flops / plan.baseline_flops:.1f}% FLOPs), "
                  f"search {secs:.1f} s"
                  for fraction, (plan, secs) in plans.items()]
    text = "\n".join([
        "# Recomputation frontier: `passes.recompute` vs PyTorch checkpointing",
        "",
        f"TinyGPT ({N_LAYERS} layers, d=128, 4 heads, batch {BATCH}, seq {SEQ}, tied head), one training step "
        "(forward, loss = sum of the logits, backward; no optimizer) on the CPU, torch "
        f"{torch.__version__}, every row in the same run. Peak: the CPU allocator's over forward + backward "
        "(its events recorded by `torch.profiler`, as `passes.measure_step` measures; parameters and inputs "
        "included), which sees the logits-sized copy the LM head's backward makes of the gradient of "
        "`logits.sum()`; `MemTracker`, which follows dispatched ops' storages and misses that copy, beside it "
        "for the eager rows (run last: its instrumentation stays on the parameters and adds a gradient-sized "
        "buffer to later steps of the same model, as on the `recompute` rows). FLOPs: `FlopCounterMode` over forward + backward, with the CUDA attention "
        "kernels' formulas given for the CPU attention kernel and its backward (which it counts as 0 on CPU), "
        "the same for every row. `recompute`'s budgets are fractions of the measured peak of the unmodified "
        f"step ({base_peak / 2**20:.1f} MiB; fxpart's simulated peak of it: {simulated / 2**20:.1f} MiB); "
        "peak / budget at or under 1 means the budget held on the real step.",
        "",
        md_table(["strategy", "peak MiB", "peak vs none", "budget MiB", "peak / budget", "MemTracker MiB",
                  "GFLOP fwd+bwd", "extra FLOPs"], rows),
        "",
        "`recompute`'s plans (level per block: 0 no checkpoint, 1 checkpoint keeping the outputs of every "
        "matmul/attention, each further level recomputes one more of them, the last recomputes everything):",
        "",
        *plan_lines,
        "",
        f"Whole benchmark: {elapsed:.0f} s.",
    ])
    print(text)
    write_result("recompute.md", text)


if __name__ == "__main__":
    main()
