"""``HyperparameterTuner``: the spec's one-call tuning loop over a :class:`~rl2fx.tuning.study.Study`.

``optimize(fn)`` asks the study for parameters, evaluates ``fn(params)`` (inline, or
``n_jobs`` at a time through any ``concurrent.futures.Executor`` or a Dask
``distributed.Client``), tells the result, and repeats until ``n_trials`` trials have
finished (counting those of a resumed study) or a grid is exhausted. The study is
persisted in ``save_dir`` after every trial, so rerunning the same script after a
crash continues where it stopped.

>>> import tempfile
>>> from rl2fx import HyperparameterConfig, HyperparameterTuner
>>> tuner = HyperparameterTuner("random", [HyperparameterConfig("x", "float", low=-2.0, high=2.0)],
...                             maximize=False, n_trials=20, seed=0, save_dir=tempfile.mkdtemp(),
...                             show_progress_bar=False)
>>> best = tuner.optimize(lambda p: {"reward": (p["x"] - 1.0) ** 2})
>>> abs(best["x"] - 1.0) < 0.5
True
"""

from __future__ import annotations

import concurrent.futures as cf
import inspect
import json
import numbers
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rl2fx._typing import check_range
from rl2fx.tuning.pruners import TrialPruned
from rl2fx.tuning.samplers import StudyExhausted, make_sampler
from rl2fx.tuning.space import HyperparameterConfig, as_configs, create_ppo_hyperparameter_configs
from rl2fx.tuning.study import Study, Trial, TrialBudgetReached

__all__ = ["HyperparameterTuner", "ObjectiveKeyError"]


class ObjectiveKeyError(KeyError, ValueError):
    """The objective returned a dict without ``objective_name``."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _objective_value(result: Any, objective_name: str) -> tuple[float, dict[str, Any]]:
    if isinstance(result, Mapping):
        if objective_name not in result:
            raise ObjectiveKeyError(
                f"the objective function returned a dict without the key objective_name={objective_name!r}; "
                f"keys present: {sorted(map(str, result))}. Return that key or set objective_name to one of them"
            )
        metrics = {}
        for k, v in result.items():
            if isinstance(v, numbers.Real) or hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
                metrics[str(k)] = float(v)
            elif isinstance(v, str | bool) or v is None:
                metrics[str(k)] = v
        return _to_float(result[objective_name], objective_name), metrics
    return _to_float(result, objective_name), {}


def _to_float(v: Any, objective_name: str) -> float:
    if isinstance(v, bool) or not (isinstance(v, numbers.Real) or hasattr(v, "item") and getattr(v, "ndim", 1) == 0):
        raise ValueError(f"the objective {objective_name!r} must be a real number (or 0-d tensor/array), got {type(v).__name__}: {v!r}")
    return float(v)


def _takes_trial(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` accepts a second positional argument (the trial)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
    pos = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(pos) >= 2


class HyperparameterTuner:
    """Tune ``param_configs`` by calling a training function repeatedly (the spec's tuner).

    Args:
        optimizer_type: ``"random"``, ``"grid"``, ``"bayesian"`` (BoTorch GP + qLogNEI)
            or ``"skopt"`` (scikit-optimize GP + EI); see :mod:`rl2fx.tuning.samplers`.
        param_configs: list of :class:`~rl2fx.HyperparameterConfig` (or dicts with the
            same fields); defaults to :func:`~rl2fx.create_ppo_hyperparameter_configs`.
        objective_name: key of the objective when ``fn`` returns a dict.
        maximize: direction of the objective.
        n_trials: number of finished trials (complete or failed) to reach, counting
            trials already in the study and those of other workers sharing it.
        save_dir: directory of the persisted study (resumed when it exists), or ``None``
            to keep everything in memory. ``optimize`` also writes ``best_params.json``
            and ``trials.csv`` there.
        storage: where the study lives, when not in ``save_dir``: a database URL such as
            ``sqlite:///study.db`` or ``postgresql+psycopg://...``, a directory, or a storage
            object (:mod:`rl2fx.tuning.storage`). Several tuners (processes or machines) on one
            storage share the study and its ``n_trials`` budget.
        seed: sampler seed (random when ``None``; the one used is stored in ``save_dir``).
        n_jobs: trials evaluated at once.
        executor: a ``concurrent.futures.Executor`` or a Dask ``distributed.Client`` to run
            ``fn`` on; when ``None`` and ``n_jobs > 1`` a ``ThreadPoolExecutor(n_jobs)`` is used
            (pass a ``ProcessPoolExecutor`` or Dask client for CPU-bound pure-Python ``fn``).
        grid_size: points per numeric dimension for ``"grid"``.
        exploration_weight: EI's improvement margin $\\xi$ in units of the observed
            values' standard deviation, for ``"bayesian"`` and ``"skopt"``; larger explores more.
        show_progress_bar: show a tqdm bar with the best value so far.
        catch: exception types from ``fn`` recorded as failed trials; others propagate and
            leave the trial unrecorded (asked again when the study is resumed).
        sampler_options: extra settings for the sampler (e.g. ``n_initial``, ``raw_samples``).
        pruner: a pruner from :mod:`rl2fx.tuning.pruners` (or its name) for ``fn``s that
            take the trial as a second argument and report intermediate values.
    """

    def __init__(
        self,
        optimizer_type: str = "random",
        param_configs: Sequence[HyperparameterConfig | Mapping[str, Any]] | None = None,
        objective_name: str = "reward",
        maximize: bool = True,
        n_trials: int = 100,
        save_dir: str | os.PathLike[str] | None = "hyperopt_results",
        seed: int | None = None,
        n_jobs: int = 1,
        executor: Any = None,
        grid_size: int = 10,
        exploration_weight: float = 0.1,
        *,
        show_progress_bar: bool = True,
        catch: tuple[type[BaseException], ...] = (Exception,),
        sampler_options: Mapping[str, Any] | None = None,
        pruner: Any = None,
        storage: Any = None,
    ) -> None:
        if isinstance(n_trials, bool) or not isinstance(n_trials, int):
            raise ValueError(f"n_trials must be a positive integer, got {n_trials!r}")
        check_range("n_trials", n_trials, 1, None)
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, int):
            raise ValueError(f"n_jobs must be a positive integer, got {n_jobs!r}")
        check_range("n_jobs", n_jobs, 1, None)
        if not isinstance(objective_name, str) or not objective_name:
            raise ValueError(f"objective_name must be a non-empty string, got {objective_name!r}")
        if executor is not None and not (isinstance(executor, cf.Executor) or hasattr(executor, "get_executor")):
            raise ValueError(f"executor must be a concurrent.futures.Executor or a dask distributed Client, got {type(executor).__name__}")
        self.optimizer_type = optimizer_type
        self.param_configs = as_configs(create_ppo_hyperparameter_configs() if param_configs is None else param_configs)
        self.objective_name = objective_name
        self.maximize = maximize
        self.n_trials = n_trials
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.n_jobs = n_jobs
        self.executor = executor
        self.show_progress_bar = show_progress_bar
        self.catch = tuple(catch)
        sampler = make_sampler(
            optimizer_type, seed=seed, grid_size=grid_size, exploration_weight=exploration_weight, **dict(sampler_options or {})
        )
        self.study = Study(self.param_configs, sampler, maximize=maximize,
                           storage=self.save_dir if storage is None else storage, pruner=pruner)
        self.exhausted_message: str | None = None

    # -- the loop ----------------------------------------------------------------------------
    def optimize(self, fn: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
        """Run trials of ``fn(params)`` until ``n_trials`` have finished; return the best params.

        ``fn`` returns a number or a dict holding ``objective_name`` (its other numeric
        entries are kept as trial metrics). An exception from ``fn`` (of a type in
        ``catch``) or a NaN/inf value marks that trial failed and the study goes on; a dict
        missing ``objective_name`` raises at once, naming the key and the keys present.

        A ``fn`` with two positional parameters is called as ``fn(params, trial)``: it may
        ``trial.report(value, step)`` while training and raise
        :class:`~rl2fx.tuning.pruners.TrialPruned` when ``trial.should_prune()``; the
        trial is then recorded as pruned. (Reporting needs the study in the same process:
        inline or thread executors.)
        """
        from tqdm.auto import tqdm

        self.study.forget_pending()  # left over from an interrupted earlier call
        self._pass_trial = _takes_trial(fn)
        own_pool = None
        executor = self.executor
        if executor is not None and not isinstance(executor, cf.Executor):
            executor = executor.get_executor()  # dask distributed Client -> concurrent.futures API
        if executor is None and self.n_jobs > 1:
            executor = own_pool = cf.ThreadPoolExecutor(self.n_jobs)
        bar = tqdm(total=self.n_trials, initial=min(len(self.study.trials), self.n_trials),
                   desc=f"{self.optimizer_type} search", disable=not self.show_progress_bar)
        self._update_bar(bar)
        try:
            if executor is None:
                self._run_serial(fn, bar)
            else:
                self._run_parallel(fn, executor, bar)
        finally:
            bar.close()
            if own_pool is not None:
                own_pool.shutdown(wait=True)
        self._write_summary()
        return self.best_params

    def _remaining(self) -> int:
        return self.n_trials - len(self.study.trials) - len(self.study.pending)

    def _ask(self) -> Trial | None:
        try:
            return self.study.ask(max_trials=self.n_trials)
        except TrialBudgetReached:  # other workers sharing the study took the last trials
            return None
        except StudyExhausted as e:
            self.exhausted_message = str(e)
            warnings.warn(f"stopping early: {e}", stacklevel=3)
            return None

    def _finish(self, trial: Trial, outcome: Any, failed: BaseException | None, bar) -> None:
        if isinstance(failed, TrialPruned):
            self.study.tell(trial, failed)
        elif failed is not None:
            if not isinstance(failed, self.catch):
                # not a failure of the configuration (e.g. KeyboardInterrupt): leave the trial
                # untold, like one lost in a crash, so a resumed study asks it again
                raise failed
            self.study.tell(trial, failed)
        else:
            try:
                value, metrics = _objective_value(outcome, self.objective_name)
            except (ObjectiveKeyError, ValueError) as e:
                self.study.tell(trial, e)
                raise
            self.study.tell(trial, value, metrics)
        bar.update(1)
        self._update_bar(bar)

    def _update_bar(self, bar) -> None:
        if self.study.complete_trials:
            states = [t.state for t in self.study.trials]
            bar.set_postfix(best=f"{self.study.best_value:.6g}", failed=states.count("failed"),
                            pruned=states.count("pruned"))

    def _args(self, trial: Trial) -> tuple[Any, ...]:
        return (dict(trial.params), trial) if self._pass_trial else (dict(trial.params),)

    def _run_serial(self, fn, bar) -> None:
        while self._remaining() > 0:
            trial = self._ask()
            if trial is None:
                return
            try:
                out, err = fn(*self._args(trial)), None
            except BaseException as e:  # noqa: BLE001 - sorted by self.catch in _finish
                out, err = None, e
            self._finish(trial, out, err, bar)

    def _run_parallel(self, fn, executor: cf.Executor, bar) -> None:
        running: dict[cf.Future, Trial] = {}
        exhausted = False
        try:
            while True:
                while not exhausted and len(running) < self.n_jobs and self._remaining() > 0:
                    trial = self._ask()
                    if trial is None:
                        exhausted = True
                        break
                    running[executor.submit(fn, *self._args(trial))] = trial
                if not running:
                    return
                done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    trial = running.pop(fut)
                    err = fut.exception()
                    self._finish(trial, None if err else fut.result(), err, bar)
        finally:
            for fut in running:
                fut.cancel()

    # -- results -----------------------------------------------------------------------------
    @property
    def best_trial(self) -> Trial:
        return self.study.best_trial

    @property
    def best_params(self) -> dict[str, Any]:
        return self.study.best_params

    @property
    def best_value(self) -> float:
        return self.study.best_value

    def trials_dataframe(self):
        """All finished trials as a pandas DataFrame (see :meth:`Study.trials_dataframe`)."""
        return self.study.trials_dataframe()

    def results_summary(self) -> dict[str, Any]:
        """Best trial, counts, and the trials table.

        Keys: ``best_params``, ``best_value``, ``best_trial`` (number), ``n_complete``,
        ``n_failed``, ``objective_name``, ``maximize``, ``optimizer_type``,
        ``exhausted`` (the grid message or ``None``) and ``trials`` (DataFrame).
        """
        trials = self.study.trials
        has_best = bool(self.study.complete_trials)
        return {
            "optimizer_type": self.optimizer_type,
            "objective_name": self.objective_name,
            "maximize": self.maximize,
            "best_params": self.best_params if has_best else None,
            "best_value": self.best_value if has_best else None,
            "best_trial": self.best_trial.number if has_best else None,
            "n_complete": sum(t.state == "complete" for t in trials),
            "n_failed": sum(t.state == "failed" for t in trials),
            "n_pruned": sum(t.state == "pruned" for t in trials),
            "exhausted": self.exhausted_message,
            "trials": self.trials_dataframe(),
        }

    def _write_summary(self) -> None:
        if self.save_dir is None:
            return
        from rl2fx.tuning.study import _atomic_write

        summary = self.results_summary()
        df = summary.pop("trials")
        self.save_dir.mkdir(parents=True, exist_ok=True)  # absent when the study lives in a database
        _atomic_write(self.save_dir / "best_params.json", json.dumps(summary, indent=2, default=str, allow_nan=True))
        _atomic_write(self.save_dir / "trials.csv", df.to_csv(index=False))

    def state_dict(self) -> dict[str, Any]:
        return self.study.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.study.load_state_dict(state)

