"""``passes.recompute``: same numerics (dropout included), peak under the budget measured, monotone, clear errors."""
import re

import pytest
import torch
from torch import nn

from passes import capture, estimate, zoo
from passes.monitor import measure_step
from passes.recompute import PLAN, recompute
from passes.simulate import simulate
from passes.zoo import tiny_gpt


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model, inputs = tiny_gpt(n_layers=4, d_model=64, batch=8, seq=128, vocab_size=256)
    gm = capture(model, inputs)
    return model, inputs, gm, simulate(gm, inputs, {}, training=True).peak_bytes


@pytest.fixture(scope="module")
def gpt2_dropout():
    """Hugging Face GPT-2 in train mode, dropout 0.1 everywhere, sdpa attention (on the CPU: its math
    path, whose dropout fills an ``empty_like`` in place), and the smallest peak ``recompute`` reaches."""
    case = zoo.make("gpt2", n_layer=3, n_embd=64, seq=128, batch=4, dropout=0.1, attn="sdpa")
    case.model.train()
    gm = capture(case.model, case.args, case.kwargs)
    base = simulate(gm, case.args, case.kwargs, training=True).peak_bytes
    return case, gm, base, _smallest_reachable(gm, case.args, case.kwargs, base)


def _smallest_reachable(gm, args, kwargs, base) -> int:
    with pytest.raises(ValueError, match=r"smallest reachable peak is (\d+) bytes") as info:
        recompute(gm, args, kwargs, peak_bytes=int(0.05 * base))
    return int(re.search(r"smallest reachable peak is (\d+) bytes", str(info.value)).group(1))


def _step(model, forward, args, kwargs=None, *, seed=0):
    """Outputs and gradients of one forward + ``sum`` + backward under a fixed seed."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = forward(*args, **(kwargs or {}))
    out = getattr(out, "logits", out)
    out.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _assert_same_step(model, forward, args, kwargs=None):
    out, grads = _step(model, model, args, kwargs)
    out2, grads2 = _step(model, forward, args, kwargs)
    torch.testing.assert_close(out2, out)
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], msg=name)


def test_recompute_keeps_outputs_and_gradients_of_tiny_gpt(gpt):
    model, inputs, gm, base = gpt
    fitted = recompute(gm, inputs, peak_bytes=int(0.5 * base))
    assert any(lv > 1 for lv in fitted.meta[PLAN].levels)   # matmuls recomputed, not only pointwise ops
    _assert_same_step(model, fitted, inputs)
    fitted.graph.lint()


def _keeps_attention(kept) -> bool:
    return any(n.startswith("scaled_dot_product_attention") for n in kept)


@pytest.mark.parametrize("fraction, attention_kept", [(0.8, True), (0.45, False)])
def test_recompute_replays_dropout_of_hugging_face_gpt2_in_train_mode(gpt2_dropout, fraction, attention_kept):
    case, gm, base, _ = gpt2_dropout
    budget = int(fraction * base)
    fitted = recompute(gm, case.args, case.kwargs, peak_bytes=budget)
    plan = fitted.meta[PLAN]
    # kept: its cached matmuls, never the buffer dropout fills in place; recomputed: its dropout redrawn
    assert any(kept is not None and _keeps_attention(kept) == attention_kept for kept in plan.saved_nodes)
    _assert_same_step(case.model, fitted, case.args, case.kwargs)
    torch.manual_seed(0)
    measured = measure_step(fitted, case.args, case.kwargs, optimizer=None, copy_model=False)
    case.model.zero_grad(set_to_none=True)
    assert measured.peak_source == "allocator" and measured.peak_bytes <= budget


def test_every_budget_from_the_reported_minimum_up_is_met_on_gpt2_with_dropout(gpt2_dropout):
    case, gm, base, smallest = gpt2_dropout
    assert smallest < 0.5 * base
    budgets = [smallest] + [int(smallest + k * (base - smallest) / 5) for k in range(1, 5)] + [int(0.5 * base)]
    for budget in budgets:
        plan = recompute(gm, case.args, case.kwargs, peak_bytes=budget).meta[PLAN]
        assert plan.peak_bytes <= budget, (budget, plan)


def test_kept_attention_on_meta_is_costed_as_the_fused_kernel_not_its_scores():
    # on meta, sdpa falls back to its math path, which keeps batch x heads x seq x seq scores; the real
    # devices' fused kernel keeps its output. Simulated as the math path, keeping attention peaked at 2x.
    case = zoo.make("gpt2_sdpa", "meta", n_layer=2, n_embd=64, seq=1024, batch=2)
    gm = capture(case.model, case.args, case.kwargs)
    base = simulate(gm, case.args, case.kwargs, training=True).peak_bytes
    plan = recompute(gm, case.args, case.kwargs, peak_bytes=int(0.9 * base)).meta[PLAN]
    assert plan.peak_bytes <= 0.9 * base and plan.extra_flops == 0   # norms and pointwise ops recomputed only
    assert all(kept is None or _keeps_attention(kept) for kept in plan.saved_nodes)


@pytest.mark.parametrize("fraction", [0.8, 0.45])
def test_recompute_peak_is_under_budget_in_simulation(gpt, fraction):
    model, inputs, gm, base = gpt
    fitted = recompute(gm, inputs, peak_bytes=int(fraction * base))
    assert estimate(fitted, inputs, training=True).peak_bytes <= fraction * base
    assert fitted.meta[PLAN].peak_bytes <= fraction * base


def test_measured_peak_is_at_or_under_budget_on_gpt_with_summed_logits():
    """Budgets are fractions of the measured unmodified step; measured by the allocator, no slack.

    ``logits.sum()``'s gradient is an expanded scalar that the LM head's backward copies whole."""
    torch.manual_seed(0)
    model, inputs = tiny_gpt(n_layers=6, d_model=64, batch=4, seq=256, vocab_size=512)
    loss_fn = lambda logits: logits.sum()  # noqa: E731
    unmodified = measure_step(model, inputs, optimizer=None, loss_fn=loss_fn).peak_bytes
    for fraction in (0.6, 0.45, 0.3):
        budget = int(fraction * unmodified)
        fitted = recompute(model, inputs, peak_bytes=budget, loss_fn=loss_fn)
        measured = measure_step(fitted, inputs, optimizer=None, loss_fn=loss_fn, copy_model=False)
        model.zero_grad(set_to_none=True)
        assert measured.peak_source == "allocator"
        assert measured.peak_bytes <= budget, (fraction, measured.peak_bytes / unmodified)


class _WritesIntoMatmul(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln, self.fc, self.out = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.fc(self.ln(x))
        h.mul_(0.5)              # in place into a matmul's output: a checkpoint must not keep it
        return x + self.out(nn.functional.gelu(h))


def test_matmul_output_written_in_place_is_recomputed_not_kept():
    torch.manual_seed(0)
    model = nn.Sequential(*[_WritesIntoMatmul(64) for _ in range(4)])
    inputs = (torch.randn(8, 128, 64),)
    gm = capture(model, inputs)
    base = simulate(gm, inputs, {}, training=True).peak_bytes
    fitted = recompute(gm, inputs, peak_bytes=int(0.8 * base))
    plan = fitted.meta[PLAN]
    assert any(lv > 0 for lv in plan.levels)
    assert not any(kept and any(n.startswith("linear") for n in kept) for kept in plan.saved_nodes)
    _assert_same_step(model, fitted, inputs)


def test_lower_budget_never_needs_fewer_extra_flops(gpt):
    model, inputs, gm, base = gpt
    extra = [recompute(gm, inputs, peak_bytes=int(f * base)).meta[PLAN].extra_flops for f in (0.9, 0.6, 0.45)]
    assert extra == sorted(extra)
    assert extra[0] == 0 and extra[-1] > 0


def test_unreachable_budget_names_smallest_reachable_peak_which_is_met(gpt):
    model, inputs, gm, base = gpt
    smallest = _smallest_reachable(gm, inputs, {}, base)
    assert 0.05 * base < smallest < base
    assert recompute(gm, inputs, peak_bytes=smallest).meta[PLAN].peak_bytes <= smallest
    with pytest.raises(ValueError, match=f"smallest reachable peak is {smallest} bytes"):
        recompute(gm, inputs, peak_bytes=smallest - 1)


def test_budget_above_the_peak_changes_nothing(gpt):
    model, inputs, gm, base = gpt
    fitted = recompute(gm, inputs, peak_bytes=base)
    assert set(fitted.meta[PLAN].levels) == {0}
    assert not any(n.op == "call_module" and "_fxpart_region_" in n.target for n in fitted.graph.nodes)


@pytest.mark.parametrize("budget", [-1, 0, True, "1GB"])
def test_bad_budget_is_a_value_error(gpt, budget):
    model, inputs, gm, base = gpt
    with pytest.raises(ValueError, match="peak_bytes must be a positive number of bytes"):
        recompute(gm, inputs, peak_bytes=budget)
