"""W&B in offline mode: the run directory the tracker leaves behind, decoded record by record.

W&B writes an offline run as ``wandb/offline-run-<time>-<id>/run-<id>.wandb``: a
LevelDB-style log (32 KiB blocks of length-prefixed chunks) of ``wandb_internal_pb2.Record``
protobufs, which ``wandb sync`` later uploads. The reader below decodes that format
independently of the tracker, so the tests check what would actually be synced.
"""

import json
import struct
import time
import zlib  # noqa: F401  (crc is not verified: the records' protobuf parse is the check)
from pathlib import Path

import pytest
import torch

from rl2fx.tracking.config import ExperimentConfig
from rl2fx.tracking.tracker import ExperimentTracker

_BLOCK = 32768


def _records(path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # block trailer too short for a header: padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # FULL
            out.append(chunk)
        elif kind == 2:  # FIRST
            buf = chunk
        elif kind == 3:  # MIDDLE
            buf += chunk
        elif kind == 4:  # LAST
            out.append(buf + chunk)
    recs = []
    for raw in out:
        r = pb.Record()
        r.ParseFromString(raw)
        recs.append(r)
    return recs


def _decode(run_dir, timeout=60.0):
    """Records of an offline run, once W&B's writer (a separate wandb-core process) has
    flushed them through the final exit record; it can lag run.finish() by a moment."""
    (f,) = list(Path(run_dir).glob("run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        recs = _records(f)
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    by = {}
    for r in recs:
        by.setdefault(r.WhichOneof("record_type"), []).append(r)
    history = [{it.nested_key[0] if it.nested_key else it.key: json.loads(it.value_json)
                for it in r.history.item} for r in by.get("history", [])]
    config = {}
    for r in by.get("run", []) + by.get("config", []):
        cfg = r.run.config if r.HasField("run") else r.config
        for u in cfg.update:
            config[u.key] = json.loads(u.value_json)
    return by, history, config


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def test_offline_run_directory_contents(wandb_env, tmp_path):
    """Read back from the offline .wandb file: project, run name and tags; history rows with
    every metric and its global_step (including a step logged out of order); the flattened
    params in the run config; a file artifact and a model artifact (type, name, step alias);
    and a clean exit."""
    (tmp_path / "notes.txt").write_text("hello")
    cfg = ExperimentConfig(experiment_name="wb_exp", enable_mlflow=False, wandb_dir=str(tmp_path),
                           log_system_metrics=False, tags={"algo": "ppo"}, run_name="wb-run",
                           buffer_dir=str(tmp_path / "buf"))
    assert cfg.resolved_wandb_mode() == "offline"
    with ExperimentTracker(cfg) as t:
        for step in (1, 2, 3):
            t.log_metrics({"reward": step * 0.5, "kl_div": 0.01 * step}, step=step)
        t.log_metrics({"late": 7.0}, step=2)  # W&B would drop this with its own step counter
        t.log_params({"actor": {"lr": 1e-6}, "adv": {"gamma": 0.99}})
        t.set_tags({"phase": "test"})
        t.log_artifact(tmp_path / "notes.txt")
        t.log_model(torch.nn.Linear(2, 1), "ppo actor", step=3)
        run_dir = Path(t.wandb_run.settings.sync_dir)
    assert run_dir.name.startswith("offline-run-") and run_dir.parent == tmp_path / "wandb"
    by, history, config = _decode(run_dir)

    run = by["run"][0]  # later run records are updates (the tags set after init)
    assert run.run.project == "wb_exp" and run.run.display_name == "wb-run"
    assert "algo:ppo" in run.run.tags
    rows = [(h.get("global_step"), h.get("reward"), h.get("kl_div"), h.get("late")) for h in history]
    assert rows == [(1, 0.5, 0.01, None), (2, 1.0, 0.02, None), (3, 1.5, 0.03, None), (2, None, None, 7.0)]
    assert config["actor.lr"] == 1e-6 and config["adv.gamma"] == 0.99
    arts = {(a.artifact.type, a.artifact.name): a.artifact for a in by["artifact"]}
    assert ("file", "notes.txt") in arts and ("model", "ppo-actor") in arts
    model_art = arts[("model", "ppo-actor")]
    assert "step-3" in list(model_art.aliases)
    paths = {e.path for e in model_art.manifest.contents}
    assert "MLmodel" in paths and "data/model.pth" in paths
    (exit_rec,) = by["exit"]
    assert exit_rec.exit.exit_code == 0
    # tags set after init arrive as a run update record
    assert any(set(r.run.tags) == {"algo:ppo", "phase:test"} for r in by["run"][1:])


def test_wandb_failure_buffers_then_replays(wandb_env, tmp_path):
    """W&B cannot create its directory (a file is in the way, like a full or read-only disk):
    training goes on, one warning, records buffered; once the path is usable, replay creates
    the run and writes every buffered metric in order. Read back: the offline run's history."""
    blocker = tmp_path / "wb"
    blocker.write_text("not a directory")
    cfg = ExperimentConfig(experiment_name="wb_fail", enable_mlflow=False, wandb_dir=str(blocker),
                           log_system_metrics=False, retry_interval=3600,
                           buffer_dir=str(tmp_path / "buf"))
    with pytest.warns(Warning, match="wandb failed on 'start'"):
        t = ExperimentTracker(cfg)
    for step in range(4):
        t.log_metrics({"reward": float(step)}, step=step)
    t.log_params({"lr": 0.1})
    assert t.down_backends == ["wandb"]
    assert [r["op"] for r in t.buffered()] == ["start"] + ["metrics"] * 4 + ["params"]
    blocker.unlink()
    assert t.replay() == 6
    assert t.down_backends == [] and t.buffered() == [] and not t.buffer_path.exists()
    t.log_metrics({"reward": 9.0}, step=9)  # straight to W&B again
    t.finish()
    (run_dir,) = list((blocker / "wandb").glob("offline-run-*"))
    _, history, config = _decode(run_dir)
    assert [(h["global_step"], h["reward"]) for h in history] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (9, 9.0)]
    assert config["lr"] == 0.1


def test_wandb_disabled_mode_starts_nothing(wandb_env, tmp_path):
    t = ExperimentTracker(ExperimentConfig(enable_mlflow=False, wandb_mode="disabled",
                                           wandb_dir=str(tmp_path), log_system_metrics=False))
    assert t.wandb_run is None
    t.log_metrics({"a": 1.0}, step=0)
    t.finish()
    assert not (tmp_path / "wandb").exists()
