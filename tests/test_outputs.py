"""Everything a training run writes goes under ``trainer.output_dir``; nothing lands in the working
directory or the repository (MLflow store and artifacts, memory profile, W&B folder, checkpoints)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rl2fx.trainer.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv"}  # git's own bookkeeping; the virtual environment (large, never written by a run)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (path -> (size, mtime_ns)): a new, changed or removed file shows up."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
        for f in files:
            p = Path(d, f)
            try:
                st = p.lstat()
            except FileNotFoundError:  # removed while walking
                continue
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _diff(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def test_output_dir_override_moves_every_default_path():
    cfg = load_config("demo", overrides=["trainer.output_dir=/data/run7"])
    assert cfg.memory_optimization.profiling.save_path == "/data/run7/memory_profile.json"
    assert cfg.experiment_tracking.tracking_uri == "sqlite:////data/run7/mlruns.db"
    assert cfg.experiment_tracking.wandb_dir == "/data/run7"
    # the packaged defaults: relative to the working directory, like output_dir itself
    ppo = load_config()
    assert ppo.memory_optimization.profiling.save_path == "outputs/rl2fx/memory_profile.json"
    assert ppo.experiment_tracking.tracking_uri == "sqlite:///outputs/rl2fx/mlruns.db"
    # an explicit value still wins
    own = load_config("demo", overrides=["experiment_tracking.tracking_uri=sqlite:////elsewhere/x.db"])
    assert own.experiment_tracking.tracking_uri == "sqlite:////elsewhere/x.db"


@pytest.mark.parametrize("entry, where", [
    (["-m", "rl2fx.cli", "train", "--config", "demo"], "repo"),
    (["-m", "rl2fx.train", "--config-name", "demo"], "other"),  # Hydra's entry point
    (["-m", "rl2fx.cli", "train", "--config", "demo", "experiment_tracking.enable_wandb=true"], "other"),
], ids=["rl2fx-train-cwd-repo", "hydra-cwd-other", "rl2fx-train-wandb-cwd-other"])
def test_a_run_writes_only_under_output_dir(tmp_path, entry, where):
    out = tmp_path / "out"
    cwd = ROOT if where == "repo" else tmp_path / "other"
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1",  # the interpreter's own .pyc files are not the run's output
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for var in ("MLFLOW_TRACKING_URI", "WANDB_DIR"):
        env.pop(var, None)
    repo_before, cwd_before = _snapshot(ROOT), _snapshot(cwd)
    r = subprocess.run([sys.executable, *entry, "trainer.total_steps=2", f"trainer.output_dir={out}",
                        "trainer.progress_bar=false", "data.prompts_per_rollout=2", "data.responses_per_prompt=4"],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _diff(repo_before, _snapshot(ROOT)) == []
    assert _diff(cwd_before, _snapshot(cwd)) == []
    written = {p.relative_to(out).parts[0] for p in out.rglob("*")}
    assert {"mlruns.db", "mlartifacts", "memory_profile.json", "checkpoints", "final_model"} <= written, written
    assert ("wandb" in written) == ("experiment_tracking.enable_wandb=true" in entry)
    assert str(out / "mlruns.db") in r.stdout and str(out / "memory_profile.json") in r.stdout


def test_tune_trials_track_into_the_base_output_dir(tmp_path, monkeypatch):
    """Each trial trains in a temporary folder, but its tracking goes to the one store the base config
    derives from its own trainer.output_dir (not to the deleted folder, not to the working directory)."""
    import mlflow

    from rl2fx.trainer.tune import tune_from_config
    from rl2fx.tuning.space import HyperparameterConfig

    cwd = tmp_path / "other"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    base = tmp_path / "base"
    cfg = load_config("demo", overrides={
        "trainer.output_dir": str(base), "trainer.total_steps": 2, "trainer.progress_bar": False,
        "data.prompts_per_rollout": 2, "data.responses_per_prompt": 4, "memory_optimization.profiling.enabled": False,
        "experiment_tracking.log_models": False, "experiment_tracking.log_system_metrics": False,
        "hyperopt.optimizer_type": "grid", "hyperopt.grid.grid_size": 2, "hyperopt.n_trials": 2,
        "hyperopt.save_dir": str(tmp_path / "study")})
    tune_from_config(cfg, param_configs=[HyperparameterConfig("actor.clip", "float", low=0.1, high=0.3)],
                     show_progress_bar=False, verbose=False)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{base / 'mlruns.db'}")
    exp = client.get_experiment_by_name("rl2fx_demo")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(float(r.data.params["actor.clip"]) for r in runs) == [0.1, 0.3]
    assert list(cwd.iterdir()) == []
