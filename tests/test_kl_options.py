"""The KL estimator options reach every place the trainer estimates KL: loss, reward, rollout metric."""

from __future__ import annotations

import pytest
import torch

from rl2fx import load_config
from rl2fx.kl_estimators import kl_estimate
from rl2fx.losses import kl_loss, kl_penalized_rewards
from rl2fx.step import make_ppo_loss
from rl2fx.trainer.config import ConfigError
from rl2fx.trainer.ppo import PPOTrainer


def test_clamps_in_the_loss_and_the_reward():
    lp = torch.tensor([[-0.1, -9.0, -1.0]])
    ref = torch.tensor([[-8.0, -0.2, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    _, m = kl_loss(lp, ref, 1.0, estimator="k3", mask=mask, value_clamp=0.5)
    assert m["kl"].item() == pytest.approx(0.5)  # both masked-in tokens exceed 0.5
    _, raw = kl_loss(lp, ref, 1.0, estimator="k3", mask=mask)
    assert raw["kl"].item() > 100
    r = kl_penalized_rewards(torch.zeros(1, 3), lp, ref, 1.0, estimator="k1", mask=mask, log_ratio_clamp=2.0)
    assert r.tolist() == [[-2.0, 2.0, 0.0]]


def test_k3_unbiased_reads_the_old_logprobs_in_the_loss():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref, old = torch.tensor([[-1.5, -2.5]]), torch.tensor([[-0.5, -2.0]])
    _, with_old = kl_loss(lp, ref, 1.0, estimator="k3_unbiased", old_logprobs=old)
    expected = kl_estimate(lp, ref, "k3_unbiased", old_logprobs=old).mean()
    assert with_old["kl"].item() == pytest.approx(expected.item())
    _, without = kl_loss(lp, ref, 1.0, estimator="k3_unbiased")
    assert with_old["kl"].item() != pytest.approx(without["kl"].item())


def test_config_keys_are_checked_and_named():
    with pytest.raises(ConfigError, match="trainer.kl_value_clamp"):
        load_config("demo", overrides=["trainer.kl_value_clamp=-1"])
    with pytest.raises(ConfigError, match="trainer.kl_log_ratio_clamp"):
        load_config("demo", overrides=["trainer.kl_log_ratio_clamp=0"])
    with pytest.raises(ValueError, match="kl_value_clamp"):
        make_ppo_loss(kl_value_clamp=0.0)


@pytest.mark.parametrize("estimator", ["k3_unbiased", "k3+", "abs"])
def test_trainer_runs_each_estimator_with_clamps(tmp_path, estimator):
    cfg = load_config("demo", overrides=[
        f"trainer.output_dir={tmp_path}", "trainer.total_steps=1", "trainer.progress_bar=false",
        "experiment_tracking.enabled=false", "data.prompts_per_rollout=2", "adv.estimator=grpo",
        f"trainer.kl_estimator={estimator}", "trainer.kl_value_clamp=10", "trainer.kl_log_ratio_clamp=20",
        "memory_optimization.profiling.enabled=false"])
    m = PPOTrainer(cfg).train_iteration()
    assert torch.isfinite(torch.tensor([m["loss"], m["rollout_kl"]])).all()


def test_trainer_rollout_correction_on_matching_sampler(tmp_path):
    """HF generate is the trainer's own forward pass: ratios are 1, nothing masked, weights 1."""
    cfg = load_config("demo", overrides=[
        f"trainer.output_dir={tmp_path}", "trainer.total_steps=1", "trainer.progress_bar=false",
        "experiment_tracking.enabled=false", "data.prompts_per_rollout=2", "adv.estimator=grpo",
        "trainer.rollout_is=token", "trainer.rollout_rs=sequence", "memory_optimization.enabled=false"])
    trainer = PPOTrainer(cfg)
    assert trainer.needs.old
    m = trainer.train_iteration()
    assert abs(m["rollout_mismatch/kl_k1"]) < 1e-5 and m["rollout_rs/masked_tokens"] == 0.0
    with pytest.raises(ConfigError, match="trainer.rollout_rs"):
        load_config("demo", overrides=["trainer.rollout_rs=tokens"])
