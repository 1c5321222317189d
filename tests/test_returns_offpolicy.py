"""V-trace, Retrace(λ), clipped IS and multi-step returns against references, TorchRL and hand arithmetic."""

from __future__ import annotations

import pytest
import torch
from _returns_helpers import assert_close, assert_unchanged, cast, snapshot
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.returns import clipped_is, discounted, multistep, n_step, retrace, td_lambda, vtrace
from rl2fx.testing import reference as ref
from rl2fx.testing.strategies import dtypes, float_tensors, trajectories

clips = st.one_of(st.floats(0.1, 3.0), st.sampled_from([1.0, float("inf")]))


def _vkw(t: dict) -> dict:
    return {k: t[k] for k in ("gamma", "lamda", "bootstrap_value", "mask", "terminated", "done") if k in t}


@given(
    trajectories(with_mask=True, with_terminated=True, with_done=True, with_log_rhos=True),
    clips, clips, st.one_of(st.none(), clips), dtypes(),
)
def test_vtrace_matches_reference(traj, rho_bar, c_bar, pg_rho_bar, dtype):
    t = cast(traj, dtype)
    before = snapshot(t)
    kw = dict(rho_bar=rho_bar, c_bar=c_bar, pg_rho_bar=pg_rho_bar, **_vkw(t))
    vs, pg = vtrace(t["rewards"], t["values"], t["log_rhos"], **kw)
    ref_vs, ref_pg = ref.ref_vtrace(t["rewards"], t["values"], t["log_rhos"], **kw)
    assert vs.dtype == pg.dtype == dtype
    assert_close(vs, ref_vs)
    assert_close(pg, ref_pg)
    assert_unchanged(t, before)


@given(trajectories(with_mask=True), st.floats(1.0, 5.0), st.floats(1.0, 5.0))
def test_vtrace_on_policy_is_lambda_returns(traj, rho_bar, c_bar):
    """On-policy with rho_bar, c_bar >= 1: ρ = c = 1, so V-trace targets are λ-returns (λ=1: MC)."""
    kw = {k: traj[k] for k in ("gamma", "bootstrap_value", "mask")}
    zeros = torch.zeros_like(traj["rewards"])
    vs, pg = vtrace(traj["rewards"], traj["values"], zeros, rho_bar=rho_bar, c_bar=c_bar, **kw)
    assert_close(vs, td_lambda(traj["rewards"], traj["values"], lamda=1.0, **kw))
    assert_close(vs, discounted(traj["rewards"], **kw))
    vs_l, _ = vtrace(traj["rewards"], traj["values"], zeros, rho_bar=rho_bar, c_bar=c_bar, lamda=traj["lamda"], **kw)
    assert_close(vs_l, td_lambda(traj["rewards"], traj["values"], lamda=traj["lamda"], **kw))


@given(trajectories(max_batch_dims=1, with_terminated=True, with_log_rhos=True, per_step=False), clips, clips)
def test_vtrace_matches_torchrl(traj, rho_bar, c_bar):
    from torchrl.objectives.value.functional import vtrace_advantage_estimate

    r, v, lr, term = traj["rewards"], traj["values"], traj["log_rhos"], traj["terminated"]
    if r.ndim == 1:
        r, v, lr, term = r[None], v[None], lr[None], term[None]
    boot = traj["bootstrap_value"]
    b = torch.zeros(r.shape[:-1], dtype=r.dtype) if boot is None else boot.reshape(r.shape[:-1])
    next_v = torch.cat([v[..., 1:], b[..., None]], dim=-1)
    e = lambda x: x[..., None]  # noqa: E731  (TorchRL wants a trailing feature dim, time at -2)
    t_adv, t_vs = vtrace_advantage_estimate(
        traj["gamma"], e(lr), torch.zeros_like(e(lr)), e(v), e(next_v), e(r), e(term), e(term),
        rho_thresh=rho_bar, c_thresh=c_bar,
    )
    vs, pg = vtrace(r, v, lr, gamma=traj["gamma"], rho_bar=rho_bar, c_bar=c_bar, bootstrap_value=b, terminated=term)
    assert_close(vs, t_vs[..., 0], torch.float32)
    assert_close(pg, t_adv[..., 0], torch.float32)


@given(trajectories(with_mask=True, with_log_rhos=True), dtypes())
def test_retrace_matches_reference(traj, dtype):
    t = cast(traj, dtype)
    q, vn = t["values"], torch.roll(t["rewards"], 1, -1)  # any two tensors of the right shape
    kw = {k: t[k] for k in ("gamma", "lamda", "bootstrap_value", "mask")}
    got = retrace(t["rewards"], q, vn, t["log_rhos"], **kw)
    assert got.dtype == dtype
    assert_close(got, ref.ref_retrace(t["rewards"], q, vn, t["log_rhos"], **kw))


@given(trajectories(with_mask=True, max_batch_dims=1))
def test_retrace_on_policy_with_v_critic_is_lambda_returns(traj):
    """Q = V, E_π Q(x_{t+1}) = V_{t+1}, ρ = 1: Retrace is TD(λ) (c_t = λ)."""
    r, v, m = traj["rewards"], traj["values"], traj["mask"]
    lam = traj["lamda"] if not isinstance(traj["lamda"], torch.Tensor) else 0.5
    from rl2fx.returns import advantages

    out = advantages("retrace", rewards=r, values=v, log_rhos=torch.zeros_like(r), mask=m,
                     gamma=traj["gamma"], lamda=lam, bootstrap_value=traj["bootstrap_value"])
    # Retrace's trace at t uses λ of step t+1: with a constant λ this is the λ-return
    expected = td_lambda(r, v, gamma=traj["gamma"], lamda=lam, mask=m, bootstrap_value=traj["bootstrap_value"])
    assert_close(out["returns"], expected)


@given(trajectories(with_mask=True, with_log_rhos=True), st.floats(0.0, 1.0), dtypes())
def test_clipped_is_matches_reference(traj, clip, dtype):
    t = cast(traj, dtype)
    got = clipped_is(t["values"], t["log_rhos"], clip_ratio=clip, mask=t["mask"])
    assert_close(got, ref.ref_clipped_is(t["values"], t["log_rhos"], clip_ratio=clip, mask=t["mask"]))


@given(trajectories(with_mask=True), st.integers(1, 10), st.sampled_from(["gae", "td", "mc"]), dtypes(("float32", "float64")))
def test_multistep_matches_reference(traj, n, method, dtype):
    t = cast(traj, dtype)
    kw = {k: t[k] for k in ("gamma", "lamda", "bootstrap_value", "mask")}
    adv, ret = multistep(t["rewards"], t["values"], n_steps=n, bootstrap_method=method, **kw)
    ref_adv, ref_ret = ref.ref_multistep(t["rewards"], t["values"], n_steps=n, bootstrap_method=method, **kw)
    assert_close(ret, ref_ret)
    assert_close(adv, ref_adv)


@given(trajectories(with_mask=True), st.integers(1, 10))
def test_multistep_special_cases(traj, n):
    r, v = traj["rewards"], traj["values"]
    kw = {k: traj[k] for k in ("gamma", "bootstrap_value", "mask")}
    # mc tail: the full discounted return for every n
    assert_close(multistep(r, v, n_steps=n, bootstrap_method="mc", **kw)[1], discounted(r, **kw))
    # td tail: the n-step return
    assert_close(multistep(r, v, n_steps=n, bootstrap_method="td", **kw)[1], n_step(r, v, n_steps=n, **kw))
    # gae tail with λ = 0 is the one-step target V̂ = r + γV, i.e. the (n+1)-step return
    assert_close(
        multistep(r, v, n_steps=n, bootstrap_method="gae", lamda=0.0, **kw)[1], n_step(r, v, n_steps=n + 1, **kw)
    )


# ----------------------------------------------------------------- hand-checked examples


def test_vtrace_hand_example():
    r = torch.tensor([1.0, 0.0])
    v = torch.tensor([0.0, 1.0])
    log_rhos = torch.tensor([2.0, 0.5]).log()
    # γ = 1, ρ̄ = c̄ = 1, bootstrap V_2 = 2:  ρ = min(1, [2, 0.5]) = [1, 0.5], c = [1, 0.5]
    # δ_1 = 0.5 * (0 + 2 - 1) = 0.5          -> vs_1 = 1 + 0.5 = 1.5
    # δ_0 = 1.0 * (1 + 1 - 0) = 2.0          -> vs_0 = 0 + 2 + 1*1*(vs_1 - V_1) = 2.5
    # pg_1 = 0.5 * (0 + 2 - 1) = 0.5; pg_0 = 1 * (1 + vs_1 - 0) = 2.5
    vs, pg = vtrace(r, v, log_rhos, gamma=1.0, bootstrap_value=torch.tensor(2.0))
    torch.testing.assert_close(vs, torch.tensor([2.5, 1.5]))
    torch.testing.assert_close(pg, torch.tensor([2.5, 0.5]))
    # a separate pg clip: pg_rho_bar = 2 lets step 0 keep its ratio 2: pg_0 = 2 * 2.5 = 5
    _, pg = vtrace(r, v, log_rhos, gamma=1.0, pg_rho_bar=2.0, bootstrap_value=torch.tensor(2.0))
    torch.testing.assert_close(pg, torch.tensor([5.0, 0.5]))


def test_retrace_hand_example():
    r = torch.tensor([1.0, 1.0])
    q = torch.tensor([0.5, 2.0])
    v_next = torch.tensor([1.5, 0.0])
    log_rhos = torch.tensor([3.0, 0.25]).log()  # c_0 never enters: Q^ret_0 needs only c_1
    # γ = 1, λ = 0.8: c_1 = 0.8 * min(1, 0.25) = 0.2
    # Q^ret_1 = r_1 + v_next_1 = 1.0
    # Q^ret_0 = r_0 + v_next_0 + c_1 (Q^ret_1 - Q_1) = 1 + 1.5 + 0.2 * (1 - 2) = 2.3
    got = retrace(r, q, v_next, log_rhos, gamma=1.0, lamda=0.8)
    torch.testing.assert_close(got, torch.tensor([2.3, 1.0]))


def test_clipped_is_hand_example():
    # ratios [0.5, 1.1, 3.0] clipped to [0.8, 1.2] -> [0.8, 1.1, 1.2]; advantages [1, -2, 2]
    got = clipped_is(torch.tensor([1.0, -2.0, 2.0]), torch.tensor([0.5, 1.1, 3.0]).log())
    torch.testing.assert_close(got, torch.tensor([0.8, -2.2, 2.4]))


def test_multistep_hand_example():
    r = torch.tensor([1.0, 1.0, 1.0])
    v = torch.tensor([0.0, 2.0, 4.0])
    # γ = 0.5, n = 1, gae tail with λ = 1 (the MC return): G^MC = [1.75, 1.5, 1.0]
    # G_0 = r_0 + 0.5 * G^MC_1 = 1.75; G_1 = 1 + 0.5 * 1 = 1.5; G_2 = 1 + 0.5 * bootstrap 0 = 1
    adv, ret = multistep(r, v, gamma=0.5, lamda=1.0, n_steps=1)
    torch.testing.assert_close(ret, torch.tensor([1.75, 1.5, 1.0]))
    torch.testing.assert_close(adv, torch.tensor([1.75, -0.5, -3.0]))


# ----------------------------------------------------------------- errors


def test_offpolicy_errors_name_the_parameter():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="rho_bar must be in"):
        vtrace(z, z, z, gamma=0.9, rho_bar=0.0)
    with pytest.raises(ValueError, match="c_bar must be in"):
        vtrace(z, z, z, gamma=0.9, c_bar=-1.0)
    with pytest.raises(ValueError, match="pg_rho_bar must be in"):
        vtrace(z, z, z, gamma=0.9, pg_rho_bar=0.0)
    with pytest.raises(ValueError, match="log_rhos contains"):
        vtrace(z, z, torch.full((2, 3), float("nan")), gamma=0.9)
    with pytest.raises(ValueError, match="clip_ratio must be in"):
        clipped_is(z, z, clip_ratio=1.5)
    with pytest.raises(ValueError, match="bootstrap_method must be one of"):
        multistep(z, z, gamma=0.9, bootstrap_method="nstep")
    with pytest.raises(ValueError, match="n_steps must be in"):
        multistep(z, z, gamma=0.9, n_steps=0)
    with pytest.raises(TypeError, match="log_rhos"):
        vtrace(z, z, torch.zeros(2, 4), gamma=0.9)


@given(float_tensors((3, 4)))
def test_clipped_is_inside_the_range_is_plain_is(lr):
    lr = lr.clamp(-0.1, 0.1)  # ratios within [0.9, 1.1] are untouched by a 0.2 clip
    adv = torch.ones(3, 4, dtype=torch.float64)
    assert_close(clipped_is(adv, lr, clip_ratio=0.2), lr.exp())
