"""Interleaved 1F1B: the schedule as data, its simulated step and memory, the planner's choice, and plans
that hold several stages per pipeline rank (report, save and load, refusals). Training on ranks equal to one
process is in test_runtime.py (pp2-interleaved, dp2pp2-shard-interleaved, tp2pp2-interleaved, mlp-interleaved)."""
from __future__ import annotations

import pytest
import torch

import partitioner
from partitioner.schedules import (INTERLEAVED, format_schedule, in_flight_by_stage, make_schedule, parse_schedule,
                                   simulate)
from partitioner.simulate_step import StageTiming, simulate_plan
from passes import zoo

CASES = [(2, 2, 2), (2, 2, 8), (2, 4, 4), (3, 2, 6), (4, 2, 4), (4, 2, 8), (4, 3, 12), (8, 2, 16)]


@pytest.mark.parametrize("p, v, m", CASES)
def test_every_stage_runs_every_microbatch_forward_then_backward_once(p, v, m):
    sched = make_schedule(INTERLEAVED, p, m, v)
    assert len(sched) == p
    seen = sorted((a.stage, a.kind, a.microbatch) for row in sched for a in row)
    assert seen == sorted((s, k, mb) for s in range(p * v) for k in "FB" for mb in range(m))
    for r, row in enumerate(sched):
        assert {a.stage for a in row} == set(range(r, p * v, p))           # rank r holds r, r + p, ...
        done = set()
        for a in row:
            assert a.kind == "F" or (a.stage, "F", a.microbatch) in done
            done.add((a.stage, a.kind, a.microbatch))


@pytest.mark.parametrize("p, v, m", CASES)
def test_the_fill_and_drain_shrink_by_the_stages_per_rank(p, v, m):
    """Even stages, forward f and backward 2f per rank's share: 1F1B takes (m + p - 1) 3f, interleaved
    (m + (p - 1) / v) 3f (Megatron-LM's bubble of (p - 1) / (v m))."""
    f = 1.0
    interleaved = simulate(make_schedule(INTERLEAVED, p, m, v), [f / v] * (p * v), [2 * f / v] * (p * v))
    plain = simulate(make_schedule("1f1b", p, m), f, 2 * f)
    assert plain.total_s == pytest.approx((m + p - 1) * 3 * f)
    assert interleaved.total_s == pytest.approx((m + (p - 1) / v) * 3 * f)


def test_rank_zero_holds_megatrons_warm_up_plus_one_in_flight():
    p, v, m = 4, 2, 8
    for r, row in enumerate(make_schedule(INTERLEAVED, p, m, v)):
        live = peak = 0
        for a in row:
            live += 1 if a.kind == "F" else -1
            peak = max(peak, live)
        assert peak == min((p - r - 1) * 2 + (v - 1) * p + 1, m * v)
        assert sum(in_flight_by_stage(row).values()) >= peak


def test_text_form_names_the_stage_when_a_rank_holds_several():
    sched = make_schedule(INTERLEAVED, 2, 2, 2)
    assert format_schedule(sched) == ["F0 F1 2F0 2F1 2B0 2B1 B0 B1", "F0 F1 3F0 3F1 3B0 3B1 B0 B1"]
    assert parse_schedule(format_schedule(sched)) == sched


def test_bad_interleaved_sizes_are_refused_with_what_to_use():
    with pytest.raises(ValueError, match="not a multiple of 4; use 4 or 8"):
        make_schedule(INTERLEAVED, 4, 6, 2)
    with pytest.raises(ValueError, match="at least 2 stages per pipeline rank"):
        make_schedule(INTERLEAVED, 2, 2, 1)
    with pytest.raises(ValueError, match="one stage per pipeline rank"):
        make_schedule("1f1b", 2, 2, 2)


def _timing(f, b, memory=100.0, params=0.0):
    return StageTiming(forward_s=f, backward_s=b, send_bytes=0.0, grad_bytes=0.0, collective_s=0.0,
                       param_bytes=params, memory_bytes=memory)


def test_simulated_step_of_an_interleaved_plan_beats_1f1b_and_a_rank_holds_the_sum_of_its_stages():
    from passes import get_device_spec
    spec = get_device_spec("h100")
    common = dict(mesh={"dp": 1, "tp": 1, "pp": 4}, n_microbatches=4, data_parallel="replicate", spec=spec,
                  devices_per_node=8, training=True, optimizer=None)
    plain = simulate_plan([_timing(1e-2, 2e-2, 400.0)] * 4, schedule="1f1b", **common)
    inter = simulate_plan([_timing(5e-3, 1e-2, 200.0 + s) for s in range(8)], schedule=INTERLEAVED, n_virtual=2,
                          **common)
    assert inter.step_time_s < plain.step_time_s
    assert inter.bubble_fraction < plain.bubble_fraction
    assert inter.stage_peak_bytes == tuple(int(200.0 + r + 200.0 + r + 4) for r in range(4))   # stages r and r + 4


def _deep():
    torch.manual_seed(0)
    return zoo.tiny_gpt(n_layers=8, d_model=64, n_heads=4, batch=4, seq=32)


def test_the_planner_interleaves_when_few_microbatches_leave_a_large_bubble():
    model, inputs = _deep()
    plan = partitioner.partition(model, 4, inputs, strategy="pipeline", device="h100", n_microbatches=4)
    labels = {c.label() for c in plan.candidates if c.fits}
    assert any("interleaved-1f1b v=2" in label for label in labels) and any(", 1f1b" in label for label in labels)
    assert plan.schedule == INTERLEAVED and plan.n_virtual > 1 and len(plan.stages) == 4 * plan.n_virtual
    best_plain = min(c.step_time_s for c in plan.candidates if c.fits and c.n_virtual == 1)
    assert plan.cost.step_time_s < best_plain
    torch.testing.assert_close(plan(*inputs), model(*inputs))
    report = plan.report()
    assert "stages per pipeline rank" in report and "pp rank" in report


def test_an_interleaved_plan_saves_and_loads_with_its_stages_per_rank(tmp_path):
    model, inputs = _deep()
    plan = partitioner.partition(model, 2, inputs, strategy="pipeline", device="h100", n_virtual=2, n_microbatches=2)
    assert (plan.schedule, plan.n_virtual, len(plan.stages)) == (INTERLEAVED, 2, 4)
    loaded = partitioner.load_plan(plan.save(tmp_path / "plan.json"), model, inputs)
    assert (loaded.schedule, loaded.n_virtual, loaded.cuts) == (plan.schedule, plan.n_virtual, plan.cuts)
    assert loaded.cost.step_time_s == pytest.approx(plan.cost.step_time_s)
    torch.testing.assert_close(loaded(*inputs), model(*inputs))


def test_interleaving_is_refused_where_it_cannot_run():
    model, inputs = _deep()
    with pytest.raises(ValueError, match="n_virtual=2 with schedule='gpipe'"):
        partitioner.partition(model, 2, inputs, strategy="pipeline", device="h100", n_virtual=2, schedule="gpipe")
    with pytest.raises(ValueError, match="training schedule"):
        partitioner.partition(model, 2, inputs, strategy="pipeline", device="h100", schedule=INTERLEAVED,
                              training=False)
    with pytest.raises(ValueError, match="groups of pp=2"):
        partitioner.partition(model, 2, inputs, strategy="pipeline", device="h100", schedule=INTERLEAVED,
                              n_microbatches=1)


def test_the_runner_refuses_a_schedule_the_plan_cannot_run_before_any_process_group():
    from runtime import Runner
    model, inputs = _deep()
    plan = partitioner.partition(model, 2, inputs, strategy="pipeline", device="h100", n_virtual=2, n_microbatches=2)
    with pytest.raises(ValueError, match="holds 2 per rank; use schedule=.interleaved-1f1b., or plan with schedule=.1f1b."):
        Runner(plan, schedule="1f1b")
    with pytest.raises(ValueError, match="not a multiple of 2"):
        Runner(plan, n_microbatches=3)


def test_a_cut_never_separates_a_collective_from_its_wait():
    """Under tensor parallelism the shard graphs issue all_reduce then wait_tensor: no stage may end between."""
    from partitioner.graph_split import ComputeOrder
    c = zoo.make("gpt2", n_embd=32, n_head=2, vocab=64, batch=4, seq=8)
    plan = partitioner.partition(c.model, 4, c.args, c.kwargs, mesh={"tp": 2, "pp": 2}, device="h100")
    order = ComputeOrder.of(plan.stages[0].shards[0].module)
    ok = order.crossing()[2]
    waits = [k for k, n in enumerate(order.nodes) if "wait_tensor" in str(n.target)]
    assert waits and not any(ok[k] for k in waits)
