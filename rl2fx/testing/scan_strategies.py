"""Hypothesis strategies for reverse-scan inputs ``(x, c)``.

``c`` comes in the forms the estimators produce: a float discount, a per-step
tensor with runs of exact 0 (episode cuts) and exact 1 (masked-out steps), or
arbitrary per-step values in ``[0, 1]``.

>>> from hypothesis import given, settings
>>> @settings(max_examples=3, database=None)
... @given(scan_inputs(max_time=8))
... def check(xc):
...     x, c = xc
...     assert x.shape[-1] <= 8
>>> check()
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

__all__ = ["scan_inputs", "SCAN_DTYPES"]

#: Input dtypes every backend must accept.
SCAN_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@st.composite
def scan_inputs(
    draw: st.DrawFn,
    *,
    max_time: int = 300,
    max_batch_dims: int = 2,
    dtypes: tuple[torch.dtype, ...] = SCAN_DTYPES,
    c_kinds: tuple[str, ...] = ("float", "runs", "uniform"),
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Draw ``(x, c)`` with ``x [*batch, time]`` and ``c`` a float or a tensor of ``x``'s shape."""
    batch = tuple(draw(st.lists(st.integers(1, 4), max_size=max_batch_dims)))
    time = draw(st.integers(1, max_time))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    shape = (*batch, time)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    kind = draw(st.sampled_from(c_kinds))
    c: torch.Tensor | float
    if kind == "float":
        c = draw(st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99, 0.9999, 1.0]))
    else:
        base = draw(st.sampled_from([0.9, 0.95, 0.99, 0.999]))
        if kind == "runs":
            # runs of masked steps (x = 0, c = 1) and cuts (c = 0) of random length
            run = draw(st.integers(1, 64))
            n_runs = -(-time // run)
            state = torch.randint(0, 3, (*batch, n_runs), generator=gen)
            state = state.repeat_interleave(run, -1)[..., :time]
            c_t = torch.full(shape, base, dtype=torch.float64)
            c_t[state == 1] = 1.0
            c_t[state == 2] = 0.0
            x[state == 1] = 0.0
        else:
            c_t = torch.rand(shape, generator=gen, dtype=torch.float64)
        c = c_t.to(dtype)
    return x.to(dtype), c
