"""Experiment tracking and model versioning on MLflow and Weights & Biases.

- :class:`ExperimentConfig` (``config.py``): which backends, where they store.
- :class:`ExperimentTracker` (``tracker.py``): one logging API fanned out to both
  backends, rank-0 only; metrics are sent in batches by a background thread.
- ``records.py``: validation and flattening of metrics, params and names.
- ``buffer.py``: the fsync'd JSON-lines outage buffer and its batched replay
  (:func:`replay_buffer` for buffers left behind by other processes).
- ``backends.py``: MLflow and W&B behind one ``Backend`` protocol; :func:`end_run`
  and :func:`running_runs` for runs a killed process left ``RUNNING``.
- ``system.py``: CPU, memory and GPU sampling.
- ``writer_process.py``: the optional child process that writes MLflow metric batches.
- :class:`ModelVersioning` (``versioning.py``): semantic versions and
  development/staging/production aliases on the MLflow model registry.

Imports are lazy so that ``import rl2fx.tracking`` does not load MLflow or W&B.

>>> from rl2fx.tracking import ExperimentConfig
>>> ExperimentConfig().experiment_name
'RL2_PPO_Experiment'
"""

from __future__ import annotations

from rl2fx._lazy import lazy_exports

_LAZY = {
    "ExperimentConfig": "rl2fx.tracking.config",
    "ExperimentTracker": "rl2fx.tracking.tracker",
    "TrackingWarning": "rl2fx.tracking.tracker",
    "flatten_params": "rl2fx.tracking.records",
    "read_buffer": "rl2fx.tracking.buffer",
    "replay_buffer": "rl2fx.tracking.buffer",
    "save_model_locally": "rl2fx.tracking.backends",
    "end_run": "rl2fx.tracking.backends",
    "running_runs": "rl2fx.tracking.backends",
    "ModelVersioning": "rl2fx.tracking.versioning",
    "ModelVersionInfo": "rl2fx.tracking.versioning",
    "STAGES": "rl2fx.tracking.versioning",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports('rl2fx.tracking', _LAZY, globals())
