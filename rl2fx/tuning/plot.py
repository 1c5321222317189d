"""Plot of a multi-objective study's trials and Pareto front, saved as a PNG.

>>> import tempfile, os
>>> from rl2fx import HyperparameterConfig
>>> from rl2fx.tuning import Study
>>> study = Study([HyperparameterConfig("x", "float", low=0.0, high=1.0)], "random",
...               maximize=[True, False], seed=0)
>>> for _ in range(8):
...     t = study.ask()
...     _ = study.tell(t, [t.params["x"], t.params["x"] ** 2])
>>> path = plot_pareto_front(study, os.path.join(tempfile.mkdtemp(), "front.png"))
>>> os.path.getsize(path) > 0
True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from rl2fx.tuning.study import Study

__all__ = ["plot_pareto_front"]


def plot_pareto_front(
    study: Study,
    path: str | os.PathLike[str],
    *,
    objective_names: Sequence[str] | None = None,
    axes: tuple[int, int] = (0, 1),
) -> Path:
    """Scatter the complete trials on two objectives, the Pareto set highlighted and joined
    as a staircase, and save the figure as a PNG at ``path``; returns the path.

    Values are drawn in the objectives' own units and directions (a minimised KL stays
    positive), with the Pareto set computed by :attr:`Study.best_trials`
    (:func:`rl2fx.pareto.pareto_front_mask`). For more than two objectives ``axes``
    picks the pair shown. Uses matplotlib's non-interactive Agg backend.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    m = study.n_objectives
    if m < 2:
        raise ValueError(f"plot_pareto_front needs a multi-objective study, got maximize={study.maximize!r}")
    i, j = axes
    if not (0 <= i < m and 0 <= j < m and i != j):
        raise ValueError(f"axes must be two different objective indices in [0, {m}), got {axes!r}")
    names = list(objective_names) if objective_names is not None else [f"objective {k}" for k in range(m)]
    if len(names) != m:
        raise ValueError(f"objective_names must have {m} entries, got {names!r}")
    done = study.complete_trials
    front = study.best_trials
    allv = np.array([t.values for t in done], dtype=float).reshape(-1, m)
    fv = np.array([t.values for t in front], dtype=float).reshape(-1, m)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.scatter(allv[:, i], allv[:, j], s=14, c="0.65", label=f"trials ({len(done)})")
    if len(fv):
        order = np.argsort(fv[:, i])
        ax.step(fv[order, i], fv[order, j], where="post", c="C3", lw=1)
        ax.scatter(fv[:, i], fv[:, j], s=24, c="C3", label=f"Pareto set ({len(fv)})")
    dirs = study.maximize
    ax.set_xlabel(f"{names[i]} ({'max' if dirs[i] else 'min'})")
    ax.set_ylabel(f"{names[j]} ({'max' if dirs[j] else 'min'})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
