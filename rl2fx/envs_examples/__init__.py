"""Shipped multi-turn tasks: environment files for :func:`rl2fx.multiturn.multi_turn_rollout` and their prompt sets."""
