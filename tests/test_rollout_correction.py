"""Rollout correction against slow references: truncated IS weights, masked IS and mismatch metrics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.rollout_correction import masked_is, mismatch_metrics, truncated_is_weights
from rl2fx.testing import reference_rollout_correction as ref


@st.composite
def pair(draw):
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    spread = draw(st.sampled_from([0.0, 0.01, 0.3, 1.0]))
    mu = lp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.7 if draw(st.booleans()) else None
    return lp, mu, mask


@given(pair(), st.sampled_from(["token", "sequence"]), st.floats(0.1, 5.0))
def test_truncated_is_weights_match_reference(p, level, cap):
    lp, mu, mask = p
    torch.testing.assert_close(truncated_is_weights(lp, mu, mask, level=level, cap=cap),
                               ref.ref_truncated_is_weights(lp, mu, mask, level=level, cap=cap))


@given(pair(), st.sampled_from(["token", "sequence", "geometric"]), st.floats(0.0, 0.99), st.floats(1.01, 3.0))
def test_masked_is_matches_reference(p, level, low, high):
    lp, mu, mask = p
    got = masked_is(lp, mu, mask, level=level, low=low, high=high)
    want = ref.ref_masked_is(lp, mu, mask, level=level, low=low, high=high)
    # a ratio exactly on the band's edge can round either way in log space: compare away from the edges
    assert got.dtype == torch.bool
    assert torch.equal(got, want) or _on_edge(lp, mu, mask, level, low, high)
    if mask is not None:
        assert not got[~mask].any()


def _on_edge(lp, mu, mask, level, low, high) -> bool:
    r = (lp - mu).exp()
    return bool(((r - low).abs() < 1e-9).any() or ((r - high).abs() < 1e-9).any())


@given(pair(), st.floats(1.0, 4.0))
def test_mismatch_metrics_match_reference(p, cap):
    lp, mu, mask = p
    got, want = mismatch_metrics(lp, mu, mask, cap=cap), ref.ref_mismatch_metrics(lp, mu, mask, cap=cap)
    if want is None:
        assert got["kl_k1"] == 0 and got["ess"] == 1
        return
    for k, v in want.items():
        assert got[k].item() == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert got["kl_k3"] >= 0


@given(pair())
def test_masked_out_nan_changes_nothing(p):
    lp, mu, mask = p
    if mask is None:
        return
    lp2, mu2 = torch.where(mask, lp, float("nan")), torch.where(mask, mu, float("inf"))
    for level in ("token", "sequence"):
        assert torch.equal(truncated_is_weights(lp, mu, mask, level=level), truncated_is_weights(lp2, mu2, mask, level=level))
    for level in ("token", "sequence", "geometric"):
        assert torch.equal(masked_is(lp, mu, mask, level=level), masked_is(lp2, mu2, mask, level=level))
    a, b = mismatch_metrics(lp, mu, mask), mismatch_metrics(lp2, mu2, mask)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_on_policy_special_case():
    lp = -torch.rand(3, 5, dtype=torch.float64)
    assert torch.equal(truncated_is_weights(lp, lp, level="sequence"), torch.ones_like(lp))
    assert masked_is(lp, lp, level="geometric", low=0.999, high=1.001).all()
    m = mismatch_metrics(lp, lp)
    assert m["kl_k1"] == 0 and m["kl_k3"] == 0 and m["ratio_std"] == 0 and m["ess"] == 1


def test_bad_hyperparameters_name_the_parameter():
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(lp, lp, cap=0.0)
    with pytest.raises(ValueError, match="level"):
        truncated_is_weights(lp, lp, level="geometric")
    with pytest.raises(ValueError, match="high"):
        masked_is(lp, lp, low=2.0, high=1.0)
    with pytest.raises(ValueError, match="low"):
        masked_is(lp, lp, low=-1.0)
    with pytest.raises(ValueError, match="level"):
        masked_is(lp, lp, level="seq")
    with pytest.raises(ValueError, match="cap"):
        mismatch_metrics(lp, lp, cap=0.5)
