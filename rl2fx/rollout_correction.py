r"""Rollout correction: the sampler (vLLM/SGLang) and the trainer disagree on log-probs.

Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
Training" (fengyao.notion.site/off-policy-rl): even with identical weights, the
inference engine's :math:`\mu` differs from the trainer's :math:`\pi` (kernels,
precision), so the "on-policy" gradient is off-policy. The fixes, as verl's
rollout-correction options (``rollout_is``, ``rollout_rs``) name them:

* :func:`truncated_is_weights`: :math:`w = \min(\pi/\mu, C)` per token, or per
  sequence with :math:`\prod_t \pi_t/\mu_t` (``rollout_is="token" | "sequence"``);
* :func:`masked_is`: drop tokens or whole sequences whose ratio leaves
  :math:`[\text{low}, \text{high}]` (``rollout_rs="token" | "sequence" | "geometric"``);
* :func:`mismatch_metrics`: KL estimates and ratio statistics to watch the gap.

All take ``logprobs`` (the trainer's :math:`\log\pi`, usually the old-log-prob
pass) and ``rollout_logprobs`` (:math:`\log\mu`), ``[batch, time]``, and an
optional ``mask``; masked-out positions never change a result (``torch.where``,
so NaN there is harmless). Everything is computed without gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rl2fx._typing import Float, Shaped, check_choice, check_range, typechecked

__all__ = ["truncated_is_weights", "masked_is", "mismatch_metrics", "LEVELS", "RS_LEVELS"]

LEVELS = ("token", "sequence")
RS_LEVELS = ("token", "sequence", "geometric")


def _log_ratio(logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    m = torch.ones_like(logprobs, dtype=torch.bool) if mask is None else mask.to(logprobs.device) != 0
    if m.shape != logprobs.shape or rollout_logprobs.shape != logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, rollout_logprobs {tuple(rollout_logprobs.shape)} and "
                         f"mask {tuple(m.shape)} must have the same shape")
    dt = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    lr = torch.where(m, logprobs.detach().to(dt) - rollout_logprobs.detach().to(dt), 0.0)
    return lr, m


@typechecked
def truncated_is_weights(
    logprobs: Float[Tensor, "batch time"],
    rollout_logprobs: Float[Tensor, "batch time"],
    mask: Shaped[Tensor, "batch time"] | None = None,
    *,
    level: str = "token",
    cap: float | int = 2.0,
) -> Float[Tensor, "batch time"]:
    r"""Truncated importance weights from the sampler to the trainer (Yao et al. 2025; verl's ``rollout_is``).

    .. math::

        \text{token: } w_{i,t} = \min\Big(\frac{\pi(y_{i,t})}{\mu(y_{i,t})}, C\Big), \qquad
        \text{sequence: } w_{i,t} = \min\Big(\prod_{t'} \frac{\pi(y_{i,t'})}{\mu(y_{i,t'})}, C\Big)

    (products over masked-in tokens; the sequence weight is given to each of the
    row's tokens). Multiply the per-token policy loss by ``w``: the truncation
    (TIS) bounds the variance at the price of a small bias. The sequence form is
    computed in log space, :math:`\exp(\min(\sum_t \log\rho_t, \log C))`, so long
    responses cannot overflow. 0 at masked-out positions; no gradient.

    >>> import torch
    >>> lp, mu = torch.log(torch.tensor([[0.5, 0.2]])), torch.log(torch.tensor([[0.25, 0.4]]))
    >>> truncated_is_weights(lp, mu, cap=1.5)
    tensor([[1.5000, 0.5000]])
    >>> truncated_is_weights(lp, mu, level="sequence", cap=1.5)
    tensor([[1., 1.]])
    """
    check_choice("level", level, LEVELS)
    check_range("cap", cap, 0.0, None, low_inclusive=False)
    lr, m = _log_ratio(logprobs, rollout_logprobs, mask)
    if level == "sequence":
        lr = lr.sum(-1, keepdim=True).expand_as(lr)
    w = torch.exp(torch.clamp(lr, max=math.log(cap)))
    return torch.where(m, w, 0.0).to(logprobs.dtype)


@typechecked
def masked_is(
    logprobs: Float[Tensor, "batch time"],
    rollout_logprobs: Float[Tensor, "batch time"],
    mask: Shaped[Tensor, "batch time"] | None = None,
    *,
    level: str = "token",
    low: float | int = 0.5,
    high: float | int = 2.0,
) -> Shaped[Tensor, "batch time"]:
    r"""Masked importance sampling: drop what the sampler got too wrong (verl's ``rollout_rs``).

    .. math::

        \text{token: } m'_{i,t} = m_{i,t}\,[\ell \le \rho_{i,t} \le h], \quad
        \text{sequence: } m'_{i,t} = m_{i,t}\,[\ell \le \textstyle\prod_{t'}\rho_{i,t'} \le h], \quad
        \text{geometric: } m'_{i,t} = m_{i,t}\,[\ell \le \exp(\tfrac{1}{|y_i|}\textstyle\sum_{t'}\log\rho_{i,t'}) \le h]

    with :math:`\rho = \pi/\mu` over masked-in tokens. Returns the new boolean
    mask: tokens (``token``) or whole sequences (``sequence``, ``geometric``)
    whose ratio leaves ``[low, high]`` are masked out instead of down-weighted
    (Yao et al. 2025's MIS). The geometric mean does not grow with the length,
    so it suits a tight band around 1 (verl's example: ``1 ± 0.001``). A row with
    no masked-in token stays all masked out.

    >>> import torch
    >>> lp, mu = torch.log(torch.tensor([[0.5, 0.2]])), torch.log(torch.tensor([[0.25, 0.4]]))
    >>> masked_is(lp, mu, low=0.6, high=1.8)
    tensor([[False, False]])
    >>> masked_is(lp, mu, level="sequence", low=0.6, high=1.8)
    tensor([[True, True]])
    """
    check_choice("level", level, RS_LEVELS)
    check_range("low", low, 0.0, None)
    check_range("high", high, low, None, low_inclusive=False)
    lr, m = _log_ratio(logprobs, rollout_logprobs, mask)
    if level == "token":
        stat = lr
    else:
        stat = lr.sum(-1, keepdim=True)
        if level == "geometric":
            stat = stat / m.sum(-1, keepdim=True).clamp_min(1)
    lo = -math.inf if low == 0 else math.log(low)
    keep = (stat >= lo) & (stat <= math.log(high)) if math.isfinite(high) else stat >= lo
    return m & keep.expand_as(m)


@typechecked
def mismatch_metrics(
    logprobs: Float[Tensor, "batch time"],
    rollout_logprobs: Float[Tensor, "batch time"],
    mask: Shaped[Tensor, "batch time"] | None = None,
    *,
    cap: float | int = 2.0,
) -> dict[str, Tensor]:
    r"""How far the sampler :math:`\mu` is from the trainer :math:`\pi`, from the sampled tokens.

    With :math:`\rho_t = \pi(y_t)/\mu(y_t)` over the masked-in tokens (samples from :math:`\mu`),
    :math:`N` of them in :math:`B` non-empty rows:

    * ``kl_k1`` :math:`= \frac1N\sum_t -\log\rho_t` and ``kl_k3``
      :math:`= \frac1N\sum_t (\rho_t - 1 - \log\rho_t)`: estimates of
      :math:`\mathrm{KL}(\mu\,\|\,\pi)` per token (Schulman's k1, k3; k3 is >= 0);
    * ``log_ppl_diff`` :math:`= \frac1B\sum_i \frac{1}{|y_i|}\sum_t \log\rho_{i,t}`
      (log of the perplexity ratio :math:`\mathrm{PPL}_\mu/\mathrm{PPL}_\pi`, averaged over rows);
    * ``ratio_mean``, ``ratio_std``, ``ratio_min``, ``ratio_max`` of :math:`\rho_t`;
      ``ratio_frac_high`` / ``ratio_frac_low``: fractions with :math:`\rho_t > C` / :math:`\rho_t < 1/C`;
    * ``seq_log_ratio_mean`` / ``seq_log_ratio_max``: :math:`\sum_t\log\rho_{i,t}` over rows;
    * ``ess``: the normalised effective sample size of the token weights,
      :math:`(\sum\rho)^2 / (N \sum\rho^2)` (1 when :math:`\mu = \pi`).

    With no masked-in token every metric is 0 (``ess`` 1). Detached 0-d tensors.

    >>> import torch
    >>> lp = torch.log(torch.tensor([[0.5, 0.5]]))
    >>> m = mismatch_metrics(lp, lp)
    >>> m["kl_k1"].item(), m["kl_k3"].item(), m["ess"].item()
    (0.0, 0.0, 1.0)
    """
    check_range("cap", cap, 1.0, None)
    lr, m = _log_ratio(logprobs, rollout_logprobs, mask)
    n = m.sum().to(lr.dtype)
    nz = n.clamp_min(1)
    rho = torch.where(m, lr.exp(), 0.0)
    rows = m.any(-1)
    seq = lr.sum(-1)
    per_row = seq / m.sum(-1).clamp_min(1)
    n_rows = rows.sum().to(lr.dtype).clamp_min(1)
    zero = torch.zeros((), dtype=lr.dtype, device=lr.device)
    mean = rho.sum() / nz
    var = torch.where(m, (rho - mean) ** 2, 0.0).sum() / (n - 1).clamp_min(1)
    out = {
        "kl_k1": -lr.sum() / nz,
        "kl_k3": torch.where(m, rho - 1 - lr, 0.0).sum() / nz,
        "log_ppl_diff": torch.where(rows, per_row, 0.0).sum() / n_rows,
        "ratio_mean": mean,
        "ratio_std": var.sqrt(),
        "ratio_min": torch.where(m, rho, math.inf).min() if n > 0 else zero,
        "ratio_max": torch.where(m, rho, -math.inf).max() if n > 0 else zero,
        "ratio_frac_high": (m & (rho > cap)).sum().to(lr.dtype) / nz,
        "ratio_frac_low": (m & (rho < 1 / cap)).sum().to(lr.dtype) / nz,
        "seq_log_ratio_mean": torch.where(rows, seq, 0.0).sum() / n_rows,
        "seq_log_ratio_max": torch.where(rows, seq, -math.inf).max() if bool(rows.any()) else zero,
        "ess": (rho.sum() ** 2 / (n * (rho**2).sum())) if n > 0 else torch.ones((), dtype=lr.dtype),
    }
    return {k: v.detach() for k, v in out.items()}
