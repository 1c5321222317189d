"""The reference backend: ``T`` sequential steps over time."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["loop"]


def loop(x: Tensor, c: Tensor | float) -> Tensor:
    """``y_t = x_t + c_t y_{t+1}`` one step at a time, on a time-major copy so each
    step reads and writes contiguous memory."""
    n = x.shape[-1]
    xt = x.reshape(-1, n).t().contiguous()  # [T, N]
    ct = c.reshape(-1, n).t().contiguous() if isinstance(c, Tensor) else c
    out = torch.empty_like(xt)
    acc = torch.zeros_like(xt[0])
    for t in range(n - 1, -1, -1):
        acc = xt[t] + (ct[t] if isinstance(ct, Tensor) else ct) * acc
        out[t] = acc
    return out.t().reshape(x.shape)
