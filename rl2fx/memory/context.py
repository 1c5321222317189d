"""``memory_efficient_context``: garbage collection on pressure, allocator cap and offload, undone on exit.

Inside the block:

* memory usage is checked on entry, every ``poll_interval`` seconds by a watchdog thread,
  on every :meth:`MemoryGuard.maybe_collect` call and on exit; whenever it is above the
  optimizer's ``gc_threshold``, ``gc.collect()`` runs and, on CUDA,
  ``torch.cuda.empty_cache()`` returns cached blocks to the driver. Usage is
  ``reserved / total`` on CUDA (what the caching allocator holds; what ``empty_cache`` can
  give back), and the system's used share of RAM on CPU (psutil);
* on CUDA the caching allocator is capped at ``memory_threshold`` of the device
  (``torch.cuda.set_per_process_memory_fraction``), so a run that would exceed it fails
  fast with an OOM that batch-size search can catch instead of starving other processes;
* with ``enable_cpu_offload`` on CUDA, tensors saved for backward go to pinned host memory
  (``torch.autograd.graph.save_on_cpu``).

On exit the previous allocator fraction is restored, the saved-tensor hooks popped and the
watchdog stopped, also when the block raises. On a CPU-only machine the allocator cap and
offload do not apply; the reason is logged once.

>>> from rl2fx.memory.optimizer import MemoryOptimizer
>>> with memory_efficient_context(MemoryOptimizer(gc_threshold=1.0)) as guard:
...     _ = guard.maybe_collect()
>>> guard.checks >= 3 and guard.collections == 0
True
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil
import torch

from rl2fx._typing import check_range
from rl2fx.memory.optimizer import MemoryOptimizer, offload_activations

__all__ = ["MemoryGuard", "memory_efficient_context", "memory_usage_fraction"]

logger = logging.getLogger("rl2fx.memory")


def memory_usage_fraction(device: torch.device | str | None = None) -> float:
    """Used share of memory on ``device``: CUDA ``reserved / total``, else system RAM used share.

    >>> 0.0 <= memory_usage_fraction("cpu") <= 1.0
    True
    """
    dev = torch.device(device) if device is not None else _default_device()
    if dev.type == "cuda":
        total = torch.cuda.get_device_properties(dev).total_memory
        return torch.cuda.memory_reserved(dev) / total
    return psutil.virtual_memory().percent / 100.0


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class MemoryGuard:
    """What :func:`memory_efficient_context` yields: counters and an explicit check."""

    device: torch.device
    gc_threshold: float
    checks: int = 0
    collections: int = 0
    last_usage: float = 0.0
    changes: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def usage(self) -> float:
        """Current used share of memory on the guarded device."""
        return memory_usage_fraction(self.device)

    def maybe_collect(self) -> bool:
        """Collect garbage (and empty the CUDA cache) if usage is above ``gc_threshold``."""
        usage = self.usage()
        with self._lock:
            self.checks += 1
            self.last_usage = usage
        if usage <= self.gc_threshold:
            return False
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        with self._lock:
            self.collections += 1
        logger.info("memory usage %.1f%% above gc_threshold %.1f%%: collected garbage",
                    100 * usage, 100 * self.gc_threshold)
        return True


@contextlib.contextmanager
def memory_efficient_context(
    optimizer: MemoryOptimizer | None = None,
    *,
    device: torch.device | str | None = None,
    poll_interval: float | None = 1.0,
) -> Iterator[MemoryGuard]:
    """Run a block with garbage collection on memory pressure; restore everything on exit.

    Args:
        optimizer: supplies ``gc_threshold``, ``memory_threshold`` and ``enable_cpu_offload``
            (default: ``MemoryOptimizer()``).
        device: the device to watch (default: the current CUDA device, else CPU).
        poll_interval: seconds between watchdog checks; ``None`` disables the watchdog
            (checks then happen on entry, exit and :meth:`MemoryGuard.maybe_collect`).
    """
    optimizer = optimizer if optimizer is not None else MemoryOptimizer()
    if poll_interval is not None:
        check_range("poll_interval", poll_interval, 0.0, None, low_inclusive=False)
    cfg = optimizer.config
    dev = torch.device(device) if device is not None else _default_device()
    guard = MemoryGuard(device=dev, gc_threshold=cfg.gc_threshold)
    stop = threading.Event()
    watchdog: threading.Thread | None = None

    with contextlib.ExitStack() as stack:
        if dev.type == "cuda":
            getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
            previous = getter(dev) if getter is not None else 1.0
            torch.cuda.set_per_process_memory_fraction(cfg.memory_threshold, dev)
            stack.callback(torch.cuda.set_per_process_memory_fraction, previous, dev)
            guard.changes.append(f"allocator fraction {previous} -> {cfg.memory_threshold}")
            if cfg.enable_cpu_offload:
                stack.enter_context(offload_activations(dev))
                guard.changes.append("saved activations offloaded to pinned host memory")
        elif cfg.enable_cpu_offload:
            optimizer._note("cpu offload skipped in memory_efficient_context: no CUDA device in "
                            "use, tensors already live in host memory")

        guard.maybe_collect()
        if poll_interval is not None:
            def watch() -> None:
                while not stop.wait(poll_interval):
                    try:
                        guard.maybe_collect()
                    except Exception:  # the watchdog must never take the training loop down
                        logger.exception("memory watchdog check failed")

            watchdog = threading.Thread(target=watch, name="rl2fx-memory-watchdog", daemon=True)
            watchdog.start()

            def stop_watchdog() -> None:
                stop.set()
                watchdog.join()

            stack.callback(stop_watchdog)
        try:
            yield guard
        finally:
            # Stop the watchdog before the exit check so the two never run together.
            stack.close()
            guard.maybe_collect()
