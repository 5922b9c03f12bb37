"""fit_memory: the measured step fits the limit (GPT-2, Llama), tightening when measurements run over estimates."""
import re

import pytest
import torch

from passes import fit_memory
from passes.monitor import measure_step
from passes.zoo import make

SIZES = {"gpt2": dict(n_layer=2, n_embd=128, seq=64, batch=4), "llama": dict(hidden=128, n_layers=2, seq=64, batch=4)}


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _case(name):
    model, args, kwargs = make(name, **SIZES[name])
    return model, args, kwargs


def _adamw_floor(model) -> int:
    """Parameters, gradients and AdamW's two states: no recomputation goes under this."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("fraction", [0.85, 0.5])
def test_measured_peak_is_at_or_under_the_limit(name, fraction):
    model, args, kwargs = _case(name)
    limit = int(fraction * measure_step(model, args, kwargs).peak_bytes)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fit = fit_memory(model, args, kwargs, limit=limit)
    assert fit.measured_peak_bytes <= limit
    assert measure_step(fit.module, args, kwargs).peak_bytes <= limit      # a fresh measurement agrees
    assert len(fit.rounds) >= 2 and fit.rounds[0].measured_peak_bytes > limit
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags   # the model is left as it was
    if _adamw_floor(model) > limit:      # recomputation alone cannot get there: parts must freeze
        assert "freeze" in fit.strategy
        assert not all(p.requires_grad for p in fit.module.parameters())
    if fit.strategy == "recompute":      # recomputation first: everything trains, outputs unchanged
        assert all(p.requires_grad for p in fit.module.parameters())
        torch.testing.assert_close(fit.module(*args, **kwargs)["logits"], model(*args, **kwargs)["logits"])


def test_measurements_over_the_estimate_tighten_the_budget_until_the_step_fits():
    """A device on which every transformed step measures 6% over what the cost model says."""
    model, args, kwargs = _case("llama")

    def measure(module, a, kw, **step):
        return int((1.0 if module is model else 1.06) * measure_step(module, a, kw, **step).peak_bytes)

    limit = int(0.85 * measure(model, args, kwargs))
    fit = fit_memory(model, args, kwargs, limit=limit, measure=measure)
    assert fit.measured_peak_bytes <= limit
    assert any(r.measured_peak_bytes > limit for r in fit.rounds[1:]), "a candidate built to the estimate measures over"
    budgets = [r.budget_bytes for r in fit.rounds[1:]]
    assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) == len(budgets)
    assert all(r.estimated_peak_bytes <= r.budget_bytes for r in fit.rounds[1:])


def test_a_model_that_fits_comes_back_as_is_after_one_measured_step():
    model, args, kwargs = _case("gpt2")
    fit = fit_memory(model, args, kwargs, limit=2 * measure_step(model, args, kwargs).peak_bytes)
    assert fit.module is model and len(fit.rounds) == 1 and fit.strategy == "as is"


def test_an_unreachable_limit_raises_naming_the_smallest_peaks():
    model, args, kwargs = _case("gpt2")
    with pytest.raises(ValueError, match="smallest peak measured") as err:
        fit_memory(model, args, kwargs, limit=1_000_000)
    text = str(err.value)
    assert "recompute" in text and "finetune" in text and "smallest reachable" in text
    smallest = int(re.search(r"smallest reachable step peaks at (\d+) B", text).group(1))
    fit = fit_memory(model, args, kwargs, limit=int(1.1 * smallest))     # what it names is within reach
    assert fit.measured_peak_bytes <= 1.1 * smallest


def test_a_candidate_well_under_its_budget_that_measures_over_gets_a_budget_under_its_own_estimate():
    """Shrinking the budget from above would build the same candidate again; the next budget must exclude it."""
    from passes.fit import FitRound, _tightened
    last = FitRound("freeze", budget_bytes=1_000, estimated_peak_bytes=900, measured_peak_bytes=1_010)
    assert _tightened(1_000, 1_000, last) < 900 * 1_000 / 1_010
    assert _tightened(1_000, 1_000, FitRound("freeze", 1_000, 1_000, 1_100)) < 1_000 * 1_000 / 1_100
