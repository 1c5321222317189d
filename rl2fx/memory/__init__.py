"""rl2fx.memory."""
