"""``rl2fx.trainer.tune``: the PPO search space fitted to a config, and tune_from_config."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from rl2fx.trainer.config import ConfigError, load_config
from rl2fx.trainer.ppo import PPOTrainer
from rl2fx.trainer.tune import apply_params, ppo_search_space, tune_from_config
from rl2fx.tuning.space import (
    HyperparameterConfig,
    create_ppo_hyperparameter_configs,
    default_params,
)

QUIET = {"experiment_tracking.enabled": False, "memory_optimization.profiling.enabled": False,
         "trainer.progress_bar": False, "data.prompts_per_rollout": 2, "data.responses_per_prompt": 4,
         "trainer.total_steps": 2}


def test_every_search_space_name_is_a_config_key():
    cfg = load_config()
    params = default_params(create_ppo_hyperparameter_configs())
    applied = apply_params(cfg, params)
    for k, v in params.items():
        node = applied
        for part in k.split("."):
            node = node[part]
        assert node == v, k
    assert load_config(overrides=params).trainer.update_epochs == params["trainer.update_epochs"]


def test_initial_coef_range_is_fitted_to_the_controller_bounds():
    space = {c.name: c for c in ppo_search_space(load_config("demo"))}
    c = space["actor.kl.adaptive_kl.initial_coef"]
    assert (c.low, c.high) == pytest.approx((1e-3, 0.1)) and c.low <= c.default <= c.high and c.log
    wide = {c.name: c for c in ppo_search_space(load_config())}["actor.kl.adaptive_kl.initial_coef"]
    assert (wide.low, wide.high, wide.default) == pytest.approx((0.02, 2.0, 0.2))
    with pytest.raises(ConfigError, match="leave no room"):
        ppo_search_space(load_config(overrides={"actor.kl.adaptive_kl.min_coef": 2.0,
                                                "actor.kl.adaptive_kl.max_coef": 2.0,
                                                "actor.kl.adaptive_kl.initial_coef": 2.0}))


@pytest.mark.parametrize("config", ["demo", "ppo"])
def test_search_space_is_centred_on_the_shipped_configs(config):
    # The generic ranges are a pretrained LM's (lr ~1e-6): on the demo (lr 1e-3, from scratch) every
    # trial sat at chance. Each range now contains the config's value, which is the default.
    cfg = load_config(config)
    for c in ppo_search_space(cfg):
        value = OmegaConf.select(cfg, c.name)
        if value is None:
            continue
        if c.type == "categorical":
            assert value in c.choices and c.default == value, c.name
        elif c.log and value <= 0:
            assert c.low > 0, c.name  # off (0) keeps the generic range
        else:
            assert c.low <= value <= c.high and c.default == pytest.approx(value), c.name
            if c.log:  # at most one decade either side
                assert c.high / c.low <= 100 * (1 + 1e-9), c.name
    lr = {c.name: c for c in ppo_search_space(cfg)}["actor.lr"]
    assert lr.low < float(cfg.actor.lr) < lr.high


def test_apply_params_rejects_unknown_keys_and_bad_values():
    cfg = load_config()
    with pytest.raises(ConfigError, match="did you mean 'actor.lr'"):
        apply_params(cfg, {"actor.lrr": 1e-4})
    with pytest.raises(ConfigError, match="actor.clip"):
        apply_params(cfg, {"actor.clip": 3.0})
    assert cfg.actor.clip == 0.2  # the input is not changed


def test_grid_search_objective_is_the_runs_final_reward(tmp_path):
    cfg = load_config("demo", overrides={**QUIET, "hyperopt.optimizer_type": "grid", "hyperopt.grid.grid_size": 2,
                                         "hyperopt.n_trials": 2, "hyperopt.save_dir": str(tmp_path)})
    space = [HyperparameterConfig("actor.clip", "float", low=0.1, high=0.3)]
    best = tune_from_config(cfg, param_configs=space, show_progress_bar=False, verbose=False)
    trials = [json.loads(t) for t in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert sorted(t["params"]["actor.clip"] for t in trials) == [0.1, 0.3]
    for t in trials:  # each trial is exactly a training run of the config with its params
        again = PPOTrainer(apply_params(cfg, {"actor.clip": t["params"]["actor.clip"],
                                              "trainer.output_dir": str(tmp_path / "again")})).train()
        assert t["value"] == again["reward_end"] and t["metrics"]["kl"] == again["kl"]
    assert best == max(trials, key=lambda t: t["value"])["params"]


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, capsys):
    cfg = load_config("demo", overrides={**QUIET, "hyperopt.n_trials": 2, "hyperopt.save_dir": str(tmp_path)})
    # prompts_per_rollout=0 fails the config validation inside the trial; 2 runs
    space = [HyperparameterConfig("data.prompts_per_rollout", "categorical", choices=[0, 2])]
    cfg.hyperopt.optimizer_type = "grid"
    best = tune_from_config(cfg, param_configs=space, show_progress_bar=False)
    assert best == {"data.prompts_per_rollout": 2}
    out = capsys.readouterr().out
    assert "best 1 of 2 trials (1 failed, 0 pruned)" in out
    failed = [json.loads(t) for t in (tmp_path / "trials.jsonl").read_text().splitlines() if '"failed"' in t]
    assert len(failed) == 1 and "data.prompts_per_rollout" in failed[0]["error"]


def test_a_pruner_stops_runs_that_lag_and_the_study_goes_on(tmp_path, capsys):
    # 6 grid trials of 4 steps, reporting every step; the median pruner may stop a trial
    # from step 1 on once 2 trials are complete. The seed alone moves the sampled rewards,
    # so the runs differ from the first step and some of the 4 later ones lag the median
    cfg = load_config("demo", overrides={**QUIET, "trainer.total_steps": 4, "trainer.summary_window": 2,
                                         "hyperopt.optimizer_type": "grid", "hyperopt.grid.grid_size": 6,
                                         "hyperopt.n_trials": 6, "hyperopt.save_dir": str(tmp_path),
                                         "hyperopt.report_interval": 1, "hyperopt.pruner": "median",
                                         "hyperopt.median.n_startup_trials": 2})
    space = [HyperparameterConfig("trainer.seed", "categorical", choices=list(range(6)))]
    tune_from_config(cfg, param_configs=space, show_progress_bar=False)
    trials = [json.loads(t) for t in (tmp_path / "trials.jsonl").read_text().splitlines()]
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert len(trials) == 6 and pruned and len(pruned) <= 4
    for t in trials:  # reports at every step, running mean over summary_window=2 steps
        steps = sorted(int(s) for s in t["intermediate"])
        assert steps == list(range(1, len(steps) + 1))
        assert len(steps) == 4 or t["state"] == "pruned"
    for t in pruned:
        assert len(t["intermediate"]) < 4 and t["value"] == t["intermediate"][str(max(map(int, t["intermediate"])))]
    assert f"({0} failed, {len(pruned)} pruned)" in capsys.readouterr().out


def test_pruner_none_reports_but_never_prunes(tmp_path):
    cfg = load_config("demo", overrides={**QUIET, "trainer.total_steps": 3, "hyperopt.optimizer_type": "grid",
                                         "hyperopt.grid.grid_size": 3, "hyperopt.n_trials": 3,
                                         "hyperopt.save_dir": str(tmp_path), "hyperopt.report_interval": 2})
    assert cfg.hyperopt.pruner == "none"
    space = [HyperparameterConfig("actor.lr", "float", low=1e-6, high=3e-2, log=True)]
    tune_from_config(cfg, param_configs=space, show_progress_bar=False, verbose=False)
    trials = [json.loads(t) for t in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [t["state"] for t in trials] == ["complete"] * 3
    for t in trials:  # as before: the value is the run's reward_end; one report at step 2
        assert sorted(t["intermediate"]) == ["2"]


def test_pruner_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"'hyperopt.pruner'.*did you mean 'median'"):
        load_config(overrides={"hyperopt.pruner": "medain"})
    with pytest.raises(ConfigError, match="hyperopt.median.n_startup_trials"):
        load_config(overrides={"hyperopt.median.n_startup_trials": -1})
    with pytest.raises(ConfigError, match="hyperopt.report_interval"):
        load_config(overrides={"hyperopt.report_interval": 0})


def test_hyperopt_params_selects_a_subset_and_rejects_unknown_names():
    space = ppo_search_space(load_config("demo"))
    from rl2fx.trainer.tune import select_params
    assert [c.name for c in select_params(space, None)] == [c.name for c in space]
    assert [c.name for c in select_params(space, ["trainer.entropy_coef", "actor.lr"])] == [
        "actor.lr", "trainer.entropy_coef"]
    for bad in (["actor.lrr"], [], ["actor.lr", "actor.lr"]):
        with pytest.raises(ConfigError, match="hyperopt.params"):
            select_params(space, bad)


def test_seeds_per_trial_averages_runs_of_consecutive_seeds(tmp_path):
    cfg = load_config("demo", overrides={**QUIET, "hyperopt.optimizer_type": "grid",
                                         "hyperopt.n_trials": 1, "hyperopt.save_dir": str(tmp_path),
                                         "hyperopt.seeds_per_trial": 2, "hyperopt.report_interval": 1,
                                         "trainer.seed": 3, "model.seed": 5})
    space = [HyperparameterConfig("actor.clip", "categorical", choices=[0.2])]
    tune_from_config(cfg, param_configs=space, show_progress_bar=False, verbose=False)
    (t,) = [json.loads(x) for x in (tmp_path / "trials.jsonl").read_text().splitlines()]
    runs = [PPOTrainer(apply_params(cfg, {"trainer.seed": 3 + i, "model.seed": 5 + i,
                                          "trainer.output_dir": str(tmp_path / f"again{i}")})).train()
            for i in range(2)]
    assert [t["metrics"]["reward_seed0"], t["metrics"]["reward_seed1"]] == [r["reward_end"] for r in runs]
    assert t["value"] == pytest.approx((runs[0]["reward_end"] + runs[1]["reward_end"]) / 2)
    assert t["metrics"]["kl"] == pytest.approx((runs[0]["kl"] + runs[1]["kl"]) / 2)
    assert sorted(t["intermediate"]) == ["1", "2"]  # the pruner sees the first seed's reports only
    with pytest.raises(ConfigError, match="hyperopt.seeds_per_trial"):
        load_config(overrides={"hyperopt.seeds_per_trial": 0})
