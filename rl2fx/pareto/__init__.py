"""rl2fx.pareto."""
