"""A child process that writes MLflow metric batches, so MLflow's ORM work never holds the trainer's GIL.

MLflow's SQLite store spends tens of microseconds of pure-Python time per metric
(SQLAlchemy ORM objects, the latest-metric table); in a background *thread* that time
still competes with the training loop for the interpreter lock. :class:`MetricsProcess`
starts ``python -m rl2fx.tracking.writer_process URI REGISTRY_URI``, which opens its own
:class:`mlflow.MlflowClient` and answers one JSON line per request:

- request ``{"run_id": ..., "records": [{"time_ms", "step", "metrics"}, ...]}``
- reply ``{"applied": n}`` or ``{"applied": n, "error": "Type: message"}``, where the
  first ``n`` records were written (``log_batch`` calls split on record boundaries).

The parent uses it only once the child has said it is ready, and falls back to its own
client for good if the child dies; a batch the child may have half-written is sent
again in-process (MLflow's SQL store skips metrics identical to ones it holds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from rl2fx.tracking.records import MAX_METRICS_PER_BATCH, Record

__all__ = ["ChildError", "ChildFailed", "MetricsProcess", "chunks"]


def chunks(recs: Sequence[Record], limit: int = MAX_METRICS_PER_BATCH) -> list[Sequence[Record]]:
    """Split metric records into runs of at most ``limit`` metrics, on record boundaries.

    A single record above the limit forms a run of its own.

    >>> recs = [{"metrics": {"a": 1.0, "b": 2.0}}] * 3
    >>> [len(c) for c in chunks(recs, limit=4)]
    [2, 1]
    """
    out: list[Sequence[Record]] = []
    start, n = 0, 0
    for i, r in enumerate(recs):
        m = len(r["metrics"])
        if i > start and n + m > limit:
            out.append(recs[start:i])
            start, n = i, 0
        n += m
    if start < len(recs):
        out.append(recs[start:])
    return out


class ChildFailed(Exception):
    """The child process answered with an error, or stopped answering."""


class MetricsProcess:
    """The parent's handle on one writer child process (see the module docstring)."""

    def __init__(self, tracking_uri: str, registry_uri: str, env: Mapping[str, str]) -> None:
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the rl2fx package
        child_env = {**os.environ, **env,
                     "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.ready = threading.Event()
        self.dead = False
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "rl2fx.tracking.writer_process", tracking_uri, registry_uri],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=child_env, text=True, bufsize=1,
        )
        threading.Thread(target=self._await_ready, name="rl2fx-tracking-child-ready", daemon=True).start()

    def _await_ready(self) -> None:
        try:
            line = self._proc.stdout.readline() if self._proc.stdout else ""
            if json.loads(line or "{}").get("ready"):
                self.ready.set()
                return
        except (OSError, ValueError):
            pass
        self.dead = True

    @property
    def usable(self) -> bool:
        """Ready and not known to have died."""
        return self.ready.is_set() and not self.dead and self._proc.poll() is None

    def log(self, run_id: str, recs: Sequence[Record]) -> int:
        """Have the child write ``recs``; return how many it wrote; raise :class:`ChildFailed` on an error."""
        msg = {"run_id": run_id, "records": [
            {"time_ms": r["time_ms"], "step": r["step"], "metrics": r["metrics"]} for r in recs]}
        try:
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.write(json.dumps(msg, allow_nan=True) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except (OSError, ValueError) as e:
            self.dead = True
            raise ChildFailed(f"writer process gone ({type(e).__name__}: {e})") from e
        if not line:
            self.dead = True
            raise ChildFailed("writer process gone (no reply)")
        reply = json.loads(line)
        if "error" in reply:
            raise ChildError(int(reply["applied"]), reply["error"])
        return int(reply["applied"])

    def close(self) -> None:
        """Let the child exit; nothing of ours is in flight (every request was answered).

        A child still starting is killed; a ready one sees end-of-input and exits by
        itself, without the caller waiting for its interpreter to shut down.
        """
        try:
            if not self.ready.is_set():
                self._proc.kill()
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
        except OSError:
            self._proc.kill()
        self.dead = True


class ChildError(ChildFailed):
    """The child wrote ``applied`` records, then MLflow raised ``error`` (the child is fine)."""

    def __init__(self, applied: int, error: str) -> None:
        super().__init__(error)
        self.applied = applied


def _serve() -> None:
    # Replies go to the original stdout; anything a library prints goes to stderr instead,
    # so it cannot corrupt the protocol.
    replies = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    uri, registry = sys.argv[1], sys.argv[2]
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri, registry)
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        done = 0
        try:
            for run in chunks(msg["records"]):
                items = [Metric(k, v, r["time_ms"], r["step"]) for r in run for k, v in r["metrics"].items()]
                for i in range(0, len(items), MAX_METRICS_PER_BATCH):
                    client.log_batch(msg["run_id"], metrics=items[i : i + MAX_METRICS_PER_BATCH])
                done += len(run)
            replies.write(json.dumps({"applied": done}) + "\n")
        except Exception as e:
            replies.write(json.dumps({"applied": done, "error": f"{type(e).__name__}: {e}"}) + "\n")


if __name__ == "__main__":
    _serve()
