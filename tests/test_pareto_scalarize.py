"""Scalarizers against loops over the paper formulas, batching and gradients."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.pareto import tchebycheff, weighted_sum

floats = st.floats(-10, 10, allow_nan=False, width=64)


def _vec(m):
    return st.lists(floats, min_size=m, max_size=m)


@given(st.integers(1, 5).flatmap(lambda m: st.tuples(st.lists(_vec(m), min_size=1, max_size=6), _vec(m))))
def test_weighted_sum_matches_loop(data):
    rows, w = data
    f = torch.tensor(rows, dtype=torch.float64)
    got = weighted_sum(f, torch.tensor(w, dtype=torch.float64))
    want = [sum(wi * fi for wi, fi in zip(w, row, strict=True)) for row in rows]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


@given(
    st.integers(1, 5).flatmap(
        lambda m: st.tuples(
            st.lists(_vec(m), min_size=1, max_size=6),
            st.lists(st.floats(0, 5, width=64), min_size=m, max_size=m),
            _vec(m),
            st.sampled_from([0.0, 0.01, 0.5]),
        )
    )
)
def test_tchebycheff_matches_loop(data):
    rows, w, z, rho = data
    got = tchebycheff(torch.tensor(rows, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                      torch.tensor(z, dtype=torch.float64), augment=rho)
    want = [
        max(wi * (zi - fi) for wi, zi, fi in zip(w, z, row, strict=True))
        + rho * sum(zi - fi for zi, fi in zip(z, row, strict=True))
        for row in rows
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_batched_leading_dims_and_gradients():
    f = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
    ws = weighted_sum(f, w)
    assert ws.shape == (2, 3)
    ws.sum().backward()
    torch.testing.assert_close(f.grad, w.expand(2, 3, 4))

    f.grad = None
    z = torch.full((4,), 5.0, dtype=torch.float64)
    wt = w.abs()
    t = tchebycheff(f, wt, z)
    assert t.shape == (2, 3)
    t.sum().backward()
    # Gradient of the max term: -w_k at the maximizing objective, zero elsewhere.
    k = torch.argmax(wt * (z - f.detach()), dim=-1)
    want = torch.zeros_like(f)
    want.scatter_(-1, k[..., None], -wt[k][..., None])
    torch.testing.assert_close(f.grad, want)


def test_tchebycheff_is_monotone_beyond_the_ideal():
    # No absolute value: exceeding the ideal keeps lowering the distance.
    w, z = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    a = tchebycheff(torch.tensor([1.0, 1.0]), w, z)
    b = tchebycheff(torch.tensor([2.0, 2.0]), w, z)
    assert b < a < 0


def test_tchebycheff_tied_terms_share_the_gradient():
    f = torch.tensor([0.0, 0.0], requires_grad=True)
    tchebycheff(f, torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])).backward()
    torch.testing.assert_close(f.grad, torch.tensor([-0.5, -0.5]))


def test_tchebycheff_rejects_negative_weights_and_bad_augment():
    with pytest.raises(ValueError, match="weights must be >= 0"):
        tchebycheff(torch.zeros(2), torch.tensor([1.0, -0.1]), torch.zeros(2))
    with pytest.raises(ValueError, match="augment"):
        tchebycheff(torch.zeros(2), torch.ones(2), torch.zeros(2), augment=-1.0)


def test_shape_mismatch_names_the_argument():
    with pytest.raises(TypeError, match="weights"):
        weighted_sum(torch.zeros(3, 2), torch.ones(3))
