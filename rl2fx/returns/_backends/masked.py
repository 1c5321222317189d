r"""The masked recurrence with one coefficient, on CPU: no gather, scatter or packing.

A mask makes the coefficient a tensor (``c`` at decisions, 1 at skipped steps),
so the constant-coefficient matrix product of :mod:`.gemm` no longer applies as
such. But every coefficient is a power of the one ``c``: ``c_t = c**m_t``. Inside
a block of ``L`` steps the product over a span is ``c**(decisions in it)``, so
with the block's inclusive decision count ``D_t`` and weights ``W_t = c**D_t``
(at most ``L`` factors: no overflow or underflow while ``c**L >= 1e-30``),

.. math::  y_t = \frac{1}{W_t} \sum_{s \ge t \text{ in block}} W_s m_s x_s
           \qquad (t \text{ a decision}),

one triangular matrix product of the weighted inputs, vectorised over every row
and block. ``D`` comes from a matrix product of the 0/1 mask, and the
block-to-block carries obey the same kind of recurrence, ``T/L`` long, solved in
float64 on log-coefficients (:func:`scan_logc_`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rl2fx.returns._backends.blocked import CARRY_DTYPE

__all__ = ["masked_const_ok", "mask_floats", "scan_masked_const", "masked_const_scan_", "masked_carries",
           "scan_logc_", "tri"]

_MASKED_BLOCK = 16
_CARRY_BLOCK = 16  # block length of the float64 carry levels
# Smallest c**L: the weights c**D stay normal float32 numbers (1e-30 > 1.2e-38)
# and their inverses finite (1e30 < 3.4e38).
_MASKED_MIN_CL = 1e-30
# Carry levels run on log-coefficients l <= 0 in float64. A coefficient below
# exp(-40) = 4.2e-18 is raised to it: the carried term it scales is then off by
# at most 4.2e-18 of the carry, far below float32 (and float64) resolution of
# the result, while a block's weights stay above exp(-40 L) = 1e-278 (normal).
_LOG_FLOOR = -40.0
# (L, dtype, strict) -> a 0/1 [L, L] matrix; a handful of tiny tensors for the process's life
_TRI_CACHE: dict[tuple[int, torch.dtype, bool], Tensor] = {}


def tri(blk: int, dtype: torch.dtype, *, strict: bool) -> Tensor:
    """Triangular 0/1 ``[L, L]`` matrices for block sums by matrix product.

    ``strict=False``: ``A[s, t] = 1`` for ``s >= t`` (``(z @ A)_t = sum_{s>=t} z_s``, the
    suffix sum); ``strict=True``: ``A[u, t] = 1`` for ``u < t`` (``(l @ A)_t = sum_{u<t} l_u``).
    """
    key = (blk, dtype, strict)
    hit = _TRI_CACHE.get(key)
    if hit is None:
        i = torch.arange(blk)
        hit = (i[:, None] < i[None, :]) if strict else (i[:, None] >= i[None, :])
        hit = _TRI_CACHE[key] = hit.to(dtype)
    return hit


def masked_const_ok(c: float) -> bool:
    """Whether this path applies to the constant ``c`` (``c**L`` normal, ``0 < c <= 1``)."""
    return 0.0 < c <= 1.0 and c**_MASKED_BLOCK >= _MASKED_MIN_CL


def mask_floats(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as a contiguous 0/1 tensor of ``dtype``, converted through uint8
    (a direct bool conversion is several times slower on CPU)."""
    return mask.contiguous().view(torch.uint8).to(dtype)


def scan_logc_(x: Tensor, logc: Tensor) -> Tensor:
    """``y_t = x_t + exp(l_t) y_{t+1}``, ``y_T = 0``, over the last axis of float64
    ``x, logc [N, K]`` with ``l <= 0``: the carry levels of :func:`scan_masked_const`.
    Overwrites ``x``.

    Same block method with exclusive in-block log-products ``E_t = sum_{u<t} l_u`` (at
    most ``L`` terms, each at least ``_LOG_FLOOR``): weights ``w = exp(E)``, one
    suffix-sum product, the block starts one level coarser, then
    ``y_t = (s_t + exp(lb_k) Y_{k+1}) / w_t`` with the block's exact log-product ``lb_k``
    (``>= -40 L``, so ``exp`` stays normal, and ``lb_k <= E_t``, so nothing is
    amplified). The coarser level's floor on ``lb_k`` only moves the block starts
    ``Y``, by at most ``exp(-40)`` of a carry; ``Y_k - s_k`` must not stand in for
    ``exp(lb_k) Y_{k+1}`` for that reason.
    """
    n, k_t = x.shape
    if k_t == 1:
        return x
    logc = logc.clamp(min=_LOG_FLOOR)
    blk = min(_CARRY_BLOCK, k_t)
    k = -(-k_t // blk)
    pad = k * blk - k_t
    if pad:
        x, logc = F.pad(x, (0, pad)), F.pad(logc, (0, pad))
    e = torch.mm(logc.reshape(-1, blk), tri(blk, x.dtype, strict=True)).view(n, k, blk)
    w = torch.exp(e)
    s = torch.mm(w.mul(x.view(n, k, blk)).view(-1, blk), tri(blk, x.dtype, strict=False))
    s = s.view(n, k, blk)
    if k > 1:
        lb = e[:, :, -1] + logc.view(n, k, blk)[:, :, -1]
        ys = scan_logc_(s[:, :, 0].contiguous(), lb)
        s[:, :-1].add_((torch.exp(lb[:, :-1]) * ys[:, 1:]).unsqueeze(-1))
    y = s.div_(w).view(n, k * blk)
    return y[:, :k_t] if pad else y


def scan_masked_const(x2: Tensor, mf: Tensor, *, c: float, tail: Tensor | None = None) -> Tensor:
    r"""The masked recurrence with one coefficient: ``y_t = x_t + c^{m_t} y_{t+1}``, ``y_T = tail``.

    ``x2 [N, T]`` (its values at masked-out steps are ignored), ``mf [N, T]`` the mask as
    0/1 in ``x2``'s dtype, ``c`` a float with :func:`masked_const_ok`, ``tail [N]`` or
    ``None`` (0). Returns ``y * m`` (zeros at masked-out steps): equal to packing each
    row's decisions, running the unmasked scan with coefficient ``c`` and scattering
    back, with no index operation (see the module docstring).
    """
    return masked_const_scan_(x2.clone(), mf, c=c, tail=tail)[0]


def masked_const_scan_(
    x2: Tensor, mf: Tensor, *, c: float, tail: Tensor | None = None
) -> tuple[Tensor, bool]:
    """:func:`scan_masked_const` overwriting the contiguous ``x2`` (the result lives in
    its memory), and whether the result is finite.

    The finiteness flag comes from the block carries (``N * T / L`` numbers): every
    input at every step, masked out or not, reaches some block's sum, so a NaN or inf
    anywhere shows there without a pass over the result.
    """
    n, t_len = x2.shape
    blk = _MASKED_BLOCK
    k = -(-t_len // blk)
    pad = k * blk - t_len
    if pad:  # decision-free padding: weights 1, inputs 0
        x2, mf = F.pad(x2, (0, pad)), F.pad(mf, (0, pad))
    x3, m3 = x2.view(n, k, blk), mf.view(n, k, blk)
    # inclusive log-weights E_t = ln(c) * D_t by one product of the 0/1 mask
    tri_lc = tri(blk, x2.dtype, strict=False).t() * math.log(c)
    e = torch.mm(mf.view(-1, blk), tri_lc).view(n, k, blk)
    lb = e[:, :, -1].to(CARRY_DTYPE, copy=True)  # ln(c) * n_k, n_k the block's decision count
    w = torch.exp(e)
    q = torch.div(m3, w, out=e)  # m / W: the output scale (0 at masked-out steps)
    z = w.mul_(m3).mul_(x3)  # W m x, in place of W
    s = torch.mm(z.view(-1, blk), tri(blk, x2.dtype, strict=False), out=x2.view(-1, blk)).view(n, k, blk)
    del w, z
    # Block k's start value is s_k0 / c whether or not its first step is a decision,
    # and it passes on c**n_k. Carries are solved for Y'_k = c Y_k:
    # Y'_k = s_k0 + c**n_k Y'_{k+1}, Y'_K = c * tail.
    ys = s[:, :, 0].to(CARRY_DTYPE, copy=True)
    y_end = ys.new_zeros(n) if tail is None else c * tail.to(CARRY_DTYPE)
    ys, carry = masked_carries(ys, lb=lb, y_end=y_end)
    finite = bool(torch.isfinite(ys.sum()))
    s.add_(carry.to(x2.dtype).unsqueeze(-1))
    y = s.mul_(q).view(n, k * blk)
    return (y[:, :t_len] if pad else y), finite


def masked_carries(ys: Tensor, *, lb: Tensor, y_end: Tensor) -> tuple[Tensor, Tensor]:
    """The carry stage of :func:`masked_const_scan_`, float64 ``[N, K]``: from the block
    sums ``ys`` (overwritten), the log-coefficients ``lb = ln(c) n_k`` and the scaled end
    value ``y_end = c * tail [N]``, the block starts ``Y'_k = s_k0 + c**n_k Y'_{k+1}``
    (``Y'_K = y_end``) and the carry into each block's steps
    ``B_k = c**(n_k + 1) Y_{k+1} = c**n_k Y'_{k+1}``, from the exact ``n_k``
    (``B_k / W_t <= |Y'_{k+1}|``: nothing is amplified).
    """
    ys[:, -1] += torch.exp(lb[:, -1]) * y_end
    ys = scan_logc_(ys, lb)
    nxt = torch.cat([ys[:, 1:], y_end[:, None]], 1)
    return ys, torch.exp(lb) * nxt
