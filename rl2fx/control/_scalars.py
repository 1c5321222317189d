"""Turning controller inputs (floats, ints, NumPy scalars, one-element tensors) into checked floats.

Controllers are called with whatever the training loop has at hand, often a
0-d tensor straight out of the loss. They run on the host, so the value is
read once here and every check names the parameter it came from.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor


def as_float(name: str, value: Any) -> float:
    """Return ``value`` as a finite Python float, or raise ``ValueError`` naming ``name``.

    >>> import torch
    >>> as_float("kl", torch.tensor(0.5))
    0.5
    >>> as_float("kl", float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: kl must be a finite number, got nan
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got the bool {value!r}")
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (one element), got a tensor of shape {tuple(value.shape)}")
        if value.is_complex():
            raise ValueError(f"{name} must be real, got a complex tensor")
        value = value.detach().reshape(()).item()
    elif hasattr(value, "item") and getattr(value, "shape", None) == ():  # NumPy scalars and 0-d arrays
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {out}")
    return out


def as_int(name: str, value: Any, low: int | None = None) -> int:
    """Return ``value`` as a Python int (``>= low`` when given), or raise ``ValueError`` naming ``name``.

    >>> as_int("step", 3, low=0)
    3
    >>> as_int("step", 2.5)
    Traceback (most recent call last):
    ...
    ValueError: step must be an integer, got 2.5
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer, got a tensor {value!r}")
        value = value.reshape(()).item()
    elif hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    out = int(value)
    if low is not None and out < low:
        raise ValueError(f"{name} must be >= {low}, got {out}")
    return out
