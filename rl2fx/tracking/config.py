"""Configuration of experiment tracking: which backends, where they store, what is logged.

:class:`ExperimentConfig` mirrors the spec's ``experiment_tracking`` YAML section
(``experiment_name``, ``enable_mlflow``, ``enable_wandb``, ``log_models``,
``log_artifacts``, ``log_system_metrics``, ``model_versioning``) and adds the
settings a real deployment needs: where MLflow stores runs, how W&B runs, where
the fail-safe buffer lives.

Defaults never need a network:

- MLflow: ``tracking_uri`` falls back to ``$MLFLOW_TRACKING_URI``, else to an
  embedded SQLite store ``sqlite:///mlruns.db`` in the working directory.
- W&B: ``wandb_mode`` falls back to ``$WANDB_MODE``, else ``"online"`` only when an
  API key is configured (``$WANDB_API_KEY`` or a ``~/.netrc`` entry written by
  ``wandb login``), else ``"offline"``. W&B never prompts for a login.

>>> cfg = ExperimentConfig(experiment_name="demo", tracking_uri="sqlite:////tmp/demo/mlruns.db")
>>> cfg.resolved_artifact_location()
'/tmp/demo/mlartifacts'
>>> ExperimentConfig(wandb_mode="offline").resolved_wandb_mode()
'offline'
>>> ExperimentConfig.from_dict({"experiment_name": "x", "model_versioning": {"enabled": True}}).model_versioning
True
"""

from __future__ import annotations

import dataclasses
import netrc
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rl2fx._typing import check_choice, check_range

__all__ = ["ExperimentConfig", "WANDB_MODES"]

#: Modes accepted by ``wandb.init`` (``None`` means: decide from the environment).
WANDB_MODES = ("online", "offline", "disabled", "shared")

_DEFAULT_SQLITE_NAME = "mlruns.db"


@dataclass
class ExperimentConfig:
    """What the :class:`~rl2fx.tracking.tracker.ExperimentTracker` logs, and where.

    Args:
        experiment_name: MLflow experiment name; also the default W&B project.
        enable_mlflow: Log to MLflow (tracking server, SQLite or file store).
        enable_wandb: Log to Weights & Biases (offline unless an API key is configured).
        log_models: ``log_model`` uploads models; when False it is a no-op.
        log_artifacts: ``log_artifact`` uploads files; when False it is a no-op.
        log_system_metrics: Sample CPU, memory and GPU usage in a background thread
            every ``system_metrics_interval`` seconds (MLflow's own collectors).
        tracking_uri: MLflow tracking URI. ``None``: ``$MLFLOW_TRACKING_URI`` or
            ``sqlite:///mlruns.db`` in the working directory.
        registry_uri: MLflow model-registry URI; ``None``: the tracking URI.
        artifact_location: Artifact root for a newly created experiment. ``None``:
            for a SQLite store, ``mlartifacts/`` next to the database file; otherwise
            the server's default.
        wandb_project: W&B project; ``None``: ``experiment_name``.
        wandb_entity: W&B entity (team or user); ``None``: the account default.
        wandb_mode: ``"online"``, ``"offline"``, ``"disabled"`` or ``"shared"``; ``None``:
            ``$WANDB_MODE``, else online only if an API key is configured.
        wandb_dir: Directory W&B writes its ``wandb/`` run folders under; ``None``:
            ``$WANDB_DIR`` or the working directory.
        tags: Tags set on the run in both backends (a mapping for MLflow key/value
            tags; W&B receives ``key:value`` strings).
        run_name: Run name in both backends; ``None`` lets each backend pick one.
        run_id: MLflow run id of an earlier run to continue (a training job resumed
            from a checkpoint): metrics, params and models go to that run, which is
            set back to ``RUNNING``; ``None`` creates a new run. W&B starts a new run.
        buffer_dir: Where failed calls are buffered as JSON lines (plus copies of
            files and models) until :meth:`ExperimentTracker.replay` pushes them
            (a trainer can point it under its output directory).
        retry_interval: Seconds between automatic attempts to reach a failed backend
            (made by the background writer thread, not by the training thread).
        flush_interval: The background writer sends queued metrics at most once per
            this many seconds, each backend's share in one batch; 0 sends as soon as
            anything is queued. :meth:`ExperimentTracker.flush` sends at once.
        metrics_process: Once a run has logged a thousand metrics, write MLflow metric
            batches from a child process (``python -m rl2fx.tracking.writer_process``)
            instead of the writer thread: MLflow's store does tens of microseconds of
            pure-Python work per metric, which in-process competes with training for
            the GIL. Costs a second interpreter importing MLflow (a few CPU-seconds),
            so it pays only on long runs with spare cores; off by default (see
            docs/performance.md, Tracking). Falls back to in-process writing if the
            child dies.
        system_metrics_interval: Seconds between system-metric samples.
        http_timeout: MLflow HTTP request timeout in seconds for server URIs;
            ``None``: ``$MLFLOW_HTTP_REQUEST_TIMEOUT`` or 10.
        http_max_retries: MLflow HTTP retries for server URIs; ``None``:
            ``$MLFLOW_HTTP_REQUEST_MAX_RETRIES`` or 1 (a down server must not stall
            training: the buffer takes over instead of long retry loops).
        enabled: Master switch (the spec's ``experiment_tracking.enabled``).
        model_versioning: The spec's ``model_versioning.enabled``.
        enable_auto_versioning: Automatic semantic-version bumps in
            :class:`~rl2fx.tracking.versioning.ModelVersioning`.
    """

    experiment_name: str = "RL2_PPO_Experiment"
    enable_mlflow: bool = True
    enable_wandb: bool = True
    log_models: bool = True
    log_artifacts: bool = True
    log_system_metrics: bool = True
    tracking_uri: str | None = None
    registry_uri: str | None = None
    artifact_location: str | None = None
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_mode: str | None = None
    wandb_dir: str | None = None
    tags: Mapping[str, Any] | list[str] | None = None
    run_name: str | None = None
    run_id: str | None = None
    buffer_dir: str = ".rl2fx_tracking_buffer"
    retry_interval: float = 60.0
    flush_interval: float = 1.0
    metrics_process: bool = False
    system_metrics_interval: float = 10.0
    http_timeout: int | None = None
    http_max_retries: int | None = None
    enabled: bool = True
    model_versioning: bool = False
    enable_auto_versioning: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.experiment_name, str) or not self.experiment_name.strip():
            raise ValueError(
                f"experiment_name={self.experiment_name!r} is invalid; expected a non-empty string"
            )
        if self.wandb_mode is not None:
            check_choice("wandb_mode", self.wandb_mode, WANDB_MODES)
        check_range("retry_interval", self.retry_interval, 0.0, float("inf"))
        check_range("flush_interval", self.flush_interval, 0.0, 3600.0)
        if self.run_id is not None and (not isinstance(self.run_id, str) or not self.run_id.strip()):
            raise ValueError(f"run_id={self.run_id!r} is invalid; expected an MLflow run id string or None")
        if not isinstance(self.buffer_dir, str | os.PathLike) or not str(self.buffer_dir):
            raise ValueError(f"buffer_dir={self.buffer_dir!r} is invalid; expected a directory path")
        check_range("system_metrics_interval", self.system_metrics_interval, 1e-3, float("inf"))
        if self.http_timeout is not None:
            check_range("http_timeout", self.http_timeout, 1, 3600)
        if self.http_max_retries is not None:
            check_range("http_max_retries", self.http_max_retries, 0, 10)
        if self.tags is not None and not isinstance(self.tags, Mapping | list | tuple):
            raise ValueError(
                f"tags={self.tags!r} is invalid; expected a mapping of tag names to values or a list of names"
            )

    # -- construction from the spec's YAML section ---------------------------------------
    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | Any) -> ExperimentConfig:
        """Build from the spec's ``experiment_tracking`` section (dict or OmegaConf node).

        The nested ``model_versioning: {enabled, enable_auto_versioning}`` block is
        flattened onto :attr:`model_versioning` and :attr:`enable_auto_versioning`.
        Unknown keys raise ``ValueError`` naming them (a typo must not be ignored).

        >>> ExperimentConfig.from_dict({"enable_wandb": False, "log_models": False}).log_models
        False
        """
        from omegaconf import DictConfig, OmegaConf

        if isinstance(section, DictConfig):  # plain containers all the way down (tags lists)
            section = OmegaConf.to_container(section, resolve=True)
        if not isinstance(section, Mapping):
            raise ValueError(
                f"section={section!r} is invalid; expected a mapping or an OmegaConf DictConfig"
            )
        values = dict(section)
        mv = values.pop("model_versioning", None)
        if isinstance(mv, Mapping):
            mv = dict(mv)
            values["model_versioning"] = bool(mv.pop("enabled", False))
            if "enable_auto_versioning" in mv:
                values["enable_auto_versioning"] = bool(mv.pop("enable_auto_versioning"))
            if mv:
                raise ValueError(
                    f"model_versioning has unknown keys {sorted(mv)}; allowed: enabled, enable_auto_versioning"
                )
        elif mv is not None:
            values["model_versioning"] = bool(mv)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"experiment_tracking has unknown keys {unknown}; allowed: {sorted(names)}"
            )
        return cls(**values)

    # -- resolution of defaults from the environment -------------------------------------
    def resolved_tracking_uri(self) -> str:
        """The MLflow tracking URI: explicit, else ``$MLFLOW_TRACKING_URI``, else SQLite in cwd."""
        if self.tracking_uri:
            return self.tracking_uri
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        # An absolute path: the store must not move if the process changes directory later.
        return "sqlite:///" + str(Path.cwd() / _DEFAULT_SQLITE_NAME)

    def resolved_registry_uri(self) -> str:
        """The MLflow registry URI: explicit, else ``$MLFLOW_REGISTRY_URI``, else the tracking URI."""
        return self.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or self.resolved_tracking_uri()

    def resolved_artifact_location(self) -> str | None:
        """Artifact root for a new experiment (``mlartifacts/`` beside a SQLite database)."""
        if self.artifact_location:
            return self.artifact_location
        uri = self.resolved_tracking_uri()
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///"):])
            if not db.is_absolute():
                db = Path.cwd() / db
            return str(db.parent / "mlartifacts")
        return None

    def resolved_wandb_mode(self) -> str:
        """``wandb_mode``, else ``$WANDB_MODE``, else online iff an API key is configured."""
        if self.wandb_mode is not None:
            return self.wandb_mode
        env = os.environ.get("WANDB_MODE")
        if env:
            # wandb itself accepts "dryrun" and "run" as old spellings
            return {"dryrun": "offline", "run": "online"}.get(env, env)
        return "online" if wandb_api_key_configured() else "offline"

    def resolved_wandb_project(self) -> str:
        """``wandb_project``, else ``$WANDB_PROJECT``, else the experiment name."""
        return self.wandb_project or os.environ.get("WANDB_PROJECT") or self.experiment_name

    def tag_dict(self) -> dict[str, str]:
        """Tags as MLflow key/value strings (a list of names maps each name to ``"true"``)."""
        if self.tags is None:
            return {}
        if isinstance(self.tags, Mapping):
            return {str(k): str(v) for k, v in self.tags.items()}
        return {str(t): "true" for t in self.tags}

    def tag_list(self) -> list[str]:
        """Tags as W&B strings (``key:value``, or the bare name for list tags and ``"true"`` values)."""
        return [k if v == "true" else f"{k}:{v}" for k, v in self.tag_dict().items()]


def wandb_api_key_configured() -> bool:
    """Whether W&B can authenticate without a prompt: ``$WANDB_API_KEY`` or a netrc entry.

    >>> isinstance(wandb_api_key_configured(), bool)
    True
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        auth = netrc.netrc(path).authenticators(host.split(":")[0])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])
