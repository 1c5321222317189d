r"""Critic-free group baselines for LLM post-training.

REINFORCE (RL2 style), GRPO, Dr. GRPO, RLOO, REINFORCE++, and the estimators the
LLM trainers (verl, TRL, OpenRLHF) ship besides: ReMax, OPO, GPG, GRPO pass@k and
REINFORCE++-baseline.

Layout (shared by every function here):

* the batch holds ``n_prompts * group_size`` responses, the ``group_size``
  responses of one prompt **contiguous** (rows ``[k*G, (k+1)*G)`` belong to prompt ``k``);
  a batch that is not a multiple of ``group_size`` raises an error naming both numbers;
* ``rewards`` is either sequence-level ``[batch]`` or token-level ``[batch, time]``;
  a response's score is then the sum of its rewards over masked-in steps;
* advantages come back as ``[batch]`` for ``[batch]`` rewards without a mask, and
  otherwise as ``[batch, time]``: the response's advantage on every masked-in
  token, 0 elsewhere (``mask`` is RL2's ``action_mask``);
* identical rewards within a group give exactly zero advantage, never NaN.

Standard deviations are Bessel-corrected (``torch.std``), 0 for a single element.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rl2fx._typing import Float, Shaped, check_range, typechecked
from rl2fx.returns import _common as C
from rl2fx.returns.gae import discounted
from rl2fx.returns.registry import register_estimator
from rl2fx.returns.whiten import whiten

__all__ = [
    "reinforce",
    "grpo",
    "dr_grpo",
    "rloo",
    "reinforce_pp",
    "remax",
    "opo",
    "gpg",
    "grpo_passk",
    "reinforce_pp_baseline",
]


def _layout(rewards: Tensor, group_size: int, *, mask: Tensor | None, allow_nonfinite: bool):
    check_range("group_size", group_size, 1, None)
    if rewards.ndim not in (1, 2):
        raise ValueError(
            f"rewards must be [batch] (sequence-level) or [batch, time] (token-level), got shape "
            f"{tuple(rewards.shape)}"
        )
    B = rewards.shape[0]
    if B % group_size:
        raise ValueError(
            f"the batch size {B} is not a multiple of group_size {group_size}: rewards must hold "
            f"group_size contiguous responses per prompt"
        )
    m = C.as_bool("mask", mask)
    if m is not None:
        if m.ndim != 2 or m.shape[0] != B or (rewards.ndim == 2 and m.shape != rewards.shape):
            want = tuple(rewards.shape) if rewards.ndim == 2 else (B, "time")
            raise ValueError(f"mask must have shape {want}, got {tuple(m.shape)}")
    C.check_all_finite(allow_nonfinite, rewards=rewards)
    dt = C.acc_dtype(rewards.dtype)
    r = rewards.to(dt)
    scores = r if r.ndim == 1 else (r if m is None else torch.where(m, r, 0.0)).sum(-1)
    return scores, m, dt


def _spread(adv: Tensor, rewards: Tensor, m: Tensor | None) -> Tensor:
    """Per-response advantages onto their masked-in tokens (or left as ``[batch]``)."""
    if rewards.ndim == 1 and m is None:
        return adv.to(rewards.dtype)
    out = adv.unsqueeze(-1).expand(rewards.shape if m is None else m.shape)
    return C.masked_out(out, m).to(rewards.dtype)


def _std(x: Tensor, dim: int | None = None) -> Tensor:
    n = x.numel() if dim is None else x.shape[dim]
    if n < 2 or x.numel() == 0:  # (an empty batch: no std to take, and torch warns about one)
        return torch.zeros_like(x.sum() if dim is None else x.sum(dim, keepdim=True))
    return x.std() if dim is None else x.std(dim, keepdim=True)


def _same(grouped: Tensor) -> Tensor:
    """``[n_groups, 1]``: True where every score of the group is identical (a zero-variance group)."""
    return (grouped == grouped[:, :1]).all(-1, keepdim=True)


def _centred(scores: Tensor, group_size: int, *, norm_std: bool, eps: float | int, global_norm: bool = False) -> Tensor:
    # global statistics are one group spanning the batch
    grouped = scores.view(1, -1) if global_norm else scores.view(-1, group_size)
    adv = grouped - grouped.mean(-1, keepdim=True)
    if norm_std:
        adv = adv / (_std(grouped, -1) + eps)
    # a group of identical scores has mean exactly equal to each score only up to rounding:
    # force the zero so that ties never leak ±eps-scaled noise
    return torch.where(_same(grouped), 0.0, adv).reshape(-1)


@register_estimator("reinforce", needs_values=False)
@typechecked
def reinforce(
    rewards: Float[Tensor, "batch *steps"],
    group_size: int,
    *,
    norm_std: bool = False,
    global_norm: bool = False,
    mask: Shaped[Tensor, "batch mtime"] | None = None,
    eps: float | int = 1e-6,
    allow_nonfinite: bool = False,
) -> Float[Tensor, "batch *out"]:
    r"""RL2's REINFORCE advantage: the score minus the per-prompt mean, optionally divided by the std.

    .. math::  A_i = \frac{s_i - \operatorname{mean}_{j \in g(i)} s_j}{\operatorname{std}_{j \in g(i)} s_j + \epsilon}

    (the division only with ``norm_std``). With ``global_norm`` the mean and std
    are taken over the whole batch instead of each prompt's group (RL2's
    ``global_norm``). Williams 1992 for REINFORCE; the group-mean baseline is
    RL2's ``compute_reinforce_adv``.

    >>> import torch
    >>> reinforce(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2)
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    check_range("eps", eps, 0.0, None)
    scores, m, _ = _layout(rewards, group_size, mask=mask, allow_nonfinite=allow_nonfinite)
    return _spread(_centred(scores, group_size, norm_std=norm_std, eps=eps, global_norm=global_norm), rewards, m)


@register_estimator("grpo", needs_values=False)
@typechecked
def grpo(
    rewards: Float[Tensor, "batch *steps"],
    group_size: int,
    *,
    norm_std: bool = True,
    mask: Shaped[Tensor, "batch mtime"] | None = None,
    eps: float | int = 1e-6,
    allow_nonfinite: bool = False,
) -> Float[Tensor, "batch *out"]:
    r"""GRPO's group-relative advantage (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, §4.1.2).

    .. math::  A_i = \frac{s_i - \operatorname{mean}(s_{g(i)})}{\operatorname{std}(s_{g(i)}) + \epsilon}

    The same advantage on every token of the response (outcome supervision).

    >>> import torch
    >>> grpo(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2)
    tensor([ 0.7071, -0.7071,  0.0000,  0.0000])
    """
    check_range("eps", eps, 0.0, None)
    scores, m, _ = _layout(rewards, group_size, mask=mask, allow_nonfinite=allow_nonfinite)
    return _spread(_centred(scores, group_size, norm_std=norm_std, eps=eps), rewards, m)


@register_estimator("dr_grpo", needs_values=False)
@typechecked
def dr_grpo(
    rewards: Float[Tensor, "batch *steps"],
    group_size: int,
    *,
    mask: Shaped[Tensor, "batch mtime"] | None = None,
    allow_nonfinite: bool = False,
) -> Float[Tensor, "batch *out"]:
    r"""Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783).

    .. math::  A_i = s_i - \operatorname{mean}(s_{g(i)})

    GRPO without the std division, which biases updates towards too-easy and
    too-hard prompts (the paper's other fix, dropping the per-response length
    normalisation, belongs to the loss aggregation, not the advantage).

    >>> import torch
    >>> dr_grpo(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2)
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    scores, m, _ = _layout(rewards, group_size, mask=mask, allow_nonfinite=allow_nonfinite)
    return _spread(_centred(scores, group_size, norm_std=False, eps=0.0), rewards, m)


@register_estimator("rloo", needs_values=False)
@typechecked
def rloo(
    rewards: Float[Tensor, "batch *steps"],
    group_size: int,
    *,
    mask: Shaped[Tensor, "batch mtime"] | None = None,
    allow_nonfinite: bool = False,
) -> Float[Tensor, "batch *out"]:
    r"""REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv:2402.14740; Kool et al. 2019).

    .. math::  A_i = s_i - \frac{1}{k-1}\sum_{j \in g(i), j \ne i} s_j = \frac{k}{k-1}\,(s_i - \bar s_{g(i)})

    Needs ``group_size >= 2``.

    >>> import torch
    >>> rloo(torch.tensor([1.0, 0.0, 0.0]), group_size=3)
    tensor([ 1.0000, -0.5000, -0.5000])
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for rloo (leave-one-out needs another sample), got {group_size}")
    scores, m, _ = _layout(rewards, group_size, mask=mask, allow_nonfinite=allow_nonfinite)
    centred = _centred(scores, group_size, norm_std=False, eps=0.0)
    return _spread(centred * (group_size / (group_size - 1)), rewards, m)


@register_estimator("reinforce_pp", needs_values=False)
@typechecked
def reinforce_pp(
    rewards: Float[Tensor, "batch *steps"],
    group_size: int = 1,
    *,
    gamma: float | int = 1.0,
    mask: Shaped[Tensor, "batch mtime"] | None = None,
    group: Any = None,
    eps: float | int = 1e-8,
    backend: str = "auto",
    allow_nonfinite: bool = False,
) -> Float[Tensor, "batch *out"]:
    r"""REINFORCE++ (Hu 2025, arXiv:2501.03262): token returns, normalised over the whole batch.

    .. math::

        G_t = \sum_{k \ge t} \gamma^{k-t} r_k, \qquad
        A_t = \frac{(G_t - b_{g}) - \mu_{\text{batch}}}{\sqrt{\sigma^2_{\text{batch}} + \epsilon}}

    Token rewards may already include the per-token KL penalty
    (:math:`r_t = \mathbb{1}[t = \text{EOS}]\, s - \beta\,\mathrm{KL}_t`); a
    sequence-level ``[batch]`` reward is placed on the last masked-in token.
    :math:`b_g` is 0 for ``group_size == 1`` and the group-mean score otherwise
    (the paper's "REINFORCE++-baseline" for several samples per prompt). The
    mean and std run over every masked-in token of the batch, across all ranks
    of ``group`` (a ``torch.distributed`` process group) when given.

    >>> import torch
    >>> reinforce_pp(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    tensor([ 0.8660, -0.8660,  0.8660, -0.8660])
    """
    check_range("gamma", gamma, 0.0, 1.0)
    check_range("eps", eps, 0.0, None)
    scores, m, dt = _layout(rewards, group_size, mask=mask, allow_nonfinite=allow_nonfinite)
    r = rewards.to(dt)
    if r.ndim == 1:
        if m is None:
            tok = r.unsqueeze(-1)
        else:
            last = C.is_last(m, like=m, nxt=C.next_index(m))
            tok = torch.where(last, r.unsqueeze(-1), 0.0)
    else:
        tok = r
    G = discounted(tok, gamma=gamma, mask=m, backend=backend, allow_nonfinite=True)  # rewards checked above
    if group_size > 1:
        G = G - scores.view(-1, group_size).mean(-1, keepdim=True).expand(-1, group_size).reshape(-1, 1)
    adv = whiten(G, m, group=group, eps=eps, allow_nonfinite=allow_nonfinite)
    if rewards.ndim == 1 and m is None:
        adv = adv[:, 0]
    return adv.to(rewards.dtype)


# ============================================================== estimators shipped by verl / TRL / OpenRLHF


@register_estimator("remax", needs_values=False)
@typechecked
def remax(
    rewards: Float[Tensor, "batch *steps"],
    greedy_rewards: Float[Tensor, "*prompts"],
    group_size: int = 1,
    *,
    mask: Shaped[Tensor, "batch mtime"] | None = None,
    allow_nonfinite: bool = False,
) -> Float[Tensor, "batch *out"]:
    r"""ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient RL Method for Aligning LLMs", arXiv:2310.10505).

    .. math::  A_i = s_i - s(\hat y_{k(i)}), \qquad \hat y_k = \text{greedy response to prompt } k

    The baseline is the reward of the greedy (argmax-decoded) response to the
    same prompt, so it costs one extra greedy generation per prompt and no
    critic. ``greedy_rewards`` holds one reward per prompt, shape
    ``[batch / group_size]`` (the greedy response's score: its sequence reward,
    or the sum of its token rewards); each of the ``group_size`` sampled
    responses of prompt ``k`` is compared with ``greedy_rewards[k]``. A response
    that scores exactly as the greedy one gets exactly 0. (verl's
    ``compute_remax_outcome_advantage`` subtracts the baseline from the
    reward-to-go of token-level rewards; with outcome rewards, the case it is
    written for, both are the same.)

    >>> import torch
    >>> remax(torch.tensor([1.0, 0.0, 1.0, 1.0]), greedy_rewards=torch.tensor([1.0, 0.0]), group_size=2)
    tensor([ 0., -1.,  1.,  1.])
    """
    scores, m, dt = _layout(rewards, group_size, mask=mask, allow_nonfinite=allow_nonfinite)
    n_prompts = scores.shape[0] // group_size
    if greedy_rewards.shape != (n_prompts,):
        raise ValueError(
            f"greedy_rewards must have shape ({n_prompts},): one greedy reward per prompt (batch size "
            f"{scores.shape[0]} / group_size {group_size}), got shape {tuple(greedy_rewards.shape)}"
        )
    C.check_all_finite(allow_nonfinite, greedy_rewards=greedy_rewards)
    base = greedy_rewards.to(dt).repeat_interleave(group_size)
    return _spread(scores - base, rewards, m)


@register_estimator("opo", needs_values=False)
@typechecked
def opo(
    rewards: Float[Tensor, "batch *steps"],
    group_size: int,
    *,
    mask: Shaped[Tensor, "batch mtime"] | None = None,
    lengths: Shaped[Tensor, "*lbatch"] | None = None,
    allow_nonfinite: bool = False,
) -> Float[Tensor, "batch *out"]:
    r"""On-Policy RL with Optimal reward baseline (Hao et al. 2025, arXiv:2505.23585).

    .. math::

        b_g = \frac{\sum_{j \in g} l_j\, s_j}{\sum_{j \in g} l_j}, \qquad A_i = s_i - b_{g(i)}

    with :math:`l_j` the length of response :math:`j`. Under the paper's
    assumption that the squared gradient norm of a response grows with its
    length, this length-weighted mean is the variance-minimising baseline.
    Lengths come from ``lengths`` (``[batch]``, >= 0) when given, else from
    the mask (the number of masked-in tokens), else, for token-level rewards
    without a mask, every response has the full length ``time`` (the plain
    group mean); sequence-level ``[batch]`` rewards without a mask need
    ``lengths``. A group whose lengths are all 0 falls back to the plain mean;
    identical scores give exactly 0.

    >>> import torch
    >>> # b = (1*1 + 3*0) / (1 + 3) = 0.25
    >>> opo(torch.tensor([1.0, 0.0]), group_size=2, lengths=torch.tensor([1, 3]))
    tensor([ 0.7500, -0.2500])
    """
    scores, m, dt = _layout(rewards, group_size, mask=mask, allow_nonfinite=allow_nonfinite)
    B = scores.shape[0]
    if lengths is not None:
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape ({B},) (one length per response), got {tuple(lengths.shape)}")
        ln = lengths.to(dt)
        C.check_all_finite(False, lengths=ln)
        if bool((ln < 0).any()):
            raise ValueError(f"lengths must be >= 0, got the value {ln[ln < 0][0].item()!r}")
    elif m is not None:
        ln = m.to(dt).sum(-1)
    elif rewards.ndim == 2:
        ln = torch.full((B,), float(rewards.shape[-1]), dtype=dt, device=rewards.device)
    else:
        raise ValueError(
            "opo needs the response lengths: pass mask ([batch, time]) or lengths ([batch]) with "
            "sequence-level [batch] rewards"
        )
    g, w = scores.view(-1, group_size), ln.view(-1, group_size)
    tot = w.sum(-1, keepdim=True)
    weighted = (w * g).sum(-1, keepdim=True) / torch.where(tot > 0, tot, 1.0)
    base = torch.where(tot > 0, weighted, g.mean(-1, keepdim=True))
    adv = torch.where(_same(g), 0.0, g - base).reshape(-1)
    return _spread(adv, rewards, m)


@register_estimator("gpg", needs_values=False)
@typechecked
def gpg(
    rewards: Float[Tensor, "batch *steps"],
    group_size: int,
    *,
    mask: Shaped[Tensor, "batch mtime"] | None = None,
    norm_std: bool = False,
    eps: float | int = 1e-6,
    allow_nonfinite: bool = False,
) -> Float[Tensor, "batch *out"]:
    r"""Group Policy Gradient (Chu et al. 2025, "GPG: A Simple and Strong RL Baseline", arXiv:2504.02546).

    .. math::

        A_i = \alpha\, \frac{s_i - \operatorname{mean}(s_{g(i)})}{F_{\text{norm}}}, \qquad
        \alpha = \frac{B}{B - M}

    with :math:`B` the batch size and :math:`M` the number of responses in
    zero-variance groups (all scores of the prompt equal: their advantage is 0
    and they carry no gradient). Averaging the loss over all :math:`B`
    responses would shrink the gradient by :math:`(B-M)/B`; :math:`\alpha`
    undoes that ("accurate gradient estimation"). :math:`F_{\text{norm}} = 1`
    by default, or the group std plus ``eps`` with ``norm_std``.

    Differences from verl's ``compute_gpg_outcome_advantage``: verl takes
    :math:`M` as ``B - count_nonzero(scores)`` (the responses with reward 0,
    which equals the paper's count only when every non-degenerate group has
    no 0 reward); this follows the paper. When every group is degenerate
    (:math:`B = M`) all advantages are 0 and there is no division. :math:`B`
    and :math:`M` are counted on this batch (one data-parallel rank's share).

    >>> import torch
    >>> # group 2 is degenerate: M = 2, alpha = 4 / 2
    >>> gpg(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2)
    tensor([ 1., -1.,  0.,  0.])
    """
    check_range("eps", eps, 0.0, None)
    scores, m, _ = _layout(rewards, group_size, mask=mask, allow_nonfinite=allow_nonfinite)
    g = scores.view(-1, group_size)
    same = _same(g)
    B = scores.shape[0]
    M = int(same.sum()) * group_size
    alpha = B / (B - M) if B > M else 1.0
    adv = g - g.mean(-1, keepdim=True)
    if norm_std:
        adv = adv / (_std(g, -1) + eps)
    adv = torch.where(same, 0.0, alpha * adv).reshape(-1)
    return _spread(adv, rewards, m)


@register_estimator("grpo_passk", needs_values=False)
@typechecked
def grpo_passk(
    rewards: Float[Tensor, "batch *steps"],
    group_size: int,
    *,
    mask: Shaped[Tensor, "batch mtime"] | None = None,
    norm_std: bool = True,
    eps: float | int = 1e-6,
    allow_nonfinite: bool = False,
) -> Float[Tensor, "batch *out"]:
    r"""GRPO for pass@k (Thrampoulidis et al. 2025, arXiv:2505.15201; verl's ``grpo_passk``).

    .. math::

        A_i = \begin{cases}
            \dfrac{s_{(1)} - s_{(2)}}{\operatorname{std}(s_{g(i)}) + \epsilon} & i = \arg\max_{j \in g(i)} s_j \\
            0 & \text{otherwise}
        \end{cases}

    with :math:`s_{(1)} \ge s_{(2)}` the largest and second-largest scores of the
    group (no std division without ``norm_std``). Pass@k only rewards the best
    of :math:`k` samples, so only the best response of each group gets an
    advantage: its margin over the runner-up. Ties for the maximum give a margin
    of 0, so the whole group gets 0; the position that would receive it is the
    first maximal index (``torch.argmax``). Needs ``group_size >= 2``.

    >>> import torch
    >>> grpo_passk(torch.tensor([0.0, 3.0, 1.0, 2.0, 2.0, 2.0]), group_size=3, norm_std=False)
    tensor([0., 2., 0., 0., 0., 0.])
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for grpo_passk (it needs a runner-up), got {group_size}")
    check_range("eps", eps, 0.0, None)
    scores, m, _ = _layout(rewards, group_size, mask=mask, allow_nonfinite=allow_nonfinite)
    g = scores.view(-1, group_size)
    top2 = g.topk(2, dim=-1).values  # values only: which tied index topk picks does not matter
    gap = (top2[:, 0] - top2[:, 1]).unsqueeze(-1)
    if norm_std:
        gap = torch.where(gap == 0, 0.0, gap / (_std(g, -1) + eps))
    best = g.argmax(-1, keepdim=True)  # first maximal index
    adv = torch.zeros_like(g).scatter(-1, best, gap).reshape(-1)
    return _spread(adv, rewards, m)


@register_estimator("reinforce_pp_baseline", needs_values=False)
@typechecked
def reinforce_pp_baseline(
    rewards: Float[Tensor, "batch *steps"],
    group_size: int,
    *,
    mask: Shaped[Tensor, "batch mtime"] | None = None,
    group: Any = None,
    eps: float | int = 1e-8,
    allow_nonfinite: bool = False,
) -> Float[Tensor, "batch *out"]:
    r"""REINFORCE++-baseline (Hu 2025, arXiv:2501.03262; verl's ``reinforce_plus_plus_baseline``).

    .. math::

        \tilde A_{i,t} = s_i - \operatorname{mean}(s_{g(i)}) \ \text{ on every masked-in token}, \qquad
        A_{i,t} = \frac{\tilde A_{i,t} - \mu_{\text{batch}}}{\sqrt{\sigma^2_{\text{batch}} + \epsilon}}

    The group mean removes the prompt's difficulty, the whitening over every
    masked-in token of the batch (across the ranks of ``group``, a
    ``torch.distributed`` process group, when given) fixes the scale. Unlike
    :func:`reinforce_pp` with ``group_size > 1`` the outcome score, not the
    per-token reward-to-go, is broadcast to the tokens (the two agree for
    outcome rewards on the last token and ``gamma = 1``). A group of a single
    response has baseline 0, as in verl. Whitening shifts by the batch mean, so
    a zero-variance group gets exactly 0 only when every group is degenerate;
    otherwise it gets :math:`-\mu_{\text{batch}}/\sigma`, which is 0 (up to
    rounding) for sequence-level rewards without a mask but not when responses
    of different lengths weight the token mean.

    >>> import torch
    >>> reinforce_pp_baseline(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2)
    tensor([ 1.2247, -1.2247,  0.0000,  0.0000])
    """
    check_range("eps", eps, 0.0, None)
    scores, m, _ = _layout(rewards, group_size, mask=mask, allow_nonfinite=allow_nonfinite)
    if group_size > 1:
        g = scores.view(-1, group_size)
        centred = torch.where(_same(g), 0.0, g - g.mean(-1, keepdim=True)).reshape(-1)
    else:
        centred = scores
    if rewards.ndim == 1 and m is None:
        return whiten(centred, group=group, eps=eps, allow_nonfinite=allow_nonfinite).to(rewards.dtype)
    tok = C.masked_out(centred.unsqueeze(-1).expand(rewards.shape if m is None else m.shape), m)
    return whiten(tok, m, group=group, eps=eps, allow_nonfinite=allow_nonfinite).to(rewards.dtype)
