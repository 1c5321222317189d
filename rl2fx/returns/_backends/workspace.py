"""Per-thread scratch buffers for the CPU fast paths' large temporaries.

A fresh multi-MB tensor is backed by fresh pages whenever the C allocator has
returned the previous ones to the OS, and first-touch page faults then cost as
much as the arithmetic (figures in docs/performance.md, "Buffers kept between
calls"). Temporaries that never leave a function therefore live in buffers kept
per thread and reused across calls (CUDA's caching allocator already does this
on the GPU). Results returned to the caller are always fresh tensors.

What is kept: per thread, one buffer per (slot, dtype), as large as the largest
request so far, each at most :data:`MAX_BYTES`; a larger request gets a fresh
tensor and is not kept. The buffers of a thread are freed when the thread ends,
or by :func:`release_workspace` (the trainer calls it at the end of a run).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

__all__ = ["scratch", "release_workspace", "MAX_BYTES"]

_LOCAL = threading.local()

#: The largest buffer kept for reuse, per slot and thread (64 MiB: float32 1024 x 16384).
MAX_BYTES = 64 * 1024**2


def scratch(slot: str, shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> Tensor:
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
    """Free the scratch buffers the estimators keep between calls in this thread.

    The CPU fast paths of :mod:`rl2fx.returns` (GAE, TD(λ) and discounted returns
    with a constant discount, the blocked scan) reuse per-thread buffers for their
    temporaries, up to 64 MiB per buffer and a few buffers per thread, so that
    repeated calls do not page-fault fresh memory. They stay allocated until the
    thread ends or this is called: call it when a run is over (the trainer does,
    at the end of ``train()``), or before a memory-hungry phase that follows
    advantage computation in the same thread. Calling it at any time is safe; the
    next estimator call allocates again. Returns the number of bytes released.

    >>> import torch
    >>> from rl2fx.returns import gae, release_workspace
    >>> _ = gae(torch.zeros(4, 64), torch.zeros(4, 64), gamma=0.99, lamda=0.95)
    >>> release_workspace() >= 0
    True
    >>> release_workspace()
    0
    """
    bufs = _LOCAL.__dict__.pop("bufs", {})
    return sum(b.numel() * b.element_size() for b in bufs.values())
