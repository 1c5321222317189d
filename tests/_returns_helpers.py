"""Shared assertions for the returns tests."""

from __future__ import annotations

import torch


def tol(dtype: torch.dtype) -> dict[str, float]:
    """Tolerances for comparing a result of ``dtype`` against a float64 reference."""
    if dtype == torch.float64:
        return {"rtol": 1e-9, "atol": 1e-9}
    if dtype == torch.float32:
        return {"rtol": 1e-4, "atol": 1e-4}
    # bfloat16 results: float32 accumulation, one final rounding to 8 mantissa bits
    return {"rtol": 1.6e-2, "atol": 2e-2}


def assert_close(fast: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    dtype = fast.dtype if dtype is None else dtype
    torch.testing.assert_close(fast.to(torch.float64), ref.to(torch.float64), **tol(dtype))


def cast(traj: dict, dtype: torch.dtype) -> dict:
    """The trajectory with every float tensor cast to ``dtype`` (what the fast estimator sees)."""
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in traj.items()}


def snapshot(traj: dict) -> dict:
    return {k: v.clone() for k, v in traj.items() if isinstance(v, torch.Tensor)}


def assert_unchanged(traj: dict, before: dict) -> None:
    for k, v in before.items():
        assert torch.equal(traj[k], v), f"input {k!r} was modified in place"


def pack_rows(x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row of ``x`` ``[*batch, T]`` restricted to its masked-in steps."""
    T = x.shape[-1]
    return [row[m] for row, m in zip(x.reshape(-1, T), mask.reshape(-1, T), strict=True)]
