"""Names and output folders of the documented ablations (kept apart so ``rl2fx --help`` imports nothing heavy)."""

ABLATIONS = ("estimators", "kl", "kl_frontier", "losses", "pareto", "multi_turn")

#: Where ``rl2fx ablate`` writes unless given ``--out`` (under the ignored ``outputs/``).
DEFAULT_OUT = "outputs/ablations"

#: Where the shipped pages live: regenerating them takes ``--out docs/ablations`` explicitly.
SHIPPED_OUT = "docs/ablations"
