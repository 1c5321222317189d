"""A real ``mlflow server`` on 127.0.0.1, stopped in the middle of a run and started again.

The tracker logs over HTTP; while the server is down every call goes to the local
JSON-lines buffer (one warning); after the restart ``replay()`` pushes it and the run
read back through the server holds everything, in order, as if nothing had happened.
The server listens on the loopback interface only, on a free port.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from rl2fx.tracking.config import ExperimentConfig
from rl2fx.tracking.tracker import ExperimentTracker
from rl2fx.tracking.versioning import ModelVersioning

# Two server start-ups (MLflow migrations, uvicorn): ~35 s on a quiet 2-core machine, minutes
# on the shared one, so it is kept out of the default profile.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout=120.0):
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self._log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("mlflow server exited:\n" + (self.root / "server.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not come up:\n" + (self.root / "server.log").read_text()[-3000:])

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        self._log.close()


@pytest.fixture
def server(tmp_path):
    s = _Server(tmp_path, _free_port())
    s.start()
    yield s
    s.stop()


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.l(x)


def test_server_outage_buffer_and_replay(server, tmp_path, monkeypatch):
    """Read back through the restarted server with MlflowClient: the reward history for
    steps 0-10 (5-9 logged while the server was down) with their original timestamps order,
    params from before and during the outage, tags, both artifacts' contents, the three
    logged models at their steps, the registry version 1.0.0 with its development alias
    (loaded back through the server's artifact proxy with equal weights), status FINISHED."""
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(var, raising=False)  # restored after the test
    (tmp_path / "before.txt").write_text("before")
    (tmp_path / "during.txt").write_text("during")
    model = _Tiny()
    cfg = ExperimentConfig(experiment_name="server_outage", tracking_uri=server.uri, enable_wandb=False,
                           log_system_metrics=False, retry_interval=3600, http_max_retries=0,
                           http_timeout=5, buffer_dir=str(tmp_path / "buffer"))
    t = ExperimentTracker(cfg)
    assert t.down_backends == []
    t.log_params({"actor": {"lr": 1e-6}})
    for step in range(5):
        t.log_metrics({"reward": step / 10}, step=step)
    t.log_artifact(tmp_path / "before.txt")
    assert t.log_model(model, "actor", step=2) is not None

    server.stop()
    with pytest.warns(Warning) as caught:
        for step in range(5, 10):
            t.log_metrics({"reward": step / 10}, step=step)
        t.log_params({"adv": {"gamma": 0.99}})
        t.set_tags({"phase": "outage"})
        t.log_artifact(tmp_path / "during.txt")
        assert t.log_model(model, "actor", step=9) is None  # buffered, not lost
    ours = [w for w in caught if "rl2fx tracking" in str(w.message)]
    assert len(ours) == 1 and "mlflow failed on 'metrics'" in str(ours[0].message)
    assert t.down_backends == ["mlflow"]
    assert [r["op"] for r in t.buffered()] == ["metrics"] * 5 + ["params", "tags", "artifact", "model"]

    server.start()
    assert t.replay() == 9
    assert t.down_backends == [] and not t.buffer_path.exists()
    t.log_metrics({"reward": 1.0}, step=10)
    version = ModelVersioning(t).register_model(model, "server_actor", description="after outage")
    assert version == "1.0.0"
    loaded = ModelVersioning(t).load("server_actor", "development")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                 strict=True))
    run_id = t.mlflow_run_id
    t.finish()

    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    hist = client.get_metric_history(run_id, "reward")
    assert [(m.step, m.value) for m in hist] == [(s, s / 10) for s in range(11)]
    assert all(a.timestamp <= b.timestamp for a, b in zip(hist, hist[1:], strict=False))
    assert run.data.params == {"actor.lr": "1e-06", "adv.gamma": "0.99"}
    assert run.data.tags["phase"] == "outage"
    for name, text in (("before.txt", "before"), ("during.txt", "during")):
        p = download_artifacts(run_id=run_id, artifact_path=name, tracking_uri=server.uri,
                               dst_path=str(tmp_path / "dl"))
        assert Path(p).read_text() == text
    outs = sorted(o.step for o in run.outputs.model_outputs)
    assert outs == [2, 9, 10]
    mv = client.get_model_version_by_alias("server_actor", "development")
    assert mv.tags["semver"] == "1.0.0" and mv.description == "after outage" and mv.run_id == run_id
