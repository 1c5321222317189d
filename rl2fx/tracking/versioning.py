"""Semantic model versions and stage aliases on the MLflow model registry.

:class:`ModelVersioning` registers models logged by an
:class:`~rl2fx.tracking.tracker.ExperimentTracker` in the MLflow model registry and
gives each registry version a semantic version ``major.minor.patch``, stored as the
model-version tag ``semver`` (the registry's own integer version stays as
``registry_version``).

Automatic bump rules (``enable_auto_versioning=True``, ``bump=None``), against the
highest existing semantic version of the same registered model:

- **major** when the *architecture signature* changes: a SHA-256 over the
  ``state_dict`` names, shapes and dtypes plus the Hugging Face ``config`` (if any).
  Checkpoints of the two versions are not interchangeable.
- **minor** when the *config signature* changes: a SHA-256 over the run's logged
  hyperparameters (:attr:`ExperimentTracker.params`). Same architecture, trained
  differently.
- **patch** otherwise (same architecture and config, new weights: a later
  checkpoint of the same training).

``bump="major" | "minor" | "patch"`` forces a part; with auto-versioning off the
default is ``"patch"``. The first registration is ``1.0.0``.

Stages are registry *aliases* (MLflow deprecated the old stage field):
``development``, ``staging``, ``production``. Each alias points at exactly one
version, so promoting a version moves the alias off the previous one. A fresh
registration gets the ``development`` alias unless ``stage=None``.

Each version also keeps a snapshot of the tracker's latest metrics at registration
time (tags ``metric.<name>``), so two versions from one run still compare
meaningfully.

>>> bump_version(None, "patch"), bump_version("1.2.3", "patch"), bump_version("1.2.3", "minor")
('1.0.0', '1.2.4', '1.3.0')
>>> bump_version("1.2.3", "major")
'2.0.0'
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from rl2fx._typing import check_choice

__all__ = [
    "ModelVersioning",
    "ModelVersionInfo",
    "STAGES",
    "bump_version",
    "architecture_signature",
    "config_signature",
]

#: Registry aliases used as stages.
STAGES = ("development", "staging", "production")
_BUMPS = ("major", "minor", "patch")
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
_NAME = re.compile(r"^[\w.\- /]+$")
# Hugging Face config keys that change without the architecture changing.
_VOLATILE_HF_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "torch_dtype", "dtype"}


def bump_version(version: str | None, part: str) -> str:
    """Next semantic version after ``version`` (``None``: first version, ``1.0.0``).

    >>> bump_version("0.9.9", "minor")
    '0.10.0'
    """
    check_choice("part", part, _BUMPS)
    if version is None:
        return "1.0.0"
    m = _SEMVER.match(version)
    if m is None:
        raise ValueError(f"version={version!r} is invalid; expected 'major.minor.patch'")
    major, minor, patch = (int(x) for x in m.groups())
    if part == "major":
        return f"{major + 1}.0.0"
    if part == "minor":
        return f"{major}.{minor + 1}.0"
    return f"{major}.{minor}.{patch + 1}"


def _semver_key(v: str) -> tuple[int, int, int]:
    m = _SEMVER.match(v)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (-1, -1, -1)


def architecture_signature(model: Any) -> str:
    """SHA-256 of a model's parameter names, shapes and dtypes (plus its HF config).

    Equal for two checkpoints of one architecture, different when a layer changes.

    >>> import torch
    >>> architecture_signature(torch.nn.Linear(2, 3)) == architecture_signature(torch.nn.Linear(2, 3))
    True
    >>> architecture_signature(torch.nn.Linear(2, 3)) == architecture_signature(torch.nn.Linear(2, 4))
    False
    """
    inner = getattr(model, "model", None)
    if not hasattr(model, "state_dict") and inner is not None:  # a transformers Pipeline
        model = inner
    parts: list[Any] = []
    if hasattr(model, "state_dict"):
        parts.append([(k, list(v.shape), str(v.dtype)) for k, v in model.state_dict().items()])
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict"):
        d = {k: v for k, v in cfg.to_dict().items() if k not in _VOLATILE_HF_KEYS}
        parts.append(d)
    parts.append(type(model).__qualname__)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def config_signature(params: dict[str, str]) -> str:
    """SHA-256 of flattened hyperparameters (order-independent).

    >>> config_signature({"a": "1", "b": "2"}) == config_signature({"b": "2", "a": "1"})
    True
    """
    return hashlib.sha256(json.dumps(sorted(params.items())).encode()).hexdigest()


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version, as read back from the registry."""

    name: str
    version: str  # semantic version, e.g. "1.0.2"
    registry_version: str  # MLflow's integer version, e.g. "3"
    aliases: tuple[str, ...]
    run_id: str | None
    model_id: str | None
    source: str
    description: str | None
    created_ms: int
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def stage(self) -> str | None:
        """The highest stage alias on this version (production > staging > development)."""
        for s in reversed(STAGES):
            if s in self.aliases:
                return s
        return None


class ModelVersioning:
    """Register, version, promote, load and compare models in the MLflow registry.

    Args:
        tracker: an :class:`~rl2fx.tracking.tracker.ExperimentTracker` with MLflow enabled;
            models are logged into its run and versions link back to it.

    Only global rank 0 registers (other ranks' trackers are inactive and
    :meth:`register_model` returns ``None`` there).

    Example (needs a store; see ``tests/test_tracking_mlflow.py``)::

        versioning = ModelVersioning(tracker)
        v = versioning.register_model(model, "ppo_actor", description="Best model")  # "1.0.0"
        versioning.promote("ppo_actor", v, "production")
        same = versioning.load("ppo_actor", "production")
        table = versioning.compare("ppo_actor", "1.0.0", "1.0.1")
    """

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        if tracker.active and tracker._backend("mlflow") is None:
            raise ValueError(
                "ModelVersioning needs the MLflow registry; the tracker has enable_mlflow=False"
            )

    # -- registry access -----------------------------------------------------------------
    @property
    def client(self) -> Any:
        b = self.tracker._backend("mlflow")
        if b is None:
            raise ValueError("ModelVersioning needs an active tracker with MLflow enabled (rank 0)")
        if b.client is None:
            # the run start is still buffered (server down at start): the registry needs a client
            return b.make_client()
        return b.client

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                f"name={name!r} is invalid; expected letters, digits, '_', '-', '.', ' ' or '/'"
            )

    def _versions(self, name: str) -> list[Any]:
        self._check_name(name)
        return list(self.client.search_model_versions(f"name = '{name}'", max_results=10000))

    def _info(self, mv: Any) -> ModelVersionInfo:
        full = self.client.get_model_version(mv.name, mv.version)  # search omits aliases
        tags = dict(full.tags or {})
        metrics = {k[len("metric."):]: float(v) for k, v in tags.items() if k.startswith("metric.")}
        return ModelVersionInfo(
            name=full.name, version=tags.get("semver", ""), registry_version=str(full.version),
            aliases=tuple(sorted(full.aliases or ())), run_id=full.run_id or None,
            model_id=tags.get("rl2fx.model_id") or getattr(full, "model_id", None),
            source=full.source, description=full.description or None,
            created_ms=int(full.creation_timestamp or 0), tags=tags, metrics=metrics,
        )

    def _resolve(self, name: str, ref: str | int | None) -> Any:
        versions = self._versions(name)
        if not versions:
            raise ValueError(f"name={name!r}: no registered model versions; register_model first")
        if ref is None or ref == "latest":
            return max(versions, key=lambda mv: (_semver_key(mv.tags.get("semver", "")), int(mv.version)))
        ref_s = str(ref)
        if _SEMVER.match(ref_s):
            for mv in versions:
                if mv.tags.get("semver") == ref_s:
                    return mv
        elif ref_s.isdigit():
            for mv in versions:
                if str(mv.version) == ref_s:
                    return mv
        else:
            from mlflow.exceptions import MlflowException

            try:
                return self.client.get_model_version_by_alias(name, ref_s)
            except MlflowException:
                pass
        known = sorted((mv.tags.get("semver", "?") for mv in versions), key=_semver_key)
        raise ValueError(
            f"version={ref!r} of model {name!r} not found; known versions {known}, "
            f"stages {list(STAGES)} (when promoted), a registry number, or 'latest'"
        )

    # -- public API ------------------------------------------------------------------------
    def register_model(
        self,
        model: Any,
        name: str,
        description: str | None = None,
        *,
        bump: str | None = None,
        step: int | None = None,
        stage: str | None = "development",
        tokenizer: Any = None,
        task: str | None = None,
        flavor: str = "auto",
    ) -> str | None:
        """Log ``model`` into the tracker's run and register it; return its semantic version.

        ``bump`` forces ``"major"``, ``"minor"`` or ``"patch"``; ``None`` applies the
        automatic rules in the module docstring. ``stage`` (default ``development``)
        is set as an alias on the new version; ``None`` sets none.
        """
        if bump is not None:
            check_choice("bump", bump, _BUMPS)
        if stage is not None:
            check_choice("stage", stage, STAGES)
        self._check_name(name)
        t = self.tracker
        if not t.active:
            return None
        if "mlflow" in t.down_backends:
            t.replay()
        if "mlflow" in t.down_backends:
            raise RuntimeError(
                "the MLflow registry is unreachable; nothing was registered "
                f"(buffered calls wait in {t.buffer_path}; retry after tracker.replay())"
            )
        step = t.last_step if step is None else step
        info = t._log_model(model, name, step, tokenizer=tokenizer, task=task, flavor=flavor)
        if info is None:
            raise RuntimeError(
                f"MLflow failed while logging {name!r}; it is buffered in {t.buffer_path} "
                "and was not registered"
            )
        from mlflow.exceptions import MlflowException

        client = self.client
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        arch, conf = architecture_signature(model), config_signature(t.params)
        versions = self._versions(name)
        latest = max(versions, key=lambda mv: _semver_key(mv.tags.get("semver", "")), default=None)
        prev = latest.tags.get("semver") if latest is not None else None
        if latest is None:
            part, reason = "patch", "first version"
        elif bump is not None:
            part, reason = bump, "requested"
        elif not t.config.enable_auto_versioning:
            part, reason = "patch", "auto-versioning off"
        elif latest.tags.get("rl2fx.arch_signature") != arch:
            part, reason = "major", "architecture changed"
        elif latest.tags.get("rl2fx.config_signature") != conf:
            part, reason = "minor", "training config changed"
        else:
            part, reason = "patch", "same architecture and config"
        semver = bump_version(prev, part)
        tags = {
            "semver": semver, "rl2fx.bump": f"{part}: {reason}",
            "rl2fx.arch_signature": arch, "rl2fx.config_signature": conf,
            "rl2fx.model_id": info["model_id"], "rl2fx.step": str(step),
            "rl2fx.flavor": info["flavor"],
        }
        for k, v in t.latest_metrics.items():
            if not k.startswith("system/"):
                tags[f"metric.{k}"] = repr(float(v))
        # source = the logged model's storage location: MLflow's SQL registry resolves
        # "models:/<id>" through the process-global tracking URI, not this client's.
        mv = client.create_model_version(
            name, source=info["artifact_location"], run_id=info["run_id"], tags=tags,
            description=description, model_id=info["model_id"],
        )
        if stage is not None:
            client.set_registered_model_alias(name, stage, str(mv.version))
        t.set_tags({f"rl2fx.registered.{name}": semver})
        return semver

    def promote(self, name: str, version: str | int, stage: str) -> ModelVersionInfo:
        """Point the ``stage`` alias (development / staging / production) at ``version``.

        ``version`` is a semantic version, a registry number, an alias or ``"latest"``.
        """
        check_choice("stage", stage, STAGES)
        mv = self._resolve(name, version)
        self.client.set_registered_model_alias(name, stage, str(mv.version))
        self.client.set_model_version_tag(name, str(mv.version), f"rl2fx.promoted.{stage}",
                                          str(int(time.time() * 1000)))
        return self._info(mv)

    def get(self, name: str, version: str | int | None = "latest") -> ModelVersionInfo:
        """A version by stage alias, semantic version, registry number or ``"latest"``."""
        return self._info(self._resolve(name, version))

    def list_versions(self, name: str) -> list[ModelVersionInfo]:
        """All versions of ``name``, oldest semantic version first."""
        infos = [self._info(mv) for mv in self._versions(name)]
        return sorted(infos, key=lambda i: _semver_key(i.version))

    def load(self, name: str, version: str | int | None = "latest") -> Any:
        """Load a registered version as a Python object (``nn.Module`` or transformers pipeline)."""
        from mlflow.artifacts import download_artifacts
        from mlflow.models import Model

        mv = self._resolve(name, version)
        b = self.tracker._backend("mlflow")
        with b.env():  # the tracker's HTTP timeout/retry settings, for this call only
            local = download_artifacts(artifact_uri=mv.source, tracking_uri=b.tracking_uri)
        flavors = Model.load(os.path.join(local, "MLmodel")).flavors
        if "pytorch" in flavors:
            import mlflow.pytorch

            return mlflow.pytorch.load_model(local)
        if "transformers" in flavors:
            import mlflow.transformers

            return mlflow.transformers.load_model(local)
        raise ValueError(f"model {name!r} version {version!r} has flavors {sorted(flavors)}; "
                         "expected pytorch or transformers")

    def compare(self, name: str, v1: str | int, v2: str | int) -> Any:
        """Side-by-side table (pandas DataFrame) of two versions' info, metrics and params.

        Index: ``(kind, key)`` with kind in ``info``, ``metric``, ``param``. Columns: the two
        semantic versions, ``delta`` (``v2 - v1`` for metrics) and ``changed``. Metrics are
        the snapshot taken at registration (the run's latest values if there is none).
        """
        import pandas as pd

        a, b = self.get(name, v1), self.get(name, v2)
        client = self.client

        def run_data(info: ModelVersionInfo) -> tuple[dict[str, float], dict[str, str]]:
            if not info.run_id:
                return {}, {}
            d = client.get_run(info.run_id).data
            return dict(d.metrics), dict(d.params)

        (ma, pa), (mb, pb) = run_data(a), run_data(b)
        ma = a.metrics or {k: v for k, v in ma.items() if not k.startswith("system/")}
        mb = b.metrics or {k: v for k, v in mb.items() if not k.startswith("system/")}
        rows: list[tuple[str, str, Any, Any]] = [
            ("info", "registry_version", a.registry_version, b.registry_version),
            ("info", "stage", a.stage, b.stage),
            ("info", "run_id", a.run_id, b.run_id),
            ("info", "created_ms", a.created_ms, b.created_ms),
            ("info", "bump", a.tags.get("rl2fx.bump"), b.tags.get("rl2fx.bump")),
            ("info", "description", a.description, b.description),
        ]
        rows += [("metric", k, ma.get(k), mb.get(k)) for k in sorted(set(ma) | set(mb))]
        rows += [("param", k, pa.get(k), pb.get(k)) for k in sorted(set(pa) | set(pb))]
        ca, cb = (a.version, b.version) if a.version != b.version else (f"{a.version} (a)", f"{b.version} (b)")
        df = pd.DataFrame(
            [{ca: x, cb: y,
              "delta": (y - x) if kind == "metric" and x is not None and y is not None else None,
              "changed": x != y} for kind, _, x, y in rows],
            index=pd.MultiIndex.from_tuples([(k, key) for k, key, _, _ in rows], names=["kind", "key"]),
        )
        return df
