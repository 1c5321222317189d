r"""Reward shaping: terms added to a response's reward before the advantage estimator runs.

Stateless functions of per-response facts (lengths, ...) returning a per-response
term; the trainer adds them to the sequence-level reward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl2fx._typing import Float, Shaped, check_range, typechecked

__all__ = ["overlong_penalty"]


@typechecked
def overlong_penalty(
    lengths: Shaped[Tensor, "*batch"],
    *,
    max_len: int,
    cache_len: int,
    factor: float | int = 1.0,
) -> Float[Tensor, "*batch"]:
    r"""DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", arXiv:2503.14476, eq. 13).

    .. math::

        R_{\text{length}}(y) = \begin{cases}
            0 & |y| \le L_{\max} - L_{\text{cache}} \\
            \dfrac{(L_{\max} - L_{\text{cache}}) - |y|}{L_{\text{cache}}} & L_{\max} - L_{\text{cache}} < |y| \le L_{\max} \\
            -1 & L_{\max} < |y|
        \end{cases}

    times ``factor`` (verl's ``overlong_penalty_factor``; 1 in the paper). A
    response loses reward linearly over the last ``cache_len`` tokens before
    ``max_len`` (:math:`L_{\max}`), reaching :math:`-1` at ``max_len``, so that
    truncated reasoning is punished gradually instead of with one cliff. Add the
    result to the response's task reward. ``lengths``: response lengths in tokens
    (any shape, >= 0); returns float32 of the same shape (float64 for float64 lengths).

    >>> import torch
    >>> overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, cache_len=4)
    tensor([ 0.0000,  0.0000, -0.5000, -1.0000, -1.0000])
    """
    check_range("max_len", max_len, 1, None)
    check_range("cache_len", cache_len, 0, max_len, low_inclusive=False)
    check_range("factor", factor, 0.0, None)
    dt = torch.float64 if lengths.dtype == torch.float64 else torch.float32
    ln = lengths.to(dt)
    check_range("lengths", ln, 0.0, None)
    start = max_len - cache_len
    ramp = (start - ln) / cache_len
    pen = torch.where(ln <= start, 0.0, torch.where(ln <= max_len, ramp, -1.0))
    return factor * pen
