"""The step simulator's terms: ranks sharing compute units, collective link figures, gradient buckets as the
backward finishes them, the optimizer's own bandwidth, the runtime's host time per action."""
from __future__ import annotations

import random

import pytest
import torch

from partitioner.comm import all_reduce_s, link_of
from partitioner.schedules import make_schedule, simulate
from partitioner.simulate_step import BUCKET_BYTES, StageTiming, _bucket_tail_s, simulate_plan
from partitioner.timeshare import Task, layout
from passes import DEVICES, DeviceSpec

_MB = 2**20


def _spec(**overrides) -> DeviceSpec:
    figures = dict(name="toy", peak_flops={torch.float32: 1e12}, memory_bandwidth_Bps=1e11,
                   link_bandwidth_Bps=1e10, link_latency_s=1e-5)
    return DeviceSpec(**(figures | overrides))


def _stage(forward_s=0.01, backward_s=0.02, param_bytes=0.0, **extra) -> StageTiming:
    return StageTiming(forward_s=forward_s, backward_s=backward_s, send_bytes=0.0, grad_bytes=0.0,
                       collective_s=0.0, param_bytes=param_bytes, **extra)


def _step(spec, mesh, timings, m=1, optimizer=None):
    mesh = {"dp": 1, "tp": 1, "pp": 1} | mesh
    return simulate_plan(timings, mesh=mesh, schedule="1f1b", n_microbatches=m, data_parallel="replicate",
                         spec=spec, devices_per_node=8, training=True, optimizer=optimizer)


# -- ranks sharing compute units ------------------------------------------------------------------
def test_two_ranks_on_one_core_take_twice_as_long_when_both_compute():
    own, shared = _spec(), _spec(node_compute_units=1.0)
    timings = [_stage(0.01, 0.02)]
    assert _step(own, {"tp": 2}, timings).step_time_s == pytest.approx(0.03)
    assert _step(shared, {"tp": 2}, timings).step_time_s == pytest.approx(0.06)


def test_as_many_units_as_ranks_changes_nothing():
    timings = [_stage(0.01, 0.02), _stage(0.012, 0.024)]
    own = _step(_spec(), {"pp": 2}, timings, m=4)
    enough = _step(_spec(node_compute_units=2.0), {"pp": 2}, timings, m=4)
    assert enough.step_time_s == own.step_time_s and enough.bubble_fraction == own.bubble_fraction


def test_a_pipeline_stage_computes_at_full_speed_in_the_others_bubble():
    """One unit for 2 stages: the first forward and the last backward run alone, everything else at half speed."""
    timings = [_stage(0.01, 0.02), _stage(0.01, 0.02)]
    m = 4
    step = _step(_spec(node_compute_units=1.0), {"pp": 2}, timings, m=m).step_time_s
    everything_halved = 2 * _step(_spec(), {"pp": 2}, timings, m=m).step_time_s
    serial = 2 * m * (0.01 + 0.02)             # one unit can never do better than all the work in a row
    assert serial <= step + 1e-12 < everything_halved


def test_layout_with_room_for_every_stage_is_the_schedules_layout():
    rng = random.Random(0)
    for name, pp, m in (("1f1b", 4, 8), ("gpipe", 3, 5), ("1f1b", 2, 1)):
        forward = [rng.uniform(1, 2) for _ in range(pp)]
        backward = [rng.uniform(2, 4) for _ in range(pp)]
        sends = [rng.uniform(0, 0.5) for _ in range(pp)]
        actions = make_schedule(name, pp, m)
        expected = simulate(actions, forward, backward, send_s=sends)
        tasks = [[Task((a.kind, a.microbatch), forward[s] if a.kind == "F" else backward[s],
                       after=_after(a, pp)) for a in stage] for s, stage in enumerate(actions)]
        spans = layout(tasks, capacity=float(pp), send_s=sends)
        for s, stage_spans in enumerate(expected.spans):
            for span in stage_spans:
                got = spans[s][(span.action.kind, span.action.microbatch)]
                assert got == pytest.approx((span.start_s, span.end_s)), (name, s, span.action)


def _after(a, pp):
    if a.kind == "F":
        return ((a.stage - 1, ("F", a.microbatch)),) if a.stage else ()
    return ((a.stage, ("F", a.microbatch)),) + (((a.stage + 1, ("B", a.microbatch)),) if a.stage < pp - 1 else ())


def test_layout_refuses_a_deadlock():
    tasks = [[Task("a", 1.0, after=((1, "b"),))], [Task("b", 1.0, after=((0, "a"),))]]
    with pytest.raises(ValueError, match="deadlocks"):
        layout(tasks, capacity=1.0)


def test_waits_take_no_compute():
    """A stage blocked in a collective leaves the unit to the other: both end when the longer compute ends."""
    tasks = [[Task("a", 1.0, wait_s=1.0)], [Task("b", 0.0, wait_s=1.0), Task("c", 1.0)]]
    spans = layout(tasks, capacity=1.0)
    assert spans[0]["a"] == pytest.approx((0.0, 2.0)) and spans[1]["c"] == pytest.approx((1.0, 2.0))


# -- links --------------------------------------------------------------------------------------------
def test_collectives_use_their_own_figures_and_point_to_point_the_links():
    spec = _spec(collective_bandwidth_Bps=2e9, collective_latency_s=1e-4)
    assert link_of(spec, 4, collective=True) == (2e9, 1e-4)
    assert link_of(spec, 4) == (1e10, 1e-5)
    assert link_of(spec, 16, collective=True) == (spec.inter_node_bandwidth_Bps, spec.inter_node_latency_s)
    assert link_of(_spec(), 4, collective=True) == link_of(_spec(), 4)       # 0: the link's


def test_gpu_specs_keep_their_figures():
    for spec in DEVICES.values():
        assert (spec.collective_bandwidth_Bps, spec.collective_latency_s, spec.node_compute_units,
                spec.optimizer_bandwidth_Bps) == (0, 0, 0, 0)
        assert link_of(spec, 8, collective=True) == link_of(spec, 8)


def test_new_figures_round_trip_and_refuse_negatives():
    spec = _spec(collective_bandwidth_Bps=1e9, node_compute_units=1.5, optimizer_bandwidth_Bps=3e9)
    assert DeviceSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="toy"):
        _spec(node_compute_units=-1.0)


# -- data-parallel buckets and the optimizer -----------------------------------------------------------
def test_one_bucket_is_reduced_whole_after_the_backward():
    link = (1e9, 0.0)
    assert _bucket_tail_s(10 * _MB, 1.0, 2, link) == pytest.approx(all_reduce_s(10 * _MB, 2, link))


def test_many_buckets_on_a_fast_link_expose_only_the_last():
    link = (1e12, 0.0)
    nbytes = 10 * BUCKET_BYTES
    assert _bucket_tail_s(nbytes, 1.0, 8, link) == pytest.approx(all_reduce_s(BUCKET_BYTES, 8, link))


def test_buckets_on_a_slow_link_queue_behind_each_other():
    link = (1e8, 0.0)
    nbytes = 4 * BUCKET_BYTES
    total = all_reduce_s(nbytes, 2, link)
    first_ready = 0.25 * 0.01
    assert _bucket_tail_s(nbytes, 0.01, 2, link) == pytest.approx(first_ready + total - 0.01)


def test_replicated_gradients_pay_the_bucket_copies_on_the_step():
    spec = _spec()
    nbytes = 100 * _MB
    one = _step(spec, {}, [_stage(param_bytes=nbytes)])
    two = _step(spec, {"dp": 2}, [_stage(param_bytes=nbytes)])
    copies = 6 * nbytes / spec.memory_bandwidth_Bps
    wait = _bucket_tail_s(nbytes, 0.02, 2, link_of(spec, 2, collective=True))
    assert two.step_time_s == pytest.approx(one.step_time_s + wait + copies)


def test_micro_batches_after_the_first_add_their_gradients_into_the_earlier_ones():
    spec, nbytes, f, b = _spec(), 100 * _MB, 0.01, 0.02
    one = _step(spec, {}, [_stage(f, b, param_bytes=nbytes)], m=1)
    four = _step(spec, {}, [_stage(f, b, param_bytes=nbytes)], m=4)
    assert one.compute_s == pytest.approx(f + b)
    accumulate = 3 * 3 * nbytes / spec.memory_bandwidth_Bps          # 3 adds, each 2 reads and a write
    assert four.step_time_s - one.step_time_s == pytest.approx(3 * (f + b) + accumulate)
    stages = [_stage(f, b, param_bytes=nbytes), _stage(f, b, param_bytes=nbytes)]
    free = _step(spec, {"pp": 2}, [_stage(f, b), _stage(f, b)], m=4).step_time_s
    assert _step(spec, {"pp": 2}, stages, m=4).step_time_s > free


def test_optimizer_runs_at_the_specs_optimizer_bandwidth():
    nbytes = 100 * _MB
    fused = _step(_spec(), {}, [_stage(param_bytes=nbytes)], optimizer="adamw").optimizer_s
    measured = _step(_spec(optimizer_bandwidth_Bps=1e10), {}, [_stage(param_bytes=nbytes)], optimizer="adamw")
    assert fused == pytest.approx(9 * nbytes / 1e11)          # params, grads, 2 moments read; 3 written
    assert measured.optimizer_s == pytest.approx(9 * nbytes / 1e10)


@pytest.mark.parametrize("m", [1, 4])
def test_sharded_data_parallel_traffic_longer_than_the_compute_is_exposed(m):
    spec = _spec()
    stage = _stage(forward_s=0.01, backward_s=0.02, param_bytes=200 * _MB, n_units=10)   # gathers of ~20 ms each
    mesh = {"dp": 8, "tp": 1, "pp": 1}
    cost = simulate_plan([stage], mesh=mesh, schedule="1f1b", n_microbatches=m, data_parallel="shard", spec=spec,
                         devices_per_node=8, training=True, optimizer=None)
    dp = next(a for a in cost.axes if a.axis == "dp")
    compute = m * (stage.forward_s + stage.backward_s)
    # one link carries every gather and the reduce-scatter: what the compute cannot hide is waited for
    assert dp.exposed_s >= dp.time_s - compute - 1e-12
    assert cost.step_time_s >= dp.time_s - 1e-12
