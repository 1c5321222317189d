"""``python -m rl2fx.train [--config-name demo] key=value ...``: the Hydra entry point of the trainer.

A thin entry into :func:`rl2fx.trainer.ppo.main`; the loop lives in :mod:`rl2fx.trainer.ppo`,
``train_step`` in :mod:`rl2fx.step`.
"""

from __future__ import annotations

from rl2fx.trainer.ppo import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
