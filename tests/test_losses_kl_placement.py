"""KL placement: the penalty in the rewards (before the estimator) or in the loss, fixed or adaptive coefficient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.control.kl import AdaptiveKLController, kl_init, kl_update
from rl2fx.losses import (
    AGG_MODES,
    KL_ESTIMATORS,
    aggregate,
    kl_coef_value,
    kl_loss,
    kl_penalized_rewards,
)
from rl2fx.testing.strategies import float_tensors, masks

shapes = st.tuples(st.integers(1, 4), st.integers(1, 6))


def _coefs():
    """A fixed float, an adaptive controller state moved away from its start, and the class wrapper."""
    state = kl_update(kl_init("exponential", initial_coef=0.2, target_kl=0.01), 0.5, 1)
    ctl = AdaptiveKLController(initial_coef=0.3, target_kl=0.01, controller_type="pid")
    return [(0.07, 0.07), (state, state.coef), (ctl, ctl.coef)]


@given(shapes.flatmap(lambda s: st.tuples(float_tensors(s), float_tensors(s, min_value=-5, max_value=0),
                                          float_tensors(s, min_value=-5, max_value=0), masks(s))))
def test_kl_penalized_rewards_k1_is_reward_minus_beta_log_ratio(args):
    r, lp, ref, m = args
    for coef, beta in _coefs():
        got = kl_penalized_rewards(r, lp, ref, coef)
        expected = r - beta * (lp - ref)
        torch.testing.assert_close(got, expected)
        masked = kl_penalized_rewards(r, lp, ref, coef, mask=m)
        torch.testing.assert_close(masked, torch.where(m, expected, r))
        assert torch.equal(masked[~m], r[~m])  # no penalty where the token is not a decision


def _kl_values(d):
    """Each estimator's value from its definition (the "+" variants change the gradient only; the
    unbiased k3 weights by pi/pi_old, which is 1 on-policy)."""
    k3 = torch.exp(-d) - 1 + d
    return {"k1": d, "k2": 0.5 * d**2, "k3": k3, "abs": d.abs(), "k1+": d, "k3+": k3, "k3_unbiased": k3}


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_penalized_rewards_other_estimators(estimator):
    g = torch.Generator().manual_seed(0)
    r, lp, ref = torch.randn(3, 4, generator=g), -torch.rand(3, 4, generator=g), -torch.rand(3, 4, generator=g)
    d = lp - ref
    kl = _kl_values(d)[estimator]
    torch.testing.assert_close(kl_penalized_rewards(r, lp, ref, 0.3, estimator=estimator), r - 0.3 * kl)
    assert torch.equal(kl_penalized_rewards(r, lp, ref, 0.0, estimator=estimator), r)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_loss_is_beta_times_aggregate(mode, estimator):
    g = torch.Generator().manual_seed(1)
    lp, ref = -torch.rand(4, 5, generator=g), -torch.rand(4, 5, generator=g)
    m = (torch.rand(4, 5, generator=g) > 0.3).float()
    m[:, 0] = 1.0
    d = lp - ref
    kl = _kl_values(d)[estimator]
    for coef, beta in _coefs():
        term, metrics = kl_loss(lp, ref, coef, estimator=estimator, mask=m, agg_mode=mode)
        torch.testing.assert_close(term, beta * aggregate(kl, m, mode))
        torch.testing.assert_close(metrics["kl"], (kl * m).sum() / m.sum())
    # the global counts of a micro-batched trainer pass through to aggregate
    term, _ = kl_loss(lp, ref, 0.5, estimator=estimator, mask=m, agg_mode=mode, global_tokens=100.0,
                      global_seqs=10.0)
    torch.testing.assert_close(term, 0.5 * aggregate(kl, m, mode, global_tokens=100.0, global_seqs=10.0))


def test_kl_loss_gradient_flows_into_logprobs_only_through_the_term():
    lp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0, -0.1]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    term, metrics = kl_loss(lp, ref, 0.4, estimator="k1", mask=m)
    term.backward()
    # d/dlp of 0.4 * mean over the 2 masked-in tokens of (lp - ref): 0.2 on them, 0 on the masked-out one
    torch.testing.assert_close(lp.grad, torch.tensor([[0.2, 0.2, 0.0]]))
    assert not metrics["kl"].requires_grad
    # k3: d/dδ (e^{-δ} - 1 + δ) = 1 - e^{-δ}
    lp.grad = None
    kl_loss(lp, ref, 1.0, estimator="k3", mask=m)[0].backward()
    d = (lp - ref).detach()
    torch.testing.assert_close(lp.grad, (1 - torch.exp(-d)) * m / 2)


def test_adaptive_coefficient_is_read_at_call_time():
    state = kl_init("exponential", initial_coef=0.2, target_kl=0.01)
    new = kl_update(state, 1.0, 1)  # KL far above target: the coefficient grows
    assert new.coef > state.coef
    r, lp, ref = torch.zeros(1, 2), torch.tensor([[-1.0, -1.0]]), torch.tensor([[-2.0, -2.0]])
    assert kl_penalized_rewards(r, lp, ref, new)[0, 0].item() == pytest.approx(-new.coef)


def test_coef_validation():
    assert kl_coef_value(1) == 1.0
    for bad in (-0.1, float("nan"), True, "0.1", None):
        with pytest.raises(ValueError, match="coef"):
            kl_coef_value(bad)
    with pytest.raises(ValueError, match="estimator"):
        kl_loss(torch.zeros(1, 2), torch.zeros(1, 2), 0.1, estimator="k4")
