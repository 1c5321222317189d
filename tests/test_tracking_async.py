"""The background writer, the outage buffer and run resume, against a real MLflow SQLite store.

Metrics are queued by ``log_metrics`` and sent by the tracker's writer thread; these
tests read everything back with ``MlflowClient`` after the fact. Waits for the
background thread poll the tracker's state with a generous deadline; nothing here
asserts on elapsed time.
"""

import gc
import os
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow import MlflowClient

from rl2fx.tracking import end_run, read_buffer, replay_buffer, running_runs
from rl2fx.tracking.backends import check_sqlite_store, scoped_env
from rl2fx.tracking.config import ExperimentConfig
from rl2fx.tracking.tracker import ExperimentTracker

KEYS = [f"m{i}" for i in range(10)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_async")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    MlflowClient(uri).search_experiments()  # run the migrations once for the module
    return root, uri


def _cfg(store, name, **kw):
    root, uri = store
    kw.setdefault("log_system_metrics", False)
    kw.setdefault("buffer_dir", str(root / "buffer"))
    return ExperimentConfig(experiment_name=name, tracking_uri=uri, enable_wandb=False, **kw)


def _wait(cond, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connection refused


def test_every_step_read_back_after_finish(store):
    """200 steps of 10 metrics, queued faster than they are sent. Read back: every key's
    history holds all 200 steps in order with the logged values."""
    n = 200
    with ExperimentTracker(_cfg(store, "all_steps", flush_interval=0.01)) as t:
        for step in range(n):
            t.log_metrics({k: step + i / 10 for i, k in enumerate(KEYS)}, step=step)
        run_id = t.mlflow_run_id
    client = MlflowClient(store[1])
    for i, k in enumerate(KEYS):
        hist = client.get_metric_history(run_id, k)
        assert [(m.step, m.value) for m in hist] == [(s, s + i / 10) for s in range(n)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_flush_sends_the_queue_now(store):
    """flush() returns only once the queued metrics are in the store (long flush_interval)."""
    t = ExperimentTracker(_cfg(store, "flush", flush_interval=3600))
    for step in range(5):
        t.log_metrics({"a": float(step)}, step=step)
    t.flush()
    hist = MlflowClient(store[1]).get_metric_history(t.mlflow_run_id, "a")
    assert [m.step for m in hist] == list(range(5))
    t.finish()


def test_backend_failing_mid_run_buffers_in_order_then_background_replay(store):
    """MLflow's log_batch fails for steps 10-29 (an outage mid-run): one warning, the
    buffer holds those records in order, training never sees an exception; once the
    backend works again the writer thread replays the buffer by itself (no replay() call).
    Read back: all 40 steps, in order, with their values."""
    t = ExperimentTracker(_cfg(store, "mid_run", flush_interval=0.0, retry_interval=0.05,
                               metrics_process=False))  # the outage is injected in this process
    client = t._backend("mlflow").client
    real = client.log_batch
    outage = {"on": False}

    def flaky(*args, **kwargs):
        if outage["on"]:
            raise ConnectionError("store unreachable")
        return real(*args, **kwargs)

    client.log_batch = flaky
    for step in range(10):
        t.log_metrics({"reward": float(step)}, step=step)
    t.flush()
    outage["on"] = True
    with pytest.warns(Warning) as caught:
        for step in range(10, 30):
            t.log_metrics({"reward": float(step)}, step=step)
        t.flush()
        buffered = t.buffered()
    ours = [w for w in caught if "rl2fx tracking" in str(w.message)]
    assert len(ours) == 1 and "mlflow failed on 'metrics'" in str(ours[0].message)
    assert [r["step"] for r in buffered] == list(range(10, 30))
    assert all(r["run_id"] == t.mlflow_run_id for r in buffered)
    outage["on"] = False
    assert _wait(lambda: not t._down and not t.buffer_path.exists())
    for step in range(30, 40):
        t.log_metrics({"reward": float(step)}, step=step)
    t.finish()
    hist = MlflowClient(store[1]).get_metric_history(t.mlflow_run_id, "reward")
    assert [(m.step, m.value) for m in hist] == [(s, float(s)) for s in range(40)]


def test_resume_continues_the_same_run(store):
    """A tracker dropped without finish (a killed job) leaves its run RUNNING; running_runs
    lists it. A second tracker with run_id= continues it: same run, steps 3-4 logged again.
    Read back: one run in the experiment, FINISHED; the reward history holds steps 0-7 with
    both points at steps 3 and 4 (MLflow keeps every (step, timestamp) point), the latest
    value is the resumed one; params from the first run are kept and cannot change."""
    t = ExperimentTracker(_cfg(store, "resume"))
    t.log_params({"lr": 0.1})
    for step in range(5):
        t.log_metrics({"reward": float(step)}, step=step)
    t.flush()
    run_id = t.mlflow_run_id
    del t
    gc.collect()
    assert running_runs("resume", tracking_uri=store[1]) == [run_id]

    with ExperimentTracker(_cfg(store, "resume", run_id=run_id)) as t2:
        assert t2.mlflow_run_id == run_id
        assert t2.params == {"lr": "0.1"}
        t2.log_params({"lr": 0.1})  # unchanged: fine
        with pytest.raises(ValueError, match="lr"):
            t2.log_params({"lr": 0.2})
        for step in range(3, 8):
            t2.log_metrics({"reward": 10.0 + step}, step=step)
    client = MlflowClient(store[1])
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    hist = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, "reward"))
    assert [(s, v) for s, _, v in hist] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (3, 13.0),
                                           (4, 4.0), (4, 14.0), (5, 15.0), (6, 16.0), (7, 17.0)]
    assert run.data.metrics["reward"] == 17.0
    assert running_runs("resume", tracking_uri=store[1]) == []


def test_resume_unknown_run_id_raises(store):
    with pytest.raises(ValueError, match="run_id='0123456789abcdef'"):
        ExperimentTracker(_cfg(store, "resume_bad", run_id="0123456789abcdef"))


def test_end_run_marks_a_stale_run(store):
    """Read back: a RUNNING run left by a dropped tracker becomes KILLED via end_run."""
    t = ExperimentTracker(_cfg(store, "stale"))
    run_id = t.mlflow_run_id
    del t
    gc.collect()
    assert end_run(run_id, tracking_uri=store[1]) == "RUNNING"
    assert MlflowClient(store[1]).get_run(run_id).info.status == "KILLED"
    assert running_runs("stale", tracking_uri=store[1]) == []
    with pytest.raises(ValueError, match="status"):
        end_run(run_id, "DONE", tracking_uri=store[1])


def test_env_unchanged_by_mlflow_calls(store, tmp_path, monkeypatch):
    """The MLflow HTTP settings exist only during the tracker's calls: the process
    environment is the same after construction, logging, flush, replay and finish, against
    a server URI (nothing listening) and a SQLite store; a user's own value is respected."""
    for var in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "3")
    before = dict(os.environ)
    cfg = ExperimentConfig(experiment_name="env", tracking_uri=f"http://127.0.0.1:{_closed_port()}",
                           enable_wandb=False, log_system_metrics=False, retry_interval=3600,
                           buffer_dir=str(tmp_path / "buf"), http_max_retries=0, http_timeout=2)
    with pytest.warns(Warning):
        t = ExperimentTracker(cfg)
        t.log_metrics({"a": 1.0}, step=0)
        t.flush()
        assert dict(os.environ) == before
        t.replay()
        t.finish()
    assert dict(os.environ) == before
    with ExperimentTracker(_cfg(store, "env_sqlite")) as t2:
        t2.log_metrics({"a": 1.0}, step=0)
    assert dict(os.environ) == before

    seen = {}
    b = t._backend("mlflow")
    with b.env():
        seen = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT",
                                               "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")}
    assert seen == {"MLFLOW_HTTP_REQUEST_TIMEOUT": "2", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "3"}
    assert dict(os.environ) == before
    with scoped_env({"RL2FX_X": "1"}):
        assert os.environ["RL2FX_X"] == "1"
    assert "RL2FX_X" not in os.environ


def test_buffer_survives_a_killed_process(store, tmp_path):
    """A child process logs 20 steps while its MLflow server is unreachable, calls flush()
    and dies with os._exit (no finish, no atexit). Read back: the buffer file holds the
    start and the 20 metric records in order; replay_buffer on the buffer directory pushes
    them into the SQLite store, where the run holds all 20 steps."""
    buf = tmp_path / "buf"
    script = textwrap.dedent(f"""
        import os, warnings
        warnings.simplefilter("ignore")
        from rl2fx.tracking import ExperimentConfig, ExperimentTracker
        cfg = ExperimentConfig(experiment_name="killed", tracking_uri="http://127.0.0.1:{_closed_port()}",
                               enable_wandb=False, log_system_metrics=False, retry_interval=3600,
                               buffer_dir={str(buf)!r}, http_max_retries=0, http_timeout=2)
        t = ExperimentTracker(cfg)
        for step in range(20):
            t.log_metrics({{"reward": float(step)}}, step=step)
        t.flush()
        os._exit(9)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=600)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    (path,) = list(buf.glob("*.jsonl"))
    recs = read_buffer(path)
    assert [r["op"] for r in recs] == ["start"] + ["metrics"] * 20
    assert [r["step"] for r in recs[1:]] == list(range(20))
    assert replay_buffer(buf, tracking_uri=store[1]) == 21
    assert not path.exists()
    client = MlflowClient(store[1])
    (run,) = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward")] == list(range(20))
    assert run.info.status == "RUNNING"  # no finish record: end_run() closes it


def test_broken_sqlite_store_fails_fast_into_the_buffer(tmp_path, monkeypatch):
    """The store path is a directory (SQLite cannot open it). MLflow would retry opening it
    with backoff for about 100 s per attempt; the pre-flight check refuses it before MLflow
    ever tries (checked by recording MLflow's engine creations), the calls are buffered,
    and once the path is usable replay() creates the run. Read back: all steps."""
    import mlflow.store.db.utils as dbu

    bad = tmp_path / "store.db"
    bad.mkdir()
    uri = f"sqlite:///{bad}"
    opened = []
    real = dbu.create_sqlalchemy_engine_with_retry
    monkeypatch.setattr(dbu, "create_sqlalchemy_engine_with_retry", lambda u: (opened.append(u), real(u))[1])
    with pytest.raises(RuntimeError, match="store.db"):
        check_sqlite_store(uri)
    cfg = ExperimentConfig(experiment_name="broken", tracking_uri=uri, enable_wandb=False,
                           log_system_metrics=False, retry_interval=3600, buffer_dir=str(tmp_path / "buf"))
    with pytest.warns(Warning, match="not a usable SQLite store"):
        t = ExperimentTracker(cfg)
    for step in range(3):
        t.log_metrics({"loss": float(step)}, step=step)
    assert t.down_backends == ["mlflow"]
    assert [r["op"] for r in t.buffered()] == ["start", "metrics", "metrics", "metrics"]
    assert uri not in opened
    bad.rmdir()
    assert t.replay() == 4
    t.finish()
    client = MlflowClient(uri)
    hist = client.get_metric_history(t.mlflow_run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert client.get_run(t.mlflow_run_id).info.status == "FINISHED"


def test_invalid_new_config_fields():
    with pytest.raises(ValueError, match="flush_interval"):
        ExperimentConfig(flush_interval=-1.0)
    with pytest.raises(ValueError, match="run_id"):
        ExperimentConfig(run_id="")


def _child_ready(t, n_steps=150):
    """Log enough metrics for the tracker to start its writer process, then wait until it is ready."""
    for step in range(n_steps):
        t.log_metrics({k: float(step) for k in KEYS}, step=step)
    t.flush()
    t._writer_pass()  # the pass that notices the count starts the child
    mlf = t._backend("mlflow")
    assert mlf._child is not None
    assert mlf._child.ready.wait(300), "writer process did not start"
    return mlf


def test_writer_process_takes_over_metrics(store):
    """After 1000 metrics the MLflow share moves to a child process. Read back: every step,
    the later ones written by the child (the parent's own count of written metrics stops)."""
    with ExperimentTracker(_cfg(store, "child", flush_interval=0.0, metrics_process=True)) as t:
        mlf = _child_ready(t)
        written_here = mlf.metrics_sent
        for step in range(150, 250):
            t.log_metrics({k: float(step) for k in KEYS}, step=step)
        t.flush()
        assert mlf.metrics_sent == written_here
        run_id = t.mlflow_run_id
    assert mlf._child is None  # closed by finish
    client = MlflowClient(store[1])
    for k in KEYS:
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, k)] == [
            (s, float(s)) for s in range(250)]


def test_writer_process_killed_falls_back_in_process(store):
    """The child is killed mid-run: the tracker writes in-process again. Read back: every step."""
    with ExperimentTracker(_cfg(store, "child_killed", flush_interval=0.0, metrics_process=True)) as t:
        mlf = _child_ready(t)
        mlf._child._proc.kill()
        mlf._child._proc.wait()
        for step in range(150, 200):
            t.log_metrics({k: float(step) for k in KEYS}, step=step)
        t.flush()
        run_id = t.mlflow_run_id
    hist = MlflowClient(store[1]).get_metric_history(run_id, "m3")
    assert [m.step for m in hist] == list(range(200))
