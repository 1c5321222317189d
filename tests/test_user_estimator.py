"""A user-registered estimator works by name everywhere: config, PPOTrainer, ``rl2fx ablate``, CLI listing."""

from __future__ import annotations

import sys

import pytest

from rl2fx.returns import list_estimators, unregister_estimator
from rl2fx.trainer.ablate import ablation_arms, run_ablation
from rl2fx.trainer.commands import registry_table
from rl2fx.trainer.config import ConfigError, estimator_params, load_config
from rl2fx.trainer.ppo import PPOTrainer

USER = ["imports=[_user_estimators]", "adv.estimator=batch_mean_baseline"]
TINY = ["trainer.total_steps=2", "trainer.progress_bar=false", "data.prompts_per_rollout=2",
        "data.responses_per_prompt=2", "experiment_tracking.enabled=false",
        "memory_optimization.profiling.enabled=false", "trainer.summary_window=1"]


@pytest.fixture(autouse=True)
def _forget_the_user_module():
    """The registry is process-wide: leave it as the other tests expect it."""
    yield
    if "batch_mean_baseline" in list_estimators():
        unregister_estimator("batch_mean_baseline")
    sys.modules.pop("_user_estimators", None)


def test_config_section_and_validation_come_from_the_registration():
    cfg = load_config("demo", overrides=[*USER, "adv.batch_mean_baseline.scale=0.5"])
    assert "batch_mean_baseline" in list_estimators()
    assert cfg.adv.batch_mean_baseline.scale == 0.5 and cfg.adv.batch_mean_baseline.temperature == 1.0
    assert estimator_params(cfg) == {"scale": 0.5, "temperature": 1.0}
    with pytest.raises(ConfigError, match=r"config key 'adv.batch_mean_baseline.scale' must be > 0, got -1"):
        load_config("demo", overrides=[*USER, "adv.batch_mean_baseline.scale=-1.0"])
    with pytest.raises(ConfigError, match=r"did you mean 'adv.batch_mean_baseline.scale'"):
        load_config("demo", overrides=[*USER, "adv.batch_mean_baseline.scal=1.0"])
    with pytest.raises(ConfigError, match=r"config key 'imports' names module 'no_such_module_xyz'"):
        load_config("demo", overrides=["imports=[no_such_module_xyz]"])
    assert "batch_mean_baseline" in registry_table()


def test_ppo_trainer_trains_with_it_by_name(tmp_path):
    cfg = load_config("demo", overrides=[*USER, *TINY, f"trainer.output_dir={tmp_path}"])
    trainer = PPOTrainer(cfg)
    assert trainer.critic is None  # needs_values=False
    res = trainer.train()
    assert res["steps"] == 2.0 and len(trainer.history["reward"]) == 2


def test_ablation_runs_it_as_an_arm(tmp_path):
    assert "batch_mean_baseline" not in list_estimators()  # nothing imported it yet: the ablation's imports do
    out = run_ablation("estimators", seeds=1, out_dir=tmp_path, overrides=["imports=[_user_estimators]", *TINY[:4]],
                       arms=["batch_mean_baseline"], workers=1, show_progress_bar=False)
    assert [s["arm"] for s in out["summary"]] == ["batch_mean_baseline"]
    assert "batch_mean_baseline" in dict(ablation_arms("estimators", total_steps=2))
