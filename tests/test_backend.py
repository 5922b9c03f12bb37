"""The torch.compile backend: same numerics as eager, one record per graph, user passes applied."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passes import backend as fxbackend
from passes import zoo
from passes.backend import compile_backend, register_backends


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _Breaks(nn.Module):
    """Two linear layers with a graph break between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        x = F.relu(self.a(x))
        torch._dynamo.graph_break()
        return self.b(x)


def _tiny_gpt():
    torch.manual_seed(0)
    return zoo.tiny_gpt(n_layers=2, d_model=64, seq=16)


def _phases(backend, index=0):
    return [r.phase for r in backend.graphs if r.index == index]


def test_eager_compiler_matches_eager_on_tiny_gpt_and_records_costs():
    model, inputs = _tiny_gpt()
    backend = compile_backend(compiler="eager")
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend)(*inputs), model(*inputs))
    assert _phases(backend) == ["dynamo", "inference"]
    dynamo = backend.graphs[0]
    assert dynamo.flops > 0 and dynamo.peak_bytes > 0 and not dynamo.error
    assert backend.graphs[1].flops == dynamo.flops     # the ATen graph costs what the torch graph does
    assert "dynamo" in backend.report()


def test_eager_compiler_matches_eager_on_mlp():
    torch.manual_seed(0)
    model, inputs = zoo.mlp(depth=3, width=32, batch=4)
    backend = compile_backend(compiler="eager")
    torch.testing.assert_close(torch.compile(model, backend=backend)(*inputs), model(*inputs))
    assert backend.graphs[0].flops == 3 * 2 * 4 * 32 * 32


def test_graph_break_gives_one_record_per_graph():
    torch.manual_seed(0)
    model, x = _Breaks(), torch.randn(4, 16)
    backend = compile_backend(compiler="eager")
    torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x))
    dynamo = [r for r in backend.graphs if r.phase == "dynamo"]
    assert [r.index for r in dynamo] == [0, 1]
    assert [r.flops for r in dynamo] == [2 * 4 * 16 * 32, 2 * 4 * 32 * 8]


def test_new_shape_recompiles_and_is_recorded():
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    backend = compile_backend(compiler="eager")
    compiled = torch.compile(model, backend=backend)
    for batch in (2, 3):
        x = torch.randn(batch, 8)
        torch.testing.assert_close(compiled(x), model(x))
    dynamo = [r for r in backend.graphs if r.phase == "dynamo"]
    assert [r.index for r in dynamo] == [0, 1]
    assert [r.flops for r in dynamo] == [2 * 2 * 8 * 8, 2 * 3 * 8 * 8]   # the recompile's hint shape


def test_training_step_gives_eager_gradients_and_sees_forward_and_backward():
    model, (ids,) = _tiny_gpt()
    reference, _ = _tiny_gpt()
    backend = compile_backend(compiler="eager")
    torch.compile(model, backend=backend)(ids).logsumexp(-1).mean().backward()
    reference(ids).logsumexp(-1).mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert _phases(backend) == ["dynamo", "forward", "backward"]
    dynamo, forward, backward = backend.graphs
    assert dynamo.backward_flops > dynamo.flops > 0
    assert forward.flops == dynamo.flops and backward.flops == dynamo.backward_flops


def test_user_pass_rewrites_relu_to_gelu():
    def relu_to_gelu(gm):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (torch.relu, F.relu):
                node.target, node.kwargs = F.gelu, {}
        return gm

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU()), torch.randn(4, 8)
    backend = compile_backend([relu_to_gelu], compiler="eager")
    out = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(out, F.gelu(model[0](x)))
    assert backend.graphs[0].passes == ("relu_to_gelu",)


def test_aot_pass_sees_forward_and_backward_graphs():
    seen = []

    def count_nodes(gm):
        seen.append((gm.meta[fxbackend.PHASE], len(gm.graph.nodes)))   # returns None: nothing rewritten

    torch.manual_seed(0)
    model, x = nn.Linear(8, 4), torch.randn(2, 8)
    backend = compile_backend(compiler="eager", aot_passes=[count_nodes])
    torch.compile(model, backend=backend)(x).sum().backward()
    assert [phase for phase, _ in seen] == ["forward", "backward"]
    assert [r.passes for r in backend.graphs] == [(), ("count_nodes",), ("count_nodes",)]


def test_failing_pass_is_named():
    def broken(gm):
        raise KeyError("oops")

    backend = compile_backend([broken], compiler="eager")
    with pytest.raises(Exception, match="pass broken failed"):
        torch.compile(nn.Linear(2, 2), backend=backend)(torch.randn(1, 2))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="compiler"):
        compile_backend(compiler="tvm")
    with pytest.raises(TypeError, match="pass"):
        compile_backend(["not a function"])


def test_registration_is_idempotent_across_reloads():
    register_backends()
    importlib.reload(fxbackend)      # a notebook re-running its imports
    fxbackend.register_backends()
    assert {"fxpart", "fxpart_eager"} <= set(torch._dynamo.list_backends(exclude_tags=()))
    fxbackend.DEFAULT_EAGER.reset()
    model, x = nn.Linear(4, 4), torch.randn(2, 4)
    torch.testing.assert_close(torch.compile(model, backend="fxpart_eager")(x), model(x))
    assert fxbackend.DEFAULT_EAGER.graphs[0].flops == 2 * 2 * 4 * 4


@pytest.mark.slow
def test_inductor_backend_matches_eager_and_trains():
    register_backends()
    fxbackend.DEFAULT.reset()
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), torch.randn(8, 16)
    reference = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    reference.load_state_dict(model.state_dict())
    out = torch.compile(model, backend="fxpart")(x)
    torch.testing.assert_close(out, reference(x))
    out.square().mean().backward()
    reference(x).square().mean().backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert [r.phase for r in fxbackend.DEFAULT.graphs] == ["dynamo", "forward", "backward"]
    assert all(r.flops > 0 and not r.error for r in fxbackend.DEFAULT.graphs)


@pytest.mark.slow
def test_inductor_backend_on_graph_break_model():
    torch.manual_seed(0)
    model, x = _Breaks(), torch.randn(4, 16)
    backend = compile_backend()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x))
    assert [(r.index, r.phase) for r in backend.graphs] == [(0, "dynamo"), (0, "inference"), (1, "dynamo"),
                                                              (1, "inference")]


def _hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=32, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return GPT2LMHeadModel(cfg).eval(), torch.randint(0, 256, (2, 16))


@pytest.mark.parametrize("compiler", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_hugging_face_gpt2_compiles_to_eager_outputs_and_gradients(compiler):
    model, ids = _hf_gpt2()
    reference, _ = _hf_gpt2()
    backend = compile_backend(compiler=compiler)
    out = torch.compile(model, backend=backend)(ids).logits
    want = reference(ids).logits
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)
    assert {"forward", "backward"} <= {r.phase for r in backend.graphs}
    assert all(not r.error for r in backend.graphs)
