"""Bytes of tensor memory a computation allocates: its peak and what is still alive at the end.

`MemoryMeter(device)` is a context manager. On CUDA it reads the caching allocator's statistics
(`max_memory_allocated` above the allocation at entry). On CPU, where PyTorch keeps no statistics, it is a
dispatch mode that sees every operator's outputs, including those of backward and double-backward passes:
a new storage (of an operator output that is not a view or an in-place result) is counted when it appears
and uncounted when it is freed (a weak-reference callback). Both count only memory allocated inside the block, so the model, the batches and the vectors
that existed before are not included; `live` at exit is what the block left alive (a kept graph, outputs).
Cost on CPU: a Python call per operator, about 12 % of a product at the bench shape (BENCHMARKS.md).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


_ALIASING: dict = {}  # operator -> whether an output aliases an input (a view or an in-place result)


class _StorageCounter(TorchDispatchMode):
    """Counts storages created by operators while active (CPU tensors only)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # nothing is compiled in here; the default wrapper imports torch._dynamo (seconds) on first use

    def __init__(self):
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.refs: dict[int, weakref.ref] = {}
        self.live = 0
        self.peak = 0

    def _freed(self, key: int):
        def callback(_):
            self.live -= self.sizes.pop(key, 0)
            self.refs.pop(key, None)

        return callback

    def _count(self, t: torch.Tensor):
        if t.device.type != "cpu" or t.layout != torch.strided or t._is_zerotensor():
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if not key or key in self.sizes:
            return
        self.sizes[key] = storage.nbytes()
        self.live += self.sizes[key]
        self.peak = max(self.peak, self.live)
        self.refs[key] = weakref.ref(storage, self._freed(key))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliasing = _ALIASING.get(func)
        if aliasing is None:
            aliasing = _ALIASING[func] = any(r.alias_info is not None for r in func._schema.returns)
        if aliasing:
            return out
        for t in (out,) if isinstance(out, torch.Tensor) else out if isinstance(out, (tuple, list)) else ():
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out


class MemoryMeter:
    """`with MemoryMeter(device) as m: ...`, then `m.peak` and `m.live` in bytes (see the module docstring)."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.peak = 0
        self.live = 0
        self._counter = None
        self._base = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._counter = _StorageCounter()
            self._counter.__enter__()
        return self

    def __exit__(self, *exc):
        if self._counter is None:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
            self.live = torch.cuda.memory_allocated(self.device) - self._base
            return False
        self._counter.__exit__(*exc)
        self.peak, self.live = self._counter.peak, self._counter.live
        return False


def tensor_bytes(xs) -> int:
    """Bytes of the tensors in a (nested) tuple or list."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(xs) if isinstance(t, torch.Tensor))
