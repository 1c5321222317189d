r"""On-policy return and advantage estimators: GAE, TD(λ), discounted (Monte Carlo) and n-step.

All take ``[*batch, time]`` tensors (time last, any leading batch dims) and share
the conventions of DESIGN.md:

* ``gamma`` / ``lamda`` are floats or per-step tensors of the rewards' shape;
* ``bootstrap_value`` ``[*batch]`` is the value after the last step (default 0);
* ``terminated[t]`` zeroes the bootstrap of step ``t``; ``done[t]`` cuts the trace
  at ``t`` (TorchRL's split; ``terminated`` defaults to ``done``, and a terminated
  step also cuts the trace). At a ``done`` but not ``terminated`` step inside a
  row (a truncation), the bootstrap is the next step's value in the row;
* ``mask[t] = 0`` marks a non-decision step: the result equals packing the
  masked-in steps, running the estimator and scattering back, with zeros at
  masked-out positions.

Accumulation is in float32 at least; results have the inputs' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl2fx._typing import Float, Shaped, check_range, typechecked
from rl2fx.returns import _common as C
from rl2fx.returns._workspace import scratch
from rl2fx.returns.registry import register_estimator
from rl2fx.returns.scan import (
    _scan,
    mask_floats,
    masked_const_applies,
    masked_const_ok,
    masked_const_scan_,
    round_coef,
    scan_const,
)

__all__ = ["gae", "td_lambda", "discounted", "n_step"]

# Below this lamda the masked constant-discount path would lose more than ~3 float32
# roundings of |V| to the final subtraction K - V / lamda; it packs instead.
# Masked GAE, float32, LLM-style mask, 2 threads of the 2-core Xeon (ms, medians):
#
#   batch x T   masked scan (K form)   packing   loop backend
#   1 x 8             0.17              0.25        0.20
#   256 x 16          0.35              0.60        0.33
#   256 x 256         0.46              0.86        3.04
#   256 x 1024        1.22              1.94       10.5
#   256 x 4096        4.6               7.4        72
#
# so it is taken at every T (the loop ties only at T = 16).
_MASKED_MIN_LAMDA = 0.5


@register_estimator("gae", needs_values=True, defaults={"gamma": 0.99, "lamda": 0.95})
@typechecked
def gae(
    rewards: Float[Tensor, "*batch time"],
    values: Float[Tensor, "*batch time"],
    *,
    gamma: float | int | Float[Tensor, "*batch time"],
    lamda: float | int | Float[Tensor, "*batch time"],
    bootstrap_value: Float[Tensor, "*batch"] | None = None,
    mask: Shaped[Tensor, "*batch time"] | None = None,
    terminated: Shaped[Tensor, "*batch time"] | None = None,
    done: Shaped[Tensor, "*batch time"] | None = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
) -> tuple[Float[Tensor, "*batch time"], Float[Tensor, "*batch time"]]:
    r"""Generalized Advantage Estimation (Schulman et al. 2015, arXiv:1506.02438).

    .. math::

        \delta_t = r_t + \gamma_t (1 - \mathrm{term}_t) V_{t+1} - V_t, \qquad
        A_t = \delta_t + \gamma_t \lambda_t (1 - \mathrm{done}_t) A_{t+1}, \qquad
        R_t = A_t + V_t

    with :math:`V_T` = ``bootstrap_value`` and :math:`A_T = 0`. Under a mask,
    :math:`t+1` means the next masked-in step.

    Returns ``(advantages, returns)``; ``returns`` are the λ-returns (value targets).

    >>> import torch
    >>> adv, ret = gae(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]), gamma=1.0, lamda=1.0)
    >>> adv, ret
    (tensor([0.5000, 0.5000]), tensor([1., 1.]))
    """
    dt = C.acc_dtype(rewards.dtype, values.dtype)
    out = C.out_dtype(rewards.dtype, values.dtype)
    adv, ret = _gae(
        rewards, values, gamma, lamda, bootstrap_value, mask, terminated, done, backend, dt,
        allow_nonfinite,
    )
    return adv.to(out), ret.to(out)


def _gae(
    rewards, values, gamma, lamda, bootstrap_value, mask, terminated, done, backend, dt,
    allow_nonfinite,
):
    r = rewards.to(dt)
    v = values.to(dt)
    g = C.per_step_or_float("gamma", gamma, r, dt)
    lam = C.per_step_or_float("lamda", lamda, r, dt)
    m = C.as_bool("mask", mask)
    d = C.as_bool("done", done)
    term = C.as_bool("terminated", terminated)
    boot = C.bootstrap(bootstrap_value, r, dt)
    inputs = dict(rewards=rewards, values=values, bootstrap_value=bootstrap_value)
    if (
        d is None
        and term is None
        and isinstance(g, float)
        and isinstance(lam, float)
        and r.device.type == "cpu"
        and backend in ("auto", "chunked")
        and r.shape[-1] > 0
        and not (torch.is_grad_enabled() and (r.requires_grad or v.requires_grad))
    ):
        return _gae_const(r, v, boot, g, lam, m, backend, allow_nonfinite, inputs)
    C.check_all_finite(allow_nonfinite, **inputs)
    if term is None:
        term = d  # TorchRL: terminated defaults to done
    elif d is not None:
        d = d | term  # a terminated episode is over: its trace is cut too
    else:
        d = term
    nxt = None if m is None else C.next_index(m)
    v_next = C.next_along(v, boot, nxt)
    g_boot = g if term is None else torch.where(term, 0.0, C.as_tensor(g, r))
    # float discounts stay Python floats: one fused add, and the scan's
    # constant-coefficient path (no c tensor at all) when nothing cuts the trace
    delta = torch.add(r, v_next, alpha=g_boot) if isinstance(g_boot, float) else r + g_boot * v_next
    delta.sub_(v)
    c = g * lam
    if d is not None:
        c = torch.where(d, 0.0, C.as_tensor(c, r))
    x, c = C.through(delta, c, m)
    adv = _scan(x, c, backend)
    ret = adv + v
    return C.masked_out(adv, m), C.masked_out(ret, m)


def _gae_const(r, v, boot, g: float, lam: float, m, backend, allow_nonfinite, inputs):
    r"""GAE with constant ``gamma``, ``lamda`` and no trace cuts, on CPU: the scan's
    constant-coefficient path (one BLAS product per level) with or without a mask.

    Solved in the λ-return form (Sutton & Barto 2018, eq. 12.18),

    .. math::  G_t = r_t + \gamma (1 - \lambda) V_{t+1} + \gamma\lambda G_{t+1},
               \qquad A_t = G_t - V_t,

    which needs one pass to form the scan's input instead of two for
    :math:`\delta_t`; float32 errors against float64 were measured equal or
    smaller (e.g. 1.7e-7 vs 3.4e-7 of max|A| at 64 x 4096).

    With a mask and :math:`\lambda \ge 1/2`, the value of the next decision is never
    looked up: :math:`K_t = G_t + a V_t` with :math:`a = (1 - \lambda)/\lambda` obeys

    .. math::  K_t = (r_t + a V_t) + \gamma\lambda K_{\text{next}(t)}, \qquad
               K_T = V_T / \lambda,

    so :math:`A_t = K_t - V_t/\lambda` and :math:`G_t = K_t - a V_t` come from one masked
    scan with a constant coefficient (:func:`~rl2fx.returns.scan.scan_masked_const`).
    Subtracting :math:`V_t/\lambda` costs about :math:`(1 + 1/\lambda)` float32 roundings
    of :math:`|V|`, hence the bound on :math:`\lambda`. Otherwise (and to redo a result
    that overflowed) each row's masked-in steps are packed to the left (one
    cumulative count, one scatter per input, one gather per output; no loop over
    rows), which is exactly the definition "pack, run, scatter back".
    """
    shape = r.shape
    T = shape[-1]
    c = round_coef(g * lam, r.dtype)
    g_v = g * (1.0 - lam)
    r2, v2, b1 = r.reshape(-1, T), v.reshape(-1, T), boot.reshape(-1)
    N = r2.shape[0]
    if m is None:
        x = scratch("gae-x", (N, T), r.dtype, r.device)
        torch.add(r2[:, :-1], v2[:, 1:], alpha=g_v, out=x[:, :-1])
        torch.add(r2[:, -1], b1, alpha=g, out=x[:, -1])  # G_T = V_T = bootstrap
        ret = scan_const(x, c)
        adv = ret - v2
        if not allow_nonfinite and not bool(torch.isfinite(adv.sum())):
            # every input reaches A, so a finite A proves them finite; else find (and
            # name) the culprit, or go on if a sum of finite numbers merely overflowed
            C.check_all_finite(False, **inputs)
        return adv.view(shape), ret.view(shape)
    m2 = m.reshape(-1, T)
    if lam >= _MASKED_MIN_LAMDA and masked_const_ok(c):
        a = (1.0 - lam) / lam
        # K_t = G_t + a V_t obeys K_t = (r_t + a V_t) + c K_{t+1} along the decisions,
        # with K_T = V_T / lamda: no "value at the next decision" to look up
        x = torch.add(r2, v2, alpha=a, out=scratch("gae-x", (N, T), r.dtype, r.device))
        mf = mask_floats(m2, r.dtype)
        k, finite = masked_const_scan_(x, mf, c, b1 / lam)
        if finite:
            adv = torch.addcmul(k, v2, mf, value=-1.0 / lam)  # A = K - V / lamda
            ret = torch.addcmul(k, v2, mf, value=-a)  # G = K - a V
            return adv.view(shape), ret.view(shape)
        # non-finite: the check below names a non-finite input, or (all finite: an
        # overflow somewhere, possibly at a masked-out step) it is redone exactly packed
    C.check_all_finite(allow_nonfinite, **inputs)
    plan = C.pack_plan(m2)
    x = C.pack(r2, plan, T, "gae-r")
    vp = C.pack(v2, plan, T + 1, "gae-v")
    vp[torch.arange(N), plan.count] = b1  # V after each row's last step
    x.add_(vp[:, 1:], alpha=g_v)
    # G after the last step is the bootstrap: its share g*lam*V_T enters the last step
    full = (plan.count > 0).nonzero().squeeze(1)
    last = plan.count[full] - 1
    x[full, last] += c * b1[full]
    ret = scan_const(x, c, out=scratch("gae-ret", (N, T), r.dtype, r.device))
    adv = torch.sub(ret, vp[:, :T], out=vp[:, :T])  # G - V, in place of the packed values
    return C.unpack(adv, plan).view(shape), C.unpack(ret, plan).view(shape)


@typechecked
def td_lambda(
    rewards: Float[Tensor, "*batch time"],
    values: Float[Tensor, "*batch time"],
    *,
    gamma: float | int | Float[Tensor, "*batch time"],
    lamda: float | int | Float[Tensor, "*batch time"],
    bootstrap_value: Float[Tensor, "*batch"] | None = None,
    mask: Shaped[Tensor, "*batch time"] | None = None,
    terminated: Shaped[Tensor, "*batch time"] | None = None,
    done: Shaped[Tensor, "*batch time"] | None = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
) -> Float[Tensor, "*batch time"]:
    r"""TD(λ) λ-returns (Sutton 1988; Sutton & Barto 2018, eq. 12.18).

    .. math::

        G^\lambda_t = r_t + \gamma_t (1 - \mathrm{term}_t)
            \big[(1 - \lambda_t) V_{t+1} + \lambda_t G^\lambda_{t+1}\big]

    with :math:`G^\lambda_T` = ``bootstrap_value`` (a ``done`` step uses
    :math:`V_{t+1}` instead of :math:`G^\lambda_{t+1}`). Equal to GAE advantages
    plus values. :math:`\lambda = 1` gives the Monte Carlo return,
    :math:`\lambda = 0` the one-step TD target.

    >>> import torch
    >>> td_lambda(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 4.0]), gamma=0.5, lamda=0.5)
    tensor([2.2500, 1.0000])
    """
    dt = C.acc_dtype(rewards.dtype, values.dtype)
    _, ret = _gae(
        rewards, values, gamma, lamda, bootstrap_value, mask, terminated, done, backend, dt,
        allow_nonfinite,
    )
    return ret.to(C.out_dtype(rewards.dtype, values.dtype))


@register_estimator("td_lambda", needs_values=True, defaults={"gamma": 0.99, "lamda": 0.95})
def _td_lambda_estimator(
    rewards: Tensor,
    values: Tensor,
    *,
    gamma: float | Tensor,
    lamda: float | Tensor,
    bootstrap_value: Tensor | None = None,
    mask: Tensor | None = None,
    terminated: Tensor | None = None,
    done: Tensor | None = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
) -> tuple[Tensor, Tensor]:
    """TD(λ) as an estimator: the λ-returns as targets, ``returns - values`` as advantages."""
    ret = td_lambda(rewards, values, gamma=gamma, lamda=lamda, bootstrap_value=bootstrap_value, mask=mask,
                    terminated=terminated, done=done, backend=backend, allow_nonfinite=allow_nonfinite)
    return C.masked_out(ret - values, C.as_bool("mask", mask)).to(ret.dtype), ret


@typechecked
def discounted(
    rewards: Float[Tensor, "*batch time"],
    *,
    gamma: float | int | Float[Tensor, "*batch time"],
    bootstrap_value: Float[Tensor, "*batch"] | None = None,
    mask: Shaped[Tensor, "*batch time"] | None = None,
    done: Shaped[Tensor, "*batch time"] | None = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
) -> Float[Tensor, "*batch time"]:
    r"""Discounted (Monte Carlo) return, reward-to-go (Sutton & Barto 2018, eq. 3.8).

    .. math::

        G_t = r_t + \gamma_t (1 - \mathrm{done}_t) G_{t+1}, \qquad G_T = \text{bootstrap\_value}

    >>> import torch
    >>> discounted(torch.tensor([1.0, 0.0, 2.0]), gamma=0.5)
    tensor([1.5000, 1.0000, 2.0000])
    """
    dt = C.acc_dtype(rewards.dtype)
    C.check_all_finite(allow_nonfinite, rewards=rewards, bootstrap_value=bootstrap_value)
    ret = _discounted(rewards, gamma, bootstrap_value, mask, done, backend, dt)
    return ret.to(rewards.dtype)


def _discounted(rewards, gamma, bootstrap_value, mask, done, backend, dt):
    r = rewards.to(dt)
    g = C.per_step_or_float("gamma", gamma, r, dt)
    m = C.as_bool("mask", mask)
    d = C.as_bool("done", done)
    boot = C.bootstrap(bootstrap_value, r, dt)
    if m is not None and d is None and masked_const_applies(r, g, backend):
        # one constant discount along the decisions: the masked constant-c scan,
        # with G_T = bootstrap as its end value
        T = r.shape[-1]
        x = r.reshape(-1, T).clone(memory_format=torch.contiguous_format)
        mf = mask_floats(m.reshape(-1, T), dt)
        y, finite = masked_const_scan_(x, mf, g, boot.reshape(-1))
        if finite:
            return y.view(r.shape)
        # non-finite (allowed) input, possibly at a skipped step: the exact general path
    nxt = None if m is None else C.next_index(m)
    c = g if d is None else torch.where(d, 0.0, C.as_tensor(g, r))
    # the scan ends with y_T = 0, so the bootstrap enters as extra reward at each row's last step
    last = C.is_last(m, r, nxt)
    x = r + torch.where(last, c * boot.unsqueeze(-1), 0.0)
    x, c = C.through(x, c, m)
    return C.masked_out(_scan(x, c, backend), m)


@typechecked
def n_step(
    rewards: Float[Tensor, "*batch time"],
    values: Float[Tensor, "*batch time"],
    *,
    gamma: float | int | Float[Tensor, "*batch time"],
    n_steps: int,
    bootstrap_value: Float[Tensor, "*batch"] | None = None,
    mask: Shaped[Tensor, "*batch time"] | None = None,
    allow_nonfinite: bool = False,
) -> Float[Tensor, "*batch time"]:
    r"""n-step bootstrapped return (Sutton & Barto 2018, eq. 7.1; rlax ``n_step_bootstrapped_returns``).

    .. math::

        G^{(n)}_t = \sum_{k=0}^{n-1} \Big(\prod_{j<k} \gamma_{t+j}\Big) r_{t+k}
                  + \Big(\prod_{j<n} \gamma_{t+j}\Big) V_{t+n}

    truncated at the end of the row, where :math:`V_T` = ``bootstrap_value``
    (so :math:`n \ge T` gives the discounted return). Under a mask, steps are
    counted over masked-in steps only.

    >>> import torch
    >>> n_step(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.0, 2.0, 4.0]), gamma=0.5, n_steps=1)
    tensor([2., 3., 1.])
    """
    check_range("n_steps", n_steps, 1, None)
    dt = C.acc_dtype(rewards.dtype, values.dtype)
    C.check_all_finite(allow_nonfinite, rewards=rewards, values=values, bootstrap_value=bootstrap_value)
    out = _n_step(rewards.to(dt), values.to(dt), gamma, n_steps, bootstrap_value, mask, dt)
    return out.to(C.out_dtype(rewards.dtype, values.dtype))


def _n_step(r: Tensor, tail: Tensor, gamma, n_steps: int, bootstrap_value, mask, dt) -> Tensor:
    """Sum ``n`` rewards along the masked-in chain, then bootstrap with ``tail`` (``V`` or another estimate).

    The loop runs over the ``n`` offsets (at most ``T``), never over sequences:
    ``idx`` walks every start position one masked-in step forward at a time.
    """
    T = r.shape[-1]
    g = C.per_step("gamma", gamma, r, dt)
    m = C.as_bool("mask", mask)
    boot = C.bootstrap(bootstrap_value, r, dt)
    steps = torch.arange(T, device=r.device).expand(r.shape)
    nxt = steps + 1 if m is None else C.next_index(m)
    sink = torch.full_like(nxt[..., :1], T)
    nxt_pad = torch.cat([nxt, sink], dim=-1)  # index T (past the end) maps to itself
    r_pad = torch.cat([C.masked_out(r, m), torch.zeros_like(r[..., :1])], dim=-1)
    g_pad = torch.cat([g, torch.ones_like(g[..., :1])], dim=-1)
    tail_pad = torch.cat([tail, boot.unsqueeze(-1)], dim=-1)
    idx = steps
    acc = torch.zeros_like(r)
    disc = torch.ones_like(r)
    for _ in range(min(n_steps, T)):
        acc = acc + disc * r_pad.gather(-1, idx)
        disc = disc * g_pad.gather(-1, idx)
        idx = nxt_pad.gather(-1, idx)
    return C.masked_out(acc + disc * tail_pad.gather(-1, idx), m)
