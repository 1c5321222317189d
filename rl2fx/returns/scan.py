r"""The reverse linear recurrence every estimator in :mod:`rl2fx.returns` reduces to,
and the one place that decides how it is computed.

.. math::  y_t = x_t + c_t \, y_{t+1}, \qquad y_T = 0

over the last (time) axis, with any number of leading batch dimensions.
GAE is ``x = δ``, ``c = γλ``; discounted returns are ``x = r``, ``c = γ``;
V-trace and Retrace likewise (see their modules). Masked-out steps are skipped
(``t+1`` is the next masked-in step), and episode cuts are ``c = 0``.

Backends (``BACKENDS``; the methods live in :mod:`rl2fx.returns._backends`)
---------------------------------------------------------------------------
``loop``
    The reference: one pass backwards over time. ``T`` Python steps; the
    fastest for short ``T``.
``chunked``
    The two-level blocked scan, about ``2L + 2T/L`` tensor operations
    (:mod:`~rl2fx.returns._backends.blocked`). On CPU a float ``c`` runs as matrix
    products instead (:mod:`~rl2fx.returns._backends.gemm`); with gradients, the
    out-of-place form of the same decomposition.
``compiled``
    The same block decomposition through :func:`torch.compile` with dynamic shapes
    (:mod:`~rl2fx.returns._backends.compiled`). The first call per device, dtype
    and recursion depth pays the compile (tens of seconds on CPU).
``auto``
    Picks by device and ``T`` (``_AUTO_TABLE``, from the timings in
    docs/performance.md). ``mask=`` with a float ``c`` on CPU takes the masked
    constant-coefficient path (:mod:`~rl2fx.returns._backends.masked`).

Limits: ``c > 1`` is allowed, but the blocked backends form products of ``c``
over spans of up to ``T`` steps at the coarser levels; if such a product
overflows (for example ``c = 1.01`` over 9000 steps in float32) the result holds
``inf``/``nan`` where ``loop`` may still be finite. ``auto`` picks ``loop`` for a
float ``c > 1``; pass ``backend="loop"`` for growing per-step ``c`` tensors.
Non-finite inputs are not checked here (the estimators check them); a NaN
spreads to every earlier step in ``loop`` and additionally within its block in
the blocked backends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from rl2fx._typing import Float, Shaped, check_choice, typechecked
from rl2fx.returns._backends import gae_const, masked
from rl2fx.returns._backends.blocked import blocked
from rl2fx.returns._backends.compiled import blocked_functional, compiled
from rl2fx.returns._backends.gemm import scan_const
from rl2fx.returns._backends.loop import loop
from rl2fx.returns._common import (
    acc_dtype,
    as_bool,
    check_all_finite,
    is_last,
    masked_out,
    next_index,
    through,
)

__all__ = ["BACKENDS", "reverse_scan"]

#: Every accepted value of ``backend``.
BACKENDS: tuple[str, ...] = ("auto", "loop", "chunked", "compiled")

# ---------------------------------------------------------------- the rules
#
# Per-step c, by device: ((max T, backend), ...) checked in order. loop costs a
# few us of Python per step, chunked ~2(L + T/L) steps plus two transposing
# copies. On CPU the compiled kernel's steady-state gain is far smaller than its
# first-call compile, so CPU never picks it; on CUDA every eager step is a kernel
# launch and the fused kernels are the way to the bandwidth floor. dtype does not
# enter: bfloat16/float16 are scanned as float32, float64 costs every backend alike.
_AUTO_TABLE: dict[str, tuple[tuple[int, str], ...]] = {
    "cpu": ((48, "loop"), (1 << 62, "chunked")),
    "cuda": ((16, "loop"), (256, "chunked"), (1 << 62, "compiled")),
}
# Backends whose CPU work may take the constant-coefficient paths (gemm, masked, GAE's).
_CONST_OK = ("auto", "chunked")
# Below this lamda GAE's masked K form would lose more than ~3 float32 roundings
# of |V| to its final subtraction K - V / lamda; it packs instead.
_MASKED_MIN_LAMDA = 0.5


def _needs_grad(x: Tensor, c: Tensor | float = 0.0) -> bool:
    """Whether autograd will track a result of ``x`` (and ``c``): the in-place paths must not run."""
    return torch.is_grad_enabled() and (x.requires_grad or (isinstance(c, Tensor) and c.requires_grad))


def _auto_backend(x: Tensor, c: Tensor | float) -> str:
    if not isinstance(c, Tensor):
        if abs(c) > 1.0:
            return "loop"  # growing recurrence: the only backend with no span products
        if x.device.type == "cpu":
            return "chunked"  # its matrix-product path wins at every T
    rules = _AUTO_TABLE.get(x.device.type, _AUTO_TABLE["cpu"])
    t = x.shape[-1]
    for max_t, name in rules:
        if t <= max_t:
            return name
    return rules[-1][1]


def _chunked(x: Tensor, c: Tensor | float) -> Tensor:
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if not isinstance(c, Tensor) and x.device.type == "cpu" and not _needs_grad(x):
        return scan_const(x2.contiguous(), c=c).view(x.shape)
    if _needs_grad(x, c):
        # the eager blocked scan works in place; the functional form differentiates
        c2 = c.reshape(-1, n) if isinstance(c, Tensor) else torch.full_like(x2, c)
        return blocked_functional(x2, c2).reshape(x.shape)
    return blocked(x2, c).view(x.shape)


_BACKEND_FNS: dict[str, Callable[[Tensor, Tensor | float], Tensor]] = {
    "loop": loop,
    "chunked": _chunked,
    "compiled": compiled,
}


def _masked_const_applies(x: Tensor, c: Tensor | float, backend: str) -> bool:
    """A masked scan with a float ``c`` (already rounded) takes the masked constant path:
    on CPU, under ``auto``/``chunked``, without gradients (the path works in place)."""
    return (
        not isinstance(c, Tensor)
        and masked.masked_const_ok(c)
        and x.device.type == "cpu"
        and backend in _CONST_OK
        and x.shape[-1] > 0
        and not _needs_grad(x)
    )


def round_coef(c: float, dtype: torch.dtype) -> float:
    """A float coefficient rounded to the accumulation dtype once, so every backend
    (and every level of the blocked ones) uses the same number."""
    return float(torch.tensor(float(c), dtype=dtype))


# ---------------------------------------------------------- the entry points


def scan(
    x: Tensor, c: Tensor | float, *, mask: Tensor | None = None, tail: Tensor | None = None, backend: str = "auto"
) -> Tensor:
    """The estimators' scan (shapes already checked): ``y_t = x_t + c_t y_{t+1}`` over the
    masked-in steps of ``x``, ``y_T = tail`` (``[*batch]``, default 0), zeros at masked-out steps.

    ``mask`` is a bool tensor of ``x``'s shape or ``None``; ``c`` a float or a tensor of
    ``x``'s shape. The result has ``x``'s dtype, accumulated in at least float32.
    """
    check_choice("backend", backend, BACKENDS)
    if isinstance(c, Tensor) and c.shape != x.shape:
        raise ValueError(f"c must be a float or have x's shape {tuple(x.shape)}, got {tuple(c.shape)}")
    if x.shape[-1] == 0 or x.numel() == 0:
        return x.clone()
    dt = acc_dtype(x.dtype)
    xa = x.to(dt)
    ca = c.to(device=x.device, dtype=dt) if isinstance(c, Tensor) else round_coef(c, dt)
    if mask is not None and _masked_const_applies(xa, ca, backend):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).to(dt, memory_format=torch.contiguous_format, copy=True)
        mf = masked.mask_floats(mask.reshape(-1, n), dt)
        y, finite = masked.masked_const_scan_(x2, mf, c=ca, tail=None if tail is None else tail.reshape(-1))
        if finite:
            return y.view(x.shape).to(x.dtype)
        # a NaN/inf somewhere, possibly at a skipped step, where the definition ignores it
        # but a weight of 0 times inf is NaN. With the skipped steps zeroed the fast path
        # gives, bit for bit, what any finite value there gives (a masked-out value must not
        # change the result, not even by rounding); a non-finite masked-in value or tail
        # takes the general path below
        x3 = torch.where(mask.reshape(-1, n), x.reshape(-1, n).to(dt), torch.zeros((), dtype=dt, device=x.device))
        if bool(torch.isfinite(x3).all()):
            y, finite = masked.masked_const_scan_(x3, mf, c=ca, tail=None if tail is None else tail.reshape(-1))
            if finite:
                return y.view(x.shape).to(x.dtype)
    if tail is not None:
        # the scan ends with y_T = 0, so the tail enters as extra input at each row's last step
        last = is_last(mask, like=xa, nxt=None if mask is None else next_index(mask))
        xa = xa + torch.where(last, ca * tail.unsqueeze(-1), 0.0)
    # masked-out steps made transparent: x = 0, c = 1
    xs, cs = through(xa, ca, mask=mask)
    name = _auto_backend(xs, cs) if backend == "auto" else backend
    return masked_out(_BACKEND_FNS[name](xs, cs), mask).to(x.dtype)


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
        Differentiable with every backend.

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
    m = None if mask is None else as_bool("mask", mask).to(x.device)
    return scan(x, c, mask=m, backend=backend)


def gae_fast_path(
    r: Tensor,
    v: Tensor,
    *,
    boot: Tensor,
    gamma: Tensor | float,
    lamda: Tensor | float,
    mask: Tensor | None,
    cut: Tensor | None,
    backend: str,
    allow_nonfinite: bool,
    inputs: Mapping[str, Tensor | None],
) -> tuple[Tensor, Tensor] | None:
    """GAE's ``(advantages, returns)`` by a constant-discount CPU path
    (:mod:`~rl2fx.returns._backends.gae_const`), or ``None`` where none applies.

    ``r, v`` are in the accumulation dtype, ``gamma``/``lamda`` already rounded to it,
    ``cut`` the resolved trace cuts. Applies to float ``gamma`` and ``lamda``, no
    cuts, CPU, ``auto``/``chunked``, no gradients. ``inputs`` are the caller's
    tensors by argument name, checked for finiteness (unless ``allow_nonfinite``)
    only when the result is not finite or the path cannot tell.
    """
    if not (
        cut is None
        and isinstance(gamma, float)
        and isinstance(lamda, float)
        and r.device.type == "cpu"
        and backend in _CONST_OK
        and r.shape[-1] > 0
        and not _needs_grad(r, v)
    ):
        return None
    shape, T = r.shape, r.shape[-1]
    c = round_coef(gamma * lamda, r.dtype)
    r2, v2, b1 = r.reshape(-1, T), v.reshape(-1, T), boot.reshape(-1)
    if mask is None:
        adv, ret = gae_const.unmasked(r2, v2, boot=b1, gamma=gamma, lamda=lamda, c=c)
        if not allow_nonfinite and not bool(torch.isfinite(adv.sum())):
            # every input reaches A, so a finite A proves them finite; else find (and
            # name) the culprit, or go on if a sum of finite numbers merely overflowed
            check_all_finite(False, **inputs)
        return adv.view(shape), ret.view(shape)
    m2 = mask.reshape(-1, T)
    if lamda >= _MASKED_MIN_LAMDA and masked.masked_const_ok(c):
        out = gae_const.k_form(r2, v2, mask=m2, boot=b1, lamda=lamda, c=c)
        if out is None and allow_nonfinite:
            # not finite, and allowed: with the masked-out steps zeroed the same path gives, bit for bit,
            # what finite values there give (a masked-out value must not change the result,
            # not even by rounding); a non-finite masked-in value goes on to the checks below
            zero = torch.zeros((), dtype=r2.dtype, device=r2.device)
            r3, v3 = torch.where(m2, r2, zero), torch.where(m2, v2, zero)
            if bool(torch.isfinite(r3).all()) and bool(torch.isfinite(v3).all()):
                out = gae_const.k_form(r3, v3, mask=m2, boot=b1, lamda=lamda, c=c)
        if out is not None:
            return out[0].view(shape), out[1].view(shape)
        # not finite: the check below names a non-finite input, or (all finite: an
        # overflow somewhere, possibly at a masked-out step) it is redone exactly packed
    check_all_finite(allow_nonfinite, **inputs)
    adv, ret = gae_const.packed(r2, v2, mask=m2, boot=b1, gamma=gamma, lamda=lamda, c=c)
    return adv.view(shape), ret.view(shape)
