"""Run a script as several ranks on this machine, as ``torchrun --standalone`` would, and wait for them.

Reads nothing; starts processes. For tests, benchmarks and notebooks: every rank gets
``MASTER_ADDR`` (loopback), a free ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``, so ``Runner`` initialises the process group from the environment.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

__all__ = ["launch_local", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(argv: list[str], world_size: int, *, timeout_s: float,
                 env: dict | None = None) -> tuple[list[int | None], list[str]]:
    """Run ``python *argv`` as ``world_size`` ranks; returns their exit codes and combined output.

    One thread per rank (``OMP_NUM_THREADS=1``) unless ``env`` says otherwise.

    Raises:
        TimeoutError: ranks still running after ``timeout_s`` seconds (all ranks together);
            every rank is killed first and the message ends with their output.

    Example:
        >>> codes, logs = launch_local(["train.py"], 2, timeout_s=120)   # doctest: +SKIP
    """
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world_size),
                OMP_NUM_THREADS="1")
    base.update(env or {})
    procs = [subprocess.Popen([sys.executable, *argv], env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world_size)]
    start, logs = time.monotonic(), []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, timeout_s - (time.monotonic() - start)))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        hung = [r for r, p in enumerate(procs) if p.wait() < 0]
        tails = "\n".join(f"--- rank {r}:\n{(p.communicate()[0] or '')[-2000:]}" for r, p in enumerate(procs))
        raise TimeoutError(f"ranks {hung} of {argv} still ran after {timeout_s:.0f} s and were killed\n{tails}") \
            from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.wait() for p in procs], logs


def run_local(argv: list[str], world_size: int, *, timeout_s: float, env: dict | None = None) -> list[str]:
    """``launch_local`` where every rank must succeed: returns their output, or raises naming the first that failed.

    Raises:
        RuntimeError: a rank exited non-zero (the message ends with the last 4,000 characters of its output).
        TimeoutError: as ``launch_local``.
    """
    codes, logs = launch_local(argv, world_size, timeout_s=timeout_s, env=env)
    for r, (code, log) in enumerate(zip(codes, logs)):
        if code != 0:
            command = " ".join(map(str, argv))
            raise RuntimeError(f"rank {r} of {world_size} ({command}) exited with {code}:\n{log[-4000:]}")
    return logs
