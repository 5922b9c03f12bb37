"""Memory measured while the runtime trains: peak bytes of a step, and micro-batches holding activations.

Reads the live tensors of one rank (CUDA: the allocator's peak; CPU: every tensor storage the
step's ops allocate, followed until freed, by a dispatch mode); writes nothing.
``LiveActivations`` counts the micro-batches whose saved-for-backward tensors are alive (what a
schedule keeps in flight).
"""
from __future__ import annotations

import torch

from passes._util import tensors_of

__all__ = ["LiveActivations", "NoPeak", "CudaPeak", "StoragePeak", "peak_tracker"]


def peak_tracker(device: torch.device, module, optimizer, *, track: bool):
    """The tracker of one step's peak for this rank: CUDA's allocator, a storage count on CPU, or none."""
    if device.type == "cuda":
        return CudaPeak(device)
    if track:
        return StoragePeak(module, optimizer)
    return NoPeak()


class LiveActivations:
    """Counts micro-batches whose saved-for-backward tensors are still alive (autograd saved_tensors_hooks)."""

    def __init__(self):
        self._live: dict[int, int] = {}

    def recording(self, mb: int):
        def pack(t):
            self._live[mb] = self._live.get(mb, 0) + 1
            return _Saved(t, self, mb)
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor)

    def release(self, mb: int) -> None:
        self._live[mb] -= 1

    def count(self) -> int:
        return sum(1 for n in self._live.values() if n > 0)


class _Saved:
    """A saved tensor; when autograd frees it (after the backward), its micro-batch holds one fewer."""
    __slots__ = ("tensor", "_owner", "_mb")

    def __init__(self, tensor, owner, mb):
        self.tensor, self._owner, self._mb = tensor, owner, mb

    def __del__(self):
        self._owner.release(self._mb)


class NoPeak:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def peak_bytes(self):
        return None


class CudaPeak(NoPeak):
    def __init__(self, device):
        self.device = device

    def __enter__(self):
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def peak_bytes(self):
        return int(torch.cuda.max_memory_allocated(self.device))


class StoragePeak(NoPeak):
    """Peak bytes of live tensor storages over one step on the CPU: the parameters, gradients and
    optimizer state present at the start, plus every storage an op allocates inside (a
    ``TorchDispatchMode`` sees each op's outputs; a storage counts until it is freed).

    ``MemTracker`` refuses a module called several times per step (one call per micro-batch),
    so the runtime counts storages itself, as ``MemTracker`` does underneath.
    """

    def __init__(self, module, optimizer):
        from torch.multiprocessing.reductions import StorageWeakRef
        self._ref = StorageWeakRef
        self._live: dict[int, tuple] = {}
        held = list(module.parameters()) + list(module.buffers())
        held += [p.grad for p in module.parameters() if p.grad is not None]
        if optimizer is not None:
            held += [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        for t in held:
            self._add(_local(t))
        self._current = self._peak = sum(n for _, n in self._live.values())
        self._mode = None

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._live:
            self._live[key] = (self._ref(storage), storage.nbytes())

    def _observe(self, out) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            del self._live[key]
        for t in tensors_of(out):
            if t.device.type != "meta":
                self._add(t)
        self._current = sum(n for _, n in self._live.values())
        self._peak = max(self._peak, self._current)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._observe(out)
                return out
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def peak_bytes(self):
        return int(self._peak)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A data-parallel sharded parameter (a DTensor) counts its local shard."""
    return t.to_local() if hasattr(t, "to_local") else t
