"""The reverse linear recurrence every estimator in :mod:`rl2fx.returns` reduces to.

.. math::  y_t = x_t + c_t \\, y_{t+1}, \\qquad y_T = 0

over the last (time) axis, with any number of leading batch dimensions.
GAE is ``x = δ``, ``c = γλ``; discounted returns are ``x = r``, ``c = γ``;
V-trace and Retrace likewise (see their modules).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl2fx._typing import Float, check_choice, typechecked

BACKENDS = ("auto", "loop")


def _loop(x: Tensor, c: Tensor) -> Tensor:
    out = torch.empty_like(x)
    acc = torch.zeros_like(x[..., 0])
    for t in range(x.shape[-1] - 1, -1, -1):
        acc = x[..., t] + c[..., t] * acc
        out[..., t] = acc
    return out


@typechecked
def reverse_scan(
    x: Float[Tensor, "*batch time"],
    c: Float[Tensor, "*batch time"] | float,
    *,
    backend: str = "auto",
) -> Float[Tensor, "*batch time"]:
    """Solve ``y[t] = x[t] + c[t] * y[t+1]`` backwards in time, with ``y[T] = 0``.

    ``c`` may be a float (broadcast to every step). Accumulation happens in at
    least float32; the result has ``x``'s dtype.

    >>> import torch
    >>> reverse_scan(torch.tensor([1.0, 1.0, 1.0]), 0.5)
    tensor([1.7500, 1.5000, 1.0000])
    """
    check_choice("backend", backend, BACKENDS)
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    xa = x.to(acc_dtype)
    ca = torch.as_tensor(c, dtype=acc_dtype, device=x.device).expand_as(xa)
    return _loop(xa, ca).to(x.dtype)
