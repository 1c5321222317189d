r"""Critic-free group baselines for LLM post-training: REINFORCE (RL2 style), GRPO, Dr. GRPO, RLOO, REINFORCE++.

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
from rl2fx.returns.gae import _discounted
from rl2fx.returns.whiten import whiten

__all__ = ["reinforce", "grpo", "dr_grpo", "rloo", "reinforce_pp"]


def _layout(rewards: Tensor, group_size: int, mask: Tensor | None, allow_nonfinite: bool):
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
    if n < 2:
        return torch.zeros_like(x.sum() if dim is None else x.sum(dim, keepdim=True))
    return x.std() if dim is None else x.std(dim, keepdim=True)


def _centred(scores: Tensor, group_size: int, norm_std: bool, eps: float | int, global_norm: bool = False) -> Tensor:
    # global statistics are one group spanning the batch
    grouped = scores.view(1, -1) if global_norm else scores.view(-1, group_size)
    adv = grouped - grouped.mean(-1, keepdim=True)
    if norm_std:
        adv = adv / (_std(grouped, -1) + eps)
    # a group of identical scores has mean exactly equal to each score only up to rounding:
    # force the zero so that ties never leak ±eps-scaled noise
    same = (grouped == grouped[:, :1]).all(-1, keepdim=True)
    return torch.where(same, 0.0, adv).reshape(-1)


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
    scores, m, _ = _layout(rewards, group_size, mask, allow_nonfinite)
    return _spread(_centred(scores, group_size, norm_std, eps, global_norm), rewards, m)


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
    scores, m, _ = _layout(rewards, group_size, mask, allow_nonfinite)
    return _spread(_centred(scores, group_size, norm_std, eps), rewards, m)


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
    scores, m, _ = _layout(rewards, group_size, mask, allow_nonfinite)
    return _spread(_centred(scores, group_size, False, 0.0), rewards, m)


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
    scores, m, _ = _layout(rewards, group_size, mask, allow_nonfinite)
    centred = _centred(scores, group_size, False, 0.0)
    return _spread(centred * (group_size / (group_size - 1)), rewards, m)


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
    scores, m, dt = _layout(rewards, group_size, mask, allow_nonfinite)
    r = rewards.to(dt)
    if r.ndim == 1:
        if m is None:
            tok = r.unsqueeze(-1)
        else:
            last = C.is_last(m, m, C.next_index(m))
            tok = torch.where(last, r.unsqueeze(-1), 0.0)
    else:
        tok = r
    G = _discounted(tok, gamma, None, m, None, backend, dt)
    if group_size > 1:
        G = G - scores.view(-1, group_size).mean(-1, keepdim=True).expand(-1, group_size).reshape(-1, 1)
    adv = whiten(G, m, group=group, eps=eps)
    if rewards.ndim == 1 and m is None:
        adv = adv[:, 0]
    return adv.to(rewards.dtype)
