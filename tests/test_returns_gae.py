"""GAE, TD(λ), discounted and n-step returns against float64 references, TorchRL, and hand arithmetic."""

from __future__ import annotations

import pytest
import torch
from _returns_helpers import assert_close, assert_unchanged, cast, pack_rows, snapshot
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.returns import discounted, gae, n_step, td_lambda
from rl2fx.testing import reference as ref
from rl2fx.testing.strategies import dtypes, trajectories

FULL = dict(with_mask=True, with_terminated=True, with_done=True)


def _gae_kw(t: dict) -> dict:
    keys = ("gamma", "lamda", "bootstrap_value", "mask", "terminated", "done")
    return {k: t[k] for k in keys if k in t}


# ----------------------------------------------------------------- references


@given(trajectories(**FULL), dtypes(("float32", "float64")))
def test_gae_matches_reference(traj, dtype):
    t = cast(traj, dtype)
    before = snapshot(t)
    adv, ret = gae(t["rewards"], t["values"], **_gae_kw(t))
    ref_adv, ref_ret = ref.ref_gae(t["rewards"], t["values"], **_gae_kw(t))
    assert adv.dtype == ret.dtype == dtype
    assert_close(adv, ref_adv)
    assert_close(ret, ref_ret)
    assert_unchanged(t, before)


@given(trajectories(**FULL))
def test_td_lambda_matches_recursive_definition(traj):
    # the fast path goes through GAE; the reference is the λ-return recursion itself
    got = td_lambda(traj["rewards"], traj["values"], **_gae_kw(traj))
    assert_close(got, ref.ref_lambda_returns(traj["rewards"], traj["values"], **_gae_kw(traj)))


@given(trajectories(with_mask=True, with_done=True), dtypes(("float32", "float64")))
def test_discounted_matches_reference(traj, dtype):
    t = cast(traj, dtype)
    kw = {k: t.get(k) for k in ("gamma", "bootstrap_value", "mask", "done")}
    assert_close(discounted(t["rewards"], **kw), ref.ref_discounted(t["rewards"], **kw))


@given(trajectories(with_mask=True), st.integers(1, 10), dtypes(("float32", "float64")))
def test_n_step_matches_reference(traj, n, dtype):
    t = cast(traj, dtype)
    kw = {k: t.get(k) for k in ("gamma", "bootstrap_value", "mask")}
    assert_close(
        n_step(t["rewards"], t["values"], n_steps=n, **kw),
        ref.ref_n_step(t["rewards"], t["values"], n_steps=n, **kw),
    )


@given(trajectories(max_batch_dims=1, with_terminated=True, per_step=False))
def test_gae_matches_torchrl(traj):
    from torchrl.objectives.value.functional import generalized_advantage_estimate

    r, v = traj["rewards"], traj["values"]
    if r.ndim == 1:
        r, v = r[None], v[None]
        boot = None if traj["bootstrap_value"] is None else traj["bootstrap_value"][None]
    else:
        boot = traj["bootstrap_value"]
    term = traj["terminated"].reshape(r.shape)
    # TorchRL needs done ⊇ terminated and an explicit next value per step: ours is the next
    # step's value in the row, then the bootstrap.
    b = torch.zeros(r.shape[:-1], dtype=r.dtype) if boot is None else boot
    next_v = torch.cat([v[..., 1:], b[..., None]], dim=-1)
    t_adv, t_ret = generalized_advantage_estimate(
        traj["gamma"], traj["lamda"], v[..., None], next_v[..., None], r[..., None],
        term[..., None], term[..., None], time_dim=-2,
    )
    adv, ret = gae(r, v, gamma=traj["gamma"], lamda=traj["lamda"], bootstrap_value=boot, terminated=term)
    # TorchRL rounds gamma and lambda through float32: compare at float32 tolerance
    assert_close(adv, t_adv[..., 0], torch.float32)
    assert_close(ret, t_ret[..., 0], torch.float32)


# ----------------------------------------------------------------- special cases


@given(trajectories(with_mask=True))
def test_gae_lambda_one_is_monte_carlo_minus_value(traj):
    kw = {k: traj[k] for k in ("gamma", "bootstrap_value", "mask")}
    adv, _ = gae(traj["rewards"], traj["values"], lamda=1.0, **kw)
    mc = discounted(traj["rewards"], **kw)
    expected = torch.where(traj["mask"], mc - traj["values"], 0.0)
    assert_close(adv, expected)


@given(trajectories(with_mask=True, max_batch_dims=1))
def test_gae_lambda_zero_is_td_error(traj):
    kw = {k: traj[k] for k in ("gamma", "bootstrap_value", "mask")}
    adv, _ = gae(traj["rewards"], traj["values"], lamda=0.0, **kw)
    # TD error on the packed rows: δ_k = r_k + γ_k V_{k+1} - V_k, V after the last = bootstrap
    r, v, m = traj["rewards"], traj["values"], traj["mask"]
    g = traj["gamma"] if isinstance(traj["gamma"], torch.Tensor) else torch.full_like(r, traj["gamma"])
    boot = torch.zeros(r.shape[:-1], dtype=r.dtype) if traj["bootstrap_value"] is None else traj["bootstrap_value"]
    for row_adv, rr, vv, gg, bb in zip(
        pack_rows(adv, m), pack_rows(r, m), pack_rows(v, m), pack_rows(g, m), boot.reshape(-1), strict=True
    ):
        v_next = torch.cat([vv[1:], bb[None]])
        assert_close(row_adv, rr + gg * v_next - vv)


@given(trajectories(with_mask=True), st.integers(0, 3))
def test_n_step_with_n_at_least_T_is_discounted(traj, extra):
    T = traj["rewards"].shape[-1]
    kw = {k: traj[k] for k in ("gamma", "bootstrap_value", "mask")}
    got = n_step(traj["rewards"], traj["values"], n_steps=T + extra, **kw)
    assert_close(got, discounted(traj["rewards"], **kw))


@given(trajectories(with_mask=True, with_done=True, with_terminated=True))
def test_gae_masked_equals_packed_run_scattered(traj):
    """The mask contract: run on each row's masked-in steps alone, scatter back, zeros elsewhere."""
    r, v, m = traj["rewards"], traj["values"], traj["mask"]
    adv, ret = gae(r, v, **_gae_kw(traj))
    T = r.shape[-1]
    expect_adv = torch.zeros_like(r).reshape(-1, T)
    expect_ret = torch.zeros_like(r).reshape(-1, T)
    per_step = {k: traj[k] for k in ("gamma", "lamda") if isinstance(traj[k], torch.Tensor)}
    boot = traj["bootstrap_value"]
    for i, mrow in enumerate(m.reshape(-1, T)):
        if not mrow.any():
            continue
        sel = lambda x, i=i, mrow=mrow: x.reshape(-1, T)[i][mrow]  # noqa: E731
        kw = {k: (sel(per_step[k]) if k in per_step else traj[k]) for k in ("gamma", "lamda")}
        a, b = gae(
            sel(r), sel(v), **kw,
            bootstrap_value=None if boot is None else boot.reshape(-1)[i],
            terminated=sel(traj["terminated"]), done=sel(traj["done"]),
        )
        expect_adv[i, mrow] = a
        expect_ret[i, mrow] = b
    assert_close(adv, expect_adv.reshape(r.shape))
    assert_close(ret, expect_ret.reshape(r.shape))


@given(trajectories(with_mask=True, with_done=True))
def test_bfloat16_inputs_accumulate_in_float32(traj):
    t = cast(traj, torch.bfloat16)
    adv, ret = gae(t["rewards"], t["values"], **_gae_kw(t))
    assert adv.dtype == ret.dtype == torch.bfloat16
    # the reference sees exactly the bfloat16-rounded inputs; only the output rounding differs
    ref_adv, ref_ret = ref.ref_gae(t["rewards"], t["values"], **_gae_kw(t))
    assert_close(adv, ref_adv)
    assert_close(ret, ref_ret)
    kw = {k: t.get(k) for k in ("gamma", "bootstrap_value", "mask", "done")}
    assert_close(discounted(t["rewards"], **kw), ref.ref_discounted(t["rewards"], **kw))


def test_long_bfloat16_sum_does_not_lose_small_rewards():
    # 4096 rewards of 1/256 sum to 16; a bfloat16 accumulator stalls at 2 (1/256 < half an ulp of 2).
    r = torch.full((4096,), 1 / 256, dtype=torch.bfloat16)
    got = discounted(r, gamma=1.0)
    assert got.dtype == torch.bfloat16
    assert got[0].item() == 16.0


# ----------------------------------------------------------------- hand-checked examples


def test_gae_hand_example():
    r = torch.tensor([1.0, 0.0, 2.0])
    v = torch.tensor([0.5, 1.0, 1.5])
    # γ = 0.9, λ = 0.5, bootstrap V_3 = 2.0
    # δ_2 = 2.0 + 0.9*2.0 - 1.5 = 2.3
    # δ_1 = 0.0 + 0.9*1.5 - 1.0 = 0.35
    # δ_0 = 1.0 + 0.9*1.0 - 0.5 = 1.4
    # A_2 = 2.3; A_1 = 0.35 + 0.45*2.3 = 1.385; A_0 = 1.4 + 0.45*1.385 = 2.02325
    adv, ret = gae(r, v, gamma=0.9, lamda=0.5, bootstrap_value=torch.tensor(2.0))
    torch.testing.assert_close(adv, torch.tensor([2.02325, 1.385, 2.3]))
    torch.testing.assert_close(ret, torch.tensor([2.52325, 2.385, 3.8]))


def test_gae_hand_example_with_mask():
    # steps 1 and 3 are not decisions: the packed row is r = [1, 2], V = [0.5, 1.5]
    r = torch.tensor([1.0, 7.0, 2.0, 9.0])
    v = torch.tensor([0.5, 9.0, 1.5, 9.0])
    m = torch.tensor([1, 0, 1, 0])
    # γ = λ = 1, bootstrap 0: δ_1' = 2 - 1.5 = 0.5; δ_0' = 1 + 1.5 - 0.5 = 2.0; A_0' = 2.5
    adv, ret = gae(r, v, gamma=1.0, lamda=1.0, mask=m)
    torch.testing.assert_close(adv, torch.tensor([2.5, 0.0, 0.5, 0.0]))
    torch.testing.assert_close(ret, torch.tensor([3.0, 0.0, 2.0, 0.0]))


def test_gae_hand_example_terminated_and_done():
    r = torch.tensor([1.0, 1.0, 1.0])
    v = torch.tensor([1.0, 2.0, 3.0])
    # γ = λ = 1, bootstrap 10.
    # terminated at step 0: δ_0 = 1 + 0 - 1 = 0, the trace is cut: A_0 = 0
    # step 1: δ_1 = 1 + 3 - 2 = 2; step 2: δ_2 = 1 + 10 - 3 = 8; A_1 = 2 + 8 = 10
    adv, _ = gae(r, v, gamma=1.0, lamda=1.0, bootstrap_value=torch.tensor(10.0),
                 terminated=torch.tensor([True, False, False]))
    torch.testing.assert_close(adv, torch.tensor([0.0, 10.0, 8.0]))
    # done (truncated) at step 1 but not terminated: δ_1 = 1 + V_2 - 2 = 2 keeps its bootstrap,
    # but A_1 does not see A_2: A_1 = 2; A_0 = (1 + 2 - 1) + A_1 = 4
    adv, _ = gae(r, v, gamma=1.0, lamda=1.0, bootstrap_value=torch.tensor(10.0),
                 done=torch.tensor([False, True, False]), terminated=torch.tensor([False, False, False]))
    torch.testing.assert_close(adv, torch.tensor([4.0, 2.0, 8.0]))


def test_n_step_hand_example():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    v = torch.tensor([10.0, 20.0, 30.0, 40.0])
    # n = 2, γ = 0.5, bootstrap 8:
    # G_0 = 1 + 0.5*2 + 0.25*V_2 = 1 + 1 + 7.5 = 9.5
    # G_1 = 2 + 0.5*3 + 0.25*V_3 = 2 + 1.5 + 10 = 13.5
    # G_2 = 3 + 0.5*4 + 0.25*8 = 7.0
    # G_3 = 4 + 0.5*8 = 8.0 (truncated at the end: one reward, then the bootstrap)
    got = n_step(r, v, gamma=0.5, n_steps=2, bootstrap_value=torch.tensor(8.0))
    torch.testing.assert_close(got, torch.tensor([9.5, 13.5, 7.0, 8.0]))


def test_leading_batch_dims_are_independent():
    torch.manual_seed(0)
    r, v = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    adv, _ = gae(r, v, gamma=0.9, lamda=0.8)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(adv[i, j], gae(r[i, j], v[i, j], gamma=0.9, lamda=0.8)[0])


# ----------------------------------------------------------------- errors


def test_errors_name_the_parameter():
    r, v = torch.zeros(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="gamma must be in"):
        gae(r, v, gamma=1.5, lamda=0.9)
    with pytest.raises(ValueError, match="lamda must be in"):
        gae(r, v, gamma=0.9, lamda=-0.1)
    with pytest.raises(ValueError, match="lamda must be in"):
        gae(r, v, gamma=0.9, lamda=torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="n_steps must be in"):
        n_step(r, v, gamma=0.9, n_steps=0)
    with pytest.raises(ValueError, match="mask must be a bool tensor or hold only 0/1"):
        gae(r, v, gamma=0.9, lamda=0.9, mask=torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="rewards contains 1 non-finite"):
        gae(torch.tensor([[0.0, float("nan"), 0.0]]), v[:1], gamma=0.9, lamda=0.9)
    with pytest.raises(ValueError, match="backend must be one of"):
        gae(r, v, gamma=0.9, lamda=0.9, backend="nope")
    with pytest.raises(TypeError, match="values"):
        gae(r, torch.zeros(2, 4), gamma=0.9, lamda=0.9)
    with pytest.raises(TypeError, match="bootstrap_value"):
        gae(r, v, gamma=0.9, lamda=0.9, bootstrap_value=torch.zeros(3))


def test_allow_nonfinite_opts_out():
    r = torch.tensor([0.0, float("inf")])
    adv, _ = gae(r, torch.zeros(2), gamma=1.0, lamda=1.0, allow_nonfinite=True)
    assert torch.isinf(adv).all()


def test_integer_hyperparameters_are_accepted():
    r, v = torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5])
    assert torch.equal(gae(r, v, gamma=1, lamda=1)[0], gae(r, v, gamma=1.0, lamda=1.0)[0])


@pytest.mark.cuda
@given(trajectories(with_mask=True, with_done=True, with_terminated=True, with_log_rhos=True), dtypes())
def test_cuda_matches_cpu(traj, dtype):
    from rl2fx.returns import advantages

    t = cast(traj, dtype)
    dev = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    for method in ("gae", "vtrace", "multistep"):
        keys = {"gae": ("terminated", "done"), "vtrace": ("terminated", "done", "log_rhos"), "multistep": ()}[method]
        pick = lambda d, keys=keys: {k: d[k] for k in ("rewards", "values", "gamma", "lamda", "bootstrap_value", "mask", *keys)}  # noqa: E731
        cpu = advantages(method, **pick(t))
        gpu = advantages(method, **pick(dev))
        assert gpu["advantages"].device.type == "cuda"
        assert_close(gpu["advantages"].cpu(), cpu["advantages"].to(torch.float64), dtype)
        assert_close(gpu["returns"].cpu(), cpu["returns"].to(torch.float64), dtype)
