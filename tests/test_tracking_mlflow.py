"""The tracker and the registry against a real MLflow SQLite store, read back with MlflowClient.

One store per module (MLflow runs its schema migrations on first use). What each test
reads back from MLflow is stated in its docstring.
"""

import math
import os
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from omegaconf import OmegaConf

from rl2fx.tracking.config import ExperimentConfig
from rl2fx.tracking.tracker import ExperimentTracker
from rl2fx.tracking.versioning import ModelVersioning


class _Tiny(torch.nn.Module):
    def __init__(self, hidden=4):
        super().__init__()
        self.l1 = torch.nn.Linear(3, hidden)
        self.l2 = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_store")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    MlflowClient(uri).search_experiments()  # run the migrations once for the module
    return root, uri


def _cfg(store, name, **kw):
    root, uri = store
    kw.setdefault("log_system_metrics", False)
    return ExperimentConfig(experiment_name=name, tracking_uri=uri, enable_wandb=False,
                            buffer_dir=str(root / "buffer"), **kw)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_spec_snippet_runs_as_written(tmp_path, monkeypatch):
    """The spec's "Usage in Code" block with imports from rl2fx, in a fresh working dir.

    Read back: the default store ./mlruns.db (experiment RL2_PPO_Experiment, metrics reward
    and kl_div at step 100, a logged model ppo_actor linked at step 100), registry version
    1 of ppo_actor with semver 1.0.0 and description "Best model", and a W&B offline run
    directory holding the metrics.
    """
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "WANDB_MODE", "WANDB_API_KEY",
                "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # no W&B login: must go offline
    model = _Tiny()

    # --- the spec's snippet, with RL2.experiment_tracking -> rl2fx ---
    from rl2fx import ExperimentConfig, ExperimentTracker, ModelVersioning

    # Create tracker
    config = ExperimentConfig(
        experiment_name="RL2_PPO_Experiment",
        enable_mlflow=True,
        enable_wandb=True
    )

    tracker = ExperimentTracker(config)

    # Log metrics
    tracker.log_metrics({"reward": 0.5, "kl_div": 0.01}, step=100)

    # Log model
    tracker.log_model(model, "ppo_actor", step=100)

    # Model versioning
    versioning = ModelVersioning(tracker)
    version = versioning.register_model(model, "ppo_actor", description="Best model")
    # --- end of snippet ---
    tracker.finish()

    assert version == "1.0.0"
    assert (tmp_path / "mlruns.db").exists()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    exp = client.get_experiment_by_name("RL2_PPO_Experiment")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    # the background sampler may have added system/ metrics (every 10 s by default)
    assert {k: v for k, v in run.data.metrics.items() if not k.startswith("system/")} == {
        "reward": 0.5, "kl_div": 0.01}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward")] == [100]
    outputs = run.outputs.model_outputs
    assert len(outputs) == 2 and {o.step for o in outputs} == {100}  # log_model + register_model
    assert client.get_logged_model(outputs[0].model_id).name == "ppo_actor"
    mv = client.get_model_version("ppo_actor", "1")
    assert mv.tags["semver"] == "1.0.0" and mv.description == "Best model"
    assert mv.run_id == run.info.run_id
    (wandb_file,) = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert b"reward" in wandb_file.read_bytes() and b"kl_div" in wandb_file.read_bytes()


def test_metrics_params_tags_artifacts_read_back(store, tmp_path):
    """Read back: metric histories (values, steps, original timestamps), flattened params from
    an OmegaConf config, tags, a file artifact, a directory artifact and config/config.yaml."""
    cfg = OmegaConf.create({"actor": {"lr": 1e-6, "kl": {"coef": 0.0}}, "adv": {"gamma": 0.99,
                            "lamda": "${adv.gamma}"}, "multi_objective": {"objectives": ["reward", "kl"]}})
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "mem.json").write_text('{"peak": 1}')
    with ExperimentTracker(_cfg(store, "io", tags={"algo": "ppo"}, run_name="io-run")) as t:
        for step in range(5):
            t.log_metrics({"reward": step / 10, "kl_div": torch.tensor(0.01 * step)}, step=step)
        t.log_config(cfg)
        t.set_tags({"phase": "test"})
        t.log_artifact(tmp_path / "notes.txt")
        t.log_artifact(tmp_path / "profile", artifact_path="profiles")
        run_id = t.mlflow_run_id
    client = MlflowClient(store[1])
    run = client.get_run(run_id)
    assert run.info.run_name == "io-run" and run.info.status == "FINISHED"
    hist = client.get_metric_history(run_id, "reward")
    assert [(m.step, m.value) for m in hist] == [(s, s / 10) for s in range(5)]
    assert all(a.timestamp <= b.timestamp for a, b in zip(hist, hist[1:], strict=False))
    kl = client.get_metric_history(run_id, "kl_div")
    assert [round(m.value, 6) for m in kl] == [round(0.01 * s, 6) for s in range(5)]
    assert run.data.params == {"actor.lr": "1e-06", "actor.kl.coef": "0.0", "adv.gamma": "0.99",
                               "adv.lamda": "0.99", "multi_objective.objectives": '["reward", "kl"]'}
    assert run.data.tags["algo"] == "ppo" and run.data.tags["phase"] == "test"
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {"notes.txt", "profiles", "config"}
    assert Path(download_artifacts(run_id=run_id, artifact_path="notes.txt",
                                   tracking_uri=store[1], dst_path=str(tmp_path / "dl"))).read_text() == "hello"
    prof = download_artifacts(run_id=run_id, artifact_path="profiles/mem.json", tracking_uri=store[1],
                              dst_path=str(tmp_path / "dl2"))
    assert Path(prof).read_text() == '{"peak": 1}'
    y = download_artifacts(run_id=run_id, artifact_path="config/config.yaml", tracking_uri=store[1],
                           dst_path=str(tmp_path / "dl3"))
    assert OmegaConf.to_container(OmegaConf.load(y)) == OmegaConf.to_container(cfg, resolve=True)


def test_failed_run_status_and_system_metrics(store):
    """Read back: status FAILED after an exception in the with-block (the exception propagates),
    and system/ metrics (CPU, memory, process RSS) logged at the training step."""
    with pytest.raises(RuntimeError, match="boom"):
        with ExperimentTracker(_cfg(store, "fail")) as t:
            t.log_metrics({"loss": 1.0}, step=7)
            t.log_system_metrics()
            run_id = t.mlflow_run_id
            raise RuntimeError("boom")
    client = MlflowClient(store[1])
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/process_memory_rss_megabytes"} <= set(run.data.metrics)
    assert client.get_metric_history(run_id, "system/cpu_utilization_percentage")[0].step == 7


def test_background_system_metrics_thread(store):
    """Read back: at least one sample written by the sampling thread (interval 0.05 s)."""
    t = ExperimentTracker(_cfg(store, "sys", log_system_metrics=True, system_metrics_interval=0.05))
    t.log_metrics({"loss": 1.0}, step=1)
    deadline = 0
    while "system/cpu_utilization_percentage" not in t.latest_metrics and deadline < 400:
        t._stop.wait(0.05)
        deadline += 1
    t.finish()
    assert not t._sampler_thread.is_alive()
    hist = MlflowClient(store[1]).get_metric_history(t.mlflow_run_id, "system/system_memory_usage_megabytes")
    assert hist and all(m.value > 0 for m in hist)


def test_log_model_roundtrip(store, tmp_path):
    """Read back: the LoggedModel (name, READY status, source run, step tag), the run's model
    output at the logged step, and the model itself, loaded with mlflow.pytorch, equal weights
    and outputs."""
    model = _Tiny()
    with ExperimentTracker(_cfg(store, "models")) as t:
        info = t.log_model(model, "ppo_actor", step=42)
        run_id = t.mlflow_run_id
    client = MlflowClient(store[1])
    lm = client.get_logged_model(info["model_id"])
    assert lm.name == "ppo_actor" and lm.source_run_id == run_id
    assert str(lm.status) in ("READY", "LoggedModelStatus.READY") or lm.status.to_proto() == 2
    assert lm.tags["rl2fx.step"] == "42"
    outs = client.get_run(run_id).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outs] == [(info["model_id"], 42)]
    local = download_artifacts(artifact_uri=lm.artifact_location, tracking_uri=store[1],
                               dst_path=str(tmp_path / "m"))
    loaded = mlflow.pytorch.load_model(local)
    assert _same_weights(model, loaded)
    x = torch.randn(5, 3)
    assert torch.equal(model(x), loaded(x))


def test_log_models_off_and_artifacts_off(store, tmp_path):
    """Read back: nothing uploaded when log_models/log_artifacts are False."""
    (tmp_path / "a.txt").write_text("x")
    with ExperimentTracker(_cfg(store, "off", log_models=False, log_artifacts=False)) as t:
        assert t.log_model(_Tiny(), "m", step=1) is None
        t.log_artifact(tmp_path / "a.txt")
        run_id = t.mlflow_run_id
    client = MlflowClient(store[1])
    assert client.list_artifacts(run_id) == []
    assert client.get_run(run_id).outputs.model_outputs == []


def test_registry_versions_aliases_load_compare(store):
    """Read back from the registry with MlflowClient: semver tags and bump reasons for
    patch / minor (config change) / major (architecture change) / forced bumps, the stage
    aliases after promote (moving production between versions), loads by stage and by
    version with equal weights, and the compare table's metric and param columns."""
    name = "actor_registry"
    model = _Tiny()
    t = ExperimentTracker(_cfg(store, "registry"))
    v = ModelVersioning(t)
    t.log_params({"lr": 1e-6})
    t.log_metrics({"reward": 0.1}, step=1)
    assert v.register_model(model, name, description="first") == "1.0.0"
    with torch.no_grad():
        model.l1.weight.add_(1.0)
    t.log_metrics({"reward": 0.3}, step=2)
    assert v.register_model(model, name) == "1.0.1"  # same architecture and config
    t.log_params({"kl_coef": 0.1})
    assert v.register_model(model, name) == "1.1.0"  # training config changed
    wide = _Tiny(hidden=8)
    assert v.register_model(wide, name) == "2.0.0"  # architecture changed
    assert v.register_model(wide, name, bump="minor") == "2.1.0"
    assert v.register_model(wide, name, bump="major", stage=None) == "3.0.0"
    with pytest.raises(ValueError, match="bump"):
        v.register_model(wide, name, bump="huge")

    client = MlflowClient(store[1])
    by_reg = {str(mv.version): mv for mv in client.search_model_versions(f"name = '{name}'")}
    assert sorted((int(k), m.tags["semver"]) for k, m in by_reg.items()) == [
        (1, "1.0.0"), (2, "1.0.1"), (3, "1.1.0"), (4, "2.0.0"), (5, "2.1.0"), (6, "3.0.0")]
    assert by_reg["3"].tags["rl2fx.bump"] == "minor: training config changed"
    assert by_reg["4"].tags["rl2fx.bump"] == "major: architecture changed"
    assert by_reg["1"].tags["metric.reward"] == "0.1" and by_reg["2"].tags["metric.reward"] == "0.3"
    # development follows the newest registration that asked for it
    assert str(client.get_model_version_by_alias(name, "development").version) == "5"

    v.promote(name, "1.0.0", "production")
    v.promote(name, "1.0.1", "staging")
    assert str(client.get_model_version_by_alias(name, "production").version) == "1"
    assert v.get(name, "production").version == "1.0.0"
    assert v.get(name, "staging").stage == "staging"
    v.promote(name, "1.0.1", "production")  # the alias moves: one version per stage
    assert str(client.get_model_version_by_alias(name, "production").version) == "2"
    assert "production" not in client.get_model_version(name, "1").aliases
    assert v.get(name).version == "3.0.0" and v.get(name, 4).version == "2.0.0"
    with pytest.raises(ValueError, match="9.9.9"):
        v.get(name, "9.9.9")
    with pytest.raises(ValueError, match="stage"):
        v.promote(name, "1.0.0", "prod")

    assert _same_weights(model, v.load(name, "production"))
    assert _same_weights(wide, v.load(name, "3.0.0"))

    table = v.compare(name, "1.0.0", "1.0.1")
    assert list(table.columns) == ["1.0.0", "1.0.1", "delta", "changed"]
    assert table.loc[("metric", "reward"), "1.0.0"] == 0.1
    assert table.loc[("metric", "reward"), "1.0.1"] == 0.3
    assert math.isclose(table.loc[("metric", "reward"), "delta"], 0.2)
    assert table.loc[("param", "lr"), "1.0.0"] == "1e-06"
    assert table.loc[("info", "registry_version"), "1.0.1"] == "2"
    assert bool(table.loc[("info", "stage"), "changed"])
    t.finish()


def test_registry_needs_mlflow():
    with pytest.raises(ValueError, match="enable_mlflow"):
        ModelVersioning(ExperimentTracker(ExperimentConfig(enable_mlflow=False, enable_wandb=False,
                                                           log_system_metrics=False)))


def test_down_server_buffers_in_order_and_warns_once(store, tmp_path, monkeypatch):
    """A tracking URI with nothing listening: the run start and every later call are buffered
    in order (artifact and model copied beside the buffer), exactly one warning is emitted,
    training code never sees an exception, and replay keeps everything while still down.
    Then replay_buffer (as another process would, after the tracker is gone) pushes the
    buffer to the module's SQLite store. Read back there: a FINISHED run in experiment
    "down" with the reward history 0-2, the param, the artifact's content and the model
    at step 2 (loaded back with equal weights)."""
    import socket

    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(var, raising=False)  # the tracker sets them; restored after the test
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connection refused
    (tmp_path / "a.txt").write_text("artifact")
    cfg = ExperimentConfig(experiment_name="down", tracking_uri=f"http://127.0.0.1:{port}",
                           enable_wandb=False, log_system_metrics=False, retry_interval=3600,
                           buffer_dir=str(tmp_path / "buf"), http_max_retries=0, http_timeout=2)
    with pytest.warns(Warning) as rec:
        t = ExperimentTracker(cfg)
        for step in range(3):
            t.log_metrics({"reward": float(step)}, step=step)
        t.log_params({"a": {"b": 1}})
        t.log_artifact(tmp_path / "a.txt")
        model = _Tiny()
        assert t.log_model(model, "m", step=2) is None
        (tmp_path / "a.txt").unlink()  # the buffered copy must not depend on the original
        assert t.replay() == 0
        t.finish()
    ours = [w for w in rec if "rl2fx tracking" in str(w.message)]
    assert len(ours) == 2  # one outage warning, one "still unreachable at finish"
    assert "mlflow failed on 'start'" in str(ours[0].message)
    ops = [r["op"] for r in t.buffered()]
    assert ops == ["start", "metrics", "metrics", "metrics", "params", "artifact", "model", "finish"]
    recs = t.buffered()
    assert [r["step"] for r in recs if r["op"] == "metrics"] == [0, 1, 2]
    assert Path(recs[5]["path"]).read_text() == "artifact"
    assert (Path(recs[6]["dir"]) / "MLmodel").exists()
    assert os.path.dirname(t.buffer_path) == str(tmp_path / "buf")

    from rl2fx.tracking.tracker import replay_buffer

    assert replay_buffer(t.buffer_path, tracking_uri=store[1]) == 8
    assert not t.buffer_path.exists()
    client = MlflowClient(store[1])
    (run,) = client.search_runs([client.get_experiment_by_name("down").experiment_id])
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward")] == [
        (0, 0.0), (1, 1.0), (2, 2.0)]
    assert run.data.params == {"a.b": "1"}
    got = download_artifacts(run_id=run.info.run_id, artifact_path="a.txt", tracking_uri=store[1],
                             dst_path=str(tmp_path / "dl"))
    assert Path(got).read_text() == "artifact"
    (out,) = run.outputs.model_outputs
    lm = client.get_logged_model(out.model_id)
    assert out.step == 2 and lm.name == "m"
    assert _same_weights(model, mlflow.pytorch.load_model(download_artifacts(
        artifact_uri=lm.artifact_location, tracking_uri=store[1])))


@pytest.mark.slow  # imports transformers (several seconds on a loaded 2-core machine)
def test_transformers_flavours(store, monkeypatch):
    """A tiny locally built GPT-2 (no hub download). Read back: with a tokenizer it is an
    MLflow transformers-flavour model registered as 1.0.0 and loaded back as a
    text-generation pipeline with equal weights; the bare model (no tokenizer) is a
    PyTorch-flavour logged model that loads back as the same GPT2LMHeadModel class."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, "a": 2, "b": 3, "c": 4}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=5, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    lm = transformers.GPT2LMHeadModel(cfg)
    with ExperimentTracker(_cfg(store, "hf")) as t:
        bare = t.log_model(lm, "hf_bare", step=1)
        version = ModelVersioning(t).register_model(lm, "hf_lm", tokenizer=tok, task="text-generation")
        pipe = ModelVersioning(t).load("hf_lm", version)
    assert bare["flavor"] == "pytorch" and version == "1.0.0"
    mv = MlflowClient(store[1]).get_model_version("hf_lm", "1")
    assert mv.tags["rl2fx.flavor"] == "transformers"
    assert isinstance(pipe, transformers.Pipeline) and _same_weights(lm, pipe.model)
    loaded = mlflow.pytorch.load_model(download_artifacts(artifact_uri=bare["artifact_location"],
                                                          tracking_uri=store[1]))
    assert type(loaded) is transformers.GPT2LMHeadModel and _same_weights(lm, loaded)
