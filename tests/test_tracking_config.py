"""ExperimentConfig resolution and validation, param flattening, input checks, rank gating.

No backend is started here (both disabled or the tracker inactive), so these run fast;
the real-backend tests are in test_tracking_mlflow.py, test_tracking_wandb.py and
test_tracking_server.py.
"""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

import rl2fx
from rl2fx.tracking.config import ExperimentConfig
from rl2fx.tracking.tracker import ExperimentTracker, flatten_params, global_rank

OFF = dict(enable_mlflow=False, enable_wandb=False, log_system_metrics=False)


def test_defaults_match_spec():
    c = rl2fx.ExperimentConfig()
    assert (c.experiment_name, c.enable_mlflow, c.enable_wandb, c.log_models, c.log_artifacts,
            c.log_system_metrics) == ("RL2_PPO_Experiment", True, True, True, True, True)
    assert c.tracking_uri is None and c.wandb_project is None and c.wandb_mode is None and c.tags is None


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    c = ExperimentConfig()
    assert c.resolved_tracking_uri() == f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert c.resolved_artifact_location() == str(tmp_path / "mlartifacts")
    assert c.resolved_registry_uri() == c.resolved_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert c.resolved_tracking_uri() == "http://127.0.0.1:5000"
    assert c.resolved_artifact_location() is None  # the server decides
    assert ExperimentConfig(tracking_uri="sqlite:///x.db").resolved_tracking_uri() == "sqlite:///x.db"


def test_wandb_mode_offline_without_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert ExperimentConfig().resolved_wandb_mode() == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert ExperimentConfig().resolved_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert ExperimentConfig().resolved_wandb_mode() == "disabled"
    assert ExperimentConfig(wandb_mode="offline").resolved_wandb_mode() == "offline"
    assert ExperimentConfig(experiment_name="e").resolved_wandb_project() in ("e", os.environ.get("WANDB_PROJECT"))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(wandb_mode="cloud"), "wandb_mode"),
        (dict(experiment_name=""), "experiment_name"),
        (dict(retry_interval=-1.0), "retry_interval"),
        (dict(system_metrics_interval=0.0), "system_metrics_interval"),
        (dict(http_max_retries=99), "http_max_retries"),
        (dict(tags=3), "tags"),
    ],
)
def test_invalid_config_names_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ExperimentConfig(**kwargs)


def test_from_spec_yaml_section():
    section = OmegaConf.create("""
experiment_tracking:
  enabled: true
  experiment_name: "RL2_PPO_Experiment"
  enable_mlflow: true
  enable_wandb: true
  log_models: true
  log_artifacts: true
  log_system_metrics: true
  model_versioning:
    enabled: false
    enable_auto_versioning: true
""").experiment_tracking
    c = ExperimentConfig.from_dict(section)
    assert c == ExperimentConfig(model_versioning=False, enable_auto_versioning=True)
    with pytest.raises(ValueError, match="enable_mlfow"):
        ExperimentConfig.from_dict({"enable_mlfow": True})
    with pytest.raises(ValueError, match="bogus"):
        ExperimentConfig.from_dict({"model_versioning": {"bogus": 1}})


def test_tags_forms():
    assert ExperimentConfig(tags={"algo": "ppo"}).tag_dict() == {"algo": "ppo"}
    assert ExperimentConfig(tags={"algo": "ppo"}).tag_list() == ["algo:ppo"]
    assert ExperimentConfig(tags=["baseline"]).tag_list() == ["baseline"]


# ---- flatten_params -----------------------------------------------------------------------

@dataclasses.dataclass
class _Opt:
    lr: float = 1e-6
    betas: tuple = (0.9, 0.95)


def test_flatten_omegaconf_dataclass_and_lists():
    cfg = OmegaConf.create({"actor": {"lr": 1e-6, "warm": "${actor.lr}"},
                            "multi_objective": {"objectives": ["reward", "kl_penalty"]},
                            "runs": [{"seed": 1}, {"seed": 2}], "empty": {}})
    flat = flatten_params(cfg)
    assert flat == {"actor.lr": "1e-06", "actor.warm": "1e-06",  # interpolation resolved
                    "multi_objective.objectives": '["reward", "kl_penalty"]',
                    "runs.0.seed": "1", "runs.1.seed": "2", "empty": "{}"}
    assert flatten_params({"opt": _Opt()}) == {"opt.lr": "1e-06", "opt.betas": "[0.9, 0.95]"}
    with pytest.raises(ValueError, match="params"):
        flatten_params([1, 2])


_leaf = st.one_of(st.integers(-10**6, 10**6), st.booleans(), st.text("abc", max_size=3),
                  st.floats(allow_nan=False, allow_infinity=False, width=32))
_key = st.text("abcxyz_", min_size=1, max_size=4)
_tree = st.recursive(_leaf, lambda ch: st.dictionaries(_key, ch, min_size=1, max_size=3), max_leaves=12)


def _unflatten(flat):
    out: dict = {}
    for k, v in flat.items():
        node = out
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return out


def _stringify(tree):
    return {k: _stringify(v) for k, v in tree.items()} if isinstance(tree, dict) else str(tree)


@given(st.dictionaries(_key, _tree, min_size=1, max_size=4))
def test_flatten_roundtrip_property(tree):
    """Dotted keys split back into the same tree of str(leaf) values."""
    assert _unflatten(flatten_params(tree)) == _stringify(tree)


# ---- tracker input checks without backends ------------------------------------------------

def test_metric_values_and_names(tmp_path):
    t = ExperimentTracker(ExperimentConfig(buffer_dir=str(tmp_path / "b"), **OFF))
    t.log_metrics({"a": torch.tensor(0.25), "b": np.float32(2.0), "c": True, "d": np.array([3.0])}, step=2)
    assert t.latest_metrics == {"a": 0.25, "b": 2.0, "c": 1.0, "d": 3.0}
    with pytest.raises(ValueError, match="'v'"):
        t.log_metrics({"v": torch.zeros(3)}, step=3)
    with pytest.raises(ValueError, match="'w'"):
        t.log_metrics({"w": "high"}, step=3)
    with pytest.raises(ValueError, match="bad!name"):
        t.log_metrics({"bad!name": 1.0}, step=3)
    with pytest.raises(ValueError, match="step"):
        t.log_metrics({"a": 1.0}, step=-1)
    t.log_metrics({"a": 1.0})  # step defaults to the last one
    assert t.last_step == 2
    with pytest.raises(FileNotFoundError, match="nope"):
        t.log_artifact(tmp_path / "nope.txt")
    t.finish()
    with pytest.raises(ValueError, match="status"):
        t.finish(status="DONE")


def test_params_are_immutable_within_a_run(tmp_path):
    t = ExperimentTracker(ExperimentConfig(buffer_dir=str(tmp_path / "b"), **OFF))
    t.log_params({"actor": {"lr": 1e-6}})
    t.log_params({"actor": {"lr": 1e-6}, "adv": {"gamma": 0.99}})  # same value again: fine
    assert t.params == {"actor.lr": "1e-06", "adv.gamma": "0.99"}
    with pytest.raises(ValueError, match="actor.lr"):
        t.log_params({"actor": {"lr": 2e-6}})
    with pytest.raises(ValueError, match="6000"):
        t.log_params({"long": "x" * 6001})
    t.finish()


def test_only_rank_zero_logs(monkeypatch, tmp_path):
    """A rank-1 tracker (RANK as set by torchrun) creates nothing and accepts every call."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "1")
    assert global_rank() == 1
    t = ExperimentTracker(ExperimentConfig())  # MLflow and W&B both enabled
    assert not t.active
    with t:
        t.log_metrics({"reward": 1.0}, step=1)
        t.log_params({"a": 1})
        t.log_model(torch.nn.Linear(1, 1), "m", step=1)
        t.log_artifact(__file__)
        assert t.replay() == 0
    assert list(Path(tmp_path).iterdir()) == []


def test_global_rank_from_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert global_rank() == 0
        assert ExperimentTracker(ExperimentConfig(buffer_dir=str(tmp_path), **OFF)).active
    finally:
        dist.destroy_process_group()


def test_system_metrics_sample(tmp_path):
    t = ExperimentTracker(ExperimentConfig(buffer_dir=str(tmp_path), **OFF))
    values = t.log_system_metrics(step=0)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/process_memory_rss_megabytes"} <= set(values)
    assert 0.0 <= values["system/system_memory_usage_percentage"] <= 100.0
    assert values["system/process_memory_rss_megabytes"] > 1.0
    t.finish()
    json.dumps(values)


def test_tracker_accepts_the_spec_section_directly(tmp_path):
    """The training code may pass cfg.experiment_tracking (an OmegaConf node) as the config."""
    section = OmegaConf.create({"enabled": True, "experiment_name": "x", "enable_mlflow": False,
                                "enable_wandb": False, "log_system_metrics": False,
                                "tags": ["a", "b"], "buffer_dir": str(tmp_path),
                                "model_versioning": {"enabled": True}})
    t = ExperimentTracker(section)
    assert t.config.tags == ["a", "b"] and t.config.model_versioning and t.active
    t.finish()
    assert not ExperimentTracker(OmegaConf.create({"enabled": False})).active


@pytest.mark.cuda
def test_system_metrics_include_gpu(tmp_path):
    """With a GPU: MLflow's GPUMonitor (nvidia-ml-py) or torch's CUDA memory counters."""
    x = torch.ones(1024, 1024, device="cuda")
    t = ExperimentTracker(ExperimentConfig(buffer_dir=str(tmp_path), **OFF))
    values = t.log_system_metrics(step=0)
    t.finish()
    assert any(k.startswith("system/gpu_0_") for k in values), sorted(values)
    del x
