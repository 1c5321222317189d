"""Shared plumbing for the estimators: dtype promotion, masks, per-step parameters, next-step lookup.

The mask convention (DESIGN.md) is implemented here once. A masked-out step is
not a decision: the recurrence must pass straight through it. With the scan
``y[t] = x[t] + c[t] * y[t+1]`` that means ``x = 0`` and ``c = 1`` at masked-out
steps, and every "value of the next state" must come from the next *masked-in*
step, found with a reverse ``cummin`` over step indices (no per-row packing).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rl2fx._typing import check_finite, check_range
from rl2fx.returns._workspace import scratch


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The accumulation dtype: the promoted input dtype, at least float32 (bfloat16 -> float32)."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def out_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The result dtype: the promoted floating input dtypes (bfloat16 stays bfloat16)."""
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def as_bool(name: str, flag: Tensor | None) -> Tensor | None:
    """A boolean view of a 0/1 tensor; any other value raises instead of being silently cast."""
    if flag is None or flag.dtype == torch.bool:
        return flag
    bad = (flag != 0) & (flag != 1)
    if bool(bad.any()):
        raise ValueError(
            f"{name} must be a bool tensor or hold only 0/1 values, got the value "
            f"{flag[bad].flatten()[0].item()!r}"
        )
    return flag != 0


def per_step(
    name: str,
    value: float | Tensor,
    like: Tensor,
    dtype: torch.dtype,
    low: float | None = 0.0,
    high: float | None = 1.0,
    *,
    low_inclusive: bool = True,
) -> Tensor:
    """A hyper-parameter given as a float or a per-step tensor, range-checked, expanded to ``like``."""
    check_range(name, value, low, high, low_inclusive=low_inclusive)
    if isinstance(value, Tensor):
        if value.shape != like.shape:
            raise ValueError(
                f"{name} must be a float or a tensor of shape {tuple(like.shape)} (the rewards' "
                f"shape), got shape {tuple(value.shape)}"
            )
        return value.to(dtype)
    return torch.full(like.shape, float(value), dtype=dtype, device=like.device)


def per_step_or_float(
    name: str, value: float | Tensor, like: Tensor, dtype: torch.dtype, low: float | None = 0.0,
    high: float | None = 1.0,
) -> float | Tensor:
    """Like :func:`per_step`, but a number stays a Python ``float`` (range-checked).

    Callers keep constant hyper-parameters as floats so that elementwise ops take
    scalar operands and the scan its constant-coefficient path.
    """
    if isinstance(value, Tensor):
        return per_step(name, value, like, dtype, low, high)
    check_range(name, value, low, high)
    # rounded to the accumulation dtype once, as reverse_scan does with a float c
    return float(torch.tensor(float(value), dtype=dtype))


def as_tensor(value: float | Tensor, like: Tensor) -> Tensor:
    """``value`` as a tensor broadcastable against ``like`` (a 0-d one for a float)."""
    if isinstance(value, Tensor):
        return value
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def check_all_finite(allow_nonfinite: bool, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        check_finite(name, t, allow_nonfinite=allow_nonfinite)


def bootstrap(value: Tensor | None, like: Tensor, dtype: torch.dtype) -> Tensor:
    """The value after the last step, ``[*batch]``; ``None`` means 0 (the episode ended)."""
    if value is None:
        return torch.zeros(like.shape[:-1], dtype=dtype, device=like.device)
    return value.to(dtype)


def next_index(mask: Tensor) -> Tensor:
    """For each step ``t`` the index of the next masked-in step ``> t``, or ``T`` if there is none.

    >>> next_index(torch.tensor([True, False, True, False]))
    tensor([2, 2, 4, 4])
    """
    T = mask.shape[-1]
    # int32 while scanning (cummin over int64 measured 12x slower on CPU), int64
    # at the end for gather
    it = torch.int32 if T < 2**31 - 1 else torch.int64
    steps = torch.arange(T, device=mask.device, dtype=it).expand(mask.shape)
    idx = torch.where(mask, steps, T)
    later = torch.cat([idx[..., 1:], torch.full_like(idx[..., :1], T)], dim=-1)
    return later.flip(-1).cummin(dim=-1).values.flip(-1).long()


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
    pos = scratch("pack-pos", (N, T), it, mask.device)
    torch.cumsum(mask, -1, dtype=it, out=pos)
    count = pos[:, -1].long()
    pos.sub_(1)
    torch.where(mask, pos, count.clamp(max=T - 1).to(it)[:, None], out=pos)
    idx = scratch("pack-index", (N, T), torch.int64, mask.device).copy_(pos)
    rows = (count < T).nonzero().squeeze(1)
    return Packing(idx, count, rows, count[rows])


def pack(x: Tensor, plan: Packing, width: int, slot: str) -> Tensor:
    """``x [N, T]`` with each row's masked-in steps left-aligned in a zero ``[N, width]``
    tensor (this thread's scratch buffer ``slot``)."""
    out = scratch(slot, (x.shape[0], width), x.dtype, x.device).zero_()
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


def next_along(x: Tensor, tail: Tensor, nxt: Tensor | None) -> Tensor:
    """``x`` at the next (masked-in) step, ``tail`` ``[*batch]`` after the last one.

    ``nxt`` is :func:`next_index` of the mask, or ``None`` for "every step is masked in".
    """
    padded = torch.cat([x, tail.unsqueeze(-1)], dim=-1)
    if nxt is None:
        return padded[..., 1:]
    return padded.gather(-1, nxt)


def is_last(mask: Tensor | None, like: Tensor, nxt: Tensor | None) -> Tensor:
    """True at each row's last masked-in step."""
    T = like.shape[-1]
    if mask is None:
        last = torch.zeros(like.shape, dtype=torch.bool, device=like.device)
        last[..., -1] = True
        return last
    assert nxt is not None
    return mask & (nxt == T)


def masked_out(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zeros at masked-out positions (outputs are 0 where the step is not a decision)."""
    return x if mask is None else torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def through(x: Tensor, c: Tensor | float, mask: Tensor | None) -> tuple[Tensor, Tensor | float]:
    """Make masked-out steps transparent to the scan: ``x = 0``, ``c = 1`` there."""
    if mask is None:
        return x, c
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    c = as_tensor(c, x)
    one = torch.ones((), dtype=c.dtype, device=c.device)
    return torch.where(mask, x, zero), torch.where(mask, c, one)
