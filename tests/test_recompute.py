"""``passes.recompute``: same numerics, peak under the budget, FLOPs monotone, clear errors."""
import pytest
import torch

from passes import capture, estimate
from passes.recompute import PLAN, recompute
from passes.simulate import simulate
from passes.zoo import tiny_gpt


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model, inputs = tiny_gpt(n_layers=4, d_model=64, batch=8, seq=128, vocab_size=256)
    gm = capture(model, inputs)
    return model, inputs, gm, simulate(gm, inputs, {}, training=True).peak_bytes


def _grads(model, forward, inputs):
    model.zero_grad(set_to_none=True)
    out = forward(*inputs)
    out.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def test_recompute_keeps_outputs_and_gradients_of_tiny_gpt(gpt):
    model, inputs, gm, base = gpt
    fitted = recompute(gm, inputs, peak_bytes=int(0.5 * base))
    assert any(lv > 1 for lv in fitted.meta[PLAN].levels)   # matmuls recomputed, not only pointwise ops
    out, grads = _grads(model, model, inputs)
    out2, grads2 = _grads(model, fitted, inputs)
    torch.testing.assert_close(out2, out)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], msg=name)
    fitted.graph.lint()


@pytest.mark.parametrize("fraction", [0.8, 0.45])
def test_recompute_peak_is_under_budget_in_simulation(gpt, fraction):
    model, inputs, gm, base = gpt
    fitted = recompute(gm, inputs, peak_bytes=int(fraction * base))
    assert estimate(fitted, inputs, training=True).peak_bytes <= fraction * base
    assert fitted.meta[PLAN].peak_bytes <= fraction * base


def test_recompute_real_step_peaks_at_or_under_budget():
    """The real forward + backward on real tensors, every storage followed by passes.monitor: no slack.

    A fresh model: MemTracker's instrumentation stays on a model's parameters after its context
    exits and adds a gradient-sized buffer to later steps of that model."""
    from passes.monitor import measure_step
    torch.manual_seed(0)
    model, inputs = tiny_gpt(n_layers=4, d_model=64, batch=8, seq=128, vocab_size=256)
    gm = capture(model, inputs)
    base = simulate(gm, inputs, {}, training=True).peak_bytes
    for fraction in (0.6, 0.45):
        budget = int(fraction * base)
        fitted = recompute(gm, inputs, peak_bytes=budget)
        assert measure_step(fitted, inputs, optimizer=None, copy_model=False).peak_bytes <= budget
        model.zero_grad(set_to_none=True)


def test_recompute_measured_peak_is_under_budget(gpt):
    """A real forward + backward, every storage followed by MemTracker (parameters and inputs included)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    model, inputs, gm, base = gpt
    budget = int(0.6 * base)
    fitted = recompute(gm, inputs, peak_bytes=budget)
    model.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(model, *inputs)
    with tracker:
        fitted(*inputs).sum().backward()
    model.zero_grad(set_to_none=True)
    # With MemTracker attached the step allocates one extra gradient-sized buffer (0.4% here, none on the
    # benchmark's 8-layer GPT); followed without MemTracker the real step is at or under the budget
    # exactly (test_recompute_real_step_peaks_at_or_under_budget)
    assert tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] <= 1.01 * budget


def test_lower_budget_never_needs_fewer_extra_flops(gpt):
    model, inputs, gm, base = gpt
    extra = [recompute(gm, inputs, peak_bytes=int(f * base)).meta[PLAN].extra_flops for f in (0.9, 0.6, 0.45)]
    assert extra == sorted(extra)
    assert extra[0] == 0 and extra[-1] > 0


def test_unreachable_budget_names_smallest_reachable_peak(gpt):
    model, inputs, gm, base = gpt
    with pytest.raises(ValueError, match=r"smallest reachable peak is (\d+) bytes") as info:
        recompute(gm, inputs, peak_bytes=int(0.05 * base))
    import re
    smallest = int(re.search(r"smallest reachable peak is (\d+) bytes", str(info.value)).group(1))
    assert 0.05 * base < smallest < base
    assert recompute(gm, inputs, peak_bytes=smallest).meta[PLAN].peak_bytes <= smallest


def test_budget_above_the_peak_changes_nothing(gpt):
    model, inputs, gm, base = gpt
    fitted = recompute(gm, inputs, peak_bytes=base)
    assert set(fitted.meta[PLAN].levels) == {0}
    assert not any(n.op == "call_module" and "_fxpart_region_" in n.target for n in fitted.graph.nodes)


def test_bad_budget_is_a_value_error(gpt):
    model, inputs, gm, base = gpt
    with pytest.raises(ValueError, match="peak_bytes"):
        recompute(gm, inputs, peak_bytes=-1)
