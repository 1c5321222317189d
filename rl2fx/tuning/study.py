"""Ask/tell studies, persisted after every ask and tell, shared by workers, resumable after a crash.

The state of a study is a frozen :class:`StudyState` (finished trials, running
trials, next trial number) changed only by the pure functions :func:`study_ask` and
:func:`study_tell`; :class:`Study` holds one state, a sampler and an optional
storage (:mod:`rl2fx.tuning.storage`). ``storage`` is

- a directory (:class:`~rl2fx.tuning.storage.DirectoryStorage`): ``study.json`` (the
  search space, direction, sampler name and settings, including the seed actually
  used, written once), ``trials.jsonl`` (one JSON line per finished trial) and
  ``asks.jsonl`` (one line per event of a running trial), appended under an OS file
  lock, so any number of processes on one machine can share one study;
- a database URL such as ``sqlite:///study.db`` or ``postgresql+psycopg://...``
  (:class:`~rl2fx.tuning.storage.DatabaseStorage`), for workers on many machines, with
  a heartbeat that fails and re-queues the trials of a dead worker;
- or a storage object.

Every ``ask`` reads the trials of all workers first, so samplers see them all, and
trial numbers are allocated under the storage's lock, so they are unique. Opening
the same storage again resumes: finished trials are reloaded and the trials that
were running in a process that died are asked again. This is the ask-and-tell
interface of Optuna and scikit-optimize.

>>> from rl2fx import HyperparameterConfig, Study
>>> study = Study([HyperparameterConfig("x", "float", low=-1.0, high=1.0)], "random", maximize=False, seed=0)
>>> for _ in range(5):
...     trial = study.ask()
...     _ = study.tell(trial, trial.params["x"] ** 2)
>>> len(study.trials), study.best_value <= min(t.value for t in study.trials)
(5, True)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl2fx.tuning.pruners import NopPruner, TrialPruned, make_pruner
from rl2fx.tuning.samplers import StudyExhausted, make_sampler
from rl2fx.tuning.space import HyperparameterConfig, as_configs, validate_params

__all__ = [
    "Trial", "StudyState", "study_ask", "study_tell", "study_report", "Study", "StudyExhausted", "TrialPruned",
    "TrialBudgetReached",
]

TRIAL_STATES = ("running", "complete", "failed", "pruned")


class TrialBudgetReached(StudyExhausted):
    """Raised by ``Study.ask(max_trials=n)`` when ``n`` trials are finished or running (all workers)."""


@dataclass(frozen=True)
class Trial:
    """One evaluation: its number, parameters, and once told, its state and value.

    ``state`` is ``"running"`` (asked, not told), ``"complete"`` (finite value),
    ``"failed"`` (an exception, or a NaN/inf value; ``error`` says which) or
    ``"pruned"`` (stopped early by a pruner; ``value`` is its last reported value).
    ``values`` holds the objective vector of a multi-objective study (``value`` is then
    ``None``). ``intermediate`` maps each reported step (as a string, the JSON key) to
    its value. ``metrics`` keeps the other numbers an objective returned; ``info`` what
    the sampler recorded (grid index, design phase, GP hyperparameters).

    A trial returned by ``Study.ask`` is bound to its study: ``trial.report(value,
    step)`` and ``trial.should_prune()`` go to it.
    """

    number: int
    params: dict[str, Any]
    state: str = "running"
    value: float | None = None
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float | None = None
    values: list[float] | None = None
    intermediate: dict[str, float] = field(default_factory=dict)

    @property
    def duration(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started_at

    def __getstate__(self) -> dict[str, Any]:
        # the bound study holds a lock and a sampler: a trial sent to another process travels without it
        state = dict(self.__dict__)
        state.pop("_bound_study", None)
        return state

    def _study(self) -> Study:
        study = self.__dict__.get("_bound_study")
        if study is None:
            raise ValueError(f"trial {self.number} is not bound to a study; use the trial returned by Study.ask()")
        return study

    def report(self, value: float, step: int) -> None:
        """Report the objective's value after ``step`` units of resource (for pruning)."""
        self._study().report(self, value, step)

    def should_prune(self) -> bool:
        """Whether the study's pruner says to stop this trial now (after at least one report)."""
        return self._study().should_prune(self)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), allow_nan=True, default=str)

    @classmethod
    def from_json(cls, line: str) -> Trial:
        return cls(**json.loads(line))


@dataclass(frozen=True)
class StudyState:
    """Finished trials (in tell order), running trials, and the next trial number."""

    finished: tuple[Trial, ...] = ()
    pending: tuple[Trial, ...] = ()
    next_number: int = 0


def study_ask(state: StudyState, configs: Sequence[HyperparameterConfig], sampler: Any, maximize: bool) -> tuple[StudyState, Trial]:
    """Draw the next trial from ``sampler``; returns the new state and the running trial.

    Raises :class:`StudyExhausted` when the sampler has nothing left.
    """
    number = state.next_number
    params, info = sampler.sample(configs, state.finished, state.pending, number, maximize)
    validate_params(configs, params)
    trial = Trial(number=number, params=dict(params), info=dict(info), started_at=time.time())
    return dataclasses.replace(state, pending=(*state.pending, trial), next_number=number + 1), trial


def _running_index(state: StudyState, trial: Trial, hint: str = "tell each asked trial exactly once") -> int:
    idx = next((i for i, t in enumerate(state.pending) if t.number == trial.number), None)
    if idx is None:
        done = any(t.number == trial.number for t in state.finished)
        raise ValueError(f"trial {trial.number} is {'already finished' if done else 'not a running trial of this study'}; {hint}")
    return idx


def _as_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) and not hasattr(value, "__float__"):
        raise ValueError(f"{what}, got {type(value).__name__}: {value!r}")
    return float(value)


def study_report(state: StudyState, trial: Trial, value: float, step: int) -> StudyState:
    """Record an intermediate ``value`` of a running trial at ``step`` (a non-negative int).

    A step already reported keeps its first value (as Optuna does), so a retried
    evaluation cannot rewrite history the pruner has already acted on.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    val = _as_number(value, "report value must be a number")
    idx = _running_index(state, trial, "report only while a trial runs, before tell")
    t = state.pending[idx]
    if str(step) in t.intermediate:
        return state
    t = dataclasses.replace(t, intermediate={**t.intermediate, str(step): val})
    return dataclasses.replace(state, pending=(*state.pending[:idx], t, *state.pending[idx + 1 :]))


def study_tell(
    state: StudyState,
    trial: Trial,
    value: float | Sequence[float] | BaseException,
    metrics: Mapping[str, Any] | None = None,
    n_objectives: int = 1,
) -> tuple[StudyState, Trial]:
    """Record the outcome of a running trial.

    A finite number completes it (a sequence of ``n_objectives`` finite numbers in a
    multi-objective study); an exception, NaN or ±inf marks it failed (kept in the
    history, never shown to the model); a :class:`TrialPruned` exception marks it
    pruned, with its last reported value. Telling a trial that is not running, or a
    value of the wrong type or length, raises ``ValueError`` and leaves it running.
    """
    idx = _running_index(state, trial)
    running = state.pending[idx]
    error = None
    val: float | None = None
    vals: list[float] | None = None
    status = "complete"
    if isinstance(value, TrialPruned):
        status = "pruned"
        if running.intermediate:
            val = float(running.intermediate[str(max(int(k) for k in running.intermediate))])
    elif isinstance(value, BaseException):
        status, error = "failed", "".join(traceback.format_exception_only(type(value), value)).strip()
    elif n_objectives == 1:
        val = _as_number(value, "tell value must be a number or an exception")
        if not math.isfinite(val):
            status, error = "failed", f"objective value is not finite: {val}"
    else:
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence | tuple) and not hasattr(value, "tolist"):
            raise ValueError(f"tell value must be a sequence of {n_objectives} numbers (one per objective) or an exception, got {value!r}")
        seq = value.tolist() if hasattr(value, "tolist") else list(value)
        if len(seq) != n_objectives:
            raise ValueError(f"tell value must have {n_objectives} entries (one per objective), got {len(seq)}: {seq!r}")
        vals = [_as_number(v, "each tell value must be a number") for v in seq]
        if not all(math.isfinite(v) for v in vals):
            status, error = "failed", f"objective values are not all finite: {vals}"
    done = dataclasses.replace(
        running,
        state=status,
        value=val,
        values=vals,
        error=error,
        metrics=dict(metrics or {}),
        finished_at=time.time(),
    )
    pending = state.pending[:idx] + state.pending[idx + 1 :]
    return dataclasses.replace(state, finished=(*state.finished, done), pending=pending), done


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - directories cannot be fsynced on some systems
        pass


#: Keys of a stored study description added after its first version, with the value they take
#: when absent (``pruner``: studies written before pruners existed ran without one).
META_DEFAULTS: dict[str, Any] = {"format": 1, "pruner": None}


def _checked_meta(meta: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A stored study description (``study.json``) with its keys checked: a missing required
    key raises ``ValueError`` naming ``where`` and the key; keys added later get
    :data:`META_DEFAULTS`.

    >>> _checked_meta({"param_configs": [], "maximize": True, "sampler": {"name": "random", "settings": {}}}, "x")["format"]
    1
    >>> _checked_meta({"param_configs": [], "maximize": True}, "study file 's/study.json'")
    Traceback (most recent call last):
    ...
    ValueError: study file 's/study.json' has no key 'sampler' (the sampler's name and settings); repair it or use another directory to start a new study
    """
    required = {"param_configs": "the search space", "maximize": "the direction",
                "sampler": "the sampler's name and settings"}
    for key, what in required.items():
        if key not in meta:
            raise ValueError(f"{where} has no key {key!r} ({what}); repair it or use another directory to start a new study")
    if not isinstance(meta["sampler"], Mapping):
        raise ValueError(f"{where}: key 'sampler' must be an object with 'name' and 'settings', got {meta['sampler']!r}")
    for key in ("name", "settings"):
        if key not in meta["sampler"]:
            raise ValueError(f"{where} has no key 'sampler.{key}'; repair it or use another directory to start a new study")
    return {**META_DEFAULTS, **meta}


class Study:
    """An ask/tell optimisation study over ``param_configs`` (optionally persisted).

    ``sampler`` is a sampler object from :mod:`rl2fx.tuning.samplers` or its name
    (``"random"``, ``"grid"``, ``"bayesian"``, ``"skopt"``; ``sampler_options`` are
    passed to it). ``maximize`` sets the direction; a list of bools (one per objective,
    e.g. ``[True, False]`` for reward up and KL down) makes a multi-objective study
    whose ``tell`` takes one value per objective and whose result is its Pareto set
    (:attr:`best_trials`, :meth:`hypervolume`, :func:`plot_pareto_front`; the
    ``bayesian`` sampler then uses qLogNEHVI). ``pruner`` (an object from
    :mod:`rl2fx.tuning.pruners` or a name) decides ``trial.should_prune()`` from the
    values trials ``report``. ``storage`` is a directory, a database URL (a string
    containing ``"://"``) or a storage object (:mod:`rl2fx.tuning.storage`); if it
    already holds a study, that study is resumed (its search space, direction and
    sampler must match, otherwise ``ValueError`` explains the difference), and several
    processes may work on it at once. A sampler without a seed gets a random one,
    stored so that a resume (and every other worker) continues identically.
    :attr:`storage` is the storage object (``None`` without one).

    ``ask`` and ``tell`` are thread-safe. :attr:`trials` shows every worker's trials as
    of this study's last ``ask``, ``tell`` or :meth:`refresh`.
    """

    def __init__(
        self,
        param_configs: Sequence[HyperparameterConfig | Mapping[str, Any]],
        sampler: Any = "random",
        maximize: bool | Sequence[bool] = True,
        storage: Any = None,
        *,
        seed: int | None = None,
        pruner: Any = None,
        **sampler_options: Any,
    ) -> None:
        self.configs = as_configs(param_configs)
        if isinstance(maximize, list | tuple):
            if len(maximize) < 2 or not all(isinstance(m, bool) for m in maximize):
                raise ValueError(
                    f"maximize must be True, False, or a list of at least two bools (one per objective), got {maximize!r}"
                )
            maximize = list(maximize)
        elif not isinstance(maximize, bool):
            raise ValueError(f"maximize must be True or False, got {maximize!r}")
        self.maximize = maximize
        if isinstance(pruner, str):
            pruner = make_pruner(pruner)
        self.pruner = NopPruner() if pruner is None else pruner
        if not hasattr(self.pruner, "prune"):
            raise ValueError(f"pruner must be a pruner name or object with .prune(), got {pruner!r}")
        if self.n_objectives > 1 and not isinstance(self.pruner, NopPruner):
            raise ValueError(f"pruner={self.pruner.name!r}: pruning needs a single objective, got maximize={maximize!r}")
        self._warned_no_reports = False
        if isinstance(sampler, str):
            sampler = make_sampler(sampler, seed=seed, **sampler_options)
        elif sampler_options or seed is not None:
            raise ValueError("seed and sampler options go to the sampler object when one is passed, not to Study")
        if not hasattr(sampler, "sample") or not hasattr(sampler, "name"):
            raise ValueError(f"sampler must be a sampler name or object with .sample(), got {sampler!r}")
        if self.n_objectives > 1 and not getattr(sampler, "multi_objective", False):
            raise ValueError(
                f"sampler {sampler.name!r} optimises one objective, got maximize={maximize!r}; "
                f"multi-objective studies use 'bayesian', 'random' or 'grid'"
            )
        self._lock = threading.RLock()
        self._state = StudyState()
        self._own: dict[int, Trial] = {}  # running trials this study asked (bound, with their reports)
        self.storage: Any = None
        if storage is None:
            if getattr(sampler, "seed", None) is None:
                sampler = dataclasses.replace(sampler, seed=int.from_bytes(os.urandom(4), "little"))
            self.sampler = sampler
            return
        from rl2fx.tuning.storage import open_storage

        self.storage = open_storage(storage)
        meta = self.storage.read_meta()
        if meta is None:
            drawn = sampler
            if getattr(sampler, "seed", None) is None:
                drawn = dataclasses.replace(sampler, seed=int.from_bytes(os.urandom(4), "little"))
            self.sampler = drawn
            # first writer wins: a worker starting at the same moment adopts the stored seed
            meta = self.storage.init_meta(self._meta())
        meta = _checked_meta(meta, self._meta_where())
        self._check_compatible(meta, sampler)
        if sampler.seed is None:
            sampler = dataclasses.replace(sampler, seed=meta["sampler"]["settings"].get("seed"))
        self.sampler = sampler
        self._state = self.storage.load()

    @property
    def n_objectives(self) -> int:
        return len(self.maximize) if isinstance(self.maximize, list) else 1

    # -- persistence -------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        meta = {
            "format": 1,
            "param_configs": [c.to_dict() for c in self.configs],
            "maximize": self.maximize,
            "sampler": {"name": self.sampler.name, "settings": self.sampler.settings()},
        }
        if not isinstance(self.pruner, NopPruner):
            meta["pruner"] = {"name": self.pruner.name, "settings": self.pruner.settings()}
        return meta

    def _meta_where(self) -> str:
        loc = getattr(self.storage, "location", str(self.storage))
        path = getattr(self.storage, "path", None)
        return f"study file {str(path / 'study.json')!r}" if path is not None else f"study description in {loc!r}"

    def _check_compatible(self, meta: dict[str, Any], sampler: Any) -> None:
        where = f"storage {getattr(self.storage, 'location', str(self.storage))!r} holds a different study"
        mine = [c.to_dict() for c in self.configs]
        if json.loads(json.dumps(mine)) != meta["param_configs"]:
            raise ValueError(f"{where}: its param_configs are {meta['param_configs']}, got {mine}; use another directory to start a new study")
        if meta["maximize"] != self.maximize:
            raise ValueError(f"{where}: maximize={meta['maximize']}, got maximize={self.maximize}")
        if meta["sampler"]["name"] != sampler.name:
            raise ValueError(f"{where}: sampler {meta['sampler']['name']!r}, got {sampler.name!r}")
        stored = dict(meta["sampler"]["settings"])
        given = json.loads(json.dumps(sampler.settings()))
        if "seed" in given and given["seed"] is None:
            given["seed"] = stored.get("seed")
        # settings added in later versions are absent from older studies
        given = {k: v for k, v in given.items() if k in stored}
        if stored != given:
            raise ValueError(f"{where}: sampler settings {stored}, got {given}")

    def _merge(self, state: StudyState) -> StudyState:
        """``state`` from the storage, with this study's own running trials as it holds them:
        bound to it, and running until it tells them, even if another worker took this one for
        dead and failed them (the storage keeps a late result, see ``DatabaseStorage.tell``)."""
        own = set(self._own)
        return dataclasses.replace(
            state,
            finished=tuple(t for t in state.finished if t.number not in own),
            pending=tuple(t for t in state.pending if t.number not in own) + tuple(self._own.values()),
        )

    def refresh(self) -> Study:
        """Reload every worker's trials from the storage (a no-op without one); returns ``self``."""
        if self.storage is not None:
            with self._lock:
                self._state = self._merge(self.storage.load())
        return self

    # -- ask / tell --------------------------------------------------------------------------
    def ask(self, *, max_trials: int | None = None) -> Trial:
        """Start a new trial (``StudyExhausted`` when the sampler has nothing left).

        With a storage, the sampler runs on every worker's trials, under the storage's lock;
        a trial queued by the storage (one a dead worker was running) is handed out first.
        ``max_trials`` is a budget shared by all workers: when that many trials are finished
        or running, ``ask`` raises :class:`TrialBudgetReached` instead (queued trials still
        run: they redo work that was lost).
        """
        if max_trials is not None and (isinstance(max_trials, bool) or not isinstance(max_trials, int)
                                       or max_trials < 1):
            raise ValueError(f"max_trials must be a positive integer or None, got {max_trials!r}")

        def propose(st: StudyState) -> Trial:
            st = self._merge(st)
            if max_trials is not None and len(st.finished) + len(st.pending) >= max_trials:
                raise TrialBudgetReached(f"max_trials={max_trials} reached: {len(st.finished)} trials finished, "
                                         f"{len(st.pending)} running")
            return study_ask(st, self.configs, self.sampler, self.maximize)[1]

        with self._lock:
            if self.storage is None:
                propose(self._state)  # the budget check
                self._state, trial = study_ask(self._state, self.configs, self.sampler, self.maximize)
            else:
                state, trial = self.storage.ask(propose)
                self._own[trial.number] = trial
                self._state = self._merge(state)
            object.__setattr__(trial, "_bound_study", self)
            return trial

    def tell(
        self,
        trial: Trial,
        value: float | Sequence[float] | BaseException,
        metrics: Mapping[str, Any] | None = None,
    ) -> Trial:
        """Finish ``trial`` with a value (one per objective in a multi-objective study), an
        exception, or :class:`TrialPruned`; persist, and return the finished trial."""
        with self._lock:
            state, done = study_tell(self._state, trial, value, metrics, self.n_objectives)
            if self.storage is not None:
                self.storage.tell(done)
                self._own.pop(done.number, None)
            self._state = state
            if not isinstance(self.pruner, NopPruner) and not done.intermediate and not self._warned_no_reports:
                self._warned_no_reports = True
                warnings.warn(
                    f"pruner={self.pruner.name!r} is set but trial {done.number} finished without any "
                    f"trial.report(value, step); nothing can be pruned until trials report",
                    stacklevel=2,
                )
            return done

    def report(self, trial: Trial, value: float, step: int) -> None:
        """Record ``value`` of running ``trial`` after ``step`` units of resource."""
        if self.n_objectives > 1:
            raise ValueError(f"report() needs a single-objective study, this one has maximize={self.maximize!r}")
        with self._lock:
            state = study_report(self._state, trial, value, step)
            if state is self._state:  # a step already reported keeps its first value
                return
            if self.storage is not None:
                self.storage.report(trial, step, float(value))
            self._state = state
            idx = _running_index(state, trial)
            if trial.number in self._own:
                self._own[trial.number] = state.pending[idx]

    def should_prune(self, trial: Trial) -> bool:
        """Ask the pruner whether running ``trial`` should stop, given its reports so far."""
        with self._lock:
            idx = next((i for i, t in enumerate(self._state.pending) if t.number == trial.number), None)
            if idx is None:
                raise ValueError(f"trial {trial.number} is not a running trial of this study")
            current = self._state.pending[idx]
            if not current.intermediate:
                raise ValueError(
                    f"should_prune() on trial {trial.number} needs at least one trial.report(value, step) first"
                )
            others = [t for t in self._state.pending if t.number != trial.number]
            return bool(self.pruner.prune(self._state.finished, current, self.maximize, others))

    def forget_pending(self) -> list[Trial]:
        """Drop this study's running trials that will never be told (e.g. after an interrupted
        loop); they are not recorded, exactly as if the process had died: with a storage, they
        are queued and the next ``ask`` (of any worker) runs them again. Returns them."""
        with self._lock:
            if self.storage is None:
                dropped = list(self._state.pending)
                self._state = dataclasses.replace(self._state, pending=())
                return dropped
            dropped = [t for t in self._state.pending if t.number in self._own]
            self.storage.release(dropped)
            self._own.clear()
            self._state = self._merge(self.storage.load())
            return dropped

    def add_trial(self, params: Mapping[str, Any], value: float | BaseException, metrics: Mapping[str, Any] | None = None) -> Trial:
        """Record an evaluation made elsewhere (warm start from earlier runs), as Optuna's ``add_trial``."""
        validate_params(self.configs, params)

        def fixed(state: StudyState) -> Trial:
            return Trial(number=state.next_number, params=dict(params), info={"added": True}, started_at=time.time())

        with self._lock:
            if self.storage is None:
                trial = fixed(self._state)
                self._state = dataclasses.replace(self._state, pending=(*self._state.pending, trial),
                                                  next_number=trial.number + 1)
            else:
                state, trial = self.storage.ask(fixed, reuse_queued=False)
                self._own[trial.number] = trial
                self._state = self._merge(state)
            return self.tell(trial, value, metrics)

    # -- results -----------------------------------------------------------------------------
    @property
    def trials(self) -> list[Trial]:
        """Finished trials in the order they were told."""
        return list(self._state.finished)

    @property
    def pending(self) -> list[Trial]:
        return list(self._state.pending)

    @property
    def complete_trials(self) -> list[Trial]:
        return [t for t in self._state.finished if t.state == "complete"]

    @property
    def best_trial(self) -> Trial:
        if self.n_objectives > 1:
            raise ValueError(
                f"a study with maximize={self.maximize!r} has no single best trial; use best_trials (its Pareto set)"
            )
        done = self.complete_trials
        if not done:
            n = len(self._state.finished)
            first = next((t.error for t in self._state.finished if t.error), None)
            raise ValueError(f"no complete trial yet ({n} finished, all failed){'; first error: ' + first if first else ''}")
        key = (lambda t: t.value) if self.maximize else (lambda t: -t.value)
        return max(done, key=key)

    @property
    def best_params(self) -> dict[str, Any]:
        return dict(self.best_trial.params)

    @property
    def best_value(self) -> float:
        return float(self.best_trial.value)

    # -- multi-objective results -------------------------------------------------------------
    def objective_matrix(self, trials: Sequence[Trial] | None = None):
        """Objective values of complete trials as an ``[n, m]`` float64 array, signed so
        that every column is maximised (the convention of :mod:`rl2fx.pareto`)."""
        import numpy as np

        trials = self.complete_trials if trials is None else trials
        dirs = self.maximize if isinstance(self.maximize, list) else [self.maximize]
        sign = np.array([1.0 if d else -1.0 for d in dirs])
        vals = [t.values if t.values is not None else [t.value] for t in trials]
        return np.asarray(vals, dtype=np.float64).reshape(len(trials), len(dirs)) * sign

    @property
    def best_trials(self) -> list[Trial]:
        """The Pareto set: complete trials not dominated by another (the best trial, for one objective)."""
        from rl2fx.pareto import pareto_front_mask

        done = self.complete_trials
        if not done:
            return []
        mask = pareto_front_mask(self.objective_matrix(done))
        return [t for t, keep in zip(done, mask.tolist(), strict=True) if keep]

    def hypervolume(self, ref_point: Sequence[float] | None = None) -> float:
        """Hypervolume of the Pareto set (:func:`rl2fx.pareto.hypervolume`, pymoo/moocore).

        ``ref_point`` is in the objectives' own units and directions (a value to beat
        in each); by default the nadir of the complete trials pushed 10 % of the range
        outward (:func:`rl2fx.pareto.nadir_reference_point`).
        """
        import numpy as np

        from rl2fx.pareto import hypervolume, nadir_reference_point

        pts = self.objective_matrix()
        if pts.shape[0] == 0:
            return 0.0
        if ref_point is None:
            ref = np.asarray(nadir_reference_point(pts), dtype=np.float64)
        else:
            dirs = self.maximize if isinstance(self.maximize, list) else [self.maximize]
            if len(ref_point) != len(dirs):
                raise ValueError(f"ref_point must have {len(dirs)} entries (one per objective), got {list(ref_point)!r}")
            ref = np.asarray(ref_point, dtype=np.float64) * np.array([1.0 if d else -1.0 for d in dirs])
        return float(hypervolume(pts, ref))

    def trials_dataframe(self):
        """All finished trials as a pandas DataFrame: number, state, value, ``params.*``,
        ``metrics.*``, error, duration (seconds)."""
        import pandas as pd

        rows = []
        for t in self._state.finished:
            row: dict[str, Any] = {"number": t.number, "state": t.state, "value": t.value}
            if t.values is not None:
                row.update({f"values_{i}": v for i, v in enumerate(t.values)})
            row.update({f"params.{k}": v for k, v in t.params.items()})
            row.update({f"metrics.{k}": v for k, v in t.metrics.items()})
            row["error"] = t.error
            row["duration"] = t.duration
            rows.append(row)
        cols = ["number", "state", "value", *[f"params.{c.name}" for c in self.configs], "error", "duration"]
        return pd.DataFrame(rows, columns=None if rows else cols)

    def state_dict(self) -> dict[str, Any]:
        return {"meta": self._meta(), "trials": [dataclasses.asdict(t) for t in self._state.finished]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_compatible(state["meta"], self.sampler)
        finished = tuple(Trial(**t) for t in state["trials"])
        with self._lock:
            if self.storage is None:
                nxt = max((t.number for t in finished), default=-1) + 1
                self._state = StudyState(finished=finished, pending=(), next_number=nxt)
            else:
                self.storage.replace(finished)
                self._state = self._merge(self.storage.load())
