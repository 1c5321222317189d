"""A masked-out position never changes a result, NaN and ±inf there included (issue 24, item 1).

Every test builds finite inputs, poisons the masked-out positions of every input with NaN,
+inf or -inf, and checks that the result, the metrics and the gradient equal those of the same
inputs with the masked-out positions set to 0. ``x * mask`` fails this (NaN * 0 = NaN), so each
function must select with ``torch.where`` before any arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rl2fx.losses as L
from rl2fx.losses import (
    AGG_MODES,
    aggregate,
    compute_policy_loss,
    entropy_bonus,
    kl_loss,
    kl_penalized_rewards,
    list_policy_losses,
    policy_loss,
    value_loss,
)
from rl2fx.returns.whiten import masked_mean, masked_std, masked_sum, masked_var, whiten

# NaN, ±inf, and finite values whose exp or square overflows (an inf after one op)
POISONS = (math.nan, math.inf, -math.inf, 1e300, -1e300)


@st.composite
def cases(draw, n_inputs: int):
    """``(clean inputs, poisoned inputs, float 0/1 mask)``: at least one position in, one out."""
    B = draw(st.integers(1, 3))
    T = draw(st.integers(2, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    mask = (torch.rand(B, T, generator=g) < 0.6).double()
    mask[0, 0], mask[-1, -1] = 1.0, 0.0
    keep = mask != 0
    clean, poisoned = [], []
    for _ in range(n_inputs):
        x = torch.where(keep, -torch.rand(B, T, generator=g, dtype=torch.float64) * 2.0 - 0.05, 0.0)
        clean.append(x)
        poisoned.append(torch.where(keep, x, draw(st.sampled_from(POISONS))))
    return clean, poisoned, mask


def _run(fn, inputs, mask, grad_of):
    """``fn``'s loss, metrics and the gradients w.r.t. the inputs indexed by ``grad_of``."""
    inputs = [x.clone().requires_grad_(i in grad_of) for i, x in enumerate(inputs)]
    loss, metrics = fn(*inputs, mask)
    wrt = [inputs[i] for i in grad_of]
    # a result that does not depend on an input (a variance of one element) has zero gradient
    grads = (torch.autograd.grad(loss, wrt) if loss.requires_grad else tuple(torch.zeros_like(x) for x in wrt))
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


def _same(fn, clean, poisoned, mask, grad_of=(0,)):
    want, want_metrics, want_grads = _run(fn, clean, mask, grad_of)
    got, got_metrics, got_grads = _run(fn, poisoned, mask, grad_of)
    assert torch.isfinite(want), f"the clean case is not finite: {want}"
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got_metrics.keys() == want_metrics.keys()
    for k in want_metrics:
        torch.testing.assert_close(got_metrics[k], want_metrics[k], rtol=0, atol=0, msg=f"metric {k}")
    for g_got, g_want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)


@given(cases(1), st.sampled_from(AGG_MODES))
def test_aggregate(case, mode):
    clean, poisoned, mask = case
    _same(lambda x, m: (aggregate(x, m, mode), {}), clean, poisoned, mask)


@given(cases(3), st.sampled_from(AGG_MODES), st.sampled_from([None, 2.0]), st.booleans())
def test_policy_loss(case, mode, dual_clip, tis):
    # the -inf old log-prob at a padded position with a negative advantage was the reported NaN
    (lp, old, adv), (plp, pold, padv), mask = case
    adv, padv = adv + 0.5, padv + 0.5  # advantages of both signs
    beh = [old - 0.1, torch.where(mask != 0, old - 0.1, -math.inf)] if tis else [None, None]

    def fn(lp, old, adv, m, beh):
        return policy_loss(lp, old, adv, m, dual_clip=dual_clip, behavior_logprobs=beh,
                           tis_cap=2.0 if tis else None, agg_mode=mode)

    _same(lambda a, b, c, m: fn(a, b, c, m, beh[0]), [lp, old, adv], [plp, pold, padv], mask)
    _same(lambda a, b, c, m: fn(a, b, c, m, beh[1]), [lp, old, adv], [plp, pold, padv], mask)


@given(cases(3), st.sampled_from(sorted(list_policy_losses())), st.sampled_from(AGG_MODES))
def test_registered_policy_losses(case, name, mode):
    (lp, old, adv), (plp, pold, padv), mask = case
    _same(lambda a, b, c, m: compute_policy_loss(name, a, b, c + 0.5, m, agg_mode=mode),
          [lp, old, adv], [plp, pold, padv], mask)


@given(cases(3), st.sampled_from(AGG_MODES), st.sampled_from([None, 0.2]))
def test_value_loss(case, mode, clip):
    clean, poisoned, mask = case
    _same(lambda v, o, r, m: value_loss(v, o, r, m, clip=clip, agg_mode=mode), clean, poisoned, mask)


@given(cases(2), st.sampled_from(AGG_MODES), st.sampled_from(["k1", "k2", "k3"]))
def test_kl_loss(case, mode, estimator):
    clean, poisoned, mask = case
    _same(lambda lp, ref, m: kl_loss(lp, ref, 0.5, estimator=estimator, mask=m, agg_mode=mode),
          clean, poisoned, mask)


@given(cases(3), st.sampled_from(["k1", "k2", "k3"]))
def test_kl_penalized_rewards(case, estimator):
    (lp, ref, r), (plp, pref, _), mask = case
    r = r + torch.where(mask != 0, 0.0, 7.0)  # masked-out positions keep their reward, here 7

    def fn(lp, ref, m):
        out = kl_penalized_rewards(r, lp, ref, 0.5, estimator=estimator, mask=m)
        return (out * torch.arange(1.0, out.numel() + 1, dtype=out.dtype).view_as(out)).sum(), {"out": out}

    _same(fn, [lp, ref], [plp, pref], mask)


@given(cases(1), st.sampled_from(AGG_MODES))
def test_entropy_bonus(case, mode):
    clean, poisoned, mask = case
    _same(lambda h, m: entropy_bonus(-h, m, coef=0.1, agg_mode=mode), clean, poisoned, mask)


@given(cases(1), st.sampled_from([masked_sum, masked_mean, masked_var, masked_std]), st.booleans())
def test_masked_statistics(case, stat, bool_mask):
    clean, poisoned, mask = case
    m = mask.bool() if bool_mask else mask
    _same(lambda x, _m: (stat(x, _m), {}), clean, poisoned, m)


@given(cases(1), st.booleans())
def test_whiten_allow_nonfinite(case, shift_mean):
    clean, poisoned, mask = case

    def fn(x, m):
        out = whiten(x, m, shift_mean=shift_mean, allow_nonfinite=True)
        return (out * torch.arange(1.0, out.numel() + 1, dtype=out.dtype).view_as(out)).sum(), {"out": out}

    _same(fn, clean, poisoned, mask.bool())


def test_policy_loss_padded_old_logprob_minus_inf_negative_advantage():
    # the reported case: exp(lp - (-inf)) = inf times A < 0, then times the 0 mask, was NaN
    lp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.0, -math.inf]])
    adv = torch.tensor([[1.0, -1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, metrics = policy_loss(lp, old, adv, mask, dual_clip=3.0)
    (grad,) = torch.autograd.grad(loss, lp)
    ref, ref_metrics = policy_loss(lp[:, :2], old[:, :2], adv[:, :2], mask[:, :2], dual_clip=3.0)
    (ref_grad,) = torch.autograd.grad(ref, lp)
    assert loss.item() == ref.item() and math.isfinite(loss.item())
    assert grad.tolist() == [[*ref_grad[0, :2].tolist(), 0.0]]
    assert all(metrics[k].item() == ref_metrics[k].item() for k in ref_metrics)


def test_ppo_loss_fn_with_lagrangian():
    # the training step's loss: policy, KL and entropy terms plus the Lagrangian's batch means
    from rl2fx.control.lagrangian import lagrangian_init
    from rl2fx.rollout import rollout
    from rl2fx.step import LossContext, compute_logprobs, make_ppo_loss
    from rl2fx.trainer.tasks import build_tiny_lm

    torch.manual_seed(0)
    model = build_tiny_lm(16, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    b = rollout(model, torch.randint(3, 16, (2, 3)), responses_per_prompt=2, max_new_tokens=3, eos_token_id=2,
                pad_token_id=0)
    with torch.no_grad():
        old, _ = compute_logprobs(model, b)
    mask = b["response_mask"].clone().float()
    mask[0, 0], mask[-1, -1] = 1.0, 0.0
    keep = mask != 0
    adv = torch.linspace(-1.0, 1.0, mask.numel()).view_as(mask)
    clean = dict(b, response_mask=mask, old_logprobs=torch.where(keep, old, 0.0),
                 ref_logprobs=torch.where(keep, old - 0.1, 0.0), advantages=torch.where(keep, adv, 0.0))
    poisoned = dict(clean, old_logprobs=torch.where(keep, old, -math.inf),
                    ref_logprobs=torch.where(keep, old - 0.1, math.nan), advantages=torch.where(keep, adv, math.nan))
    loss_fn = make_ppo_loss(kl_coef=0.1, entropy_coef=0.01)
    ctx = LossContext(global_tokens=float(mask.sum()), global_seqs=float(mask.shape[0]),
                      lagrangian=lagrangian_init(kl_constraint=1e-6, entropy_constraint=100.0, lagrangian_lr=1.0))
    params = [p for p in model.parameters() if p.requires_grad]

    def run(mb):
        loss, metrics = loss_fn(model, mb, ctx)
        return loss.detach(), {k: v.detach() for k, v in metrics.items()}, torch.autograd.grad(loss, params,
                                                                                             allow_unused=True)

    want, want_metrics, want_grads = run(clean)
    got, got_metrics, got_grads = run(poisoned)
    assert torch.isfinite(want)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for k in want_metrics:
        torch.testing.assert_close(got_metrics[k], want_metrics[k], rtol=0, atol=0, msg=f"metric {k}")
    for g_got, g_want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)


@pytest.mark.parametrize("call, name", [
    (lambda: L.kl_loss(torch.zeros(2, 3), torch.zeros(2, 3), float("inf")), "coef"),
    (lambda: L.kl_penalized_rewards(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), float("inf")), "coef"),
    (lambda: L.entropy_bonus(torch.ones(2, 3), coef=float("nan")), "coef"),
    (lambda: L.entropy_bonus(torch.ones(2, 3), coef=float("inf")), "coef"),
    (lambda: L.aggregate(torch.ones(2, 3), None, global_tokens=0.0), "global_tokens"),
    (lambda: L.aggregate(torch.ones(2, 3), None, global_tokens=-4.0), "global_tokens"),
    (lambda: L.aggregate(torch.ones(2, 3), None, global_tokens=float("nan")), "global_tokens"),
    (lambda: L.aggregate(torch.ones(2, 3), None, "seq-mean-token-sum", global_seqs=float("inf")), "global_seqs"),
])
def test_non_finite_or_non_positive_hyperparameters_are_refused_by_name(call, name):
    # issue 24 item 2: coef=inf gave NaN, global_tokens=0/-4/nan gave inf, a negative loss or NaN
    with pytest.raises(ValueError, match=name):
        call()


def test_empty_time_axis_gives_a_zero_loss_not_an_index_error():
    # issue 24 item 2: T = 0 raised IndexError in aggregate and every loss built on it
    z = torch.zeros(2, 0)
    for mode in L.AGG_MODES:
        assert L.aggregate(z, z, mode).item() == 0.0
    assert L.policy_loss(z, z, z, z)[0].item() == 0.0
    assert L.value_loss(z, z, z, z)[0].item() == 0.0
    assert L.kl_loss(z, z, 0.1, mask=z)[0].item() == 0.0
    assert L.entropy_bonus(z, z, coef=0.1)[0].item() == 0.0
