"""rl2fx.tasks."""
