"""A bounded archive of mutually non-dominated points (state + pure update).

The archive keeps at most ``capacity`` points of maximized objectives, no two of
which dominate each other and no two equal. Inserting a point ``p``:

1. if an archived point weakly dominates ``p`` (``a >= p`` everywhere), nothing
   changes;
2. otherwise every archived point ``p`` dominates is removed and ``p`` is added;
3. if the archive now holds ``capacity + 1`` points, one is dropped: the point
   with the smallest exclusive hypervolume contribution for m <= 3 objectives
   (SMS-EMOA, Beume et al. 2007; reference point from
   :func:`~rl2fx.pareto.hypervolume.nadir_reference_point`), the smallest
   NSGA-II crowding distance for m > 3 (exact contributions get expensive
   there). Ties drop the oldest point. The new point itself can be the one
   dropped.

Each entry carries the ``step`` it was inserted at and free-form ``metadata``
(the optimizer stores the objective dict).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from rl2fx._typing import check_range

__all__ = ["ArchiveState", "archive_init", "archive_update"]

# Pruning switches from hypervolume contribution to crowding distance above this.
_HV_PRUNE_MAX_M = 3


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class ArchiveState:
    """Immutable archive contents.

    Attributes:
        points: ``[k, m]`` float64, read-only; maximized objectives, mutually
            non-dominated and distinct.
        steps: the step each point was inserted at (same order as ``points``).
        metadata: one mapping per point (same order).
        capacity: the most points kept.
    """

    points: np.ndarray
    steps: tuple[int, ...] = ()
    metadata: tuple[Mapping[str, Any], ...] = ()
    capacity: int = 100
    num_objectives: int = 0

    def __len__(self) -> int:
        return int(self.points.shape[0])


def archive_init(num_objectives: int, capacity: int = 100) -> ArchiveState:
    """An empty archive for ``num_objectives`` maximized objectives.

    >>> state = archive_init(2, capacity=3)
    >>> len(state), state.capacity
    (0, 3)
    """
    for name, value in (("num_objectives", num_objectives), ("capacity", capacity)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        check_range(name, value, 1, None)
    return ArchiveState(
        points=_frozen(np.zeros((0, num_objectives))),
        capacity=int(capacity),
        num_objectives=int(num_objectives),
    )


def _as_point(point: Sequence[float] | np.ndarray | Tensor, m: int) -> np.ndarray:
    if isinstance(point, Tensor):
        p = point.detach().cpu().double().numpy()
    else:
        p = np.asarray(point, dtype=np.float64)
    if p.shape != (m,):
        raise ValueError(f"point must have shape ({m},) for this archive, got {tuple(p.shape)}")
    if not np.isfinite(p).all():
        raise ValueError(f"point must be finite, got {p.tolist()}")
    return p


def _drop_index(points: np.ndarray, steps: tuple[int, ...]) -> int:
    from rl2fx.pareto.hypervolume import hypervolume_contributions, nadir_reference_point
    from rl2fx.pareto.ranking import crowding_distance

    m = points.shape[1]
    if m == 1:
        # One objective: mutual non-dominance leaves a single point; never reached.
        return int(np.argmin(points[:, 0]))
    if m <= _HV_PRUNE_MAX_M:
        score = hypervolume_contributions(points, nadir_reference_point(points), method="exact")
    else:
        score = crowding_distance(points, backend="moocore")
    # lexsort: last key is primary -> smallest score, then oldest step.
    return int(np.lexsort((np.asarray(steps), score))[0])


def archive_update(
    state: ArchiveState,
    point: Sequence[float] | np.ndarray | Tensor,
    *,
    step: int,
    metadata: Mapping[str, Any] | None = None,
) -> ArchiveState:
    """Insert ``point`` (maximized objectives) and return the new state; ``state`` is untouched.

    See the module docstring for the rules. Check ``step in new.steps`` to know
    whether the point was kept.

    >>> s = archive_init(2, capacity=2)
    >>> s = archive_update(s, [1.0, 0.0], step=0)
    >>> s = archive_update(s, [0.0, 1.0], step=1)
    >>> s = archive_update(s, [0.2, 0.2], step=2)   # full: drops the least contributor
    >>> s.points.tolist(), s.steps
    ([[1.0, 0.0], [0.0, 1.0]], (0, 1))
    >>> archive_update(s, [2.0, 2.0], step=3).points.tolist()   # dominates both
    [[2.0, 2.0]]
    """
    p = _as_point(point, state.num_objectives)
    pts = state.points
    if len(pts) and bool((pts >= p).all(axis=1).any()):
        return state
    keep = ~(p >= pts).all(axis=1)
    new_points = np.vstack([pts[keep], p[None]])
    new_steps = tuple(s for s, k in zip(state.steps, keep, strict=True) if k) + (int(step),)
    new_meta = tuple(d for d, k in zip(state.metadata, keep, strict=True) if k) + (
        dict(metadata) if metadata is not None else {},
    )
    if len(new_points) > state.capacity:
        drop = _drop_index(new_points, new_steps)
        new_points = np.delete(new_points, drop, axis=0)
        new_steps = new_steps[:drop] + new_steps[drop + 1 :]
        new_meta = new_meta[:drop] + new_meta[drop + 1 :]
    return ArchiveState(
        points=_frozen(new_points),
        steps=new_steps,
        metadata=new_meta,
        capacity=state.capacity,
        num_objectives=state.num_objectives,
    )

