"""GDPO, the optimal token baseline and GRPO with the batch std: against the slow references, special
cases, masking (NaN at masked-out positions never matters) and hyperparameter checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.returns import (
    advantages,
    gdpo,
    get_estimator,
    grpo,
    grpo_batch_std,
    optimal_token_baseline,
)
from rl2fx.testing import reference as ref
from rl2fx.testing.strategies import group_rewards


def _close(a, b):
    torch.testing.assert_close(a.to(torch.float64), b, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ grpo_batch_std
@given(group_rewards())
def test_grpo_batch_std_matches_reference(data):
    _close(grpo_batch_std(**data), ref.ref_grpo_batch_std(**data))


@given(group_rewards(min_group_size=2))
def test_grpo_batch_std_is_grpo_without_std_rescaled(data):
    s = data["rewards"] if data["rewards"].ndim == 1 else None
    if s is None:
        return
    sd = s.std() if s.numel() > 1 else torch.tensor(0.0, dtype=s.dtype)
    dr = grpo(**data, norm_std=False)
    _close(grpo_batch_std(**data), (dr / (sd + 1e-6)).to(torch.float64))


def test_grpo_batch_std_by_name_and_eps_check():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    adv = advantages("grpo_batch_std", rewards=r, group_size=2)
    adv = adv["advantages"]
    torch.testing.assert_close(adv, grpo_batch_std(r, 2))
    with pytest.raises(ValueError, match="eps"):
        grpo_batch_std(r, 2, eps=-1.0)


# ------------------------------------------------------------------ gdpo
@st.composite
def components(draw):
    n, G, K = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    vals = st.sampled_from([0.0, 0.5, 1.0]) if draw(st.booleans()) else st.floats(-3, 3, allow_nan=False)
    rc = torch.tensor(draw(st.lists(st.lists(vals, min_size=K, max_size=K), min_size=n * G, max_size=n * G)),
                      dtype=torch.float64)
    w = torch.tensor(draw(st.lists(st.floats(0.1, 2.0), min_size=K, max_size=K)), dtype=torch.float64) \
        if draw(st.booleans()) else None
    return rc, G, w


@given(components(), st.booleans())
def test_gdpo_matches_reference(c, batch_norm):
    rc, G, w = c
    _close(gdpo(rc, G, reward_weights=w, batch_norm=batch_norm),
           ref.ref_gdpo(rc, G, reward_weights=w, batch_norm=batch_norm))


@given(components())
def test_gdpo_one_component_without_batch_norm_is_grpo(c):
    rc, G, _ = c
    _close(gdpo(rc[:, :1], G, batch_norm=False), grpo(rc[:, 0], G).to(torch.float64))


def test_gdpo_keeps_combinations_that_grpo_collapses():
    # (1,0) and (0,1) sum to the same total: GRPO on the sum cannot tell the groups' members apart
    rc = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    a = gdpo(rc, 3, batch_norm=False)
    assert a[4] > a[0] > a[1]


@given(components(), st.integers(1, 4))
def test_gdpo_mask_broadcasts_and_ignores_masked_out(c, T):
    rc, G, w = c
    m = torch.rand(rc.shape[0], T) < 0.6
    out = gdpo(rc, G, reward_weights=w, mask=m)
    _close(out, ref.ref_gdpo(rc, G, reward_weights=w, mask=m))
    assert (out[~m] == 0).all()


def test_gdpo_checks():
    rc = torch.ones(4, 2)
    with pytest.raises(ValueError, match="reward_weights"):
        gdpo(rc, 2, reward_weights=torch.ones(3))
    with pytest.raises(ValueError, match="eps"):
        gdpo(rc, 2, eps=-1.0)
    with pytest.raises(ValueError, match="group_size"):
        gdpo(rc, 3)
    assert get_estimator("gdpo").inputs[:2] == ("reward_components", "group_size")
    out = advantages("gdpo", reward_components=torch.tensor([[1.0, 0.0], [0.0, 1.0]]), group_size=2)
    out = out["advantages"]
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ optimal_token_baseline
@st.composite
def otb_batch(draw):
    n, G, T = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    B = n * G
    r = torch.where(torch.rand(B, T, generator=g) < 0.5, 0.0, torch.randn(B, T, generator=g, dtype=torch.float64))
    p = torch.rand(B, T, generator=g, dtype=torch.float64) * 0.98 + 0.01
    s2 = p**2 + (1 - p) ** 2 * torch.rand(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths.unsqueeze(-1) if draw(st.booleans()) else None
    rho = torch.rand(B, T, generator=g, dtype=torch.float64) * 2 if draw(st.booleans()) else None
    return dict(rewards=r, old_logprobs=p.log(), sum_pi_squared=s2, group_size=G, mask=mask,
                rollout_is_weights=rho)


@given(otb_batch(), st.booleans())
def test_otb_matches_reference(b, zero_tail):
    adv, ret = optimal_token_baseline(**b, handle_zero_tail=zero_tail)
    _close(adv, ref.ref_optimal_token_baseline(**b, handle_zero_tail=zero_tail))
    m = torch.ones_like(ret, dtype=torch.bool) if b["mask"] is None else b["mask"]
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()


@given(otb_batch())
def test_otb_masked_out_nan_changes_nothing(b):
    if b["mask"] is None:
        return
    adv, ret = optimal_token_baseline(**b)
    poisoned = dict(b)
    for k in ("rewards", "old_logprobs", "sum_pi_squared"):
        poisoned[k] = torch.where(b["mask"], b[k], float("nan"))
    adv2, ret2 = optimal_token_baseline(**poisoned)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


def test_otb_special_cases():
    # equal path weights: the baseline is the group mean of the reward-to-go at each step
    r = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    lp, s2 = torch.full_like(r, 0.5).log(), torch.full_like(r, 0.5)
    adv, ret = optimal_token_baseline(r, lp, s2, 2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5], [-0.5, -0.5], [1.0, 1.0], [-1.0, -1.0]]))
    torch.testing.assert_close(ret, r.flip(-1).cumsum(-1).flip(-1))
    # a group of one: advantage is the reward-to-go
    torch.testing.assert_close(optimal_token_baseline(r, lp, s2, 1)[0], ret)
    with pytest.raises(ValueError, match="eps"):
        optimal_token_baseline(r, lp, s2, 2, eps=-1.0)
    with pytest.raises(ValueError, match="group_size"):
        optimal_token_baseline(r, lp, s2, 3)
    out = advantages("optimal_token_baseline", rewards=r, old_logprobs=lp, sum_pi_squared=s2, group_size=2)
    out = out["advantages"]
    assert torch.isfinite(out).all()
