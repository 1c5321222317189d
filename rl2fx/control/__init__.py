"""rl2fx.control."""
