r"""Advantage variants: several rewards (GDPO), a per-token optimal baseline (OTB),
and GRPO scaled by the batch std (TRL's ``scale_rewards="batch"``).

Same layout as :mod:`rl2fx.returns.group`: ``group_size`` contiguous responses per
prompt; ``mask`` is the response mask; masked-out positions never change a result
(they are selected away with ``torch.where``, so even NaN there is harmless).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl2fx._typing import Float, Shaped, check_range, typechecked
from rl2fx.returns import _common as C
from rl2fx.returns.group import _layout, _same, _spread, _std
from rl2fx.returns.registry import register_estimator

__all__ = ["grpo_batch_std", "gdpo", "optimal_token_baseline"]


@register_estimator("grpo_batch_std", needs_values=False)
@typechecked
def grpo_batch_std(
    rewards: Float[Tensor, "batch *steps"],
    group_size: int,
    *,
    mask: Shaped[Tensor, "batch mtime"] | None = None,
    eps: float | int = 1e-6,
    allow_nonfinite: bool = False,
) -> Float[Tensor, "batch *out"]:
    r"""GRPO centred per group, scaled by the std of the whole batch (TRL's ``scale_rewards="batch"``).

    .. math::  A_i = \frac{s_i - \operatorname{mean}(s_{g(i)})}{\operatorname{std}(s_{1..B}) + \epsilon}

    The group mean removes the prompt's difficulty; one batch-wide std (of the
    scores, Bessel-corrected, over this batch) keeps the relative scale of the
    groups, so that low-variance prompts are not blown up (Liu et al. 2025,
    arXiv:2503.20783, on the std's difficulty bias; TRL's ``GRPOConfig.scale_rewards``).
    A zero-variance group gets exactly 0.

    >>> import torch
    >>> grpo_batch_std(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2, eps=0.0)
    tensor([ 1., -1.,  0.,  0.])
    """
    check_range("eps", eps, 0.0, None)
    scores, m, _ = _layout(rewards, group_size, mask=mask, allow_nonfinite=allow_nonfinite)
    g = scores.view(-1, group_size)
    adv = torch.where(_same(g), 0.0, (g - g.mean(-1, keepdim=True)) / (_std(scores) + eps)).reshape(-1)
    return _spread(adv, rewards, m)


@register_estimator("gdpo", needs_values=False)
@typechecked
def gdpo(
    reward_components: Float[Tensor, "batch k"],
    group_size: int,
    *,
    reward_weights: Float[Tensor, "kw"] | None = None,
    mask: Shaped[Tensor, "batch mtime"] | None = None,
    eps: float | int = 1e-6,
    batch_norm: bool = True,
    allow_nonfinite: bool = False,
) -> Float[Tensor, "batch *out"]:
    r"""GDPO: group reward-decoupled normalisation for several rewards (Liu et al. 2026, arXiv:2601.05242).

    .. math::

        \hat A^{(k)}_i = \frac{r^{(k)}_i - \operatorname{mean}(r^{(k)}_{g(i)})}{\operatorname{std}(r^{(k)}_{g(i)}) + \epsilon},
        \qquad \tilde A_i = \sum_k w_k \hat A^{(k)}_i, \qquad
        A_i = \frac{\tilde A_i - \operatorname{mean}_{\text{batch}} \tilde A}{\operatorname{std}_{\text{batch}} \tilde A + \epsilon}

    Each reward function is normalised within the prompt's group *before* the
    weighted sum, so distinct reward combinations do not collapse onto one
    advantage as they do when GRPO normalises the summed reward; the final
    batch-wide normalisation (``batch_norm``) keeps the scale independent of the
    number of rewards. ``reward_components``: ``[batch, k]``, one column per
    reward function; ``reward_weights``: ``[k]`` (default all 1). A component
    constant within a group contributes exactly 0 there. Returns ``[batch]``, or
    ``[batch, time]`` on the masked-in tokens when ``mask`` is given.

    >>> import torch
    >>> r = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    >>> gdpo(r, group_size=2, batch_norm=False, eps=0.0)
    tensor([ 0.7071, -0.7071,  0.7071, -0.7071])
    """
    check_range("eps", eps, 0.0, None)
    check_range("group_size", group_size, 1, None)
    B, K = reward_components.shape
    if B % group_size:
        raise ValueError(f"the batch size {B} is not a multiple of group_size {group_size}")
    m = C.as_bool("mask", mask)
    if m is not None and (m.ndim != 2 or m.shape[0] != B):
        raise ValueError(f"mask must have shape ({B}, time), got {tuple(m.shape)}")
    C.check_all_finite(allow_nonfinite, reward_components=reward_components)
    dt = C.acc_dtype(reward_components.dtype)
    if reward_weights is None:
        w = torch.ones(K, dtype=dt, device=reward_components.device)
    else:
        if reward_weights.shape != (K,):
            raise ValueError(f"reward_weights must have shape ({K},) (one weight per reward component), "
                             f"got {tuple(reward_weights.shape)}")
        C.check_all_finite(False, reward_weights=reward_weights)
        w = reward_weights.to(dt)
    g = reward_components.to(dt).view(B // group_size, group_size, K)
    same = (g == g[:, :1]).all(1, keepdim=True)
    sd = g.std(1, keepdim=True) if group_size > 1 and g.numel() else torch.zeros_like(g[:, :1])
    per = torch.where(same, 0.0, (g - g.mean(1, keepdim=True)) / (sd + eps))
    adv = (per * w).sum(-1).reshape(-1)
    if batch_norm:
        adv = torch.where((adv == adv[:1]).all(), 0.0, (adv - adv.mean()) / (_std(adv) + eps))
    if m is None:
        return adv.to(reward_components.dtype)
    return C.masked_out(adv.unsqueeze(-1).expand(m.shape), m).to(reward_components.dtype)


@register_estimator("optimal_token_baseline", needs_values=False)
@typechecked
def optimal_token_baseline(
    rewards: Float[Tensor, "batch time"],
    old_logprobs: Float[Tensor, "batch time"],
    sum_pi_squared: Float[Tensor, "batch time"],
    group_size: int,
    *,
    mask: Shaped[Tensor, "batch time"] | None = None,
    rollout_is_weights: Float[Tensor, "batch time"] | None = None,
    handle_zero_tail: bool = False,
    eps: float | int = 1e-8,
    allow_nonfinite: bool = False,
) -> tuple[Float[Tensor, "batch time"], Float[Tensor, "batch time"]]:
    r"""Optimal Token Baseline (Li et al. 2026, "The Optimal Token Baseline: Variance Reduction for
    Long-Horizon LLM-RL"; verl's ``optimal_token_baseline``).

    .. math::

        G_{i,t} = \sum_{t' \ge t} r_{i,t'}, \quad
        w_{i,j} = \underbrace{1 - 2\pi_{i,j} + \textstyle\sum_v \pi_{i,j}(v)^2}_{\|\nabla_z \log\pi\|^2}\,\bar\rho_{i,j}^2, \quad
        W_{i,t} = \sum_{j \le t} w_{i,j}, \quad
        B_{g,t} = \frac{\sum_{i \in g} G_{i,t} W_{i,t}}{\sum_{i \in g} W_{i,t} + \epsilon}, \quad
        A_{i,t} = G_{i,t} - B_{g(i),t}

    The variance-minimising baseline weights each trajectory by its cumulative
    squared score norm up to ``t``; the Logit-Gradient Proxy replaces that norm by
    :math:`1 - 2\pi_j + \sum_v \pi(v)^2` (the squared norm of the softmax
    log-prob's gradient in the logits), which needs only the forward pass:
    ``old_logprobs`` is :math:`\log \pi_j` of the sampled token and
    ``sum_pi_squared`` :math:`\sum_v \pi_j(v)^2`. ``rollout_is_weights``
    (:math:`\bar\rho`, truncated sampler-to-trainer ratios) scale ``w`` by
    :math:`\bar\rho^2`. Sums over ``i`` count only trajectories masked in at
    ``t``. A group of one trajectory has baseline 0. With ``handle_zero_tail``
    the unique longest trajectory of a group gets baseline 0 past the
    second-longest length (verl's option). Returns ``(advantages, returns)``.

    >>> import torch
    >>> r = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    >>> lp, s2 = torch.log(torch.full((2, 2), 0.5)), torch.full((2, 2), 0.5)  # w = 0.5 per token
    >>> optimal_token_baseline(r, lp, s2, group_size=2, eps=0.0)[0]
    tensor([[ 0.5000,  0.5000],
            [-0.5000, -0.5000]])
    """
    check_range("eps", eps, 0.0, None)
    check_range("group_size", group_size, 1, None)
    B, T = rewards.shape
    if B % group_size:
        raise ValueError(f"the batch size {B} is not a multiple of group_size {group_size}")
    m = C.as_bool("mask", mask)
    mm = torch.ones_like(rewards, dtype=torch.bool) if m is None else m
    if not allow_nonfinite:
        for name, x in (("rewards", rewards), ("old_logprobs", old_logprobs), ("sum_pi_squared", sum_pi_squared),
                        ("rollout_is_weights", rollout_is_weights)):
            if x is not None:
                C.check_all_finite(False, **{name: torch.where(mm, x, 0.0)})
    dt = C.acc_dtype(rewards.dtype)
    r = torch.where(mm, rewards.to(dt), 0.0)
    G = r.flip(-1).cumsum(-1).flip(-1)
    w = 1.0 - 2.0 * old_logprobs.to(dt).exp() + sum_pi_squared.to(dt)
    if rollout_is_weights is not None:
        w = w * rollout_is_weights.to(dt) ** 2
    W = torch.where(mm, w, 0.0).cumsum(-1)
    n = B // group_size  # not -1: an empty batch has no size to infer
    Gg, Wg, Mg = G.view(n, group_size, T), W.view(n, group_size, T), mm.view(n, group_size, T)
    num = torch.where(Mg, Gg * Wg, 0.0).sum(1, keepdim=True)
    den = torch.where(Mg, Wg, 0.0).sum(1, keepdim=True) + eps
    base = (num / den).expand(-1, group_size, -1)
    if group_size == 1:
        base = torch.zeros_like(base)
    if handle_zero_tail and group_size > 1:
        lens = Mg.sum(-1)  # [n, G]
        top2 = lens.topk(2, dim=-1).values
        unique = (lens == top2[:, :1]).sum(-1, keepdim=True) == 1
        longest = (lens == top2[:, :1]) & unique & (top2[:, :1] > top2[:, 1:])
        tail = torch.arange(T, device=rewards.device) >= top2[:, 1:].unsqueeze(-1)  # [n, 1, T]
        base = torch.where(longest.unsqueeze(-1) & tail, 0.0, base)
    adv = torch.where(mm, G - base.reshape(B, T), 0.0)
    return adv.to(rewards.dtype), torch.where(mm, G, 0.0).to(rewards.dtype)
