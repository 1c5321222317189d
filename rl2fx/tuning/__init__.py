"""rl2fx.tuning."""
