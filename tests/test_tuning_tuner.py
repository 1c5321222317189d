"""HyperparameterTuner: the spec's snippets, objectives, parallel executors (threads, Dask)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import re
import warnings

import pytest

import rl2fx
from rl2fx import HyperparameterConfig, HyperparameterTuner, create_ppo_hyperparameter_configs

SPEC_SNIPPET_1 = '''
from rl2fx import HyperparameterTuner, create_ppo_hyperparameter_configs

# Create parameter configurations
param_configs = create_ppo_hyperparameter_configs()

# Create tuner
tuner = HyperparameterTuner(
    optimizer_type="bayesian",
    param_configs=param_configs,
    objective_name="reward",
    maximize=True,
    n_trials=100
)

# Define training function
def train_function(params):
    # Update config with params
    updated_config = update_config_with_params(config, params)

    # Train model
    trainer = PPOTrainer(updated_config)
    results = trainer.train()

    return results

# Run optimization
best_params = tuner.optimize(train_function)
'''

SPEC_SNIPPET_2 = '''
from rl2fx import HyperparameterTuner, create_ppo_hyperparameter_configs, HyperparameterConfig

# Create parameter configurations
param_configs = create_ppo_hyperparameter_configs()

# Add custom parameters
param_configs.append(
    HyperparameterConfig(
        name="custom_param",
        type="float",
        low=0.1,
        high=1.0,
        default=0.5
    )
)

# Create tuner
tuner = HyperparameterTuner(
    optimizer_type="bayesian",
    param_configs=param_configs,
    n_trials=50
)

# Run optimization
best_params = tuner.optimize(training_function)
'''


def _user_namespace():
    """What the user's script around the snippet provides: a config and a (toy) trainer."""
    from omegaconf import OmegaConf

    config = OmegaConf.create({"actor": {"lr": 1e-6, "clip": 0.2}, "adv": {"gamma": 1.0, "lamda": 0.95}})

    def update_config_with_params(cfg, params):
        cfg = cfg.copy()
        for k, v in params.items():
            OmegaConf.update(cfg, k, v, force_add=True)
        return cfg

    class PPOTrainer:  # a stand-in with a known optimum: lr 1e-5, clip 0.2, lamda 0.95
        def __init__(self, cfg):
            self.cfg = cfg

        def train(self):
            c = self.cfg
            r = -(math.log10(c.actor.lr) + 5) ** 2 - 10 * (c.actor.clip - 0.2) ** 2 - 10 * (c.adv.lamda - 0.95) ** 2
            return {"reward": r, "kl": 0.01, "entropy": 1.0}

    def training_function(params):
        return PPOTrainer(update_config_with_params(config, params)).train()

    return {"config": config, "update_config_with_params": update_config_with_params,
            "PPOTrainer": PPOTrainer, "training_function": training_function}


def _exec(snippet, n_trials=None):
    if n_trials is not None:
        snippet = re.sub(r"n_trials=\d+", f"n_trials={n_trials}", snippet)
    ns = _user_namespace()
    exec(compile(snippet, "<spec>", "exec"), ns)
    return ns


@pytest.mark.parametrize("snippet", [SPEC_SNIPPET_1, SPEC_SNIPPET_2], ids=["usage", "custom_param"])
def test_spec_snippets_run_short(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    n = 19 if snippet is SPEC_SNIPPET_1 else 21  # Sobol design of 2 x (9 or 10) dims, then one GP ask
    ns = _exec(snippet, n_trials=n)
    best, tuner = ns["best_params"], ns["tuner"]
    assert set(best) >= {c.name for c in create_ppo_hyperparameter_configs()}
    assert len(tuner.study.trials) == n
    assert [t.info["design"] for t in tuner.study.trials][-1] == "gp"
    assert (tmp_path / "hyperopt_results" / "trials.jsonl").exists()
    assert json.loads((tmp_path / "hyperopt_results" / "best_params.json").read_text())["best_params"] == best
    if snippet is SPEC_SNIPPET_2:
        assert 0.1 <= best["custom_param"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("snippet", [SPEC_SNIPPET_1, SPEC_SNIPPET_2], ids=["usage", "custom_param"])
def test_spec_snippets_run_as_written(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = _exec(snippet)
    tuner = ns["tuner"]
    assert len(tuner.study.trials) == tuner.n_trials
    # the GP finds the toy optimum's learning rate to within a factor ~3
    assert abs(math.log10(ns["best_params"]["actor.lr"]) + 5) < 0.5


def _box():
    return [HyperparameterConfig("x", "float", low=-2.0, high=2.0), HyperparameterConfig("y", "float", low=-2.0, high=2.0)]


def _loss(p):
    return (p["x"] - 0.5) ** 2 + (p["y"] + 0.5) ** 2


def test_dict_objective_metrics_and_summary(tmp_path):
    t = HyperparameterTuner("random", _box(), objective_name="loss", maximize=False, n_trials=12, seed=0,
                            save_dir=tmp_path, show_progress_bar=False)
    best = t.optimize(lambda p: {"loss": _loss(p), "kl": 0.1, "tag": "ok"})
    s = t.results_summary()
    assert s["best_params"] == best and s["n_complete"] == 12 and s["n_failed"] == 0
    assert s["best_value"] == min(tr.value for tr in t.study.trials)
    df = s["trials"]
    assert len(df) == 12 and {"params.x", "metrics.kl", "metrics.tag"} <= set(df.columns)
    assert (tmp_path / "trials.csv").read_text().startswith("number,state,value")


def test_missing_objective_key_is_a_clear_error(tmp_path):
    t = HyperparameterTuner("random", _box(), n_trials=5, seed=0, save_dir=None, show_progress_bar=False)
    with pytest.raises(KeyError, match=re.escape("without the key objective_name='reward'; keys present: ['kl', 'loss']")):
        t.optimize(lambda p: {"loss": 1.0, "kl": 0.0})
    assert [tr.state for tr in t.study.trials] == ["failed"]


def test_failed_trials_do_not_stop_the_tuner():
    calls = []

    def fn(p):
        calls.append(p)
        if len(calls) % 3 == 1:
            raise RuntimeError("CUDA out of memory")
        if len(calls) % 3 == 2:
            return float("nan")
        return -_loss(p)

    t = HyperparameterTuner("bayesian", _box(), n_trials=12, seed=0, save_dir=None, show_progress_bar=False,
                            sampler_options={"n_initial": 3, "num_restarts": 2, "raw_samples": 32})
    best = t.optimize(fn)
    s = t.results_summary()
    assert s["n_failed"] == 8 and s["n_complete"] == 4
    assert "RuntimeError: CUDA out of memory" in t.study.trials[0].error
    assert best == t.best_params
    # exceptions outside `catch` propagate and leave the trial unrecorded (re-asked on resume)
    t2 = HyperparameterTuner("random", _box(), n_trials=3, seed=0, save_dir=None, show_progress_bar=False, catch=(ValueError,))
    with pytest.raises(RuntimeError, match="boom"):
        t2.optimize(lambda p: (_ for _ in ()).throw(RuntimeError("boom")))
    assert t2.study.trials == [] and len(t2.study.pending) == 1
    t2.optimize(lambda p: 1.0)  # calling again drops the stale running trial
    assert len(t2.study.trials) == 3 and t2.study.pending == []


def test_parallel_threads_no_repeats_and_resume_counts(tmp_path):
    with cf.ThreadPoolExecutor(3) as ex:
        t = HyperparameterTuner("skopt", _box(), maximize=False, n_trials=10, seed=0, n_jobs=3, executor=ex,
                                save_dir=tmp_path, show_progress_bar=False, sampler_options={"n_initial": 4})
        t.optimize(lambda p: {"reward": _loss(p)})
    pts = [(tr.params["x"], tr.params["y"]) for tr in t.study.trials]
    assert len(pts) == 10 and len(set(pts)) == 10
    t2 = HyperparameterTuner("skopt", _box(), maximize=False, n_trials=13, n_jobs=2, save_dir=tmp_path,
                             show_progress_bar=False, sampler_options={"n_initial": 4})
    t2.optimize(lambda p: _loss(p))  # default ThreadPoolExecutor(2); seed comes from save_dir
    assert len(t2.study.trials) == 13 and len({tr.number for tr in t2.study.trials}) == 13


def test_grid_exhaustion_ends_the_study_with_a_message(capsys):
    cs = [HyperparameterConfig("n", "int", low=1, high=3), HyperparameterConfig("flag", "bool")]
    t = HyperparameterTuner("grid", cs, n_trials=100, save_dir=None, n_jobs=2)
    with pytest.warns(UserWarning, match=r"grid search exhausted: all 6 grid points"):
        best = t.optimize(lambda p: p["n"] + p["flag"])
    assert best == {"n": 3, "flag": True} and len(t.study.trials) == 6
    assert "grid search" in capsys.readouterr().err  # the tqdm progress bar


def test_bad_tuner_arguments():
    with pytest.raises(ValueError, match="optimizer_type must be one of"):
        HyperparameterTuner("hyperband", _box(), save_dir=None)
    with pytest.raises(ValueError, match=r"n_jobs must be in \[1, inf\], got 0"):
        HyperparameterTuner("random", _box(), n_jobs=0, save_dir=None)
    with pytest.raises(ValueError, match="n_trials must be a positive integer"):
        HyperparameterTuner("random", _box(), n_trials=2.5, save_dir=None)
    with pytest.raises(ValueError, match="executor must be a concurrent.futures.Executor or a dask distributed Client"):
        HyperparameterTuner("random", _box(), executor=object(), save_dir=None)
    with pytest.raises(ValueError, match="low must be < high"):
        HyperparameterTuner("random", [{"name": "x", "type": "float", "low": 1.0, "high": 0.0}], save_dir=None)
    assert rl2fx.HyperparameterTuner is HyperparameterTuner


@pytest.mark.integration
def test_dask_local_cluster_runs_trials_in_parallel(tmp_path):
    distributed = pytest.importorskip("distributed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                           dashboard_address=None)
        client = distributed.Client(cluster)
    try:
        t = HyperparameterTuner("bayesian", _box(), maximize=False, n_trials=8, seed=0, n_jobs=2,
                                executor=client, save_dir=tmp_path, show_progress_bar=False,
                                sampler_options={"n_initial": 4, "num_restarts": 2, "raw_samples": 32})
        best = t.optimize(lambda p: {"reward": _loss(p)})
    finally:
        client.close()
        cluster.close()
    assert len(t.study.trials) == 8 and all(tr.state == "complete" for tr in t.study.trials)
    pts = {(tr.params["x"], tr.params["y"]) for tr in t.study.trials}
    assert len(pts) == 8
    assert best == t.best_params
