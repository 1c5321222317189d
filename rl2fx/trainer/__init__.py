"""The application layer: the reference trainer built on the core pieces.

* :mod:`rl2fx.trainer.ppo`: :class:`PPOTrainer`, the loop and its checkpoints, the Hydra entry;
* :mod:`rl2fx.trainer.config`: the spec's YAML schema, validated by the library's own checks;
* :mod:`rl2fx.trainer.commands`: the ``rl2fx`` sub-commands (parser in :mod:`rl2fx.cli`);
* :mod:`rl2fx.trainer.ablate`, :mod:`rl2fx.trainer.tune`: ablations and hyperparameter search
  over training runs;
* :mod:`rl2fx.trainer.tasks`: the digit tasks, tokenizer and tiny models; :mod:`rl2fx.trainer.demo`:
  a tour of the registered estimators.

The core (``rl2fx.returns``, ``control``, ``pareto``, ``tuning``, ``memory``, ``tracking``,
``losses``, ``logprobs``, ``rollout``, ``step``) never imports this package (an
import-linter contract in ``make test``). Names load lazily, so that importing
``rl2fx.trainer.ablate_names`` for ``rl2fx --help`` stays cheap.
"""

from __future__ import annotations

from rl2fx._lazy import lazy_exports

_LAZY = {
    "PPOTrainer": "rl2fx.trainer.ppo",
    "load_config": "rl2fx.trainer.config",
    "ConfigError": "rl2fx.trainer.config",
}
_SUBMODULES = {"ppo", "config", "commands", "ablate", "tune", "tasks", "demo", "ablate_names"}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports("rl2fx.trainer", _LAZY, globals(), _SUBMODULES)
