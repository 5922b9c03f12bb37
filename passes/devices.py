"""Device specifications for the time and memory model.

Reads nothing from graphs. ``DeviceSpec`` holds what a roofline needs: peak FLOP/s per
dtype, memory bandwidth, memory size and link bandwidth, each with its source.
GPU figures are the vendors' datasheet numbers for dense math (no sparsity); the
``"cpu"`` entry is measured on the machine that asks for it.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace

import torch

__all__ = ["DeviceSpec", "get_device_spec", "DEVICES"]


@dataclass(frozen=True)
class DeviceSpec:
    """What one accelerator can do, in SI units.

    Attributes:
        name: short name ("h100").
        peak_flops: dense FLOP/s by dtype for matmul-class ops.
        memory_bandwidth_Bps: main memory bandwidth, bytes/s.
        memory_bytes: memory capacity, bytes.
        link_bandwidth_Bps: bandwidth to a peer device in the same node, one direction, bytes/s.
        launch_s: fixed cost per kernel (launch and dispatch), seconds.
        link_latency_s: latency of one transfer to a peer in the node.
        inter_node_bandwidth_Bps: bandwidth per device to another node (0: the same as the link).
        inter_node_latency_s: latency of one transfer to another node.
        matmul_efficiency: the share of ``peak_flops`` large matmuls reach (datasheet peaks are not
            reached: large bf16 GEMMs on an H100 run at about 70-80% of them).
        attention_efficiency: the share fused attention kernels reach.
        memory_efficiency: the share of ``memory_bandwidth_Bps`` memory-bound kernels reach.
        foreach_optimizer: whether PyTorch's optimizers default to multi-tensor kernels here.
        source: where the figures come from.
    """
    name: str
    peak_flops: dict = field(default_factory=dict)
    memory_bandwidth_Bps: float = 0.0
    memory_bytes: int = 0
    link_bandwidth_Bps: float = 0.0
    launch_s: float = 5e-6
    foreach_optimizer: bool = True
    source: str = ""
    link_latency_s: float = 5e-6
    inter_node_bandwidth_Bps: float = 0.0
    inter_node_latency_s: float = 10e-6
    matmul_efficiency: float = 1.0
    attention_efficiency: float = 1.0
    memory_efficiency: float = 1.0

    def __post_init__(self):
        # `not x > 0` rather than `x <= 0`: NaN must fail too
        if not self.peak_flops or not all(v > 0 for v in self.peak_flops.values()):
            raise ValueError(f"DeviceSpec {self.name!r}: peak_flops needs a positive FLOP/s per dtype, "
                             f"got {self.peak_flops}")
        if not (self.memory_bandwidth_Bps > 0 and self.link_bandwidth_Bps > 0):
            raise ValueError(f"DeviceSpec {self.name!r}: memory_bandwidth_Bps and link_bandwidth_Bps must "
                             f"be positive, got {self.memory_bandwidth_Bps} and {self.link_bandwidth_Bps}")
        if not all(0 < e <= 1 for e in (self.matmul_efficiency, self.attention_efficiency, self.memory_efficiency)):
            raise ValueError(f"DeviceSpec {self.name!r}: efficiencies are shares of the peak, in (0, 1]")
        if self.inter_node_bandwidth_Bps == 0:
            object.__setattr__(self, "inter_node_bandwidth_Bps", self.link_bandwidth_Bps)
        if not (self.memory_bytes >= 0 and self.launch_s >= 0):
            raise ValueError(f"DeviceSpec {self.name!r}: memory_bytes and launch_s must be >= 0 (0: unknown "
                             f"memory, no launch cost), got {self.memory_bytes} and {self.launch_s}")

    def __hash__(self) -> int:
        # the generated hash would fail on the peak_flops dict; a frozen spec should work as a key
        return hash((self.name, tuple(sorted((str(k), v) for k, v in self.peak_flops.items())),
                     self.memory_bandwidth_Bps, self.memory_bytes, self.link_bandwidth_Bps, self.launch_s,
                     self.inter_node_bandwidth_Bps, self.matmul_efficiency, self.attention_efficiency,
                     self.memory_efficiency))

    def flops_per_s(self, dtype: torch.dtype) -> float:
        """Peak FLOP/s for matmuls in ``dtype`` (float32 when the dtype is not listed)."""
        return self.peak_flops.get(dtype, self.peak_flops.get(torch.float32, min(self.peak_flops.values())))

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["peak_flops"] = {str(k).removeprefix("torch."): v for k, v in self.peak_flops.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceSpec":
        d = dict(d)
        d["peak_flops"] = {getattr(torch, k): v for k, v in d["peak_flops"].items()}
        return cls(**d)


_GB = 1e9
# NVIDIA H100 SXM5 datasheet: FP32 67 TFLOPS (PyTorch does not use TF32 for fp32 matmuls by
# default), BF16/FP16 tensor 989 TFLOPS dense (1,979 with sparsity), FP8 1,979 dense,
# HBM3 3.35 TB/s, 80 GB, NVLink 4 900 GB/s in both directions together (450 GB/s each way).
# Between nodes: one 400 Gb/s InfiniBand NDR adapter per GPU (DGX H100), 50 GB/s each way.
# Achieved, not peak: large bf16 GEMMs reach about 70-80% of the dense peak (75% used), fused
# attention about 55% (FlashAttention-2 forward+backward on H100), memory-bound kernels about 80%
# of HBM bandwidth; the same shares are used for the other NVIDIA parts.
_ACHIEVED = dict(matmul_efficiency=0.75, attention_efficiency=0.55, memory_efficiency=0.8)
_H100 = DeviceSpec(
    "h100", {torch.float32: 67e12, torch.bfloat16: 989e12, torch.float16: 989e12, torch.float8_e4m3fn: 1979e12},
    memory_bandwidth_Bps=3.35e12, memory_bytes=80 * _GB, link_bandwidth_Bps=450 * _GB,
    inter_node_bandwidth_Bps=50 * _GB, **_ACHIEVED,
    source="NVIDIA H100 Tensor Core GPU datasheet (SXM5), dense figures; DGX H100: 400 Gb/s NDR per GPU")
# NVIDIA H200 SXM datasheet: same compute as H100 SXM, HBM3e 141 GB at 4.8 TB/s, NVLink 900 GB/s.
_H200 = replace(_H100, name="h200", memory_bandwidth_Bps=4.8e12, memory_bytes=141 * _GB,
                source="NVIDIA H200 Tensor Core GPU datasheet (SXM), dense figures")
# NVIDIA A100 SXM 80GB datasheet: FP32 19.5 TFLOPS, BF16/FP16 tensor 312 TFLOPS dense,
# HBM2e 2,039 GB/s, 80 GB, NVLink 3 600 GB/s in both directions together. Between nodes:
# one 200 Gb/s HDR InfiniBand adapter per GPU (DGX A100), 25 GB/s each way.
_A100 = DeviceSpec(
    "a100", {torch.float32: 19.5e12, torch.bfloat16: 312e12, torch.float16: 312e12},
    memory_bandwidth_Bps=2.039e12, memory_bytes=80 * _GB, link_bandwidth_Bps=300 * _GB,
    inter_node_bandwidth_Bps=25 * _GB, **_ACHIEVED,
    source="NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB), dense figures; DGX A100: 200 Gb/s HDR per GPU")

DEVICES: dict[str, DeviceSpec] = {"h100": _H100, "h200": _H200, "a100": _A100}


def get_device_spec(device: "str | DeviceSpec | torch.device | None" = None) -> DeviceSpec:
    """The ``DeviceSpec`` for a name ("h100", "cpu", ...), a torch device, or None (this machine).

    Raises:
        ValueError: an unknown name; the message lists the known ones.
    """
    if isinstance(device, DeviceSpec):
        return device
    if device is None:
        device = _current_device_name()
    name = str(device).lower().split(":")[0]
    if name == "cpu":
        return measure_cpu()
    if name == "cuda":
        name = _cuda_name()
    key = name.replace("nvidia", "").replace(" ", "").replace("-", "")
    for known, spec in DEVICES.items():
        if key.startswith(known):
            return spec
    raise ValueError(f"unknown device {device!r}; known: {sorted(DEVICES) + ['cpu']}, or pass a DeviceSpec(...) "
                     f"with your hardware's figures")


def _current_device_name() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cuda_name() -> str:
    name = torch.cuda.get_device_name().lower()
    for known in DEVICES:
        if known in name:
            return known
    raise ValueError(f"no DeviceSpec for the GPU {torch.cuda.get_device_name()!r}; pass device=DeviceSpec(...) "
                     f"with its peak FLOP/s and memory bandwidth")


@functools.lru_cache(maxsize=1)
def measure_cpu() -> DeviceSpec:
    """This CPU's matmul FLOP/s (fp32, bf16) and copy bandwidth, measured once per process (~0.3 s)."""
    fp32 = _matmul_flops(torch.float32)
    bf16 = _matmul_flops(torch.bfloat16)
    src = torch.empty(16 * 2**20, dtype=torch.float32)   # 64 MiB: well past the caches
    dst = torch.empty_like(src)
    seconds = _best_time(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() * src.element_size() / seconds  # read + write
    try:
        import os
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return DeviceSpec("cpu", {torch.float32: fp32, torch.bfloat16: bf16, torch.float16: bf16},
                      memory_bandwidth_Bps=bandwidth, memory_bytes=memory, link_bandwidth_Bps=bandwidth / 4,
                      launch_s=4e-6, foreach_optimizer=False,
                      source=f"measured on this machine ({torch.get_num_threads()} threads)")


def _matmul_flops(dtype: torch.dtype, n: int = 1024) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    return 2 * n ** 3 / _best_time(lambda: torch.mm(a, b))


def _best_time(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
