"""Every name the spec and DESIGN.md promise is importable from ``rl2fx``.

Names whose module has not landed yet are reported as xfail, not silently skipped,
so the list of what is missing stays visible in every test run.
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
    module = rl2fx._LAZY[name]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            pytest.xfail(f"{module} has not landed yet")
        raise
    assert getattr(rl2fx, name) is not None


def test_unknown_attribute_names_itself():
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = rl2fx.no_such_name
