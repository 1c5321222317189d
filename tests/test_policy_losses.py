"""The policy losses of rl2fx.policy_losses against the reference loops, limiting cases and the input contract."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from rl2fx import policy_losses as PL
from rl2fx.losses import AGG_MODES, policy_loss
from rl2fx.testing import reference_losses as R
from rl2fx.testing.strategies import float_tensors, masks, shapes

NAMES = ["gspo", "gspo_token", "cispo", "sapo", "gmpo", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl", "dro"]
SEQ_LEVEL = {"gspo", "gspo_token", "gmpo"}  # a sequence-level quantity per row
BATCH_WIDE = {"clip_cov", "kl_cov"}  # select tokens over the whole batch

# hyperparameters that make every branch (clipped / unclipped, selected / not) likely on random inputs
HYPER = {
    "gspo": dict(clip=0.2, clip_high=0.3),
    "gspo_token": dict(clip=0.2, clip_high=0.3),
    "cispo": dict(epsilon_low=0.3, epsilon_high=0.2),
    "sapo": dict(tau_pos=1.0, tau_neg=1.05),
    "gmpo": dict(clip=0.4, clip_high=0.3),
    "clip_cov": dict(cov_ratio=0.3, cov_low=-0.5, cov_high=2.0),
    "kl_cov": dict(cov_ratio=0.3, beta=0.7),
    "dppo_tv": dict(delta=0.1, delta_high=0.15),
    "dppo_kl": dict(delta=0.05, delta_high=0.02),
    "dro": dict(beta=0.3),
}
REF = {
    "gspo": R.ref_gspo, "gspo_token": R.ref_gspo_token_value, "cispo": R.ref_cispo, "sapo": R.ref_sapo,
    "gmpo": R.ref_gmpo, "clip_cov": R.ref_clip_cov, "kl_cov": R.ref_kl_cov, "dppo_tv": R.ref_dppo_tv,
    "dppo_kl": R.ref_dppo_kl, "dro": R.ref_dro,
}
ANALOGUE = {"sapo": "gate_weight_mean", "kl_cov": "kl_cov_frac", "dro": "penalty"}


def _kw(name, seed=0):
    kw = dict(HYPER[name])
    if name == "clip_cov":
        kw["generator"] = torch.Generator().manual_seed(seed)
    return kw


def _call(name, lp, old, adv, mask=None, seed=0, **extra):
    return getattr(PL, name)(lp, old, adv, mask, **{**_kw(name, seed), **extra})


@st.composite
def batches(draw, max_batch_dims=2, max_time=6, row_constant_adv=False):
    shp = draw(shapes(max_batch_dims=max_batch_dims, max_side=3, min_time=1, max_time=max_time))
    lp = draw(float_tensors(shp, min_value=-4.0, max_value=-0.01))
    old = draw(float_tensors(shp, min_value=-4.0, max_value=-0.01))
    if row_constant_adv:
        adv = draw(float_tensors(shp[:-1], min_value=-3, max_value=3)).unsqueeze(-1).expand(shp).clone()
    else:
        adv = draw(float_tensors(shp, min_value=-3, max_value=3))
    mask = draw(masks(shp))
    return lp, old, adv, mask


# ------------------------------------------------------------------ reference loops


@pytest.mark.parametrize("name", NAMES)
@given(batch=batches(), agg_mode=st.sampled_from(AGG_MODES))
def test_matches_reference_loop(name, batch, agg_mode):
    lp, old, adv, mask = batch
    if name in ("clip_cov", "kl_cov"):
        # a top-k by covariance: two covariances equal in exact arithmetic may differ in the last bits between
        # the vectorised sum and the loop's, and then the two pick different tokens; such near-ties are skipped
        cov = sorted(R.ref_covariances(lp, adv, mask))
        assume(all(b == a or b - a > 1e-9 for a, b in zip(cov, cov[1:], strict=False)))
    got, _ = _call(name, lp, old, adv, mask, agg_mode=agg_mode)
    want = REF[name](lp, old, adv, mask, **_kw(name), agg_mode=agg_mode)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name", ["gspo", "cispo", "dppo_tv", "dro"])
def test_matches_reference_with_global_counts_and_normalizer(name):
    g = torch.Generator().manual_seed(1)
    lp, old = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3, -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    adv, mask = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.rand(4, 5, generator=g) > 0.3
    for mode, kw in [("token-mean", dict(global_tokens=40.0)), ("seq-mean-token-sum", dict(global_seqs=9.0)),
                     ("seq-mean-token-sum-norm", dict(normalizer=3.0, global_seqs=7.0))]:
        got, _ = _call(name, lp, old, adv, mask, agg_mode=mode, **kw)
        assert got.item() == pytest.approx(REF[name](lp, old, adv, mask, **_kw(name), agg_mode=mode, **kw), rel=1e-10)


def test_reference_gradients_by_finite_differences():
    # Losses without stop-gradients: autograd of the fast function = central differences of the paper's loop.
    g = torch.Generator().manual_seed(2)
    lp = (-torch.rand(3, 4, generator=g, dtype=torch.float64) * 2 - 0.1)
    old = lp + 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    h = 1e-6
    for name in ["gspo", "sapo", "gmpo", "dppo_tv", "dppo_kl", "dro", "kl_cov"]:
        x = lp.clone().requires_grad_(True)
        _call(name, x, old, adv, mask)[0].backward()
        fd = torch.zeros_like(lp)
        for idx in mask.nonzero().tolist():
            plus, minus = lp.clone(), lp.clone()
            plus[tuple(idx)] += h
            minus[tuple(idx)] -= h
            ref = REF[name]
            fd[tuple(idx)] = (ref(plus, old, adv, mask, **_kw(name)) - ref(minus, old, adv, mask, **_kw(name))) / (2 * h)
        torch.testing.assert_close(x.grad, fd, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------ the input contract


def _garbage(x, mask, value):
    return torch.where(mask, x, torch.full_like(x, value))


@pytest.mark.parametrize("name", NAMES)
@given(batch=batches(), agg_mode=st.sampled_from(AGG_MODES), bad=st.sampled_from([math.nan, math.inf, -math.inf, 1e30]))
def test_masked_out_positions_never_matter(name, batch, agg_mode, bad):
    lp, old, adv, mask = batch
    x = lp.clone().requires_grad_(True)
    clean, m1 = _call(name, x, old, adv, mask, agg_mode=agg_mode)
    clean.backward()
    y = _garbage(lp, mask, bad).requires_grad_(True)
    dirty, m2 = _call(name, y, _garbage(old, mask, bad), _garbage(adv, mask, bad), mask, agg_mode=agg_mode)
    dirty.backward()
    assert torch.equal(clean, dirty)
    assert torch.isfinite(y.grad).all()
    assert torch.equal(x.grad, y.grad)
    assert (y.grad[~mask] == 0).all()
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k


def _pack(x, mask, fill=0.0):
    """Each row's masked-in entries moved to the front (order kept), the rest filled."""
    flat_x, flat_m = x.reshape(-1, x.shape[-1]), mask.reshape(-1, mask.shape[-1])
    out, om = torch.full_like(flat_x, fill), torch.zeros_like(flat_m)
    for i in range(flat_x.shape[0]):
        kept = flat_x[i][flat_m[i]]
        out[i, : kept.numel()] = kept
        om[i, : kept.numel()] = True
    return out.reshape(x.shape), om.reshape(mask.shape)


@pytest.mark.parametrize("name", NAMES)
@given(batch=batches(), agg_mode=st.sampled_from(AGG_MODES[:3]))
def test_masking_equals_packing(name, batch, agg_mode):
    lp, old, adv, mask = batch
    got, _ = _call(name, lp, old, adv, mask, agg_mode=agg_mode)
    plp, pm = _pack(lp, mask, -2.0)
    packed, _ = _call(name, plp, _pack(old, mask, -3.0)[0], _pack(adv, mask, 5.0)[0], pm, agg_mode=agg_mode)
    torch.testing.assert_close(got, packed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_mask_dtypes_bool_float_int_agree(name):
    g = torch.Generator().manual_seed(3)
    lp, old = -torch.rand(3, 4, generator=g) * 2, -torch.rand(3, 4, generator=g) * 2
    adv, mask = torch.randn(3, 4, generator=g), torch.rand(3, 4, generator=g) > 0.3
    outs = [_call(name, lp, old, adv, mk)[0] for mk in (mask, mask.float(), mask.long())]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("name", NAMES)
def test_leading_batch_dims_are_flattened_rows(name):
    g = torch.Generator().manual_seed(4)
    lp, old = -torch.rand(2, 3, 5, generator=g, dtype=torch.float64), -torch.rand(2, 3, 5, generator=g, dtype=torch.float64)
    adv, mask = torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.rand(2, 3, 5, generator=g) > 0.3
    for mode in AGG_MODES:
        a = _call(name, lp, old, adv, mask, agg_mode=mode)[0]
        b = _call(name, lp.reshape(6, 5), old.reshape(6, 5), adv.reshape(6, 5), mask.reshape(6, 5), agg_mode=mode)[0]
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_and_empty_rows(name):
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    old, adv = torch.tensor([[-1.2, -2.0], [-0.4, -1.0]]), torch.tensor([[1.0, -1.0], [2.0, 0.5]])
    none = torch.zeros(2, 2, dtype=torch.bool)
    loss, metrics = _call(name, lp, old, adv, none)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(lp.grad).all() and (lp.grad == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())
    one_row = torch.tensor([[True, True], [False, False]])
    for mode in AGG_MODES:  # an empty row adds nothing (and counts as a sequence, as in aggregate)
        full = _call(name, lp, old, adv, one_row, agg_mode=mode)[0]
        alone = _call(name, lp[:1], old[:1], adv[:1], one_row[:1], agg_mode=mode)[0]
        scale = 0.5 if mode.startswith("seq-mean") else 1.0
        torch.testing.assert_close(full, scale * alone)


@pytest.mark.parametrize("name", sorted(set(NAMES) - BATCH_WIDE))
@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_micro_batches_by_rows_add_up_with_global_counts(name, agg_mode):
    g = torch.Generator().manual_seed(5)
    lp = (-torch.rand(6, 5, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    old = lp.detach() + 0.3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    adv, mask = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.rand(6, 5, generator=g) > 0.3
    full = _call(name, lp, old, adv, mask, agg_mode=agg_mode)[0]
    kw = dict(global_tokens=float(mask.sum()), global_seqs=6.0)
    parts = sum(_call(name, lp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], agg_mode=agg_mode, **kw)[0]
                for i in range(0, 6, 2))
    torch.testing.assert_close(parts, full, rtol=1e-12, atol=1e-12)
    (g_full,) = torch.autograd.grad(full, lp)
    (g_parts,) = torch.autograd.grad(parts, lp)
    torch.testing.assert_close(g_parts, g_full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_close_to_float64(name, dtype):
    g = torch.Generator().manual_seed(6)
    lp, old = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 2, -torch.rand(4, 6, generator=g, dtype=torch.float64) * 2
    adv, mask = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.rand(4, 6, generator=g) > 0.3
    want = _call(name, lp, old, adv, mask)[0]
    x = lp.to(dtype).requires_grad_(True)
    got, metrics = _call(name, x, old.to(dtype), adv.to(dtype), mask)
    got.backward()
    assert got.dtype == torch.float32 and torch.isfinite(x.grad).all()
    if dtype == torch.float32 and name not in BATCH_WIDE | {"dppo_tv", "dppo_kl"}:  # selections may flip on rounding
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_metrics_are_detached_scalars(name):
    g = torch.Generator().manual_seed(7)
    lp = (-torch.rand(3, 4, generator=g)).requires_grad_(True)
    _, metrics = _call(name, lp, lp.detach() - 0.1, torch.randn(3, 4, generator=g))
    for key in ("ratio_mean", "approx_kl", ANALOGUE.get(name, "clip_frac")):
        assert key in metrics, key
    for v in metrics.values():
        assert v.ndim == 0 and not v.requires_grad


# ------------------------------------------------------------------ special cases from the papers


def _grad(fn, lp, *args, **kw):
    x = lp.clone().requires_grad_(True)
    loss = fn(x, *args, **kw)[0]
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g


@given(batch=batches(row_constant_adv=True), agg_mode=st.sampled_from(AGG_MODES))
def test_gspo_token_equals_gspo_for_sequence_advantages(batch, agg_mode):
    lp, old, adv, mask = batch
    a, ga = _grad(PL.gspo, lp, old, adv, mask, clip=0.2, clip_high=0.3, agg_mode=agg_mode)
    b, gb = _grad(PL.gspo_token, lp, old, adv, mask, clip=0.2, clip_high=0.3, agg_mode=agg_mode)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
@given(batch=batches(max_time=1))
def test_gspo_on_one_token_sequences_is_ppo(name, batch):
    lp, old, adv, mask = batch
    a, ga = _grad(getattr(PL, name), lp, old, adv, mask, clip=0.2, clip_high=0.28, agg_mode="token-mean")
    b, gb = _grad(policy_loss, lp, old, adv, mask.double(), clip=0.2, clip_high=0.28)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


@given(batch=batches(max_time=1), c=st.floats(0.05, 0.6))
def test_gmpo_on_one_token_sequences_is_ppo_with_log_space_clip(batch, c):
    lp, old, adv, mask = batch
    a, ga = _grad(PL.gmpo, lp, old, adv, mask, clip=c, agg_mode="token-mean")
    b, gb = _grad(policy_loss, lp, old, adv, mask.double(), clip=1 - math.exp(-c), clip_high=math.exp(c) - 1)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


ON_POLICY = {
    # name -> (kwargs, agg_mode in which its on-policy gradient is GRPO's / PPO's at ratio 1)
    "gspo": ({}, "seq-mean-token-mean"),
    "gspo_token": ({}, "seq-mean-token-mean"),
    "gmpo": ({}, "seq-mean-token-mean"),
    "sapo": ({}, "seq-mean-token-mean"),
    "cispo": ({}, "token-mean"),
    "dppo_tv": ({}, "token-mean"),
    "dppo_kl": ({}, "token-mean"),
    "dro": ({"beta": 0.5}, "token-mean"),
    "kl_cov": ({"cov_ratio": 0.5}, "token-mean"),  # |log ratio| has zero (sub)gradient at 0
    "clip_cov": ({"cov_low": 1e9, "cov_high": 1e9}, "token-mean"),  # no candidate: plain surrogate
}


@pytest.mark.parametrize("name", list(ON_POLICY))
@given(batch=batches(row_constant_adv=True))
def test_on_policy_gradient_is_the_policy_gradient(name, batch):
    # At π_θ = π_old every loss's gradient is PPO's at ratio 1 (= GRPO's), -A ∇log π / N.
    lp, _, adv, mask = batch
    kw, mode = ON_POLICY[name]
    _, got = _grad(getattr(PL, name), lp, lp, adv, mask, agg_mode=mode, **kw)
    _, want = _grad(policy_loss, lp, lp, adv, mask.double(), agg_mode=mode)
    torch.testing.assert_close(got, want)


@given(batch=batches())
def test_cispo_gradient_is_clipped_weight_times_advantage(batch):
    lp, old, adv, mask = batch
    _, g = _grad(PL.cispo, lp, old, adv, mask, epsilon_low=0.3, epsilon_high=0.2)
    w = torch.exp(lp - old).clamp(0.7, 1.2)
    torch.testing.assert_close(g, torch.where(mask, -w * adv, 0.0) / mask.sum().clamp_min(1))


def test_cispo_ratio_cap_is_trls_absolute_cap():
    lp, old, adv = torch.log(torch.tensor([[3.0, 6.0]])), torch.zeros(1, 2), torch.ones(1, 2)
    _, g = _grad(PL.cispo, lp, old, adv, ratio_cap=5.0)
    torch.testing.assert_close(g, torch.tensor([[-3.0, -5.0]]) / 2)


@given(batch=batches())
def test_sapo_gradient_weight_is_the_soft_gate(batch):
    lp, old, adv, mask = batch
    _, g = _grad(PL.sapo, lp, old, adv, mask, tau_pos=2.0, tau_neg=3.0, agg_mode="token-mean")
    r = torch.exp(lp - old)
    tau = torch.where(adv > 0, 2.0, 3.0).double()
    s = torch.sigmoid(tau * (r - 1))
    torch.testing.assert_close(g, torch.where(mask, -4 * s * (1 - s) * r * adv, 0.0) / mask.sum().clamp_min(1))


def test_sapo_small_temperature_is_the_unclipped_surrogate_gradient():
    g = torch.Generator().manual_seed(8)
    lp, old, adv = -torch.rand(3, 4, generator=g, dtype=torch.float64), -torch.rand(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    _, got = _grad(PL.sapo, lp, old, adv, tau_pos=1e-6, tau_neg=1e-6, agg_mode="token-mean")
    _, want = _grad(policy_loss, lp, old, adv, clip=1.0, clip_high=1e9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name,wide", [("dppo_tv", dict(delta=1.0)), ("dppo_kl", dict(delta=1e9))])
@given(batch=batches())
def test_dppo_with_an_infinite_trust_region_is_the_unclipped_surrogate(name, wide, batch):
    lp, old, adv, mask = batch
    a, ga = _grad(getattr(PL, name), lp, old, adv, mask, **wide)
    b, gb = _grad(policy_loss, lp, old, adv, mask.double(), clip=1.0, clip_high=1e9)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl"])
def test_dppo_ratio_cap_is_verls_form_with_the_same_gradient_below_the_cap(name):
    g = torch.Generator().manual_seed(9)
    lp, old = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 2, -torch.rand(4, 5, generator=g, dtype=torch.float64) * 2
    adv = torch.randn(4, 5, generator=g, dtype=torch.float64)
    r = torch.exp(lp - old)
    cap = float(r.max()) + 1.0
    _, a = _grad(getattr(PL, name), lp, old, adv)
    loss, b = _grad(getattr(PL, name), lp, old, adv, ratio_cap=cap)
    torch.testing.assert_close(a, b)
    keep = _call(name, lp, old, adv, None)[1]["clip_frac"]  # same mask either way
    assert keep == _call(name, lp, old, adv, None, ratio_cap=cap)[1]["clip_frac"]
    _, c = _grad(getattr(PL, name), lp, old, adv, ratio_cap=0.5)  # capped weight on -A log π
    kept = b != 0
    torch.testing.assert_close(c[kept], (-adv * r.clamp(max=0.5) / 20)[kept])


def test_dppo_tv_masks_large_moves_of_likely_tokens_that_ppo_keeps():
    # The paper's point: ratio 1.25 of a p = 0.8 token is inside PPO's clip but a 0.2 TV step.
    old, lp, adv = torch.log(torch.tensor([[0.8, 0.004]])), torch.log(torch.tensor([[1.0, 0.006]])), torch.ones(1, 2)
    assert _call("dppo_tv", lp, old, adv)[1]["clip_frac"].item() == 0.5  # the likely token
    assert policy_loss(lp, old, adv, clip=0.28)[1]["clip_frac"].item() == 0.5  # PPO clips the rare one (1.5)


def test_dro_beta_zero_is_reinforce_and_penalty_is_quadratic():
    g = torch.Generator().manual_seed(10)
    lp, old, adv = -torch.rand(3, 4, generator=g, dtype=torch.float64), -torch.rand(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    loss, grad = _grad(PL.dro, lp, old, adv, beta=0.0)
    torch.testing.assert_close(loss, -(adv * lp).mean())
    torch.testing.assert_close(grad, -adv / 12)
    _, grad = _grad(PL.dro, lp, old, adv, beta=0.4)
    torch.testing.assert_close(grad, (-adv + 0.4 * (lp - old)) / 12)


@given(batch=batches())
def test_clip_cov_with_ppo_clip_and_no_candidates_is_ppo(batch):
    lp, old, adv, mask = batch
    a, ga = _grad(PL.clip_cov, lp, old, adv, mask, cov_low=1e9, cov_high=1e9, clip=0.2, clip_high=0.28)
    b, gb = _grad(policy_loss, lp, old, adv, mask.double(), clip=0.2, clip_high=0.28)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_clip_cov_selection_is_deterministic_for_a_generator_and_detaches_the_selected():
    g = torch.Generator().manual_seed(11)
    lp, adv = -torch.rand(8, 16, generator=g, dtype=torch.float64) * 3, torch.randn(8, 16, generator=g, dtype=torch.float64)
    kw = dict(cov_ratio=0.1, cov_low=0.0, cov_high=10.0)

    def grads(seed):
        return _grad(PL.clip_cov, lp, lp, adv, generator=torch.Generator().manual_seed(seed), **kw)[1]

    a, b, c = grads(0), grads(0), grads(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int((a == 0).sum() - (adv == 0).sum()) == int(0.1 * 128)  # exactly ⌊rN⌋ tokens lost their gradient
    cov = torch.tensor(R.ref_covariances(lp, adv)).reshape(8, 16)
    assert ((cov[a == 0] >= 0) & (cov[a == 0] <= 10)).all()  # only candidates are selected


def test_kl_cov_penalises_the_top_covariance_tokens():
    g = torch.Generator().manual_seed(12)
    lp, adv = -torch.rand(4, 8, generator=g, dtype=torch.float64) * 3, torch.randn(4, 8, generator=g, dtype=torch.float64)
    old = lp + 0.1
    _, ga = _grad(PL.kl_cov, lp, old, adv, cov_ratio=0.25, beta=2.0)
    _, g0 = _grad(PL.kl_cov, lp, old, adv, cov_ratio=0.25, beta=0.0)
    diff = ((ga - g0) * 32).abs() > 1e-12
    cov = torch.tensor(R.ref_covariances(lp, adv)).reshape(4, 8)
    assert diff.sum() == 8 and cov[diff].min() >= cov[~diff].max()
    torch.testing.assert_close(((ga - g0) * 32)[diff], torch.full((8,), -2.0, dtype=torch.float64))  # d/dlp 2|lp - old|


@pytest.mark.parametrize("name", ["gspo", "gspo_token", "cispo", "sapo", "gmpo", "dppo_tv", "dppo_kl"])
@given(batch=batches(), c=st.floats(0.1, 10.0))
def test_positively_homogeneous_in_the_advantages(name, batch, c):
    lp, old, adv, mask = batch
    a = _call(name, lp, old, adv, mask)[0]
    b = _call(name, lp, old, c * adv, mask)[0]
    torch.testing.assert_close(b, c * a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
@given(shape=shapes(max_batch_dims=1, max_time=6), data=st.data())
def test_gradients_finite_for_log_probs_down_to_minus_30_in_float32(name, shape, data):
    lp = data.draw(float_tensors(shape, min_value=-30.0, max_value=0.0, dtype=torch.float32)).requires_grad_(True)
    old = data.draw(float_tensors(shape, min_value=-30.0, max_value=0.0, dtype=torch.float32))
    adv = data.draw(float_tensors(shape, min_value=-5.0, max_value=5.0, dtype=torch.float32))
    loss, metrics = _call(name, lp, old, adv, agg_mode=data.draw(st.sampled_from(AGG_MODES)))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("name", sorted(set(NAMES) - BATCH_WIDE))
@given(batch=batches(max_batch_dims=1), agg_mode=st.sampled_from(AGG_MODES), data=st.data())
def test_invariant_to_the_order_of_the_rows(name, batch, agg_mode, data):
    lp, old, adv, mask = batch
    perm = torch.tensor(data.draw(st.permutations(range(lp.shape[0]))), dtype=torch.long)
    a = _call(name, lp, old, adv, mask, agg_mode=agg_mode)[0]
    b = _call(name, lp[perm], old[perm], adv[perm], mask[perm], agg_mode=agg_mode)[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ hyperparameter errors

BAD = [
    ("gspo", dict(clip=-0.1), "clip"), ("gspo", dict(clip=1.5), "clip"), ("gspo", dict(clip_high=-1.0), "clip_high"),
    ("gspo_token", dict(clip=math.nan), "clip"),
    ("cispo", dict(epsilon_low=1.5), "epsilon_low"), ("cispo", dict(epsilon_high=-0.1), "epsilon_high"),
    ("cispo", dict(ratio_cap=0.0), "ratio_cap"),
    ("sapo", dict(tau_pos=0.0), "tau_pos"), ("sapo", dict(tau_neg=-1.0), "tau_neg"),
    ("gmpo", dict(clip=-0.1), "clip"), ("gmpo", dict(clip_high=-0.1), "clip_high"),
    ("clip_cov", dict(cov_ratio=0.0), "cov_ratio"), ("clip_cov", dict(cov_ratio=1.5), "cov_ratio"),
    ("clip_cov", dict(cov_low=2.0, cov_high=1.0), "cov_high"), ("clip_cov", dict(clip=2.0), "clip"),
    ("clip_cov", dict(clip_high=0.3), "clip_high"),
    ("kl_cov", dict(cov_ratio=-0.1), "cov_ratio"), ("kl_cov", dict(beta=-1.0), "beta"),
    ("kl_cov", dict(kl_estimator="k9"), "kl_estimator"),
    ("dppo_tv", dict(delta=1.5), "delta"), ("dppo_tv", dict(delta_high=-0.1), "delta_high"),
    ("dppo_tv", dict(ratio_cap=-1.0), "ratio_cap"), ("dppo_kl", dict(delta=-1.0), "delta"),
    ("dro", dict(beta=-0.5), "beta"), ("dro", dict(agg_mode="seq-sum"), "agg_mode"),
]


@pytest.mark.parametrize("name,kw,param", BAD)
def test_out_of_range_hyperparameters_name_parameter_value_and_range(name, kw, param):
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=rf"^{param} (must be (in|one of) .*|needs clip .*), got "):
        getattr(PL, name)(z, z, z, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_shape_mismatch_names_the_argument(name):
    with pytest.raises(TypeError, match="advantages"):
        getattr(PL, name)(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4))


def test_docs_page_example_runs():
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "losses.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)
    assert blocks
    for code in blocks:
        exec(compile(code, str(page), "exec"), {"__name__": "__docs__"})
