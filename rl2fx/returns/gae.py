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
from rl2fx.returns import scan as S
from rl2fx.returns.registry import register_estimator

__all__ = ["gae", "td_lambda", "discounted", "n_step"]


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
    adv, ret = _gae(rewards, values, gamma=gamma, lamda=lamda, bootstrap_value=bootstrap_value, mask=mask,
                    terminated=terminated, done=done, backend=backend, allow_nonfinite=allow_nonfinite)
    out = C.out_dtype(rewards.dtype, values.dtype)
    return adv.to(out), ret.to(out)


def _gae(
    rewards: Tensor,
    values: Tensor,
    *,
    gamma: float | Tensor,
    lamda: float | Tensor,
    bootstrap_value: Tensor | None,
    mask: Tensor | None,
    terminated: Tensor | None,
    done: Tensor | None,
    backend: str,
    allow_nonfinite: bool,
) -> tuple[Tensor, Tensor]:
    """GAE's ``(advantages, returns)`` in the accumulation dtype: :func:`gae` without the checks."""
    dt = C.acc_dtype(rewards.dtype, values.dtype)
    r, v = rewards.to(dt), values.to(dt)
    g = C.per_step_or_float("gamma", gamma, like=r, dtype=dt)
    lam = C.per_step_or_float("lamda", lamda, like=r, dtype=dt)
    m = C.as_bool("mask", mask)
    term, cut = C.resolve_cuts(terminated=terminated, done=done)
    boot = C.bootstrap(bootstrap_value, like=r, dtype=dt)
    inputs = dict(rewards=rewards, values=values, bootstrap_value=bootstrap_value)
    fast = S.gae_fast_path(r, v, boot=boot, gamma=g, lamda=lam, mask=m, cut=cut, backend=backend,
                           allow_nonfinite=allow_nonfinite, inputs=inputs)
    if fast is not None:
        return fast
    C.check_all_finite(allow_nonfinite, **inputs)
    # delta_t = r_t + gamma_t (1 - term_t) V_next(t) - V_t
    v_next = C.next_along(v, tail=boot, nxt=None if m is None else C.next_index(m))
    g_boot = g if term is None else torch.where(term, 0.0, C.as_tensor(g, r))
    # a float discount stays a Python float: one fused add
    delta = torch.add(r, v_next, alpha=g_boot) if isinstance(g_boot, float) else r + g_boot * v_next
    delta.sub_(v)
    # A_t = delta_t + gamma_t lamda_t (1 - cut_t) A_next(t)
    c = g * lam
    if cut is not None:
        c = torch.where(cut, 0.0, C.as_tensor(c, r))
    adv = S.scan(delta, c, mask=m, backend=backend)
    return adv, C.masked_out(adv + v, m)


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
    _, ret = _gae(rewards, values, gamma=gamma, lamda=lamda, bootstrap_value=bootstrap_value, mask=mask,
                  terminated=terminated, done=done, backend=backend, allow_nonfinite=allow_nonfinite)
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
    """TD(λ) (Sutton 1988) as an estimator: the λ-returns as targets, ``returns - values`` as advantages
    (see :func:`td_lambda`)."""
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
    C.check_all_finite(allow_nonfinite, rewards=rewards, bootstrap_value=bootstrap_value)
    dt = C.acc_dtype(rewards.dtype)
    r = rewards.to(dt)
    g = C.per_step_or_float("gamma", gamma, like=r, dtype=dt)
    m = C.as_bool("mask", mask)
    cut = C.as_bool("done", done)
    c = g if cut is None else torch.where(cut, 0.0, C.as_tensor(g, r))
    ret = S.scan(r, c, mask=m, tail=C.bootstrap(bootstrap_value, like=r, dtype=dt), backend=backend)
    return ret.to(rewards.dtype)


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
    out = _n_step(rewards.to(dt), values.to(dt), gamma=gamma, n_steps=n_steps, bootstrap_value=bootstrap_value,
                  mask=mask)
    return out.to(C.out_dtype(rewards.dtype, values.dtype))


def _n_step(
    r: Tensor, tail: Tensor, *, gamma: float | Tensor, n_steps: int, bootstrap_value: Tensor | None,
    mask: Tensor | None,
) -> Tensor:
    """Sum ``n`` rewards along the masked-in chain, then bootstrap with ``tail`` (``V`` or another estimate).

    The loop runs over the ``n`` offsets (at most ``T``), never over sequences:
    ``idx`` walks every start position one masked-in step forward at a time.
    """
    T, dt = r.shape[-1], r.dtype
    g = C.per_step("gamma", gamma, like=r, dtype=dt)
    m = C.as_bool("mask", mask)
    boot = C.bootstrap(bootstrap_value, like=r, dtype=dt)
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
