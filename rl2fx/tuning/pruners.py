"""Pruners: stop unpromising trials early from the values they report while running.

A trial reports intermediate values with ``trial.report(value, step)`` (``step`` an
integer resource count: training iterations, epochs, samples seen) and asks
``trial.should_prune()``; when that is ``True`` the caller stops the run and raises
:class:`TrialPruned` (or calls ``study.tell(trial, TrialPruned())``). A pruned trial is
recorded with state ``"pruned"`` and its last reported value, and is left out of the
sampler's model, like a failed one.

A pruner is a frozen dataclass with one pure method,
``prune(finished, trial, maximize) -> bool``: it sees the finished trials and the
running trial with their reported values (persisted in ``trials.jsonl`` with each
finished trial), and keeps no state of its own, so a resumed study prunes exactly as
an uninterrupted one. The rules follow Optuna's pruners of the same names (same
argument names and defaults):

- :class:`MedianPruner`: prune when the trial's best value so far is worse than the
  median of the other trials' values at the same step (the median stopping rule of
  Golovin et al., 2017, "Google Vizier", KDD).
- :class:`SuccessiveHalvingPruner`: asynchronous successive halving (ASHA; Li et al.,
  2020, "A system for massively parallel hyperparameter tuning", MLSys): rung ``k``
  sits at ``min_resource * reduction_factor ** (min_early_stopping_rate + k)`` steps;
  a trial that reaches a rung continues only if its value there is in the top
  ``1 / reduction_factor`` of all trials' values at that rung.
- :class:`HyperbandPruner`: Hyperband (Li et al., 2018, JMLR 18): several
  successive-halving brackets with different ``min_early_stopping_rate``; each trial
  is assigned to one bracket from its number (weighted by the bracket's budget) and
  competes only within it.
- :class:`NopPruner`: never prunes (the default).

>>> from rl2fx import HyperparameterConfig
>>> from rl2fx.tuning import Study, MedianPruner
>>> study = Study([HyperparameterConfig("x", "float", low=0.0, high=1.0)], "random", seed=0,
...               pruner=MedianPruner(n_startup_trials=2))
>>> for i in range(4):
...     trial = study.ask()
...     for step in range(5):
...         trial.report(float(i % 2) * step, step)   # odd trials learn, even ones do not
...         if trial.should_prune():
...             break
...     _ = study.tell(trial, TrialPruned() if trial.should_prune() else float(i % 2) * 4)
>>> [t.state for t in study.trials]
['complete', 'complete', 'pruned', 'complete']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from rl2fx._typing import check_choice, check_range

if TYPE_CHECKING:  # pragma: no cover
    from rl2fx.tuning.study import Trial

__all__ = [
    "TrialPruned",
    "NopPruner",
    "MedianPruner",
    "SuccessiveHalvingPruner",
    "HyperbandPruner",
    "make_pruner",
    "PRUNERS",
    "intermediate_values",
]


class TrialPruned(Exception):
    """Raise from an objective (or pass to ``Study.tell``) to end a trial as pruned."""


def intermediate_values(trial: Trial) -> dict[int, float]:
    """A trial's reported values keyed by integer step (JSON stores the keys as strings)."""
    return {int(k): float(v) for k, v in trial.intermediate.items()}


def _better(a: float, b: float, maximize: bool) -> bool:
    return a > b if maximize else a < b


def _best_so_far(values: Mapping[int, float], maximize: bool) -> float:
    # a NaN report counts as the worst value: a diverged run is the first to stop
    finite = [v for v in values.values() if not math.isnan(v)]
    if not finite:
        return -math.inf if maximize else math.inf
    return max(finite) if maximize else min(finite)


def _int_check(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    check_range(name, value, lo, None)


@dataclass(frozen=True)
class NopPruner:
    """Never prunes."""

    name: str = field(default="none", init=False)

    def prune(self, finished: Sequence[Trial], trial: Trial, maximize: bool, running: Sequence[Trial] = ()) -> bool:  # noqa: D102
        return False

    def settings(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class MedianPruner:
    """The median stopping rule (Golovin et al., 2017), Optuna's ``MedianPruner``.

    At step $s$ the trial is pruned when its best reported value so far is worse than
    the median of the values that the finished (complete or pruned) trials reported at
    step $s$. No pruning before ``n_startup_trials`` trials have completed, at steps
    below ``n_warmup_steps``, at steps that are not a multiple of ``interval_steps``
    past the warm-up, or when fewer than ``n_min_trials`` trials reported at step $s$.

    >>> MedianPruner(n_warmup_steps=-1)
    Traceback (most recent call last):
    ...
    ValueError: n_warmup_steps must be in [0, inf], got -1
    """

    n_startup_trials: int = 5
    n_warmup_steps: int = 0
    interval_steps: int = 1
    n_min_trials: int = 1
    name: str = field(default="median", init=False)

    def __post_init__(self) -> None:
        _int_check("n_startup_trials", self.n_startup_trials, 0)
        _int_check("n_warmup_steps", self.n_warmup_steps, 0)
        _int_check("interval_steps", self.interval_steps, 1)
        _int_check("n_min_trials", self.n_min_trials, 1)

    def settings(self) -> dict[str, Any]:
        return {
            "n_startup_trials": self.n_startup_trials,
            "n_warmup_steps": self.n_warmup_steps,
            "interval_steps": self.interval_steps,
            "n_min_trials": self.n_min_trials,
        }

    def prune(self, finished: Sequence[Trial], trial: Trial, maximize: bool, running: Sequence[Trial] = ()) -> bool:  # noqa: D102
        values = intermediate_values(trial)
        if not values:
            return False
        step = max(values)
        if sum(t.state == "complete" for t in finished) < self.n_startup_trials:
            return False
        if step < self.n_warmup_steps or (step - self.n_warmup_steps) % self.interval_steps:
            return False
        others = [intermediate_values(t).get(step) for t in finished if t.state in ("complete", "pruned")]
        others = [v for v in others if v is not None and not math.isnan(v)]
        if len(others) < self.n_min_trials:
            return False
        return _better(float(np.median(others)), _best_so_far(values, maximize), maximize)


def _auto_min_resource(finished: Sequence[Trial]) -> int | None:
    # the heuristic Optuna documents for min_resource="auto": 1 % of the last step
    # of the first completed trial, at least 1
    for t in finished:
        if t.state == "complete" and t.intermediate:
            return max(1, max(intermediate_values(t)) // 100)
    return None


def _rung_value(values: Mapping[int, float], resource: int) -> float | None:
    """The value a trial reported when its step first reached ``resource``."""
    steps = sorted(s for s in values if s >= resource)
    return values[steps[0]] if steps else None


def _asha_prune(
    values: Mapping[int, float],
    competitors: Sequence[Mapping[int, float]],
    min_resource: int,
    reduction_factor: int,
    min_early_stopping_rate: int,
    maximize: bool,
) -> bool:
    """Successive halving at every rung the trial has reached (``values`` from the trial,
    ``competitors`` from all other trials, running ones included)."""
    last = max(values)
    rung = 0
    while True:
        resource = min_resource * reduction_factor ** (min_early_stopping_rate + rung)
        if last < resource:
            return False
        mine = _rung_value(values, resource)
        if mine is None or math.isnan(mine):
            return True
        others = [v for v in (_rung_value(c, resource) for c in competitors) if v is not None and not math.isnan(v)]
        ranked = sorted([*others, mine], reverse=maximize)
        # the top len // reduction_factor are promoted; while fewer trials have
        # reached the rung, only the best so far continues
        k = max(len(ranked) // reduction_factor, 1)
        if _better(ranked[k - 1], mine, maximize):
            return True
        rung += 1


@dataclass(frozen=True)
class SuccessiveHalvingPruner:
    """Asynchronous successive halving (ASHA; Li et al., 2020), Optuna's ``SuccessiveHalvingPruner``.

    Rung $k$ is reached after $r\\,\\eta^{s+k}$ steps ($r$ = ``min_resource``,
    $\\eta$ = ``reduction_factor``, $s$ = ``min_early_stopping_rate``), i.e. once the
    reported ``step`` is at least that (Optuna's convention). A trial that reaches a rung continues
    only when its value there ranks among the top $\\lfloor n/\\eta \\rfloor$ (at least
    one) of the $n$ trials that have reached the rung so far, itself included.
    ``min_resource="auto"`` takes 1 % of the steps of the first completed trial (no
    pruning before one has completed).

    >>> SuccessiveHalvingPruner(reduction_factor=1)
    Traceback (most recent call last):
    ...
    ValueError: reduction_factor must be in [2, inf], got 1
    """

    min_resource: int | str = "auto"
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    name: str = field(default="successive_halving", init=False)

    def __post_init__(self) -> None:
        if self.min_resource != "auto":
            _int_check("min_resource", self.min_resource, 1)
        _int_check("reduction_factor", self.reduction_factor, 2)
        _int_check("min_early_stopping_rate", self.min_early_stopping_rate, 0)

    def settings(self) -> dict[str, Any]:
        return {
            "min_resource": self.min_resource,
            "reduction_factor": self.reduction_factor,
            "min_early_stopping_rate": self.min_early_stopping_rate,
        }

    def prune(self, finished: Sequence[Trial], trial: Trial, maximize: bool, running: Sequence[Trial] = ()) -> bool:  # noqa: D102
        values = intermediate_values(trial)
        if not values:
            return False
        r = _auto_min_resource(finished) if self.min_resource == "auto" else int(self.min_resource)
        if r is None:
            return False
        comp = [intermediate_values(t) for t in [*finished, *running] if t.number != trial.number and t.intermediate]
        return _asha_prune(values, comp, r, self.reduction_factor, self.min_early_stopping_rate, maximize)


@dataclass(frozen=True)
class HyperbandPruner:
    """Hyperband (Li et al., 2018, "Hyperband: a novel bandit-based approach to
    hyperparameter optimization", JMLR 18), Optuna's ``HyperbandPruner``.

    $B = \\lfloor \\log_\\eta(R / r) \\rfloor + 1$ successive-halving brackets
    ($r$ = ``min_resource``, $R$ = ``max_resource``, $\\eta$ = ``reduction_factor``);
    bracket $b$ starts its first rung at $r\\eta^b$ steps. Trial $n$ joins bracket $b$
    with probability proportional to the bracket's budget $\\lceil B\\eta^{B-1-b}/(B-b) \\rceil$
    (drawn from ``numpy.random.default_rng([seed, n])``, so the bracket depends only on
    the seed and the trial number) and competes only with trials of its bracket.
    ``max_resource="auto"`` takes the number of steps of the first completed trial.
    """

    min_resource: int = 1
    max_resource: int | str = "auto"
    reduction_factor: int = 3
    seed: int = 0
    name: str = field(default="hyperband", init=False)

    def __post_init__(self) -> None:
        _int_check("min_resource", self.min_resource, 1)
        if self.max_resource != "auto":
            _int_check("max_resource", self.max_resource, 1)
            if self.max_resource < self.min_resource:
                raise ValueError(f"max_resource must be >= min_resource={self.min_resource}, got {self.max_resource!r}")
        _int_check("reduction_factor", self.reduction_factor, 2)

    def settings(self) -> dict[str, Any]:
        return {
            "min_resource": self.min_resource,
            "max_resource": self.max_resource,
            "reduction_factor": self.reduction_factor,
            "seed": self.seed,
        }

    def n_brackets(self, max_resource: int) -> int:
        ratio = max(max_resource / self.min_resource, 1.0)
        return int(math.floor(math.log(ratio, self.reduction_factor) + 1e-9)) + 1

    def bracket(self, number: int, max_resource: int) -> int:
        """The bracket of trial ``number``."""
        B, eta = self.n_brackets(max_resource), self.reduction_factor
        budgets = np.array([math.ceil(B * eta ** (B - 1 - b) / (B - b)) for b in range(B)], dtype=float)
        u = np.random.default_rng([int(self.seed), int(number)]).random()
        return int(np.searchsorted(np.cumsum(budgets) / budgets.sum(), u, side="right").clip(0, B - 1))

    def _max_resource(self, finished: Sequence[Trial]) -> int | None:
        if self.max_resource != "auto":
            return int(self.max_resource)
        for t in finished:
            if t.state == "complete" and t.intermediate:
                return max(intermediate_values(t)) + 1
        return None

    def prune(self, finished: Sequence[Trial], trial: Trial, maximize: bool, running: Sequence[Trial] = ()) -> bool:  # noqa: D102
        values = intermediate_values(trial)
        R = self._max_resource(finished)
        if not values or R is None:
            return False
        b = self.bracket(trial.number, R)
        comp = [
            intermediate_values(t)
            for t in [*finished, *running]
            if t.number != trial.number and t.intermediate and self.bracket(t.number, R) == b
        ]
        return _asha_prune(values, comp, self.min_resource, self.reduction_factor, b, maximize)


PRUNERS = ("none", "median", "successive_halving", "hyperband")


def make_pruner(name: str, **settings: Any):
    """Build a pruner by name (``"none"``, ``"median"``, ``"successive_halving"``, ``"hyperband"``).

    >>> make_pruner("median", n_startup_trials=3).n_startup_trials
    3
    """
    check_choice("pruner", name, PRUNERS)
    cls = {"none": NopPruner, "median": MedianPruner, "successive_halving": SuccessiveHalvingPruner,
           "hyperband": HyperbandPruner}[name]
    return cls(**settings)
