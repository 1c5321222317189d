"""Per-thread scratch buffers for the CPU estimators' large temporaries.

A fresh multi-MB tensor is backed by fresh pages whenever glibc has returned the
previous ones to the OS, and first-touch page faults then cost more than the
arithmetic: measured at GAE 256 x 4096 on the shared 2-core benchmark box, up to
~2,000 faults (2-6 ms) per call against a 2-3 ms computation. Temporaries that
never leave a function therefore live in buffers kept per thread and reused
across calls (CUDA's caching allocator already does this on the GPU). Results
returned to the caller are always fresh tensors.

Bounded: a buffer above ``MAX_BYTES`` is not kept (the caller gets a fresh
tensor), and :func:`release_workspace` drops this thread's buffers.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

__all__ = ["scratch", "release_workspace", "MAX_BYTES"]

_LOCAL = threading.local()

#: The largest buffer kept for reuse, per slot and thread (64 MiB: float32 1024 x 16384).
MAX_BYTES = 64 * 1024**2


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor of ``shape`` from this thread's buffer ``slot`` (CPU only).

    The contents are whatever the previous user of the slot left. A slot must not
    be used twice while a view of it is alive (callers give each temporary its own).
    """
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or numel * itemsize > MAX_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = _LOCAL.__dict__.setdefault("bufs", {})
    key = (slot, dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def release_workspace() -> int:
    """Drop this thread's scratch buffers; returns the bytes released.

    >>> import torch
    >>> from rl2fx.returns import gae
    >>> _ = gae(torch.zeros(4, 64), torch.zeros(4, 64), gamma=0.99, lamda=0.95)
    >>> release_workspace() >= 0
    True
    """
    bufs = _LOCAL.__dict__.pop("bufs", {})
    return sum(b.numel() * b.element_size() for b in bufs.values())
