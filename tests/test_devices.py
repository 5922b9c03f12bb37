"""Device specs and the roofline time model: names, validation, round trips, bounds, overrides."""
import json

import pytest
import torch
from torch import nn

from passes import DEVICES, DeviceSpec, estimate, get_device_spec


def _spec(**overrides) -> DeviceSpec:
    figures = dict(name="toy", peak_flops={torch.float32: 1e12}, memory_bandwidth_Bps=1e11,
                   memory_bytes=10**9, link_bandwidth_Bps=1e10)
    return DeviceSpec(**(figures | overrides))


class _Relu(nn.Module):
    def forward(self, x):
        return torch.relu(x)


def _on_meta(module: nn.Module, *shape: int, dtype=torch.float32):
    """The module on the meta device (no memory) and a meta input of ``shape``."""
    return module.to(device="meta", dtype=dtype), (torch.empty(*shape, device="meta", dtype=dtype),)


def _node(est, op: str):
    (row,) = [r for r in est.nodes if r.op == op]
    return row


@pytest.mark.parametrize("name", ["h100", "H100", "NVIDIA H100 80GB HBM3", "h200", "a100"])
def test_known_names_resolve_to_their_spec(name):
    spec = get_device_spec(name)
    assert spec.name == name.lower().replace("nvidia ", "")[:4]
    assert spec is DEVICES[spec.name]


def test_device_spec_passes_through_unchanged():
    spec = _spec()
    assert get_device_spec(spec) is spec


def test_unknown_name_raises_value_error_listing_known_names():
    with pytest.raises(ValueError, match="tpu-v5") as info:
        get_device_spec("tpu-v5")
    for known in ("h100", "h200", "a100", "cpu"):
        assert known in str(info.value)


@pytest.mark.parametrize("bad", [
    dict(peak_flops={}), dict(peak_flops={torch.float32: 0.0}), dict(peak_flops={torch.float32: -1e12}),
    dict(peak_flops={torch.float32: float("nan")}), dict(memory_bandwidth_Bps=0.0),
    dict(link_bandwidth_Bps=-1.0), dict(memory_bytes=-1), dict(launch_s=-1e-6),
])
def test_device_spec_rejects_nonpositive_figures(bad):
    with pytest.raises(ValueError, match="toy"):
        _spec(**bad)


@pytest.mark.parametrize("name", ["h100", "h200", "a100"])
def test_device_spec_round_trips_through_json(name):
    spec = get_device_spec(name)
    again = DeviceSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert hash(again) == hash(spec)


def test_big_matmul_is_compute_bound():
    spec = get_device_spec("h100")
    model, inputs = _on_meta(nn.Linear(4096, 4096), 4096, 4096)
    row = _node(estimate(model, inputs, device=spec), "linear")
    assert row.flops == 2 * 4096 ** 3
    # what a large matmul achieves, not the datasheet peak
    compute_s = row.flops / (spec.flops_per_s(torch.float32) * spec.matmul_efficiency)
    memory_s = 3 * 4096 * 4096 * 4 / (spec.memory_bandwidth_Bps * spec.memory_efficiency)   # x, weight, out
    assert spec.matmul_efficiency < 1 and compute_s > 10 * memory_s
    assert row.forward_time_s == pytest.approx(compute_s + spec.launch_s, rel=1e-6)


def test_elementwise_op_is_memory_bound():
    spec = get_device_spec("h100")
    model, inputs = _on_meta(_Relu(), 4096, 4096)
    row = _node(estimate(model, inputs, device=spec), "relu")
    assert row.flops == 0
    read_and_written = 2 * 4096 * 4096 * 4
    achieved = spec.memory_bandwidth_Bps * spec.memory_efficiency
    assert row.forward_time_s == pytest.approx(read_and_written / achieved + spec.launch_s, rel=1e-6)


def test_bf16_is_faster_than_fp32_on_h100():
    fp32 = estimate(*_on_meta(nn.Linear(4096, 4096), 4096, 4096), device="h100")
    bf16 = estimate(*_on_meta(nn.Linear(4096, 4096), 4096, 4096, dtype=torch.bfloat16), device="h100")
    assert bf16.flops == fp32.flops
    assert bf16.time_s < fp32.time_s / 5   # 989 vs 67 TFLOP/s dense


def test_measured_node_times_override_the_roofline():
    model, inputs = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)), (torch.randn(8, 64),)
    roofline = estimate(model, inputs, device="h100")
    first = next(r for r in roofline.nodes if r.flops > 0)
    measured = estimate(model, inputs, device="h100", node_times={first.name: 0.25})
    by_name = {r.name: r for r in measured.nodes}
    assert by_name[first.name].forward_time_s == 0.25
    assert measured.time_s == pytest.approx(roofline.time_s - first.forward_time_s + 0.25)
    others = [r for r in roofline.nodes if r.name != first.name]
    assert all(by_name[r.name].time_s == r.time_s for r in others)


def test_training_time_includes_backward():
    model, inputs = nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256), nn.GELU(), nn.Linear(256, 8)), \
        (torch.randn(32, 256),)
    inference = estimate(model, inputs, device="h100")
    training = estimate(model, inputs, device="h100", training=True)
    assert training.time_s > inference.time_s
    assert all(r.backward_time_s == 0 for r in inference.nodes)
    for row in training.nodes:
        assert row.time_s == pytest.approx(row.forward_time_s + row.backward_time_s)
    # norms and activations count no FLOPs, but their backward still moves memory
    for op in ("layer_norm", "gelu"):
        assert _node(training, op).backward_time_s > 0
