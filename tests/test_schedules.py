"""Pipeline schedules as data: order, text form, simulated bubbles, in-flight bounds, trace export."""
import json

import pytest

from partitioner.schedules import (Action, format_schedule, gpipe, make_schedule, one_f_one_b, parse_schedule,
                               peak_in_flight, simulate, to_chrome_trace)

SIZES = [(1, 1), (2, 1), (2, 2), (2, 4), (3, 5), (4, 4), (4, 8), (5, 3)]


def test_gpipe_runs_all_forwards_then_all_backwards():
    assert format_schedule(gpipe(2, 3)) == ["F0 F1 F2 B0 B1 B2"] * 2


def test_one_f_one_b_warms_up_by_stage_then_alternates():
    assert format_schedule(one_f_one_b(3, 4)) == [
        "F0 F1 F2 B0 F3 B1 B2 B3",
        "F0 F1 B0 F2 B1 F3 B2 B3",
        "F0 B0 F1 B1 F2 B2 F3 B3",
    ]


def test_action_text_form_round_trips():
    assert str(Action(1, "F", 2)) == "F2" and str(Action(0, "B", 0)) == "B0"
    sched = one_f_one_b(4, 6)
    assert parse_schedule(format_schedule(sched)) == sched
    with pytest.raises(ValueError, match="X3"):
        parse_schedule(["F0 X3"])
    with pytest.raises(ValueError, match="kind"):
        Action(0, "W", 0)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", SIZES)
def test_every_microbatch_runs_forward_then_backward_once_per_stage(name, p, m):
    sched = make_schedule(name, p, m)
    assert len(sched) == p
    for s, actions in enumerate(sched):
        assert all(a.stage == s for a in actions)
        order = [(a.kind, a.microbatch) for a in actions]
        assert sorted(order) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        for i in range(m):
            assert order.index(("F", i)) < order.index(("B", i))


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", SIZES)
def test_bubble_fraction_is_p_minus_1_over_m_plus_p_minus_1(name, p, m):
    timeline = simulate(make_schedule(name, p, m), forward_s=1.0, backward_s=1.0)
    for bubble in timeline.bubble_fraction:
        assert bubble == pytest.approx((p - 1) / (m + p - 1))
    assert timeline.total_s == pytest.approx(2 * (m + p - 1))


def test_simulated_timeline_respects_dependencies():
    timeline = simulate(one_f_one_b(3, 4), forward_s=1.0, backward_s=2.0)
    end = {(sp.action.stage, sp.action.kind, sp.action.microbatch): sp for spans in timeline.spans for sp in spans}
    for (s, kind, m), sp in end.items():
        if kind == "F" and s > 0:
            assert sp.start_s >= end[(s - 1, "F", m)].end_s
        if kind == "B":
            assert sp.start_s >= end[(s, "F", m)].end_s
            if s < 2:
                assert sp.start_s >= end[(s + 1, "B", m)].end_s
    for spans in timeline.spans:   # a stage runs one action at a time, in order
        assert all(a.end_s <= b.start_s for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("p,m", SIZES)
def test_one_f_one_b_keeps_at_most_n_stages_minus_s_in_flight_gpipe_all(p, m):
    for s, actions in enumerate(one_f_one_b(p, m)):
        assert peak_in_flight(actions) == min(p - s, m)
    assert simulate(gpipe(p, m)).peak_in_flight == [m] * p


def test_simulate_reports_a_deadlocking_schedule():
    bad = parse_schedule(["F0 B0", "B0 F0"])
    with pytest.raises(ValueError, match="deadlock"):
        simulate(bad)


def test_chrome_trace_loads_as_complete_events_per_stage():
    timeline = simulate(gpipe(2, 2), forward_s=1.0, backward_s=2.0)
    events = json.loads(to_chrome_trace(timeline))
    assert len(events) == 8 and all(e["ph"] == "X" for e in events)
    assert {(e["pid"], e["tid"]) for e in events} == {(0, 0), (1, 1)}
    b0 = next(e for e in events if e["pid"] == 1 and e["name"] == "B0")
    assert b0["dur"] == pytest.approx(2e6)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="n_microbatches"):
        one_f_one_b(2, 0)
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("zigzag", 2, 2)
