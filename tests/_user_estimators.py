"""A user's own estimator, registered in the user's own module (imported by name via the config's ``imports``)."""

from __future__ import annotations

import torch

from rl2fx.returns import register_estimator


@register_estimator("batch_mean_baseline", needs_values=False, defaults={"scale": 1.0})
def batch_mean_baseline(rewards: torch.Tensor, mask: torch.Tensor | None = None, *, scale: float = 2.0,
                        temperature: float = 1.0) -> torch.Tensor:
    """``scale * (R_i - mean_j R_j) / temperature`` with ``R_i`` the response's summed reward."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    ret = rewards.sum(-1)
    return (scale * (ret - ret.mean()) / temperature).unsqueeze(-1).expand_as(rewards)
