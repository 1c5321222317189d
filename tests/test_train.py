"""train_step mechanics and PPOTrainer runs: loss decrease, accumulation, controllers, resume, smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rl2fx.control.kl import kl_init, kl_update
from rl2fx.control.lagrangian import lagrangian_init, lagrangian_update
from rl2fx.rollout import rollout
from rl2fx.step import compute_logprobs, make_ppo_loss, train_step
from rl2fx.trainer.config import load_config
from rl2fx.trainer.ppo import PPOTrainer
from rl2fx.trainer.tasks import DigitCopyTask, build_tiny_lm


def _batch(seed=0, n_prompts=4, group=4):
    torch.manual_seed(seed)
    model = build_tiny_lm(16, hidden_size=32, num_layers=1, num_heads=2, seed=seed)
    task = DigitCopyTask(n_digits=2, mode="copy")
    prompts = task.sample_prompts(n_prompts, torch.Generator().manual_seed(seed))
    b = rollout(model, prompts.input_ids, responses_per_prompt=group, max_new_tokens=3, eos_token_id=2,
                pad_token_id=0)
    with torch.no_grad():
        old, _ = compute_logprobs(model, b)
    scores = task.reward(b["response_ids"], prompts.answers.repeat_interleave(group, 0))
    adv = (scores - scores.mean()).unsqueeze(-1) * b["response_mask"]
    b.update(old_logprobs=old, ref_logprobs=old.clone(), advantages=adv)
    return model, b


def test_train_step_reduces_loss_on_fixed_batch():
    model, batch = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = make_ppo_loss(clip=1.0)  # wide clip: a surrogate that keeps decreasing for a while
    losses = [train_step(model, opt, batch, loss_fn=loss_fn)["loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_equal_full_batch(agg_mode):
    model, batch = _batch(seed=1)
    other = build_tiny_lm(16, hidden_size=32, num_layers=1, num_heads=2, seed=1)
    other.load_state_dict(model.state_dict())
    loss_fn = make_ppo_loss(kl_coef=0.1, entropy_coef=0.01, agg_mode=agg_mode)
    o1 = torch.optim.SGD(model.parameters(), lr=0.5)
    o2 = torch.optim.SGD(other.parameters(), lr=0.5)
    r1 = train_step(model, o1, batch, loss_fn=loss_fn, max_grad_norm=None)
    r2 = train_step(other, o2, batch, loss_fn=loss_fn, micro_batch_size=3, max_grad_norm=None)
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5, abs=1e-7)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_grad_clipping_and_metrics():
    model, batch = _batch(seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    out = train_step(model, opt, batch, loss_fn=make_ppo_loss(), max_grad_norm=1e-3)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm.item() == pytest.approx(1e-3, rel=1e-3)
    assert out["grad_norm"] > 1e-3
    for k in ("loss", "clip_frac", "approx_kl", "kl", "entropy", "lr"):
        assert k in out


def test_controllers_are_the_callers_and_train_step_returns_metrics_only():
    model, batch = _batch(seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = make_ppo_loss()
    kl_state = kl_init("exponential", initial_coef=0.2, target_kl=1e-6)
    lag = lagrangian_init(kl_constraint=1e-6, entropy_constraint=100.0, lagrangian_lr=1.0)
    for step in range(3):
        out = train_step(model, opt, batch, loss_fn=loss_fn, kl_coef=kl_state.coef, lagrangian=lag, step=step)
        assert out["kl_coef"] == kl_state.coef and "lagrangian_penalty" in out
        assert all(isinstance(v, float) for v in out.values())  # metrics only, no controller state
        kl_state = kl_update(kl_state, out["kl"], step)  # the caller steps its controllers
        lag = lagrangian_update(lag, kl=out["kl"], entropy=out["entropy"])
    assert kl_state.coef > 0.2  # KL above a tiny target: the exponential controller raised the coefficient
    assert lag.entropy_multiplier > 0  # entropy below its floor: the multiplier grew
    assert kl_state.count == 3 and lag.count == 3


def test_autocast_bfloat16_runs():
    model, batch = _batch(seed=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    out = train_step(model, opt, batch, loss_fn=make_ppo_loss(), autocast_dtype=torch.bfloat16)
    assert torch.isfinite(torch.tensor(out["loss"]))


def _cfg(tmp_path: Path, *extra: str):
    return load_config("demo", overrides=[
        "trainer.total_steps=4", "trainer.progress_bar=false", f"trainer.output_dir={tmp_path / 'out'}",
        "data.prompts_per_rollout=2", "data.responses_per_prompt=4", "trainer.summary_window=2",
        "experiment_tracking.enabled=false", "memory_optimization.profiling.enabled=false", *extra])


def _params(trainer):
    return [p.detach().clone() for p in trainer.policy.parameters()]


def test_resume_continues_identically(tmp_path):
    extra = ["actor.kl.constraint_optimization.enabled=true", "trainer.update_epochs=2"]
    straight = PPOTrainer(_cfg(tmp_path / "a", *extra))
    res_a = straight.train()

    first = PPOTrainer(_cfg(tmp_path / "b", *extra, "trainer.total_steps=2"))
    first.train()
    resumed = PPOTrainer(_cfg(tmp_path / "b", *extra, "trainer.resume_from=auto"))
    assert resumed.step == 2
    res_b = resumed.train()
    assert straight.history == resumed.history
    for p, q in zip(_params(straight), _params(resumed), strict=True):
        assert torch.equal(p, q)
    assert straight.kl_state == resumed.kl_state
    assert straight.lagrangian_state == resumed.lagrangian_state
    assert res_a["reward_end"] == res_b["reward_end"]


def test_smoke_run_with_tracking_profile_and_checkpoint(tmp_path):
    db = tmp_path / "mlruns.db"
    prof = tmp_path / "memory_profile.json"
    cfg = _cfg(tmp_path, "trainer.total_steps=3", "experiment_tracking.enabled=true",
               f"experiment_tracking.tracking_uri=sqlite:///{db}", "experiment_tracking.log_models=false",
               "experiment_tracking.log_system_metrics=false",
               "memory_optimization.profiling.enabled=true", f"memory_optimization.profiling.save_path={prof}",
               "memory_optimization.enable_gradient_checkpointing=true")
    res = PPOTrainer(cfg).train()
    assert res["steps"] == 3.0 and 0.0 <= res["reward_end"] <= 1.0
    assert db.exists() and prof.exists()
    regions = {r["name"] for r in json.loads(prof.read_text())["regions"]}
    assert {"training", "rollout", "update"} <= regions
    assert (Path(res["checkpoint"]) / "state.pt").exists()
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    hist = client.get_metric_history(res["mlflow_run_id"], "reward")
    assert [m.step for m in hist][:3] == [1, 2, 3]


@pytest.mark.parametrize("kl_type", ["loss", "reward"])
def test_controllers_step_once_per_iteration_whatever_update_epochs(tmp_path, kl_type):
    """update_epochs=2, 3 iterations: every controller has taken 3 steps, for both KL placements."""
    cfg = _cfg(tmp_path, "trainer.total_steps=3", "trainer.update_epochs=2", f"trainer.kl_type={kl_type}",
               "actor.kl.constraint_optimization.enabled=true")
    trainer = PPOTrainer(cfg)
    trainer.train()
    assert trainer.kl_state.count == 3
    assert trainer.lagrangian_state.count == 3


@pytest.mark.parametrize("extra", [
    ["adv.estimator=gae"],
    ["adv.estimator=vtrace"],
    ["adv.estimator=clipped_is"],  # critic.enabled: null -> on, from the registry's needs_values
    ["adv.estimator=rloo", "trainer.kl_type=reward", "actor.kl.adaptive_kl.enabled=false", "actor.kl.coef=0.05"],
    ["adv.estimator=reinforce", "trainer.kl_type=reward", "trainer.kl_estimator=k1"],
    ["multi_objective.enabled=true", "multi_objective.pareto_method=tchebycheff", "trainer.micro_batch_size=3"],
    ["model.arch=gpt2", "trainer.dual_clip=3.0", "trainer.agg_mode=seq-mean-token-sum-norm"],
])
def test_trainer_variants_run(tmp_path, extra):
    trainer = PPOTrainer(_cfg(tmp_path, "trainer.total_steps=2", *extra))
    res = trainer.train()
    assert res["steps"] == 2.0
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())
    if {"adv.estimator=gae", "adv.estimator=vtrace", "adv.estimator=clipped_is"} & set(extra):
        assert trainer.critic is not None and "critic/loss" in res


def test_multi_objective_loss_is_weighted_at_the_measured_point_and_logs_its_weights(tmp_path):
    # The Tchebycheff arm sat at chance while its weights were evaluated at the surrogates' values
    # (the reward surrogate is ~0 on-policy). The trainer now measures the objective point from the
    # rollout and logs the loss's gradient weight on each objective per step.
    trainer = PPOTrainer(_cfg(tmp_path, "trainer.total_steps=1", "multi_objective.enabled=true",
                              "multi_objective.pareto_method=tchebycheff"))
    exp = trainer.make_experience()
    point = trainer.objective_point(exp)
    assert point["reward"] == pytest.approx(float(exp["scores"].mean()))
    m = exp["response_mask"]
    assert point["kl_penalty"] == pytest.approx(-max(float(exp["kl"].sum() / m.sum()), 0.0))
    assert point["entropy"] == pytest.approx(float((exp["entropy"] * m).sum() / m.sum()), rel=1e-6)
    metrics = trainer.train_iteration()
    assert {"pareto_weight_reward", "pareto_weight_kl_penalty", "pareto_weight_entropy"} <= set(metrics)


@pytest.mark.slow
def test_trainer_learns_repeat_task(tmp_path):
    """The easiest task variant learns within a few dozen steps (chance is 1/16)."""
    cfg = _cfg(tmp_path, "trainer.total_steps=60", "task.mode=repeat", "task.n_digits=2",
               "data.prompts_per_rollout=8", "data.responses_per_prompt=8", "trainer.summary_window=10",
               "actor.lr=3e-3")
    res = PPOTrainer(cfg).train()
    assert res["reward_end"] > 2 * res["chance_reward"]
    assert res["reward_end"] > res["reward_start"] + 0.1


def test_docs_user_loop_runs():
    """The 'Your own loop' example of docs/training.md runs as written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    code = text.split("### Your own loop")[1].split("```python")[1].split("```")[0]
    scope: dict = {}
    exec(compile(code, "docs/training.md", "exec"), scope)
    assert scope["kl_state"].count == 30
    assert 0.0 <= float(scope["scores"].mean()) <= 1.0


def test_hydra_entry_point_with_overrides(tmp_path):
    """`python -m rl2fx.train --config-name demo key=value ...` trains and prints the summary."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "rl2fx.train", "--config-name", "demo", "trainer.total_steps=2",
           f"trainer.output_dir={tmp_path}", "experiment_tracking.enabled=false",
           "memory_optimization.profiling.enabled=false", "actor.kl.adaptive_kl.controller_type=pid"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rl2fx training summary" in proc.stdout and "steps: 2" in proc.stdout
    assert not (tmp_path / ".hydra").exists()  # hydra writes nothing of its own
    bad = subprocess.run(cmd[:5] + ["adv.estimator=vtrce"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "did you mean 'vtrace'" in bad.stderr
    typo = subprocess.run(cmd[:5] + ["actor.lrr=0.1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert typo.returncode == 2 and "did you mean 'actor.lr'?" in typo.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trainer_on_cuda(tmp_path):
    trainer = PPOTrainer(_cfg(tmp_path, "trainer.total_steps=2", "trainer.device=cuda",
                              "memory_optimization.enable_mixed_precision=true", "adv.estimator=gae"))
    res = trainer.train()
    assert res["steps"] == 2.0 and next(trainer.policy.parameters()).is_cuda
