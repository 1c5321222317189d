r"""The reverse linear recurrence every estimator in :mod:`rl2fx.returns` reduces to.

.. math::  y_t = x_t + c_t \, y_{t+1}, \qquad y_T = 0

over the last (time) axis, with any number of leading batch dimensions.
GAE is ``x = δ``, ``c = γλ``; discounted returns are ``x = r``, ``c = γ``;
V-trace and Retrace likewise (see their modules). Masked-out steps are encoded
by callers as ``x = 0, c = 1`` (the step is skipped), or passed as ``mask=``, and
episode cuts as ``c = 0``.

Backends (``BACKENDS``)
-----------------------
``loop``
    The reference: one pass backwards over time on a time-major copy (so every
    step touches contiguous memory). ``T`` Python steps; the fastest for short ``T``.
``chunked``
    A two-level blocked scan (Blelloch-style decomposition, done with short loops
    instead of a tree). Time is cut into ``K`` blocks of ``L`` steps, laid out
    time-major as ``[K, L, batch]`` so each step is one contiguous slab of
    ``K * batch`` elements:

    1. in-block pass, a loop over ``L`` vectorised across batch and blocks, giving
       the local solution ``u`` (``y`` with a zero carry) and the in-block products
       ``P[l] = c[l] c[l+1] ... c[L-1]``;
    2. the block-start values obey the same recurrence of length ``K``
       (``Y_k = u_k[0] + P_k[0] Y_{k+1}``): solved recursively with the same method;
    3. one fix-up pass ``y = u + P * Y_{k+1}``.

    Only products inside one block are formed at the first level (at most ``L``
    factors), never a running product over the whole sequence and never a
    log-space closed form, so ``c`` in ``[0, 1]`` (including long runs of exact 0
    and 1) is exact up to float rounding at any ``T``. A constant ``c`` (a float)
    takes a path with no ``c`` tensor at all. About ``2L + 2K`` tensor operations
    instead of ``T``. On CPU a constant ``c`` (a float) instead solves all blocks
    at once as one matrix product ``x_block @ M`` with ``M[s, t] = c**(s-t)``
    (BLAS, natural layout, no transposing copies, ``L = 16``), the block starts
    by the same method one level down in float64, then one fix-up pass; ``auto``
    takes this path for every float ``0 <= c <= 1`` on CPU.
``mask=`` with a float ``c`` (CPU)
    The masked recurrence (the scan over masked-in steps only) with one
    coefficient: every coefficient is ``c**m_t``, so inside a 16-step block the
    product over a span is ``c**(decisions in it)``. With weights ``W_t = c**D_t``
    (``D`` the block's inclusive decision count, one matrix product of the 0/1
    mask) the in-block solution is ``(1/W_t) sum_{s>=t} W_s m_s x_s``: one suffix-sum
    product, no gather, scatter or per-row packing. Block carries run on
    log-coefficients in float64 (:func:`_scan_logc_`). Used by ``gae``,
    ``td_lambda`` and ``discounted``; ``c**16 >= 1e-30`` is required (smaller ``c``
    takes the general path).
``compiled``
    The same block decomposition written functionally (the in-block loop unrolled,
    natural ``[batch, time]`` layout) and passed through :func:`torch.compile` with
    dynamic shapes: Inductor fuses the block passes into a few kernels (Triton on CUDA,
    C++/OpenMP on CPU). Compiled once per device, dtype and depth of the block
    recursion (one depth covers ``L < T <= L**2``, the next ``L**2 < T <= L**3``),
    cached for the life of the process. The first call pays the compile cost
    (tens of seconds on CPU), which the benchmark reports separately.
``auto``
    Picks by device, dtype and shape from the measurements in ``_AUTO_TABLE``.

Differentiable: with gradients enabled ``chunked`` runs the out-of-place form of
the same decomposition (the in-place fast path reuses per-thread scratch buffers).

Limits: ``c > 1`` is allowed, but the blocked backends form products of ``c``
over spans of up to ``T`` steps at the coarser levels; if such a product
overflows (for example ``c = 1.01`` over 9000 steps in float32) the result holds
``inf``/``nan`` where ``loop`` may still be finite. ``auto`` picks ``loop`` for a
float ``c > 1``; pass ``backend="loop"`` for growing per-step ``c`` tensors. Non-finite inputs are not checked here (the estimators check
them); a NaN spreads to every earlier step in ``loop`` and additionally within its
block in the blocked backends.

References: Blelloch, "Prefix sums and their applications" (1990); Martin & Cundy,
"Parallelizing linear recurrent neural nets over sequence length" (ICLR 2018).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rl2fx._typing import Float, Shaped, check_choice, typechecked
from rl2fx.returns._common import acc_dtype, as_bool, masked_out, through
from rl2fx.returns._workspace import scratch

__all__ = ["BACKENDS", "reverse_scan"]

#: Every accepted value of ``backend``.
BACKENDS: tuple[str, ...] = ("auto", "loop", "chunked", "compiled")

# Block length of the compiled backend: the in-block loop is unrolled L times and
# compile time grows with L (CPU: ~35 s for the 1-level graph at L=16 on a loaded
# 2-core box, over 90 s for 2 levels at L=32); 16 sequential steps per GPU thread
# and T/16 blocks per row keep the GPU busy at every shape we benchmark.
_COMPILED_BLOCK = 16

# Measured medians (ms), reverse_scan alone, float32, per-step c (the masked
# case), 1 thread of a shared 2-core AMD EPYC (benchmarks/returns.py --scan):
#
#   batch x T      loop    chunked   compiled (after its one-off compile)
#   256 x 16        0.30     0.27      0.24
#   256 x 64        0.74     0.55      0.41
#   256 x 256       2.43     0.85      0.56
#   256 x 1024      9.88     2.16      2.43
#   256 x 4096     45.7      7.42     11.5
#   1024 x 8192   171       74.5     170
#
# Re-measured on the 2-core Xeon (AVX-512) of 2026-12-01, 2 threads:
#
#   batch x T      loop    chunked   compiled
#   256 x 16        0.31     0.28      0.10
#   256 x 64        0.51     0.41      0.36
#   256 x 256       3.31     1.06      0.51
#   256 x 1024     15.0      1.95      1.77
#   256 x 4096     39.9      6.98      6.11
#   1024 x 8192   124       75.8      79.0
#
# loop costs ~3 us of Python per step; chunked ~2*(L + T/L) steps plus its two
# transposing copies, so it wins from T ~ 64 on. On CPU the compiled kernel wins
# in steady state only at short T on the EPYC and up to T = 4096 on the Xeon (by
# 0.1-0.9 ms), far less than its first-call compile (EPYC: 5-10 s with a warm
# Inductor cache, 1-3 min cold; Xeon: 5 s, 23-43 s) repays in a typical call
# count, so CPU never picks it. On
# CUDA every eager step is a kernel launch (5-10 us) and the fused compiled
# kernels are the only way near the bandwidth floor; short T stays eager. (Not
# measured on a GPU in this session: no GPU was available.) dtype does not enter
# the rule: bfloat16/float16 are scanned as float32, float64 costs every backend
# alike.
_AUTO_TABLE: dict[str, tuple[tuple[int, str], ...]] = {
    # device type -> ((max T, backend), ...) checked in order
    "cpu": ((48, "loop"), (1 << 62, "chunked")),
    "cuda": ((16, "loop"), (256, "chunked"), (1 << 62, "compiled")),
}


def _auto_backend(x: Tensor, c: Tensor | float) -> str:
    if not isinstance(c, Tensor):
        if abs(c) > 1.0:
            return "loop"  # growing recurrence: the only backend with no span products
        if x.device.type == "cpu":
            # constant c on CPU: BLAS products win at every T (measured, 1 thread,
            # 256 rows: T=4 0.029 vs 0.094 ms for the loop, T=16 0.030 vs 0.225,
            # T=256 0.167 vs 2.76)
            return "chunked"
    rules = _AUTO_TABLE.get(x.device.type, _AUTO_TABLE["cpu"])
    t = x.shape[-1]
    for max_t, name in rules:
        if t <= max_t:
            return name
    return rules[-1][1]


# --------------------------------------------------------------------- loop


def _loop(x: Tensor, c: Tensor | float) -> Tensor:
    """Reference: ``T`` sequential steps on a time-major copy (contiguous rows)."""
    n = x.shape[-1]
    xt = x.reshape(-1, n).t().contiguous()  # [T, N]
    ct = c.reshape(-1, n).t().contiguous() if isinstance(c, Tensor) else c
    out = torch.empty_like(xt)
    acc = torch.zeros_like(xt[0])
    for t in range(n - 1, -1, -1):
        acc = xt[t] + (ct[t] if isinstance(ct, Tensor) else ct) * acc
        out[t] = acc
    return out.t().reshape(x.shape)


# ------------------------------------------------------------ eager chunked

# The carry recurrences (levels above the first) run on T/L-times smaller arrays,
# so they are solved in float64 at negligible cost.
_CARRY_DTYPE = torch.float64


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
        # (measured 1.6e-5 relative error at T=16384, c=0.9999; 3e-7 with this)
        # (slab by slab: torch.prod(dtype=float64) would first copy all of c)
        b = c3[:, blk - 1].to(_CARRY_DTYPE, copy=True)
        for i in range(blk - 2, -1, -1):
            x3[:, i].addcmul_(c3[:, i], x3[:, i + 1])
            b.mul_(c3[:, i])
            c3[:, i].mul_(c3[:, i + 1])
    # 2. block-start values Y_k = u_k[0] + P_k[0] * Y_{k+1}: the same problem, K long
    if scalar:
        # products of a constant: c**(L - l); torch keeps inf/0 instead of raising
        # (built on the CPU: reading pw[0] from a GPU tensor would synchronise)
        pw = torch.full((blk,), cs, dtype=torch.float64).cumprod(0).flip(0)
        ys = _tm_scan_(x3[:, 0].to(_CARRY_DTYPE, copy=True), float(pw[0])).to(xs.dtype)
        p3 = pw.to(device=xs.device, dtype=xs.dtype).view((1, blk) + (1,) * (xs.dim() - 1))
        p3 = p3.expand((k - 1,) + p3.shape[1:])
    else:
        ys = _tm_scan_(x3[:, 0].to(_CARRY_DTYPE, copy=True), b).to(xs.dtype)
        p3 = c3[:-1]
    # 3. fix-up with the carry from the next block (the last block has none)
    x3[:-1].addcmul_(p3, ys[1:].unsqueeze(1))
    return xs[:n_t] if pad else xs


def _to_time_major(x2: Tensor, rows: int, slot: int) -> Tensor:
    """``x2 [N, T]`` copied once into a zero-padded, time-major ``[rows, N]`` scratch buffer."""
    n_t = x2.shape[1]
    buf = scratch(f"time-major-{slot}", (rows, x2.shape[0]), x2.dtype, x2.device)
    buf[:n_t].copy_(x2.t())
    buf[n_t:].zero_()  # x = 0, c = 0 after the end leave y unchanged
    return buf


# Block length of the constant-c GEMM path: the in-block pass is one
# [N*T/L, L] @ [L, L] product, 2L flops per element, and the block starts are
# solved by the same method one level down (float64, T/L long). Measured in GAE
# at 256 x 4096 (1 thread, shared 2-core EPYC, glibc malloc with a fixed mmap
# threshold): L=8 3.06 ms, L=16 1.23 ms, L=32 1.43 ms, L=64 2.00 ms for the scan
# alone (T not a multiple of L pays one padding copy).
_GEMM_BLOCK = 16
_GEMM_CACHE: dict[tuple[float, int, torch.dtype], tuple[Tensor, Tensor, float]] = {}


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
        if len(_GEMM_CACHE) > 64:  # a sweep over many discounts must not grow without bound
            _GEMM_CACHE.clear()
        hit = _GEMM_CACHE[key] = (m, p, float(cc**blk))
    return hit


def _gemm_const(x2: Tensor, c: float, out: Tensor | None = None) -> Tensor:
    """Constant ``c`` on CPU: in-block solutions by one matrix product, natural layout.

    With a constant coefficient every block has the same transfer matrix, so the
    in-block pass ``u = x_block @ M`` is a single BLAS call over all blocks and rows
    (no transposing copies). The block starts ``u[:, :, 0]`` obey the same
    recurrence with coefficient ``c**L``, ``T/L`` long: solved by this function
    again, in float64 (one level covers ``T <= L**2``, each further level another
    factor ``L``). One fused pass then adds ``P * Y_{k+1}``. ``out`` (``x2``'s
    shape, contiguous) receives the result when given.
    """
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
    ys = _gemm_const(u[:, :, 0].to(_CARRY_DTYPE), c_blk).to(x2.dtype)
    u[:, :-1].addcmul_(p, ys[:, 1:, None])
    y = u.view(-1, k * blk)
    if not pad:
        return y
    if out is None:
        return y[:, :n]
    return out.copy_(y[:, :n])


def scan_const(x2: Tensor, c: float, out: Tensor | None = None) -> Tensor:
    """The scan of a contiguous CPU ``x2 [N, T]`` with a float ``0 <= c <= 1`` already rounded
    to ``x2``'s dtype (what ``auto`` and ``chunked`` run for it), into ``out`` if given."""
    return _gemm_const(x2, c, out)


# ------------------------------------------------- masked, constant coefficient
#
# A mask makes the coefficient a tensor (c at decisions, 1 at skipped steps), so
# the constant-c matrix product above no longer applies as such. But every
# coefficient is a power of the one c: c_t = c**m_t. Inside a block of L steps
# the product over a span is c**(number of decisions in it), so with the block's
# inclusive decision count D_t and weights W_t = c**D_t (at most L factors: no
# overflow or underflow for c**L >= _MASKED_MIN_CL),
#
#     y_t = (1 / W_t) * sum_{s >= t in block} W_s m_s x_s    (t a decision),
#
# one triangular matrix product of the weighted inputs, vectorised over every
# row and block with no gather, scatter or per-row packing. D comes from a
# matrix product of the 0/1 mask, and the block-to-block carries obey the same
# kind of recurrence, T/L long, solved in float64 below.

_MASKED_BLOCK = 16
_CARRY_BLOCK = 16  # block length of the float64 carry levels
# Smallest c**L for the masked path: the weights c**D stay normal float32
# numbers (1e-30 > 1.2e-38) and their inverses finite (1e30 < 3.4e38).
_MASKED_MIN_CL = 1e-30
# Carry levels run on log-coefficients l <= 0 in float64. A coefficient below
# exp(-40) = 4.2e-18 is raised to it: the carried term it scales is then off by
# at most 4.2e-18 of the carry, far below float32 (and float64) resolution of
# the result, while a block's weights stay above exp(-40 L) = 1e-278 (normal).
_LOG_FLOOR = -40.0
_TRI_CACHE: dict[tuple[int, torch.dtype, bool], Tensor] = {}


def _tri(blk: int, dtype: torch.dtype, strict: bool) -> Tensor:
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
    """Whether :func:`scan_masked_const` applies to the constant ``c`` (``c**L`` normal, ``c <= 1``)."""
    return 0.0 < c <= 1.0 and c**_MASKED_BLOCK >= _MASKED_MIN_CL


def masked_const_applies(x: Tensor, c: Tensor | float, backend: str) -> bool:
    """Whether a masked scan of ``x`` with coefficient ``c`` (already rounded to the
    accumulation dtype) takes the masked constant path: a float ``c`` with
    :func:`masked_const_ok`, on CPU, under ``auto``/``chunked``, without gradients
    (the path works in place)."""
    return (
        not isinstance(c, Tensor)
        and masked_const_ok(c)
        and x.device.type == "cpu"
        and backend in ("auto", "chunked")
        and x.shape[-1] > 0
        and not (torch.is_grad_enabled() and x.requires_grad)
    )


def mask_floats(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask as a contiguous 0/1 tensor of ``dtype`` (through uint8: converting
    bool directly measured 4x slower on CPU)."""
    return mask.contiguous().view(torch.uint8).to(dtype)


def _scan_logc_(x: Tensor, logc: Tensor) -> Tensor:
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
    e = torch.mm(logc.reshape(-1, blk), _tri(blk, x.dtype, True)).view(n, k, blk)
    w = torch.exp(e)
    s = torch.mm(w.mul(x.view(n, k, blk)).view(-1, blk), _tri(blk, x.dtype, False))
    s = s.view(n, k, blk)
    if k > 1:
        lb = e[:, :, -1] + logc.view(n, k, blk)[:, :, -1]
        ys = _scan_logc_(s[:, :, 0].contiguous(), lb)
        s[:, :-1].add_((torch.exp(lb[:, :-1]) * ys[:, 1:]).unsqueeze(-1))
    y = s.div_(w).view(n, k * blk)
    return y[:, :k_t] if pad else y


def scan_masked_const(x2: Tensor, mf: Tensor, c: float, tail: Tensor | None = None) -> Tensor:
    r"""The masked recurrence with one coefficient: ``y_t = x_t + c^{m_t} y_{t+1}``, ``y_T = tail``.

    ``x2 [N, T]`` (its values at masked-out steps are ignored), ``mf [N, T]`` the mask as
    0/1 in ``x2``'s dtype, ``c`` a float with :func:`masked_const_ok`, ``tail [N]`` or
    ``None`` (0). Returns ``y * m`` (zeros at masked-out steps): equal to packing each
    row's decisions, running the unmasked scan with coefficient ``c`` and scattering
    back, with no index operation (see the block comment above).
    """
    return masked_const_scan_(x2.clone(), mf, c, tail)[0]


def masked_const_scan_(
    x2: Tensor, mf: Tensor, c: float, tail: Tensor | None = None
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
    tri_lc = _tri(blk, x2.dtype, False).t() * math.log(c)
    e = torch.mm(mf.view(-1, blk), tri_lc).view(n, k, blk)
    lb = e[:, :, -1].to(_CARRY_DTYPE, copy=True)  # ln(c) * n_k, n_k the block's decision count
    w = torch.exp(e)
    q = torch.div(m3, w, out=e)  # m / W: the output scale (0 at masked-out steps)
    z = w.mul_(m3).mul_(x3)  # W m x, in place of W
    s = torch.mm(z.view(-1, blk), _tri(blk, x2.dtype, False), out=x2.view(-1, blk)).view(n, k, blk)
    del w, z
    # Block k's start value is s_k0 / c whether or not its first step is a decision,
    # and it passes on c**n_k. Carries are solved for Y'_k = c Y_k:
    # Y'_k = s_k0 + c**n_k Y'_{k+1}, Y'_K = c * tail.
    ys = s[:, :, 0].to(_CARRY_DTYPE, copy=True)
    y_end = ys.new_zeros(n) if tail is None else c * tail.to(_CARRY_DTYPE)
    ys, carry = _masked_carries(ys, lb, y_end)
    finite = bool(torch.isfinite(ys.sum()))
    s.add_(carry.to(x2.dtype).unsqueeze(-1))
    y = s.mul_(q).view(n, k * blk)
    return (y[:, :t_len] if pad else y), finite


def _masked_carries(ys: Tensor, lb: Tensor, y_end: Tensor) -> tuple[Tensor, Tensor]:
    """The carry stage of :func:`masked_const_scan_`, float64 ``[N, K]``: from the block
    sums ``ys`` (overwritten), the log-coefficients ``lb = ln(c) n_k`` and the scaled end
    value ``y_end = c * tail [N]``, the block starts ``Y'_k = s_k0 + c**n_k Y'_{k+1}``
    (``Y'_K = y_end``) and the carry into each block's steps
    ``B_k = c**(n_k + 1) Y_{k+1} = c**n_k Y'_{k+1}``, from the exact ``n_k``
    (``B_k / W_t <= |Y'_{k+1}|``: nothing is amplified).
    """
    ys[:, -1] += torch.exp(lb[:, -1]) * y_end
    ys = _scan_logc_(ys, lb)
    nxt = torch.cat([ys[:, 1:], y_end[:, None]], 1)
    return ys, torch.exp(lb) * nxt


def _chunked(x: Tensor, c: Tensor | float) -> Tensor:
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if not isinstance(c, Tensor) and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad):
        # (CPU only: CUDA matmuls may run in TF32 when a user enables it, which
        # would cost three decimal digits; the GPU paths were not measured here)
        return _gemm_const(x2.contiguous(), c).view(x.shape)
    if torch.is_grad_enabled() and (x.requires_grad or (isinstance(c, Tensor) and c.requires_grad)):
        # the in-place scan below is not differentiable; the same decomposition
        # out of place (the compiled backend's code, run eagerly) is
        c2 = c.reshape(-1, n) if isinstance(c, Tensor) else torch.full_like(x2, c)
        return _blocked_functional(x2, c2).reshape(x.shape)
    # Pad to whole blocks here, inside the one transposing copy each input needs
    # anyway (a copy, never a view: the scan then works in place).
    blk = _block_len(n)
    rows = n if n <= 64 else -(-n // blk) * blk
    xt = _to_time_major(x2, rows, 0)
    ct = _to_time_major(c.reshape(-1, n), rows, 1) if isinstance(c, Tensor) else c
    yt = _tm_scan_(xt, ct, blk)[:n]
    # (fusing the fix-up with this copy, addcmul(out=<transposed view>), measured
    # 5x slower than the two passes: TensorIterator's strided writes are poor)
    out = torch.empty_like(x2)
    out.copy_(yt.t())
    return out.view(x.shape)


# ---------------------------------------------------------- compiled (functional)


def _blocked_functional(x: Tensor, c: Tensor) -> Tensor:
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
    b = torch.prod(c3, -1, dtype=_CARRY_DTYPE)
    ys = _blocked_functional(u[-1].to(_CARRY_DTYPE), b).to(x.dtype)  # block starts [N, K]
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
            fn = torch.compile(_blocked_functional, dynamic=True, fullgraph=True)
            _COMPILED[key] = fn
    return fn


def _plain(t: Tensor) -> Tensor:
    # detach() (when no gradient is needed) makes it not a view for dynamo, whose
    # guards on a view's base would recompile for every leading-dims layout
    return t if (t.requires_grad and torch.is_grad_enabled()) else t.detach()


def _compiled(x: Tensor, c: Tensor | float) -> Tensor:
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


_BACKEND_FNS: dict[str, Callable[[Tensor, Tensor | float], Tensor]] = {
    "loop": _loop,
    "chunked": _chunked,
    "compiled": _compiled,
}


@typechecked
def reverse_scan(
    x: Float[Tensor, "*batch time"],
    c: Float[Tensor, "*batch time"] | float,
    *,
    mask: Shaped[Tensor, "*batch time"] | None = None,
    backend: str = "auto",
) -> Float[Tensor, "*batch time"]:
    r"""Solve ``y[t] = x[t] + c[t] * y[t+1]`` backwards in time, with ``y[T] = 0``.

    .. math::  y_t = \sum_{s \ge t} \Big(\prod_{u=t}^{s-1} c_u\Big) x_s

    The generalized-advantage recursion of Schulman et al., "High-Dimensional
    Continuous Control Using Generalized Advantage Estimation" (2016), eq. 16,
    written for any coefficients.

    Args:
        x: the inputs ``[*batch, time]``.
        c: a float (the same coefficient at every step) or a tensor of exactly
            ``x``'s shape. Episode cuts: ``c = 0``.
        mask: optional bool (or 0/1) tensor of ``x``'s shape. Steps where it is 0 are
            skipped: the recurrence runs over the masked-in steps only (``t+1`` is the
            next masked-in step) and the result is 0 at masked-out steps, exactly as
            packing each row, scanning and scattering back. With a float ``c`` on CPU
            this takes the masked constant-coefficient path (no index operations).
        backend: one of :data:`BACKENDS` (see the module docstring).

    Returns:
        ``y`` with ``x``'s shape and dtype. Accumulation happens in at least
        float32 (bfloat16 and float16 inputs are accumulated in float32).

    >>> import torch
    >>> reverse_scan(torch.tensor([1.0, 1.0, 1.0]), 0.5)
    tensor([1.7500, 1.5000, 1.0000])
    >>> x = torch.ones(2, 100)
    >>> y = reverse_scan(x, 0.9, backend="chunked")
    >>> torch.allclose(y, reverse_scan(x, 0.9, backend="loop"))
    True
    >>> reverse_scan(torch.tensor([1.0, 5.0, 1.0]), 0.5, mask=torch.tensor([True, False, True]))
    tensor([1.5000, 0.0000, 1.0000])
    """
    if mask is None:
        return _scan(x, c, backend)
    # (the shapes were checked against x's by the signature)
    return _scan_masked(x, c, as_bool("mask", mask).to(x.device), backend)


def _scan_masked(x: Tensor, c: Tensor | float, mask: Tensor, backend: str) -> Tensor:
    """The recurrence over masked-in steps only, zeros at masked-out steps."""
    check_choice("backend", backend, BACKENDS)
    if x.shape[-1] == 0 or x.numel() == 0:
        return x.clone()
    dt = acc_dtype(x.dtype)
    n = x.shape[-1]
    c_acc = c if isinstance(c, Tensor) else round_coef(c, dt)
    if masked_const_applies(x, c_acc, backend):
        mf = mask_floats(mask.reshape(-1, n), dt)
        x2 = x.reshape(-1, n).to(dt, memory_format=torch.contiguous_format, copy=True)
        y, finite = masked_const_scan_(x2, mf, c_acc)
        if finite:
            return y.reshape(x.shape).to(x.dtype)
        # a NaN/inf somewhere, possibly at a skipped step (where the definition ignores
        # it but a weight of 0 times inf is NaN): the general path below is exact
    # the estimators' encoding of skipped steps (x = 0, c = 1), in the accumulation dtype
    xs, cs = through(x.to(dt), c_acc, mask)
    return masked_out(_scan(xs, cs, backend), mask).to(x.dtype)


def _scan(x: Tensor, c: Tensor | float, backend: str = "auto") -> Tensor:
    """:func:`reverse_scan` without the shape check: the estimators' entry (already checked)."""
    check_choice("backend", backend, BACKENDS)
    if isinstance(c, Tensor) and c.shape != x.shape:
        raise ValueError(
            f"c must be a float or have x's shape {tuple(x.shape)}, got {tuple(c.shape)}"
        )
    if x.shape[-1] == 0 or x.numel() == 0:
        return x.clone()
    dt = acc_dtype(x.dtype)
    xa = x.to(dt)
    if isinstance(c, Tensor):
        ca: Tensor | float = c.to(device=x.device, dtype=dt)
    else:
        ca = round_coef(c, dt)
    name = _auto_backend(x, ca) if backend == "auto" else backend
    y = _BACKEND_FNS[name](xa, ca)
    return y.to(x.dtype)


def round_coef(c: float, dtype: torch.dtype) -> float:
    """A float coefficient rounded to the accumulation dtype once, so every backend
    (and every level of the blocked ones) uses the same number."""
    return float(torch.tensor(float(c), dtype=dtype))
