"""Time of the collectives a plan issues: ring formulas on the link they cross.

Reads a ``DeviceSpec`` (intra-node link bandwidth and latency, inter-node bandwidth); writes
nothing. A group of ``n`` ranks moves, per device, ``2 (n - 1) / n`` of the tensor for a ring
all-reduce and ``(n - 1) / n`` for an all-gather or a reduce-scatter, in ``2 (n - 1)`` or
``n - 1`` steps that each pay the link's latency. A group that spans nodes runs at the
inter-node bandwidth (the slowest link of the ring).
"""
from __future__ import annotations

__all__ = ["link_of", "all_reduce_s", "all_gather_s", "reduce_scatter_s", "send_s"]


def link_of(spec, group_size: int, *, stride: int = 1, devices_per_node: int = 8) -> tuple[float, float]:
    """(bytes/s, latency s) of the slowest link a group of ``group_size`` ranks ``stride`` apart crosses."""
    spans_nodes = group_size * stride > devices_per_node
    if spans_nodes:
        return spec.inter_node_bandwidth_Bps, spec.inter_node_latency_s
    return spec.link_bandwidth_Bps, spec.link_latency_s


def all_reduce_s(nbytes: float, n: int, link: tuple[float, float]) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` ranks."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    bandwidth, latency = link
    return 2 * (n - 1) / n * nbytes / bandwidth + 2 * (n - 1) * latency


def all_gather_s(nbytes: float, n: int, link: tuple[float, float]) -> float:
    """Ring all-gather producing ``nbytes`` (the whole tensor) on each of ``n`` ranks."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    bandwidth, latency = link
    return (n - 1) / n * nbytes / bandwidth + (n - 1) * latency


reduce_scatter_s = all_gather_s     # the same bytes and steps, the other way round


def send_s(nbytes: float, link: tuple[float, float]) -> float:
    """One point-to-point transfer."""
    if nbytes <= 0:
        return 0.0
    bandwidth, latency = link
    return nbytes / bandwidth + latency
