"""Study storage shared by several workers: a directory on one machine, or a database for many.

A :class:`~rl2fx.tuning.study.Study` keeps its search space and trials in a storage
object with one small interface (:class:`StudyStorage`). Two backends implement it:

- :class:`DirectoryStorage` (``Study(..., storage="path/to/dir")``): plain files, safe for
  any number of processes on one machine. Every change is one appended JSON line, written
  while holding an OS file lock (:mod:`filelock`) on ``path/.lock``:

  - ``study.json``: search space, direction, sampler name and settings (written once);
  - ``trials.jsonl``: one line per finished trial (complete, failed or pruned), the same
    format older versions rewrote after each tell, so their directories resume as they are;
  - ``asks.jsonl``: one line per event of a running trial (``ask``, ``report``, ``lost``).

  Trial numbers are allocated, and samplers run, under the lock, so no two workers get the
  same number or the same grid point. Each worker (one :class:`DirectoryStorage` object)
  holds a lock on ``path/workers/<id>.lock`` while it lives; the OS drops it when the process
  dies, however it dies, so a running trial whose worker lock is free belongs to a dead
  worker. Such a trial is ``lost``: it is not recorded as finished, and its number and
  parameters are queued so the next ``ask`` of any worker runs it again.

- :class:`DatabaseStorage` (``Study(..., storage="sqlite:///study.db")`` or any SQLAlchemy
  URL, e.g. ``postgresql+psycopg://user@host/db`` with the ``postgres`` extra): two tables
  (``rl2fx_studies``, ``rl2fx_trials``; a trial's number is unique per study). Numbers are
  allocated and samplers run inside one write transaction (``BEGIN IMMEDIATE`` on SQLite,
  ``SELECT ... FOR UPDATE`` of the study row elsewhere). A daemon thread refreshes the
  ``heartbeat`` of the worker's running trials every ``heartbeat_interval`` seconds; at
  each ask, a running trial whose heartbeat is older than ``grace_period`` is marked failed
  (``"stale heartbeat: worker died"``) and its parameters are queued as a new trial
  (``info["retry_of"]``) that the next ``ask`` evaluates, as Optuna's RDB storage does with
  ``heartbeat_interval``, ``fail_stale_trials`` and ``RetryFailedTrialCallback``.

>>> import tempfile
>>> from rl2fx import HyperparameterConfig, Study
>>> space = [HyperparameterConfig("x", "float", low=0.0, high=1.0)]
>>> url = f"sqlite:///{tempfile.mkdtemp()}/study.db"
>>> a, b = Study(space, "random", storage=url, seed=0), Study(space, "random", storage=url)
>>> ta, tb = a.ask(), b.ask()            # two workers on one study
>>> _ = a.tell(ta, 1.0); _ = b.tell(tb, 2.0)
>>> sorted(t.number for t in a.refresh().trials)
[0, 1]
>>> a.storage.close(); b.storage.close()
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from rl2fx.tuning.study import StudyState, Trial, _atomic_write

__all__ = [
    "StudyStorage",
    "StorageError",
    "DirectoryStorage",
    "DatabaseStorage",
    "open_storage",
]

#: A trial lost by a dead worker, or released by ``Study.forget_pending``, goes back to the queue.
LOST = "lost"


class StorageError(RuntimeError, ValueError):
    """A study storage that cannot be opened or written (the message names it and the cause).

    Also a ``ValueError``: the storage argument (a path or URL) is what has to change, and the
    CLI reports it as a one-line input error."""


Propose = Callable[[StudyState], Trial]


@runtime_checkable
class StudyStorage(Protocol):
    """What a :class:`~rl2fx.tuning.study.Study` needs from where its trials live.

    ``ask`` runs ``propose`` (the sampler) on the current state of all workers while holding
    the storage's lock, so its result is consistent with every other worker's trials.
    """

    location: str

    def read_meta(self) -> dict[str, Any] | None:
        """The stored study description (``study.json``), or ``None`` for a new study."""
        ...

    def init_meta(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """Store ``meta`` unless a description exists; return the one stored (first writer wins)."""
        ...

    def load(self) -> StudyState:
        """Every worker's finished trials (in tell order), live running trials, next number."""
        ...

    def ask(self, propose: Propose, *, reuse_queued: bool = True) -> tuple[StudyState, Trial]:
        """Start a trial: a queued one (lost or retried) if any and ``reuse_queued``, else ``propose(state)``."""
        ...

    def tell(self, trial: Trial) -> None:
        """Record a finished trial (``trial.state`` complete, failed or pruned)."""
        ...

    def report(self, trial: Trial, step: int, value: float) -> None:
        """Record an intermediate value of a running trial."""
        ...

    def release(self, trials: Sequence[Trial]) -> None:
        """Give back running trials that will never be told: they are queued to be asked again."""
        ...

    def replace(self, finished: Sequence[Trial]) -> None:
        """Replace every finished trial by ``finished`` (``Study.load_state_dict``)."""
        ...

    def close(self) -> None:
        """Stop background work and release this worker's locks."""
        ...


def open_storage(storage: Any) -> StudyStorage:
    """The storage a ``Study(storage=...)`` argument names.

    A string containing ``"://"`` is a SQLAlchemy database URL (:class:`DatabaseStorage`);
    another string or an ``os.PathLike`` is a directory (:class:`DirectoryStorage`); an object
    implementing :class:`StudyStorage` is used as it is.

    >>> import tempfile
    >>> type(open_storage(tempfile.mkdtemp())).__name__
    'DirectoryStorage'
    """
    if isinstance(storage, str) and "://" in storage:
        return DatabaseStorage(storage)
    if isinstance(storage, str | os.PathLike):
        return DirectoryStorage(storage)
    if isinstance(storage, StudyStorage):
        return storage
    raise ValueError(
        f"storage must be a directory path, a database URL (e.g. 'sqlite:///study.db') or a storage object "
        f"(DirectoryStorage, DatabaseStorage), got {type(storage).__name__}: {storage!r}"
    )


def _worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=True, default=str, separators=(",", ":"))


# ------------------------------------------------------------------------------------------------
# Directory storage
# ------------------------------------------------------------------------------------------------


class _JsonlTail:
    """Incremental reader of an append-only JSON-lines file: each call returns the complete
    lines written since the last one (a line still being written, without its ``\\n``, waits)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.inode: int | None = None
        self.line_no = 0

    def reset(self) -> None:
        self.offset, self.inode, self.line_no = 0, None, 0

    def read(self) -> tuple[list[tuple[int, str]], bool]:
        """New complete lines as ``(line number, text)``, and whether the file was replaced
        (then the caller re-reads everything: ``Study.load_state_dict`` rewrote it)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            replaced = self.offset > 0
            self.reset()
            return [], replaced
        replaced = self.inode is not None and (st.st_ino != self.inode or st.st_size < self.offset)
        if replaced:
            self.reset()
        self.inode = st.st_ino
        if st.st_size == self.offset:
            return [], replaced
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(st.st_size - self.offset)
        end = data.rfind(b"\n")
        if end < 0:
            return [], replaced
        self.offset += end + 1
        out = []
        for raw in data[: end + 1].split(b"\n")[:-1]:
            self.line_no += 1
            out.append((self.line_no, raw.decode("utf-8")))
        return out, replaced

    def torn_tail(self) -> int:
        """Bytes after the last complete line (a write cut short by a crash, when no writer holds the lock)."""
        try:
            return max(os.path.getsize(self.path) - self.offset, 0)
        except FileNotFoundError:
            return 0


def _append(path: Path, line: str) -> None:
    """Append one line with a single ``write`` on an ``O_APPEND`` descriptor, then ``fsync``."""
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):  # pragma: no cover - regular files take the whole write
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryStorage:
    """A study in a directory, safe for concurrent workers on one machine (see the module docstring).

    Args:
        path: the study's directory (created if absent). A directory written by older rl2fx
            versions (``study.json`` + ``trials.jsonl`` only) is resumed as it is.
        lock_timeout: seconds to wait for the study lock before raising :class:`StorageError`
            (a worker holds it only while sampling and appending a line).

    Trials running in a worker that died are re-run: their numbers and parameters are queued
    and handed out by the next ``ask`` of any worker. Within one process, a second storage
    object on the same directory (e.g. a notebook cell run again) takes over the running
    trials of the earlier ones as lost: share one ``Study`` between threads instead (it is
    thread-safe).

    >>> import tempfile
    >>> s = DirectoryStorage(tempfile.mkdtemp())
    >>> s.load().next_number
    0
    """

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float = 600.0) -> None:
        import filelock

        if not isinstance(path, str | os.PathLike):
            raise ValueError(f"path must be a directory path, got {type(path).__name__}: {path!r}")
        if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, int | float) or not lock_timeout > 0:
            raise ValueError(f"lock_timeout must be a positive number of seconds, got {lock_timeout!r}")
        self.path = Path(path)
        self.location = str(self.path)
        self.lock_timeout = float(lock_timeout)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "workers").mkdir(exist_ok=True)
        except OSError as e:
            raise StorageError(f"study directory {self.location!r} cannot be created: {e.strerror or e}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StorageError(f"study directory {self.location!r} is not writable (permission denied)")
        self._lock = filelock.FileLock(self.path / ".lock", timeout=self.lock_timeout, thread_local=False,
                                       preserve_lock_file=True)
        self._local = threading.RLock()
        self.worker = _worker_id()
        self._worker_lock: Any = None
        self._trials = _JsonlTail(self.path / "trials.jsonl")
        self._asks = _JsonlTail(self.path / "asks.jsonl")
        self._fold_reset()
        self._dead: set[str] = set()
        self._finalizer = weakref.finalize(self, DirectoryStorage._release_worker_lock, [None])
        with self._locked():  # temp files of a writer killed under the lock: no one else writes them now
            for name in ("study.json", "trials.jsonl", "asks.jsonl"):  # not the tuner's summaries (no lock)
                for stale in self.path.glob(f".{name}.*.tmp"):
                    stale.unlink(missing_ok=True)

    # -- locking and liveness --------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        import filelock

        with self._local:
            try:
                self._lock.acquire()
            except filelock.Timeout:
                raise StorageError(
                    f"study directory {self.location!r}: its lock {str(self.path / '.lock')!r} was held by another "
                    f"worker for more than lock_timeout={self.lock_timeout} s"
                ) from None
            try:
                yield
            finally:
                self._lock.release()

    def _hold_worker_lock(self) -> None:
        import filelock

        if self._worker_lock is None:
            lock = filelock.FileLock(self.path / "workers" / f"{self.worker}.lock", timeout=0, thread_local=False,
                                     preserve_lock_file=True)
            lock.acquire()
            self._worker_lock = lock
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, DirectoryStorage._release_worker_lock, [lock])

    @staticmethod
    def _release_worker_lock(holder: list[Any]) -> None:
        lock = holder[0]
        if lock is not None:
            lock.release(force=True)
            Path(lock.lock_file).unlink(missing_ok=True)

    def _alive(self, worker: str, pid: int | None, host: str | None) -> bool:
        import filelock

        if worker == self.worker:
            return True
        if worker in self._dead:
            return False
        if pid == os.getpid() and host == socket.gethostname():
            # an earlier storage object of this process: superseded (its trials are re-run)
            self._dead.add(worker)
            return False
        path = self.path / "workers" / f"{worker}.lock"
        if not path.exists():
            self._dead.add(worker)
            return False
        probe = filelock.FileLock(path, timeout=0, thread_local=False, preserve_lock_file=True)
        try:
            probe.acquire()
        except filelock.Timeout:
            return True
        probe.release(force=True)
        path.unlink(missing_ok=True)  # a dead worker's file: "absent" now says the same, without piling up
        self._dead.add(worker)
        return False

    # -- the log, folded ---------------------------------------------------------------------------
    def _fold_reset(self) -> None:
        self._finished: list[Trial] = []
        self._finished_numbers: set[int] = set()
        self._asked: dict[int, dict[str, Any]] = {}
        self._reports: dict[int, dict[str, float]] = {}
        self._lost: dict[int, dict[str, Any]] = {}  # number -> its ask record, in loss order
        self._max_number = -1
        self._trials.reset()
        self._asks.reset()

    def _parse(self, tail: _JsonlTail, what: str, line_no: int, text: str) -> dict[str, Any]:
        try:
            rec = json.loads(text)
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
            return rec
        except ValueError as e:
            raise ValueError(f"{what} file {str(tail.path)!r}, line {line_no}: not a {what} record ({e}); "
                             "repair or delete that line to resume the study") from None

    def _refresh(self) -> None:
        new_trials, replaced_t = self._trials.read()
        new_asks, replaced_a = self._asks.read()
        if replaced_t or replaced_a:
            self._fold_reset()
            new_trials, _ = self._trials.read()
            new_asks, _ = self._asks.read()
        for line_no, text in new_asks:
            if not text.strip():
                continue
            rec = self._parse(self._asks, "trial event", line_no, text)
            try:
                event, number = rec["event"], int(rec["number"])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"trial event file {str(self._asks.path)!r}, line {line_no}: missing or bad "
                                 f"key {e}; repair or delete that line to resume the study") from None
            if event == "ask":
                self._asked[number] = rec
                self._lost.pop(number, None)
                self._reports.pop(number, None)
                self._max_number = max(self._max_number, number)
            elif event == "report":
                self._reports.setdefault(number, {}).setdefault(str(rec["step"]), float(rec["value"]))
            elif event == LOST:
                if number in self._asked and number not in self._finished_numbers:
                    self._lost[number] = self._asked[number]
            else:
                raise ValueError(f"trial event file {str(self._asks.path)!r}, line {line_no}: unknown event "
                                 f"{event!r}; expected ask, report or lost")
        for line_no, text in new_trials:
            if not text.strip():
                continue
            try:
                trial = Trial.from_json(text)
            except (ValueError, TypeError) as e:  # a torn or hand-edited record
                raise ValueError(f"trial file {str(self._trials.path)!r}, line {line_no}: not a trial record ({e}); "
                                 "repair or delete that line to resume the study") from None
            self._finished.append(trial)
            self._finished_numbers.add(trial.number)
            self._lost.pop(trial.number, None)  # told late: no need to run it again
            self._max_number = max(self._max_number, trial.number)

    def _running(self) -> list[tuple[Trial, dict[str, Any]]]:
        out = []
        for number, rec in self._asked.items():
            if number in self._finished_numbers or number in self._lost:
                continue
            t = Trial(number=number, params=dict(rec["params"]), info=dict(rec.get("info", {})),
                      started_at=float(rec.get("started_at", 0.0)), intermediate=dict(self._reports.get(number, {})))
            out.append((t, rec))
        return out

    def _state(self, *, mark_lost: bool) -> StudyState:
        pending = []
        for t, rec in self._running():
            if self._alive(str(rec.get("worker")), rec.get("pid"), rec.get("host")):
                pending.append(t)
            elif mark_lost:  # only under the lock: one writer records the loss
                _append(self._asks.path, _dumps({"event": LOST, "number": t.number, "worker": rec.get("worker"),
                                                 "by": self.worker, "at": time.time()}))
                self._lost[t.number] = rec
        return StudyState(finished=tuple(self._finished), pending=tuple(pending), next_number=self._max_number + 1)

    def _repair_tails(self) -> None:
        for tail in (self._trials, self._asks):
            extra = tail.torn_tail()
            if extra:
                with open(tail.path, "rb+") as f:
                    f.truncate(tail.offset)
                warnings.warn(f"{str(tail.path)!r}: removed {extra} bytes of an incomplete last line (a write cut "
                              f"short by a crash); the trial it belonged to runs again", stacklevel=4)

    # -- the interface -------------------------------------------------------------------------------
    def read_meta(self) -> dict[str, Any] | None:
        path = self.path / "study.json"
        if not path.exists():
            return None
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"study file {str(path)!r} is corrupt ({e}); repair it or use another "
                             "directory to start a new study") from None
        return meta

    def init_meta(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        with self._locked():
            stored = self.read_meta()
            if stored is not None:
                return stored
            _atomic_write(self.path / "study.json", json.dumps(dict(meta), indent=2))
            return dict(meta)

    def load(self) -> StudyState:
        with self._local:
            self._refresh()
            return self._state(mark_lost=False)

    def ask(self, propose: Propose, *, reuse_queued: bool = True) -> tuple[StudyState, Trial]:
        with self._locked():
            self._refresh()
            self._repair_tails()
            self._hold_worker_lock()
            state = self._state(mark_lost=True)
            if reuse_queued and self._lost:
                number, rec = next(iter(self._lost.items()))
                trial = Trial(number=number, params=dict(rec["params"]), info=dict(rec.get("info", {})),
                              started_at=time.time())
            else:
                trial = propose(state)
                if trial.number != state.next_number:
                    raise RuntimeError(f"propose returned trial number {trial.number}, expected {state.next_number}")
            _append(self._asks.path, _dumps({
                "event": "ask", "number": trial.number, "params": trial.params, "info": trial.info,
                "started_at": trial.started_at, "worker": self.worker, "pid": os.getpid(), "host": socket.gethostname(),
            }))
            self._refresh()
            return self._state(mark_lost=False), trial

    def tell(self, trial: Trial) -> None:
        with self._locked():
            self._refresh()
            self._repair_tails()
            if trial.number in self._finished_numbers:
                raise ValueError(f"trial {trial.number} is already finished in {self.location!r}; "
                                 "tell each asked trial exactly once")
            _append(self._trials.path, trial.to_json())

    def report(self, trial: Trial, step: int, value: float) -> None:
        with self._locked():
            _append(self._asks.path, _dumps({"event": "report", "number": trial.number, "step": int(step),
                                             "value": float(value)}))

    def release(self, trials: Sequence[Trial]) -> None:
        if not trials:
            return
        with self._locked():
            self._refresh()
            for t in trials:
                if t.number not in self._finished_numbers:
                    _append(self._asks.path, _dumps({"event": LOST, "number": t.number, "worker": self.worker,
                                                     "by": self.worker, "at": time.time()}))

    def replace(self, finished: Sequence[Trial]) -> None:
        with self._locked():
            self._refresh()
            running = {t.number for t, _ in self._running()} | set(self._lost)
            clash = sorted(running & {t.number for t in finished})
            if clash:
                raise ValueError(f"cannot replace the trials of {self.location!r}: trial numbers {clash} are running")
            _atomic_write(self._trials.path, "".join(t.to_json() + "\n" for t in finished))
            # keep only the events of trials still running, so replaced trials are not taken for lost ones
            keep = []
            for _, text in self._asks_lines():
                rec = json.loads(text)
                if int(rec["number"]) in running:
                    keep.append(text + "\n")
            _atomic_write(self._asks.path, "".join(keep))
            self._fold_reset()

    def _asks_lines(self) -> list[tuple[int, str]]:
        tail = _JsonlTail(self._asks.path)
        lines, _ = tail.read()
        return [(n, t) for n, t in lines if t.strip()]

    def close(self) -> None:
        self._finalizer()

    def __repr__(self) -> str:
        return f"DirectoryStorage({self.location!r})"


# ------------------------------------------------------------------------------------------------
# Database storage
# ------------------------------------------------------------------------------------------------

_FINISHED = ("complete", "failed", "pruned")
_STALE = "stale heartbeat: worker died"


def _schema() -> tuple[Any, Any, Any]:
    """The two tables (SQLAlchemy Core): one row per study, one per trial."""
    from sqlalchemy import (
        Column,
        Float,
        ForeignKey,
        Integer,
        MetaData,
        String,
        Table,
        Text,
        UniqueConstraint,
    )

    md = MetaData()
    studies = Table(
        "rl2fx_studies", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("name", String(255), nullable=False, unique=True),
        Column("meta", Text, nullable=False),  # study.json's content
        Column("created_at", Float, nullable=False),
    )
    trials = Table(
        "rl2fx_trials", md,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("study_id", Integer, ForeignKey("rl2fx_studies.id", ondelete="CASCADE"), nullable=False, index=True),
        Column("number", Integer, nullable=False),
        # waiting (queued to be asked), running, complete, failed, pruned
        Column("state", String(16), nullable=False, index=True),
        Column("params", Text, nullable=False),
        Column("value", Float, nullable=True),  # finite values only (SQLite stores NaN as NULL)
        Column("intermediate", Text, nullable=False),
        # info, value, values, metrics, error as JSON: NaN and inf survive the round trip
        Column("payload", Text, nullable=False),
        Column("started_at", Float, nullable=True),
        Column("finished_at", Float, nullable=True),
        Column("heartbeat", Float, nullable=True),
        Column("worker", String(255), nullable=True),
        UniqueConstraint("study_id", "number", name="uq_rl2fx_trials_study_number"),
    )
    return md, studies, trials


def _payload(t: Trial) -> str:
    return _dumps({"info": t.info, "value": t.value, "values": t.values, "metrics": t.metrics, "error": t.error})


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _row_trial(r: Any) -> Trial:
    p = json.loads(r.payload)
    return Trial(
        number=int(r.number), params=json.loads(r.params), state=str(r.state), value=p.get("value"),
        error=p.get("error"), metrics=p.get("metrics") or {}, info=p.get("info") or {},
        started_at=float(r.started_at or 0.0), finished_at=r.finished_at, values=p.get("values"),
        intermediate=json.loads(r.intermediate),
    )


def _heartbeat_loop(engine: Any, trials: Any, study_id: int, worker: str, interval: float,
                    stop: threading.Event, location: str) -> None:
    from sqlalchemy import update

    warned = False
    while not stop.wait(interval):
        try:
            with engine.connect() as conn:
                conn = conn.execution_options(rl2fx_write=True)
                with conn.begin():
                    conn.execute(update(trials).where(trials.c.study_id == study_id, trials.c.worker == worker,
                                                      trials.c.state == "running").values(heartbeat=time.time()))
        except Exception as e:  # noqa: BLE001 - a transient database error must not end the heartbeat
            if not warned:
                warned = True
                warnings.warn(f"study storage {location!r}: heartbeat update failed ({type(e).__name__}: {e}); "
                              "retrying every heartbeat_interval", stacklevel=1)


class DatabaseStorage:
    """A study in a SQL database (SQLAlchemy 2): many workers on many machines.

    Args:
        url: a SQLAlchemy URL: ``sqlite:///path/study.db`` (the parent directory is created),
            ``postgresql+psycopg://user:password@host/db`` (install ``rl2fx[postgres]``), ...
        study_name: several studies can share one database; each is one row of
            ``rl2fx_studies``.
        heartbeat_interval: seconds between the heartbeats a worker writes for its running
            trials (a daemon thread), or ``None`` for no heartbeat (trials of dead workers then
            stay running).
        grace_period: a running trial of another worker whose heartbeat is older than this many
            seconds is failed (``"stale heartbeat: worker died"``) and its parameters are queued
            as a new trial with ``info["retry_of"]``; default ``2 * heartbeat_interval``. Workers'
            clocks must agree to well within it.
        busy_timeout: seconds a SQLite connection waits for another writer's lock.

    The database is opened, its tables created and a write tried at construction: a wrong URL,
    a missing driver, a read-only or unreachable database raise :class:`StorageError` at once,
    naming the URL (password hidden) and the cause.

    >>> import tempfile
    >>> s = DatabaseStorage(f"sqlite:///{tempfile.mkdtemp()}/s.db", heartbeat_interval=None)
    >>> s.read_meta() is None, s.load().next_number
    (True, 0)
    >>> s.close()
    """

    def __init__(
        self,
        url: str,
        *,
        study_name: str = "default",
        heartbeat_interval: float | None = 60.0,
        grace_period: float | None = None,
        busy_timeout: float = 60.0,
    ) -> None:
        if not isinstance(url, str) or "://" not in url:
            raise ValueError(f"url must be a SQLAlchemy database URL such as 'sqlite:///study.db', got {url!r}")
        if not isinstance(study_name, str) or not study_name:
            raise ValueError(f"study_name must be a non-empty string, got {study_name!r}")
        for name, v in (("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or not (v > 0 and math.isfinite(v))):
                raise ValueError(f"{name} must be a positive finite number of seconds or None, got {v!r}")
        if grace_period is not None and heartbeat_interval is None:
            raise ValueError(f"grace_period={grace_period!r} needs a heartbeat_interval (got None)")
        if heartbeat_interval is not None and grace_period is not None and grace_period <= heartbeat_interval:
            raise ValueError(f"grace_period must exceed heartbeat_interval={heartbeat_interval!r} (a live worker would "
                             f"look dead between two heartbeats), got grace_period={grace_period!r}")
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int | float) or not busy_timeout > 0:
            raise ValueError(f"busy_timeout must be a positive number of seconds, got {busy_timeout!r}")
        self.study_name = study_name
        self.heartbeat_interval = None if heartbeat_interval is None else float(heartbeat_interval)
        self.grace_period = (None if heartbeat_interval is None
                             else float(grace_period) if grace_period is not None else 2.0 * float(heartbeat_interval))
        self.busy_timeout = float(busy_timeout)
        self.worker = _worker_id()
        self.location = url
        self._local = threading.RLock()
        self._study_id: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._md, self._studies, self._trials = _schema()
        self.engine = self._open(url)
        self._finalizer = weakref.finalize(self, DatabaseStorage._shutdown, self._stop, self.engine)

    # -- opening -------------------------------------------------------------------------------
    def _open(self, url: str) -> Any:
        from sqlalchemy import create_engine, event, update
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, SQLAlchemyError
        from sqlalchemy.pool import StaticPool

        try:
            u = make_url(url)
        except ArgumentError as e:
            raise StorageError(f"study storage URL {url!r} is not a SQLAlchemy URL ({e})") from None
        # as the user wrote it, unless there is a password to hide (rendering re-quotes some characters)
        self.location = u.render_as_string(hide_password=True) if u.password else url
        where = f"study storage {self.location!r}"
        kwargs: dict[str, Any] = {}
        sqlite = u.get_backend_name() == "sqlite"
        if sqlite:
            memory = u.database in (None, "", ":memory:")
            kwargs["connect_args"] = {"timeout": self.busy_timeout, "check_same_thread": False}
            if memory:
                kwargs["poolclass"] = StaticPool
            elif not u.query.get("uri"):
                try:
                    Path(u.database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise StorageError(f"{where} cannot be opened: its directory cannot be created "
                                       f"({e.strerror or e})") from None
        try:
            engine = create_engine(u, **kwargs)
        except (ModuleNotFoundError, ImportError) as e:
            extra = " (pip install 'rl2fx[postgres]')" if u.get_backend_name().startswith("postgres") else ""
            raise StorageError(f"{where} cannot be opened: its database driver is not installed: {e}{extra}") from None
        except (ArgumentError, SQLAlchemyError) as e:
            raise StorageError(f"{where} cannot be opened: {e}") from None
        self._sqlite = sqlite
        if sqlite:
            busy_ms = int(self.busy_timeout * 1000)

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                # the driver's own implicit transactions are off so that "begin" below decides
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute(f"PRAGMA busy_timeout = {busy_ms}")
                try:  # readers do not block the writer, nor the writer readers
                    cur.execute("PRAGMA journal_mode = WAL")
                except Exception:  # noqa: BLE001 - a read-only database: the write probe below names it
                    pass
                cur.execute("PRAGMA synchronous = NORMAL")
                cur.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn: Any) -> None:
                # a write transaction takes SQLite's write lock at once: the ask's read-sample-insert is atomic
                conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("rl2fx_write") else "BEGIN")

        try:
            with engine.connect() as conn:
                conn = conn.execution_options(rl2fx_write=True)
                with conn.begin():  # a write transaction from the start: a read upgraded to a write can fail at once
                    self._md.create_all(conn)
                    # a write that changes nothing: read-only databases fail here, not after a trial
                    conn.execute(update(self._studies).where(self._studies.c.id == -1).values(name="probe"))
        except (ModuleNotFoundError, ImportError) as e:
            engine.dispose()
            raise StorageError(f"{where} cannot be opened: its database driver is not installed: {e}") from None
        except SQLAlchemyError as e:
            engine.dispose()
            cause = getattr(e, "orig", None) or e
            raise StorageError(f"{where} cannot be opened for writing: {type(cause).__name__}: {cause}") from None
        return engine

    @staticmethod
    def _shutdown(stop: threading.Event, engine: Any) -> None:
        stop.set()
        engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """One write transaction; the study row is locked (or SQLite's database write lock taken)."""
        from sqlalchemy import select

        with self._local, self.engine.connect() as conn:
            conn = conn.execution_options(rl2fx_write=True)
            with conn.begin():
                if not self._sqlite and self._study_id is not None:
                    conn.execute(select(self._studies.c.id).where(self._studies.c.id == self._study_id)
                                 .with_for_update())
                yield conn

    def _sid(self) -> int:
        if self._study_id is None:
            raise ValueError(f"study {self.study_name!r} does not exist yet in {self.location!r}; "
                             "create it with Study(..., storage=...) first")
        return self._study_id

    # -- the interface ---------------------------------------------------------------------------
    def read_meta(self) -> dict[str, Any] | None:
        from sqlalchemy import select

        with self.engine.connect() as conn:
            row = conn.execute(select(self._studies).where(self._studies.c.name == self.study_name)).first()
        if row is None:
            return None
        self._study_id = int(row.id)
        try:
            meta = json.loads(row.meta)
            if not isinstance(meta, dict):
                raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
        except ValueError as e:
            raise ValueError(f"study {self.study_name!r} in {self.location!r}: its description (rl2fx_studies.meta) "
                             f"is corrupt ({e}); repair it or use another study_name") from None
        return meta

    def init_meta(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        from sqlalchemy import insert
        from sqlalchemy.exc import IntegrityError

        try:
            with self._write() as conn:
                stored = self.read_meta()
                if stored is not None:
                    return stored
                conn.execute(insert(self._studies).values(name=self.study_name, meta=json.dumps(dict(meta)),
                                                          created_at=time.time()))
        except IntegrityError:  # another worker created it between our read and insert
            pass
        stored = self.read_meta()
        assert stored is not None
        return stored

    def _rows(self, conn: Any) -> list[Any]:
        from sqlalchemy import select

        t = self._trials
        return list(conn.execute(select(t).where(t.c.study_id == self._sid()).order_by(t.c.number)).all())

    @staticmethod
    def _state_of(rows: Sequence[Any]) -> StudyState:
        finished = sorted((r for r in rows if r.state in _FINISHED), key=lambda r: (r.finished_at or 0.0, r.number))
        return StudyState(
            finished=tuple(_row_trial(r) for r in finished),
            pending=tuple(_row_trial(r) for r in rows if r.state == "running"),
            next_number=max((int(r.number) for r in rows), default=-1) + 1,
        )

    def load(self) -> StudyState:
        if self._study_id is None and self.read_meta() is None:
            return StudyState()
        with self._local, self.engine.connect() as conn:
            return self._state_of(self._rows(conn))

    def _fail_stale(self, conn: Any, now: float) -> None:
        from sqlalchemy import insert, select, update

        t = self._trials
        cutoff = now - float(self.grace_period or 0.0)
        stale = conn.execute(select(t).where(t.c.study_id == self._sid(), t.c.state == "running",
                                             t.c.heartbeat < cutoff, t.c.worker != self.worker)
                             .order_by(t.c.number)).all()
        if not stale:
            return
        nxt = max((int(r.number) for r in self._rows(conn)), default=-1) + 1
        for r in stale:
            failed = dataclasses.replace(
                _row_trial(r), state="failed", finished_at=now,
                error=f"{_STALE} (worker {r.worker}, last heartbeat {now - r.heartbeat:.1f} s ago, "
                      f"grace_period={self.grace_period} s); retried as trial {nxt}",
            )
            conn.execute(update(t).where(t.c.id == r.id).values(state="failed", finished_at=now,
                                                                 payload=_payload(failed)))
            retry = Trial(number=nxt, params=failed.params, info={**failed.info, "retry_of": failed.number})
            conn.execute(insert(t).values(study_id=self._sid(), number=nxt, state="waiting",
                                          params=_dumps(retry.params), intermediate="{}", payload=_payload(retry)))
            nxt += 1

    def ask(self, propose: Propose, *, reuse_queued: bool = True) -> tuple[StudyState, Trial]:
        from sqlalchemy import insert, update

        t = self._trials
        refused: Exception | None = None
        with self._write() as conn:
            now = time.time()
            if self.heartbeat_interval is not None:
                self._fail_stale(conn, now)
            rows = self._rows(conn)
            state = self._state_of(rows)
            waiting = [r for r in rows if r.state == "waiting"]
            if reuse_queued and waiting:
                w = waiting[0]
                trial = dataclasses.replace(_row_trial(w), state="running", started_at=now)
                conn.execute(update(t).where(t.c.id == w.id).values(state="running", started_at=now, heartbeat=now,
                                                                     worker=self.worker))
            else:
                try:
                    trial = propose(state)
                except Exception as e:  # noqa: BLE001 - e.g. an exhausted grid: the stale trials failed above stay failed
                    refused = e
                else:
                    if trial.number != state.next_number:
                        raise RuntimeError(f"propose returned trial number {trial.number}, expected {state.next_number}")
                    conn.execute(insert(t).values(
                        study_id=self._sid(), number=trial.number, state="running", params=_dumps(trial.params),
                        intermediate="{}", payload=_payload(trial), started_at=trial.started_at, heartbeat=now,
                        worker=self.worker))
        if refused is not None:
            raise refused
        self._start_heartbeat()
        state = dataclasses.replace(state, pending=(*state.pending, trial),
                                    next_number=max(state.next_number, trial.number + 1))
        return state, trial

    def _start_heartbeat(self) -> None:
        if self.heartbeat_interval is None or self._thread is not None:
            return
        self._thread = threading.Thread(
            target=_heartbeat_loop, name=f"rl2fx-heartbeat-{self.worker}", daemon=True,
            args=(self.engine, self._trials, self._sid(), self.worker, self.heartbeat_interval, self._stop,
                  self.location))
        self._thread.start()

    def tell(self, trial: Trial) -> None:
        from sqlalchemy import delete, select, update

        t = self._trials
        with self._write() as conn:
            row = conn.execute(select(t).where(t.c.study_id == self._sid(), t.c.number == trial.number)).first()
            if row is None:
                raise ValueError(f"trial {trial.number} is not a trial of study {self.study_name!r} in {self.location!r}")
            stale = row.state == "failed" and str(json.loads(row.payload).get("error") or "").startswith(_STALE)
            if row.state in _FINISHED and not stale:
                raise ValueError(f"trial {trial.number} is already finished ({row.state}) in {self.location!r}; "
                                 "tell each asked trial exactly once")
            conn.execute(update(t).where(t.c.id == row.id).values(
                state=trial.state, value=_finite(trial.value), payload=_payload(trial),
                intermediate=_dumps(trial.intermediate), finished_at=trial.finished_at))
            if stale:  # this worker was taken for dead, yet finished: keep its result
                retries = [r for r in conn.execute(select(t).where(t.c.study_id == self._sid(),
                                                                   t.c.state.in_(("waiting", "running")))).all()
                           if json.loads(r.payload).get("info", {}).get("retry_of") == trial.number]
                queued = [r for r in retries if r.state == "waiting"]
                for r in queued:
                    conn.execute(delete(t).where(t.c.id == r.id))
                fate = ("its queued retry was removed" if queued else
                        f"its retry (trial {retries[0].number}) is running too" if retries else "")
                warnings.warn(f"trial {trial.number} was failed for a stale heartbeat (its heartbeat thread stalled "
                              f"longer than grace_period={self.grace_period} s) but has now been told: its result is "
                              f"kept{'; ' + fate if fate else ''}", stacklevel=3)

    def report(self, trial: Trial, step: int, value: float) -> None:
        from sqlalchemy import select, update

        t = self._trials
        with self._write() as conn:
            row = conn.execute(select(t.c.id, t.c.intermediate).where(t.c.study_id == self._sid(),
                                                                      t.c.number == trial.number)).first()
            if row is None:
                raise ValueError(f"trial {trial.number} is not a trial of study {self.study_name!r} in {self.location!r}")
            inter = json.loads(row.intermediate)
            inter.setdefault(str(int(step)), float(value))
            conn.execute(update(t).where(t.c.id == row.id).values(intermediate=_dumps(inter)))

    def release(self, trials: Sequence[Trial]) -> None:
        from sqlalchemy import update

        if not trials:
            return
        t = self._trials
        with self._write() as conn:
            for tr in trials:
                conn.execute(update(t).where(t.c.study_id == self._sid(), t.c.number == tr.number,
                                             t.c.state == "running")
                             .values(state="waiting", worker=None, heartbeat=None, started_at=None,
                                     intermediate="{}"))

    def replace(self, finished: Sequence[Trial]) -> None:
        from sqlalchemy import delete, insert

        t = self._trials
        with self._write() as conn:
            busy = {int(r.number) for r in self._rows(conn) if r.state not in _FINISHED}
            clash = sorted(busy & {tr.number for tr in finished})
            if clash:
                raise ValueError(f"cannot replace the trials of {self.location!r}: trial numbers {clash} are "
                                 "running or queued")
            conn.execute(delete(t).where(t.c.study_id == self._sid(), t.c.state.in_(_FINISHED)))
            for tr in finished:
                conn.execute(insert(t).values(
                    study_id=self._sid(), number=tr.number, state=tr.state, params=_dumps(tr.params),
                    value=_finite(tr.value), intermediate=_dumps(tr.intermediate), payload=_payload(tr),
                    started_at=tr.started_at, finished_at=tr.finished_at))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._finalizer()

    def __repr__(self) -> str:
        return f"DatabaseStorage({self.location!r}, study_name={self.study_name!r})"
