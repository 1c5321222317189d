"""rl2fx: a typed, functional toolkit for the RL side of LLM post-training.

Every name the feature spec uses is importable from here. Imports are lazy so
that ``import rl2fx`` stays fast: heavy back ends (BoTorch, MLflow, W&B,
transformers) load only when the name that needs them is first used.

>>> import rl2fx
>>> callable(rl2fx.reverse_scan)
True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rl2fx._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    # advantage estimators (rl2fx.returns)
    "reverse_scan": "rl2fx.returns.scan",
    "gae": "rl2fx.returns.gae",
    "td_lambda": "rl2fx.returns.gae",
    "discounted": "rl2fx.returns.gae",
    "n_step": "rl2fx.returns.gae",
    "vtrace": "rl2fx.returns.offpolicy",
    "retrace": "rl2fx.returns.offpolicy",
    "clipped_is": "rl2fx.returns.offpolicy",
    "multistep": "rl2fx.returns.multistep",
    "reinforce": "rl2fx.returns.group",
    "grpo": "rl2fx.returns.group",
    "dr_grpo": "rl2fx.returns.group",
    "rloo": "rl2fx.returns.group",
    "reinforce_pp": "rl2fx.returns.group",
    "remax": "rl2fx.returns.group",
    "opo": "rl2fx.returns.group",
    "gpg": "rl2fx.returns.group",
    "grpo_passk": "rl2fx.returns.group",
    "reinforce_pp_baseline": "rl2fx.returns.group",
    "whiten": "rl2fx.returns.whiten",
    "advantages": "rl2fx.returns.unified",
    "compute_advantages_unified": "rl2fx.returns.unified",
    # controllers (rl2fx.control)
    "AdaptiveKLController": "rl2fx.control.kl",
    "LagrangianConstraints": "rl2fx.control.lagrangian",
    "AdaptiveBatchSizer": "rl2fx.control.batch_size",
    # multi-objective (rl2fx.pareto)
    "MultiObjectiveOptimizer": "rl2fx.pareto.optimizer",
    # tuning (rl2fx.tuning)
    "HyperparameterConfig": "rl2fx.tuning.space",
    "create_ppo_hyperparameter_configs": "rl2fx.tuning.space",
    "HyperparameterTuner": "rl2fx.tuning.tuner",
    "Study": "rl2fx.tuning.study",
    # memory (rl2fx.memory)
    "MemoryOptimizer": "rl2fx.memory.optimizer",
    "MemoryProfiler": "rl2fx.memory.profiler",
    "memory_efficient_context": "rl2fx.memory.context",
    # tracking (rl2fx.tracking)
    "ExperimentConfig": "rl2fx.tracking.config",
    "ExperimentTracker": "rl2fx.tracking.tracker",
    "ModelVersioning": "rl2fx.tracking.versioning",
    # registries
    "register_estimator": "rl2fx.returns.registry",
    "list_estimators": "rl2fx.returns.registry",
    "register_policy_loss": "rl2fx.losses",
    "list_policy_losses": "rl2fx.losses",
    # training: the core step, then the application layer (rl2fx.trainer)
    "train_step": "rl2fx.step",
    "make_ppo_loss": "rl2fx.step",
    # bring your own model: prompts, reward functions, and the batch between rollout and train_step
    "load_prompts": "rl2fx.prompts",
    "prepare_prompts": "rl2fx.prompts",
    "score": "rl2fx.rewards",
    "Scores": "rl2fx.rewards",
    "make_experience": "rl2fx.experience",
    "experience_needs": "rl2fx.experience",
    "PPOTrainer": "rl2fx.trainer.ppo",
    "load_config": "rl2fx.trainer.config",
}

_SUBMODULES = {"returns", "control", "pareto", "tuning", "memory", "tracking", "testing",
               "losses", "logprobs", "rollout", "step", "trainer", "train", "cli", "experience", "rewards",
               "prompts"}

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)


__getattr__, __dir__ = lazy_exports('rl2fx', _LAZY, globals(), _SUBMODULES)


if TYPE_CHECKING:  # pragma: no cover - for static type checkers and IDEs only
    # ruff: noqa: F401, I001
    from rl2fx.control.batch_size import AdaptiveBatchSizer
    from rl2fx.control.kl import AdaptiveKLController
    from rl2fx.control.lagrangian import LagrangianConstraints
    from rl2fx.losses import list_policy_losses, register_policy_loss
    from rl2fx.memory.context import memory_efficient_context
    from rl2fx.memory.optimizer import MemoryOptimizer
    from rl2fx.memory.profiler import MemoryProfiler
    from rl2fx.pareto.optimizer import MultiObjectiveOptimizer
    from rl2fx.returns.unified import advantages, compute_advantages_unified
    from rl2fx.tracking.config import ExperimentConfig
    from rl2fx.tracking.tracker import ExperimentTracker
    from rl2fx.tracking.versioning import ModelVersioning
    from rl2fx.returns.registry import list_estimators, register_estimator
    from rl2fx.experience import experience_needs, make_experience
    from rl2fx.prompts import load_prompts, prepare_prompts
    from rl2fx.rewards import Scores, score
    from rl2fx.step import make_ppo_loss, train_step
    from rl2fx.trainer.config import load_config
    from rl2fx.trainer.ppo import PPOTrainer
    from rl2fx.tuning.space import HyperparameterConfig, create_ppo_hyperparameter_configs
    from rl2fx.tuning.study import Study
    from rl2fx.tuning.tuner import HyperparameterTuner
