"""The step laid out when ranks share compute units: processor sharing over the pipeline schedule.

Reads per-stage tasks (compute, then a wait that takes no compute); writes nothing. On a CPU
host running more ranks than it has cores, the OS time-slices the cores among the ranks that
compute, and a rank blocked in a receive or a collective sleeps. So while ``k`` stages compute
and the node's units can run ``capacity`` stages at full speed, each computes at ``min(1,
capacity / k)`` of its speed: a pipeline's bubbles speed up the stages still working, and
ranks that all compute at once (data or tensor parallelism) each run at ``capacity / k``. With
``capacity`` at least the number of stages, this is ``schedules.simulate``'s layout.

>>> both = [[Task("F0", 1.0)], [Task("F0", 1.0)]]          # two stages at once on one unit: half speed
>>> layout(both, capacity=1.0)[1]["F0"]
(0.0, 2.0)
>>> chain = [[Task("F0", 1.0)], [Task("F0", 1.0, after=((0, "F0"),))]]     # one after the other: full speed
>>> layout(chain, capacity=1.0)[1]["F0"]
(1.0, 2.0)
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Task", "layout"]


@dataclass(frozen=True)
class Task:
    """One stage's unit of work: ``compute_s`` at full speed, then ``wait_s`` blocked (no compute).

    ``after``: ``(stage, key)`` of tasks it waits for besides its stage's previous one; a task on
    another stage arrives ``send_s[stage]`` after it ends.
    """
    key: object
    compute_s: float
    wait_s: float = 0.0
    after: tuple = ()


def layout(tasks: list[list[Task]], *, capacity: float, send_s: list[float] | None = None) -> list[dict]:
    """When each task runs: per stage, ``{key: (start_s, end_s)}``; each stage runs its tasks in order.

    Raises:
        ValueError: a task waits for one that never ends first (the schedule deadlocks).
    """
    n = len(tasks)
    send = send_s or [0.0] * n
    spans: list[dict] = [{} for _ in range(n)]
    done: dict = {}
    cursor, phase, left, started = [0] * n, [None] * n, [0.0] * n, [0.0] * n
    now, remaining = 0.0, sum(len(t) for t in tasks)
    while remaining:
        remaining -= _settle(tasks, send, done, spans, cursor, phase, left, started, now)
        if not remaining:
            break
        computing = [s for s in range(n) if phase[s] == "compute"]
        rate = min(1.0, capacity / len(computing)) if computing else 1.0
        events = [now + left[s] / rate for s in computing] + [left[s] for s in range(n) if phase[s] == "wait"]
        events += [t for s in range(n) if phase[s] is None and cursor[s] < len(tasks[s])
                   for t in [_ready(tasks[s][cursor[s]], s, done, send)] if t is not None and t > now]
        if not events:
            stuck = {s: str(tasks[s][cursor[s]].key) for s in range(n) if cursor[s] < len(tasks[s])}
            raise ValueError(f"schedule deadlocks: stages wait at {stuck}")
        nxt = min(events)
        for s in computing:
            left[s] -= (nxt - now) * rate
        now = nxt
    return spans


def _settle(tasks, send, done, spans, cursor, phase, left, started, now: float) -> int:
    """Start what is ready at ``now`` and end what has ended, until nothing changes; returns tasks ended."""
    tol = 1e-12 * max(1.0, now)
    ended, changed = 0, True
    while changed:
        changed = False
        for s, stage in enumerate(tasks):
            if phase[s] is None and cursor[s] < len(stage):
                ready = _ready(stage[cursor[s]], s, done, send)
                if ready is not None and ready <= now + tol:
                    phase[s], left[s], started[s] = "compute", stage[cursor[s]].compute_s, now
            if phase[s] == "compute" and left[s] <= tol:
                phase[s], left[s] = "wait", now + stage[cursor[s]].wait_s
            if phase[s] == "wait" and left[s] <= now + tol:
                key = stage[cursor[s]].key
                done[(s, key)] = now
                spans[s][key] = (started[s], now)
                cursor[s], phase[s] = cursor[s] + 1, None
                ended, changed = ended + 1, True
    return ended


def _ready(task: Task, stage: int, done: dict, send: list[float]) -> float | None:
    """When ``task``'s inputs have arrived, or None while one of them has not ended."""
    times = [0.0]
    for dep in task.after:
        if dep not in done:
            return None
        times.append(done[dep] + (send[dep[0]] if dep[0] != stage else 0.0))
    return max(times)
