"""Losses against hand-computed values, slow per-token loops and limiting cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.losses import AGG_MODES, aggregate, entropy_bonus, kl_estimate, policy_loss, value_loss


def test_kl_estimators_hand_values():
    lp = torch.tensor([[-1.0, -0.2, -3.0]])
    ref = torch.tensor([[-1.5, -0.2, -1.0]])
    d = [0.5, 0.0, -2.0]
    assert kl_estimate(lp, ref, "k1")[0].tolist() == pytest.approx(d)
    assert kl_estimate(lp, ref, "k2")[0].tolist() == pytest.approx([0.5 * x * x for x in d])
    assert kl_estimate(lp, ref, "k3")[0].tolist() == pytest.approx([math.exp(-x) - 1 + x for x in d])


@given(st.lists(st.floats(-20, 20), min_size=1, max_size=16), st.lists(st.floats(-20, 20), min_size=1, max_size=16))
def test_k3_and_k2_nonnegative(a, b):
    n = min(len(a), len(b))
    lp, ref = torch.tensor(a[:n]).unsqueeze(0), torch.tensor(b[:n]).unsqueeze(0)
    assert (kl_estimate(lp, ref, "k3") >= 0).all()
    assert (kl_estimate(lp, ref, "k2") >= 0).all()


def test_k1_k3_unbiased_for_true_kl():
    # Samples from p; the mean of k1 and k3 converge to KL(p || q) (Schulman 2020).
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = float((p * (p / q).log()).sum())
    a = torch.multinomial(p, 200_000, replacement=True, generator=g)
    lp, lq = p.log()[a].unsqueeze(0), q.log()[a].unsqueeze(0)
    assert kl_estimate(lp, lq, "k1").mean().item() == pytest.approx(true_kl, rel=0.03)
    assert kl_estimate(lp, lq, "k3").mean().item() == pytest.approx(true_kl, rel=0.03)


def test_unknown_estimator_names_parameter():
    with pytest.raises(ValueError, match="estimator must be one of"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), "k4")


def _slow_aggregate(loss, mask, mode, normalizer=None):
    rows = loss.tolist()
    m = mask.tolist()
    if mode == "token-mean":
        num = sum(x * w for r, mr in zip(rows, m, strict=True) for x, w in zip(r, mr, strict=True))
        return num / max(sum(sum(mr) for mr in m), 1.0)
    per = []
    for r, mr in zip(rows, m, strict=True):
        s = sum(x * w for x, w in zip(r, mr, strict=True))
        per.append(s / max(sum(mr), 1.0) if mode == "seq-mean-token-mean" else s)
    if mode == "token-sum":
        return sum(per)
    out = sum(per) / len(per)
    if mode == "seq-mean-token-sum-norm":
        out /= normalizer if normalizer is not None else loss.shape[-1]
    return out


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_matches_loop(mode):
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(5, 7, generator=g)
    mask = (torch.rand(5, 7, generator=g) > 0.3).float()
    assert aggregate(loss, mask, mode).item() == pytest.approx(_slow_aggregate(loss, mask, mode), rel=1e-5)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_micro_batches_add_up_with_global_counts(mode):
    g = torch.Generator().manual_seed(2)
    loss = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.4).float()
    full = aggregate(loss, mask, mode)
    kw = {"global_tokens": float(mask.sum()), "global_seqs": 6.0}
    parts = sum(aggregate(loss[i:i + 2], mask[i:i + 2], mode, **kw) for i in range(0, 6, 2))
    assert parts.item() == pytest.approx(full.item(), rel=1e-5)


def test_policy_loss_ratio_one_is_plain_policy_gradient():
    g = torch.Generator().manual_seed(3)
    lp = torch.randn(4, 6, generator=g).requires_grad_(True)
    adv = torch.randn(4, 6, generator=g)
    mask = (torch.rand(4, 6, generator=g) > 0.2).float()
    loss, metrics = policy_loss(lp, lp.detach(), adv, mask, clip=0.2)
    loss.backward()
    expected = -adv * mask / mask.sum()  # grad of -sum(A log pi) / N
    torch.testing.assert_close(lp.grad, expected)
    assert loss.item() == pytest.approx(-(adv * mask).sum().item() / mask.sum().item(), rel=1e-5)
    assert metrics["clip_frac"].item() == 0.0
    assert metrics["approx_kl"].item() == pytest.approx(0.0, abs=1e-7)


def test_policy_loss_clipping_hand_values():
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, metrics = policy_loss(lp, old, adv, clip=0.2)
    # per token: -min(r A, clip(r) A): [-1.2, 1.5, -0.5, 0.8]
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4, rel=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(0.5)  # tokens 0 and 3 have no gradient
    loss.backward()
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[0, 3].item() == 0.0
    assert lp.grad[0, 1].item() == pytest.approx(1.5 / 4)


def test_dual_clip_bounds_negative_advantage_loss():
    old = torch.zeros(1, 2)
    lp = torch.log(torch.tensor([[10.0, 10.0]]))
    adv = torch.tensor([[-1.0, 1.0]])
    loss, metrics = policy_loss(lp, old, adv, clip=0.2, dual_clip=3.0)
    # token 0: -min(-10, -1.2) = 10 -> capped at 3; token 1: -min(10, 1.2) = -1.2
    assert loss.item() == pytest.approx((3.0 - 1.2) / 2)
    assert metrics["dual_clip_frac"].item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(lp, old, adv, dual_clip=1.0)


def test_truncated_importance_weights():
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    behavior = torch.log(torch.tensor([[0.25, 0.5]]))  # weights 2 (capped to 1.5) and 1
    lp = old.clone()
    adv = torch.tensor([[1.0, 1.0]])
    loss, metrics = policy_loss(lp, old, adv, behavior_logprobs=behavior, tis_cap=1.5)
    assert loss.item() == pytest.approx(-(1.5 + 1.0) / 2)
    assert metrics["tis_weight_mean"].item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="tis_cap"):
        policy_loss(lp, old, adv, behavior_logprobs=behavior)


def test_value_loss_clipped_and_plain():
    v = torch.tensor([[2.0, 1.0]])
    old = torch.tensor([[1.0, 0.0]])
    ret = torch.tensor([[0.0, 1.0]])
    plain, _ = value_loss(v, old, ret, clip=None)
    assert plain.item() == pytest.approx(0.5 * (4.0 + 0.0) / 2)
    clipped, m = value_loss(v, old, ret, clip=0.5)
    assert clipped.item() == pytest.approx(0.5 * (4.0 + 0.25) / 2)
    assert m["vf_clip_frac"].item() == pytest.approx(0.5)


def test_entropy_bonus_sign_and_metric():
    h = torch.tensor([[1.0, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    term, m = entropy_bonus(h, mask, coef=0.5)
    assert term.item() == pytest.approx(-0.5 * 1.5)
    assert m["entropy"].item() == pytest.approx(1.5)


def test_shape_mismatch_names_argument():
    with pytest.raises(TypeError, match="advantages"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))
