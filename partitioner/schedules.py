"""Pipeline schedules as data: one list of actions per stage, which the runtime interprets.

Reads nothing; writes nothing. An ``Action`` is ``(stage, kind, microbatch)`` with the
compact text form ``"F2"`` / ``"B0"``. ``simulate`` lays a schedule out in time on one
CPU (no processes) and ``to_chrome_trace`` exports that timeline for ``chrome://tracing``
or Perfetto.

>>> sched = one_f_one_b(2, 4)
>>> format_schedule(sched)
['F0 F1 B0 F2 B1 F3 B2 B3', 'F0 B0 F1 B1 F2 B2 F3 B3']
>>> round(simulate(sched).bubble_fraction[0], 3)
0.2
"""
from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["Action", "Span", "Timeline", "gpipe", "one_f_one_b", "SCHEDULES", "make_schedule", "format_schedule",
           "parse_schedule", "simulate", "peak_in_flight", "to_chrome_trace"]

KINDS = ("F", "B")


@dataclass(frozen=True)
class Action:
    """One unit of work: forward (``"F"``) or backward (``"B"``) of one micro-batch on one stage."""
    stage: int
    kind: str
    microbatch: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"action kind must be one of {KINDS}, got {self.kind!r}")
        if self.stage < 0 or self.microbatch < 0:
            raise ValueError(f"stage and microbatch must be >= 0, got {self.stage}, {self.microbatch}")

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"


def _check(n_stages: int, n_microbatches: int) -> None:
    for name, v in (("n_stages", n_stages), ("n_microbatches", n_microbatches)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def gpipe(n_stages: int, n_microbatches: int) -> list[list[Action]]:
    """GPipe: every stage runs all forwards, then all backwards (keeps all micro-batches in flight)."""
    _check(n_stages, n_microbatches)
    return [[Action(s, "F", m) for m in range(n_microbatches)] + [Action(s, "B", m) for m in range(n_microbatches)]
            for s in range(n_stages)]


def one_f_one_b(n_stages: int, n_microbatches: int) -> list[list[Action]]:
    """1F1B: ``n_stages - 1 - s`` warm-up forwards, then alternate forward and backward, then drain.

    Stage ``s`` keeps at most ``min(n_stages - s, n_microbatches)`` micro-batches in flight.
    """
    _check(n_stages, n_microbatches)
    schedule = []
    for s in range(n_stages):
        warmup = min(n_stages - 1 - s, n_microbatches)
        actions = [Action(s, "F", m) for m in range(warmup)]
        for m in range(n_microbatches - warmup):
            actions += [Action(s, "F", warmup + m), Action(s, "B", m)]
        actions += [Action(s, "B", m) for m in range(n_microbatches - warmup, n_microbatches)]
        schedule.append(actions)
    return schedule


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def make_schedule(name: str, n_stages: int, n_microbatches: int) -> list[list[Action]]:
    """The schedule called ``name`` (``"gpipe"`` or ``"1f1b"``)."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is not known; use one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](n_stages, n_microbatches)


def format_schedule(schedule: list[list[Action]]) -> list[str]:
    """One line of text per stage, e.g. ``"F0 F1 B0 B1"``."""
    return [" ".join(str(a) for a in actions) for actions in schedule]


def parse_schedule(lines: list[str]) -> list[list[Action]]:
    """Inverse of ``format_schedule``: line ``s`` holds stage ``s``'s actions."""
    schedule = []
    for s, line in enumerate(lines):
        actions = []
        for word in line.split():
            if word[:1] not in KINDS or not word[1:].isdigit():
                raise ValueError(f"cannot parse action {word!r} of stage {s}; write e.g. 'F2' or 'B0'")
            actions.append(Action(s, word[0], int(word[1:])))
        schedule.append(actions)
    return schedule


def peak_in_flight(actions: list[Action]) -> int:
    """Most micro-batches whose forward ran and backward did not yet, over one stage's actions."""
    live = peak = 0
    for a in actions:
        live += 1 if a.kind == "F" else -1
        peak = max(peak, live)
    return peak


@dataclass(frozen=True)
class Span:
    """When one action ran in a simulated timeline (seconds)."""
    action: Action
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Timeline:
    """A simulated run: spans per stage (in action order), total time and per-stage idle fraction."""
    spans: list[list[Span]]
    total_s: float
    bubble_fraction: list[float]
    peak_in_flight: list[int]

    def __str__(self) -> str:
        return "\n".join(f"stage {s}: busy until {spans[-1].end_s:g}s, bubble {b:.1%}, peak in flight {p}"
                         for s, (spans, b, p) in enumerate(zip(self.spans, self.bubble_fraction,
                                                               self.peak_in_flight)))


def simulate(schedule: list[list[Action]], forward_s: float = 1.0, backward_s: float = 2.0, *,
             send_s: float = 0.0) -> Timeline:
    """Lay out ``schedule`` in time: each stage runs its actions in order, each as soon as it may.

    ``F m`` on stage s waits for ``F m`` on s-1; ``B m`` on s waits for ``B m`` on s+1 and ``F m``
    on s. ``forward_s`` / ``backward_s``: a number for every stage, or one per stage.
    ``send_s`` (a number, or one per stage): how long what a stage sends takes to reach its
    neighbour (its activations forward, its input gradients backward); 0 by default.

    Raises:
        ValueError: the schedule deadlocks (an action waits for one that never runs first).
    """
    n = len(schedule)
    fwd = _per_stage(forward_s, n, "forward_s")
    bwd = _per_stage(backward_s, n, "backward_s")
    send = _per_stage(send_s, n, "send_s")
    done: dict[tuple, float] = {}
    spans: list[list[Span]] = [[] for _ in range(n)]
    cursor, clock = [0] * n, [0.0] * n
    remaining = sum(len(a) for a in schedule)
    while remaining:
        progressed = False
        for s, actions in enumerate(schedule):
            while cursor[s] < len(actions):
                a = actions[cursor[s]]
                deps = _dependencies(a, n)
                if any(d not in done for d in deps):
                    break
                start = max([clock[s]] + [done[d] + (send[d[0]] if d[0] != s else 0.0) for d in deps])
                end = start + (fwd[s] if a.kind == "F" else bwd[s])
                done[(s, a.kind, a.microbatch)] = end
                spans[s].append(Span(a, start, end))
                clock[s], cursor[s], remaining, progressed = end, cursor[s] + 1, remaining - 1, True
        if not progressed:
            stuck = {s: str(schedule[s][cursor[s]]) for s in range(n) if cursor[s] < len(schedule[s])}
            raise ValueError(f"schedule deadlocks: stages wait at {stuck}")
    total = max((c for c in clock), default=0.0)
    busy = [sum(sp.end_s - sp.start_s for sp in stage_spans) for stage_spans in spans]
    bubbles = [1.0 - b / total if total else 0.0 for b in busy]
    return Timeline(spans, total, bubbles, [peak_in_flight(a) for a in schedule])


def _per_stage(value, n: int, name: str) -> list[float]:
    values = list(value) if isinstance(value, (list, tuple)) else [float(value)] * n
    if len(values) != n:
        raise ValueError(f"{name} needs one time per stage ({n}), got {len(values)}")
    return values


def _dependencies(a: Action, n_stages: int) -> list[tuple]:
    s, m = a.stage, a.microbatch
    if a.kind == "F":
        return [(s - 1, "F", m)] if s > 0 else []
    deps = [(s, "F", m)]
    if s < n_stages - 1:
        deps.append((s + 1, "B", m))
    return deps


def to_chrome_trace(timeline: Timeline, *, time_unit_us: float = 1e6) -> str:
    """Chrome-trace JSON (a list of complete ``"X"`` events): one row (pid/tid) per stage.

    Times are scaled by ``time_unit_us`` (seconds to microseconds by default).
    """
    events = []
    for s, stage_spans in enumerate(timeline.spans):
        for sp in stage_spans:
            events.append({"name": str(sp.action), "cat": "forward" if sp.action.kind == "F" else "backward",
                           "ph": "X", "pid": s, "tid": s, "ts": sp.start_s * time_unit_us,
                           "dur": (sp.end_s - sp.start_s) * time_unit_us,
                           "args": {"stage": s, "microbatch": sp.action.microbatch}})
    return json.dumps(events)
