"""Pipeline schedules as data: one list of actions per stage, which the runtime interprets.

Reads nothing; writes nothing. A schedule is one list of actions per pipeline rank; an
``Action`` is ``(stage, kind, microbatch)`` with the compact text form ``"F2"`` / ``"B0"``
(``"3F2"`` when a rank holds several stages). With GPipe and 1F1B rank ``r`` holds stage ``r``;
interleaved 1F1B (Megatron-LM's, ``torch.distributed.pipelining.ScheduleInterleaved1F1B``)
cuts the model into ``v`` times as many stages and rank ``r`` holds stages ``r, r + p, ...``,
which divides the pipeline's fill and drain by ``v`` for ``v`` times the sends. ``simulate`` lays
a schedule out in time on one CPU (no processes) and ``to_chrome_trace`` exports that
timeline for ``chrome://tracing`` or Perfetto.

>>> sched = one_f_one_b(2, 4)
>>> format_schedule(sched)
['F0 F1 B0 F2 B1 F3 B2 B3', 'F0 B0 F1 B1 F2 B2 F3 B3']
>>> round(simulate(sched).bubble_fraction[0], 3)
0.2
"""
from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["Action", "Span", "Timeline", "gpipe", "one_f_one_b", "interleaved_1f1b", "SCHEDULES", "INTERLEAVED",
           "make_schedule", "format_schedule", "parse_schedule", "simulate", "peak_in_flight", "in_flight_by_stage",
           "to_chrome_trace"]

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


def interleaved_1f1b(n_ranks: int, n_microbatches: int, n_virtual: int = 2) -> list[list[Action]]:
    """Interleaved 1F1B (Megatron-LM): ``n_ranks * n_virtual`` stages, rank ``r`` holding ``r, r + p, ...``.

    Rank ``r`` runs ``(p - r - 1) * 2 + (v - 1) * p`` warm-up forwards, then alternates, then drains.
    Its ``k``-th forward is micro-batch ``(k // (p v)) p + k % p`` of its chunk ``(k // p) % v``; the
    ``k``-th backward walks the chunks the other way. ``n_microbatches`` must be a multiple of
    ``n_ranks`` (micro-batches go round in groups of ``p``).
    """
    _check(n_ranks, n_microbatches)
    _check(n_virtual, 1)
    p, v, m = n_ranks, n_virtual, n_microbatches
    if m % p:
        raise ValueError(f"interleaved 1F1B runs micro-batches in groups of the {p} pipeline ranks: n_microbatches="
                         f"{m} is not a multiple of {p}; use " + (f"{p * (m // p)} or " if m > p else "") + f"{p * (m // p + 1)}")
    total = m * v

    def action(rank: int, k: int, kind: str) -> Action:
        group, within = divmod(k, p * v)
        chunk = within // p if kind == "F" else v - 1 - within // p
        return Action(chunk * p + rank, kind, group * p + within % p)

    schedule = []
    for r in range(p):
        warmup = total if m == p else min((p - r - 1) * 2 + (v - 1) * p, total)
        actions = [action(r, k, "F") for k in range(warmup)]
        for k in range(total - warmup):
            actions += [action(r, warmup + k, "F"), action(r, k, "B")]
        actions += [action(r, k, "B") for k in range(total - warmup, total)]
        schedule.append(actions)
    return schedule


INTERLEAVED = "interleaved-1f1b"
SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, INTERLEAVED: interleaved_1f1b}


def make_schedule(name: str, n_ranks: int, n_microbatches: int, n_virtual: int = 1) -> list[list[Action]]:
    """The schedule called ``name`` (``"gpipe"``, ``"1f1b"`` or ``"interleaved-1f1b"``), one list per rank.

    ``n_virtual``: stages per rank (interleaved 1F1B needs at least 2; the others hold one).
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r} is not known; use one of {sorted(SCHEDULES)}")
    if name == INTERLEAVED:
        if n_virtual < 2:
            raise ValueError(f"schedule={INTERLEAVED!r} needs at least 2 stages per pipeline rank, got {n_virtual}: "
                             f"plan with schedule={INTERLEAVED!r} (the planner cuts p x v stages), or run '1f1b'")
        return interleaved_1f1b(n_ranks, n_microbatches, n_virtual)
    if n_virtual != 1:
        raise ValueError(f"schedule={name!r} runs one stage per pipeline rank, but the plan holds {n_virtual} per "
                         f"rank; use schedule={INTERLEAVED!r}, or plan with schedule={name!r} (or n_virtual=1)")
    return SCHEDULES[name](n_ranks, n_microbatches)


def format_schedule(schedule: list[list[Action]]) -> list[str]:
    """One line of text per rank, e.g. ``"F0 F1 B0 B1"`` (``"0F0 2F0 ..."`` when a rank holds several stages)."""
    return [" ".join(str(a) if a.stage == r else f"{a.stage}{a}" for a in actions)
            for r, actions in enumerate(schedule)]


def parse_schedule(lines: list[str]) -> list[list[Action]]:
    """Inverse of ``format_schedule``: line ``r`` holds rank ``r``'s actions (``"F2"``: its stage ``r``)."""
    schedule = []
    for r, line in enumerate(lines):
        actions = []
        for word in line.split():
            head = len(word) - len(word.lstrip("0123456789"))
            stage, rest = (int(word[:head]), word[head:]) if head else (r, word)
            if rest[:1] not in KINDS or not rest[1:].isdigit():
                raise ValueError(f"cannot parse action {word!r} of rank {r}; write e.g. 'F2', 'B0' or '3F2'")
            actions.append(Action(stage, rest[0], int(rest[1:])))
        schedule.append(actions)
    return schedule


def peak_in_flight(actions: list[Action]) -> int:
    """Most micro-batches whose forward ran and backward did not yet, over one stage's actions."""
    live = peak = 0
    for a in actions:
        live += 1 if a.kind == "F" else -1
        peak = max(peak, live)
    return peak


def in_flight_by_stage(actions: list[Action]) -> dict[int, int]:
    """Per stage of one rank's actions, the most micro-batches whose forward ran and backward did not yet."""
    live: dict[int, int] = {}
    peak: dict[int, int] = {}
    for a in actions:
        live[a.stage] = live.get(a.stage, 0) + (1 if a.kind == "F" else -1)
        peak[a.stage] = max(peak.get(a.stage, 0), live[a.stage])
    return peak


@dataclass(frozen=True)
class Span:
    """When one action ran in a simulated timeline (seconds)."""
    action: Action
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Timeline:
    """A simulated run: spans per rank (in action order), total time and per-rank idle fraction."""
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
    """Lay out ``schedule`` in time: each rank runs its actions in order, each as soon as it may.

    ``F m`` of stage s waits for ``F m`` of s-1; ``B m`` of s waits for ``B m`` of s+1 and ``F m``
    of s. ``forward_s`` / ``backward_s``: a number for every stage, or one per stage (``p v`` of
    them for an interleaved schedule). ``send_s`` (a number, or one per stage): how long what a
    stage sends takes to reach the rank holding its neighbour (its activations forward, its input
    gradients backward); 0 by default, and 0 between stages on one rank.

    Raises:
        ValueError: the schedule deadlocks (an action waits for one that never runs first).
    """
    n = len(schedule)
    n_stages = max((a.stage for actions in schedule for a in actions), default=n - 1) + 1
    fwd = _per_stage(forward_s, n_stages, "forward_s")
    bwd = _per_stage(backward_s, n_stages, "backward_s")
    send = _per_stage(send_s, n_stages, "send_s")
    rank_of = {a.stage: r for r, actions in enumerate(schedule) for a in actions}
    done: dict[tuple, float] = {}
    spans: list[list[Span]] = [[] for _ in range(n)]
    cursor, clock = [0] * n, [0.0] * n
    remaining = sum(len(a) for a in schedule)
    while remaining:
        progressed = False
        for r, actions in enumerate(schedule):
            while cursor[r] < len(actions):
                a = actions[cursor[r]]
                deps = _dependencies(a, n_stages)
                if any(d not in done for d in deps):
                    break
                start = max([clock[r]] + [done[d] + (send[d[0]] if rank_of.get(d[0], r) != r else 0.0)
                                          for d in deps])
                end = start + (fwd[a.stage] if a.kind == "F" else bwd[a.stage])
                done[(a.stage, a.kind, a.microbatch)] = end
                spans[r].append(Span(a, start, end))
                clock[r], cursor[r], remaining, progressed = end, cursor[r] + 1, remaining - 1, True
        if not progressed:
            stuck = {r: f"{schedule[r][cursor[r]].stage}{schedule[r][cursor[r]]}" for r in range(n)
                     if cursor[r] < len(schedule[r])}
            raise ValueError(f"schedule deadlocks: ranks wait at {stuck}")
    total = max((c for c in clock), default=0.0)
    busy = [sum(sp.end_s - sp.start_s for sp in rank_spans) for rank_spans in spans]
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
    """Chrome-trace JSON (a list of complete ``"X"`` events): one row (pid/tid) per rank.

    Times are scaled by ``time_unit_us`` (seconds to microseconds by default).
    """
    events = []
    for s, stage_spans in enumerate(timeline.spans):
        for sp in stage_spans:
            events.append({"name": str(sp.action) if sp.action.stage == s else f"{sp.action.stage}{sp.action}", "cat": "forward" if sp.action.kind == "F" else "backward",
                           "ph": "X", "pid": s, "tid": s, "ts": sp.start_s * time_unit_us,
                           "dur": (sp.end_s - sp.start_s) * time_unit_us,
                           "args": {"stage": sp.action.stage, "microbatch": sp.action.microbatch}})
    return json.dumps(events)
