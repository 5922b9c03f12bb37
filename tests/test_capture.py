"""``passes.capture``: ATen graphs with fake values that return what the model returns."""
import operator

import pytest
import torch
import torch.fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_structure

from conftest import make_case
from passes import CaptureError, capture, estimate, zoo


def _only_guard_calls(gm) -> bool:
    """No submodule calls left but torch.export's input-guard check."""
    return [n.target for n in gm.graph.nodes if n.op == "call_module"] in ([], ["_guards_fn"])


def test_capture_returns_aten_graph_with_fake_value_on_every_node(case_name, captured):
    _, gm = captured(case_name)
    assert isinstance(gm, torch.fx.GraphModule)
    gm.graph.lint()
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert calls
    assert _only_guard_calls(gm)
    for node in calls:
        # ATen ops, tuple indexing, and arithmetic on symbolic sizes (operator.mul of two SymInts)
        assert isinstance(node.target, torch._ops.OpOverload) or node.target.__module__ == "_operator", \
            node.format_node()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "call_function"):
            assert "val" in node.meta, node.format_node()


def test_captured_graph_returns_what_the_model_returns(case_name, captured):
    case, gm = captured(case_name)
    with torch.no_grad():
        expected = case()
        got = gm(*case.args, **case.kwargs)
    assert type(got) is type(expected)
    assert tree_structure(got) == tree_structure(expected)
    torch.testing.assert_close(tree_flatten(got)[0], tree_flatten(expected)[0])


def test_meta_model_is_captured_and_costed_like_real_weights(case_name, estimates):
    case = make_case(case_name, "meta")
    assert all(p.is_meta for p in case.model.parameters())
    gm = capture(case.model, case.args, case.kwargs)
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    for training in (True, False):
        est = estimate(gm, case.args, case.kwargs, training=training, optimizer="adamw" if training else None)
        real = estimates(case_name, training=training)
        assert (est.flops, est.backward_flops, est.param_bytes, est.peak_bytes) == \
            (real.flops, real.backward_flops, real.param_bytes, real.peak_bytes)


def test_symbolic_traced_graph_module_is_accepted():
    model, inputs = zoo.mlp(depth=2, width=32, batch=4)
    traced = torch.fx.symbolic_trace(model)
    gm = capture(traced, inputs)
    assert _only_guard_calls(gm)
    assert all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
    torch.testing.assert_close(gm(*inputs), model(*inputs))
    assert estimate(traced, inputs).flops == estimate(model, inputs).flops == 2 * 2 * 4 * 32 * 32


def test_captured_graph_is_returned_as_is(captured):
    case, gm = captured("mlp")
    assert capture(gm, case.args) is gm


def test_capture_rejects_a_non_module_naming_its_type():
    with pytest.raises(TypeError, match=r"needs a torch\.nn\.Module, got function"):
        capture(lambda x: x * 2, (torch.randn(3),))


@pytest.mark.parametrize("args, kwargs, why", [
    ((torch.randn(2, 4), torch.randn(2, 4)), None, "too many positional arguments"),
    ((), {"x": torch.randn(2, 4)}, "missing a required argument"),
])
def test_capture_rejects_inputs_that_do_not_fit_forward_naming_the_signature(args, kwargs, why):
    with pytest.raises(TypeError, match=rf"do not fit Linear\.forward\(input: torch\.Tensor\).*{why}"):
        capture(nn.Linear(4, 3), args, kwargs)


class DataDependentBranch(nn.Module):
    """Python ``if`` on a tensor's value: both export modes refuse to guess the branch."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


class ItemDrivenLoop(nn.Module):
    """A loop count read from the data with ``.item()``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        for _ in range(int(x.abs().sum().item()) % 3):
            x = self.linear(x)
        return x


@pytest.mark.parametrize("model_class", [DataDependentBranch, ItemDrivenLoop])
def test_untraceable_model_raises_capture_error_naming_model_and_remedy(model_class):
    with pytest.raises(CaptureError, match=rf"could not capture {model_class.__name__}(.|\n)*Try: ") as info:
        capture(model_class(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "export-nonstrict" in message and "export-strict" in message   # both methods were tried
    assert "test_capture.py" in message                                    # the failing line of model code


class _SlowToTrace(nn.Module):
    """Stands in for a model whose symbolic shape reasoning runs for minutes (Swin's windows): tracing it
    takes a second however its sizes are given."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        import time
        time.sleep(1.0)
        return self.proj(x).flatten(1)


def test_a_symbolic_capture_past_its_time_limit_keeps_the_batch_symbolic_and_says_why(monkeypatch):
    import signal
    from partitioner import partition
    from passes.signature import BatchError
    model, x = _SlowToTrace().eval(), torch.randn(4, 6, 8)
    gm = capture(model, (x,), symbolic_limit_s=0.3)
    assert gm.meta["fxpart.capture"]["symbolic"] == "batch"
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    other = torch.randn(3, 6, 8)                                # the batch still varies
    torch.testing.assert_close(gm(other), model(other))
    monkeypatch.setenv("FXPART_SYMBOLIC_CAPTURE_S", "0.3")       # the limit partition's capture runs under
    plan = partition(model, 2, (x,), strategy="pipeline", device="h100", training=False)
    torch.testing.assert_close(plan(other), model(other))
    with pytest.raises(BatchError, match=r"x dim 1 has size 5, .* it needs 6 \(only the batch dimension varies: "
                                         r"torch's shape reasoning took over 0.3 s"):
        plan(torch.randn(2, 5, 8))


def test_a_symbolic_capture_within_its_limit_keeps_every_dimension_the_model_allows():
    model, x = _SlowToTrace().eval(), torch.randn(4, 6, 8)
    gm = capture(model, (x,), symbolic_limit_s=60)
    assert gm.meta["fxpart.capture"]["symbolic"] == "every"
    other = torch.randn(3, 5, 8)
    torch.testing.assert_close(gm(other), model(other))


class _LayerDrop(nn.Module):
    """Skips its layer at random in training, as LayerDrop does: a Python branch on a random draw."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 8)

    def forward(self, x):
        if self.training and torch.rand(()) < 0.1:
            return x
        return self.layer(x)


def test_a_model_that_branches_on_random_draws_in_training_is_refused_with_the_eval_remedy():
    model, x = _LayerDrop(), torch.randn(2, 8)
    with pytest.raises(CaptureError, match=r"_LayerDrop is in training mode.*capture it after model.eval\(\)"):
        capture(model.train(), (x,))
    gm = capture(model.eval(), (x,))
    torch.testing.assert_close(gm(x), model(x))
