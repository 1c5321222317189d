"""Every name the spec and DESIGN.md promise is importable from ``rl2fx``.

Every module has landed, so a name that fails to import is a plain failure.
"""

import importlib

import pytest

import rl2fx

SPEC_NAMES = [
    "AdaptiveKLController", "MultiObjectiveOptimizer", "compute_advantages_unified",
    "HyperparameterTuner", "HyperparameterConfig", "create_ppo_hyperparameter_configs",
    "MemoryOptimizer", "MemoryProfiler", "memory_efficient_context", "AdaptiveBatchSizer",
    "ExperimentTracker", "ExperimentConfig", "ModelVersioning", "PPOTrainer", "train_step",
    "load_config", "LagrangianConstraints",
    # "Alternative Advantage Estimation Methods"
    "vtrace", "retrace", "td_lambda", "clipped_is", "multistep", "gae", "reinforce",
]


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_spec_name_importable(name):
    assert getattr(rl2fx, name) is not None


@pytest.mark.parametrize("name", sorted(rl2fx._LAZY))
def test_lazy_name_resolves_to_its_module(name):
    value = getattr(rl2fx, name)
    assert getattr(importlib.import_module(rl2fx._LAZY[name]), name) is value


@pytest.mark.parametrize("name", sorted(rl2fx._SUBMODULES))
def test_submodule_importable(name):
    assert getattr(rl2fx, name).__name__ == f"rl2fx.{name}"


def test_unknown_attribute_names_itself():
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = rl2fx.no_such_name
