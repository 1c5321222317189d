"""Hypothesis strategies for trajectories, reusable in your own tests.

A trajectory is a dict of ``[*batch, time]`` tensors (time last, any number of
leading batch dims) with the keys the estimators in :mod:`rl2fx.returns` take:
``rewards``, ``values``, ``bootstrap_value`` ``[*batch]``, ``mask``,
``terminated``, ``done``, ``log_rhos``, and the hyper-parameters ``gamma`` /
``lamda`` (a float or a per-step tensor).

>>> from hypothesis import given, settings
>>> @settings(max_examples=5, database=None)
... @given(trajectories(with_mask=True))
... def check(traj):
...     assert traj["rewards"].shape == traj["mask"].shape
>>> check()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

__all__ = [
    "batch_shapes",
    "shapes",
    "float_tensors",
    "bool_tensors",
    "masks",
    "discounts",
    "dtypes",
    "trajectories",
    "group_rewards",
]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def batch_shapes(max_dims: int = 2, max_side: int = 3) -> st.SearchStrategy[tuple[int, ...]]:
    """Leading batch shapes: ``()``, ``(b,)``, ``(b1, b2)``, ... (every side >= 1)."""
    return st.lists(st.integers(1, max_side), min_size=0, max_size=max_dims).map(tuple)


def shapes(
    max_batch_dims: int = 2, max_side: int = 3, min_time: int = 1, max_time: int = 8
) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes ``(*batch, time)``."""
    return st.tuples(batch_shapes(max_batch_dims, max_side), st.integers(min_time, max_time)).map(
        lambda bt: (*bt[0], bt[1])
    )


def float_tensors(
    shape: Sequence[int], *, min_value: float = -10.0, max_value: float = 10.0, dtype: torch.dtype = torch.float64
) -> st.SearchStrategy[torch.Tensor]:
    """Finite float tensors of ``shape`` with values in ``[min_value, max_value]``."""
    elems = st.floats(min_value, max_value, allow_nan=False, allow_infinity=False, width=64)
    return hnp.arrays(np.float64, tuple(shape), elements=elems).map(lambda a: torch.from_numpy(a).to(dtype))


def bool_tensors(shape: Sequence[int], *, p_true: float | None = None) -> st.SearchStrategy[torch.Tensor]:
    """Boolean tensors of ``shape`` (``p_true`` is a hint only: hypothesis explores freely)."""
    return hnp.arrays(np.bool_, tuple(shape), elements=st.booleans()).map(torch.from_numpy)


def masks(shape: Sequence[int], *, min_on_per_row: int = 0) -> st.SearchStrategy[torch.Tensor]:
    """Action masks; each row keeps at least ``min_on_per_row`` masked-in steps (the first ones are forced on)."""

    def fix(m: torch.Tensor) -> torch.Tensor:
        if min_on_per_row:
            m = m.clone()
            m[..., :min_on_per_row] = True
        return m

    return bool_tensors(shape).map(fix)


def discounts(
    shape: Sequence[int], *, low: float = 0.0, high: float = 1.0, per_step: bool | None = None,
    dtype: torch.dtype = torch.float64,
) -> st.SearchStrategy[float | torch.Tensor]:
    """A discount (``gamma`` or ``lamda``): a float in ``[low, high]`` or, per step, a tensor of ``shape``."""
    scalar = st.one_of(st.sampled_from([low, high]), st.floats(low, high, allow_nan=False))
    tensor = float_tensors(shape, min_value=low, max_value=high, dtype=dtype)
    if per_step is None:
        return st.one_of(scalar, tensor)
    return tensor if per_step else scalar


def dtypes(names: Sequence[str] = ("float32", "float64", "bfloat16")) -> st.SearchStrategy[torch.dtype]:
    """Floating dtypes the estimators support."""
    return st.sampled_from([_DTYPES[n] for n in names])


@st.composite
def trajectories(
    draw: Any,
    *,
    shape: Sequence[int] | None = None,
    max_batch_dims: int = 2,
    max_time: int = 8,
    dtype: torch.dtype = torch.float64,
    with_mask: bool = False,
    with_bootstrap: bool | None = None,
    with_terminated: bool = False,
    with_done: bool = False,
    with_log_rhos: bool = False,
    per_step: bool | None = None,
    max_log_rho: float = 2.0,
) -> dict[str, Any]:
    """A random trajectory batch as a dict of tensors and hyper-parameters (see the module docstring).

    Every ``with_*`` flag adds that key (``None`` for ``with_bootstrap`` lets hypothesis decide).
    Values stay in ``[-10, 10]`` so float32 comparisons against float64 references are meaningful.
    """
    shp = tuple(shape) if shape is not None else draw(shapes(max_batch_dims, 3, 1, max_time))
    out: dict[str, Any] = {
        "rewards": draw(float_tensors(shp, dtype=dtype)),
        "values": draw(float_tensors(shp, dtype=dtype)),
        "gamma": draw(discounts(shp, per_step=per_step, dtype=dtype)),
        "lamda": draw(discounts(shp, per_step=per_step, dtype=dtype)),
    }
    boot = draw(st.booleans()) if with_bootstrap is None else with_bootstrap
    out["bootstrap_value"] = draw(float_tensors(shp[:-1], dtype=dtype)) if boot else None
    if with_mask:
        out["mask"] = draw(masks(shp))
    if with_terminated:
        out["terminated"] = draw(bool_tensors(shp))
    if with_done:
        out["done"] = draw(bool_tensors(shp))
    if with_log_rhos:
        out["log_rhos"] = draw(float_tensors(shp, min_value=-max_log_rho, max_value=max_log_rho, dtype=dtype))
    return out


@st.composite
def group_rewards(
    draw: Any,
    *,
    max_groups: int = 4,
    max_group_size: int = 5,
    min_group_size: int = 1,
    token_level: bool | None = None,
    with_mask: bool | None = None,
    max_time: int = 6,
    ties: bool = True,
) -> dict[str, Any]:
    """Rewards for group baselines: ``rewards`` ``[batch]`` or ``[batch, time]``, ``group_size``, maybe ``mask``.

    With ``ties`` the rewards come from a small set (0, 1, 0.5) so identical rewards within a
    group (zero advantage, never NaN) are common, as with verifiable 0/1 rewards.
    """
    n_groups = draw(st.integers(1, max_groups))
    gsize = draw(st.integers(min_group_size, max_group_size))
    B = n_groups * gsize
    tok = draw(st.booleans()) if token_level is None else token_level
    has_mask = draw(st.booleans()) if with_mask is None else with_mask
    T = draw(st.integers(1, max_time))
    shp = (B, T) if tok else (B,)
    if ties and draw(st.booleans()):
        vals = hnp.arrays(np.float64, shp, elements=st.sampled_from([0.0, 0.5, 1.0]))
        rewards = torch.from_numpy(draw(vals))
    else:
        rewards = draw(float_tensors(shp, min_value=-5, max_value=5))
    out: dict[str, Any] = {"rewards": rewards, "group_size": gsize}
    if has_mask:
        out["mask"] = draw(masks((B, T)))
    return out
