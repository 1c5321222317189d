"""Lagrangian constraints: dual ascent against a hand loop, projection, gradients, a solved toy problem."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rl2fx
from rl2fx import control as C


def test_spec_defaults_and_names():
    lc = rl2fx.LagrangianConstraints()
    s = lc.state
    assert (s.kl_constraint, s.entropy_constraint, s.use_lagrangian, s.lagrangian_lr) == (0.01, 0.01, True, 0.01)
    assert lc.kl_multiplier == 0.0 and lc.entropy_multiplier == 0.0
    assert C.LagrangianConstraints is rl2fx.LagrangianConstraints


def test_dual_ascent_matches_hand_loop():
    kls = [0.05, 0.0, 0.02, 0.001, 0.3, 0.0, 0.0]
    ents = [0.0, 0.5, 0.001, 0.02, 0.0, 1.0, 1.0]
    lr = 0.7
    lk = le = 0.0
    lc = rl2fx.LagrangianConstraints(kl_constraint=0.01, entropy_constraint=0.01, lagrangian_lr=lr)
    for kl, h in zip(kls, ents, strict=True):
        terms = lc.update(kl=kl, entropy=h)
        assert terms["kl_penalty"] == pytest.approx(lk * (kl - 0.01))
        assert terms["entropy_penalty"] == pytest.approx(le * (0.01 - h))
        assert terms["total"] == pytest.approx(terms["kl_penalty"] + terms["entropy_penalty"])
        lk = max(0.0, lk + lr * (kl - 0.01))
        le = max(0.0, le + lr * (0.01 - h))
        assert lc.kl_multiplier == pytest.approx(lk) and lc.entropy_multiplier == pytest.approx(le)


def test_penalty_gradients_flow_to_kl_and_entropy():
    s = dataclasses.replace(C.lagrangian_init(), kl_multiplier=3.0, entropy_multiplier=0.5)
    kl = torch.tensor([0.02, 0.04], requires_grad=True)
    ent = torch.tensor(0.2, requires_grad=True)
    terms = C.lagrangian_penalty(s, kl=kl.mean(), entropy=ent)
    terms["total"].backward()
    torch.testing.assert_close(kl.grad, torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(ent.grad, torch.tensor(-0.5))


def test_penalty_mode_uses_fixed_hinge():
    lc = rl2fx.LagrangianConstraints(use_lagrangian=False, penalty_coef=2.0)
    t1 = lc.update(kl=0.03, entropy=0.5)   # KL violated, entropy satisfied
    assert t1["kl_penalty"] == pytest.approx(0.04) and t1["entropy_penalty"] == 0.0
    assert lc.kl_multiplier == 2.0 and lc.entropy_multiplier == 2.0
    kl = torch.tensor(0.005, requires_grad=True)
    lc.penalty(kl=kl)["total"].backward()
    assert kl.grad.item() == 0.0  # inactive constraint: no pull


def test_one_constraint_at_a_time():
    lc = rl2fx.LagrangianConstraints(lagrangian_lr=1.0)
    terms = lc.update(kl=0.05)
    assert set(terms) == {"kl_penalty", "total"}
    assert lc.kl_multiplier == pytest.approx(0.04) and lc.entropy_multiplier == 0.0


def test_gradient_descent_ascent_solves_a_constrained_toy_problem():
    # max x  s.t. KL(x) = x^2 <= 0.25  ->  x* = 0.5, lambda* = 1 / (2 x*) = 1
    x = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.05)
    lc = rl2fx.LagrangianConstraints(kl_constraint=0.25, lagrangian_lr=0.5)
    for _ in range(3000):
        opt.zero_grad()
        kl = x**2
        loss = -x + lc.update(kl=kl)["total"]
        loss.backward()
        opt.step()
    assert x.item() == pytest.approx(0.5, abs=5e-3)
    assert lc.kl_multiplier == pytest.approx(1.0, abs=2e-2)


@given(st.lists(st.tuples(st.floats(0, 1e6), st.floats(-1e6, 1e6)), min_size=1, max_size=40),
       st.floats(1e-6, 10.0), st.booleans())
def test_multipliers_never_negative_and_finite(obs, lr, use_lagrangian):
    lc = rl2fx.LagrangianConstraints(lagrangian_lr=lr, use_lagrangian=use_lagrangian)
    for kl, h in obs:
        terms = lc.update(kl=kl, entropy=h)
        assert math.isfinite(terms["total"])
        assert lc.kl_multiplier >= 0 and lc.entropy_multiplier >= 0


@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 10)), min_size=2, max_size=20), st.data())
def test_state_dict_round_trip_resumes_identically(obs, data):
    cut = data.draw(st.integers(0, len(obs)))
    a = rl2fx.LagrangianConstraints(lagrangian_lr=0.3)
    b = rl2fx.LagrangianConstraints(lagrangian_lr=0.3)
    for kl, h in obs[:cut]:
        a.update(kl=kl, entropy=h)
        b.update(kl=kl, entropy=h)
    c = rl2fx.LagrangianConstraints()
    c.load_state_dict(b.state_dict())
    assert c.state == b.state
    for kl, h in obs[cut:]:
        assert c.update(kl=kl, entropy=h) == a.update(kl=kl, entropy=h)


@pytest.mark.parametrize("kwargs,name", [
    (dict(kl_constraint=0.0), "kl_constraint"), (dict(entropy_constraint=-1.0), "entropy_constraint"),
    (dict(lagrangian_lr=0.0), "lagrangian_lr"), (dict(use_lagrangian="yes"), "use_lagrangian"),
    (dict(initial_multiplier=-1.0), "initial_multiplier"), (dict(penalty_coef=float("nan")), "penalty_coef"),
])
def test_bad_settings_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        rl2fx.LagrangianConstraints(**kwargs)


def test_bad_measurements_raise():
    lc = rl2fx.LagrangianConstraints()
    with pytest.raises(ValueError, match="kl"):
        lc.update(kl=-0.1)
    with pytest.raises(ValueError, match="kl"):
        lc.update(kl=torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="entropy"):
        lc.update(entropy=float("inf"))
    with pytest.raises(ValueError, match="kl_multiplier"):
        lc.load_state_dict({**lc.state_dict(), "kl_multiplier": -1.0})


@pytest.mark.cuda
def test_cuda_tensors():
    lc = rl2fx.LagrangianConstraints(lagrangian_lr=1.0)
    kl = torch.tensor(0.03, device="cuda", requires_grad=True)
    lc.update(kl=kl, entropy=torch.tensor(0.0, device="cuda"))
    terms = lc.update(kl=kl, entropy=torch.tensor(0.0, device="cuda"))
    assert terms["total"].device.type == "cuda"
    terms["total"].backward()
    assert kl.grad.item() == pytest.approx(0.02)
