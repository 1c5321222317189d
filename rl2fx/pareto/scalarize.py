"""Scalarizations that turn an objective vector into one number.

Objectives are **maximized** everywhere in :mod:`rl2fx.pareto` (the spec passes a
KL penalty as ``-kl``). Both functions are plain torch, differentiable, and batched
over any number of leading dimensions; the objective axis is the last one.

Sign conventions (see ``docs/pareto.md``):

- :func:`weighted_sum` is the signed linear utility :math:`U(f) = \\sum_i w_i f_i`.
  Higher is better; a negative weight literally asks for *smaller* values of that
  objective.
- :func:`tchebycheff` is a distance to an ideal point, lower is better. Its
  weights are preference magnitudes and must be ``>= 0``: the direction of every
  objective is fixed by maximization, so a negative weight has no meaning there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl2fx._typing import Float, check_finite, check_range, typechecked

__all__ = ["weighted_sum", "tchebycheff"]


@typechecked
def weighted_sum(
    objectives: Float[Tensor, "*batch m"],
    weights: Float[Tensor, " m"],
) -> Float[Tensor, "*batch"]:
    r"""Linear scalarization :math:`U(f) = \sum_{i=1}^{M} w_i f_i` (higher is better).

    The classical weighted-sum method (Zadeh 1963; Miettinen, *Nonlinear
    Multiobjective Optimization*, 1999, ch. 3.1). Weights keep their sign: with
    maximized objectives a positive weight rewards an objective and a negative one
    penalizes it. A training loss is ``-weighted_sum(...)``.

    Only points on the convex hull of the Pareto front can be reached by some
    choice of non-negative weights; :func:`tchebycheff` does not have this limit.

    >>> import torch
    >>> weighted_sum(torch.tensor([[1.0, -0.5], [2.0, 0.0]]), torch.tensor([1.0, 0.1]))
    tensor([0.9500, 2.0000])
    """
    check_finite("weights", weights)
    w = weights.to(device=objectives.device, dtype=objectives.dtype)
    return (objectives * w).sum(dim=-1)


@typechecked
def tchebycheff(
    objectives: Float[Tensor, "*batch m"],
    weights: Float[Tensor, " m"],
    ideal: Float[Tensor, " m"],
    *,
    augment: float = 0.0,
) -> Float[Tensor, "*batch"]:
    r"""Weighted (augmented) Tchebycheff distance to an ideal point, lower is better.

    For maximized objectives :math:`f` and an ideal (or utopian) point :math:`z^*`

    .. math::

        g(f \mid w, z^*) = \max_{i} \; w_i \, (z^*_i - f_i)
                           \;+\; \rho \sum_{i} (z^*_i - f_i),

    with :math:`\rho` = ``augment`` (``0`` gives the plain Tchebycheff
    scalarization). Every Pareto-optimal point minimizes :math:`g` for some
    weights :math:`w \ge 0`, convex front or not (Bowman 1976; Miettinen 1999,
    ch. 3.4); the augmentation term with a small :math:`\rho > 0` removes weakly
    Pareto-optimal minimizers (Steuer & Choo 1983). No absolute value is taken:
    a point beyond the ideal in objective :math:`i` gets a negative term, so
    :math:`g` stays strictly decreasing in every objective. A training loss is
    ``tchebycheff(...)`` itself. The gradient flows through the maximizing term
    (split evenly between exact ties).

    ``weights`` must be non-negative (preference magnitudes); to minimize an
    objective, pass its negation.

    >>> import torch
    >>> f = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    >>> tchebycheff(f, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]))
    tensor([0.5000, 0.2500])
    >>> tchebycheff(f, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]), augment=0.1)
    tensor([0.6000, 0.3500])
    """
    check_finite("weights", weights)
    check_finite("ideal", ideal)
    check_range("augment", augment, 0.0, None)
    if objectives.shape[-1] == 0:
        # a maximum over no objectives has no value (weighted_sum's empty sum is 0)
        raise ValueError(f"objectives must have m >= 1 objectives for tchebycheff, got shape {tuple(objectives.shape)}")
    if bool((weights < 0).any()):
        raise ValueError(
            f"weights must be >= 0 for tchebycheff (preference magnitudes; objectives are "
            f"maximized), got {weights.tolist()}; negate an objective to minimize it"
        )
    w = weights.to(device=objectives.device, dtype=objectives.dtype)
    z = ideal.to(device=objectives.device, dtype=objectives.dtype)
    gap = z - objectives
    # amax (not max) so the gradient is shared between exactly tied terms.
    out = torch.amax(w * gap, dim=-1)
    if augment > 0:
        out = out + augment * gap.sum(dim=-1)
    return out
