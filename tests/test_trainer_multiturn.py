"""PPOTrainer on multi-turn rollouts with an environment (RL2's env_step protocol)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rl2fx import load_config
from rl2fx.envs import EnvError
from rl2fx.envs_examples import guess_number
from rl2fx.testing.tokenizers import char_tokenizer
from rl2fx.trainer.config import ConfigError
from rl2fx.trainer.ppo import PPOTrainer


def tiny_model(tok) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))


def config(tmp_path, *extra):
    return load_config("demo", overrides=[
        f"trainer.output_dir={tmp_path}", "trainer.total_steps=2", "trainer.progress_bar=false",
        "experiment_tracking.enabled=false", "memory_optimization.enabled=false", "adv.estimator=grpo",
        "data.prompts_per_rollout=2", "data.responses_per_prompt=4", "rollout.max_new_tokens=3",
        "rollout.max_turns=3", *extra])


def test_guess_the_number_trains_on_turn_rewards(tmp_path):
    tok = char_tokenizer()
    trainer = PPOTrainer(config(tmp_path), model=tiny_model(tok), tokenizer=tok, env=guess_number,
                         train_dataset=str(guess_number.DATA))
    exp = trainer.make_experience()
    mask = exp["response_mask"]
    assert exp["response_ids"].shape == mask.shape and (mask.sum(1) > 0).all()
    # environment tokens are in the batch with mask 0 (a trajectory that did not win at once got feedback)
    real = exp["attention_mask"][:, -mask.shape[1]:] != 0
    env_tokens = (real & (mask == 0)).sum()
    assert env_tokens > 0
    # the per-turn rewards became the advantages: in every group with a winner, winners are above losers
    varied = 0
    for _ in range(4):
        won = exp["scores"].view(-1, 4)
        adv = (exp["advantages"].sum(1) / exp["response_mask"].sum(1)).view(-1, 4)
        for g in range(won.shape[0]):
            if won[g].max() > won[g].min():
                varied += 1
                assert adv[g][won[g] == won[g].max()].min() > 0 > adv[g][won[g] == won[g].min()].max()
        exp = trainer.make_experience()
    assert varied > 0  # (seeded: some group of these rollouts has a winner)
    m = trainer.train_iteration()
    assert math.isfinite(m["loss"]) and 1.0 <= m["multi_turn/turns_mean"] <= 3.0
    assert "multi_turn/env_tokens_mean" in m


def test_rl2_style_env_file_from_the_config(tmp_path):
    env_file = tmp_path / "count_env.py"
    env_file.write_text(
        "def env_step(sample):\n"
        "    # RL2's fields only: the row, the model's latest response, the text so far\n"
        "    done = '7' in sample.action_text\n"
        "    return {'next_state': None if done else sample.state_text + sample.action_text + ' again:',\n"
        "            'done': done, 'reward': 1.0 if done else 0.0}\n")
    tok = char_tokenizer()
    rows = [{"prompt": f"say seven {i}:"} for i in range(4)]
    trainer = PPOTrainer(config(tmp_path / "run", f"rollout.env_path={env_file}"), model=tiny_model(tok), tokenizer=tok,
                         train_dataset=rows)
    result = trainer.train()
    assert result["steps"] == 2.0


def test_env_errors_are_clear(tmp_path):
    tok = char_tokenizer()

    def broken(sample):
        raise RuntimeError("boom")

    rows = [{"prompt": "go:"}] * 4
    trainer = PPOTrainer(config(tmp_path), model=tiny_model(tok), tokenizer=tok, env=broken, train_dataset=rows)
    with pytest.raises(EnvError, match="boom"):
        trainer.train_iteration()  # every trajectory failed: the rollout raises
    with pytest.raises(ConfigError, match="rewards are the environment's"):
        PPOTrainer(config(tmp_path), model=tiny_model(tok), tokenizer=tok, env=broken, train_dataset=rows,
                   reward_funcs=lambda prompts, completions, **k: [0.0] * len(completions))
    with pytest.raises(ConfigError, match="rollout.max_turns"):
        config(tmp_path, "rollout.max_turns=0")


def test_segmented_trajectories_train_per_trajectory(tmp_path):
    """A next_state that does not extend the text starts a new segment (RL2): rows > trajectories."""
    from rl2fx.experience import experience_needs, make_experience
    from rl2fx.multiturn import to_trajectories

    def restart(sample):  # every turn restarts the context; reward 1 on turn 2 if a '7' was said
        done = sample.turn >= 2
        return {"next_state": None if done else f"again {sample.turn}:", "done": done,
                "reward": float(done and "7" in sample.action_text)}

    tok = char_tokenizer()
    rows = [{"prompt": f"go {i}:"} for i in range(2)]
    trainer = PPOTrainer(config(tmp_path, "rollout.max_turns=2", "adv.estimator=gae"), model=tiny_model(tok),
                         tokenizer=tok, env=restart, train_dataset=rows)
    exp = trainer.make_experience()
    lay = trainer._trajectories
    assert lay is not None and exp["response_mask"].shape[0] == 2 * lay["turns"].shape[0]
    m = trainer.train_iteration()
    assert math.isfinite(m["loss"]) and m["multi_turn/segments_per_sample"] == 2.0
    # GRPO on a segmented batch: every token of a trajectory (both its rows) gets the trajectory's advantage
    batch = {k: v for k, v in exp.items() if k in ("input_ids", "attention_mask", "response_ids", "response_mask")}
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    rewards = torch.zeros_like(exp["response_mask"])
    out = make_experience(trainer.policy, batch, scores, group_size=4, estimator="grpo",
                          needs=experience_needs(estimator="grpo"), token_rewards=rewards, trajectories=lay)
    per_traj = to_trajectories(out["advantages"], lay)
    traj_mask = to_trajectories(exp["response_mask"], lay)
    assert out["advantages"].shape == exp["response_mask"].shape
    for i in range(per_traj.shape[0]):
        vals = per_traj[i][traj_mask[i] != 0]
        assert torch.allclose(vals, vals[0].expand_as(vals))  # one value across the trajectory's segments
