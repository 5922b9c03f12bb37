"""This machine's links between ranks, measured into a ``DeviceSpec``: the figures the step simulator stands on.

Reads a process group (gloo or NCCL; every rank of the group calls together); writes nothing.

* ``measure_link``: point-to-point time by ping-pong between the group's first two ranks, and
  ring all-reduces over the whole group, each at a few sizes, fitted to ``latency + bytes /
  bandwidth`` (the all-reduce to ``partitioner.comm``'s ring formula, so its figures are what a
  ring achieves per device: the bus bandwidth of nccl-tests);
* ``measure_contention``: how much a rank's compute slows when every rank of the group
  computes at once (ranks sharing CPU cores), as the number of compute units they share;
* ``measure_action_overhead``: what the runtime spends per schedule action besides its kernels and
  messages (Python, receive buffers, autograd's bookkeeping), from a pipeline of a tiny model;
* ``measured_spec``: the compute figures of ``partitioner.partition.agreed_device_spec`` (rank 0
  measures, every rank gets the same) with the measured links and shared compute units.

Every rank returns the same figures: times are the slowest rank's, or rank 0's, shared.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["fit_link", "measure_link", "measure_contention", "measure_action_overhead", "measured_spec", "LINK_SIZES"]

LINK_SIZES = (2**10, 2**14, 2**18, 2**20, 2**22, 2**24)   # bytes: latency-bound to bandwidth-bound


def fit_link(nbytes, seconds, *, steps: float = 1.0, share: float = 1.0) -> tuple[float, float]:
    """(bytes/s, latency s) of ``seconds = steps * latency + share * nbytes / bandwidth``, least relative error.

    ``steps`` and ``share``: a ring all-reduce over ``n`` ranks takes ``2 (n - 1)`` steps and moves
    ``2 (n - 1) / n`` of the tensor per device; a point-to-point transfer 1 and 1.

    Raises:
        ValueError: fewer than two sizes, or times that do not grow with size.

    Example:
        >>> bw, lat = fit_link([1e3, 1e6, 1e7], [1e-5 + 1e-6, 1e-5 + 1e-3, 1e-5 + 1e-2])
        >>> round(bw / 1e9, 3), round(lat * 1e6, 3)
        (1.0, 10.0)
    """
    x = np.asarray(nbytes, dtype=np.float64) * share
    t = np.asarray(seconds, dtype=np.float64)
    if len(x) < 2 or len(set(x.tolist())) < 2:
        raise ValueError(f"fit_link needs times at two sizes or more, got sizes {list(nbytes)}")
    w = 1.0 / t                                           # relative error: small sizes weigh as much as large
    a = np.stack([np.ones_like(x), x], axis=1) * w[:, None]
    (intercept, slope), *_ = np.linalg.lstsq(a, t * w, rcond=None)
    if not slope > 0:
        raise ValueError(f"times {list(t)} s do not grow with the bytes {list(x)}: no bandwidth to fit "
                         f"(measure larger sizes, or repeat on a quieter machine)")
    return float(1.0 / slope), max(float(intercept), 0.0) / steps


def measure_link(group=None, *, sizes=LINK_SIZES, repeats: int = 7, device: torch.device | None = None) -> dict:
    """Point-to-point and all-reduce figures of ``group`` (every rank calls), fitted to bandwidth + latency.

    Returns:
        ``{"p2p_bandwidth_Bps", "p2p_latency_s", "collective_bandwidth_Bps", "collective_latency_s",
        "group_size", "samples"}``; ``samples`` holds the median seconds per size (``"p2p"``: one
        way, ``"all_reduce"``: the slowest rank's), the same on every rank.

    Raises:
        ValueError: a group of one rank (nothing to measure).

    Example (2 ranks, ``torchrun --nproc-per-node 2``):
        >>> link = measure_link()                          # doctest: +SKIP
        >>> link["p2p_bandwidth_Bps"] / 1e9     # GB/s, loopback gloo: a few   # doctest: +SKIP
    """
    n = dist.get_world_size(group)
    if n < 2:
        raise ValueError("measure_link needs a group of 2 ranks or more; a single rank has no link")
    device = device or _device_of(group)
    me = dist.get_rank(group)
    peer = None
    if me < 2:
        peer = 1 - me if group is None else dist.get_global_rank(group, 1 - me)
    p2p, ring = [], []
    for nbytes in sizes:        # untimed first: a fresh group sets up its connections and buffers on first use
        x = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
        _ping_pong(x, me, peer, group, device)
        _all_reduce(x, group, device)
    for nbytes in sizes:
        x = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
        p2p.append(_median([_ping_pong(x, me, peer, group, device) for _ in range(repeats)]))
        ring.append(_median([_all_reduce(x, group, device) for _ in range(repeats)]))
    summary = torch.tensor(p2p + ring, dtype=torch.float64, device=device)
    dist.broadcast(summary, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    p2p, ring = summary[:len(sizes)].tolist(), summary[len(sizes):].tolist()
    p2p_bw, p2p_lat = fit_link(sizes, p2p)
    ring_bw, ring_lat = fit_link(sizes, ring, steps=2 * (n - 1), share=2 * (n - 1) / n)
    return {"p2p_bandwidth_Bps": p2p_bw, "p2p_latency_s": p2p_lat, "collective_bandwidth_Bps": ring_bw,
            "collective_latency_s": ring_lat, "group_size": n,
            "samples": {"bytes": list(sizes), "p2p": p2p, "all_reduce": ring}}


def _ping_pong(x: torch.Tensor, me: int, peer: int | None, group, device) -> float:
    """One-way seconds of ``x`` between the group's first two ranks (the others wait); the slowest rank's clock."""
    dist.barrier(group=group)
    start = time.perf_counter()
    if me == 0:
        dist.send(x, peer, group=None)
        dist.recv(x, peer, group=None)
    elif me == 1:
        dist.recv(x, peer, group=None)
        dist.send(x, peer, group=None)
    _sync(device)
    return (time.perf_counter() - start) / 2


def _all_reduce(x: torch.Tensor, group, device) -> float:
    dist.barrier(group=group)
    _sync(device)
    start = time.perf_counter()
    dist.all_reduce(x, group=group)
    _sync(device)
    took = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
    dist.all_reduce(took, op=dist.ReduceOp.MAX, group=group)
    return float(took)


def measure_contention(group=None, *, work=None, repeats: int = 3, alone_s: float | None = None) -> dict:
    """How many compute units the ranks of ``group`` share: ``work`` alone against every rank running it at once.

    Rank 0 runs ``work()`` while the others wait, then every rank runs it at once; ``units = n *
    alone / together`` (at most ``n``): 2 for 4 ranks time-sliced on 2 idle cores, ``n`` when each
    rank has its own device. ``work`` defaults to a matmul loop of about 50 ms; pass the model's
    own step to measure what it contends for (memory bandwidth as well as cores). ``alone_s``: the
    time alone measured before (when the times the units scale were measured): only the ranks
    together are timed, so the units also carry how the machine's other load changed since. On
    CUDA every rank has its own GPU and nothing is measured.

    Returns:
        ``{"alone_s", "together_s", "units", "group_size"}`` (medians over ``repeats``), the same on every rank.
    """
    n = dist.get_world_size(group)
    if _device_of(group).type == "cuda":
        return {"alone_s": 0.0, "together_s": 0.0, "units": float(n), "group_size": n}
    work = work or _matmul_loop()
    alone, together = [], []
    for _ in range(repeats):
        dist.barrier(group=group)
        if dist.get_rank(group) == 0 and alone_s is None:
            alone.append(_timed(work))
        dist.barrier(group=group)
        took = torch.tensor([_timed(work)], dtype=torch.float64)
        dist.all_reduce(took, op=dist.ReduceOp.MAX, group=group)
        together.append(float(took))
    summary = torch.tensor([alone_s if alone_s is not None else _median(alone) if alone else 0.0,
                            _median(together)], dtype=torch.float64)
    dist.broadcast(summary, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    alone_s, together_s = summary.tolist()
    return {"alone_s": alone_s, "together_s": together_s, "units": min(float(n), n * alone_s / together_s),
            "group_size": n}


def _matmul_loop(work_s: float = 0.05):
    a = torch.randn(256, 256)
    reps = max(1, int(work_s / _best(lambda: torch.mm(a, a))))
    return lambda: [torch.mm(a, a) for _ in range(reps)]


def measure_action_overhead(spec, *, microbatches: tuple[int, int] = (2, 16), steps: int = 7) -> dict:
    """Seconds per schedule action outside its kernels and messages, for ``Runner`` on every rank of the world.

    A tiny MLP (nothing to compute) is pipelined over the world, one stage per rank, and trained with
    1F1B at two micro-batch counts; its step is then only actions and messages. The step simulator
    lays the same pipeline out on ``spec`` (its links and shared compute units, as measured) with
    each action costing ``o``; ``o`` is solved so that the difference of the two simulated steps
    equals the measured one (what a step pays once cancels). Every rank calls and gets the result.

    Returns:
        ``{"action_overhead_s", "step_s": {m: median seconds}}``.
    """
    import torch.nn.functional as F

    from partitioner import partition
    from partitioner.simulate_step import StageTiming, simulate_plan
    from passes import zoo
    from .runner import Runner

    n = dist.get_world_size()
    if n < 2:
        raise ValueError("measure_action_overhead pipelines over the world: it needs 2 ranks or more")
    width, batch = 8, 2 * max(microbatches)
    model, (x,) = zoo.mlp(depth=2 * n, width=width, batch=batch)
    plan = partition(model, n, (x,), strategy="pipeline", device="h100", schedule="1f1b",
                     n_microbatches=microbatches[0])
    step_s = {m: _median(_runner_steps(Runner(plan, n_microbatches=m, loss_fn=F.mse_loss,
                                              optimizer_fn=lambda ps: torch.optim.SGD(ps, lr=0.0)), x, steps))
              for m in microbatches}

    def simulated(o: float, m: int) -> float:
        sent = 4 * width * batch / m
        stage = StageTiming(forward_s=0.0, backward_s=0.0, send_bytes=sent, grad_bytes=sent, collective_s=0.0,
                            param_bytes=0.0)
        return simulate_plan([stage] * n, mesh={"dp": 1, "tp": 1, "pp": n}, schedule="1f1b", n_microbatches=m,
                             data_parallel="replicate", spec=dataclasses.replace(spec, action_overhead_s=o),
                             devices_per_node=n, training=True, optimizer=None).step_time_s

    few, many = microbatches
    measured = step_s[many] - step_s[few]
    low, high = 0.0, max(measured, 0.0)
    for _ in range(40):                     # the simulated difference grows with o
        mid = (low + high) / 2
        low, high = (mid, high) if simulated(mid, many) - simulated(mid, few) < measured else (low, mid)
    return {"action_overhead_s": low, "step_s": step_s}


def _runner_steps(runner, x: torch.Tensor, steps: int) -> list[float]:
    """Seconds of ``steps`` training steps after two to warm up, each the slowest rank's."""
    for _ in range(2):
        runner.step((x,), x)
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        runner.step((x,), x)
        took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        times.append(float(took))
    return times


def measured_spec(group=None, *, base=None, contention: bool = True, action_overhead: bool = True, **link_options):
    """A ``DeviceSpec`` of this machine as the ranks of ``group`` see it (every rank calls; same result on all).

    Compute figures from ``base`` (default: ``partitioner.partition.agreed_device_spec(None)``, this
    machine measured on rank 0), links from ``measure_link`` (point to point into
    ``link_bandwidth_Bps`` / ``link_latency_s``, all-reduce into ``collective_bandwidth_Bps`` /
    ``collective_latency_s``; the same between nodes: one machine), and on a CPU the compute units
    the ranks share (``measure_contention``) into ``node_compute_units`` and, over the whole world,
    the runtime's host time per action (``measure_action_overhead``) into ``action_overhead_s``.

    Example (``torchrun --nproc-per-node 4``):
        >>> spec = measured_spec()                                            # doctest: +SKIP
        >>> plan = partition(model, 4, inputs, mesh={"dp": 2, "pp": 2}, device=spec)   # doctest: +SKIP
    """
    if base is None:
        from partitioner.partition import agreed_device_spec
        base = agreed_device_spec(None)
    cpu = _device_of(group).type == "cpu"
    link = measure_link(group, **link_options)
    units = measure_contention(group)["units"] if contention and cpu else 0.0
    n = link["group_size"]
    spec = dataclasses.replace(
        base, link_bandwidth_Bps=link["p2p_bandwidth_Bps"], link_latency_s=link["p2p_latency_s"],
        inter_node_bandwidth_Bps=link["p2p_bandwidth_Bps"], inter_node_latency_s=link["p2p_latency_s"],
        collective_bandwidth_Bps=link["collective_bandwidth_Bps"], collective_latency_s=link["collective_latency_s"],
        node_compute_units=units,
        source=f"{base.source}; links measured with {dist.get_backend(group)} between {n} ranks"
               + (f", {units:.2f} compute units shared by them" if units else ""))
    if action_overhead and cpu and group is None:
        spec = dataclasses.replace(spec, action_overhead_s=measure_action_overhead(spec)["action_overhead_s"])
    return spec


def _device_of(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best(fn, repeats: int = 3) -> float:
    fn()
    return min(_timed(fn) for _ in range(repeats))


def _median(xs: list[float]) -> float:
    return float(np.median(xs))
