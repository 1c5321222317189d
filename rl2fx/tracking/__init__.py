"""rl2fx.tracking."""
