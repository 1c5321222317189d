"""Every registered policy loss trains by name through the config (``actor.loss_type``)."""

import math

import pytest

from rl2fx import PPOTrainer, load_config
from rl2fx.losses import list_policy_losses


@pytest.mark.parametrize("loss_type", list_policy_losses())
def test_each_registered_loss_trains_by_name(loss_type, tmp_path):
    cfg = load_config("demo", overrides=[
        f"actor.loss_type={loss_type}", "trainer.total_steps=2", "trainer.update_epochs=2",
        "data.prompts_per_rollout=2", "data.responses_per_prompt=4", "experiment_tracking.enabled=false",
        "memory_optimization.profiling.enabled=false", "trainer.progress_bar=false",
        f"trainer.output_dir={tmp_path}"])
    out = PPOTrainer(cfg).train()
    assert out["steps"] == 2.0 and math.isfinite(out["loss"])
