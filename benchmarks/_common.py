"""Helpers shared by the benchmarks: statistics, peak memory and markdown tables.

Reads nothing; ``write_result`` writes ``benchmarks/results/<name>``. Importing this
module puts the repository root first on ``sys.path``, so the benchmarks run from a bare
checkout (a GPU machine without ``pip install -e .``) as well as from the venv, and the
packages win over the benchmark scripts named like them (``benchmarks/runtime.py``).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
if sys.path[:1] != [str(REPO)]:
    sys.path.insert(0, str(REPO))

__all__ = ["REPO", "RESULTS", "median", "peak_rss_bytes", "spearman", "md_table", "write_result"]


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _ranks(xs: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their average rank (as scipy.stats.rankdata)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks (ties averaged)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"spearman needs two sequences of equal length >= 2, got {len(xs)} and {len(ys)}")
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    rows = [[str(c) for c in row] for row in rows]
    numeric = [all(_is_number(r[i]) for r in rows) if rows else False for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _is_number(s: str) -> bool:
    try:
        float(s.rstrip("%x").replace(",", ""))
    except ValueError:
        return False
    return True


def write_result(name: str, text: str) -> Path:
    """Write ``benchmarks/results/<name>`` and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path


def run_ranks(script: str, argv: list[str], world: int, out_path: str, *, timeout_s: float) -> list[str]:
    """Run ``script argv --rank-out out_path`` on ``world`` local ranks (gloo, ``runtime.launch``); returns every
    rank's log, or raises with the log of the first rank that failed."""
    from runtime.launch import run_local
    return run_local([script, *argv, "--rank-out", out_path], world, timeout_s=timeout_s)


def gather_ranks(script: str, argv: list[str], world: int, *, timeout_s: float, echo: bool = False) -> Any:
    """``run_ranks`` into a temporary file and return the JSON rank 0 wrote there (``echo``: print rank 0's log)."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "ranks.json")
        logs = run_ranks(script, argv, world, out_path, timeout_s=timeout_s)
        if echo:
            print(logs[0], end="")
        with open(out_path) as f:
            return json.load(f)


def rank_argv(args, names: Sequence[str]) -> list[str]:
    """``--name=value`` for each named option of ``args`` (argparse's), to hand the ranks what the parent was given."""
    return [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in names]
