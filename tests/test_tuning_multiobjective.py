"""Multi-objective studies: tell a vector, get the Pareto set, its hypervolume and a plot."""

from __future__ import annotations

import numpy as np
import pytest

from rl2fx import HyperparameterConfig
from rl2fx import pareto as P
from rl2fx.tuning import Study, plot_pareto_front

BOX = [HyperparameterConfig("x0", "float", low=0.0, high=1.0), HyperparameterConfig("x1", "float", low=0.0, high=1.0)]


def reward_kl(p):
    """Reward up, KL down, in conflict: the front is x1 = 0, x0 in [0, 1]."""
    return [p["x0"] - 0.3 * p["x1"], p["x0"] ** 2 + p["x1"]]


def _run(study, n, f=reward_kl):
    for _ in range(n):
        t = study.ask()
        study.tell(t, f(t.params))
    return study


def test_pareto_set_matches_rl2fx_pareto_and_the_hypervolume():
    study = _run(Study(BOX, "random", maximize=[True, False], seed=0), 30)
    pts = np.array([[t.values[0], -t.values[1]] for t in study.complete_trials])
    mask = P.pareto_front_mask(pts)
    assert [t.number for t in study.best_trials] == [t.number for t, m in zip(study.complete_trials, mask, strict=True) if m]
    ref = [-1.0, 3.0]  # reward above -1, KL below 3
    assert study.hypervolume(ref) == pytest.approx(P.hypervolume(pts, np.array([-1.0, -3.0])))
    # default reference: the nadir pushed out by 10 % of the range
    assert study.hypervolume() == pytest.approx(P.hypervolume(pts, np.asarray(P.nadir_reference_point(pts))))
    with pytest.raises(ValueError, match="ref_point must have 2 entries"):
        study.hypervolume([0.0])
    with pytest.raises(ValueError, match="no single best trial; use best_trials"):
        _ = study.best_trial


def test_bayesian_qlognehvi_beats_random_on_hypervolume():
    fast = dict(n_initial=5, num_restarts=2, raw_samples=64, mc_samples=32)
    bo = _run(Study(BOX, "bayesian", maximize=[True, False], seed=0, **fast), 12)
    rnd = _run(Study(BOX, "random", maximize=[True, False], seed=0), 12)
    assert [t.info["design"] for t in bo.trials][-1] == "gp"
    ref = [-0.5, 2.5]
    assert bo.hypervolume(ref) > rnd.hypervolume(ref)
    # parallel asks with pending points differ
    asked = [bo.ask() for _ in range(3)]
    assert len({repr(t.params) for t in asked}) == 3


def test_wrong_length_nan_and_bad_directions():
    study = Study(BOX, "random", maximize=[True, False], seed=0)
    t = study.ask()
    with pytest.raises(ValueError, match=r"tell value must have 2 entries \(one per objective\), got 3: \[1.0, 2.0, 3.0\]"):
        study.tell(t, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="tell value must be a sequence of 2 numbers"):
        study.tell(t, 1.0)
    done = study.tell(t, [float("nan"), 1.0])  # the trial is still running after the errors
    assert done.state == "failed" and "not all finite" in done.error
    assert study.best_trials == []
    with pytest.raises(ValueError, match=r"maximize must be True, False, or a list of at least two bools"):
        Study(BOX, "random", maximize=[True])
    with pytest.raises(ValueError, match="sampler 'skopt' optimises one objective"):
        Study(BOX, "skopt", maximize=[True, False])
    with pytest.raises(ValueError, match="pruning needs a single objective"):
        Study(BOX, "random", maximize=[True, False], pruner="median")


def test_resume_and_plot(tmp_path):
    a = _run(Study(BOX, "random", maximize=[True, False], seed=3, storage=tmp_path / "s"), 10)
    b = Study(BOX, "random", maximize=[True, False], storage=tmp_path / "s")
    assert [t.values for t in b.trials] == [t.values for t in a.trials]
    with pytest.raises(ValueError, match="holds a different study: maximize"):
        Study(BOX, "random", maximize=[True, True], storage=tmp_path / "s")
    out = plot_pareto_front(b, tmp_path / "plots" / "front.png", objective_names=["reward", "kl"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="needs a multi-objective study"):
        plot_pareto_front(Study(BOX, "random"), tmp_path / "x.png")
