"""The unified entry points: ``advantages(method, ...)`` and RL2-style ``compute_advantages_unified``."""

from __future__ import annotations

import pytest
import torch
from _returns_helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

import rl2fx
from rl2fx.returns import (
    advantages,
    clipped_is,
    compute_advantages_unified,
    gae,
    get_estimator,
    grpo,
    list_estimators,
    multistep,
    reinforce,
    td_lambda,
    vtrace,
)
from rl2fx.testing.strategies import float_tensors, masks, trajectories

ALL = ["gae", "reinforce", "vtrace", "retrace", "td_lambda", "clipped_is", "multistep",
       "grpo", "dr_grpo", "rloo", "reinforce_pp", "remax", "opo", "gpg", "grpo_passk", "reinforce_pp_baseline",
       "grpo_batch_std", "gdpo", "optimal_token_baseline"]


def test_every_method_is_dispatched_and_importable_from_rl2fx():
    assert sorted(list_estimators()) == sorted(ALL)
    for name in ["vtrace", "retrace", "td_lambda", "clipped_is", "multistep", "gae", "reinforce",
                 "grpo", "dr_grpo", "rloo", "reinforce_pp", "whiten", "advantages", "compute_advantages_unified",
                 "discounted", "n_step", "reverse_scan"]:
        assert callable(getattr(rl2fx, name)), name


def _inputs(method: str, B: int = 4, T: int = 6) -> dict:
    g = torch.Generator().manual_seed(1)
    kw = dict(rewards=torch.randn(B, T, generator=g), mask=torch.rand(B, T, generator=g) > 0.3)
    if "values" in get_estimator(method).required:
        kw["values"] = torch.randn(B, T, generator=g)
    if "log_rhos" in get_estimator(method).required:
        kw["log_rhos"] = 0.3 * torch.randn(B, T, generator=g)
    if "group_size" in get_estimator(method).inputs:
        kw["group_size"] = 2
    if "greedy_rewards" in get_estimator(method).required:
        kw["greedy_rewards"] = torch.randn(B // 2, generator=g)
    if "reward_components" in get_estimator(method).required:
        kw["reward_components"] = torch.randn(B, 3, generator=g)
    if "sum_pi_squared" in get_estimator(method).required:
        p = torch.rand(B, T, generator=g) * 0.9 + 0.05
        kw["old_logprobs"], kw["sum_pi_squared"] = p.log(), p**2 + (1 - p) ** 2 / 4
    return kw


@pytest.mark.parametrize("method", ALL)
def test_advantages_returns_finite_tensors_of_the_batch_shape(method):
    kw = _inputs(method)
    out = advantages(method, **kw)
    assert out["advantages"].shape == out["returns"].shape == kw["rewards"].shape
    assert torch.isfinite(out["advantages"]).all() and torch.isfinite(out["returns"]).all()
    assert torch.all(out["advantages"][~kw["mask"]] == 0)


def test_advantages_equals_the_direct_calls():
    kw = _inputs("vtrace")
    r, v, m, lr = kw["rewards"], kw["values"], kw["mask"], kw["log_rhos"]
    out = advantages("gae", rewards=r, values=v, mask=m)  # spec defaults γ 0.99, λ 0.95
    adv, ret = gae(r, v, gamma=0.99, lamda=0.95, mask=m)
    assert torch.equal(out["advantages"], adv) and torch.equal(out["returns"], ret)
    out = advantages("td_lambda", rewards=r, values=v, mask=m, gamma=0.9, lamda=0.5)
    assert torch.equal(out["returns"], td_lambda(r, v, gamma=0.9, lamda=0.5, mask=m))
    out = advantages("vtrace", rewards=r, values=v, log_rhos=lr, mask=m, rho_bar=1.5)
    vs, pg = vtrace(r, v, lr, gamma=0.99, lamda=1.0, rho_bar=1.5, c_bar=1.0, mask=m)
    assert torch.equal(out["vs"], vs) and torch.equal(out["returns"], vs) and torch.equal(out["advantages"], pg)
    # logps/old_logps is the same as log_rhos = logps - old_logps
    out2 = advantages("vtrace", rewards=r, values=v, logps=lr + 1.0, old_logps=torch.ones_like(lr), mask=m, rho_bar=1.5)
    assert_close(out2["advantages"], pg)
    out = advantages("clipped_is", rewards=r, values=v, log_rhos=lr, mask=m)
    assert torch.equal(out["advantages"], clipped_is(adv, lr, clip_ratio=0.2, mask=m))
    assert torch.equal(out["returns"], ret)
    out = advantages("multistep", rewards=r, values=v, mask=m)
    a, rr = multistep(r, v, gamma=0.99, lamda=0.95, n_steps=5, bootstrap_method="gae", mask=m)
    assert torch.equal(out["advantages"], a) and torch.equal(out["returns"], rr)
    out = advantages("grpo", rewards=r, mask=m, group_size=2)
    assert torch.equal(out["advantages"], grpo(r, 2, mask=m))
    out = advantages("reinforce", rewards=r, mask=m, group_size=2, norm_std=True)
    assert torch.equal(out["advantages"], reinforce(r, 2, mask=m, norm_std=True))


def test_trainer_style_call_with_unused_arguments_set_to_none():
    kw = _inputs("gae")
    out = advantages("gae", **kw, group_size=None, log_rhos=None, gamma=0.99, lamda=0.95)
    assert out["advantages"].shape == kw["rewards"].shape


def test_dispatch_errors():
    kw = _inputs("gae")
    with pytest.raises(ValueError, match=r"unknown estimator 'ppo'; did you mean 'opo'\? Registered: \['gae', 'td_lambda'"):
        advantages("ppo", **kw)
    with pytest.raises(ValueError, match=r"method 'gae' does not take argument\(s\) \['rho_bar'\]; it accepts \["):
        advantages("gae", **kw, rho_bar=1.0)
    with pytest.raises(ValueError, match=r"does not take argument\(s\) \['lamdba'\]"):
        advantages("gae", **kw, lamdba=0.9)
    with pytest.raises(ValueError, match=r"needs argument\(s\) \['values'\]"):
        advantages("gae", rewards=kw["rewards"])
    with pytest.raises(ValueError, match="pass log_rhos .* or logps"):
        advantages("vtrace", rewards=kw["rewards"], values=kw["values"])
    with pytest.raises(ValueError, match="group_size"):
        advantages("grpo", rewards=kw["rewards"])
    with pytest.raises(ValueError, match="gamma must be in"):
        advantages("gae", **kw, gamma=2.0)


def test_batch_inputs_a_method_does_not_read_are_ignored():
    kw = _inputs("gae")
    plain = advantages("gae", **kw)
    extra = advantages("gae", **kw, group_size=4, greedy_rewards=torch.zeros(2), log_rhos=torch.zeros(4, 6))
    assert torch.equal(plain["advantages"], extra["advantages"]) and torch.equal(plain["returns"], extra["returns"])


# ----------------------------------------------------------------- compute_advantages_unified


@st.composite
def ragged(draw, *, group_size: int = 1, with_mask: bool = True):
    n = group_size * draw(st.integers(1, 3))
    out = []
    for _ in range(n):
        L = draw(st.integers(1, 7))
        d = {
            "rewards": draw(float_tensors((L,))),
            "values": draw(float_tensors((L,))),
            "logps": draw(float_tensors((L,), min_value=-2, max_value=0)),
            "old_logps": draw(float_tensors((L,), min_value=-2, max_value=0)),
        }
        if with_mask:
            d["action_mask"] = draw(masks((L,))).to(torch.int64)  # RL2 stores 0/1 integers
        out.append(d)
    return out


def _single(method: str, d: dict, **params) -> dict:
    """The estimator run on one sequence alone, with no padding at all."""
    kw = {"rewards": d["rewards"], "mask": d.get("action_mask")}
    if "values" in get_estimator(method).inputs:
        kw["values"] = d["values"]
    if "log_rhos" in get_estimator(method).inputs:
        kw["logps"], kw["old_logps"] = d["logps"], d["old_logps"]
    return advantages(method, **kw, **params)


@pytest.mark.parametrize("method", ["gae", "td_lambda", "vtrace", "retrace", "clipped_is", "multistep"])
@given(data=ragged())
def test_unified_ragged_equals_each_sequence_alone(method, data):
    params = {"gamma": 0.9, "lamda": 0.8}
    if method == "multistep":
        params["n_steps"] = 3
    expected = [_single(method, d, **params) for d in data]
    lengths = [d["rewards"].shape[0] for d in data]
    out = compute_advantages_unified(data, method=method, **params)
    assert out is data
    for d, e, L in zip(out, expected, lengths, strict=True):
        assert d["advantages"].shape == d["returns"].shape == (L,)
        assert_close(d["advantages"], e["advantages"])
        assert_close(d["returns"], e["returns"])


@pytest.mark.parametrize("method", ["reinforce", "grpo", "dr_grpo", "rloo", "reinforce_pp"])
@given(data=ragged(group_size=2, with_mask=False))
def test_unified_ragged_group_methods_match_padded_batch(method, data):
    # a token-level batch padded by hand with the padding masked out is what the function must run
    T = max(d["rewards"].shape[0] for d in data)
    r = torch.zeros(len(data), T, dtype=torch.float64)
    m = torch.zeros(len(data), T, dtype=torch.bool)
    for i, d in enumerate(data):
        r[i, : d["rewards"].shape[0]] = d["rewards"]
        m[i, : d["rewards"].shape[0]] = True
    expected = advantages(method, rewards=r, mask=m, group_size=2)
    out = compute_advantages_unified(data, method=method, group_size=2)
    for i, d in enumerate(out):
        L = d["rewards"].shape[0]
        assert_close(d["advantages"], expected["advantages"][i, :L])
        assert_close(d["returns"], expected["returns"][i, :L])


def test_unified_hand_example_gae():
    # sequence A: r = [0, 1], V = [0.5, 0.5]; sequence B: r = [2], V = [1] (γ = λ = 1, bootstrap 0)
    # A: δ = [0 + 0.5 - 0.5, 1 - 0.5] = [0, 0.5] -> adv [0.5, 0.5], returns [1, 1]
    # B: δ = [2 - 1] = [1] -> adv [1], returns [2]; B's padding must not leak into its bootstrap
    data = [
        {"rewards": torch.tensor([0.0, 1.0]), "values": torch.tensor([0.5, 0.5])},
        {"rewards": torch.tensor([2.0]), "values": torch.tensor([1.0])},
    ]
    compute_advantages_unified(data, method="gae", gamma=1.0, lamda=1.0)
    torch.testing.assert_close(data[0]["advantages"], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(data[0]["returns"], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(data[1]["advantages"], torch.tensor([1.0]))
    torch.testing.assert_close(data[1]["returns"], torch.tensor([2.0]))


def test_spec_usage_snippet_runs():
    # "Usage in Code" of the spec's Alternative Advantage Estimation section
    g = torch.Generator().manual_seed(0)
    data_list = [
        {"rewards": torch.randn(L, generator=g), "values": torch.randn(L, generator=g),
         "logps": -torch.rand(L, generator=g), "old_logps": -torch.rand(L, generator=g),
         "action_mask": torch.ones(L, dtype=torch.int64)}
        for L in (3, 5, 2)
    ]
    out = rl2fx.compute_advantages_unified(data_list, method="vtrace", gamma=0.99, rho_bar=1.0, c_bar=1.0)
    assert [d["advantages"].shape[0] for d in out] == [3, 5, 2]


def test_unified_errors():
    data = [{"rewards": torch.zeros(3), "values": torch.zeros(2)}]
    with pytest.raises(ValueError, match=r"data_list\[0\]\['values'\] has shape \(2,\)"):
        compute_advantages_unified(data, method="gae")
    data = [{"rewards": torch.zeros(3), "values": torch.zeros(3)}, {"rewards": torch.zeros(3)}]
    with pytest.raises(ValueError, match=r"data_list\[1\] lacks 'values'"):
        compute_advantages_unified(data, method="gae")
    with pytest.raises(ValueError, match="unknown estimator 'ppo'"):
        compute_advantages_unified(data, method="ppo")
    with pytest.raises(ValueError, match="come from the data dicts"):
        compute_advantages_unified(data, method="gae", rewards=torch.zeros(3))
    assert compute_advantages_unified([], method="gae") == []


@given(trajectories(shape=(3, 5), with_mask=True))
def test_unified_accepts_float_masks(traj):
    m = traj["mask"]
    a = advantages("gae", rewards=traj["rewards"], values=traj["values"], mask=m)
    b = advantages("gae", rewards=traj["rewards"], values=traj["values"], mask=m.to(torch.float32))
    assert torch.equal(a["advantages"], b["advantages"])
