"""Packing a masked ``[N, T]`` batch: each row's masked-in steps left-aligned, without a loop over rows.

This is the definition of the mask convention ("pack, run, scatter back") as
three index operations: one cumulative count builds the plan, one scatter per
input packs, one gather per output unpacks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rl2fx.returns._backends.workspace import scratch

__all__ = ["Packing", "pack_plan", "pack", "unpack"]


class Packing(NamedTuple):
    """Where each step of a masked ``[N, T]`` batch goes when its masked-in steps are
    left-aligned per row (the row's packed sequence), built once by :func:`pack_plan`.

    ``index[n, t]`` is the packed slot of a masked-in step; masked-out steps point at
    the row's first empty slot ``count[n]`` (kept zero in packed outputs, so a gather
    returns 0 there) or, in a row with no masked-out step, anywhere.
    """

    index: Tensor  # [N, T] int64
    count: Tensor  # [N] int64, masked-in steps per row
    rows: Tensor  # rows with at least one masked-out step
    first_empty: Tensor  # count[rows]


def pack_plan(mask: Tensor) -> Packing:
    """The :class:`Packing` of a boolean ``[N, T]`` mask: one cumulative count, no loop over rows.

    ``index`` lives in this thread's scratch space (valid until the next plan).

    >>> p = pack_plan(torch.tensor([[False, True, True, False]]))
    >>> p.index, p.count
    (tensor([[2, 0, 1, 2]]), tensor([2]))
    """
    N, T = mask.shape
    it = torch.int32 if T < 2**31 - 1 else torch.int64
    pos = scratch("pack-pos", (N, T), dtype=it, device=mask.device)
    torch.cumsum(mask, -1, dtype=it, out=pos)
    count = pos[:, -1].long()
    pos.sub_(1)
    torch.where(mask, pos, count.clamp(max=T - 1).to(it)[:, None], out=pos)
    idx = scratch("pack-index", (N, T), dtype=torch.int64, device=mask.device).copy_(pos)
    rows = (count < T).nonzero().squeeze(1)
    return Packing(idx, count, rows, count[rows])


def pack(x: Tensor, plan: Packing, *, width: int, slot: str) -> Tensor:
    """``x [N, T]`` with each row's masked-in steps left-aligned in a zero ``[N, width]``
    tensor (this thread's scratch buffer ``slot``)."""
    out = scratch(slot, (x.shape[0], width), dtype=x.dtype, device=x.device).zero_()
    # masked-out steps all land on the first empty slot, which is then cleared
    out.scatter_(-1, plan.index, x)
    out[plan.rows, plan.first_empty] = 0
    return out


def unpack(y: Tensor, plan: Packing) -> Tensor:
    """The inverse of :func:`pack` for a packed result ``y [N, >=T]``: a new tensor, zeros
    at masked-out steps. Clears ``y``'s first empty slots in place (masked-out steps read them).
    """
    y[plan.rows, plan.first_empty] = 0
    return y.gather(-1, plan.index)
