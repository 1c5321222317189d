"""PPOTrainer <-> tracking wiring: buffer under output_dir, run id through checkpoints, flush before
each checkpoint, a crash ends the run FAILED, ${oc.env:...} values never logged; `rl2fx tracking replay`."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

import rl2fx.trainer.ppo as ppo
from rl2fx.cli import main
from rl2fx.trainer.config import load_config
from rl2fx.trainer.ppo import PPOTrainer


def _cfg(tmp_path, *extra):
    return load_config("demo", overrides=(
        f"trainer.output_dir={tmp_path / 'out'}", "trainer.total_steps=2", "trainer.save_interval=1",
        "trainer.progress_bar=false", "data.prompts_per_rollout=2", "data.responses_per_prompt=2",
        "memory_optimization.profiling.enabled=false", "experiment_tracking.enabled=true",
        "experiment_tracking.enable_wandb=false", f"experiment_tracking.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
        "experiment_tracking.log_models=false", "experiment_tracking.log_artifacts=false",
        "experiment_tracking.log_system_metrics=false", *extra))


def _client(tmp_path):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")


def test_buffer_under_output_dir_run_id_in_checkpoint_and_resume_continues_the_run(tmp_path, monkeypatch):
    seen = []
    real = ppo.ExperimentConfig.from_dict
    monkeypatch.setattr(ppo.ExperimentConfig, "from_dict", staticmethod(lambda d: seen.append(dict(d)) or real(d)))
    first = PPOTrainer(_cfg(tmp_path)).train()
    seen[:] = [d for d in seen if "buffer_dir" in d]  # the start-up path check reads the section too
    assert seen[0]["buffer_dir"] == str(tmp_path / "out" / "tracking_buffer") and "run_id" not in seen[0]
    state = torch.load(first["checkpoint"] + "/state.pt", weights_only=True)
    assert state["mlflow_run_id"] == first["mlflow_run_id"]

    resumed = PPOTrainer(_cfg(tmp_path, "trainer.total_steps=4", "trainer.resume_from=auto"))
    second = resumed.train()
    seen[:] = [d for d in seen if "buffer_dir" in d]
    assert seen[-1]["run_id"] == first["mlflow_run_id"]
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    client = _client(tmp_path)
    steps = sorted({m.step for m in client.get_metric_history(first["mlflow_run_id"], "reward")})
    assert steps[:4] == [1, 2, 3, 4]
    run = client.get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.total_steps"] == "2" and run.data.tags["resumed.trainer.total_steps"] == "4"


def test_tracker_is_flushed_before_each_checkpoint(tmp_path, monkeypatch):
    from rl2fx.tracking.tracker import ExperimentTracker

    events = []
    real_flush, real_save = ExperimentTracker.flush, ppo._save_atomic
    monkeypatch.setattr(ExperimentTracker, "flush", lambda self: events.append("flush") or real_flush(self))
    monkeypatch.setattr(ppo, "_save_atomic", lambda obj, f, tr: events.append(f.name) or real_save(obj, f, tr))
    PPOTrainer(_cfg(tmp_path, "trainer.total_steps=3")).train()
    saves = [i for i, e in enumerate(events) if e.startswith("rng_rank")]
    assert len(saves) == 3  # steps 1 and 2 (save_interval=1) and the final one at 3
    assert all(events[i - 1] == "flush" for i in saves)


def test_crash_ends_the_run_failed(tmp_path, monkeypatch):
    real = PPOTrainer.train_iteration

    def boom(self):
        if self.step == 1:
            raise RuntimeError("boom")
        return real(self)

    monkeypatch.setattr(PPOTrainer, "train_iteration", boom)
    t = PPOTrainer(_cfg(tmp_path))
    with pytest.raises(RuntimeError, match="boom"):
        t.train()
    runs = _client(tmp_path).search_runs(
        [e.experiment_id for e in _client(tmp_path).search_experiments()])
    assert runs and all(r.info.status == "FAILED" for r in runs)


def test_env_interpolations_are_not_logged_as_params(tmp_path, monkeypatch):
    monkeypatch.setenv("RL2FX_TEST_SECRET", "s3cr3t-t0ken")
    res = PPOTrainer(_cfg(tmp_path, "experiment_tracking.experiment_name=${oc.env:RL2FX_TEST_SECRET}")).train()
    params = _client(tmp_path).get_run(res["mlflow_run_id"]).data.params
    assert params["experiment_tracking.experiment_name"] == "${oc.env:RL2FX_TEST_SECRET}"
    assert not any("s3cr3t-t0ken" in v for v in params.values())


def test_loggable_params_masks_indirect_uses(monkeypatch):
    monkeypatch.setenv("RL2FX_TEST_SECRET", "s3cr3t-t0ken")
    cfg = OmegaConf.create({"a": "${oc.env:RL2FX_TEST_SECRET}", "b": "${a}", "c": "Bearer ${a}",
                            "d": {"e": 3, "f": "plain"}, "g": "s3cr3t-t0ken", "h": ["${a}", 1]})
    out = ppo._loggable_params(cfg)
    assert out == {"a": "${oc.env:RL2FX_TEST_SECRET}", "b": "${a}", "c": "Bearer ${a}",
                   "d": {"e": 3, "f": "plain"}, "g": "***", "h": ["${a}", 1]}


def test_cli_tracking_replay_calls_replay_buffer(tmp_path, monkeypatch, capsys):
    import rl2fx.tracking

    calls = []
    monkeypatch.setattr(rl2fx.tracking, "replay_buffer", lambda p, tracking_uri=None: calls.append((p, tracking_uri)) or 7)
    buf = tmp_path / "tracking_buffer"
    buf.mkdir()
    assert main(["tracking", "replay", str(buf), "--tracking-uri", "sqlite:///x.db"]) == 0
    assert calls == [(buf, "sqlite:///x.db")]
    assert "replayed 7 record(s)" in capsys.readouterr().out
    assert main(["tracking", "replay", str(tmp_path / "missing")]) == 2
    assert "no tracking buffer" in capsys.readouterr().err


def test_cli_tracking_replay_of_an_empty_dir(tmp_path, capsys):
    assert main(["tracking", "replay", str(tmp_path)]) == 0
    assert "replayed 0 record(s)" in capsys.readouterr().out
