"""Hyperparameter tuning: search spaces, samplers (random, grid, BoTorch, skopt), ask/tell studies.

>>> from rl2fx import tuning as T
>>> T.Study.__name__, T.HyperparameterTuner.__name__
('Study', 'HyperparameterTuner')
"""

from rl2fx.tuning.samplers import (
    BayesianSampler,
    GridSampler,
    RandomSampler,
    SkoptSampler,
    StudyExhausted,
    make_sampler,
)
from rl2fx.tuning.space import HyperparameterConfig, create_ppo_hyperparameter_configs
from rl2fx.tuning.study import Study, StudyState, Trial, study_ask, study_tell
from rl2fx.tuning.tuner import HyperparameterTuner

__all__ = [
    "BayesianSampler",
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
