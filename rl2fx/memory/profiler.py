"""Memory measurement: a sampling profiler with named regions, and an exact tensor-byte tracker.

Two instruments, for two questions:

* :class:`MemoryProfiler` answers "how did this process use memory over time?". A
  background thread samples, every ``profile_interval`` seconds, the process resident set
  size (RSS), system memory, and on CUDA the caching allocator's allocated / reserved /
  peak bytes per initialised device. ``profile_context(name)`` marks a region and records
  its peak. The timeline is written as JSON, atomically (temporary file + ``os.replace``),
  when the outermost region or :meth:`MemoryProfiler.stop` exits, exceptions included.

* :class:`TensorMemoryTracker` answers "how many bytes of tensors does this step need at
  its worst moment?". It is a ``TorchDispatchMode`` that sees every tensor an operator
  returns, counts each new storage's bytes once, and subtracts them when the storage is
  freed (a weak-reference callback), so ``peak_bytes`` is the high-water mark of live
  tensor memory allocated inside the block: the CPU analogue of
  ``torch.cuda.max_memory_allocated() - memory_allocated_before``. The idea is the one
  behind PyTorch's own ``torch.distributed._tools.mem_tracker.MemTracker``; it is exact
  and repeatable, unlike RSS, which the allocator and the OS round and keep.

Reference: PyTorch docs, "Understanding CUDA Memory Usage" and
``torch.utils._python_dispatch.TorchDispatchMode``.

>>> import torch
>>> with TensorMemoryTracker() as tracker:
...     a = torch.ones(1000)          # 4000 bytes live
...     b = torch.ones(500)           # 6000 bytes live: the peak
...     del a                         # back to 2000
>>> tracker.peak_bytes, tracker.current_bytes
(6000, 2000)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rl2fx._typing import check_range

__all__ = [
    "MemoryBudgetExceeded",
    "MemoryProfiler",
    "TensorMemoryTracker",
    "cuda_in_use",
    "load_timeline",
    "memory_snapshot",
    "timeline_to_dataframe",
]

logger = logging.getLogger("rl2fx.memory")

TIMELINE_VERSION = 1


class MemoryBudgetExceeded(MemoryError):
    """Raised by :class:`TensorMemoryTracker` when live tensor bytes pass ``limit_bytes``.

    It plays the part of ``torch.OutOfMemoryError`` on machines without CUDA, so batch-size
    search and :func:`~rl2fx.memory.optimizer.find_executable_batch_size` can treat both alike.
    """


def cuda_in_use() -> bool:
    """True when a CUDA device is available and this process has initialised it."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class TensorMemoryTracker(TorchDispatchMode):
    """Exact live/peak bytes of the tensors allocated inside a ``with`` block.

    Counting rule: a storage is counted once, with ``storage.nbytes()``, the first time an
    operator returns a tensor that views it, and uncounted when the storage is freed.
    Tensors that existed before the block (weights, inputs) are not counted, so for a
    training step ``peak_bytes`` is the memory the step adds on top of the resident model:
    activations saved for backward, gradients, temporaries.

    ``limit_bytes``: when set, the operator that pushes live bytes above it raises
    :class:`MemoryBudgetExceeded`, as an out-of-memory error would on a GPU. ``exceeded``
    stays True afterwards even if the error was caught and re-wrapped along the way
    (autograd re-raises errors from backward as ``RuntimeError``).

    ``by_device``: peak bytes per device string (``"cpu"``, ``"cuda:0"``).

    >>> import torch
    >>> x = torch.randn(64, 32, requires_grad=True)
    >>> with TensorMemoryTracker() as t:
    ...     y = (x @ x.T).relu().sum()   # 64*64*4 = 16384 bytes per [64, 64] float32 temporary
    >>> t.peak_bytes >= 16384
    True
    >>> try:
    ...     with TensorMemoryTracker(limit_bytes=1000):
    ...         z = torch.zeros(1000)
    ... except MemoryBudgetExceeded as e:
    ...     print("exceeded")
    exceeded
    """

    def __init__(self, limit_bytes: int | None = None) -> None:
        super().__init__()
        if limit_bytes is not None:
            check_range("limit_bytes", limit_bytes, 0, None)
        self.limit_bytes = limit_bytes
        self.current_bytes = 0
        self.peak_bytes = 0
        self.exceeded = False
        self.by_device: dict[str, int] = {}
        self._live_by_device: dict[str, int] = {}
        self._refs: dict[int, tuple[weakref.ref, int, str]] = {}
        # Storages die from weakref callbacks, which can run on autograd's device threads.
        self._lock = threading.Lock()

    def _release(self, key: int, ref: weakref.ref) -> None:
        with self._lock:
            entry = self._refs.get(key)
            if entry is None or entry[0] is not ref:
                return
            del self._refs[key]
            self.current_bytes -= entry[1]
            self._live_by_device[entry[2]] -= entry[1]

    def _track(self, t: torch.Tensor, input_storages: set[int]) -> None:
        st = _storage(t)
        if st is None:
            return
        nbytes = st.nbytes()
        key = id(st)
        dev = str(t.device)
        with self._lock:
            entry = self._refs.get(key)
            tracked = entry is not None and entry[0]() is st
            if not tracked and key in input_storages:
                # A view or in-place result of a tensor that existed before the block
                # (``weight.t()``): no new memory.
                return
            if tracked:
                if entry[1] == nbytes:
                    return
                # Resized in place (out= kernels): account for the difference.
                delta = nbytes - entry[1]
                self._refs[key] = (entry[0], nbytes, dev)
            else:
                ref = weakref.ref(st, lambda r, k=key: self._release(k, r))
                self._refs[key] = (ref, nbytes, dev)
                delta = nbytes
            self.current_bytes += delta
            live = self._live_by_device.get(dev, 0) + delta
            self._live_by_device[dev] = live
            if live > self.by_device.get(dev, 0):
                self.by_device[dev] = live
            if self.current_bytes > self.peak_bytes:
                self.peak_bytes = self.current_bytes
            over = self.limit_bytes is not None and self.current_bytes > self.limit_bytes
        if over:
            self.exceeded = True
            raise MemoryBudgetExceeded(
                f"live tensor memory {self.current_bytes} bytes passed the budget "
                f"limit_bytes={self.limit_bytes}"
            )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = set()
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                st = _storage(leaf)
                if st is not None:
                    inputs.add(id(st))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf, inputs)
        return out


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    if t.device.type == "meta" or t.is_sparse:
        return None
    try:
        return t.untyped_storage()
    except (NotImplementedError, RuntimeError):  # wrapper subclasses hold no plain storage
        return None


def memory_snapshot() -> dict[str, Any]:
    """One sample: wall time, process RSS, system memory, and CUDA allocator stats.

    CUDA figures are read only for devices this process has already initialised, so a
    sample never creates a CUDA context as a side effect.

    >>> s = memory_snapshot()
    >>> s["rss_bytes"] > 0 and 0 <= s["system_percent"] <= 100
    True
    """
    vm = psutil.virtual_memory()
    sample: dict[str, Any] = {
        "time": time.time(),
        "rss_bytes": int(psutil.Process().memory_info().rss),
        "system_total_bytes": int(vm.total),
        "system_available_bytes": int(vm.available),
        "system_used_bytes": int(vm.total - vm.available),
        "system_percent": float(vm.percent),
        "cuda": [],
    }
    if cuda_in_use():
        for i in range(torch.cuda.device_count()):
            sample["cuda"].append(
                {
                    "device": i,
                    "allocated_bytes": int(torch.cuda.memory_allocated(i)),
                    "reserved_bytes": int(torch.cuda.memory_reserved(i)),
                    "max_allocated_bytes": int(torch.cuda.max_memory_allocated(i)),
                    "total_bytes": int(torch.cuda.get_device_properties(i).total_memory),
                }
            )
    return sample


@dataclass
class _Region:
    name: str
    depth: int
    parent: str | None
    start: float
    start_rss_bytes: int
    peak_rss_bytes: int
    track_tensors: bool
    cuda_peak: dict[int, int] = field(default_factory=dict)
    tracker: TensorMemoryTracker | None = None


def _atomic_write_json(path: str, payload: dict[str, Any]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".memory_profile.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see old or new, never half
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class MemoryProfiler:
    """Background memory sampler with named regions and an atomically written JSON timeline.

    Args:
        enabled: when False every method is a cheap no-op (no thread, no file).
        profile_interval: seconds between background samples (> 0).
        save_path: where the JSON timeline goes; ``None`` keeps it in memory only.

    Timeline format (``version`` 1)::

        {"version": 1, "pid": ..., "profile_interval": ..., "start_time": <unix s>,
         "samples": [{"t": <s since start>, "time": <unix s>, "rss_bytes": ..., "system_*": ...,
                      "cuda": [{"device", "allocated_bytes", "reserved_bytes",
                                "max_allocated_bytes", "total_bytes"}], "regions": [names open]}],
         "regions": [{"name", "depth", "parent", "start", "end", "duration_s",
                      "start_rss_bytes", "end_rss_bytes", "peak_rss_bytes",
                      "cuda_peak_allocated_bytes": {device: bytes}, "peak_tensor_bytes"?,
                      "error"?}]}

    A region's ``peak_rss_bytes`` is the largest RSS among the samples taken while it was
    open (one is always taken at entry and at exit); its CUDA peak is exact (the allocator's
    peak counter, reset at each region entry, folded into the enclosing regions first).
    ``profile_context(name, track_tensors=True)`` also records the exact tensor high-water
    mark of the region (:class:`TensorMemoryTracker`), at some cost per operator.

    Regions are meant to be opened from one thread (the training loop); sampling runs in
    its own daemon thread.

    >>> import torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "memory_profile.json")
    >>> profiler = MemoryProfiler(enabled=True, profile_interval=0.05, save_path=path)
    >>> with profiler.profile_context("training"):
    ...     with profiler.profile_context("step", track_tensors=True):
    ...         x = torch.zeros(256, 256)
    >>> [r["name"] for r in load_timeline(path)["regions"]]
    ['step', 'training']
    >>> load_timeline(path)["regions"][0]["peak_tensor_bytes"]
    262144
    """

    def __init__(
        self,
        enabled: bool = True,
        profile_interval: float = 1.0,
        save_path: str | os.PathLike[str] | None = "memory_profile.json",
    ) -> None:
        check_range("profile_interval", profile_interval, 0.0, None, low_inclusive=False)
        self.enabled = bool(enabled)
        self.profile_interval = float(profile_interval)
        self.save_path = None if save_path is None else os.fspath(save_path)
        self._lock = threading.Lock()
        self._samples: list[dict[str, Any]] = []
        self._regions: list[dict[str, Any]] = []
        self._open: list[_Region] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._t0: float | None = None
        self._wall0: float | None = None
        self._users = 0

    @classmethod
    def from_config(cls, section: Any) -> MemoryProfiler:
        """Build from the spec's ``memory_optimization.profiling`` section.

        >>> MemoryProfiler.from_config({"enabled": False, "profile_interval": 0.5}).profile_interval
        0.5
        """
        allowed = {"enabled", "profile_interval", "save_path"}
        unknown = sorted(set(section) - allowed)
        if unknown:
            raise ValueError(f"profiling has unknown keys {unknown}; allowed: {sorted(allowed)}")
        return cls(**{k: section[k] for k in section})

    # ------------------------------------------------------------------ sampling
    def _sample(self) -> dict[str, Any]:
        s = memory_snapshot()
        with self._lock:
            s["t"] = time.perf_counter() - (self._t0 or time.perf_counter())
            s["regions"] = [r.name for r in self._open]
            for r in self._open:
                r.peak_rss_bytes = max(r.peak_rss_bytes, s["rss_bytes"])
            self._samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.profile_interval):
            try:
                self._sample()
            except Exception:  # a failed sample must never kill the training loop
                logger.exception("memory sample failed")

    @property
    def running(self) -> bool:
        """Whether the background sampling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> MemoryProfiler:
        """Start sampling (idempotent; nested starts are counted and need matching stops)."""
        if not self.enabled:
            return self
        self._users += 1
        if self.running:
            return self
        if self._t0 is None:
            self._t0 = time.perf_counter()
            self._wall0 = time.time()
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="rl2fx-memory-profiler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any] | None:
        """Stop sampling (when the last user stops), write the timeline, and return it."""
        if not self.enabled:
            return None
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._sample()
        return self.save()

    def __enter__(self) -> MemoryProfiler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ regions
    @contextlib.contextmanager
    def profile_context(self, name: str, *, track_tensors: bool = False) -> Iterator[MemoryProfiler]:
        """Mark a named region; record its RSS / CUDA (/ tensor) peak; save the timeline on exit.

        The profiler starts on entry if it is not running and stops (writing the JSON) when
        the region that started it exits, normally or by an exception; an exception is
        recorded in the region's ``error`` field and re-raised.
        """
        if not self.enabled:
            yield self
            return
        self.start()
        try:
            region = self._enter_region(name, track_tensors)
            error: BaseException | None = None
            try:
                if region.tracker is not None:
                    with region.tracker:
                        yield self
                else:
                    yield self
            except BaseException as e:
                error = e
                raise
            finally:
                self._exit_region(region, error)
        finally:
            self.stop()

    def _enter_region(self, name: str, track_tensors: bool) -> _Region:
        if cuda_in_use():
            for i in range(torch.cuda.device_count()):
                running_peak = int(torch.cuda.max_memory_allocated(i))
                for r in self._open:
                    r.cuda_peak[i] = max(r.cuda_peak.get(i, 0), running_peak)
                torch.cuda.reset_peak_memory_stats(i)
        rss = self._sample()["rss_bytes"]
        region = _Region(
            name=name,
            depth=len(self._open),
            parent=self._open[-1].name if self._open else None,
            start=time.perf_counter() - (self._t0 or 0.0),
            start_rss_bytes=rss,
            peak_rss_bytes=rss,
            track_tensors=track_tensors,
            tracker=TensorMemoryTracker() if track_tensors else None,
        )
        with self._lock:
            self._open.append(region)
        return region

    def _exit_region(self, region: _Region, error: BaseException | None) -> None:
        end_sample = self._sample()
        if cuda_in_use():
            for i in range(torch.cuda.device_count()):
                running_peak = int(torch.cuda.max_memory_allocated(i))
                for r in self._open:
                    r.cuda_peak[i] = max(r.cuda_peak.get(i, 0), running_peak)
        with self._lock:
            if region in self._open:
                self._open.remove(region)
            record: dict[str, Any] = {
                "name": region.name,
                "depth": region.depth,
                "parent": region.parent,
                "start": region.start,
                "end": end_sample["t"],
                "duration_s": end_sample["t"] - region.start,
                "start_rss_bytes": region.start_rss_bytes,
                "end_rss_bytes": end_sample["rss_bytes"],
                "peak_rss_bytes": region.peak_rss_bytes,
                "cuda_peak_allocated_bytes": {str(k): v for k, v in region.cuda_peak.items()},
            }
            if region.tracker is not None:
                record["peak_tensor_bytes"] = region.tracker.peak_bytes
            if error is not None:
                record["error"] = f"{type(error).__name__}: {error}"
            self._regions.append(record)

    # ------------------------------------------------------------------ output
    def timeline(self) -> dict[str, Any]:
        """The timeline recorded so far, as the dict that :meth:`save` writes."""
        with self._lock:
            return {
                "version": TIMELINE_VERSION,
                "pid": os.getpid(),
                "profile_interval": self.profile_interval,
                "start_time": self._wall0,
                "samples": [dict(s) for s in self._samples],
                "regions": [dict(r) for r in self._regions],
            }

    def save(self, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Write the timeline atomically to ``path`` (default ``save_path``); return it."""
        payload = self.timeline()
        target = self.save_path if path is None else os.fspath(path)
        if target is not None:
            _atomic_write_json(target, payload)
        return payload

    def to_dataframe(self):
        """Samples as a pandas DataFrame (one row per sample, CUDA stats as ``cuda{i}_*`` columns)."""
        return timeline_to_dataframe(self.timeline())

    def regions_dataframe(self):
        """Region marks as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.timeline()["regions"])

    def plot(self, path: str | os.PathLike[str] | None = None, ax=None):
        """Plot RSS (and CUDA allocated) over time with region spans; return the Figure.

        Builds a ``matplotlib.figure.Figure`` on the Agg canvas, so it works headless and does
        not touch pyplot's global state. ``path`` saves it (PNG/SVG/PDF by extension).
        """
        return plot_timeline(self.timeline(), path=path, ax=ax)


def load_timeline(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a timeline written by :class:`MemoryProfiler` and check its version."""
    with open(path) as f:
        payload = json.load(f)
    if payload.get("version") != TIMELINE_VERSION:
        raise ValueError(
            f"timeline version must be {TIMELINE_VERSION}, got {payload.get('version')!r} in {path}"
        )
    return payload


def timeline_to_dataframe(timeline: dict[str, Any]):
    """Flatten a timeline's samples into a pandas DataFrame.

    >>> df = timeline_to_dataframe({"samples": [{"t": 0.0, "rss_bytes": 10, "regions": ["a"],
    ...     "cuda": [{"device": 0, "allocated_bytes": 5}]}]})
    >>> list(df.columns)
    ['t', 'rss_bytes', 'regions', 'cuda0_allocated_bytes']
    """
    import pandas as pd

    rows = []
    for s in timeline["samples"]:
        row = {k: v for k, v in s.items() if k != "cuda"}
        row["regions"] = "/".join(s.get("regions", []))
        for dev in s.get("cuda", []):
            for k, v in dev.items():
                if k != "device":
                    row[f"cuda{dev['device']}_{k}"] = v
        rows.append(row)
    return pd.DataFrame(rows)


def plot_timeline(timeline: dict[str, Any], path: str | os.PathLike[str] | None = None, ax=None):
    """Plot a timeline (see :meth:`MemoryProfiler.plot`); return the Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    df = timeline_to_dataframe(timeline)
    if ax is None:
        fig = Figure(figsize=(8, 3.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = ax.figure
    mib = 2.0**20
    if len(df):
        ax.plot(df["t"], df["rss_bytes"] / mib, label="process RSS")
        for col in df.columns:
            if col.startswith("cuda") and col.endswith("_allocated_bytes") and "max" not in col:
                ax.plot(df["t"], df[col] / mib, label=col.replace("_bytes", ""))
    for i, r in enumerate(timeline["regions"]):
        ax.axvspan(r["start"], r["end"], alpha=0.12, color=f"C{(i % 8) + 2}")
        ax.annotate(r["name"], (r["start"], r["peak_rss_bytes"] / mib), fontsize=7)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("MiB")
    ax.set_title("memory timeline")
    ax.legend(loc="upper left", fontsize=7)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120, bbox_inches="tight")
    return fig
