r"""Newer policy losses: GSPO, GSPO-token, CISPO, SAPO, GMPO, Clip-Cov, KL-Cov, DPPO (TV, KL), DRO.

Every function has the calling convention of :func:`rl2fx.losses.policy_loss`::

    fn(logprobs, old_logprobs, advantages, mask=None, *, <hyperparameters>,
       agg_mode=..., normalizer=None, global_tokens=None, global_seqs=None)
    -> (loss, metrics)

on ``[*batch, time]`` tensors; ``mask`` (bool or 0/1) marks the response tokens
that are decisions; the loss is a 0-d tensor reduced by
:func:`rl2fx.losses.aggregate` (``agg_mode``, ``normalizer``, ``global_tokens``,
``global_seqs`` are its arguments) and the metrics are detached 0-d tensors.
Every loss reports ``ratio_mean`` (token mean of :math:`\rho_t = \pi_\theta/\pi_{old}`) and
``approx_kl`` (the k3 estimate :math:`\rho - 1 - \log\rho` of
:math:`\mathrm{KL}(\pi_{old}\|\pi_\theta)`) as :func:`~rl2fx.losses.policy_loss`
does, plus its clip fraction or that fraction's analogue.

Sequence-level losses (GSPO, GMPO) compute their per-sequence quantities over
the masked-in tokens of each row and give every masked-in token of the row the
sequence's loss; ``seq-mean-token-mean`` (their default) then averages over
sequences exactly as the papers do, and micro-batches split by rows add up to
the full batch with ``global_seqs``. Clip-Cov and KL-Cov select tokens by a
covariance over the whole batch: call them on the whole batch, not on
micro-batches.

Masked-out positions never influence a result: inputs there are replaced
(``torch.where``) before any arithmetic, so NaN or inf there changes neither the
loss nor the gradient. Inputs are computed in at least float32.
"""

from __future__ import annotations

import torch

from rl2fx._typing import Float, Shaped, Tensor, check_choice, check_mask, check_range, typechecked
from rl2fx.kl_estimators import KL_ESTIMATORS, kl_estimate
from rl2fx.losses import AGG_MODES, aggregate, register_policy_loss

__all__ = [
    "gspo",
    "gspo_token",
    "cispo",
    "sapo",
    "gmpo",
    "clip_cov",
    "kl_cov",
    "dppo_tv",
    "dppo_kl",
    "dro",
]

MaskT = Shaped[Tensor, "*batch time"] | None
Num = float | int
Out = tuple[Float[Tensor, ""], dict[str, Tensor]]

# What masked-out log-probs are replaced with: any valid log-prob works (the result
# ignores them); a finite one below 0 keeps exp, log(1 - p) and the binary KL finite.
_LOGP_FILL = -1.0


def _prep(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor | None):
    """Boolean mask and the three inputs in >= float32 with masked-out entries replaced."""
    m = torch.ones_like(logprobs, dtype=torch.bool) if mask is None else check_mask("mask", mask)
    dt = torch.promote_types(logprobs.dtype, torch.float32)
    lp = torch.where(m, logprobs.to(dt), _LOGP_FILL)
    old = torch.where(m, old_logprobs.to(dt), _LOGP_FILL)
    adv = torch.where(m, advantages.to(dt), 0.0)
    return m, lp, old, adv


def _mmean(x: Tensor, m: Tensor) -> Tensor:
    return torch.where(m, x, 0.0).sum() / m.sum().clamp_min(1)


def _row_mean(x: Tensor, m: Tensor) -> Tensor:
    """Per-row mean over masked-in steps, ``[*batch]`` (0 for a row with none)."""
    return torch.where(m, x, 0.0).sum(-1) / m.sum(-1).clamp_min(1)


def _reduce(loss: Tensor, m: Tensor, agg_mode: str, normalizer, global_tokens, global_seqs) -> Tensor:
    loss = torch.where(m, loss, 0.0)
    return aggregate(
        loss, m, agg_mode,
        normalizer=normalizer, global_tokens=global_tokens, global_seqs=global_seqs,
    )


def _common_metrics(log_ratio: Tensor, m: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        return {
            "ratio_mean": _mmean(torch.exp(log_ratio), m),
            "approx_kl": _mmean(torch.expm1(log_ratio) - log_ratio, m),
        }


def _check_clip(clip: Num, clip_high: Num | None) -> float:
    check_range("clip", clip, 0.0, 1.0)
    hi = clip if clip_high is None else clip_high
    check_range("clip_high", hi, 0.0, None)
    return float(hi)


def _ppo_surrogate(ratio: Tensor, adv: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    """``-min(ρA, clip(ρ, 1-lo, 1+hi)A)`` and where the clip removed the gradient."""
    surr1 = ratio * adv
    surr2 = ratio.clamp(1.0 - lo, 1.0 + hi) * adv
    return -torch.minimum(surr1, surr2), surr2 < surr1


@register_policy_loss("gspo")
@typechecked
def gspo(
    logprobs: Float[Tensor, "*batch time"],
    old_logprobs: Float[Tensor, "*batch time"],
    advantages: Float[Tensor, "*batch time"],
    mask: MaskT = None,
    *,
    clip: Num = 3e-4,
    clip_high: Num | None = 4e-4,
    agg_mode: str = "seq-mean-token-mean",
    normalizer: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> Out:
    r"""GSPO: PPO's clipped objective on the length-normalised *sequence* importance ratio.

    Zheng et al., "Group Sequence Policy Optimization", 2025 (arXiv:2507.18071), the GSPO objective:

    .. math::

        s_i = \Big(\frac{\pi_\theta(y_i|x)}{\pi_{old}(y_i|x)}\Big)^{1/|y_i|}
            = \exp\Big(\frac{1}{|y_i|}\sum_t \log\frac{\pi_\theta(y_{i,t})}{\pi_{old}(y_{i,t})}\Big),
        \qquad \ell_{i,t} = -\min\big(s_i A_{i,t},\ \mathrm{clip}(s_i, 1-\epsilon, 1+\epsilon_{high}) A_{i,t}\big)

    With a sequence-level advantage (GRPO's, constant over the row) and the default
    ``seq-mean-token-mean`` this is the paper's :math:`-\frac1G\sum_i \min(s_i A_i, \mathrm{clip}(s_i) A_i)`.
    ``clip`` / ``clip_high`` are :math:`\epsilon` / :math:`\epsilon_{high}` (the paper's 3e-4 and
    4e-4). verl clamps :math:`\log s` at 10 and forces ``seq-mean-token-mean``; here
    nothing is clamped and ``agg_mode`` is honoured. Metrics: ``clip_frac`` (fraction of
    tokens whose sequence ratio was clipped), ``seq_ratio_mean`` (mean :math:`s_i` over
    non-empty rows), ``ratio_mean``, ``approx_kl``.

    >>> lp = torch.tensor([[-1.0, -2.0]], requires_grad=True); adv = torch.tensor([[1.0, 1.0]])
    >>> loss, metrics = gspo(lp, lp.detach(), adv)
    >>> loss.backward(); loss.item(), lp.grad.tolist()  # s = 1: -A; gradient -A / |y| per token
    (-1.0, [[-0.5, -0.5]])
    """
    hi = _check_clip(clip, clip_high)
    check_choice("agg_mode", agg_mode, AGG_MODES)
    m, lp, old, adv = _prep(logprobs, old_logprobs, advantages, mask)
    log_ratio = lp - old
    s_row = torch.exp(_row_mean(log_ratio, m))
    s = s_row.unsqueeze(-1).expand_as(lp)
    loss, clipped = _ppo_surrogate(s, adv, float(clip), hi)
    out = _reduce(loss, m, agg_mode, normalizer, global_tokens, global_seqs)
    metrics = _common_metrics(log_ratio, m)
    with torch.no_grad():
        metrics["clip_frac"] = _mmean(clipped.to(lp.dtype), m)
        rows = m.any(-1)
        metrics["seq_ratio_mean"] = torch.where(rows, s_row, 0.0).sum() / rows.sum().clamp_min(1)
    return out, metrics


@register_policy_loss("gspo_token")
@typechecked
def gspo_token(
    logprobs: Float[Tensor, "*batch time"],
    old_logprobs: Float[Tensor, "*batch time"],
    advantages: Float[Tensor, "*batch time"],
    mask: MaskT = None,
    *,
    clip: Num = 3e-4,
    clip_high: Num | None = 4e-4,
    agg_mode: str = "seq-mean-token-mean",
    normalizer: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> Out:
    r"""GSPO-token: GSPO's sequence ratio in value, each token's own log-prob in gradient.

    Zheng et al. 2025 (arXiv:2507.18071), the GSPO-token variant:

    .. math::

        s_{i,t} = \mathrm{sg}[s_i]\,\frac{\pi_\theta(y_{i,t})}{\mathrm{sg}[\pi_\theta(y_{i,t})]},\qquad
        \ell_{i,t} = -\min\big(s_{i,t} A_{i,t},\ \mathrm{clip}(s_{i,t}, 1-\epsilon, 1+\epsilon_{high}) A_{i,t}\big)

    :math:`s_{i,t}` equals :math:`s_i` numerically, so with advantages constant over each
    row the loss *and its gradient* equal :func:`gspo`'s (the paper's remark); token-level
    advantages then give per-token credit under the sequence-level trust region. This is
    what verl registers as ``gspo``. Metrics as :func:`gspo`.

    >>> lp = torch.tensor([[-1.0, -2.0]], requires_grad=True); adv = torch.tensor([[1.0, 3.0]])
    >>> loss, _ = gspo_token(lp, lp.detach(), adv)
    >>> loss.backward(); loss.item(), lp.grad.tolist()
    (-2.0, [[-0.5, -1.5]])
    """
    hi = _check_clip(clip, clip_high)
    check_choice("agg_mode", agg_mode, AGG_MODES)
    m, lp, old, adv = _prep(logprobs, old_logprobs, advantages, mask)
    log_ratio = lp - old
    seq = _row_mean(log_ratio, m).detach().unsqueeze(-1)
    s = torch.exp(seq + lp - lp.detach())
    loss, clipped = _ppo_surrogate(s, adv, float(clip), hi)
    out = _reduce(loss, m, agg_mode, normalizer, global_tokens, global_seqs)
    metrics = _common_metrics(log_ratio, m)
    with torch.no_grad():
        metrics["clip_frac"] = _mmean(clipped.to(lp.dtype), m)
        rows = m.any(-1)
        metrics["seq_ratio_mean"] = torch.where(rows, torch.exp(seq[..., 0]), 0.0).sum() / rows.sum().clamp_min(1)
    return out, metrics


@register_policy_loss("cispo")
@typechecked
def cispo(
    logprobs: Float[Tensor, "*batch time"],
    old_logprobs: Float[Tensor, "*batch time"],
    advantages: Float[Tensor, "*batch time"],
    mask: MaskT = None,
    *,
    epsilon_low: Num | None = None,
    epsilon_high: Num = 0.2,
    ratio_cap: Num | None = None,
    agg_mode: str = "token-mean",
    normalizer: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> Out:
    r"""CISPO: REINFORCE weighted by the clipped, stop-gradient importance weight.

    MiniMax, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning
    Attention", 2025 (arXiv:2506.13585), the CISPO objective:

    .. math::

        \hat r_t = \mathrm{clip}\big(\rho_t,\ 1-\epsilon^{IS}_{low},\ 1+\epsilon^{IS}_{high}\big),\qquad
        \ell_t = -\,\mathrm{sg}(\hat r_t)\, A_t \log\pi_\theta(a_t)

    aggregated over all tokens (``token-mean``, the paper's :math:`1/\sum_i|o_i|`). No
    token's gradient is dropped: the clip bounds the weight, not the update. The paper
    sets no lower bound, which is ``epsilon_low=None`` (the default); ``epsilon_high=0.2`` is
    rl2fx's PPO clip default, not a value taken from the paper.
    ``ratio_cap`` replaces the upper bound :math:`1+\epsilon^{IS}_{high}` by an absolute cap,
    TRL's choice (``loss_type="cispo"`` clamps the ratio at ``epsilon_high`` itself, 5.0
    recommended). Metrics: ``clip_frac`` (fraction of tokens whose weight was clipped),
    ``is_weight_mean``, ``ratio_mean``, ``approx_kl``.

    At :math:`\rho = 1` the gradient is the plain policy gradient (the loss value is
    :math:`-A\log\pi`, not PPO's :math:`-A`):

    >>> lp = torch.tensor([[-1.0, -2.0]], requires_grad=True); adv = torch.tensor([[1.0, -2.0]])
    >>> loss, metrics = cispo(lp, lp.detach(), adv)
    >>> loss.backward(); loss.item(), lp.grad.tolist()
    (-1.5, [[-0.5, 1.0]])
    """
    if epsilon_low is not None:
        check_range("epsilon_low", epsilon_low, 0.0, 1.0)
    check_range("epsilon_high", epsilon_high, 0.0, None)
    if ratio_cap is not None:
        check_range("ratio_cap", ratio_cap, 0.0, None, low_inclusive=False)
    check_choice("agg_mode", agg_mode, AGG_MODES)
    m, lp, old, adv = _prep(logprobs, old_logprobs, advantages, mask)
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    lo = 0.0 if epsilon_low is None else 1.0 - float(epsilon_low)
    hi = 1.0 + float(epsilon_high) if ratio_cap is None else float(ratio_cap)
    weight = ratio.clamp(lo, hi).detach()
    loss = -weight * adv * lp
    out = _reduce(loss, m, agg_mode, normalizer, global_tokens, global_seqs)
    metrics = _common_metrics(log_ratio, m)
    with torch.no_grad():
        metrics["clip_frac"] = _mmean((weight != ratio).to(lp.dtype), m)
        metrics["is_weight_mean"] = _mmean(weight, m)
    return out, metrics


@register_policy_loss("sapo")
@typechecked
def sapo(
    logprobs: Float[Tensor, "*batch time"],
    old_logprobs: Float[Tensor, "*batch time"],
    advantages: Float[Tensor, "*batch time"],
    mask: MaskT = None,
    *,
    tau_pos: Num = 1.0,
    tau_neg: Num = 1.05,
    agg_mode: str = "seq-mean-token-mean",
    normalizer: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> Out:
    r"""SAPO: a smooth, temperature-controlled gate on the token ratio in place of the hard clip.

    Gao et al., "Soft Adaptive Policy Optimization", 2025 (arXiv:2511.20347):

    .. math::

        f_{i,t}(\rho) = \frac{4}{\tau_{i,t}}\,\sigma\big(\tau_{i,t}(\rho - 1)\big),\quad
        \tau_{i,t} = \begin{cases}\tau_{pos} & A_{i,t} > 0\\ \tau_{neg} & \text{otherwise}\end{cases},\qquad
        \ell_{i,t} = -f_{i,t}(\rho_{i,t})\, A_{i,t}

    averaged per sequence then over sequences (``seq-mean-token-mean``, the paper's
    :math:`\frac1G\sum_i\frac1{|y_i|}\sum_t`). The gradient is
    :math:`-w_{i,t}\,\rho_{i,t} A_{i,t}\nabla\log\pi` with :math:`w = 4\sigma(1-\sigma) \le 1`,
    :math:`w = 1` at :math:`\rho = 1` (so on-policy SAPO's gradient is GRPO's); the gate
    decays smoothly instead of cutting to 0. :math:`\tau_{neg} > \tau_{pos}` damps
    negative-advantage tokens faster (the paper's 1.05 and 1.0). Metrics:
    ``gate_weight_mean`` (mean :math:`w`, the analogue of ``1 - clip_frac``),
    ``ratio_mean``, ``approx_kl``.

    >>> lp = torch.tensor([[-1.0, -2.0]], requires_grad=True); adv = torch.tensor([[1.0, -2.0]])
    >>> loss, metrics = sapo(lp, lp.detach(), adv)
    >>> loss.backward(); lp.grad.tolist(), metrics["gate_weight_mean"].item()
    ([[-0.5, 1.0]], 1.0)
    """
    check_range("tau_pos", tau_pos, 0.0, None, low_inclusive=False)
    check_range("tau_neg", tau_neg, 0.0, None, low_inclusive=False)
    check_choice("agg_mode", agg_mode, AGG_MODES)
    m, lp, old, adv = _prep(logprobs, old_logprobs, advantages, mask)
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    tau = torch.where(adv > 0, adv.new_tensor(float(tau_pos)), adv.new_tensor(float(tau_neg)))
    gate = torch.sigmoid(tau * (ratio - 1.0))
    loss = -(4.0 / tau) * gate * adv
    out = _reduce(loss, m, agg_mode, normalizer, global_tokens, global_seqs)
    metrics = _common_metrics(log_ratio, m)
    with torch.no_grad():
        metrics["gate_weight_mean"] = _mmean(4.0 * gate * (1.0 - gate), m)
    return out, metrics


@register_policy_loss("gmpo")
@typechecked
def gmpo(
    logprobs: Float[Tensor, "*batch time"],
    old_logprobs: Float[Tensor, "*batch time"],
    advantages: Float[Tensor, "*batch time"],
    mask: MaskT = None,
    *,
    clip: Num = 0.4,
    clip_high: Num | None = None,
    agg_mode: str = "seq-mean-token-mean",
    normalizer: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> Out:
    r"""GMPO: the geometric mean of the token ratios, clipped per token in log space.

    Zhao et al., "Geometric-Mean Policy Optimization", 2025 (arXiv:2507.20673), the GMPO objective:

    .. math::

        \ell_i = -\Big\{\prod_t \big|\min\big(\rho_{i,t} A_i,\ \mathrm{clip}(\rho_{i,t}, e^{-\epsilon}, e^{\epsilon_{high}}) A_i\big)\big|\Big\}^{1/|o_i|}\mathrm{sgn}(A_i)
              = -A_i \exp\Big(\frac{1}{|o_i|}\sum_t \mathrm{sgn}(A_i)\min\big(\mathrm{sgn}(A_i) \log\rho_{i,t},\ \mathrm{sgn}(A_i)\,\mathrm{clip}(\log\rho_{i,t}, -\epsilon, \epsilon_{high})\big)\Big)

    with the sequence advantage :math:`A_i` = the mean of the row's masked-in advantages
    (GRPO's, constant over the row). ``clip`` / ``clip_high`` are log-space bounds (the
    paper's :math:`(e^{-0.4}, e^{0.4})`). The loss of row i is given to each of its tokens;
    ``seq-mean-token-mean`` (default) is the paper's :math:`\frac1G\sum_i`. verl's
    ``geo_mean`` picks the clip side by each token's advantage sign and always averages
    over sequences; with row-constant advantages the two agree. Metrics: ``clip_frac``
    (tokens whose log-ratio was clipped), ``seq_ratio_mean`` (mean geometric-mean ratio),
    ``ratio_mean``, ``approx_kl``.

    >>> lp = torch.tensor([[-1.0, -2.0]], requires_grad=True); adv = torch.tensor([[1.0, 1.0]])
    >>> loss, _ = gmpo(lp, lp.detach(), adv)
    >>> loss.backward(); loss.item(), lp.grad.tolist()
    (-1.0, [[-0.5, -0.5]])
    """
    check_range("clip", clip, 0.0, None)
    hi = float(clip if clip_high is None else clip_high)
    check_range("clip_high", hi, 0.0, None)
    check_choice("agg_mode", agg_mode, AGG_MODES)
    m, lp, old, adv = _prep(logprobs, old_logprobs, advantages, mask)
    log_ratio = lp - old
    a_seq = _row_mean(adv, m).unsqueeze(-1)
    sgn = torch.sign(a_seq)
    clipped_lr = log_ratio.clamp(-float(clip), hi)
    chosen = sgn * torch.minimum(sgn * log_ratio, sgn * clipped_lr)
    geo = torch.exp(_row_mean(chosen, m)).unsqueeze(-1)
    loss = (-a_seq * geo).expand_as(lp)
    out = _reduce(loss, m, agg_mode, normalizer, global_tokens, global_seqs)
    metrics = _common_metrics(log_ratio, m)
    with torch.no_grad():
        metrics["clip_frac"] = _mmean(((chosen != log_ratio) & (sgn != 0)).to(lp.dtype), m)
        rows = m.any(-1)
        metrics["seq_ratio_mean"] = torch.where(rows, geo[..., 0], 0.0).sum() / rows.sum().clamp_min(1)
    return out, metrics


def _covariance(lp: Tensor, adv: Tensor, m: Tensor) -> Tensor:
    """Per-token centred product of log-prob and advantage over the batch's masked-in tokens."""
    lp = lp.detach()
    return (lp - _mmean(lp, m)) * (adv - _mmean(adv, m))


def _flat_select(m: Tensor, chosen_positions: Tensor) -> Tensor:
    """Boolean tensor like ``m``, true at the given flat (row-major) positions."""
    sel = torch.zeros(m.numel(), dtype=torch.bool, device=m.device)
    sel[chosen_positions] = True
    return sel.reshape(m.shape)


@register_policy_loss("clip_cov")
@typechecked
def clip_cov(
    logprobs: Float[Tensor, "*batch time"],
    old_logprobs: Float[Tensor, "*batch time"],
    advantages: Float[Tensor, "*batch time"],
    mask: MaskT = None,
    *,
    cov_ratio: Num = 2e-4,
    cov_low: Num = 1.0,
    cov_high: Num = 5.0,
    clip: Num | None = None,
    clip_high: Num | None = None,
    generator: torch.Generator | None = None,
    agg_mode: str = "token-mean",
    normalizer: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> Out:
    r"""Clip-Cov: detach the gradient of a random few tokens with a large log-prob/advantage covariance.

    Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning
    Language Models", 2025 (arXiv:2505.22617), Clip-Cov. Over the N masked-in tokens
    of the batch,

    .. math::

        \mathrm{Cov}_t = \big(\log\pi_\theta(y_t) - \overline{\log\pi_\theta}\big)\big(A_t - \bar A\big),\qquad
        I_{clip} \sim \mathrm{Uniform}\big(\{t : \omega_{low} \le \mathrm{Cov}_t \le \omega_{high}\};\ \lfloor rN\rfloor\big)

    .. math::

        \ell_t = \begin{cases} -\rho_t A_t & t \notin I_{clip} \\ 0 & t \in I_{clip}\end{cases}

    (``cov_ratio`` :math:`r` = 2e-4, ``cov_low`` / ``cov_high`` :math:`\omega` = 1, 5 in the
    paper). The draw uses ``generator`` (``torch.randperm`` over the candidates in
    row-major order), so a fixed generator state gives a fixed selection. The
    covariance and the draw are over the whole batch: do not micro-batch this loss.
    With ``clip`` (and ``clip_high``) PPO's clipped surrogate replaces :math:`\rho A` and
    tokens PPO already clipped are not candidates: the authors' verl code
    (``clip_cov``), which also selects at least one token (here :math:`\lfloor rN\rfloor` may
    be 0). Metrics: ``clip_frac`` (tokens with no gradient, selected or PPO-clipped),
    ``cov_clip_frac`` (selected), ``ratio_mean``, ``approx_kl``.

    >>> g = torch.Generator().manual_seed(0)
    >>> lp = torch.tensor([[-3.0, -0.1, -0.2, -0.3]]); adv = torch.tensor([[-2.0, 1.0, 0.5, 0.5]])
    >>> loss, metrics = clip_cov(lp, lp, adv, cov_ratio=0.25, generator=g)  # Cov_0 = (-3 + 0.9) * (-2 - 0) = 4.2
    >>> metrics["cov_clip_frac"].item(), loss.item()  # token 0 selected: -(1 + 0.5 + 0.5) / 4
    (0.25, -0.5)
    """
    check_range("cov_ratio", cov_ratio, 0.0, 1.0, low_inclusive=False)
    check_range("cov_low", cov_low, None, None)
    if not cov_high >= cov_low:  # (also False for NaN)
        raise ValueError(f"cov_high must be in [cov_low, inf] = [{cov_low}, inf], got {cov_high}")
    check_choice("agg_mode", agg_mode, AGG_MODES)
    m, lp, old, adv = _prep(logprobs, old_logprobs, advantages, mask)
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    if clip is None:
        if clip_high is not None:
            raise ValueError(f"clip_high needs clip (PPO's clip for Clip-Cov's surrogate), got clip=None, clip_high={clip_high!r}")
        loss = -ratio * adv
        ppo_clipped = torch.zeros_like(m)
    else:
        hi = _check_clip(clip, clip_high)
        loss, ppo_clipped = _ppo_surrogate(ratio, adv, float(clip), hi)
        ppo_clipped = ppo_clipped & m
    with torch.no_grad():
        cov = _covariance(lp, adv, m)
        cand = m & ~ppo_clipped & (cov >= cov_low) & (cov <= cov_high)
        n_pick = int(float(cov_ratio) * int(m.sum()))
        positions = cand.flatten().nonzero().squeeze(-1)
        dev = generator.device if generator is not None else positions.device
        perm = torch.randperm(positions.numel(), generator=generator, device=dev).to(positions.device)
        sel = _flat_select(m, positions[perm[:n_pick]])
    loss = torch.where(sel, 0.0, loss)
    out = _reduce(loss, m, agg_mode, normalizer, global_tokens, global_seqs)
    metrics = _common_metrics(log_ratio, m)
    with torch.no_grad():
        metrics["clip_frac"] = _mmean((sel | ppo_clipped).to(lp.dtype), m)
        metrics["cov_clip_frac"] = _mmean(sel.to(lp.dtype), m)
    return out, metrics


@register_policy_loss("kl_cov")
@typechecked
def kl_cov(
    logprobs: Float[Tensor, "*batch time"],
    old_logprobs: Float[Tensor, "*batch time"],
    advantages: Float[Tensor, "*batch time"],
    mask: MaskT = None,
    *,
    cov_ratio: Num = 2e-3,
    beta: Num = 1.0,
    kl_estimator: str = "abs",
    agg_mode: str = "token-mean",
    normalizer: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> Out:
    r"""KL-Cov: a KL penalty on the top-k tokens by log-prob/advantage covariance.

    Cui et al. 2025 (arXiv:2505.22617), KL-Cov, with :math:`\mathrm{Cov}_t` as in
    :func:`clip_cov`:

    .. math::

        I_{KL} = \{t : \mathrm{Rank}(\mathrm{Cov}_t) \le \lfloor kN\rfloor\},\qquad
        \ell_t = -\rho_t A_t + \beta\,\widehat{\mathrm{KL}}_t\,[t \in I_{KL}]

    ``cov_ratio`` :math:`k` (2e-3 for the paper's 7B model, 2e-4 for 32B), ``beta``
    :math:`\beta` = 1. The paper writes :math:`D_{KL}(\pi_{old}\|\pi_\theta)` per token; the
    authors' code (verl's ``kl_cov``) uses :math:`|\log\pi_\theta - \log\pi_{old}|`, the default
    ``kl_estimator="abs"``; any name of :data:`rl2fx.kl_estimators.KL_ESTIMATORS` estimates
    :math:`\mathrm{KL}(\pi_{old}\|\pi_\theta)` from the sampled tokens instead (e.g. ``k3``).
    Ties in the covariance go to the earlier token (row-major); verl also penalises at
    least one token. Selection is over the whole batch: do not micro-batch this loss.
    Metrics: ``kl_cov_frac`` (fraction penalised), ``kl_penalty`` (token mean of the
    penalty term), ``ratio_mean``, ``approx_kl``.

    >>> lp = torch.tensor([[-3.0, -0.1, -0.2, -0.3]]); old = lp - 0.5; adv = torch.tensor([[-2.0, 1.0, 0.5, 0.5]])
    >>> loss, metrics = kl_cov(lp, old, adv, cov_ratio=0.25)
    >>> metrics["kl_cov_frac"].item(), round(metrics["kl_penalty"].item(), 4)  # token 0: 1.0 * |0.5| / 4
    (0.25, 0.125)
    """
    check_range("cov_ratio", cov_ratio, 0.0, 1.0, low_inclusive=False)
    check_range("beta", beta, 0.0, None)
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    check_choice("agg_mode", agg_mode, AGG_MODES)
    m, lp, old, adv = _prep(logprobs, old_logprobs, advantages, mask)
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    with torch.no_grad():
        cov = _covariance(lp, adv, m)
        k = int(float(cov_ratio) * int(m.sum()))
        order = torch.sort(cov[m], descending=True, stable=True).indices[:k]
        sel = _flat_select(m, m.flatten().nonzero().squeeze(-1)[order])
    # KL(π_old || π_θ) from tokens sampled by π_old: the estimator's "policy" is π_old
    kl = kl_estimate(old, lp, kl_estimator)
    penalty = torch.where(sel, float(beta) * kl, 0.0)
    loss = -ratio * adv + penalty
    out = _reduce(loss, m, agg_mode, normalizer, global_tokens, global_seqs)
    metrics = _common_metrics(log_ratio, m)
    with torch.no_grad():
        metrics["kl_cov_frac"] = _mmean(sel.to(lp.dtype), m)
        metrics["kl_penalty"] = _mmean(penalty, m)
    return out, metrics


def _dppo(lp: Tensor, old: Tensor, adv: Tensor, m: Tensor, too_far: Tensor, ratio_cap, agg, metrics_extra):
    """The DPPO surrogate given where the divergence left the trust region in the advantage's direction."""
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    keep = ~too_far
    if ratio_cap is None:
        loss = torch.where(keep, -ratio * adv, 0.0)
    else:
        weight = ratio.clamp(max=float(ratio_cap)).detach()
        loss = torch.where(keep, -adv * weight * lp, 0.0)
    out = _reduce(loss, m, *agg)
    metrics = _common_metrics(log_ratio, m)
    with torch.no_grad():
        metrics["clip_frac"] = _mmean(too_far.to(lp.dtype), m)
        metrics.update({k: _mmean(v, m) for k, v in metrics_extra.items()})
    return out, metrics


def _check_dppo(delta: Num, delta_high: Num | None, ratio_cap: Num | None, upper: float | None) -> float:
    check_range("delta", delta, 0.0, upper)
    hi = float(delta if delta_high is None else delta_high)
    check_range("delta_high", hi, 0.0, upper)
    if ratio_cap is not None:
        check_range("ratio_cap", ratio_cap, 0.0, None, low_inclusive=False)
    return hi


@register_policy_loss("dppo_tv")
@typechecked
def dppo_tv(
    logprobs: Float[Tensor, "*batch time"],
    old_logprobs: Float[Tensor, "*batch time"],
    advantages: Float[Tensor, "*batch time"],
    mask: MaskT = None,
    *,
    delta: Num = 0.15,
    delta_high: Num | None = None,
    ratio_cap: Num | None = None,
    agg_mode: str = "token-mean",
    normalizer: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> Out:
    r"""DPPO-Binary-TV: PPO's surrogate, masked where the total variation leaves the trust region.

    Qi et al., "Rethinking the Trust Region in LLM Reinforcement Learning", 2026
    (arXiv:2602.04879). PPO's clip is a mask on the ratio of the sampled token; DPPO masks
    on a divergence between :math:`\pi_{old}` and :math:`\pi_\theta` instead, here the Binary
    approximation (sampled token vs. the rest of the vocabulary), whose TV is
    :math:`D_t = |\pi_\theta(a_t) - \pi_{old}(a_t)|`:

    .. math::

        M_t = 0 \iff \big(A_t > 0 \wedge \pi_\theta(a_t) - \pi_{old}(a_t) > \delta_{high}\big)
              \vee \big(A_t < 0 \wedge \pi_{old}(a_t) - \pi_\theta(a_t) > \delta\big),\qquad
        \ell_t = -M_t\,\rho_t A_t

    (:math:`M` carries no gradient). Pass the sampler's (rollout engine's) log-probs as
    ``old_logprobs``: the paper anchors the trust region to the behaviour policy.
    ``delta`` 0.15 is the authors' default (their verl scripts). The authors' code
    (sail-sg/Stable-RL) and verl's ``dppo_tv`` use
    :math:`-M_t A_t\,\mathrm{sg}(\min(\rho_t, C))\log\pi_\theta`, the same gradient below
    :math:`C` (10 there, 20 in verl); ``ratio_cap=C`` gives that form. They also choose the
    negative-side test for :math:`A_t = 0` tokens, which only changes ``clip_frac``. Metrics: ``clip_frac``
    (masked fraction), ``tv_mean``, ``ratio_mean``, ``approx_kl``.

    >>> old = torch.log(torch.tensor([[0.5, 0.5, 0.5]])); lp = torch.log(torch.tensor([[0.7, 0.6, 0.4]]))
    >>> loss, metrics = dppo_tv(lp, old, torch.tensor([[1.0, 1.0, -1.0]]))
    >>> round(metrics["clip_frac"].item(), 4), round(loss.item(), 4)  # token 0 (+0.2 > 0.15) masked: (-1.2 + 0.8) / 3
    (0.3333, -0.1333)
    """
    hi = _check_dppo(delta, delta_high, ratio_cap, 1.0)
    check_choice("agg_mode", agg_mode, AGG_MODES)
    m, lp, old, adv = _prep(logprobs, old_logprobs, advantages, mask)
    with torch.no_grad():
        diff = torch.exp(lp) - torch.exp(old)
        too_far = m & (((adv > 0) & (diff > hi)) | ((adv < 0) & (-diff > float(delta))))
    agg = (agg_mode, normalizer, global_tokens, global_seqs)
    return _dppo(lp, old, adv, m, too_far, ratio_cap, agg, {"tv_mean": diff.abs()})


def _binary_kl(old: Tensor, lp: Tensor) -> Tensor:
    """KL(Bern(q) || Bern(p)) of the sampled token (q = π_old, p = π_θ), in log space; +inf when p = 1 > q."""
    q = torch.exp(old)
    log1m_q = torch.log(-torch.expm1(old))
    log1m_p = torch.log(-torch.expm1(lp))
    rest = torch.where(q < 1, (1 - q) * (log1m_q - log1m_p), 0.0)
    return q * (old - lp) + rest


@register_policy_loss("dppo_kl")
@typechecked
def dppo_kl(
    logprobs: Float[Tensor, "*batch time"],
    old_logprobs: Float[Tensor, "*batch time"],
    advantages: Float[Tensor, "*batch time"],
    mask: MaskT = None,
    *,
    delta: Num = 0.05,
    delta_high: Num | None = None,
    ratio_cap: Num | None = None,
    agg_mode: str = "token-mean",
    normalizer: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> Out:
    r"""DPPO-Binary-KL: as :func:`dppo_tv` with the binary KL as the divergence.

    Qi et al. 2026 (arXiv:2602.04879). With :math:`q = \pi_{old}(a_t)`, :math:`p = \pi_\theta(a_t)`,

    .. math::

        D_t = q\log\frac{q}{p} + (1-q)\log\frac{1-q}{1-p},\qquad
        M_t = 0 \iff \big(A_t > 0 \wedge p > q \wedge D_t > \delta_{high}\big) \vee \big(A_t < 0 \wedge p < q \wedge D_t > \delta\big)

    and :math:`\ell_t = -M_t\rho_t A_t`. The binary KL is computed exactly in log space
    (verl adds 1e-8 inside the logarithm). ``delta`` 0.05 is the authors' default;
    ``ratio_cap`` as in :func:`dppo_tv`. Metrics: ``clip_frac``, ``binary_kl_mean`` (an
    infinite binary KL, :math:`p = 1 > q`, counts as 0 there), ``ratio_mean``, ``approx_kl``.

    >>> old = torch.log(torch.tensor([[0.5, 0.5]])); lp = torch.log(torch.tensor([[0.9, 0.55]]))
    >>> loss, metrics = dppo_kl(lp, old, torch.tensor([[1.0, 1.0]]))
    >>> metrics["clip_frac"].item(), round(loss.item(), 4)  # D_0 = 0.51 > 0.05 masked; -1.1 / 2
    (0.5, -0.55)
    """
    hi = _check_dppo(delta, delta_high, ratio_cap, None)
    check_choice("agg_mode", agg_mode, AGG_MODES)
    m, lp, old, adv = _prep(logprobs, old_logprobs, advantages, mask)
    with torch.no_grad():
        d = _binary_kl(old, lp)
        up, down = lp > old, lp < old
        too_far = m & (((adv > 0) & up & (d > hi)) | ((adv < 0) & down & (d > float(delta))))
        finite_d = torch.where(torch.isfinite(d), d, 0.0)
    agg = (agg_mode, normalizer, global_tokens, global_seqs)
    return _dppo(lp, old, adv, m, too_far, ratio_cap, agg, {"binary_kl_mean": finite_d})


@register_policy_loss("dro")
@typechecked
def dro(
    logprobs: Float[Tensor, "*batch time"],
    old_logprobs: Float[Tensor, "*batch time"],
    advantages: Float[Tensor, "*batch time"],
    mask: MaskT = None,
    *,
    beta: Num = 0.05,
    agg_mode: str = "token-mean",
    normalizer: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> Out:
    r"""DRO: policy gradient on :math:`\log\pi` plus a quadratic penalty on the log-ratio to the sampler.

    Richemond et al., "Offline Regularised Reinforcement Learning for Large Language
    Models Alignment", 2024 (arXiv:2405.19107), the policy part of the DRO loss
    :math:`\tfrac12(r - V - \beta\log\frac{\pi_\theta}{\pi_{old}})^2`; Kimi k1.5 (arXiv:2501.12599)
    uses the same squared penalty; as Tinker's ``dro`` loss:

    .. math::

        \ell_t = -A_t \log\pi_\theta(a_t) + \frac{\beta}{2}\Big(\log\frac{\pi_\theta(a_t)}{\pi_{old}(a_t)}\Big)^2

    (``old_logprobs`` is the sampling policy :math:`q`; the advantage is the caller's,
    e.g. :math:`r - V`). Off-policy and even offline; the penalty's gradient vanishes at
    :math:`\pi_\theta = \pi_{old}`, so there the gradient is the plain policy gradient.
    ``beta`` default 0.05 (Tinker's example). Metrics: ``penalty`` (token mean of the
    quadratic term), ``ratio_mean``, ``approx_kl``.

    >>> lp = torch.tensor([[-1.0, -2.0]], requires_grad=True); old = torch.tensor([[-1.0, -3.0]])
    >>> loss, metrics = dro(lp, old, torch.tensor([[1.0, 0.0]]), beta=0.5)
    >>> loss.backward(); loss.item(), lp.grad.tolist()  # (1 + 0.25) / 2; grads (-1 + 0) / 2, (0 + 0.5) / 2
    (0.625, [[-0.5, 0.25]])
    """
    check_range("beta", beta, 0.0, None)
    check_choice("agg_mode", agg_mode, AGG_MODES)
    m, lp, old, adv = _prep(logprobs, old_logprobs, advantages, mask)
    log_ratio = lp - old
    penalty = 0.5 * float(beta) * log_ratio.square()
    loss = -adv * lp + penalty
    out = _reduce(loss, m, agg_mode, normalizer, global_tokens, global_seqs)
    metrics = _common_metrics(log_ratio, m)
    with torch.no_grad():
        metrics["penalty"] = _mmean(penalty, m)
    return out, metrics
