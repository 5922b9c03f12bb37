"""A sharded stage (``data_parallel="shard"``) runs its graph as FSDP2 units, one per block.

FSDP2 passes a unit's inputs through an autograd function and hooks its outputs: a block that
writes its input in place (``ReLU(inplace=True)`` on what the previous block returned, a view)
used to fail in autograd, and every unit returning a view printed a warning. Units now work on a
copy of any input they write in place, and the Runner refuses a ``loss_fn`` that writes the
model's outputs in place (which would drop FSDP's pre-backward hook silently).

A value that is a view of a parameter (a norm weight passed into a tensor-parallel region, a
weight's transpose) must not leave the unit that holds the parameter: FSDP frees the gathered
parameter after the unit's forward and the next unit read freed memory (a segfault on Qwen3 at
dp=2 x tp=2, sharded).

The slow test launches this file as a script once per rank.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runtime.launch import run_local


class _Reshape(nn.Module):          # returns a view of its linear's output
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(x).view(-1, 4, 4)


class _InPlaceFirst(nn.Module):     # writes its input in place before anything else
    def __init__(self):
        super().__init__()
        self.act, self.fc = nn.ReLU(inplace=True), nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(self.act(x).flatten(1))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Reshape(), _InPlaceFirst(), _Reshape(), _InPlaceFirst()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _case():
    torch.manual_seed(0)
    return _Model(), torch.randn(8, 16), torch.randn(8, 16)


class _ViewAcross(nn.Module):
    """A parameter viewed before the first block and read by the last one."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 16))

    def forward(self, x):
        s = self.scale.view(1, 16)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x * s


def test_a_view_of_a_parameter_stays_in_the_unit_that_holds_the_parameter():
    from passes import capture
    from runtime.data_parallel import _parameter_views, split_by_block
    torch.manual_seed(0)
    model, x = _ViewAcross(), torch.randn(8, 16)
    gm = capture(model, (x,))
    assert [n.target for n in _parameter_views(gm)] == [torch.ops.aten.view.default]
    units = split_by_block(gm)
    for unit in units.units:
        views = _parameter_views(unit)
        outputs = next(iter(unit.graph.find_nodes(op="output"))).all_input_nodes
        assert not views & set(outputs), unit.code
    torch.testing.assert_close(units(x)[0], model(x))


def test_a_unit_that_writes_its_input_in_place_works_on_a_copy_and_computes_the_same():
    from passes import capture
    from runtime.data_parallel import split_by_block
    model, x, target = _case()
    gm = capture(model, (x,))
    units = split_by_block(gm)
    copies = [sum(n.target is torch.ops.aten.clone.default for n in u.graph.nodes) for u in units.units]
    writers = [any(str(n.target).startswith("aten.relu_") for n in u.graph.nodes) for u in units.units]
    assert len(units.units) == 4 and copies == [int(w) for w in writers] == [0, 1, 0, 1]
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (out,) = units(x1)              # the graph's outputs, as a tuple
    torch.testing.assert_close(out, model(x2))
    F.mse_loss(out, target).backward()
    F.mse_loss(model(x2), target).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_replicated_parameters_of_a_sharded_stage_are_listed_in_the_modules_order():
    """GradSync all-reduces its buckets element by element, so every replica must list the parameters it keeps
    whole in one order: the module's, not a set's (object ids differ between processes; ALBERT's 13 shared
    weights were averaged scrambled at dp=2 x pp=2, silently)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from passes import capture
    from runtime.data_parallel import replicated_params, shard_module
    model, x = _ViewAcross(), torch.randn(8, 16)
    gm = capture(model, (x,))
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        keep = [dict(gm.named_parameters())[n] for n in ("layers.2.weight", "layers.0.bias", "scale", "layers.1.weight")]
        module = shard_module(gm, init_device_mesh("cpu", (1,)), reshard_after_forward=True, keep_whole=tuple(keep))
        order = [id(p) for p in gm.parameters()]
        got = [order.index(id(p)) for p in replicated_params(module)]
        assert len(got) == 4 and got == sorted(got)
    finally:
        if started:
            dist.destroy_process_group()


def _train_sharded(model, reference, x, target):
    """Three SGD steps of ``model`` sharded over 2 ranks and of ``reference`` in this process; the plan and the
    whole trained state (on rank 0)."""
    from partitioner import partition
    from runtime import Runner
    plan = partition(model, 2, (x,), strategy="data", data_parallel="shard", device="h100")
    runner = Runner(plan, loss_fn=F.mse_loss, optimizer_fn=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        runner.step((x,), target)
        F.mse_loss(reference(x), target).backward()
        opt.step()
        opt.zero_grad()
    return plan, runner.full_state_dict()


def _worker(out_path: str) -> None:
    import torch.distributed as dist
    from runtime import Runner
    warnings.simplefilter("always")
    dist.init_process_group("gloo")
    model, x, target = _case()
    reference = _Model()
    reference.load_state_dict(model.state_dict())
    with warnings.catch_warnings(record=True) as caught:        # every warning ("always" above), bar filtered ones
        plan, state = _train_sharded(model, reference, x, target)

    def writes_outputs(out, t):
        out.mul_(2)
        return F.mse_loss(out, t)
    refused = ""
    try:
        Runner(plan, loss_fn=writes_outputs, optimizer_fn=lambda ps: torch.optim.SGD(ps, lr=0.1)).step((x,), target)
    except Exception as e:          # noqa: BLE001 - the message is what the test reads
        refused = str(e)
    torch.manual_seed(0)
    viewed, reference_viewed = _ViewAcross(), _ViewAcross()
    reference_viewed.load_state_dict(viewed.state_dict())
    _, viewed_state = _train_sharded(viewed, reference_viewed, x, target)
    if dist.get_rank() == 0:
        torch.save({"state": state, "reference": reference.state_dict(), "refused": refused,
                    "warnings": [str(w.message) for w in caught], "viewed": viewed_state,
                    "viewed_reference": reference_viewed.state_dict()}, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_units_that_write_inputs_in_place_train_equal_to_one_process(tmp_path):
    out = tmp_path / "result.pt"
    run_local([__file__, str(out)], 2, timeout_s=300)
    got = torch.load(out, weights_only=False)
    for key, want in got["reference"].items():
        torch.testing.assert_close(got["state"][key], want, rtol=1e-5, atol=1e-5)
    assert not [w for w in got["warnings"] if "returned a view tensor" in w], got["warnings"]
    assert "loss_fn wrote the model's outputs in place" in got["refused"], got["refused"]
    for key, want in got["viewed_reference"].items():       # a parameter's view read two units later
        torch.testing.assert_close(got["viewed"][key], want, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    _worker(sys.argv[1])
