"""Tracking backends behind one small protocol: MLflow and Weights & Biases.

A backend *applies records* (see :mod:`rl2fx.tracking.records`); it never decides
what happens when it fails. The tracker (and the outage buffer's replay) call
:meth:`Backend.apply_many` with records in their original order; a backend that
fails part way raises :class:`BatchFailed` saying how many leading records it did
apply, so the rest can be buffered without losing or repeating any.

- :class:`MlflowBackend` talks to one :class:`mlflow.MlflowClient`. Consecutive
  metric records go out together in ``log_batch`` calls of at most 1000 metrics,
  split on record boundaries; once started (:meth:`MlflowBackend.start_metrics_process`)
  a child process writes them (:mod:`rl2fx.tracking.writer_process`). A SQLite store is checked with :func:`check_sqlite_store`
  before MLflow opens it, so a store that cannot be opened or written fails in
  milliseconds (MLflow itself retries opening for about 100 s). For server URIs the
  HTTP timeout and retry settings MLflow reads from the environment are set only for
  the duration of each call (:func:`scoped_env`) and restored after.
- :class:`WandbBackend` logs to one ``wandb`` run (offline unless a key is configured);
  ``run.log`` is already a queue push into W&B's own writer process.

Run management for runs a killed process left ``RUNNING``: :func:`running_runs` lists
them, :func:`end_run` marks one ``KILLED``/``FAILED``/``FINISHED``.

>>> with scoped_env({"RL2FX_DOCTEST_VAR": "1"}):
...     os.environ["RL2FX_DOCTEST_VAR"]
'1'
>>> "RL2FX_DOCTEST_VAR" in os.environ
False
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from rl2fx.tracking.config import ExperimentConfig
from rl2fx.tracking.records import MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH, Record, safe_name
from rl2fx.tracking.writer_process import ChildError, ChildFailed, MetricsProcess, chunks

__all__ = [
    "Backend",
    "BatchFailed",
    "InvalidRecord",
    "MlflowBackend",
    "RUN_END_STATUSES",
    "WandbBackend",
    "check_sqlite_store",
    "end_run",
    "running_runs",
    "save_model_locally",
    "scoped_env",
]

log = logging.getLogger(__name__)

#: Statuses a run can be ended with.
RUN_END_STATUSES = ("FINISHED", "FAILED", "KILLED")


@runtime_checkable
class Backend(Protocol):
    """What the tracker needs from a backend: a name and a way to apply records in order."""

    name: str

    def apply(self, rec: Record) -> None:
        """Apply one record; raise on any failure."""
        ...

    def apply_many(self, recs: Sequence[Record]) -> None:
        """Apply records in order, batching where the backend can; raise :class:`BatchFailed`."""
        ...


class BatchFailed(Exception):
    """``apply_many`` stopped: the first ``applied`` records were applied, the rest were not."""

    def __init__(self, applied: int, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.applied = applied
        self.cause = cause


class InvalidRecord(ValueError):
    """A record no retry can apply (a wrong run id to resume): raised to the caller, never buffered."""


def _apply_each(backend: Backend, recs: Sequence[Record]) -> None:
    for i, rec in enumerate(recs):
        try:
            backend.apply(rec)
        except InvalidRecord:
            raise
        except Exception as e:
            raise BatchFailed(i, e) from e


# --------------------------------------------------------------------------------------
# environment scoped to a call

_ENV_LOCK = threading.RLock()


@contextlib.contextmanager
def scoped_env(values: Mapping[str, str], defaults: Mapping[str, str] | None = None) -> Iterator[None]:
    """Set environment variables for the ``with`` block only, then restore the previous values.

    ``values`` are set unconditionally; ``defaults`` only where the variable is unset
    (a user's own setting wins). Variables that did not exist are removed again.
    Blocks are serialised process-wide, so two trackers never restore each other's values.
    """
    with _ENV_LOCK:
        wanted = dict(values)
        for k, v in (defaults or {}).items():
            if k not in os.environ and k not in wanted:
                wanted[k] = v
        saved = {k: os.environ.get(k) for k in wanted}
        try:
            os.environ.update(wanted)
            yield
        finally:
            for k, old in saved.items():
                if old is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = old


class _EnvScopedClient:
    """An :class:`mlflow.MlflowClient` whose every method call runs inside :func:`scoped_env`."""

    def __init__(self, client: Any, env: Any) -> None:
        self._client, self._env = client, env

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._env():
                return attr(*args, **kwargs)

        return call


# --------------------------------------------------------------------------------------
# SQLite pre-flight


def check_sqlite_store(uri: str, *, timeout: float = 5.0) -> None:
    """Raise ``RuntimeError`` at once if the SQLite store at ``uri`` cannot be opened and written.

    MLflow retries opening a database with exponential backoff (about 100 s in all)
    before it gives up; a training step must not wait for that. The check opens the
    file with :mod:`sqlite3` (creating it, as MLflow would), reads the schema version
    (a file that is not a database fails here) and takes and releases a write lock
    (a read-only file or directory fails here). Other URIs are not checked.

    >>> import tempfile
    >>> check_sqlite_store("sqlite:///" + tempfile.mkdtemp() + "/ok.db")
    >>> check_sqlite_store("sqlite:///" + tempfile.mkdtemp())
    Traceback (most recent call last):
    ...
    RuntimeError: tracking_uri='sqlite:///...' is not a usable SQLite store (unable to open database file)...
    """
    if not uri.startswith("sqlite:///"):
        return
    path = uri[len("sqlite:///"):]
    if not path or path == ":memory:" or path.startswith("file:") or "?" in path:
        return  # URI-style options: leave them to SQLAlchemy
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, timeout=timeout)
        try:
            con.execute("PRAGMA schema_version").fetchone()
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
        finally:
            con.close()
    except (sqlite3.Error, OSError) as e:
        raise RuntimeError(
            f"tracking_uri={uri!r} is not a usable SQLite store ({e}); expected a writable "
            "SQLite database file or a path where one can be created"
        ) from e


# --------------------------------------------------------------------------------------
# local model serialisation, shared by both backends


def _is_transformers_pipeline(model: Any) -> bool:
    # By class name, not isinstance: importing transformers.Pipeline costs seconds, and an
    # object cannot be a pipeline unless transformers is already imported.
    if "transformers" not in sys.modules:
        return False
    return any(c.__name__ == "Pipeline" and c.__module__.startswith("transformers.pipelines")
               for c in type(model).__mro__)


def _pip_requirements(model: Any) -> list[str]:
    import torch

    # The local "+cpu" label is not installable from PyPI; pin the public version.
    reqs = [f"torch=={torch.__version__.split('+')[0]}"]
    if type(model).__module__.startswith("transformers") or _is_transformers_pipeline(model):
        import transformers

        reqs.append(f"transformers=={transformers.__version__}")
    return reqs


def save_model_locally(
    model: Any,
    path: str | os.PathLike[str],
    *,
    flavor: str = "auto",
    tokenizer: Any = None,
    task: str | None = None,
) -> str:
    """Write ``model`` as an MLflow model directory at ``path``; return the flavour used.

    ``flavor="auto"`` picks ``"transformers"`` for a transformers ``Pipeline`` or when a
    ``tokenizer`` is given (MLflow's transformers flavour needs one), else
    ``"pytorch"`` (any ``nn.Module``, including a bare Hugging Face model, pickled
    with cloudpickle). No network access and no requirement inference subprocess:
    requirements are pinned from the installed versions.

    >>> import tempfile, torch
    >>> save_model_locally(torch.nn.Linear(2, 1), tempfile.mkdtemp() + "/m")
    'pytorch'
    """
    from rl2fx._typing import check_choice

    check_choice("flavor", flavor, ("auto", "pytorch", "transformers"))
    if flavor == "auto":
        flavor = "transformers" if (tokenizer is not None or _is_transformers_pipeline(model)) else "pytorch"
    reqs = _pip_requirements(model)
    mlflow_logger = logging.getLogger("mlflow")
    old_level = mlflow_logger.level
    # MLflow warns on every pickle save; the choice is deliberate (any nn.Module works).
    mlflow_logger.setLevel(logging.ERROR)
    try:
        if flavor == "pytorch":
            import mlflow.pytorch

            mlflow.pytorch.save_model(
                pytorch_model=model, path=str(path), serialization_format="pickle",
                pip_requirements=reqs,
            )
        else:
            import mlflow.transformers

            tm = model if _is_transformers_pipeline(model) else {"model": model, "tokenizer": tokenizer}
            mlflow.transformers.save_model(
                transformers_model=tm, path=str(path), task=task, pip_requirements=reqs
            )
    finally:
        mlflow_logger.setLevel(old_level)
    return flavor


# --------------------------------------------------------------------------------------
# MLflow


class MlflowBackend:
    """Applies records to one MLflow run through an :class:`mlflow.MlflowClient`.

    ``client``, ``run_id`` and ``experiment_id`` are set once the ``start`` record is
    applied (or, replaying another process's buffer, adopted from a record's run id).
    """

    name = "mlflow"

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.tracking_uri = config.resolved_tracking_uri()
        self.registry_uri = config.resolved_registry_uri()
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.logged_models: list[dict[str, Any]] = []
        self.resumed_params: dict[str, str] = {}
        self.metrics_sent = 0  # metrics this process wrote itself (not through the child)
        self._child: MetricsProcess | None = None
        self._env_values: dict[str, str] = {}
        self._env_defaults: dict[str, str] = {}
        if self.tracking_uri.startswith(("http://", "https://")):
            # A down server must fail fast into the buffer, not retry for minutes
            # (MLflow's defaults: 7 retries with exponential backoff, 120 s timeout).
            # Explicit config values win; otherwise the user's environment; otherwise ours.
            for env, value, default in (
                ("MLFLOW_HTTP_REQUEST_TIMEOUT", config.http_timeout, 10),
                ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", config.http_max_retries, 1),
                ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", None, 1),
            ):
                if value is not None:
                    self._env_values[env] = str(value)
                else:
                    self._env_defaults[env] = str(default)

    def env(self) -> contextlib.AbstractContextManager[None]:
        """The environment MLflow's HTTP layer should see during this backend's calls."""
        return scoped_env(self._env_values, self._env_defaults)

    def make_client(self) -> Any:
        """A client on this backend's URIs whose calls run inside :meth:`env`."""
        check_sqlite_store(self.tracking_uri)
        from mlflow import MlflowClient

        with self.env():
            client = MlflowClient(self.tracking_uri, self.registry_uri)
        if not (self._env_values or self._env_defaults):
            return client
        return _EnvScopedClient(client, self.env)

    def start_metrics_process(self) -> None:
        """Start the child process that will write metric batches once it is ready."""
        if self._child is None and self.run_id is not None:
            env = dict(self._env_values)
            env.update({k: v for k, v in self._env_defaults.items() if k not in os.environ})
            self._child = MetricsProcess(self.tracking_uri, self.registry_uri, env)

    def close(self) -> None:
        """Stop the metrics child process, if any."""
        if self._child is not None:
            self._child.close()
            self._child = None

    # -- applying records ------------------------------------------------------------------
    def apply(self, rec: Record) -> None:
        """Apply one record (see :mod:`rl2fx.tracking.records`)."""
        with self.env():
            if self.client is None and rec["op"] != "start" and rec.get("run_id"):
                self._adopt(rec["run_id"])  # replaying another process's buffer into its run
            getattr(self, "_op_" + rec["op"])(rec)

    def apply_many(self, recs: Sequence[Record]) -> None:
        """Apply records in order; runs of metric records become ``log_batch`` calls."""
        done = 0
        try:
            with self.env():
                while done < len(recs):
                    if recs[done]["op"] != "metrics":
                        self.apply(recs[done])
                        done += 1
                        continue
                    if self.client is None and recs[done].get("run_id"):
                        self._adopt(recs[done]["run_id"])
                    end = done
                    while end < len(recs) and recs[end]["op"] == "metrics":
                        end += 1
                    try:
                        self._log_metric_records(recs[done:end])
                    except BatchFailed as e:
                        raise BatchFailed(done + e.applied, e.cause) from e.cause
                    done = end
        except (InvalidRecord, BatchFailed):
            raise
        except Exception as e:
            raise BatchFailed(done, e) from e

    def _adopt(self, run_id: str) -> None:
        client = self.make_client()
        self.experiment_id = client.get_run(run_id).info.experiment_id
        self.client, self.run_id = client, run_id

    def _op_start(self, rec: Record) -> None:
        client = self.make_client()
        resume = rec.get("resume_run_id")
        if resume:
            self._resume(client, resume, rec)
            return
        exp = client.get_experiment_by_name(self.config.experiment_name)
        if exp is None:
            exp_id = client.create_experiment(
                self.config.experiment_name, artifact_location=self.config.resolved_artifact_location()
            )
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp_id)
        tags = {"rl2fx.tracker_id": rec["tracker_id"], **rec["tags"]}
        run = client.create_run(exp_id, start_time=rec["time_ms"], tags=tags, run_name=rec.get("run_name"))
        self.client, self.experiment_id, self.run_id = client, exp_id, run.info.run_id

    def _resume(self, client: Any, run_id: str, rec: Record) -> None:
        from mlflow.entities import RunTag
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise InvalidRecord(
                    f"run_id={run_id!r} does not exist on {self.tracking_uri}; expected the id of an "
                    "earlier MLflow run to resume"
                ) from e
            raise
        if run.info.lifecycle_stage == "deleted":
            client.restore_run(run_id)
        client.update_run(run_id, status="RUNNING")
        tags = {"rl2fx.tracker_id": rec["tracker_id"], **rec["tags"]}
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.resumed_params = dict(run.data.params)
        self.client, self.experiment_id, self.run_id = client, run.info.experiment_id, run_id

    def _log_metric_records(self, recs: Sequence[Record]) -> None:
        """Write metric records (through the child process when it is ready); raise :class:`BatchFailed`."""
        from mlflow.entities import Metric

        if self._child is not None and self._child.usable:
            try:
                self._child.log(self.run_id, recs)
                return
            except ChildError as e:  # MLflow itself refused: the same outage in-process
                raise BatchFailed(e.applied, e) from e
            except ChildFailed as e:
                # The child is gone; write the batch here (a half-written batch is harmless:
                # MLflow's SQL store skips metrics identical to ones it already holds).
                log.info("rl2fx tracking: metrics writer process stopped (%s); writing in-process", e)
        done = 0
        try:
            for run in chunks(recs):
                items = [Metric(k, v, r["time_ms"], r["step"]) for r in run for k, v in r["metrics"].items()]
                for i in range(0, len(items), MAX_METRICS_PER_BATCH):
                    self.client.log_batch(self.run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])
                done += len(run)
                self.metrics_sent += len(items)
        except Exception as e:
            raise BatchFailed(done, e) from e

    def _op_metrics(self, rec: Record) -> None:
        self._log_metric_records([rec])

    def _op_params(self, rec: Record) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in rec["params"].items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def _op_tags(self, rec: Record) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])

    def _op_artifact(self, rec: Record) -> None:
        path = rec["path"]
        if os.path.isdir(path):
            self.client.log_artifacts(self.run_id, path, rec.get("artifact_path"))
        else:
            self.client.log_artifact(self.run_id, path, rec.get("artifact_path"))

    def _op_table(self, rec: Record) -> None:
        # mlflow.log_table's format: readable with mlflow.load_table(artifact_file, run_ids=[...])
        self.client.log_table(self.run_id, data=dict(rec["data"]), artifact_file=rec["artifact_file"])

    def _op_model(self, rec: Record) -> None:
        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model

        # Mirrors mlflow.models.Model.log but through this client, so the model lands in
        # this run's experiment on this URI whatever the process-global MLflow state is.
        lm = self.client.create_logged_model(
            self.experiment_id, name=rec["name"], source_run_id=self.run_id,
            tags={"rl2fx.step": str(rec["step"]), "rl2fx.flavor": rec["flavor"]},
        )
        mlmodel_path = os.path.join(rec["dir"], "MLmodel")
        meta = Model.load(mlmodel_path)
        meta.model_uuid = lm.model_id
        meta.model_id = lm.model_id
        meta.run_id = self.run_id
        meta.artifact_path = lm.artifact_location
        meta.save(mlmodel_path)
        self.client.log_model_artifacts(lm.model_id, rec["dir"])
        self.client.log_outputs(self.run_id, [LoggedModelOutput(lm.model_id, step=rec["step"])])
        self.client.finalize_logged_model(lm.model_id, "READY")
        self.logged_models.append({
            "name": rec["name"], "step": rec["step"], "model_id": lm.model_id,
            "model_uri": f"models:/{lm.model_id}", "artifact_location": lm.artifact_location,
            "run_id": self.run_id, "flavor": rec["flavor"],
        })

    def _op_finish(self, rec: Record) -> None:
        self.client.set_terminated(self.run_id, status=rec["status"], end_time=rec["time_ms"])


# --------------------------------------------------------------------------------------
# Weights & Biases


class WandbBackend:
    """Applies records to one ``wandb`` run, created by the ``start`` record."""

    name = "wandb"

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.mode = config.resolved_wandb_mode()
        self.run: Any = None

    def apply(self, rec: Record) -> None:
        """Apply one record (see :mod:`rl2fx.tracking.records`)."""
        getattr(self, "_op_" + rec["op"])(rec)

    def apply_many(self, recs: Sequence[Record]) -> None:
        """Apply records in order (``run.log`` already queues to W&B's writer process)."""
        _apply_each(self, recs)

    def _op_start(self, rec: Record) -> None:
        # Never prompt, never print: a missing login must not block or clutter training.
        with scoped_env({}, {"WANDB_SILENT": "true"}):
            import wandb

            settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
            directory = self.config.wandb_dir or os.environ.get("WANDB_DIR") or os.getcwd()
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(
                project=self.config.resolved_wandb_project(), entity=self.config.wandb_entity,
                name=rec.get("run_name"), dir=directory, mode=self.mode,
                tags=self.config.tag_list() or None, settings=settings, reinit="create_new",
                config={"rl2fx.tracker_id": rec["tracker_id"]},
            )
        # A custom x-axis: W&B drops rows whose internal step goes backwards, which
        # replayed or out-of-order steps (system metrics) would otherwise trigger.
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def _op_metrics(self, rec: Record) -> None:
        self.run.log({**rec["metrics"], "global_step": rec["step"]})

    def _op_params(self, rec: Record) -> None:
        self.run.config.update(rec["params"], allow_val_change=True)

    def _op_tags(self, rec: Record) -> None:
        new = [k if v == "true" else f"{k}:{v}" for k, v in rec["tags"].items()]
        self.run.tags = tuple(dict.fromkeys([*(self.run.tags or ()), *new]))

    def _op_artifact(self, rec: Record) -> None:
        import wandb

        path = rec["path"]
        art = wandb.Artifact(safe_name(Path(path).name), type="file",
                             metadata={"artifact_path": rec.get("artifact_path")})
        if os.path.isdir(path):
            art.add_dir(path)
        else:
            art.add_file(path)
        self.run.log_artifact(art)

    def _op_table(self, rec: Record) -> None:
        import wandb

        cols = list(rec["data"])
        rows = [list(r) for r in zip(*(rec["data"][c] for c in cols), strict=True)]
        key = rec["artifact_file"].rsplit(".", 1)[0].replace("/", "_")
        self.run.log({key: wandb.Table(columns=cols, data=rows), "global_step": rec["step"]})

    def _op_model(self, rec: Record) -> None:
        import wandb

        art = wandb.Artifact(safe_name(rec["name"]), type="model",
                             metadata={"step": rec["step"], "flavor": rec["flavor"]})
        art.add_dir(rec["dir"])
        self.run.log_artifact(art, aliases=["latest", f"step-{rec['step']}"])

    def _op_finish(self, rec: Record) -> None:
        self.run.finish(exit_code=0 if rec["status"] == "FINISHED" else 1)


# --------------------------------------------------------------------------------------
# runs a killed process left RUNNING


def _client_for(tracking_uri: str | None) -> Any:
    cfg = ExperimentConfig(tracking_uri=tracking_uri, enable_wandb=False, log_system_metrics=False)
    return MlflowBackend(cfg).make_client()


def running_runs(experiment_name: str, *, tracking_uri: str | None = None) -> list[str]:
    """Ids of the runs of ``experiment_name`` still marked ``RUNNING``, newest first.

    A process killed without :meth:`~rl2fx.tracking.tracker.ExperimentTracker.finish`
    leaves its run ``RUNNING`` for ever; resume it (``ExperimentConfig(run_id=...)``)
    or close it with :func:`end_run`. ``tracking_uri`` defaults as in
    :class:`~rl2fx.tracking.config.ExperimentConfig`. An unknown experiment has none.
    """
    client = _client_for(tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'",
                              order_by=["attributes.start_time DESC"], max_results=1000)
    return [r.info.run_id for r in runs]


def end_run(run_id: str, status: str = "KILLED", *, tracking_uri: str | None = None) -> str:
    """Mark MLflow run ``run_id`` as ended with ``status``; return the status it had before.

    ``status`` is ``"KILLED"`` (default), ``"FAILED"`` or ``"FINISHED"``; the end time
    is now. Use it for runs whose process died while they were ``RUNNING``.
    """
    from rl2fx._typing import check_choice

    check_choice("status", status, RUN_END_STATUSES)
    client = _client_for(tracking_uri)
    before = client.get_run(run_id).info.status
    client.set_terminated(run_id, status=status)
    return str(before)
