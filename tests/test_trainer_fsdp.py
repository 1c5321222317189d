"""PPOTrainer with trainer.strategy=fsdp: sharded checkpoints that resume exactly, a consolidated final model."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _dist_helpers import torchrun
from transformers import AutoModelForCausalLM

from rl2fx import load_config
from rl2fx.trainer.config import ConfigError
from rl2fx.trainer.ppo import PPOTrainer

QUIET = ["trainer.progress_bar=false", "experiment_tracking.enabled=false", "memory_optimization.profiling.enabled=false",
         "data.prompts_per_rollout=2", "adv.estimator=grpo"]


@pytest.fixture
def no_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _cfg(out, *extra):
    return load_config("demo", overrides=[f"trainer.output_dir={out}", "trainer.strategy=fsdp", *QUIET, *extra])


def test_fsdp_in_one_process_resumes_identically(tmp_path, no_group):
    full = PPOTrainer(_cfg(tmp_path / "a", "trainer.total_steps=3"))
    r_full = full.train()
    dist.destroy_process_group()
    part = PPOTrainer(_cfg(tmp_path / "b", "trainer.total_steps=1"))
    part.train()
    assert (tmp_path / "b" / "checkpoints" / "step-000001" / "policy" / ".metadata").exists()
    dist.destroy_process_group()
    resumed = PPOTrainer(_cfg(tmp_path / "b", "trainer.total_steps=3", "trainer.resume_from=auto"))
    r_res = resumed.train()
    assert resumed.history["reward"] == full.history["reward"]
    assert r_res["reward_end"] == r_full["reward_end"]
    a = AutoModelForCausalLM.from_pretrained(r_full["final_model"])
    b = AutoModelForCausalLM.from_pretrained(r_res["final_model"])
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_fsdp_checkpoint_does_not_resume_under_ddp(tmp_path, no_group):
    PPOTrainer(_cfg(tmp_path, "trainer.total_steps=1")).train()
    dist.destroy_process_group()
    with pytest.raises(Exception, match="trainer.strategy=fsdp"):
        PPOTrainer(load_config("demo", overrides=[f"trainer.output_dir={tmp_path}", "trainer.total_steps=2",
                                                  "trainer.resume_from=auto", *QUIET]))


def test_fsdp_settings_need_the_fsdp_strategy():
    with pytest.raises(ConfigError, match="'trainer.fsdp_wrap'.*needs trainer.strategy=fsdp"):
        load_config("demo", overrides=["trainer.fsdp_wrap=LlamaDecoderLayer"])
    with pytest.raises(ConfigError, match="'trainer.strategy' must be one of"):
        load_config("demo", overrides=["trainer.strategy=zero3"])


@pytest.mark.slow
def test_two_process_fsdp_run_resumes_in_one_process(tmp_path, no_group):
    proc = torchrun("-m", "rl2fx.train", "--config-name", "demo", "trainer.total_steps=2", "trainer.save_interval=1",
                    f"trainer.output_dir={tmp_path}", "trainer.strategy=fsdp", *QUIET, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "checkpoints" / "step-000001" / "policy" / ".metadata").exists()
    resumed = PPOTrainer(_cfg(tmp_path, "trainer.total_steps=3", "trainer.resume_from=auto"))
    assert resumed.step == 2
    result = resumed.train()
    assert result["steps"] == 3.0
