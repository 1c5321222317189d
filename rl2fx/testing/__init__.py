"""rl2fx.testing."""
