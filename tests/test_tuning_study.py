"""Study persistence: atomic JSON lines, resume (also after a real SIGKILL), failures."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rl2fx import HyperparameterConfig, Study
from rl2fx.tuning.samplers import GridSampler

SPACE = [
    HyperparameterConfig("x", "float", low=-2.0, high=2.0),
    HyperparameterConfig("n", "int", low=1, high=5),
    HyperparameterConfig("c", "categorical", choices=["a", "b", "c"]),
]


def f(p):
    return (p["x"] - 0.3) ** 2 + p["n"] + {"a": 0, "b": 1, "c": 2}[p["c"]]


def _run(study, n):
    for _ in range(n):
        t = study.ask()
        study.tell(t, f(t.params))
    return study


def test_resume_continues_exactly_like_an_uninterrupted_study(tmp_path):
    full = _run(Study(SPACE, "random", maximize=False, storage=tmp_path / "full"), 10)
    # a seed was drawn and stored; reuse it for the interrupted run's reference
    seed = json.loads((tmp_path / "full" / "study.json").read_text())["sampler"]["settings"]["seed"]
    assert isinstance(seed, int)
    part = _run(Study(SPACE, "random", maximize=False, storage=tmp_path / "part", seed=seed), 4)
    del part
    lines = (tmp_path / "part" / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(ln)["state"] == "complete" for ln in lines)
    resumed = Study(SPACE, "random", maximize=False, storage=tmp_path / "part")  # seed None: use the stored one
    assert resumed.sampler.seed == seed and len(resumed.trials) == 4
    _run(resumed, 6)
    assert [t.params for t in resumed.trials] == [t.params for t in full.trials]
    assert [t.number for t in resumed.trials] == list(range(10))


def test_lost_running_trials_are_asked_again_on_resume(tmp_path):
    cs = [HyperparameterConfig("n", "int", low=1, high=4)]
    s = Study(cs, GridSampler(grid_size=4), storage=tmp_path)
    t0, _t1, t2 = s.ask(), s.ask(), s.ask()
    s.tell(t0, 1.0)
    s.tell(t2, 3.0)  # t1 is still running when the process "dies"
    r = Study(cs, GridSampler(grid_size=4), storage=tmp_path)
    assert [t.params["n"] for t in r.trials] == [1, 3]
    assert r.ask().params["n"] == 2  # the lost grid point comes back first
    assert r.ask().params["n"] == 4


def test_incompatible_resume_raises(tmp_path):
    _run(Study(SPACE, "random", storage=tmp_path, seed=1), 2)
    with pytest.raises(ValueError, match="holds a different study: maximize=True, got maximize=False"):
        Study(SPACE, "random", maximize=False, storage=tmp_path)
    with pytest.raises(ValueError, match="sampler 'random', got 'grid'"):
        Study(SPACE, "grid", storage=tmp_path)
    with pytest.raises(ValueError, match="param_configs"):
        Study(SPACE[:2], "random", storage=tmp_path)
    with pytest.raises(ValueError, match="sampler settings"):
        Study(SPACE, "random", storage=tmp_path, seed=2)


def test_failed_trials_are_recorded_and_the_study_goes_on(tmp_path):
    s = Study(SPACE, "random", maximize=False, storage=tmp_path, seed=0)
    t = s.ask()
    s.tell(t, ValueError("loss became NaN at step 3"))
    t = s.ask()
    s.tell(t, float("nan"))
    with pytest.raises(ValueError, match=r"no complete trial yet \(2 finished, all failed\); first error: ValueError: loss became NaN"):
        _ = s.best_trial
    _run(s, 3)
    states = [t.state for t in s.trials]
    assert states == ["failed", "failed", "complete", "complete", "complete"]
    assert s.trials[1].error == "objective value is not finite: nan"
    assert s.best_trial.number >= 2
    r = Study(SPACE, "random", maximize=False, storage=tmp_path)
    assert [t.state for t in r.trials] == states and math.isnan(r.trials[1].value)
    df = r.trials_dataframe()
    assert list(df.columns[:6]) == ["number", "state", "value", "params.x", "params.n", "params.c"]
    assert (df["state"] == "failed").sum() == 2


def test_tell_errors():
    s = Study(SPACE, "random", seed=0)
    t = s.ask()
    with pytest.raises(ValueError, match="tell value must be a number or an exception, got str"):
        s.tell(t, "good")
    s.tell(t, 1.0)
    with pytest.raises(ValueError, match="trial 0 is already finished"):
        s.tell(t, 1.0)


def test_add_trial_and_state_dict_roundtrip(tmp_path):
    s = Study(SPACE, "random", seed=0)
    s.add_trial({"x": 0.3, "n": 1, "c": "a"}, 1.0)
    _run(s, 3)
    with pytest.raises(ValueError, match="parameter 'n' must be in"):
        s.add_trial({"x": 0.3, "n": 9, "c": "a"}, 1.0)
    s2 = Study(SPACE, "random", seed=0, storage=tmp_path)
    s2.load_state_dict(s.state_dict())
    assert [t.params for t in s2.trials] == [t.params for t in s.trials]
    assert len((tmp_path / "trials.jsonl").read_text().splitlines()) == 4


CHILD = textwrap.dedent(
    """
    import sys, time
    from rl2fx import HyperparameterConfig, HyperparameterTuner
    cfgs = [HyperparameterConfig("x", "float", low=-2.0, high=2.0), HyperparameterConfig("n", "int", low=1, high=5)]
    def fn(p):
        time.sleep(0.05)
        return {"reward": -(p["x"] - 0.3) ** 2 - p["n"]}
    HyperparameterTuner("random", cfgs, n_trials=100000, save_dir=sys.argv[1], seed=5, n_jobs=2,
                        show_progress_bar=False).optimize(fn)
    """
)


def test_resume_after_sigkill(tmp_path):
    save = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(save)], env=env)
    trials = save / "trials.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if trials.exists() and len(trials.read_text().splitlines()) >= 8:
                break
            assert proc.poll() is None, "the child study exited early"
            time.sleep(0.05)
        else:
            pytest.fail("the child study wrote no trials in time")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    lines = trials.read_text().splitlines()
    assert len(lines) >= 8
    parsed = [json.loads(ln) for ln in lines]  # never torn: written by atomic replace
    numbers = [p["number"] for p in parsed]
    assert len(set(numbers)) == len(numbers)
    (save / ".trials.jsonl.abc.tmp").write_text('{"number": 99, "par')  # as if killed mid-write

    from rl2fx import HyperparameterTuner

    cfgs = [HyperparameterConfig("x", "float", low=-2.0, high=2.0), HyperparameterConfig("n", "int", low=1, high=5)]
    tuner = HyperparameterTuner("random", cfgs, n_trials=len(lines) + 5, save_dir=save, seed=5, show_progress_bar=False)
    assert len(tuner.study.trials) == len(lines)
    best = tuner.optimize(lambda p: -(p["x"] - 0.3) ** 2 - p["n"])
    after = tuner.study.trials
    assert len(after) == len(lines) + 5
    assert [t.params for t in after[: len(lines)]] == [p["params"] for p in parsed]
    assert len({t.number for t in after}) == len(after)
    assert not list(save.glob("*.tmp")) and not list(save.glob(".*.tmp"))
    assert best == tuner.best_params and best["n"] == min(t.params["n"] for t in after)
