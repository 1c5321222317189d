"""Experiment tracking and model versioning on MLflow and Weights & Biases.

- :class:`ExperimentConfig` (``config.py``): which backends, where they store.
- :class:`ExperimentTracker` (``tracker.py``): one logging API fanned out to both
  backends, rank-0 only, with a local JSON-lines buffer that survives outages.
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
    "flatten_params": "rl2fx.tracking.tracker",
    "read_buffer": "rl2fx.tracking.tracker",
    "replay_buffer": "rl2fx.tracking.tracker",
    "save_model_locally": "rl2fx.tracking.tracker",
    "ModelVersioning": "rl2fx.tracking.versioning",
    "ModelVersionInfo": "rl2fx.tracking.versioning",
    "STAGES": "rl2fx.tracking.versioning",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports('rl2fx.tracking', _LAZY, globals())
