"""Shared plumbing for the estimators: dtype promotion, masks, trace cuts, per-step
parameters, next-step lookup.

The mask convention (DESIGN.md) is implemented here once. A masked-out step is
not a decision: the recurrence must pass straight through it. With the scan
``y[t] = x[t] + c[t] * y[t+1]`` that means ``x = 0`` and ``c = 1`` at masked-out
steps, and every "value of the next state" must come from the next *masked-in*
step, found with a reverse ``cummin`` over step indices (no per-row packing).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl2fx._typing import check_finite, check_mask, check_range


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
    """A boolean view of a 0/1 tensor; any other value raises instead of being silently cast
    (:func:`rl2fx._typing.check_mask`, the rule the losses share)."""
    return check_mask(name, flag)


def resolve_cuts(*, terminated: Tensor | None, done: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """``(terminated, cut)`` as bool tensors, following TorchRL's split: ``terminated``
    zeroes the bootstrap, ``cut`` ends the trace. ``terminated`` defaults to ``done``,
    and a terminated episode is over, so its trace is cut too: ``cut = done | terminated``.

    >>> resolve_cuts(terminated=None, done=torch.tensor([0, 1]))
    (tensor([False,  True]), tensor([False,  True]))
    >>> resolve_cuts(terminated=torch.tensor([1, 0]), done=torch.tensor([0, 1]))
    (tensor([ True, False]), tensor([True, True]))
    """
    d = as_bool("done", done)
    term = as_bool("terminated", terminated)
    if term is None:
        return d, d
    if d is None:
        return term, term
    return term, d | term


def per_step(
    name: str,
    value: float | Tensor,
    *,
    like: Tensor,
    dtype: torch.dtype,
    low: float | None = 0.0,
    high: float | None = 1.0,
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
    name: str, value: float | Tensor, *, like: Tensor, dtype: torch.dtype, low: float | None = 0.0,
    high: float | None = 1.0,
) -> float | Tensor:
    """Like :func:`per_step`, but a number stays a Python ``float`` (range-checked).

    Callers keep constant hyper-parameters as floats so that elementwise ops take
    scalar operands and the scan its constant-coefficient path.
    """
    if isinstance(value, Tensor):
        return per_step(name, value, like=like, dtype=dtype, low=low, high=high)
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


def bootstrap(value: Tensor | None, *, like: Tensor, dtype: torch.dtype) -> Tensor:
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
    # int32 while scanning (cummin over int64 is an order of magnitude slower on
    # CPU), int64 at the end for gather
    it = torch.int32 if T < 2**31 - 1 else torch.int64
    steps = torch.arange(T, device=mask.device, dtype=it).expand(mask.shape)
    idx = torch.where(mask, steps, T)
    later = torch.cat([idx[..., 1:], torch.full_like(idx[..., :1], T)], dim=-1)
    return later.flip(-1).cummin(dim=-1).values.flip(-1).long()


def next_along(x: Tensor, *, tail: Tensor, nxt: Tensor | None) -> Tensor:
    """``x`` at the next (masked-in) step, ``tail`` ``[*batch]`` after the last one.

    ``nxt`` is :func:`next_index` of the mask, or ``None`` for "every step is masked in".
    """
    padded = torch.cat([x, tail.unsqueeze(-1)], dim=-1)
    if nxt is None:
        return padded[..., 1:]
    return padded.gather(-1, nxt)


def is_last(mask: Tensor | None, *, like: Tensor, nxt: Tensor | None) -> Tensor:
    """True at each row's last masked-in step (``nxt`` is :func:`next_index` of ``mask``)."""
    T = like.shape[-1]
    if mask is None:
        last = torch.zeros(like.shape, dtype=torch.bool, device=like.device)
        if T:  # no steps, no last step
            last[..., -1] = True
        return last
    assert nxt is not None
    return mask & (nxt == T)


def masked_out(x: Tensor, mask: Tensor | None) -> Tensor:
    """Zeros at masked-out positions (outputs are 0 where the step is not a decision)."""
    return x if mask is None else torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def through(x: Tensor, c: Tensor | float, *, mask: Tensor | None) -> tuple[Tensor, Tensor | float]:
    """Make masked-out steps transparent to the scan: ``x = 0``, ``c = 1`` there."""
    if mask is None:
        return x, c
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    c = as_tensor(c, x)
    one = torch.ones((), dtype=c.dtype, device=c.device)
    return torch.where(mask, x, zero), torch.where(mask, c, one)
