"""Pruners: median stopping, asynchronous successive halving, Hyperband; reports persisted."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from rl2fx import HyperparameterConfig
from rl2fx.tuning import (
    HyperbandPruner,
    MedianPruner,
    Study,
    SuccessiveHalvingPruner,
    TrialPruned,
    make_pruner,
)
from rl2fx.tuning.study import Trial

X = [HyperparameterConfig("x", "float", low=0.0, high=1.0)]


def _done(number, curve, state="complete"):
    """A finished trial with reported values ``curve[step]``."""
    return Trial(number=number, params={"x": 0.5}, state=state, value=curve[-1],
                 intermediate={str(s): float(v) for s, v in enumerate(curve)})


def _running(number, curve):
    return Trial(number=number, params={"x": 0.5}, intermediate={str(s): float(v) for s, v in enumerate(curve)})


# ----------------------------------------------------------------------------- median
def test_median_pruner_compares_best_so_far_with_the_median_at_the_same_step():
    finished = [_done(i, [i, i, i]) for i in range(5)]  # medians 2 at every step
    p = MedianPruner(n_startup_trials=5)
    assert p.prune(finished, _running(9, [1.0]), maximize=True)  # 1 < 2
    assert not p.prune(finished, _running(9, [3.0]), maximize=True)
    assert not p.prune(finished, _running(9, [2.0]), maximize=True)  # ties continue
    # best so far, not last: a trial that was good once is kept
    assert not p.prune(finished, _running(9, [3.0, 0.0]), maximize=True)
    # minimising flips the comparison
    assert p.prune(finished, _running(9, [3.0]), maximize=False)
    assert not p.prune(finished, _running(9, [1.0]), maximize=False)


def test_median_pruner_startup_warmup_interval_and_min_trials():
    finished = [_done(i, [i, i, i, i]) for i in range(5)]
    bad = [-1.0] * 4
    assert not MedianPruner(n_startup_trials=6).prune(finished, _running(9, bad[:1]), True)
    w = MedianPruner(n_startup_trials=0, n_warmup_steps=2)
    assert not w.prune(finished, _running(9, bad[:2]), True)  # step 1 < 2
    assert w.prune(finished, _running(9, bad[:3]), True)      # step 2
    iv = MedianPruner(n_startup_trials=0, n_warmup_steps=1, interval_steps=2)
    assert [iv.prune(finished, _running(9, bad[: s + 1]), True) for s in range(4)] == [False, True, False, True]
    # only one other trial reached step 5: below n_min_trials=2 nothing is pruned
    short = [*finished, _done(7, [5] * 6)]
    assert not MedianPruner(n_startup_trials=0, n_min_trials=2).prune(short, _running(9, [-1.0] * 6), True)
    assert MedianPruner(n_startup_trials=0, n_min_trials=1).prune(short, _running(9, [-1.0] * 6), True)


def test_nan_reports_are_the_worst_value():
    finished = [_done(i, [i, i]) for i in range(5)]
    assert MedianPruner(n_startup_trials=0).prune(finished, _running(9, [float("nan")]), True)


# ----------------------------------------------------------------------------- ASHA
def test_successive_halving_rungs_and_promotion():
    # min_resource=1, eta=2: rungs once the step reaches 1, 2, 4, 8 (Optuna's convention)
    p = SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    assert not p.prune([], _running(0, [9.0]), True)  # step 0: no rung reached
    # the first trial to reach a rung is the best there: it continues
    assert not p.prune([], _running(0, [0.0, 1.0]), True)
    others = [_done(i, [v] * 4) for i, v in enumerate([1.0, 2.0, 3.0])]
    # 4 at rung 0 -> top 2 continue: 2.5 is 2nd of [3, 2.5, 2, 1]
    assert not p.prune(others, _running(9, [0.0, 2.5]), True)
    assert p.prune(others, _running(9, [0.0, 1.5]), True)
    # rung 1 at step 2: a value of 0 there is last of [3, 2, 1, 0]
    assert p.prune(others, _running(9, [0.0, 2.5, 0.0]), True)
    assert not p.prune(others, _running(9, [0.0, 2.5, 2.5]), True)
    # a rung's value is the one reported when the trial reached it, not a later one
    assert p.prune(others, _running(9, [0.0, 2.5, 0.0, 9.0]), True)


def test_successive_halving_auto_min_resource_waits_for_a_complete_trial():
    p = SuccessiveHalvingPruner()  # min_resource="auto", eta=4
    assert not p.prune([], _running(0, [0.0] * 5), True)
    first = _done(0, list(range(300)))  # 300 steps -> min_resource 3
    others = [first, *[_done(i, [10.0] * 300) for i in range(1, 8)]]
    assert not p.prune(others, _running(9, [0.0, 0.0]), True)  # 2 steps: rung 0 not reached
    assert p.prune(others, _running(9, [0.0, 0.0, 0.0]), True)


def test_hyperband_brackets_are_deterministic_and_weighted():
    p = HyperbandPruner(min_resource=1, max_resource=27, reduction_factor=3)
    assert p.n_brackets(27) == 4
    b = [p.bracket(n, 27) for n in range(4000)]
    assert b == [p.bracket(n, 27) for n in range(4000)]
    counts = np.bincount(b, minlength=4) / 4000
    budgets = np.array([27, 12, 6, 4]) / 49  # ceil(B eta^(B-1-b) / (B-b)) for B=4
    np.testing.assert_allclose(counts, budgets, atol=0.03)


def test_hyperband_competes_within_its_bracket_only():
    p = HyperbandPruner(min_resource=1, max_resource=9, reduction_factor=3)
    nums = {b: [n for n in range(200) if p.bracket(n, 9) == b] for b in range(p.n_brackets(9))}
    me = nums[0][-1]
    strong_same = [_done(n, [10.0] * 9) for n in nums[0][:6]]
    strong_other = [_done(n, [10.0] * 9) for n in nums[1][:6]]
    assert p.prune(strong_same, _running(me, [0.0, 0.0]), True)
    assert not p.prune(strong_other, _running(me, [0.0, 0.0]), True)


def test_median_and_successive_halving_decide_as_optuna_does():
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rng = np.random.default_rng(0)
    decisions = 0
    for _ in range(60):
        maximize = bool(rng.integers(2))
        curves = [rng.normal(size=int(rng.integers(1, 12))).cumsum().tolist() for _ in range(int(rng.integers(0, 7)))]
        current = rng.normal(size=int(rng.integers(1, 12))).cumsum().tolist()
        for kind in ("median", "sha"):
            if kind == "median":
                kw = dict(n_startup_trials=int(rng.integers(0, 4)), n_warmup_steps=int(rng.integers(0, 3)),
                          interval_steps=int(rng.integers(1, 3)))
                theirs, mine = optuna.pruners.MedianPruner(**kw), MedianPruner(**kw)
            else:
                kw = dict(min_resource=int(rng.integers(1, 3)), reduction_factor=int(rng.integers(2, 4)),
                          min_early_stopping_rate=int(rng.integers(0, 2)))
                theirs, mine = optuna.pruners.SuccessiveHalvingPruner(**kw), SuccessiveHalvingPruner(**kw)
            study = optuna.create_study(direction="maximize" if maximize else "minimize", pruner=theirs)
            finished = []
            for i, c in enumerate(curves):
                t = study.ask()
                for s, v in enumerate(c):
                    t.report(v, s)
                    t.should_prune()  # Optuna records rung values when asked
                study.tell(t, c[-1])
                finished.append(_done(i, c))
            t = study.ask()
            for s, v in enumerate(current):
                t.report(v, s)
                expected = t.should_prune()
                assert mine.prune(finished, _running(len(curves), current[: s + 1]), maximize) == expected
                decisions += 1
                if expected:
                    break
    assert decisions > 300


def test_bad_pruner_arguments():
    with pytest.raises(ValueError, match="n_startup_trials must be an integer >= 0, got 1.5"):
        MedianPruner(n_startup_trials=1.5)
    with pytest.raises(ValueError, match="reduction_factor must be in"):
        SuccessiveHalvingPruner(reduction_factor=1)
    with pytest.raises(ValueError, match="max_resource must be >= min_resource=5, got 2"):
        HyperbandPruner(min_resource=5, max_resource=2)
    with pytest.raises(ValueError, match=r"pruner must be one of \['none', 'median', 'successive_halving', 'hyperband'\], got 'asha'"):
        make_pruner("asha")


# ----------------------------------------------------------------------------- through a Study
def _curve(x, step):
    return (1 - (x - 0.3) ** 2) * (1 - 0.5 ** (step + 1))


def _pruned_study(storage, n, pruner):
    study = Study(X, "random", maximize=True, seed=0, storage=storage, pruner=pruner)
    for _ in range(n):
        t = study.ask()
        try:
            for step in range(8):
                t.report(_curve(t.params["x"], step), step)
                if t.should_prune():
                    raise TrialPruned()
            study.tell(t, _curve(t.params["x"], 7))
        except TrialPruned as e:
            study.tell(t, e)
    return study


def test_study_prunes_records_reports_and_resumes_consistently(tmp_path):
    full = _pruned_study(tmp_path / "a", 12, MedianPruner(n_startup_trials=3))
    states = [t.state for t in full.trials]
    assert "pruned" in states and states[:3] == ["complete"] * 3
    for t in full.trials:
        if t.state == "pruned":  # its value is its last report, and it is not the best
            last = max(int(k) for k in t.intermediate)
            assert t.value == t.intermediate[str(last)] and last < 7
    assert full.best_trial.state == "complete"
    lines = [json.loads(x) for x in (tmp_path / "a" / "trials.jsonl").read_text().splitlines()]
    assert all(line["intermediate"] for line in lines)
    # stop after 6 trials, reopen, continue: the same decisions as the uninterrupted run
    _pruned_study(tmp_path / "b", 6, MedianPruner(n_startup_trials=3))
    resumed = _pruned_study(tmp_path / "b", 6, MedianPruner(n_startup_trials=3))
    assert [t.state for t in resumed.trials] == states
    assert [t.intermediate for t in resumed.trials] == [t.intermediate for t in full.trials]


def test_pruned_trials_are_not_shown_to_the_model():
    from rl2fx.tuning.samplers import _successful

    s = _pruned_study(None, 10, MedianPruner(n_startup_trials=2))
    xs, ys = _successful(s.trials, True)
    assert len(xs) == sum(t.state == "complete" for t in s.trials) < 10


def test_report_and_should_prune_errors():
    study = Study(X, "random", seed=0, pruner="median")
    t = study.ask()
    with pytest.raises(ValueError, match="should_prune\\(\\) on trial 0 needs at least one trial.report"):
        t.should_prune()
    with pytest.raises(ValueError, match="step must be a non-negative integer, got -1"):
        t.report(1.0, -1)
    with pytest.raises(ValueError, match="report value must be a number, got str"):
        t.report("high", 0)
    t.report(1.0, 0)
    t.report(5.0, 0)  # a repeated step keeps its first value
    assert study.pending[0].intermediate == {"0": 1.0}
    study.tell(t, 1.0)
    with pytest.raises(ValueError, match="trial 0 is already finished; report only while a trial runs"):
        t.report(1.0, 1)
    unbound = Trial(number=3, params={"x": 0.1})
    with pytest.raises(ValueError, match="not bound to a study"):
        unbound.report(1.0, 0)


def test_a_pruner_on_a_study_that_never_reports_warns_once():
    study = Study(X, "random", seed=0, pruner=MedianPruner())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            t = study.ask()
            study.tell(t, 1.0)
    msgs = [str(x.message) for x in w if "without any trial.report" in str(x.message)]
    assert len(msgs) == 1 and "pruner='median'" in msgs[0]
    assert [t.state for t in study.trials] == ["complete"] * 3


def test_pruned_without_reports_has_no_value():
    study = Study(X, "random", seed=0)
    t = study.ask()
    done = study.tell(t, TrialPruned())
    assert done.state == "pruned" and done.value is None


def test_tuner_passes_the_trial_to_a_two_argument_objective():
    from rl2fx import HyperparameterTuner

    def train(params, trial):
        for step in range(6):
            trial.report(_curve(params["x"], step), step)
            if trial.should_prune():
                raise TrialPruned()
        return {"reward": _curve(params["x"], 5)}

    tuner = HyperparameterTuner("random", X, n_trials=12, seed=0, save_dir=None, show_progress_bar=False,
                                pruner=MedianPruner(n_startup_trials=3))
    best = tuner.optimize(train)
    s = tuner.results_summary()
    assert s["n_pruned"] > 0 and s["n_complete"] + s["n_pruned"] == 12 and s["n_failed"] == 0
    assert abs(best["x"] - 0.3) < 0.3
    # a one-argument objective is called as before
    plain = HyperparameterTuner("random", X, n_trials=3, seed=0, save_dir=None, show_progress_bar=False)
    plain.optimize(lambda p: p["x"])
    assert len(plain.study.trials) == 3
