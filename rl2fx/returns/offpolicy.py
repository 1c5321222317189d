r"""Off-policy corrections: V-trace, Retrace(λ) and clipped importance sampling.

``log_rhos`` is always :math:`\log \pi(a_t|x_t) - \log \mu(a_t|x_t)`: target policy
(the one being trained, RL2's ``logps``) minus behaviour policy (the sampler's,
RL2's ``old_logps``). Conventions for ``gamma``, ``bootstrap_value``, ``mask``,
``terminated`` and ``done`` are those of :mod:`rl2fx.returns.gae`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl2fx._typing import Float, Shaped, check_range, typechecked
from rl2fx.returns import _common as C
from rl2fx.returns import scan as S
from rl2fx.returns.gae import gae
from rl2fx.returns.registry import register_estimator

__all__ = ["vtrace", "retrace", "clipped_is"]


@typechecked
def vtrace(
    rewards: Float[Tensor, "*batch time"],
    values: Float[Tensor, "*batch time"],
    log_rhos: Float[Tensor, "*batch time"],
    *,
    gamma: float | int | Float[Tensor, "*batch time"],
    rho_bar: float | int = 1.0,
    c_bar: float | int = 1.0,
    pg_rho_bar: float | int | None = None,
    lamda: float | int | Float[Tensor, "*batch time"] = 1.0,
    bootstrap_value: Float[Tensor, "*batch"] | None = None,
    mask: Shaped[Tensor, "*batch time"] | None = None,
    terminated: Shaped[Tensor, "*batch time"] | None = None,
    done: Shaped[Tensor, "*batch time"] | None = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
) -> tuple[Float[Tensor, "*batch time"], Float[Tensor, "*batch time"]]:
    r"""V-trace targets and policy-gradient advantages (Espeholt et al. 2018, IMPALA, arXiv:1802.01561).

    .. math::

        \rho_t = \min(\bar\rho, e^{\log\rho_t}), \quad c_t = \lambda_t \min(\bar c, e^{\log\rho_t}), \quad
        \delta_t = \rho_t \big(r_t + \gamma_t V_{t+1} - V_t\big)

        v_t - V_t = \delta_t + \gamma_t c_t (v_{t+1} - V_{t+1}), \qquad v_T = V_T = \text{bootstrap}

        A^{pg}_t = \min(\bar\rho_{pg}, e^{\log\rho_t}) \big(r_t + \gamma_t v_{t+1} - V_t\big)

    ``pg_rho_bar`` defaults to ``rho_bar`` (rlax's ``clip_pg_rho_threshold``);
    ``lamda`` multiplies the traces as in rlax. On-policy (``log_rhos = 0``) with
    ``rho_bar, c_bar >= 1`` the targets ``vs`` are the λ-returns.

    Returns ``(vs, pg_advantages)``.

    >>> import torch
    >>> vs, pg = vtrace(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]), torch.zeros(2), gamma=1.0)
    >>> vs, pg
    (tensor([1., 1.]), tensor([0.5000, 0.5000]))
    """
    check_range("rho_bar", rho_bar, 0.0, None, low_inclusive=False)
    check_range("c_bar", c_bar, 0.0, None, low_inclusive=False)
    pg_bar = rho_bar if pg_rho_bar is None else pg_rho_bar
    check_range("pg_rho_bar", pg_bar, 0.0, None, low_inclusive=False)
    C.check_all_finite(
        allow_nonfinite, rewards=rewards, values=values, log_rhos=log_rhos, bootstrap_value=bootstrap_value
    )
    dt = C.acc_dtype(rewards.dtype, values.dtype)
    r, v = rewards.to(dt), values.to(dt)
    g = C.per_step("gamma", gamma, like=r, dtype=dt)
    lam = C.per_step("lamda", lamda, like=r, dtype=dt)
    m = C.as_bool("mask", mask)
    term, cut = C.resolve_cuts(terminated=terminated, done=done)
    boot = C.bootstrap(bootstrap_value, like=r, dtype=dt)
    nxt = None if m is None else C.next_index(m)

    ratio = log_rhos.to(dt).exp()
    rho = ratio.clamp(max=rho_bar)
    cs = lam * ratio.clamp(max=c_bar)
    g_boot = g if term is None else torch.where(term, 0.0, g)
    v_next = C.next_along(v, tail=boot, nxt=nxt)
    delta = rho * (r + g_boot * v_next - v)
    c = g * cs
    if cut is not None:
        c = torch.where(cut, 0.0, c)
    vs = S.scan(delta, c, mask=m, backend=backend) + v
    vs_next = C.next_along(vs, tail=boot, nxt=nxt)
    if cut is not None:
        # past a trace cut the next target belongs to another episode: fall back to V (as TorchRL)
        vs_next = torch.where(cut, v_next, vs_next)
    pg = ratio.clamp(max=pg_bar) * (r + g_boot * vs_next - v)
    out = C.out_dtype(rewards.dtype, values.dtype)
    return C.masked_out(vs, m).to(out), C.masked_out(pg, m).to(out)


@typechecked
def retrace(
    rewards: Float[Tensor, "*batch time"],
    q_values: Float[Tensor, "*batch time"],
    v_next: Float[Tensor, "*batch time"],
    log_rhos: Float[Tensor, "*batch time"],
    *,
    gamma: float | int | Float[Tensor, "*batch time"],
    lamda: float | int | Float[Tensor, "*batch time"] = 0.95,
    bootstrap_value: Float[Tensor, "*batch"] | None = None,
    mask: Shaped[Tensor, "*batch time"] | None = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
) -> Float[Tensor, "*batch time"]:
    r"""Retrace(λ) targets for :math:`Q(x_t, a_t)` (Munos et al. 2016, arXiv:1606.02647).

    .. math::

        c_t = \lambda_t \min(1, e^{\log\rho_t}), \qquad
        Q^{ret}_t = r_t + \gamma_t \Big( \mathbb{E}_\pi Q(x_{t+1}, \cdot)
                    + c_{t+1} \big(Q^{ret}_{t+1} - Q(x_{t+1}, a_{t+1})\big) \Big)

    ``q_values[t]`` is :math:`Q(x_t, a_t)`; ``v_next[t]`` is
    :math:`\mathbb{E}_\pi Q(x_{t+1}, \cdot)` (rlax's ``v_t``); the correction term
    vanishes after the last step. ``bootstrap_value``, when given, replaces
    ``v_next`` at each row's last (masked-in) step. With a state-value critic
    only, pass ``q_values = values`` and ``v_next`` = the next step's value
    (what :func:`rl2fx.returns.advantages` does for ``method="retrace"``).

    >>> import torch
    >>> retrace(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0]),
    ...         torch.zeros(2), gamma=1.0, lamda=1.0)
    tensor([2., 1.])
    """
    C.check_all_finite(
        allow_nonfinite, rewards=rewards, q_values=q_values, v_next=v_next, log_rhos=log_rhos,
        bootstrap_value=bootstrap_value,
    )
    dt = C.acc_dtype(rewards.dtype, q_values.dtype, v_next.dtype)
    r, q, vn = rewards.to(dt), q_values.to(dt), v_next.to(dt)
    g = C.per_step("gamma", gamma, like=r, dtype=dt)
    lam = C.per_step("lamda", lamda, like=r, dtype=dt)
    m = C.as_bool("mask", mask)
    nxt = None if m is None else C.next_index(m)
    if bootstrap_value is not None:
        vn = torch.where(C.is_last(m, like=r, nxt=nxt), bootstrap_value.to(dt).unsqueeze(-1), vn)
    cs = lam * log_rhos.to(dt).exp().clamp(max=1.0)
    # Z_t = Q^ret_t - Q_t satisfies Z_t = (r_t + γ_t v_next_t - Q_t) + γ_t c_{t+1} Z_{t+1}:
    # the trace coefficient at t is the *next* masked-in step's c (0 past the end, where Z = 0 anyway).
    c_next = C.next_along(cs, tail=cs.new_zeros(cs.shape[:-1]), nxt=nxt)
    out = S.scan(r + g * vn - q, g * c_next, mask=m, backend=backend) + q
    return C.masked_out(out, m).to(C.out_dtype(rewards.dtype, q_values.dtype, v_next.dtype))


@typechecked
def clipped_is(
    advantages: Float[Tensor, "*batch time"],
    log_rhos: Float[Tensor, "*batch time"],
    *,
    clip_ratio: float | int = 0.2,
    mask: Shaped[Tensor, "*batch time"] | None = None,
    allow_nonfinite: bool = False,
) -> Float[Tensor, "*batch time"]:
    r"""Advantages re-weighted by a clipped importance ratio (truncated IS, PPO-style range).

    .. math::

        \tilde A_t = \mathrm{clip}\big(e^{\log\rho_t},\, 1 - \epsilon,\, 1 + \epsilon\big)\, A_t,
        \qquad \epsilon = \text{clip\_ratio}

    Clipping the per-step weight bounds the variance that raw importance
    sampling brings to stale (replayed) data (Munos et al. 2016 §2 discuss
    truncated IS; the clip range follows PPO, Schulman et al. 2017).

    >>> import torch
    >>> clipped_is(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.5, 1.0, 2.0]).log())
    tensor([0.8000, 1.0000, 1.2000])
    """
    check_range("clip_ratio", clip_ratio, 0.0, 1.0)
    C.check_all_finite(allow_nonfinite, advantages=advantages, log_rhos=log_rhos)
    dt = C.acc_dtype(advantages.dtype)
    w = log_rhos.to(dt).exp().clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
    out = w * advantages.to(dt)
    return C.masked_out(out, C.as_bool("mask", mask)).to(advantages.dtype)


# ---------------------------------------------------------------------------- registry entries
@register_estimator("vtrace", needs_values=True, defaults={"gamma": 0.99})
def _vtrace_estimator(
    rewards: Tensor,
    values: Tensor,
    log_rhos: Tensor,
    *,
    gamma: float | Tensor,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
    pg_rho_bar: float | None = None,
    lamda: float | Tensor = 1.0,
    bootstrap_value: Tensor | None = None,
    mask: Tensor | None = None,
    terminated: Tensor | None = None,
    done: Tensor | None = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
) -> dict[str, Tensor]:
    """V-trace (Espeholt et al. 2018, IMPALA) as an estimator: the policy-gradient advantages, with the
    targets ``vs`` as returns (see :func:`vtrace`)."""
    vs, pg = vtrace(rewards, values, log_rhos, gamma=gamma, rho_bar=rho_bar, c_bar=c_bar, pg_rho_bar=pg_rho_bar,
                    lamda=lamda, bootstrap_value=bootstrap_value, mask=mask, terminated=terminated, done=done,
                    backend=backend, allow_nonfinite=allow_nonfinite)
    return {"advantages": pg, "returns": vs, "vs": vs}


@register_estimator("retrace", needs_values=True, defaults={"gamma": 0.99})
def _retrace_estimator(
    rewards: Tensor,
    values: Tensor,
    log_rhos: Tensor,
    *,
    gamma: float | Tensor,
    lamda: float | Tensor = 0.95,
    q_values: Tensor | None = None,
    v_next: Tensor | None = None,
    bootstrap_value: Tensor | None = None,
    mask: Tensor | None = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
) -> tuple[Tensor, Tensor]:
    """Retrace(λ) (Munos et al. 2016) for a state-value critic: ``Q`` defaults to ``V`` and ``V(x_{t+1})`` to
    the next masked-in step's value; advantages are ``targets - values`` (see :func:`retrace`)."""
    # checked here, under the caller's names: retrace() sees values as q_values and v_next
    C.check_all_finite(allow_nonfinite, rewards=rewards, values=values, log_rhos=log_rhos, q_values=q_values,
                       v_next=v_next, bootstrap_value=bootstrap_value)
    m = C.as_bool("mask", mask)
    q = values if q_values is None else q_values
    if v_next is None:
        boot = (torch.zeros(values.shape[:-1], dtype=values.dtype, device=values.device)
                if bootstrap_value is None else bootstrap_value.to(values.dtype))
        v_next = C.next_along(values, tail=boot, nxt=None if m is None else C.next_index(m))
    ret = retrace(rewards, q, v_next, log_rhos, gamma=gamma, lamda=lamda, bootstrap_value=bootstrap_value,
                  mask=mask, backend=backend, allow_nonfinite=True)  # every input checked above
    return C.masked_out(ret - values, m).to(ret.dtype), ret


@register_estimator("clipped_is", needs_values=True, defaults={"gamma": 0.99, "lamda": 0.95})
def _clipped_is_estimator(
    rewards: Tensor,
    values: Tensor,
    log_rhos: Tensor,
    *,
    gamma: float | Tensor,
    lamda: float | Tensor,
    clip_ratio: float = 0.2,
    bootstrap_value: Tensor | None = None,
    mask: Tensor | None = None,
    terminated: Tensor | None = None,
    done: Tensor | None = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
) -> tuple[Tensor, Tensor]:
    """Clipped importance sampling: GAE advantages re-weighted by ``clip(ρ, 1 - clip_ratio, 1 + clip_ratio)``
    (:func:`clipped_is`); the λ-returns as targets."""
    adv, ret = gae(rewards, values, gamma=gamma, lamda=lamda, bootstrap_value=bootstrap_value, mask=mask,
                   terminated=terminated, done=done, backend=backend, allow_nonfinite=allow_nonfinite)
    return clipped_is(adv, log_rhos, clip_ratio=clip_ratio, mask=mask, allow_nonfinite=allow_nonfinite), ret
