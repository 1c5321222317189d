"""Hyperparameter tuning: search spaces, samplers (random, grid, BoTorch, skopt), ask/tell studies, pruners,
and the storages that let several workers share a study (a directory, or a SQL database).

>>> from rl2fx import tuning as T
>>> T.Study.__name__, T.HyperparameterTuner.__name__
('Study', 'HyperparameterTuner')
"""

from rl2fx.tuning.plot import plot_pareto_front
from rl2fx.tuning.pruners import (
    HyperbandPruner,
    MedianPruner,
    NopPruner,
    SuccessiveHalvingPruner,
    TrialPruned,
    make_pruner,
)
from rl2fx.tuning.samplers import (
    BayesianSampler,
    GridSampler,
    RandomSampler,
    SkoptSampler,
    StudyExhausted,
    make_sampler,
)
from rl2fx.tuning.space import HyperparameterConfig, create_ppo_hyperparameter_configs
from rl2fx.tuning.storage import DatabaseStorage, DirectoryStorage, StorageError, StudyStorage
from rl2fx.tuning.study import (
    Study,
    StudyState,
    Trial,
    TrialBudgetReached,
    study_ask,
    study_report,
    study_tell,
)
from rl2fx.tuning.tuner import HyperparameterTuner

__all__ = [
    "BayesianSampler",
    "DatabaseStorage",
    "DirectoryStorage",
    "StorageError",
    "StudyStorage",
    "TrialBudgetReached",
    "HyperbandPruner",
    "MedianPruner",
    "NopPruner",
    "SuccessiveHalvingPruner",
    "TrialPruned",
    "make_pruner",
    "plot_pareto_front",
    "study_report",
    "GridSampler",
    "HyperparameterConfig",
    "HyperparameterTuner",
    "RandomSampler",
    "SkoptSampler",
    "Study",
    "StudyExhausted",
    "StudyState",
    "Trial",
    "create_ppo_hyperparameter_configs",
    "make_sampler",
    "study_ask",
    "study_tell",
]
