"""rl2fx.kl_estimators: values, gradients against the definitions (autograd and exact expectations), clamps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rl2fx import losses
from rl2fx.kl_estimators import KL_ESTIMATORS, kl_estimate
from rl2fx.testing.strategies import float_tensors, shapes

pairs = shapes(max_batch_dims=2, max_side=3, max_time=6).flatmap(
    lambda s: st.tuples(float_tensors(s, min_value=-6, max_value=0), float_tensors(s, min_value=-6, max_value=0),
                        float_tensors(s, min_value=-6, max_value=0))
)


def _value_and_grads(estimator, lp, ref, **kw):
    x, y = lp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    v = kl_estimate(x, y, estimator, **kw)
    gx, gy = torch.autograd.grad(v.sum(), (x, y))
    return v.detach(), gx, gy


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
@given(args=pairs)
def test_k1_k2_k3_are_those_of_rl2fx_losses(name, args):
    lp, ref, _ = args
    torch.testing.assert_close(kl_estimate(lp, ref, name), losses.kl_estimate(lp, ref, name))


@given(args=pairs)
def test_values_and_gradients_against_the_definitions(args):
    lp, ref, old = args
    d = lp - ref
    k3 = torch.exp(-d) - 1 + d
    # (estimator, value, d value / d logprobs) from the definitions in the module docstring
    # (estimator, value, d/d logprobs, d/d ref_logprobs)
    cases = [
        ("abs", d.abs(), torch.sign(d), -torch.sign(d)),
        ("k1+", d, d, -d),  # value of k1, gradient of k2 = ½δ²
        ("k3+", k3, d, -d),
        ("k3_unbiased", k3, d, -(1 - torch.exp(-d))),  # on-policy: value k3, gradient δ ∇log π
    ]
    for name, value, grad, grad_ref in cases:
        v, gx, gy = _value_and_grads(name, lp, ref)
        torch.testing.assert_close(v, value, msg=name)
        torch.testing.assert_close(gx, grad, msg=name)
        torch.testing.assert_close(gy, grad_ref, msg=name)
    # off-policy: w·k3 with w = π/π_old carrying gradient; d/dlp = w (k3 + 1 - e^{-δ}) = w δ
    x = lp.clone().requires_grad_(True)
    v = kl_estimate(x, ref, "k3_unbiased", old_logprobs=old)
    (gx,) = torch.autograd.grad(v.sum(), x)
    w = torch.exp(lp - old)
    torch.testing.assert_close(v.detach(), w * k3)
    torch.testing.assert_close(gx, w * d)


def _categorical(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
def test_straight_through_and_unbiased_k3_give_the_exact_kl_gradient_in_expectation(seed):
    # KL(π_θ || π_ref) over a small vocabulary: the expected estimate and its expected gradient, as exact sums
    logits, ref_logits = _categorical(seed)
    old_logits = logits + 0.5 * _categorical(seed + 100)[0]
    ref_lp = torch.log_softmax(ref_logits, -1)

    theta = logits.clone().requires_grad_(True)
    lp = torch.log_softmax(theta, -1)
    true_kl = (lp.exp() * (lp - ref_lp)).sum()
    (true_grad,) = torch.autograd.grad(true_kl, theta)

    def expected(estimator, sampler_lp, **kw):
        t = logits.clone().requires_grad_(True)
        lp_t = torch.log_softmax(t, -1)
        est = kl_estimate(lp_t[None], ref_lp[None], estimator, **kw)[0]
        total = (sampler_lp.detach().exp() * est).sum()  # E_{a ~ sampler}[estimate(a)], weights without gradient
        (g,) = torch.autograd.grad(total, t)
        return total.detach(), g

    on = lp.detach()
    old_lp = torch.log_softmax(old_logits, -1)
    for name, sampler, kw in [("k3+", on, {}), ("k1+", on, {}), ("k3_unbiased", on, {}),
                              ("k3_unbiased", old_lp, {"old_logprobs": old_lp[None]})]:
        value, grad = expected(name, sampler, **kw)
        torch.testing.assert_close(value, true_kl.detach(), msg=name)
        torch.testing.assert_close(grad, true_grad, msg=name)
    # plain k3 has the right expected value but not the right expected gradient
    value, grad = expected("k3", on)
    torch.testing.assert_close(value, true_kl.detach())
    assert not torch.allclose(grad, true_grad)


def _verl_low_var_kl(lp, ref):
    kl = (ref - lp).clamp(-20, 20)
    return (torch.exp(kl) - kl - 1).clamp(-10, 10)


def test_clamps_reproduce_verls_low_var_kl():
    lp = torch.tensor([[-50.0, -1.0, -0.5, 0.0, -30.0, -3.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.0, -50.0, -0.6, -25.0, 0.0, -3.5]], dtype=torch.float64)
    got = kl_estimate(lp, ref, "k3", log_ratio_clamp=20.0, value_clamp=10.0)
    torch.testing.assert_close(got, _verl_low_var_kl(lp, ref))
    assert got.max() == 10.0 and kl_estimate(lp, ref, "k3").max() > 1e10  # unclamped by default


def test_straight_through_clamps_act_on_the_value_only():
    lp = torch.tensor([[-30.0, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[0.0, -1.5]], dtype=torch.float64)
    v, gx, _ = _value_and_grads("k3+", lp, ref, log_ratio_clamp=20.0, value_clamp=10.0)
    torch.testing.assert_close(v, _verl_low_var_kl(lp, ref))
    torch.testing.assert_close(gx, lp - ref)  # k2's gradient, unclamped (verl's k3+)


@given(args=pairs, c=st.floats(0.5, 3.0))
def test_log_ratio_clamp_bounds_every_estimator(args, c):
    lp, ref, _ = args
    for name in KL_ESTIMATORS:
        v = kl_estimate(lp, ref, name, log_ratio_clamp=c)
        bound = {"k1": c, "k1+": c, "abs": c, "k2": c * c / 2}.get(name, math.exp(c) - 1 + c)
        assert (v.abs() <= bound * (1 + 1e-6) + 1e-9).all(), name


@pytest.mark.parametrize("kw,param", [(dict(estimator="k4"), "estimator"), (dict(log_ratio_clamp=0.0), "log_ratio_clamp"),
                                      (dict(value_clamp=-1.0), "value_clamp")])
def test_bad_arguments_name_the_parameter(kw, param):
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=rf"^{param} must be"):
        kl_estimate(z, z, **kw)


def test_shape_mismatch_names_the_argument():
    with pytest.raises(TypeError, match="ref_logprobs"):
        kl_estimate(torch.zeros(2, 3), torch.zeros(2, 4))
