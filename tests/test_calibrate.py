"""Measuring links and shared compute units into a DeviceSpec (``runtime.calibrate``).

The fits are checked on synthetic times; the slow test launches this file as 2 gloo ranks that
measure this machine together and must agree on every figure.
"""
from __future__ import annotations

import sys

import pytest
import torch

from runtime.calibrate import fit_link
from runtime.launch import run_local


def test_fit_link_recovers_bandwidth_and_latency_of_point_to_point_times():
    sizes = [2**10, 2**16, 2**20, 2**24]
    bandwidth, latency = fit_link(sizes, [50e-6 + b / 3e9 for b in sizes])
    assert bandwidth == pytest.approx(3e9, rel=1e-6) and latency == pytest.approx(50e-6, rel=1e-6)


def test_fit_link_reads_all_reduce_times_through_the_ring_formula():
    n, sizes = 4, [2**12, 2**18, 2**22]
    times = [2 * (n - 1) * 20e-6 + 2 * (n - 1) / n * b / 1e9 for b in sizes]
    bandwidth, latency = fit_link(sizes, times, steps=2 * (n - 1), share=2 * (n - 1) / n)
    assert bandwidth == pytest.approx(1e9, rel=1e-6) and latency == pytest.approx(20e-6, rel=1e-6)


def test_fit_link_refuses_times_that_do_not_grow_with_size():
    with pytest.raises(ValueError, match="do not grow"):
        fit_link([1e3, 1e6], [1e-3, 1e-4])
    with pytest.raises(ValueError, match="two sizes"):
        fit_link([1e3], [1e-3])


# -- two ranks on this machine ----------------------------------------------------------------------
def _worker(out_path: str) -> None:
    import torch.distributed as dist
    from runtime.calibrate import measured_spec
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    spec = measured_spec(sizes=(2**12, 2**18, 2**22), repeats=3)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, spec.to_dict())
    if dist.get_rank() == 0:
        torch.save(everyone, out_path)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_measure_the_same_spec(tmp_path):
    out = tmp_path / "spec.pt"
    run_local([__file__, str(out)], 2, timeout_s=300)
    first, second = torch.load(out, weights_only=False)
    assert first == second
    assert first["link_bandwidth_Bps"] > 0 and first["collective_bandwidth_Bps"] > 0
    assert 0 < first["node_compute_units"] <= 2
    assert "gloo between 2 ranks" in first["source"]


if __name__ == "__main__":
    _worker(sys.argv[1])
