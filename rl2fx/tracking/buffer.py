"""The outage buffer: tracking records a backend refused, as fsync'd JSON lines, and their replay.

One file per tracker (``<buffer_dir>/<tracker id>.jsonl``), one record per line, each
with its ``backend`` name. :meth:`OutageBuffer.append` writes, flushes and fsyncs, so
what was appended survives the process dying right after; :meth:`OutageBuffer.rewrite`
replaces the file atomically (write a temporary file, fsync, rename), so a crash in
the middle of a replay loses nothing. :func:`replay_records` applies records in their
order, per backend, in batches (``Backend.apply_many``): a backend that fails keeps that
record and all its later ones. The tracker replays its own buffer with these; from any
other process, :func:`replay_buffer` pushes a file, or every file in a directory, to MLflow.

>>> import tempfile, pathlib
>>> buf = OutageBuffer(pathlib.Path(tempfile.mkdtemp()) / "run.jsonl")
>>> buf.append([{"backend": "mlflow", "op": "metrics", "metrics": {"x": 1.0}, "step": 0}])
>>> [r["op"] for r in buf.read()]
['metrics']
>>> buf.rewrite([]); buf.path.exists()
False
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rl2fx.tracking.backends import Backend, BatchFailed, MlflowBackend
from rl2fx.tracking.config import ExperimentConfig
from rl2fx.tracking.records import Record

__all__ = ["OutageBuffer", "ReplayResult", "read_buffer", "replay_buffer", "replay_records"]

log = logging.getLogger(__name__)


def _line(rec: Record) -> str:
    return json.dumps(rec, allow_nan=True) + "\n"


class OutageBuffer:
    """A JSON-lines file of records, appended durably and rewritten atomically."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, records: Iterable[Record]) -> None:
        """Append records (one fsync for the whole call); nothing to do for none."""
        text = "".join(_line(r) for r in records)
        if not text:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[Record]:
        """The records in the file, oldest first (none if there is no file)."""
        return read_buffer(self.path)

    def rewrite(self, records: Sequence[Record]) -> None:
        """Replace the file's contents with ``records``; remove the file when there are none."""
        if not records:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write("".join(_line(r) for r in records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def read_buffer(path: str | os.PathLike[str]) -> list[Record]:
    """The records in a tracker's JSON-lines buffer file, oldest first.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "b.jsonl"
    >>> _ = p.write_text('{"backend": "mlflow", "op": "metrics"}\\n')
    >>> read_buffer(p)
    [{'backend': 'mlflow', 'op': 'metrics'}]
    """
    p = Path(path)
    if not p.exists():
        return []
    with p.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class ReplayResult:
    """What :func:`replay_records` did: records applied, records kept, backends that failed."""

    applied: int = 0
    keep: list[Record] = field(default_factory=list)
    failed: dict[str, BaseException] = field(default_factory=dict)


def replay_records(records: Sequence[Record], backend_for: Callable[[Record], Backend | None]) -> ReplayResult:
    """Apply ``records`` in order, in batches per backend; keep what could not be applied.

    Consecutive records of one backend go to one ``apply_many`` call. Records whose
    backend is ``None`` (not configured here) are kept. When a backend fails, the
    record it failed on and every later record for it are kept, in order, and
    :attr:`ReplayResult.failed` holds the error; other backends carry on.
    """
    out = ReplayResult()
    i = 0
    while i < len(records):
        name = records[i]["backend"]
        j = i
        while j < len(records) and records[j]["backend"] == name:
            j += 1
        run = records[i:j]
        i = j
        backend = backend_for(run[0])
        if backend is None or name in out.failed:
            out.keep.extend(run)
            continue
        try:
            backend.apply_many(run)
            out.applied += len(run)
        except BatchFailed as e:
            out.applied += e.applied
            out.keep.extend(run[e.applied:])
            out.failed[name] = e.cause
    # kept records of one backend stay in order; across backends order does not matter
    return out


def replay_buffer(path: str | os.PathLike[str], *, tracking_uri: str | None = None) -> int:
    """Push the MLflow records of buffers left behind by other processes; return how many.

    ``path`` is one buffer file or a directory (a tracker's ``buffer_dir``), whose
    ``*.jsonl`` files are replayed one after the other. For a process that ended (or
    crashed) while its MLflow store was unreachable: records go to the run they were
    meant for (or to a new run, if the run start itself was buffered), on the URI they
    were meant for unless ``tracking_uri`` redirects them, in batches. Applied records
    are removed from the file (the file too, once empty); W&B records stay (sync W&B
    offline runs with ``wandb sync`` instead). A file stops at the first record MLflow
    still refuses.

    >>> import tempfile, pathlib
    >>> replay_buffer(pathlib.Path(tempfile.mkdtemp()) / "none.jsonl")
    0
    """
    p = Path(path)
    if p.is_dir():
        return sum(replay_buffer(f, tracking_uri=tracking_uri) for f in sorted(p.glob("*.jsonl")))
    buf = OutageBuffer(p)
    records = buf.read()
    if not records:
        return 0
    backends: dict[str, MlflowBackend] = {}

    def backend_for(rec: Record) -> Backend | None:
        if rec["backend"] != "mlflow":
            return None
        uri = tracking_uri or rec["tracking_uri"]
        if uri not in backends:
            cfg = ExperimentConfig(experiment_name=rec["experiment"], tracking_uri=uri,
                                   enable_wandb=False, log_system_metrics=False)
            backends[uri] = MlflowBackend(cfg)
        return backends[uri]

    result = replay_records(records, backend_for)
    for name, err in result.failed.items():
        log.warning("rl2fx tracking: replay_buffer stopped at a %s record of %s: %s", name, p, err)
    buf.rewrite(result.keep)
    return result.applied
