"""Multi-objective tools: scalarization, Pareto ranking, hypervolume, a bounded archive.

Objectives are maximized throughout. See ``docs/pareto.md`` for the formulas and the
sign conventions of :class:`~rl2fx.pareto.optimizer.MultiObjectiveOptimizer`.

>>> import torch
>>> from rl2fx import pareto as P
>>> P.dominance_ranks(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
tensor([0, 0, 1])
"""

from rl2fx.pareto.archive import ArchiveState, archive_init, archive_update
from rl2fx.pareto.hypervolume import (
    hypervolume,
    hypervolume_contributions,
    hypervolume_gradient,
    nadir_reference_point,
)
from rl2fx.pareto.optimizer import MultiObjectiveOptimizer
from rl2fx.pareto.ranking import (
    crowding_distance,
    dominance_ranks,
    pareto_front_mask,
    to_minimization,
)
from rl2fx.pareto.scalarize import tchebycheff, weighted_sum

__all__ = [
    "ArchiveState",
    "MultiObjectiveOptimizer",
    "archive_init",
    "archive_update",
    "crowding_distance",
    "dominance_ranks",
    "hypervolume",
    "hypervolume_contributions",
    "hypervolume_gradient",
    "nadir_reference_point",
    "pareto_front_mask",
    "tchebycheff",
    "to_minimization",
    "weighted_sum",
]
