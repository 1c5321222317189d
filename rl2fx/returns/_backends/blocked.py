r"""The eager blocked scan: a two-level Blelloch-style decomposition done with short loops.

Time is cut into ``K`` blocks of ``L`` steps, laid out time-major as
``[K, L, batch]`` so each step is one contiguous slab of ``K * batch`` elements:

1. in-block pass, a loop over ``L`` vectorised across batch and blocks, giving
   the local solution ``u`` (``y`` with a zero carry) and the in-block products
   ``P[l] = c[l] c[l+1] ... c[L-1]``;
2. the block-start values obey the same recurrence of length ``K``
   (``Y_k = u_k[0] + P_k[0] Y_{k+1}``): solved recursively with the same method;
3. one fix-up pass ``y = u + P * Y_{k+1}``.

Only products inside one block are formed at the first level (at most ``L``
factors), never a running product over the whole sequence and never a log-space
closed form, so ``c`` in ``[0, 1]`` (including long runs of exact 0 and 1) is
exact up to float rounding at any ``T``. About ``2L + 2K`` tensor operations
instead of ``T``. Works in place on this thread's scratch buffers, so it is not
differentiable (the dispatcher sends gradients to the functional form in
:mod:`.compiled`).

References: Blelloch, "Prefix sums and their applications" (1990); Martin & Cundy,
"Parallelizing linear recurrent neural nets over sequence length" (ICLR 2018).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rl2fx.returns._backends.workspace import scratch

__all__ = ["CARRY_DTYPE", "blocked"]

#: The carry recurrences (levels above the first) run on T/L-times smaller arrays,
#: so they are solved in float64 at negligible cost.
CARRY_DTYPE = torch.float64


def _block_len(t: int) -> int:
    # ~sqrt(T) balances the in-block loop (L steps) against the carry scan (T/L
    # steps); clamped so slabs stay large and the carry scan stays short.
    return max(8, min(64, 1 << round(math.log2(max(t, 1)) / 2)))


def _tm_scan_(xs: Tensor, cs: Tensor | float, blk: int | None = None) -> Tensor:
    """Blocked reverse scan of a time-major ``xs [T, N]``, overwriting ``xs`` (and ``cs``)."""
    n_t = xs.shape[0]
    scalar = not isinstance(cs, Tensor)
    if n_t <= 64:  # short enough: plain sequential pass, in place
        for t in range(n_t - 2, -1, -1):
            if scalar:
                xs[t].add_(xs[t + 1], alpha=cs)
            else:
                xs[t].addcmul_(cs[t], xs[t + 1])
        return xs
    blk = blk or _block_len(n_t)
    k = -(-n_t // blk)
    pad = k * blk - n_t
    if pad:  # zeros after the end: x = 0, c = 0 leave y unchanged
        xs = torch.cat([xs, xs.new_zeros(pad, *xs.shape[1:])])
        if not scalar:
            cs = torch.cat([cs, cs.new_zeros(pad, *cs.shape[1:])])
    x3 = xs.view(k, blk, *xs.shape[1:])
    # 1. in-block pass: local solution u and suffix products P (in place)
    if scalar:
        for i in range(blk - 2, -1, -1):
            x3[:, i].add_(x3[:, i + 1], alpha=cs)
    else:
        c3 = cs.view(k, blk, *cs.shape[1:])
        # block products for the carries, multiplied in float64: a float32 chain
        # of L roundings, repeated over T/L blocks, biases the effective discount
        # (docs/performance.md, "Accuracy detail"); slab by slab, because
        # torch.prod(dtype=float64) would first copy all of c
        b = c3[:, blk - 1].to(CARRY_DTYPE, copy=True)
        for i in range(blk - 2, -1, -1):
            x3[:, i].addcmul_(c3[:, i], x3[:, i + 1])
            b.mul_(c3[:, i])
            c3[:, i].mul_(c3[:, i + 1])
    # 2. block-start values Y_k = u_k[0] + P_k[0] * Y_{k+1}: the same problem, K long
    if scalar:
        # products of a constant: c**(L - l); torch keeps inf/0 instead of raising
        # (built on the CPU: reading pw[0] from a GPU tensor would synchronise)
        pw = torch.full((blk,), cs, dtype=torch.float64).cumprod(0).flip(0)
        ys = _tm_scan_(x3[:, 0].to(CARRY_DTYPE, copy=True), float(pw[0])).to(xs.dtype)
        p3 = pw.to(device=xs.device, dtype=xs.dtype).view((1, blk) + (1,) * (xs.dim() - 1))
        p3 = p3.expand((k - 1,) + p3.shape[1:])
    else:
        ys = _tm_scan_(x3[:, 0].to(CARRY_DTYPE, copy=True), b).to(xs.dtype)
        p3 = c3[:-1]
    # 3. fix-up with the carry from the next block (the last block has none)
    x3[:-1].addcmul_(p3, ys[1:].unsqueeze(1))
    return xs[:n_t] if pad else xs


def _to_time_major(x2: Tensor, *, rows: int, slot: int) -> Tensor:
    """``x2 [N, T]`` copied once into a zero-padded, time-major ``[rows, N]`` scratch buffer."""
    n_t = x2.shape[1]
    buf = scratch(f"time-major-{slot}", (rows, x2.shape[0]), dtype=x2.dtype, device=x2.device)
    buf[:n_t].copy_(x2.t())
    buf[n_t:].zero_()  # x = 0, c = 0 after the end leave y unchanged
    return buf


def blocked(x2: Tensor, c: Tensor | float) -> Tensor:
    """The scan of ``x2 [N, T]`` with ``c`` a float or an ``[N, T]`` tensor: a new tensor."""
    n = x2.shape[-1]
    # Pad to whole blocks inside the one transposing copy each input needs anyway
    # (a copy, never a view: the scan then works in place).
    blk = _block_len(n)
    rows = n if n <= 64 else -(-n // blk) * blk
    xt = _to_time_major(x2, rows=rows, slot=0)
    ct = _to_time_major(c.reshape(-1, n), rows=rows, slot=1) if isinstance(c, Tensor) else c
    yt = _tm_scan_(xt, ct, blk)[:n]
    # two passes (fix-up, then this copy): fusing them through a strided out= is
    # slower (docs/performance.md)
    out = torch.empty_like(x2)
    out.copy_(yt.t())
    return out
