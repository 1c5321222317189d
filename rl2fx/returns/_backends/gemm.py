r"""Constant coefficient on CPU: the blocked scan as matrix products, natural layout.

With one coefficient ``c`` every block of ``L`` steps has the same transfer
matrix ``M[s, t] = c**(s-t)`` (``s >= t``), so the in-block pass ``u = x_block @ M``
is a single BLAS call over all blocks and rows, with no transposing copies. The
block starts obey the same recurrence with coefficient ``c**L``, ``T/L`` long,
solved by the same method one level down in float64, then one fused pass adds
``P * Y_{k+1}`` with ``P[l] = c**(L-l)``.

CPU only: CUDA matmuls may run in TF32 when a user enables it, which would cost
three decimal digits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rl2fx.returns._backends.blocked import CARRY_DTYPE

__all__ = ["scan_const"]

# Block length: the in-block pass costs 2L flops per element, the carry level T/L
# steps; 16 was the fastest of 8/16/32/64 (docs/performance.md).
_GEMM_BLOCK = 16
# (c, L, dtype) -> the block matrices; a few KB each, kept for the process's life,
# cleared when a sweep over many discounts fills it
_GEMM_CACHE: dict[tuple[float, int, torch.dtype], tuple[Tensor, Tensor, float]] = {}
_GEMM_CACHE_MAX = 64


def _gemm_mats(c: float, blk: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, float]:
    """``M[s, t] = c**(s-t)`` for ``s >= t`` (0 above), ``P[l] = c**(L-l)`` and ``c**L``.

    Powers are taken in float64 and rounded once, so a block's weights carry one
    rounding each instead of a chain of up to ``L`` float32 multiplications.
    """
    key = (c, blk, dtype)
    hit = _GEMM_CACHE.get(key)
    if hit is None:
        i = torch.arange(blk)
        e = i[:, None] - i[None, :]
        cc = torch.tensor(c, dtype=torch.float64)
        m = torch.where(e >= 0, cc ** e.clamp(min=0), 0.0).to(dtype)
        p = (cc ** (blk - i)).to(dtype)
        if len(_GEMM_CACHE) > _GEMM_CACHE_MAX:
            _GEMM_CACHE.clear()
        hit = _GEMM_CACHE[key] = (m, p, float(cc**blk))
    return hit


def scan_const(x2: Tensor, *, c: float, out: Tensor | None = None) -> Tensor:
    """The scan of a contiguous CPU ``x2 [N, T]`` with a float ``0 <= c <= 1`` already
    rounded to ``x2``'s dtype, into ``out`` (``x2``'s shape, contiguous) if given."""
    n = x2.shape[-1]
    if n <= _GEMM_BLOCK:
        m = _gemm_mats(c, n, x2.dtype)[0]
        return torch.mm(x2, m, out=out)
    blk = _GEMM_BLOCK
    m, p, c_blk = _gemm_mats(c, blk, x2.dtype)
    k = -(-n // blk)
    pad = k * blk - n
    if pad:
        xp, dst = F.pad(x2, (0, pad)), None
    else:
        xp, dst = x2, out
    u = torch.mm(xp.reshape(-1, blk), m, out=None if dst is None else dst.view(-1, blk))
    u = u.view(-1, k, blk)
    # block starts, time last: Y_k = u_k[0] + c**L * Y_{k+1}
    ys = scan_const(u[:, :, 0].to(CARRY_DTYPE), c=c_blk).to(x2.dtype)
    u[:, :-1].addcmul_(p, ys[:, 1:, None])
    y = u.view(-1, k * blk)
    if not pad:
        return y
    if out is None:
        return y[:, :n]
    return out.copy_(y[:, :n])
