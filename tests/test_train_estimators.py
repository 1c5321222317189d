"""PPOTrainer with the LLM group estimators (adv.estimator=remax/opo/gpg/grpo_passk/reinforce_pp_baseline)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rl2fx.trainer.config import ConfigError, load_config
from rl2fx.trainer.ppo import PPOTrainer

K = 4  # responses per prompt


def _trainer(tmp_path: Path, estimator: str, *extra: str) -> PPOTrainer:
    cfg = load_config("demo", overrides=[
        "trainer.total_steps=1", "trainer.progress_bar=false", f"trainer.output_dir={tmp_path / 'out'}",
        "data.prompts_per_rollout=3", f"data.responses_per_prompt={K}", "trainer.summary_window=1",
        "experiment_tracking.enabled=false", "memory_optimization.profiling.enabled=false",
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
        f"adv.estimator={estimator}", *extra])
    return PPOTrainer(cfg)


def _check_common(exp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    adv, mask = exp["advantages"], exp["response_mask"]
    assert adv.shape == mask.shape and torch.isfinite(adv).all()
    assert torch.all(adv[mask == 0] == 0)
    # outcome advantages: one value per response on every masked-in token
    for row, m in zip(adv, mask > 0, strict=True):
        assert torch.all(row[m] == row[m][0])
    return adv, mask


def _per_response(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return adv.sum(-1) / mask.sum(-1).clamp_min(1.0)


@pytest.mark.parametrize("estimator", ["remax", "opo", "gpg", "grpo_passk", "reinforce_pp_baseline"])
def test_trainer_runs_with_estimator(tmp_path, estimator):
    trainer = _trainer(tmp_path, estimator)
    assert trainer.critic is None
    exp = trainer.make_experience()
    adv, mask = _check_common(exp)
    a = _per_response(adv, mask).view(-1, K)
    s = exp["scores"].view(-1, K)
    if estimator == "opo":
        # the length-weighted baseline makes the token-summed advantage of every group 0
        torch.testing.assert_close(adv.sum(-1).view(-1, K).sum(-1), torch.zeros(a.shape[0]), atol=1e-5, rtol=0)
    elif estimator == "gpg":
        torch.testing.assert_close(a.sum(-1), torch.zeros(a.shape[0]), atol=1e-5, rtol=0)
    elif estimator == "grpo_passk":
        assert torch.all(a >= 0) and torch.all((a != 0).sum(-1) <= 1)
    elif estimator == "reinforce_pp_baseline":
        assert abs(float(adv.sum() / mask.sum())) < 1e-5  # whitened over the batch's tokens
    elif estimator == "remax":
        # adv = score - greedy score of the prompt: differences within a group are differences of scores
        torch.testing.assert_close(a - a[:, :1], s - s[:, :1], atol=1e-6, rtol=0)
    metrics = trainer.train_iteration()
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])


def test_remax_baseline_is_the_greedy_rollout_reward(tmp_path):
    trainer = _trainer(tmp_path, "remax")
    trainer.source.n = 3
    prompts = trainer.source.sample(torch.Generator().manual_seed(5))
    rng = torch.get_rng_state()
    g1 = trainer.greedy_rewards(prompts)
    assert torch.equal(rng, torch.get_rng_state())  # greedy decoding draws no random numbers
    assert g1.shape == (3,) and torch.equal(g1, trainer.greedy_rewards(prompts))  # deterministic


def test_kl_in_reward_with_adaptive_coefficient_runs(tmp_path):
    trainer = _trainer(tmp_path, "opo", "trainer.kl_type=reward", "actor.kl.adaptive_kl.enabled=true")
    metrics = trainer.train_iteration()
    assert math.isfinite(metrics["loss"]) and metrics["kl_coef"] > 0


def test_grpo_passk_needs_two_responses_per_prompt():
    with pytest.raises(ConfigError, match="config key 'data.responses_per_prompt' must be >= 2 for grpo_passk"):
        load_config("demo", overrides=["adv.estimator=grpo_passk", "data.responses_per_prompt=1"])


def test_recompute_advantages_uses_the_current_policys_ratios_and_critic(tmp_path):
    # With one estimate per rollout V-trace sees log_rhos = 0 at every epoch: nothing to correct.
    # trainer.recompute_advantages re-estimates after each update with the current policy and critic.
    from rl2fx.experience import critic_values
    from rl2fx.step import compute_logprobs, train_step
    from rl2fx.testing.reference import ref_vtrace, ref_whiten

    trainer = _trainer(tmp_path, "vtrace", "trainer.update_epochs=2", "trainer.recompute_advantages=true",
                       "actor.lr=1e-2")
    assert trainer.recompute_advantages and trainer.critic is not None
    exp = trainer.make_experience()
    same, _, st = trainer.reestimate_advantages(exp)  # the policy is still the sampler: same advantages
    assert st["recompute/abs_log_rho"] < 1e-6
    torch.testing.assert_close(same, exp["advantages"], atol=1e-5, rtol=0)
    batch = {k: exp[k] for k in ("input_ids", "attention_mask", "response_ids", "response_mask", "old_logprobs",
                                 "advantages")}
    train_step(trainer.policy, trainer.optimizer, batch, loss_fn=trainer.loss_fn)
    train_step(trainer.critic, trainer.critic_optimizer, {k: exp[k] for k in (
        "input_ids", "attention_mask", "response_mask", "old_values", "returns")}, loss_fn=trainer.value_loss_fn)
    adv, ret, st = trainer.reestimate_advantages(exp)
    mask = exp["response_mask"]
    with torch.no_grad():
        cur, _ = compute_logprobs(trainer.policy, exp)
    log_rhos = torch.where(mask != 0, cur - exp["old_logprobs"], 0.0)
    assert st["recompute/abs_log_rho"] == pytest.approx(float(log_rhos.abs().sum() / mask.sum()), rel=1e-5)
    assert st["recompute/abs_log_rho"] > 1e-3 and 0 < st["recompute/rho_above_1"] < 1
    # independent reference: the closed-sum V-trace of the paper, then the trainer's whitening
    vs, pg = ref_vtrace(exp["token_rewards"].double(), critic_values(trainer.critic, exp).double(),
                        log_rhos.double(), **trainer.estimator_params, mask=mask)
    torch.testing.assert_close(adv.double(), ref_whiten(pg, mask), atol=1e-4, rtol=0)
    torch.testing.assert_close(ret.double(), torch.where(mask != 0, vs, 0.0), atol=1e-5, rtol=0)
    assert (adv - exp["advantages"]).abs().max() > 1e-3


def test_recompute_advantages_is_off_for_estimators_that_read_neither_ratios_nor_values(tmp_path):
    trainer = _trainer(tmp_path, "grpo", "trainer.update_epochs=2", "trainer.recompute_advantages=true")
    assert not trainer.recompute_advantages  # group baselines of the scores: nothing would change
    seen = []
    trainer = _trainer(tmp_path, "retrace", "trainer.update_epochs=2", "trainer.recompute_advantages=true")
    trainer.train(on_step=lambda t, m: seen.append(m))
    assert seen and seen[0]["recompute/abs_log_rho"] > 0 and math.isfinite(seen[0]["recompute/rho_above_1"])


def test_token_level_partial_credit_reaches_the_estimator(tmp_path):
    # task.reward_level=token: each right digit's 1/n_digits sits on its own token (same sum as the
    # outcome reward); a critic's GAE and REINFORCE++'s returns-to-go read it per token.
    from rl2fx.trainer.tasks import VOCAB

    seq = _trainer(tmp_path, "reinforce_pp", "adv.gamma=1.0").make_experience()
    tok = _trainer(tmp_path, "reinforce_pp", "adv.gamma=1.0", "task.reward_level=token").make_experience()
    assert torch.equal(seq["response_ids"], tok["response_ids"])  # same seed, same samples
    torch.testing.assert_close(tok["token_rewards"].sum(-1), tok["scores"])
    torch.testing.assert_close(tok["scores"], seq["scores"])
    answers_hit = tok["token_rewards"] > 0
    assert answers_hit.any() and torch.all(tok["response_ids"][answers_hit] != VOCAB["<eos>"])
    # returns-to-go: the last answer token's return is its own digit's credit only
    mask = tok["response_mask"]
    last = torch.where(mask.sum(-1) >= 3)[0]
    torch.testing.assert_close(tok["returns"][last, 1], tok["token_rewards"][last, 1] + tok["token_rewards"][last, 2])
    torch.testing.assert_close(seq["returns"][last, 1], seq["scores"][last])
    with pytest.raises(ConfigError, match="task.reward_level"):
        load_config("demo", overrides=["task.reward_level=tokens"])
