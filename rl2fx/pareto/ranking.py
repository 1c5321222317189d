"""Pareto dominance: non-dominated sorting ranks, the first front, crowding distance.

All functions take **maximized** objectives ``points[n, m]`` (a torch tensor or a
NumPy array; the result has the same kind, device included).

Point :math:`a` dominates :math:`b` (:math:`a \\succ b`) iff :math:`a_i \\ge b_i`
for every objective and :math:`a_i > b_i` for at least one. Equal points do not
dominate each other, so duplicates share a rank and are all on the first front.

Two back ends give identical results (tested on random and tie-heavy sets):

- ``"moocore"``: the C library moocore (what pymoo >= 0.6.2 calls underneath):
  :func:`moocore.pareto_rank`, :func:`moocore.is_nondominated`; crowding distance
  is pymoo's NSGA-II implementation. Data go through :func:`to_minimization`, the
  single place where rl2fx's maximized objectives are negated for these
  minimizing libraries.
- ``"torch"``: batched pairwise comparisons in torch, for tensors that live on a
  GPU. Rows are processed in chunks, so memory is ``O(chunk * n)`` whatever ``n``
  (``n = 10**4`` needs no ``n x n`` matrix).

``backend="auto"`` picks torch for tensors on an accelerator and moocore otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from rl2fx._typing import Bool, Float, Int, check_choice, check_range, typechecked

__all__ = [
    "BACKENDS",
    "to_minimization",
    "dominance_ranks",
    "pareto_front_mask",
    "crowding_distance",
]

BACKENDS = ("auto", "moocore", "torch")

Points = Float[Tensor, "n m"] | Float[np.ndarray, "n m"]

# Bytes-ish budget for one [chunk, n] block of comparisons; each block holds a few
# boolean temporaries of this many elements.
_CPU_BLOCK = 1 << 22
_GPU_BLOCK = 1 << 26


def to_minimization(points: np.ndarray | Tensor, *, keep_device: bool = False) -> np.ndarray | Tensor:
    """The one conversion from rl2fx's maximized objectives to minimization.

    Returns ``-points`` in float64: a C-contiguous NumPy array (copied from any
    device) for moocore and pymoo, or with ``keep_device=True`` a tensor on the
    input's device for the torch mirrors of those libraries. Every minimizing
    computation in :mod:`rl2fx.pareto` gets its data from here, reference points
    included.

    >>> to_minimization(np.array([[1.0, -2.0]]))
    array([[-1.,  2.]])
    """
    if keep_device and isinstance(points, Tensor):
        return -points.detach().to(torch.float64)
    if isinstance(points, Tensor):
        points = points.detach().to("cpu", torch.float64).numpy()
    return np.ascontiguousarray(-np.asarray(points, dtype=np.float64))


def _check_points(name: str, points: np.ndarray | Tensor, *, single: bool = False) -> None:
    """``points`` must be a real-valued ``[n, m]`` array (``[m]`` when ``single``) with m >= 1, all finite."""
    if not isinstance(points, np.ndarray | Tensor):
        raise TypeError(f"{name} must be a numpy array or a torch tensor of shape [n, m], got "
                        f"{type(points).__name__}")
    if points.ndim != (1 if single else 2) or points.shape[-1] < 1:
        raise ValueError(f"{name} must have shape {'[m]' if single else '[n, m]'} with m >= 1 objectives, got "
                         f"shape {tuple(points.shape)}")
    is_bool = points.dtype == torch.bool if isinstance(points, Tensor) else points.dtype == np.bool_
    is_real = (not points.dtype.is_complex) if isinstance(points, Tensor) else np.issubdtype(points.dtype, np.number) \
        and not np.issubdtype(points.dtype, np.complexfloating)
    if is_bool or not is_real:
        raise TypeError(f"{name} must hold real objective values (a float or integer dtype), got dtype {points.dtype}")
    finite = torch.isfinite(points).all() if isinstance(points, Tensor) else np.isfinite(points).all()
    if not bool(finite):
        raise ValueError(f"{name} contains NaN or inf; every objective value must be finite")


def _resolve_backend(backend: str, points: np.ndarray | Tensor) -> str:
    check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        return backend
    on_accelerator = isinstance(points, Tensor) and points.device.type != "cpu"
    return "torch" if on_accelerator else "moocore"


def _as_tensor(points: np.ndarray | Tensor) -> Tensor:
    return points if isinstance(points, Tensor) else torch.from_numpy(np.asarray(points))


def _like(result: np.ndarray | Tensor, points: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Return ``result`` as the same kind (and device) as the input ``points``."""
    if isinstance(points, Tensor):
        out = torch.as_tensor(result) if isinstance(result, np.ndarray) else result
        return out.to(points.device)
    return result.cpu().numpy() if isinstance(result, Tensor) else result


def _chunk_rows(n_cols: int, device: torch.device, chunk_size: int | None) -> int:
    if chunk_size is not None:
        check_range("chunk_size", chunk_size, 1, None)
        return int(chunk_size)
    block = _CPU_BLOCK if device.type == "cpu" else _GPU_BLOCK
    return max(1, block // max(1, n_cols))


def _dominates_block(a: Tensor, b: Tensor) -> Tensor:
    """``out[i, j] = a[i] dominates b[j]`` (maximization), without an [i, j, m] temporary."""
    ai, bj = a[:, None, 0], b[None, :, 0]
    ge = ai >= bj
    gt = ai > bj
    for k in range(1, a.shape[1]):
        ai, bj = a[:, None, k], b[None, :, k]
        ge &= ai >= bj
        gt |= ai > bj
    return ge & gt


def _count_dominators(a: Tensor, b: Tensor, chunk: int) -> Tensor:
    """For each row of ``b``, how many rows of ``a`` dominate it."""
    counts = torch.zeros(b.shape[0], dtype=torch.int64, device=b.device)
    for start in range(0, a.shape[0], chunk):
        counts += _dominates_block(a[start : start + chunk], b).sum(dim=0)
    return counts


def _lex_descending_order(x: Tensor) -> Tensor:
    """Indices sorting rows lexicographically, largest first: a linear extension of dominance.

    If ``a`` dominates ``b`` they differ, and at their first differing objective
    ``a`` is larger, so every dominator comes before the points it dominates. Unlike
    sorting by the sum of objectives this is exact in floating point.
    """
    order = torch.arange(x.shape[0], device=x.device)
    for k in range(x.shape[1] - 1, -1, -1):
        idx = torch.sort(x[order, k], descending=True, stable=True).indices
        order = order[idx]
    return order


def _is_dominated_torch(x: Tensor, chunk: int) -> Tensor:
    """Which rows are dominated, testing each block only against the front found so far.

    Rows are visited in a lexicographic order (dominators first). A dominated point
    is always dominated by some non-dominated point (dominance is transitive and
    acyclic), which precedes it: so each block is compared with itself and with the
    non-dominated points kept from earlier blocks, not with all ``n`` points. Work is
    ``O(m n (chunk + |front|))``; ``O(m n^2 / 2)`` when every point is non-dominated.
    """
    n = x.shape[0]
    order = _lex_descending_order(x)
    xs = x[order]
    dominated_sorted = torch.zeros(n, dtype=torch.bool, device=x.device)
    front = xs[:0]
    block = min(n, chunk)
    for start in range(0, n, block):
        blk = xs[start : start + block]
        dom = _dominates_block(blk, blk).any(dim=0)
        for f0 in range(0, front.shape[0], block):
            dom |= _dominates_block(front[f0 : f0 + block], blk).any(dim=0)
        dominated_sorted[start : start + block] = dom
        front = torch.cat([front, blk[~dom]])
    dominated = torch.empty_like(dominated_sorted)
    dominated[order] = dominated_sorted
    return dominated


def _ranks_torch(x: Tensor, chunk: int) -> Tensor:
    """Non-dominated sorting by peeling fronts (Deb et al. 2002, counting variant).

    Each point keeps the number of not-yet-ranked points that dominate it; a front
    is the set with count 0, and removing it subtracts its dominance from the rest.
    Every ordered pair is compared at most twice: ``O(m n^2)`` work, ``O(chunk n)``
    memory.
    """
    n = x.shape[0]
    counts = _count_dominators(x, x, chunk)
    ranks = torch.empty(n, dtype=torch.int64, device=x.device)
    remaining = torch.arange(n, device=x.device)
    rank = 0
    while remaining.numel() > 0:
        on_front = counts[remaining] == 0
        front, rest = remaining[on_front], remaining[~on_front]
        if front.numel() == 0:  # impossible for a strict partial order; guards against a hang
            raise RuntimeError("non-dominated sorting found no front; dominance relation is cyclic")
        ranks[front] = rank
        if rest.numel() > 0:
            counts[rest] -= _count_dominators(x[front], x[rest], _chunk_for(rest.numel(), chunk, n))
        remaining = rest
        rank += 1
    return ranks


def _chunk_for(n_cols: int, chunk: int, n_full: int) -> int:
    # Fewer columns (remaining points) allow proportionally taller blocks.
    return max(chunk, chunk * n_full // max(1, n_cols))


@typechecked
def dominance_ranks(
    points: Points,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> Int[Tensor, " n"] | Int[np.ndarray, " n"]:
    r"""Non-dominated sorting rank of every point (0 = non-dominated), maximization.

    :math:`F_0` is the set of non-dominated points, :math:`F_r` the non-dominated
    points of :math:`X \setminus (F_0 \cup \dots \cup F_{r-1})`, and
    :math:`\operatorname{rank}(x) = r \iff x \in F_r` (Goldberg 1989; NSGA-II,
    Deb et al. 2002). Duplicates share a rank.

    ``backend``: ``"moocore"`` (:func:`moocore.pareto_rank`), ``"torch"`` (chunked
    pairwise comparisons, see the module docstring) or ``"auto"``. ``chunk_size``
    overrides the torch path's rows per block.

    >>> import torch
    >>> pts = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.5, 0.5], [0.0, 0.0]])
    >>> dominance_ranks(pts)
    tensor([0, 0, 1, 2])
    >>> dominance_ranks(pts, backend="torch")
    tensor([0, 0, 1, 2])
    """
    _check_points("points", points)
    if points.shape[0] == 0:
        return _like(np.zeros(0, dtype=np.int64), points)
    if _resolve_backend(backend, points) == "moocore":
        import moocore

        return _like(moocore.pareto_rank(to_minimization(points)).astype(np.int64), points)
    x = _as_tensor(points)
    return _like(_ranks_torch(x, _chunk_rows(x.shape[0], x.device, chunk_size)), points)


@typechecked
def pareto_front_mask(
    points: Points,
    *,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> Bool[Tensor, " n"] | Bool[np.ndarray, " n"]:
    r"""``True`` for points no other point dominates (the first front, duplicates kept).

    Equals ``dominance_ranks(points) == 0`` but needs one pass only. The moocore
    back end is :func:`moocore.is_nondominated` with ``keep_weakly=True`` (the
    Kung-Luccio-Preparata dimension sweep, Kung et al. 1975).

    >>> import numpy as np
    >>> pareto_front_mask(np.array([[1.0, 1.0], [2.0, 0.0], [0.5, 0.5], [1.0, 1.0]]))
    array([ True,  True, False,  True])
    """
    _check_points("points", points)
    if points.shape[0] == 0:
        return _like(np.zeros(0, dtype=bool), points)
    if _resolve_backend(backend, points) == "moocore":
        import moocore

        mask = moocore.is_nondominated(to_minimization(points), keep_weakly=True)
        return _like(np.asarray(mask, dtype=bool), points)
    x = _as_tensor(points)
    return _like(~_is_dominated_torch(x, _chunk_rows(x.shape[0], x.device, chunk_size)), points)


def _crowding_torch(f_min: Tensor) -> Tensor:
    """pymoo's ``calc_crowding_distance``, line for line, on minimization data."""
    n, m = f_min.shape
    order = torch.sort(f_min, dim=0, stable=True).indices
    f_sorted = torch.gather(f_min, 0, order)
    inf_row = torch.full((1, m), float("inf"), dtype=f_min.dtype, device=f_min.device)
    gaps = torch.cat([f_sorted, inf_row]) - torch.cat([-inf_row, f_sorted])
    norm = f_sorted.max(dim=0).values - f_sorted.min(dim=0).values
    norm = torch.where(norm == 0, torch.full_like(norm, float("nan")), norm)
    to_last, to_next = gaps[:-1] / norm, gaps[1:] / norm
    to_last = torch.nan_to_num(to_last, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    to_next = torch.nan_to_num(to_next, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    per_objective = torch.empty_like(f_sorted).scatter_(0, order, to_last + to_next)
    # Left-to-right column sum, the order NumPy uses for pymoo's small row sums, so
    # both back ends agree bit for bit.
    total = per_objective[:, 0].clone()
    for k in range(1, m):
        total = total + per_objective[:, k]
    return total / m


@typechecked
def crowding_distance(
    points: Points,
    *,
    backend: str = "auto",
) -> Float[Tensor, " n"] | Float[np.ndarray, " n"]:
    r"""NSGA-II crowding distance of every point within the given set (Deb et al. 2002).

    For each objective the points are sorted (stably) and each point gets the gap
    between its two neighbours, normalized by that objective's range; the result is
    the mean over objectives

    .. math::

        d(x) = \frac{1}{M} \sum_{i=1}^{M}
               \frac{f_i(x_{\text{next}}) - f_i(x_{\text{prev}})}{f_i^{\max} - f_i^{\min}},

    with ``inf`` for the extreme points of any objective (and for every point when
    ``n <= 2``); an objective with zero range contributes 0. This is pymoo's
    implementation (``get_crowding_function("cd")``), which the ``"moocore"``
    back end calls; ``"torch"`` reproduces it for accelerator tensors. Pass one
    front at a time to get NSGA-II's per-front distance. Larger means less crowded.
    The result never holds NaN. ``m = 0`` objectives raises ``ValueError`` naming
    ``points`` (no objective to be crowded in; docs/contract.md).

    >>> import numpy as np
    >>> crowding_distance(np.array([[0.0, 4.0], [1.0, 2.0], [2.0, 1.0], [4.0, 0.0]]))
    array([  inf, 0.625, 0.625,   inf])
    """
    _check_points("points", points)
    n = points.shape[0]
    if n <= 2:
        cd: np.ndarray | Tensor = np.full(n, np.inf)
    elif _resolve_backend(backend, points) == "moocore":
        from pymoo.operators.survival.rank_and_crowding.metrics import get_crowding_function

        cd = get_crowding_function("cd").do(to_minimization(points))
    else:
        cd = _crowding_torch(to_minimization(_as_tensor(points), keep_device=True))
    if isinstance(points, Tensor):
        return torch.as_tensor(cd).to(device=points.device, dtype=points.dtype)
    return cd.cpu().numpy() if isinstance(cd, Tensor) else cd
