"""One tracking API fanned out to MLflow and Weights & Biases, that never stops training.

:class:`ExperimentTracker` turns every call (metrics, params, tags, artifacts,
models, run start and end) into a small *record* and hands it to each enabled
backend. A backend that fails (tracking server down, disk full, W&B error) is
marked *down*: the tracker warns once, appends that backend's records to a local
JSON-lines buffer (copying files and models next to it, so nothing depends on the
caller keeping them), and keeps going. :meth:`ExperimentTracker.replay` pushes the
buffer in its original order once the backend is reachable again; the tracker also
tries by itself every ``retry_interval`` seconds and once more at :meth:`finish`.
Records keep their original timestamps and steps, so a replayed run reads exactly
like one that never lost its server.

Under ``torch.distributed`` only global rank 0 logs; other ranks get a tracker
whose methods return immediately (the ``RANK`` environment variable is used when
the process group is not initialised yet, as set by ``torchrun``).

Backends (all local by default, no network needed):

- MLflow through :class:`mlflow.MlflowClient` on the configured URI (an embedded
  SQLite store by default). Models are MLflow 3 *logged models* written with the
  PyTorch flavour (or the transformers flavour for pipelines and model+tokenizer
  pairs) and linked to the run as outputs at their ``step``.
- W&B with ``mode="offline"`` unless an API key is configured; metrics are plotted
  against a ``global_step`` axis so out-of-order or replayed steps are never dropped.

System metrics (CPU %, system memory, process RSS, GPU utilisation/memory when a
GPU is present) are sampled with MLflow's own collectors
(:mod:`mlflow.system_metrics.metrics`) in a background thread and logged under
``system/`` through the same fail-safe path, to both backends.

>>> tracker = ExperimentTracker(ExperimentConfig(enable_mlflow=False, enable_wandb=False,
...                                              log_system_metrics=False))
>>> with tracker:
...     tracker.log_metrics({"reward": 0.5, "kl_div": 0.01}, step=100)
...     tracker.log_params({"actor": {"lr": 1e-6, "kl": {"coef": 0.0}}})
>>> tracker.params
{'actor.lr': '1e-06', 'actor.kl.coef': '0.0'}
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import json
import logging
import numbers
import os
import re
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

from rl2fx.tracking.config import ExperimentConfig

__all__ = [
    "ExperimentTracker",
    "ExperimentConfig",
    "TrackingWarning",
    "flatten_params",
    "global_rank",
    "read_buffer",
    "save_model_locally",
]

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation): checked here so that an invalid call
# raises at the caller instead of sitting in the buffer forever.
_MAX_PARAM_VALUE = 6000
_MAX_KEY = 250
_KEY_RE = re.compile(r"^[/\w.\- :]+$")
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100


class TrackingWarning(RuntimeWarning):
    """A tracking backend failed; training continues and its calls are buffered."""


# --------------------------------------------------------------------------------------
# helpers


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


def _to_container(params: Any) -> Any:
    """Plain Python containers from OmegaConf nodes, dataclasses and namespaces."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(params, DictConfig | ListConfig):
            return OmegaConf.to_container(params, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    if isinstance(params, argparse.Namespace):
        return vars(params)
    return params


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | bool | numbers.Number)


def flatten_params(params: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into ``{"dotted.key": "value"}`` strings.

    Accepts mappings, OmegaConf ``DictConfig`` (interpolations resolved),
    dataclass instances and ``argparse.Namespace``, nested in any combination.
    A list of scalars becomes one JSON value; a list holding mappings is indexed
    (``key.0.sub``). Values are ``str(value)`` (``None`` -> ``"None"``).

    >>> flatten_params({"actor": {"lr": 1e-6, "kl": {"coef": 0.0}}, "objectives": ["reward", "kl"]})
    {'actor.lr': '1e-06', 'actor.kl.coef': '0.0', 'objectives': '["reward", "kl"]'}
    """
    out: dict[str, str] = {}
    params = _to_container(params)
    if isinstance(params, Mapping):
        for k, v in params.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            v = _to_container(v)
            if isinstance(v, Mapping):
                if not v:
                    out[key] = "{}"
                out.update(flatten_params(v, key))
            elif isinstance(v, list | tuple) and not all(_is_scalar(x) for x in v):
                for i, item in enumerate(v):
                    out.update(flatten_params({str(i): item}, key))
            elif isinstance(v, list | tuple):
                out[key] = json.dumps(list(v))
            else:
                out[key] = str(v)
        return out
    raise ValueError(
        f"params={params!r} is invalid; expected a mapping, an OmegaConf DictConfig, "
        "a dataclass instance or an argparse.Namespace"
    )


def _metric_value(key: str, value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Number):
        return float(value)  # type: ignore[arg-type]
    item = getattr(value, "item", None)  # torch / numpy scalars
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    if callable(item):
        try:
            n = numel() if callable(numel) else numel
            if n is None or n == 1:
                return float(item())
        except (TypeError, ValueError):
            pass
    raise ValueError(
        f"metric {key!r} has value {value!r}; expected a number or a one-element tensor/array"
    )


def _check_key(kind: str, key: Any) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key) or len(key) > _MAX_KEY:
        raise ValueError(
            f"{kind} name {key!r} is invalid; expected 1-{_MAX_KEY} characters of letters, digits, "
            "'_', '-', '.', ' ', ':' or '/'"
        )
    return key


def _now_ms() -> int:
    return int(time.time() * 1000)


def _safe_name(name: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^\w.\-]", "-", name).strip("-") or "artifact"


def read_buffer(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records in a tracker's JSON-lines buffer file, oldest first.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "b.jsonl"
    >>> _ = p.write_text('{"backend": "mlflow", "op": "metrics"}\\n')
    >>> read_buffer(p)
    [{'backend': 'mlflow', 'op': 'metrics'}]
    """
    p = Path(path)
    if not p.exists():
        return []
    with p.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------
# local model serialisation, shared by both backends


def _is_transformers_pipeline(model: Any) -> bool:
    try:
        from transformers import Pipeline
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, Pipeline)


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
# backends: each applies one record; the tracker decides what happens on failure


class _MlflowBackend:
    name = "mlflow"

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.tracking_uri = config.resolved_tracking_uri()
        self.registry_uri = config.resolved_registry_uri()
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.logged_models: list[dict[str, Any]] = []
        if self.tracking_uri.startswith(("http://", "https://")):
            # A down server must fail fast into the buffer, not retry for minutes
            # (MLflow's defaults: 7 retries with exponential backoff, 120 s timeout).
            for env, value, default in (
                ("MLFLOW_HTTP_REQUEST_TIMEOUT", config.http_timeout, 10),
                ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", config.http_max_retries, 1),
                ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", None, 1),
            ):
                if value is not None:
                    os.environ[env] = str(value)
                else:
                    os.environ.setdefault(env, str(default))

    def apply(self, rec: dict[str, Any]) -> None:
        getattr(self, "_op_" + rec["op"])(rec)

    def _op_start(self, rec: dict[str, Any]) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self.tracking_uri, self.registry_uri)
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

    def _op_metrics(self, rec: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        items = [Metric(k, v, rec["time_ms"], rec["step"]) for k, v in rec["metrics"].items()]
        for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _MAX_METRICS_PER_BATCH])

    def _op_params(self, rec: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in rec["params"].items()]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])

    def _op_tags(self, rec: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])

    def _op_artifact(self, rec: dict[str, Any]) -> None:
        path = rec["path"]
        if os.path.isdir(path):
            self.client.log_artifacts(self.run_id, path, rec.get("artifact_path"))
        else:
            self.client.log_artifact(self.run_id, path, rec.get("artifact_path"))

    def _op_model(self, rec: dict[str, Any]) -> None:
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

    def _op_finish(self, rec: dict[str, Any]) -> None:
        self.client.set_terminated(self.run_id, status=rec["status"], end_time=rec["time_ms"])


class _WandbBackend:
    name = "wandb"

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.mode = config.resolved_wandb_mode()
        self.run: Any = None

    def apply(self, rec: dict[str, Any]) -> None:
        getattr(self, "_op_" + rec["op"])(rec)

    def _op_start(self, rec: dict[str, Any]) -> None:
        # Never prompt, never print: a missing login must not block or clutter training.
        os.environ.setdefault("WANDB_SILENT", "true")
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

    def _op_metrics(self, rec: dict[str, Any]) -> None:
        self.run.log({**rec["metrics"], "global_step": rec["step"]})

    def _op_params(self, rec: dict[str, Any]) -> None:
        self.run.config.update(rec["params"], allow_val_change=True)

    def _op_tags(self, rec: dict[str, Any]) -> None:
        new = [k if v == "true" else f"{k}:{v}" for k, v in rec["tags"].items()]
        self.run.tags = tuple(dict.fromkeys([*(self.run.tags or ()), *new]))

    def _op_artifact(self, rec: dict[str, Any]) -> None:
        import wandb

        path = rec["path"]
        art = wandb.Artifact(_safe_name(Path(path).name), type="file",
                             metadata={"artifact_path": rec.get("artifact_path")})
        if os.path.isdir(path):
            art.add_dir(path)
        else:
            art.add_file(path)
        self.run.log_artifact(art)

    def _op_model(self, rec: dict[str, Any]) -> None:
        import wandb

        art = wandb.Artifact(_safe_name(rec["name"]), type="model",
                             metadata={"step": rec["step"], "flavor": rec["flavor"]})
        art.add_dir(rec["dir"])
        self.run.log_artifact(art, aliases=["latest", f"step-{rec['step']}"])

    def _op_finish(self, rec: dict[str, Any]) -> None:
        self.run.finish(exit_code=0 if rec["status"] == "FINISHED" else 1)


# --------------------------------------------------------------------------------------
# system metrics sampled with MLflow's collectors


class _SystemSampler:
    def __init__(self) -> None:
        import psutil
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

        self._process = psutil.Process()
        self.monitors: list[Any] = [CPUMonitor()]
        try:
            import torch

            if torch.cuda.is_available():
                from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

                self.monitors.append(GPUMonitor())  # needs pynvml (nvidia-ml-py)
        except Exception:
            self.monitors.append(_TorchCudaMonitor())
        psutil.cpu_percent()  # the first reading is always 0.0; prime it

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in self.monitors:
            m.collect_metrics()
            out.update(m.aggregate_metrics())
            m.clear_metrics()
        out["process_memory_rss_megabytes"] = self._process.memory_info().rss / 1e6
        return {f"system/{k}": float(v) for k, v in out.items()}


class _TorchCudaMonitor:
    """GPU memory from torch when pynvml is unavailable."""

    def __init__(self) -> None:
        self._metrics: dict[str, float] = {}

    def collect_metrics(self) -> None:
        import torch

        for i in range(torch.cuda.device_count()):
            self._metrics[f"gpu_{i}_memory_allocated_megabytes"] = torch.cuda.memory_allocated(i) / 1e6
            self._metrics[f"gpu_{i}_memory_reserved_megabytes"] = torch.cuda.memory_reserved(i) / 1e6

    def aggregate_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def clear_metrics(self) -> None:
        self._metrics = {}


# --------------------------------------------------------------------------------------
# the tracker

_LIVE: weakref.WeakSet[ExperimentTracker] = weakref.WeakSet()


def _finish_live_trackers() -> None:
    for t in list(_LIVE):
        try:
            t.finish()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass


class ExperimentTracker:
    """Log metrics, params, artifacts, models and system metrics to MLflow and W&B.

    The call that starts a run is the constructor; use it as a context manager (or
    call :meth:`finish`) to end the run with ``FINISHED`` or ``FAILED`` status.

    Args:
        config: an :class:`~rl2fx.tracking.config.ExperimentConfig`.

    Failure model: every backend call is a record. When a backend raises, the
    tracker emits one :class:`TrackingWarning` for that outage, appends the record
    (and all later records for that backend, keeping their order) to
    ``config.buffer_dir/<run>.jsonl``, copies referenced files and models beside
    it, and continues. :meth:`replay` (also tried automatically every
    ``config.retry_interval`` seconds and at :meth:`finish`) applies the buffered
    records in order; those applied are removed from the file. Invalid input
    (a non-numeric metric, a bad name, a param changed after it was logged, a
    missing file) raises ``ValueError``/``FileNotFoundError`` at the call instead.

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
        self._lock = threading.RLock()
        self._backends: list[Any] = []
        self._down: dict[str, float] = {}  # backend name -> monotonic time of the last failure
        self._buffer_path = Path(config.buffer_dir).absolute() / f"{self.id}.jsonl"
        self._model_tmp: tempfile.TemporaryDirectory[str] | None = None
        self._sampler: _SystemSampler | None = None
        self._sampler_thread: threading.Thread | None = None
        self._stop = threading.Event()
        if not self.active:
            return
        if config.enable_mlflow:
            self._backends.append(_MlflowBackend(config))
        if config.enable_wandb:
            wb = _WandbBackend(config)
            if wb.mode != "disabled":
                self._backends.append(wb)
        self._dispatch({"op": "start", "tracker_id": self.id, "tags": config.tag_dict(),
                        "run_name": config.run_name})
        _LIVE.add(self)
        # Registered after wandb.init, so (atexit being LIFO) it runs before W&B's own hook.
        atexit.register(_finish_live_trackers)
        if config.log_system_metrics:
            self._sampler = _SystemSampler()
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
        return self._buffer_path

    @property
    def down_backends(self) -> list[str]:
        """Names of backends currently failing (their calls go to the buffer)."""
        return sorted(self._down)

    def buffered(self) -> list[dict[str, Any]]:
        """Records waiting in the buffer, oldest first."""
        with self._lock:
            return read_buffer(self._buffer_path)

    # -- logging API -----------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log scalar metrics at ``step`` (default: the last step seen) to every backend.

        Values may be Python numbers, bools, or one-element tensors/arrays.
        """
        if not self.active:
            return
        if not isinstance(metrics, Mapping):
            raise ValueError(f"metrics={metrics!r} is invalid; expected a mapping of names to numbers")
        clean = {_check_key("metric", k): _metric_value(k, v) for k, v in metrics.items()}
        if step is None:
            step = self.last_step
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step={step!r} is invalid; expected a non-negative integer")
        with self._lock:
            if not any(k.startswith("system/") for k in clean):
                self.last_step = int(step)
            self.latest_metrics.update(clean)
            self._dispatch({"op": "metrics", "metrics": clean, "step": int(step)})

    def log_params(self, params: Any) -> None:
        """Log hyperparameters, flattened to dotted keys (see :func:`flatten_params`).

        Accepts a (nested) mapping, an OmegaConf config, a dataclass or a namespace.
        Logging the same key again with the same value is a no-op; a different value
        raises ``ValueError`` (MLflow params are immutable within a run).
        """
        if not self.active:
            return
        flat = flatten_params(params)
        new: dict[str, str] = {}
        for k, v in flat.items():
            _check_key("param", k)
            if len(v) > _MAX_PARAM_VALUE:
                raise ValueError(
                    f"param {k!r} has a {len(v)}-character value; MLflow allows at most "
                    f"{_MAX_PARAM_VALUE} (log it with log_config or log_artifact instead)"
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
            self._dispatch({"op": "params", "params": new})

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

        container = _to_container(config)
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(yaml.safe_dump(json.loads(json.dumps(container, default=str)), sort_keys=False))
            self.log_artifact(p, artifact_path="config")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (MLflow key/value; W&B gets ``key:value`` strings)."""
        if not self.active:
            return
        clean = {_check_key("tag", str(k)): str(v) for k, v in tags.items()}
        with self._lock:
            self._dispatch({"op": "tags", "tags": clean})

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file or a directory as a run artifact (under ``artifact_path`` if given)."""
        if not self.active or not self.config.log_artifacts:
            return
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"path={str(path)!r} does not exist; cannot log it as an artifact")
        with self._lock:
            self._dispatch({"op": "artifact", "path": str(p.absolute()), "artifact_path": artifact_path})

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
        _check_key("model", name)
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step={step!r} is invalid; expected a non-negative integer")
        with self._lock:
            if self._model_tmp is None:
                self._model_tmp = tempfile.TemporaryDirectory(prefix="rl2fx-models-")
            d = Path(self._model_tmp.name) / f"{_safe_name(name)}-step{step}-{uuid.uuid4().hex[:8]}"
            used = save_model_locally(model, d, flavor=flavor, tokenizer=tokenizer, task=task)
            mlf = self._backend("mlflow")
            before = len(mlf.logged_models) if mlf is not None else 0
            self._dispatch({"op": "model", "dir": str(d), "name": name, "step": int(step), "flavor": used})
            if mlf is not None and len(mlf.logged_models) > before:
                return dict(mlf.logged_models[-1])
            return None

    def log_system_metrics(self, step: int | None = None) -> dict[str, float]:
        """Sample CPU, memory and GPU usage now and log them under ``system/``; return them."""
        if not self.active:
            return {}
        if self._sampler is None:
            self._sampler = _SystemSampler()
        values = self._sampler.sample()
        self.log_metrics(values, step=self.last_step if step is None else step)
        return values

    # -- replay and finish ---------------------------------------------------------------
    def replay(self) -> int:
        """Push buffered records to their backends, in order; return how many were applied.

        Records a backend still refuses stay in the buffer (with everything after them
        for that backend); call again later. A backend whose records are all applied
        is back up: new calls go straight to it.
        """
        if not self.active:
            return 0
        with self._lock:
            records = read_buffer(self._buffer_path)
            if not records:
                self._down.clear()
                return 0
            applied = 0
            keep: list[dict[str, Any]] = []
            stuck: set[str] = set()
            for rec in records:
                b = self._backend(rec["backend"])
                if b is None or rec["backend"] in stuck:
                    keep.append(rec)
                    continue
                try:
                    b.apply(rec)
                    applied += 1
                except Exception as e:
                    stuck.add(rec["backend"])
                    keep.append(rec)
                    self._down[rec["backend"]] = time.monotonic()
                    log.info("rl2fx tracking: replay to %s still failing: %s", rec["backend"], e)
            self._write_buffer(keep)
            for b in self._backends:
                if b.name not in stuck and b.name in self._down:
                    del self._down[b.name]
                    log.warning("rl2fx tracking: %s is back; replayed its buffered calls", b.name)
            return applied

    def finish(self, status: str = "FINISHED") -> None:
        """End the run in every backend (``FINISHED``, ``FAILED`` or ``KILLED``); idempotent.

        Stops the system-metrics thread and tries one last :meth:`replay`; whatever is
        still buffered stays in :attr:`buffer_path` for a later ``replay``.
        """
        from rl2fx._typing import check_choice

        check_choice("status", status, ("FINISHED", "FAILED", "KILLED"))
        if not self.active or self.finished:
            return
        self._stop.set()
        if self._sampler_thread is not None and self._sampler_thread is not threading.current_thread():
            self._sampler_thread.join(timeout=30)
        with self._lock:
            self.finished = True
            if self._down:
                self.replay()
            self._dispatch({"op": "finish", "status": status})
            _LIVE.discard(self)
            if self._down:
                warnings.warn(
                    f"rl2fx tracking: {', '.join(self.down_backends)} still unreachable at finish; "
                    f"{len(self.buffered())} calls remain in {self._buffer_path} "
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

    def _dispatch(self, rec: dict[str, Any]) -> None:
        rec = {"time_ms": _now_ms(), **rec}
        for b in self._backends:
            brec = {"backend": b.name, **rec}
            if b.name in self._down:
                if time.monotonic() - self._down[b.name] >= self.config.retry_interval:
                    self._down[b.name] = time.monotonic()
                    self.replay()
                if b.name in self._down:
                    self._buffer(brec)
                    continue
            try:
                b.apply(brec)
            except Exception as e:
                self._down[b.name] = time.monotonic()
                warnings.warn(
                    f"rl2fx tracking: {b.name} failed on '{rec['op']}' ({type(e).__name__}: {e}); "
                    f"training continues and its calls are buffered to {self._buffer_path}; "
                    "tracker.replay() pushes them when it is back",
                    TrackingWarning, stacklevel=3,
                )
                self._buffer(brec)

    def _buffer(self, rec: dict[str, Any]) -> None:
        # Keep private copies of files: the caller may delete or overwrite them before replay.
        if rec["op"] in ("artifact", "model"):
            key = "path" if rec["op"] == "artifact" else "dir"
            src = Path(rec[key])
            dst = self._buffer_path.with_suffix("") / "files" / rec["backend"] / f"{uuid.uuid4().hex[:8]}" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
            rec = {**rec, key: str(dst)}
        self._buffer_path.parent.mkdir(parents=True, exist_ok=True)
        with self._buffer_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _write_buffer(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            self._buffer_path.unlink(missing_ok=True)
            return
        tmp = self._buffer_path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._buffer_path)  # atomic: a crash mid-replay loses nothing
