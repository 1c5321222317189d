r"""Masked mean, variance, standard deviation and whitening, optionally across a process group.

.. math::

    \mu = \frac{\sum_i m_i x_i}{\sum_i m_i}, \qquad
    \sigma^2 = \frac{\sum_i m_i (x_i - \mu)^2}{\sum_i m_i - 1}, \qquad
    \mathrm{whiten}(x) = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}

The variance is Bessel-corrected (as TRL's ``masked_var``/``masked_whiten`` and
RL2's advantage whitening); with a single masked-in element it is 0. With
``group`` (a ``torch.distributed`` process group, e.g. ``dist.group.WORLD``) the
sums are all-reduced first, so every rank whitens with the global statistics
(REINFORCE++'s batch-wide normalisation across data-parallel ranks). Masked-out
positions of the result are 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rl2fx._typing import Float, Shaped, check_range, typechecked
from rl2fx.returns import _common as C

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_std", "whiten"]


def _all_reduce(t: Tensor, group: Any) -> Tensor:
    if group is None:
        return t
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"group={group!r} asks for a global reduction, but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first or pass group=None"
        )
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _prep(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    xa = x.to(C.acc_dtype(x.dtype))
    m = C.as_bool("mask", mask)
    if m is None:
        return xa, torch.ones_like(xa)
    # select before multiplying: a masked-out NaN/inf times 0 is NaN, in the value and the gradient
    return torch.where(m, xa, torch.zeros((), dtype=xa.dtype, device=xa.device)), m.to(xa.dtype)


@typechecked
def masked_sum(
    x: Float[Tensor, "*shape"], mask: Shaped[Tensor, "*shape"] | None = None, *, group: Any = None
) -> Float[Tensor, ""]:
    """Sum of the masked-in elements (all-reduced over ``group`` when given), in float32 at least.

    >>> masked_sum(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1, 0, 1]))
    tensor(5.)
    """
    xa, w = _prep(x, mask)
    return _all_reduce((xa * w).sum(), group)


@typechecked
def masked_mean(
    x: Float[Tensor, "*shape"], mask: Shaped[Tensor, "*shape"] | None = None, *, group: Any = None
) -> Float[Tensor, ""]:
    """Mean of the masked-in elements; raises if there are none (globally, with ``group``).

    >>> masked_mean(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1, 0, 1]))
    tensor(2.5000)
    """
    xa, w = _prep(x, mask)
    sums = _all_reduce(torch.stack([(xa * w).sum(), w.sum()]), group)
    if sums[1].item() == 0:
        raise ValueError("mask selects no element: the masked mean is undefined")
    return sums[0] / sums[1]


@typechecked
def masked_var(
    x: Float[Tensor, "*shape"], mask: Shaped[Tensor, "*shape"] | None = None, *, group: Any = None
) -> Float[Tensor, ""]:
    """Bessel-corrected variance of the masked-in elements (0 for a single element).

    >>> masked_var(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0]))
    tensor(1.)
    """
    xa, w = _prep(x, mask)
    sums = _all_reduce(torch.stack([(xa * w).sum(), w.sum()]), group)
    n = sums[1]
    if n.item() == 0:
        raise ValueError("mask selects no element: the masked variance is undefined")
    mu = sums[0] / n
    # two passes (mean, then centred squares) instead of E[x^2] - E[x]^2, which cancels badly
    ss = _all_reduce((w * (xa - mu) ** 2).sum(), group)
    return ss / (n - 1) if n.item() > 1 else torch.zeros_like(ss)


@typechecked
def masked_std(
    x: Float[Tensor, "*shape"], mask: Shaped[Tensor, "*shape"] | None = None, *, group: Any = None
) -> Float[Tensor, ""]:
    """Square root of :func:`masked_var`.

    >>> masked_std(torch.tensor([1.0, 3.0]))
    tensor(1.4142)
    """
    return masked_var(x, mask, group=group).sqrt()


@typechecked
def whiten(
    x: Float[Tensor, "*shape"],
    mask: Shaped[Tensor, "*shape"] | None = None,
    *,
    shift_mean: bool = True,
    group: Any = None,
    eps: float | int = 1e-8,
    allow_nonfinite: bool = False,
) -> Float[Tensor, "*shape"]:
    r"""Normalise ``x`` to zero mean and unit variance over the masked-in elements.

    :math:`(x - \mu) / \sqrt{\sigma^2 + \epsilon}`; with ``shift_mean=False`` the
    mean is added back (only the scale changes), as in TRL's ``masked_whiten``.
    Masked-out positions are 0 (all of them when the mask selects nothing).

    >>> whiten(torch.tensor([1.0, 2.0, 3.0, 50.0]), torch.tensor([1, 1, 1, 0]))
    tensor([-1.0000,  0.0000,  1.0000,  0.0000])
    """
    check_range("eps", eps, 0.0, None)
    C.check_all_finite(allow_nonfinite, x=x)
    xa, w = _prep(x, mask)
    sums = _all_reduce(torch.stack([(xa * w).sum(), w.sum()]), group)
    n = sums[1]
    if n.item() == 0:
        # every position is masked out (on every rank), so every output is 0 by the mask convention
        return torch.zeros_like(x)
    mu = sums[0] / n
    ss = _all_reduce((w * (xa - mu) ** 2).sum(), group)
    var = ss / (n - 1) if n.item() > 1 else torch.zeros_like(ss)
    out = (xa - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mu
    return torch.where(w > 0, out, 0.0).to(x.dtype)
