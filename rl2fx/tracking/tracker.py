"""One tracking API fanned out to MLflow and Weights & Biases, that never slows or stops training.

:class:`ExperimentTracker` turns every call (metrics, params, tags, artifacts,
models, run start and end) into a small *record* (:mod:`rl2fx.tracking.records`)
and hands it to each enabled backend (:mod:`rl2fx.tracking.backends`).

Metrics are sent off the training thread: :meth:`ExperimentTracker.log_metrics`
validates, queues and returns; a writer thread drains the queue and sends each
backend everything queued since its last send in one go (MLflow ``log_batch`` calls
of up to 1000 metrics), as soon as a couple of hundred metrics are queued or
``flush_interval`` seconds after the first one. With ``metrics_process=True``, once a
run has logged a thousand metrics MLflow's share is written by a child process, so
MLflow's pure-Python store work stops competing with training for the GIL. Every other
call (params, tags, artifacts, models, finish) first sends what is queued, then
goes out itself, so each backend sees the calls in the order they were made.
:meth:`ExperimentTracker.flush` sends what is queued now; :meth:`ExperimentTracker.finish`
sends everything.

A backend that fails (tracking server down, store read-only, disk full, W&B error)
is marked *down*: the tracker warns once, appends that backend's records to a local
fsync'd JSON-lines buffer (:mod:`rl2fx.tracking.buffer`, copying files and models
next to it, so nothing depends on the caller keeping them), and keeps going. The
writer thread replays the buffer in batches every ``retry_interval`` seconds,
without holding up training; :meth:`ExperimentTracker.replay` does it at once, and
:meth:`ExperimentTracker.finish` tries once more. Records keep their original
timestamps and steps, so a replayed run reads exactly like one that never lost its
server.

Under ``torch.distributed`` only global rank 0 logs; other ranks get a tracker
whose methods return immediately (the ``RANK`` environment variable is used when
the process group is not initialised yet, as set by ``torchrun``).

Backends (all local by default, no network needed):

- MLflow through :class:`mlflow.MlflowClient` on the configured URI (an embedded
  SQLite store by default). Models are MLflow 3 *logged models* written with the
  PyTorch flavour (or the transformers flavour for pipelines and model+tokenizer
  pairs) and linked to the run as outputs at their ``step``. ``ExperimentConfig(run_id=...)``
  continues an earlier run instead of creating one.
- W&B with ``mode="offline"`` unless an API key is configured; metrics are plotted
  against a ``global_step`` axis so out-of-order or replayed steps are never dropped.

System metrics (:mod:`rl2fx.tracking.system`) are sampled in a background thread and
logged under ``system/`` through the same path, to both backends.

>>> tracker = ExperimentTracker(ExperimentConfig(enable_mlflow=False, enable_wandb=False,
...                                              log_system_metrics=False))
>>> with tracker:
...     tracker.log_metrics({"reward": 0.5, "kl_div": 0.01}, step=100)
...     tracker.log_params({"actor": {"lr": 1e-6, "kl": {"coef": 0.0}}})
>>> tracker.params
{'actor.lr': '1e-06', 'actor.kl.coef': '0.0'}
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rl2fx.tracking.backends import (
    Backend,
    BatchFailed,
    MlflowBackend,
    WandbBackend,
    save_model_locally,
)
from rl2fx.tracking.buffer import OutageBuffer, read_buffer, replay_buffer, replay_records
from rl2fx.tracking.config import ExperimentConfig
from rl2fx.tracking.records import (
    MAX_PARAM_VALUE,
    Record,
    check_key,
    check_step,
    flatten_params,
    flatten_typed,
    metric_value,
    now_ms,
    safe_name,
    to_container,
)
from rl2fx.tracking.system import SystemSampler

__all__ = [
    "ExperimentTracker",
    "ExperimentConfig",
    "TrackingWarning",
    "flatten_params",
    "global_rank",
    "read_buffer",
    "replay_buffer",
    "save_model_locally",
]

log = logging.getLogger(__name__)


class TrackingWarning(RuntimeWarning):
    """A tracking backend failed; training continues and its calls are buffered."""


def global_rank() -> int:
    """Global rank of this process (0 without ``torch.distributed``).

    Uses the initialised default process group when there is one, else ``$RANK``
    (set by ``torchrun`` before the group exists), else 0.

    >>> global_rank()
    0
    """
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank())
    except Exception:  # a broken distributed install must not break tracking
        pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


_LIVE: weakref.WeakSet[ExperimentTracker] = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def _finish_live_trackers() -> None:
    for t in list(_LIVE):
        try:
            t.finish()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass


# The writer sends as soon as this many metrics are queued (else every flush_interval).
# MLflow's SQLite log_batch costs a few ms per call plus tens of microseconds per metric,
# and grows faster than linearly past about a thousand metrics; a couple of hundred per
# call keeps both the per-call cost and what finish() has left to send small.
_BATCH_METRICS = 200
# Metrics written in-process before MLflow's share moves to a child process: a short run
# never pays for starting one (a Python interpreter importing MLflow, a few CPU-seconds).
_CHILD_AFTER_METRICS = 1000


def _writer_main(ref: weakref.ReferenceType[ExperimentTracker], wake: threading.Event,
                 full: threading.Event, closing: threading.Event) -> None:
    # Holds the tracker only weakly between passes, so a tracker dropped without finish()
    # can still be collected (its thread then ends).
    while not closing.is_set():
        t = ref()
        if t is None:
            return
        timeout, interval = t._writer_timeout(), t.config.flush_interval
        del t
        if wake.wait(timeout):
            full.wait(interval)  # let a batch build up, unless it is already full
        if closing.is_set():
            return  # finish() sends the rest itself
        wake.clear()
        full.clear()
        t = ref()
        if t is None:
            return
        try:
            t._writer_pass()
        except Exception as e:  # the writer must outlive any one failure
            log.error("rl2fx tracking: background writer pass failed: %s", e)
        del t


class ExperimentTracker:
    """Log metrics, params, artifacts, models and system metrics to MLflow and W&B.

    The call that starts a run is the constructor; use it as a context manager (or
    call :meth:`finish`) to end the run with ``FINISHED`` or ``FAILED`` status. With
    ``config.run_id`` set it continues that earlier MLflow run instead of creating
    one (for a training job resumed from a checkpoint).

    Args:
        config: an :class:`~rl2fx.tracking.config.ExperimentConfig` (or the spec's
            ``experiment_tracking`` mapping).

    Metrics are queued and sent by a background writer thread in batches
    (:meth:`log_metrics` returns at once); every other call first sends what is
    queued, so each backend receives the calls in order. :meth:`flush` sends the
    queue now; :meth:`finish` sends everything.

    Failure model: every backend call is a record. When a backend raises, the
    tracker emits one :class:`TrackingWarning` for that outage, appends the record
    (and all later records for that backend, keeping their order) to
    ``config.buffer_dir/<tracker id>.jsonl`` (flushed and fsynced), copies
    referenced files and models beside it, and continues. The writer thread replays
    the buffer in batches every ``config.retry_interval`` seconds; :meth:`replay`
    does it now and :meth:`finish` tries once more; records applied are removed from
    the file. Invalid input (a non-numeric metric, a bad name, a param changed after
    it was logged, a missing file, a ``run_id`` that does not exist) raises
    ``ValueError``/``FileNotFoundError`` at the call instead.

    >>> cfg = ExperimentConfig(enable_mlflow=False, enable_wandb=False, log_system_metrics=False)
    >>> with ExperimentTracker(cfg) as t:
    ...     t.log_metrics({"loss": 1.5}, step=1)
    ...     t.latest_metrics
    {'loss': 1.5}
    """

    def __init__(self, config: ExperimentConfig | Mapping[str, Any] | None = None) -> None:
        if config is None:
            config = ExperimentConfig()
        elif not isinstance(config, ExperimentConfig):
            config = ExperimentConfig.from_dict(config)
        self.config = config
        self.rank = global_rank()
        self.active = bool(config.enabled) and self.rank == 0
        self.id = uuid.uuid4().hex[:12]
        self.params: dict[str, str] = {}
        self.latest_metrics: dict[str, float] = {}
        self.last_step = 0
        self.finished = False
        # _lock: sending to backends and the buffer; _qlock: only the queue and the latest
        # values, so log_metrics never waits for a backend call in progress.
        self._lock = threading.RLock()
        self._qlock = threading.Lock()
        self._queue: collections.deque[Record] = collections.deque()
        self._queued_metrics = 0
        self._wake = threading.Event()  # something is queued (or a retry may be due)
        self._full = threading.Event()  # _BATCH_METRICS are queued: send now
        self._closing = threading.Event()
        self._writer: threading.Thread | None = None
        self._backends: list[Backend] = []
        self._down: dict[str, float] = {}  # backend name -> monotonic time of the last failure
        self._buffer = OutageBuffer(Path(config.buffer_dir).absolute() / f"{self.id}.jsonl")
        self._model_tmp: tempfile.TemporaryDirectory[str] | None = None
        self._sampler: SystemSampler | None = None
        self._sampler_thread: threading.Thread | None = None
        self._stop = threading.Event()
        if not self.active:
            return
        if config.enable_mlflow:
            self._backends.append(MlflowBackend(config))
        if config.enable_wandb:
            wb = WandbBackend(config)
            if wb.mode != "disabled":
                self._backends.append(wb)
        self._dispatch({"op": "start", "tracker_id": self.id, "tags": config.tag_dict(),
                        "run_name": config.run_name, "resume_run_id": config.run_id})
        mlf = self._backend("mlflow")
        if isinstance(mlf, MlflowBackend):
            self.params.update(mlf.resumed_params)  # a resumed run's params cannot change either
        _LIVE.add(self)
        global _ATEXIT_REGISTERED
        if not _ATEXIT_REGISTERED:
            # Registered after wandb.init, so (atexit being LIFO) it runs before W&B's own hook.
            atexit.register(_finish_live_trackers)
            _ATEXIT_REGISTERED = True
        self._writer = threading.Thread(
            target=_writer_main, args=(weakref.ref(self), self._wake, self._full, self._closing),
            name=f"rl2fx-tracking-writer-{self.id}", daemon=True,
        )
        self._writer.start()
        if config.log_system_metrics:
            self._sampler = SystemSampler()
            self._sampler_thread = threading.Thread(
                target=self._sample_loop, name=f"rl2fx-system-metrics-{self.id}", daemon=True
            )
            self._sampler_thread.start()

    # -- context manager ------------------------------------------------------------------
    def __enter__(self) -> ExperimentTracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(status="FAILED" if exc_type is not None else "FINISHED")

    # -- properties ----------------------------------------------------------------------
    @property
    def mlflow_run_id(self) -> str | None:
        """The MLflow run id (``None`` without MLflow or while its start is buffered)."""
        b = self._backend("mlflow")
        return b.run_id if b is not None else None

    @property
    def mlflow_client(self) -> Any:
        """The :class:`mlflow.MlflowClient` on the tracker's URIs (``None`` without MLflow)."""
        b = self._backend("mlflow")
        return b.client if b is not None else None

    @property
    def wandb_run(self) -> Any:
        """The W&B run object (``None`` without W&B or while its start is buffered)."""
        b = self._backend("wandb")
        return b.run if b is not None else None

    @property
    def buffer_path(self) -> Path:
        """The JSON-lines file holding calls not yet accepted by a backend."""
        return self._buffer.path

    @property
    def down_backends(self) -> list[str]:
        """Names of backends currently failing (their calls go to the buffer); sends the queue first."""
        self.flush()
        return sorted(self._down)

    def buffered(self) -> list[dict[str, Any]]:
        """Records waiting in the buffer, oldest first (after sending what is queued)."""
        with self._lock:
            self._drain_locked()
            return self._buffer.read()

    # -- logging API -----------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log scalar metrics at ``step`` (default: the last step seen) to every backend.

        Values may be Python numbers, bools, or one-element tensors/arrays. The call
        validates and queues; the writer thread sends (see the class docstring).
        """
        if not self.active:
            return
        if not isinstance(metrics, Mapping):
            raise ValueError(f"metrics={metrics!r} is invalid; expected a mapping of names to numbers")
        clean = {check_key("metric", k): metric_value(k, v) for k, v in metrics.items()}
        step = check_step(self.last_step if step is None else step)
        rec = {"time_ms": now_ms(), "op": "metrics", "metrics": clean, "step": step}
        with self._qlock:
            if not any(k.startswith("system/") for k in clean):
                self.last_step = step
            self.latest_metrics.update(clean)
            if not self.finished:
                self._queue.append(rec)
                self._queued_metrics += len(clean)
                self._wake.set()
                if self._queued_metrics >= _BATCH_METRICS:
                    self._full.set()
                return
        with self._lock:  # after finish there is no writer thread: send now, as other calls do
            self._send([rec])

    def flush(self) -> None:
        """Send every queued record to its backend (or the buffer) before returning."""
        if not self.active:
            return
        with self._lock:
            self._drain_locked()

    def log_params(self, params: Any) -> None:
        """Log hyperparameters, flattened to dotted keys (see :func:`flatten_params`).

        Accepts a (nested) mapping, an OmegaConf config, a dataclass or a namespace.
        Logging the same key again with the same value is a no-op; a different value
        raises ``ValueError`` (MLflow params are immutable within a run).
        """
        if not self.active:
            return
        typed = flatten_typed(params)
        new: dict[str, str] = {}
        for k, tv in typed.items():
            v = str(tv)
            check_key("param", k)
            if len(v) > MAX_PARAM_VALUE:
                raise ValueError(
                    f"param {k!r} has a {len(v)}-character value; MLflow allows at most "
                    f"{MAX_PARAM_VALUE} (log it with log_config or log_artifact instead)"
                )
            if k in self.params and self.params[k] != v:
                raise ValueError(
                    f"param {k!r} was logged as {self.params[k]!r} and cannot change to {v!r} "
                    "within a run; log changing values as metrics"
                )
            if k not in self.params:
                new[k] = v
        if not new:
            return
        with self._lock:
            self.params.update(new)
            # typed values in the record (W&B keeps numbers numeric); MLflow stores str(v)
            self._dispatch({"op": "params", "params": {k: typed[k] for k in new}})

    def log_config(self, config: Any, name: str = "config.yaml") -> None:
        """Log a whole config: its flattened params, plus the config itself as a YAML artifact.

        The artifact is written under ``config/<name>`` when ``log_artifacts`` is on.
        """
        if not self.active:
            return
        self.log_params(config)
        if not self.config.log_artifacts:
            return
        import yaml

        container = to_container(config)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(yaml.safe_dump(json.loads(json.dumps(container, default=str)), sort_keys=False))
            self.log_artifact(p, artifact_path="config")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (MLflow key/value; W&B gets ``key:value`` strings)."""
        if not self.active:
            return
        clean = {check_key("tag", str(k)): str(v) for k, v in tags.items()}
        self._dispatch({"op": "tags", "tags": clean})

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file or a directory as a run artifact (under ``artifact_path`` if given)."""
        if not self.active or not self.config.log_artifacts:
            return
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"path={str(path)!r} does not exist; cannot log it as an artifact")
        self._dispatch({"op": "artifact", "path": str(p.absolute()), "artifact_path": artifact_path})

    def log_table(self, data: Mapping[str, Sequence[Any]], artifact_file: str, step: int = 0) -> None:
        """Log a table (column name -> values, all of one length): an MLflow table artifact
        (``mlflow.log_table``; read back with ``mlflow.load_table(artifact_file, run_ids=[run_id])``)
        and a W&B ``wandb.Table`` logged at ``step``.

        Values must be JSON scalars (str, int, float, bool, None): the record is buffered
        as JSON during an outage like every other record.
        """
        if not self.active:
            return
        if not artifact_file.endswith(".json"):
            raise ValueError(f"artifact_file={artifact_file!r} must end with '.json' (MLflow's table format)")
        cols = {str(k): list(v) for k, v in data.items()}
        lengths = {k: len(v) for k, v in cols.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"data columns must have one length, got {lengths}")
        for k, v in cols.items():
            bad = next((x for x in v if x is not None and not isinstance(x, str | int | float | bool)), None)
            if bad is not None:
                raise ValueError(f"data[{k!r}] holds a {type(bad).__name__} ({bad!r}); table values must be "
                                 "str, int, float, bool or None")
        self._dispatch({"op": "table", "data": cols, "artifact_file": artifact_file, "step": check_step(step)})

    def log_model(
        self,
        model: Any,
        name: str,
        step: int = 0,
        *,
        tokenizer: Any = None,
        task: str | None = None,
        flavor: str = "auto",
    ) -> dict[str, Any] | None:
        """Log a model (PyTorch ``nn.Module``; transformers pipeline or model+tokenizer) at ``step``.

        Returns MLflow's record of it (``model_id``, ``model_uri`` = ``models:/<id>``,
        ``artifact_location``, ``run_id``) when MLflow took it now, else ``None``
        (MLflow disabled, ``log_models`` off, or buffered for replay).
        """
        if not self.active or not self.config.log_models:
            return None
        return self._log_model(model, name, step, tokenizer=tokenizer, task=task, flavor=flavor)

    def _log_model(
        self, model: Any, name: str, step: int, *, tokenizer: Any, task: str | None, flavor: str
    ) -> dict[str, Any] | None:
        check_key("model", name)
        step = check_step(step)
        with self._lock:
            if self._model_tmp is None:
                self._model_tmp = tempfile.TemporaryDirectory(prefix="rl2fx-models-")
            d = Path(self._model_tmp.name) / f"{safe_name(name)}-step{step}-{uuid.uuid4().hex[:8]}"
            used = save_model_locally(model, d, flavor=flavor, tokenizer=tokenizer, task=task)
            mlf = self._backend("mlflow")
            before = len(mlf.logged_models) if mlf is not None else 0
            self._dispatch({"op": "model", "dir": str(d), "name": name, "step": step, "flavor": used})
            if mlf is not None and len(mlf.logged_models) > before:
                return dict(mlf.logged_models[-1])
            return None

    def log_system_metrics(self, step: int | None = None) -> dict[str, float]:
        """Sample CPU, memory and GPU usage now and log them under ``system/``; return them."""
        if not self.active:
            return {}
        if self._sampler is None:
            self._sampler = SystemSampler()
        values = self._sampler.sample()
        self.log_metrics(values, step=self.last_step if step is None else step)
        return values

    # -- replay and finish ---------------------------------------------------------------
    def replay(self) -> int:
        """Push buffered records to their backends, in order and in batches; return how many were applied.

        Records a backend still refuses stay in the buffer (with everything after them
        for that backend); call again later. A backend whose records are all applied
        is back up: new calls go straight to it. The writer thread does the same by
        itself every ``retry_interval`` seconds while a backend is down.
        """
        if not self.active:
            return 0
        with self._lock:
            self._drain_locked()
            return self._replay_locked()

    def finish(self, status: str = "FINISHED") -> None:
        """End the run in every backend (``FINISHED``, ``FAILED`` or ``KILLED``); idempotent.

        Stops the system-metrics and writer threads, sends everything queued, and tries
        one last :meth:`replay`; whatever is still buffered stays in :attr:`buffer_path`
        for a later ``replay`` (or :func:`~rl2fx.tracking.buffer.replay_buffer`).
        """
        from rl2fx._typing import check_choice

        check_choice("status", status, ("FINISHED", "FAILED", "KILLED"))
        if not self.active or self.finished:
            return
        self._stop.set()
        if self._sampler_thread is not None and self._sampler_thread is not threading.current_thread():
            self._sampler_thread.join(timeout=30)
        self._closing.set()
        self._wake.set()
        self._full.set()
        if self._writer is not None and self._writer is not threading.current_thread():
            self._writer.join()  # a pass in progress finishes first: records stay in order
        with self._lock:
            with self._qlock:
                self.finished = True
            self._drain_locked()
            if self._down:
                self._replay_locked()
            self._send([{"time_ms": now_ms(), "op": "finish", "status": status}])
            mlf = self._backend("mlflow")
            if isinstance(mlf, MlflowBackend):
                mlf.close()
            _LIVE.discard(self)
            if self._down:
                warnings.warn(
                    f"rl2fx tracking: {', '.join(sorted(self._down))} still unreachable at finish; "
                    f"{len(self._buffer.read())} calls remain in {self.buffer_path} "
                    "(call tracker.replay() once the backend is back)",
                    TrackingWarning, stacklevel=2,
                )
            if self._model_tmp is not None:
                # buffered models were copied next to the buffer, so the temp copies can go
                self._model_tmp.cleanup()
                self._model_tmp = None

    close = finish

    # -- internals -----------------------------------------------------------------------
    def _backend(self, name: str) -> Any:
        for b in self._backends:
            if b.name == name:
                return b
        return None

    def _sample_loop(self) -> None:
        while not self._stop.wait(self.config.system_metrics_interval):
            try:
                self.log_system_metrics()
            except Exception as e:  # sampling must never kill the process
                log.debug("rl2fx tracking: system metrics sample failed: %s", e)

    def _writer_timeout(self) -> float:
        # Wake for the next due retry; otherwise now and then, to notice being dropped.
        if not self._down:
            return 5.0
        due = min(self._down.values()) + self.config.retry_interval - time.monotonic()
        return min(5.0, max(due, 0.05))  # retry_interval=0 must not spin

    def _writer_pass(self) -> None:
        with self._lock:
            if self.finished:
                return
            self._drain_locked()
            now = time.monotonic()
            if self._down and any(now - t >= self.config.retry_interval for t in self._down.values()):
                self._replay_locked()
            mlf = self._backend("mlflow")
            if (self.config.metrics_process and isinstance(mlf, MlflowBackend) and not self._down
                    and mlf.metrics_sent >= _CHILD_AFTER_METRICS):
                mlf.start_metrics_process()

    def _dispatch(self, rec: Record) -> None:
        """Send one non-metric call now, after everything queued before it."""
        with self._lock:
            self._drain_locked()
            self._send([{"time_ms": now_ms(), **rec}])

    def _drain_locked(self) -> None:
        with self._qlock:
            batch = list(self._queue)
            self._queue.clear()
            self._queued_metrics = 0
        if batch:
            self._send(batch)

    def _send(self, recs: Sequence[Record]) -> None:
        for b in self._backends:
            brecs = [{"backend": b.name, **r} for r in recs]
            if b.name in self._down:
                self._buffer_records(brecs)
                continue
            try:
                b.apply_many(brecs)
            except BatchFailed as e:
                self._down[b.name] = time.monotonic()
                warnings.warn(
                    f"rl2fx tracking: {b.name} failed on '{brecs[e.applied]['op']}' "
                    f"({type(e.cause).__name__}: {e.cause}); "
                    f"training continues and its calls are buffered to {self.buffer_path}; "
                    "tracker.replay() pushes them when it is back",
                    TrackingWarning, stacklevel=4,
                )
                self._buffer_records(brecs[e.applied:])

    def _replay_locked(self) -> int:
        records = self._buffer.read()
        if not records:
            self._down.clear()
            return 0
        result = replay_records(records, lambda rec: self._backend(rec["backend"]))
        self._buffer.rewrite(result.keep)
        for name, err in result.failed.items():
            self._down[name] = time.monotonic()
            log.info("rl2fx tracking: replay to %s still failing: %s", name, err)
        for b in self._backends:
            if b.name not in result.failed and b.name in self._down:
                del self._down[b.name]
                log.warning("rl2fx tracking: %s is back; replayed its buffered calls", b.name)
        return result.applied

    def _buffer_records(self, recs: Sequence[Record]) -> None:
        out = []
        for rec in recs:
            if rec["backend"] == "mlflow":
                # enough context for replay_buffer() to finish the job from another process
                b = self._backend("mlflow")
                rec = {**rec, "run_id": b.run_id, "tracking_uri": b.tracking_uri,
                       "experiment": self.config.experiment_name}
            # Keep private copies of files: the caller may delete or overwrite them before replay.
            if rec["op"] in ("artifact", "model"):
                key = "path" if rec["op"] == "artifact" else "dir"
                src = Path(rec[key])
                dst = self.buffer_path.with_suffix("") / "files" / rec["backend"] / uuid.uuid4().hex[:8] / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, dst)
                else:
                    shutil.copy2(src, dst)
                rec = {**rec, key: str(dst)}
            out.append(rec)
        self._buffer.append(out)
