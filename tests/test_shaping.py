"""DAPO's soft overlong punishment against the paper's piecewise definition."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.shaping import overlong_penalty


def _ref(n: float, max_len: int, cache_len: int) -> float:
    start = max_len - cache_len
    if n <= start:
        return 0.0
    if n <= max_len:
        return (start - n) / cache_len
    return -1.0


@given(st.integers(1, 64), st.data())
def test_matches_the_piecewise_definition(max_len, data):
    cache_len = data.draw(st.integers(1, max_len))
    lengths = data.draw(st.lists(st.integers(0, 2 * max_len), min_size=1, max_size=8))
    factor = data.draw(st.floats(0.0, 3.0))
    got = overlong_penalty(torch.tensor(lengths), max_len=max_len, cache_len=cache_len, factor=factor)
    want = torch.tensor([factor * _ref(n, max_len, cache_len) for n in lengths])
    torch.testing.assert_close(got, want)


@given(st.integers(1, 64), st.data())
def test_monotone_bounded_and_continuous_at_the_ends(max_len, data):
    cache_len = data.draw(st.integers(1, max_len))
    n = torch.arange(0, 2 * max_len + 1)
    p = overlong_penalty(n, max_len=max_len, cache_len=cache_len)
    assert (p[1:] <= p[:-1]).all() and (p <= 0).all() and (p >= -1).all()
    assert p[max_len - cache_len] == 0 and p[max_len] == -1


def test_bad_hyperparameters_name_the_parameter():
    n = torch.tensor([3])
    for kw, name in [(dict(max_len=0, cache_len=1), "max_len"), (dict(max_len=4, cache_len=0), "cache_len"),
                     (dict(max_len=4, cache_len=5), "cache_len"), (dict(max_len=4, cache_len=2, factor=-1.0), "factor")]:
        with pytest.raises(ValueError, match=name):
            overlong_penalty(n, **kw)
    with pytest.raises(ValueError, match="lengths"):
        overlong_penalty(torch.tensor([-1]), max_len=4, cache_len=2)
