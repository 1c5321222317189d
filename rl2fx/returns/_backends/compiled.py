"""The blocked scan written functionally (out of place), and its ``torch.compile`` backend.

:func:`blocked_functional` is the block decomposition of :mod:`.blocked` with a
static block length and the in-block loop unrolled, in the natural
``[batch, time]`` layout. Run eagerly it is the differentiable form of the
blocked scan; passed through :func:`torch.compile` with dynamic shapes, Inductor
fuses the block passes into a few kernels (Triton on CUDA, C++/OpenMP on CPU).

Kept between calls: one compiled function per (device type, dtype), for the
life of the process (Inductor also caches graphs on disk). Each serves every
batch size and every ``T`` of one recursion depth (one depth covers
``L < T <= L**2``, the next ``L**2 < T <= L**3``); the first call of a depth pays
the compile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rl2fx.returns._backends.blocked import CARRY_DTYPE

__all__ = ["blocked_functional", "compiled"]

# The in-block loop is unrolled L times and compile time grows with L; 16
# sequential steps per GPU thread and T/16 blocks per row keep a GPU busy at
# every benchmarked shape (compile times in docs/performance.md).
_COMPILED_BLOCK = 16


def blocked_functional(x: Tensor, c: Tensor) -> Tensor:
    """Out-of-place blocked scan over the last axis of ``x, c [N, T]`` (torch.compile friendly).

    The block length is static and the in-block loop unrolled, so Inductor can
    fuse a whole block pass into one kernel; the recursion depth depends on ``T``
    only through ``T <= L**d`` guards (one compiled graph per depth).
    """
    blk = _COMPILED_BLOCK
    n_t = x.shape[-1]
    if n_t <= blk:
        # pad to exactly L so the unrolled loop has a static length
        x3 = F.pad(x, (0, blk - n_t))
        c3 = F.pad(c, (0, blk - n_t))
        ys = [x3[..., blk - 1]]
        for i in range(blk - 2, -1, -1):
            ys.append(x3[..., i] + c3[..., i] * ys[-1])
        return torch.stack(ys[::-1], -1)[..., :n_t]
    k = (n_t + blk - 1) // blk
    pad = k * blk - n_t
    x3 = F.pad(x, (0, pad)).unflatten(-1, (k, blk))
    c3 = F.pad(c, (0, pad)).unflatten(-1, (k, blk))
    u = [x3[..., blk - 1]]
    p = [c3[..., blk - 1]]
    for i in range(blk - 2, -1, -1):
        u.append(x3[..., i] + c3[..., i] * u[-1])
        p.append(c3[..., i] * p[-1])
    # carries in float64 from float64 block products, as in the eager backend
    b = torch.prod(c3, -1, dtype=CARRY_DTYPE)
    ys = blocked_functional(u[-1].to(CARRY_DTYPE), b).to(x.dtype)  # block starts [N, K]
    carry = F.pad(ys[..., 1:], (0, 1)).unsqueeze(-1)
    y = torch.stack(u[::-1], -1) + torch.stack(p[::-1], -1) * carry
    return y.flatten(-2)[..., :n_t]


_COMPILED: dict[tuple[str, torch.dtype], Callable[[Tensor, Tensor], Tensor]] = {}
_COMPILED_LOCK = threading.Lock()


def _compiled_fn(device: torch.device, dtype: torch.dtype) -> Callable[[Tensor, Tensor], Tensor]:
    key = (device.type, dtype)
    with _COMPILED_LOCK:
        fn = _COMPILED.get(key)
        if fn is None:
            # dynamic=True: one graph serves every batch size and every T of a
            # recursion depth instead of recompiling per shape.
            fn = torch.compile(blocked_functional, dynamic=True, fullgraph=True)
            _COMPILED[key] = fn
    return fn


def _plain(t: Tensor) -> Tensor:
    # detach() (when no gradient is needed) makes it not a view for dynamo, whose
    # guards on a view's base would recompile for every leading-dims layout
    return t if (t.requires_grad and torch.is_grad_enabled()) else t.detach()


def compiled(x: Tensor, c: Tensor | float) -> Tensor:
    """The compiled blocked scan of ``x [*batch, T]`` with a float or per-step ``c``."""
    n = x.shape[-1]
    x2 = _plain(x.reshape(-1, n).contiguous())
    if isinstance(c, Tensor):
        c2 = _plain(c.reshape(-1, n).contiguous())
    else:
        # a tensor, not a Python float: a float would be baked into the graph and
        # recompile for every new discount; materialised (not an expanded view) so
        # both forms share one compiled graph
        c2 = torch.full_like(x2, c)
    return _compiled_fn(x.device, x.dtype)(x2, c2).reshape(x.shape)
