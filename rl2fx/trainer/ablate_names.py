"""Names of the documented ablations (kept apart so ``rl2fx --help`` imports nothing heavy)."""

ABLATIONS = ("estimators", "kl", "kl_frontier", "losses", "pareto")
