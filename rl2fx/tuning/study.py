"""Ask/tell studies, persisted after every tell and resumable after a crash.

The state of a study is a frozen :class:`StudyState` (finished trials, running
trials, next trial number) changed only by the pure functions :func:`study_ask` and
:func:`study_tell`; :class:`Study` holds one state, a sampler and an optional
storage directory. With ``storage=path`` the study writes

- ``path/study.json``: the search space, direction, sampler name and settings
  (including the seed actually used), written once;
- ``path/trials.jsonl``: one JSON line per finished trial, rewritten after every
  ``tell`` by writing a temporary file, ``fsync`` and ``os.replace`` (atomic on
  POSIX), so a study killed at any instant (even by SIGKILL) leaves either the old
  or the new file, never a torn one.

Opening the same directory again resumes: finished trials are reloaded and the
trials that were running when the process died are lost (their grid points or trial
numbers are simply asked again). This is the ask-and-tell interface of Optuna and
scikit-optimize.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl2fx.tuning.samplers import StudyExhausted, make_sampler
from rl2fx.tuning.space import HyperparameterConfig, as_configs, validate_params

__all__ = ["Trial", "StudyState", "study_ask", "study_tell", "Study", "StudyExhausted"]

TRIAL_STATES = ("running", "complete", "failed")


@dataclass(frozen=True)
class Trial:
    """One evaluation: its number, parameters, and once told, its state and value.

    ``state`` is ``"running"`` (asked, not told), ``"complete"`` (finite value) or
    ``"failed"`` (an exception, or a NaN/inf value; ``error`` says which).
    ``metrics`` keeps the other numbers an objective returned; ``info`` what the
    sampler recorded (grid index, design phase).
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

    @property
    def duration(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started_at

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


def study_tell(
    state: StudyState,
    trial: Trial,
    value: float | BaseException,
    metrics: Mapping[str, Any] | None = None,
) -> tuple[StudyState, Trial]:
    """Record the outcome of a running trial.

    A finite number completes it; an exception, NaN or ±inf marks it failed (kept in
    the history, never shown to the model). Telling a trial that is not running raises.
    """
    idx = next((i for i, t in enumerate(state.pending) if t.number == trial.number), None)
    if idx is None:
        done = any(t.number == trial.number for t in state.finished)
        raise ValueError(f"trial {trial.number} is {'already finished' if done else 'not a running trial of this study'}; tell each asked trial exactly once")
    error = None
    val: float | None
    if isinstance(value, BaseException):
        val, error = None, "".join(traceback.format_exception_only(type(value), value)).strip()
    else:
        if isinstance(value, bool) or not isinstance(value, int | float) and not hasattr(value, "__float__"):
            raise ValueError(f"tell value must be a number or an exception, got {type(value).__name__}: {value!r}")
        val = float(value)
        if not math.isfinite(val):
            error = f"objective value is not finite: {val}"
    done = dataclasses.replace(
        state.pending[idx],
        state="failed" if error else "complete",
        value=val,
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


class Study:
    """An ask/tell optimisation study over ``param_configs`` (optionally persisted).

    ``sampler`` is a sampler object from :mod:`rl2fx.tuning.samplers` or its name
    (``"random"``, ``"grid"``, ``"bayesian"``, ``"skopt"``; ``sampler_options`` are
    passed to it). ``maximize`` sets the direction. ``storage`` is a directory; if it
    already holds a study, that study is resumed (its search space, direction and
    sampler must match, otherwise ``ValueError`` explains the difference). A sampler
    without a seed gets a random one, stored so that a resume continues identically.

    ``ask`` and ``tell`` are thread-safe.
    """

    def __init__(
        self,
        param_configs: Sequence[HyperparameterConfig | Mapping[str, Any]],
        sampler: Any = "random",
        maximize: bool = True,
        storage: str | os.PathLike[str] | None = None,
        *,
        seed: int | None = None,
        **sampler_options: Any,
    ) -> None:
        self.configs = as_configs(param_configs)
        if not isinstance(maximize, bool):
            raise ValueError(f"maximize must be True or False, got {maximize!r}")
        self.maximize = maximize
        if isinstance(sampler, str):
            sampler = make_sampler(sampler, seed=seed, **sampler_options)
        elif sampler_options or seed is not None:
            raise ValueError("seed and sampler options go to the sampler object when one is passed, not to Study")
        if not hasattr(sampler, "sample") or not hasattr(sampler, "name"):
            raise ValueError(f"sampler must be a sampler name or object with .sample(), got {sampler!r}")
        self.storage = Path(storage) if storage is not None else None
        self._lock = threading.RLock()
        self._state = StudyState()
        meta_path = self.storage / "study.json" if self.storage is not None else None
        if meta_path is not None and meta_path.exists():
            meta = json.loads(meta_path.read_text())
            self._check_compatible(meta, sampler)
            if sampler.seed is None:
                sampler = dataclasses.replace(sampler, seed=meta["sampler"]["settings"].get("seed"))
            self.sampler = sampler
            self._state = self._load_trials()
        else:
            if getattr(sampler, "seed", None) is None:
                sampler = dataclasses.replace(sampler, seed=int.from_bytes(os.urandom(4), "little"))
            self.sampler = sampler
            if self.storage is not None:
                self.storage.mkdir(parents=True, exist_ok=True)
                _atomic_write(meta_path, json.dumps(self._meta(), indent=2))

    # -- persistence -------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "format": 1,
            "param_configs": [c.to_dict() for c in self.configs],
            "maximize": self.maximize,
            "sampler": {"name": self.sampler.name, "settings": self.sampler.settings()},
        }

    def _check_compatible(self, meta: dict[str, Any], sampler: Any) -> None:
        where = f"storage {str(self.storage)!r} holds a different study"
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
        if stored != given:
            raise ValueError(f"{where}: sampler settings {stored}, got {given}")

    def _load_trials(self) -> StudyState:
        path = self.storage / "trials.jsonl"
        for stale in self.storage.glob(".trials.jsonl.*.tmp"):  # a write cut short by a kill
            stale.unlink(missing_ok=True)
        finished: list[Trial] = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    finished.append(Trial.from_json(line))
        nxt = max((t.number for t in finished), default=-1) + 1
        return StudyState(finished=tuple(finished), pending=(), next_number=nxt)

    def _save(self) -> None:
        if self.storage is not None:
            text = "".join(t.to_json() + "\n" for t in self._state.finished)
            _atomic_write(self.storage / "trials.jsonl", text)

    # -- ask / tell --------------------------------------------------------------------------
    def ask(self) -> Trial:
        """Start a new trial (``StudyExhausted`` when the sampler has nothing left)."""
        with self._lock:
            self._state, trial = study_ask(self._state, self.configs, self.sampler, self.maximize)
            return trial

    def tell(self, trial: Trial, value: float | BaseException, metrics: Mapping[str, Any] | None = None) -> Trial:
        """Finish ``trial`` with a value or an exception, persist, and return the finished trial."""
        with self._lock:
            self._state, done = study_tell(self._state, trial, value, metrics)
            self._save()
            return done

    def forget_pending(self) -> list[Trial]:
        """Drop running trials that will never be told (e.g. after an interrupted loop);
        they are not recorded, exactly as if the process had died. Returns them."""
        with self._lock:
            dropped = list(self._state.pending)
            self._state = dataclasses.replace(self._state, pending=())
            return dropped

    def add_trial(self, params: Mapping[str, Any], value: float | BaseException, metrics: Mapping[str, Any] | None = None) -> Trial:
        """Record an evaluation made elsewhere (warm start from earlier runs), as Optuna's ``add_trial``."""
        validate_params(self.configs, params)
        with self._lock:
            number = self._state.next_number
            trial = Trial(number=number, params=dict(params), info={"added": True}, started_at=time.time())
            self._state = dataclasses.replace(self._state, pending=(*self._state.pending, trial), next_number=number + 1)
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

    def trials_dataframe(self):
        """All finished trials as a pandas DataFrame: number, state, value, ``params.*``,
        ``metrics.*``, error, duration (seconds)."""
        import pandas as pd

        rows = []
        for t in self._state.finished:
            row: dict[str, Any] = {"number": t.number, "state": t.state, "value": t.value}
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
            self._state = StudyState(finished=finished, pending=(), next_number=max((t.number for t in finished), default=-1) + 1)
            self._save()
