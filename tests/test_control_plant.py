"""Closed loop: every feedback KL controller brings the simulated KL within 25% of target and keeps it there."""

from __future__ import annotations

import numpy as np
import pytest

from rl2fx.testing.control_plant import KLPlant, settling_step, simulate, tracking_metrics

TARGET = 0.01
# the proportional rule with Ziegler et al.'s K_beta = n_steps / horizon = 0.1
FEEDBACK = {"exponential": {}, "linear": {}, "pid": {}, "proportional": {"n_steps": 1000}}


@pytest.mark.parametrize("controller_type", list(FEEDBACK))
@pytest.mark.parametrize("disturbance", [None, 400])
def test_feedback_controllers_settle_near_target(controller_type, disturbance, record_property):
    plant = KLPlant(disturbance_step=disturbance)
    start = disturbance or 0
    settle = []
    for seed in range(3):
        run = simulate(controller_type, plant=plant, steps=800, seed=seed, target_kl=TARGET,
                       **FEEDBACK[controller_type])
        m = tracking_metrics(run, TARGET, start=start)
        assert m["settling_steps"] is not None, f"{controller_type} did not settle (seed {seed})"
        assert abs(m["mean_kl_ratio"] - 1) < 0.25, m
        assert m["mean_rel_error"] < 0.25, m
        settle.append(m["settling_steps"])
    record_property("settling_steps", settle)
    print(f"{controller_type} (disturbance at {disturbance}): settling steps {settle}")


def test_open_loop_controllers_do_not_track():
    # a fixed coefficient 3x too small keeps KL at 3x target: the metric can tell controllers apart
    m = tracking_metrics(simulate("fixed", steps=400, seed=0), TARGET)
    assert m["settling_steps"] is None and m["mean_kl_ratio"] == pytest.approx(3.0, rel=0.01)


def test_plant_equilibrium_and_ideal_coefficient():
    p = KLPlant(disturbance_step=10, disturbance_gain=2.0)
    assert p.equilibrium_kl(p.coef_for(TARGET, 0), 0) == pytest.approx(TARGET)
    assert p.coef_for(TARGET, 20) == pytest.approx(2 * p.coef_for(TARGET, 0))
    # a controller that already sits at the ideal coefficient tracks from the start (after the lag)
    run = simulate("fixed", plant=KLPlant(noise=0.0), steps=100, initial_coef=0.6)
    assert run["kl"][-1] == pytest.approx(TARGET, rel=1e-6)


def test_settling_step_definition():
    x = np.r_[np.full(10, 0.05), np.full(50, 0.01), np.full(5, 0.05), np.full(100, 0.0101)]
    s = settling_step(x, TARGET, window=5)
    assert s is not None and 65 <= s <= 70
    assert settling_step(np.full(50, 0.05), TARGET) is None
