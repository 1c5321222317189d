"""KL controllers: each rule against an independent reference loop, bounds, purity, resume, errors."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rl2fx
from rl2fx import control as C
from rl2fx.control.kl import DEFAULTS
from rl2fx.testing.control_plant import TRLAdaptiveKLController
from rl2fx.testing.control_strategies import kl_controller_configs, kl_values

WIDE = dict(min_coef=1e-9, max_coef=1e9)  # bounds far away, so the raw rule is visible


# ---------------------------------------------------------------------------------------------
# independent references


def exponential_reference(kls, coef=0.2, target=0.01, up=1.03, down=0.99, lo=0.001, hi=10.0):
    out = []
    for kl in kls:
        if kl > target:
            coef *= up
        elif kl < target:
            coef *= down
        coef = min(max(coef, lo), hi)
        out.append(coef)
    return out


class TextbookPID:
    """Positional PID on log(coef) with the error e = kl/target - 1, no saturation handling."""

    def __init__(self, kp, ki, kd, coef0, target):
        self.kp, self.ki, self.kd, self.coef0, self.target = kp, ki, kd, coef0, target
        self.i = 0.0
        self.prev = None

    def log_update(self, kl):
        e = kl / self.target - 1
        self.i += e
        d = 0.0 if self.prev is None else e - self.prev
        self.prev = e
        return math.log(self.coef0) + self.kp * e + self.ki * self.i + self.kd * d

    def update(self, kl):
        return math.exp(self.log_update(kl))


def run(state, kls, steps=None):
    coefs = []
    for i, kl in enumerate(kls):
        state = C.kl_update(state, kl, i if steps is None else steps[i])
        coefs.append(state.coef)
    return state, coefs


KLS = [0.0, 0.005, 0.01, 0.02, 0.05, 0.3, 0.012, 0.009, 0.0101, 0.1, 0.0]


# ---------------------------------------------------------------------------------------------
# defaults and the spec snippet


def test_spec_snippet_and_defaults():
    controller = rl2fx.AdaptiveKLController(initial_coef=0.2, target_kl=0.01, controller_type="exponential")
    kl_coef = controller.update(0.02, 1)
    assert isinstance(kl_coef, float) and kl_coef == pytest.approx(0.2 * 1.03)
    s = C.kl_init("exponential")
    assert (s.initial_coef, s.target_kl, s.min_coef, s.max_coef) == (0.2, 0.01, 0.001, 10.0)
    p = s.param
    assert (p["exp_factor"], p["exp_decay"], p["linear_factor"]) == (1.03, 0.99, 0.5)
    assert (p["kp"], p["ki"], p["kd"], p["schedule_steps"]) == (0.1, 0.01, 0.001, 1000)
    assert p["schedule_type"] == "cosine"
    assert C.AdaptiveKLController is rl2fx.AdaptiveKLController
    assert set(C.CONTROLLER_TYPES) == {"fixed", "exponential", "linear", "pid", "schedule", "proportional"}


def test_config_block_keys_are_accepted():
    # the spec's actor.kl.adaptive_kl block, minus the `enabled` switch
    block = dict(controller_type="pid", target_kl=0.01, initial_coef=0.2, exp_factor=1.03, exp_decay=0.99,
                 min_coef=0.001, max_coef=10.0)
    c = rl2fx.AdaptiveKLController(**block)
    assert c.controller_type == "pid" and c.coef == 0.2


# ---------------------------------------------------------------------------------------------
# each rule against its reference


def test_fixed_never_moves():
    _, coefs = run(C.kl_init("fixed", initial_coef=0.3), KLS)
    assert coefs == [0.3] * len(KLS)


def test_exponential_matches_reference():
    _, coefs = run(C.kl_init("exponential"), KLS * 50)
    np.testing.assert_allclose(coefs, exponential_reference(KLS * 50), rtol=1e-12)


def test_exponential_saturates_at_bounds():
    _, coefs = run(C.kl_init("exponential"), [1.0] * 400)
    assert coefs[-1] == 10.0
    _, coefs = run(C.kl_init("exponential"), [0.0] * 2000)
    assert coefs[-1] == 0.001


def test_linear_matches_formula():
    coef = 0.2
    ref = []
    for kl in KLS:
        coef = min(max(coef * (1 + 0.5 * (kl / 0.01 - 1)), 0.001), 10.0)
        ref.append(coef)
    _, coefs = run(C.kl_init("linear"), KLS)
    np.testing.assert_allclose(coefs, ref, rtol=1e-12)


@pytest.mark.parametrize("n_steps,horizon", [(256, 10000), (1, 10000), (1000, 10000), (64, 500)])
def test_proportional_matches_trl(n_steps, horizon):
    rng = np.random.default_rng(0)
    kls = rng.lognormal(np.log(0.01), 1.0, size=300)
    trl = TRLAdaptiveKLController(0.2, 0.01, horizon)
    ref = []
    for kl in kls:
        trl.update(kl, n_steps)
        ref.append(trl.value)
    _, coefs = run(C.kl_init("proportional", n_steps=n_steps, horizon=horizon, **WIDE), kls)
    np.testing.assert_allclose(coefs, ref, rtol=1e-10)


def test_proportional_uses_elapsed_steps_without_n_steps():
    # steps given as a sample counter (TRL's n_steps = batch size) reproduce TRL with that batch size
    kls = [0.03, 0.001, 0.02, 0.5]
    trl = TRLAdaptiveKLController(0.2, 0.01, 10000)
    for kl in kls:
        trl.update(kl, 256)
    _, coefs = run(C.kl_init("proportional", **WIDE), kls, steps=[256, 512, 768, 1024])
    assert coefs[-1] == pytest.approx(trl.value, rel=1e-12)


def test_pid_matches_textbook_when_unsaturated():
    rng = np.random.default_rng(1)
    kls = 0.01 * rng.lognormal(0.0, 0.3, size=200)
    ref = TextbookPID(0.1, 0.01, 0.001, 0.2, 0.01)
    expected = [ref.update(kl) for kl in kls]
    _, coefs = run(C.kl_init("pid", **WIDE), kls)
    np.testing.assert_allclose(coefs, expected, rtol=1e-10)


def test_pid_anti_windup_recovers_at_once():
    s, coefs = run(C.kl_init("pid", ki=0.05), [1.0] * 300)  # KL 100x target: saturated high for a long time
    assert coefs[-1] == 10.0
    s2, after = run(s, [0.0] * 5, steps=list(range(300, 305)))
    assert after[0] < 10.0  # leaves saturation on the first step the error changes sign
    # the same loop without anti-windup (the textbook PID) stays pinned at max_coef
    ref = TextbookPID(0.1, 0.05, 0.001, 0.2, 0.01)
    for _ in range(300):
        ref.log_update(1.0)
    assert all(ref.log_update(0.0) > math.log(10.0) for _ in range(5))


def test_pid_integral_limit_bounds_integral():
    s, _ = run(C.kl_init("pid", integral_limit=5.0, **WIDE), [1.0] * 50)
    assert abs(s.integral) <= 5.0


@pytest.mark.parametrize("schedule_type", ["cosine", "linear", "exponential", "warmup_cosine"])
def test_schedule_depends_on_step_only(schedule_type):
    s0 = C.kl_init("schedule", schedule_type=schedule_type, schedule_steps=100)
    _, a = run(s0, [0.0] * 150)
    _, b = run(s0, [5.0] * 150)
    assert a == b
    assert a[-1] == pytest.approx(0.001)
    fn = C.SCHEDULES[schedule_type]
    kw = {"warmup_steps": 10} if schedule_type == "warmup_cosine" else {}
    assert a[40] == pytest.approx(fn(40, start=0.2, end=0.001, steps=100, **kw))
    if schedule_type != "warmup_cosine":
        assert s0.coef == 0.2 and all(x >= y for x, y in zip(a, a[1:], strict=False))


# ---------------------------------------------------------------------------------------------
# the wrapper


def test_wrapper_history_tensor_input_and_resume():
    c = rl2fx.AdaptiveKLController(controller_type="pid")
    for t, kl in enumerate(KLS[:5]):
        c.update(torch.tensor(kl, dtype=torch.float64), t)
    assert c.history["step"] == [0, 1, 2, 3, 4]
    assert c.history["kl"] == pytest.approx(KLS[:5])
    assert c.history["coef"][-1] == c.coef
    sd = json.loads(json.dumps(c.state_dict()))  # survives a JSON checkpoint
    r = rl2fx.AdaptiveKLController(controller_type="exponential")
    r.load_state_dict(sd)
    assert r.state == c.state and r.history == c.history
    for t, kl in enumerate(KLS[5:], start=5):
        assert r.update(kl, t) == c.update(kl, t)
    assert "pid" in repr(r)


def test_load_state_dict_rejects_bad_checkpoints():
    c = rl2fx.AdaptiveKLController()
    sd = c.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"]["coef"] = 100.0
    with pytest.raises(ValueError, match="coef"):
        c.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    del bad["state"]["integral"]
    with pytest.raises(ValueError, match="integral"):
        c.load_state_dict(bad)
    with pytest.raises(ValueError, match="state"):
        c.load_state_dict({})


# ---------------------------------------------------------------------------------------------
# errors name the parameter


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(controller_type="nope"), "controller_type"),
        (dict(min_coef=1.0, max_coef=0.5), "min_coef"),
        (dict(min_coef=-1.0), "min_coef"),
        (dict(max_coef=float("inf")), "max_coef"),
        (dict(target_kl=0.0), "target_kl"),
        (dict(target_kl=float("nan")), "target_kl"),
        (dict(initial_coef=20.0), "initial_coef"),
        (dict(exp_factor=0.9), "exp_factor"),
        (dict(exp_decay=1.5), "exp_decay"),
        (dict(linear_factor=0.0), "linear_factor"),
        (dict(kp=-0.1), "kp"),
        (dict(schedule_type="step"), "schedule_type"),
        (dict(schedule_steps=0), "schedule_steps"),
        (dict(schedule_steps=10, warmup_steps=10), "warmup_steps"),
        (dict(horizon=0), "horizon"),
        (dict(n_steps=0), "n_steps"),
        (dict(kpp=0.1), "kpp"),
        (dict(controller_type="pid", min_coef=0.0), "min_coef"),
    ],
)
def test_bad_parameters_raise_naming_them(kwargs, name):
    kwargs = dict(kwargs)
    ct = kwargs.pop("controller_type", "exponential")
    with pytest.raises(ValueError, match=name):
        C.kl_init(ct, **kwargs)
    with pytest.raises(ValueError, match=name):
        rl2fx.AdaptiveKLController(controller_type=ct, **kwargs)


@pytest.mark.parametrize("kl", [-0.1, float("nan"), float("inf"), torch.ones(2), "0.1", None, True])
def test_bad_kl_raises(kl):
    with pytest.raises(ValueError, match="kl"):
        C.kl_update(C.kl_init("exponential"), kl, 0)


@pytest.mark.parametrize("step", [-1, 1.5, None])
def test_bad_step_raises(step):
    with pytest.raises(ValueError, match="step"):
        C.kl_update(C.kl_init("exponential"), 0.01, step)


def test_zero_min_coef_allowed_for_open_loop():
    s = C.kl_init("schedule", min_coef=0.0, schedule_type="cosine", schedule_steps=10)
    _, coefs = run(s, [0.0] * 12)
    assert coefs[-1] == 0.0


# ---------------------------------------------------------------------------------------------
# properties


@given(kl_controller_configs(), st.lists(kl_values(), min_size=1, max_size=40))
def test_bounds_finite_purity_determinism(cfg, kls):
    ct, params = cfg
    s0 = C.kl_init(ct, **params)
    snapshot = copy.deepcopy(s0)
    end1, coefs1 = run(s0, kls)
    end2, coefs2 = run(s0, kls)
    assert s0 == snapshot  # inputs never mutated
    assert coefs1 == coefs2 and end1 == end2
    for c in coefs1:
        assert math.isfinite(c) and s0.min_coef <= c <= s0.max_coef


@given(kl_controller_configs(), st.lists(kl_values(10.0), min_size=2, max_size=30), st.data())
def test_resume_continues_identically(cfg, kls, data):
    ct, params = cfg
    cut = data.draw(st.integers(min_value=0, max_value=len(kls)))
    full_state, full = run(C.kl_init(ct, **params), kls)
    mid, head = run(C.kl_init(ct, **params), kls[:cut])
    restored = C.kl_state_from_dict(json.loads(json.dumps(C.kl_state_to_dict(mid))))
    assert restored == mid
    end, tail = run(restored, kls[cut:], steps=list(range(cut, len(kls))))
    assert head + tail == full and end == full_state


@given(kl_controller_configs(("exponential", "linear", "proportional")), kl_values(10.0), kl_values(10.0))
def test_more_kl_never_lowers_the_coefficient(cfg, a, b):
    ct, params = cfg
    s = C.kl_init(ct, **params)
    lo, hi = sorted((a, b))
    assert C.kl_update(s, lo, 1).coef <= C.kl_update(s, hi, 1).coef


def test_defaults_table_is_what_kl_init_uses():
    s = C.kl_init("pid")
    for k, v in s.param.items():
        assert DEFAULTS[k] == v


@pytest.mark.cuda
def test_cuda_scalar_kl():
    c = rl2fx.AdaptiveKLController(controller_type="pid")
    ref = rl2fx.AdaptiveKLController(controller_type="pid")
    assert c.update(torch.tensor(0.02, device="cuda"), 0) == ref.update(0.02, 0)
