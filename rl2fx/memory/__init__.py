"""rl2fx.memory: checkpointing, CPU offload, mixed precision, memory profiling, batch-size search.

The spec's names (``MemoryOptimizer``, ``MemoryProfiler``, ``memory_efficient_context``,
``AdaptiveBatchSizer``) load lazily; ``AdaptiveBatchSizer`` lives in
:mod:`rl2fx.control.batch_size` and is re-exported here because the spec imports it from
its memory module.

>>> from rl2fx.memory import MemoryOptimizer, MemoryProfiler, memory_efficient_context
>>> MemoryOptimizer().memory_threshold
0.8
"""

from __future__ import annotations

from rl2fx._lazy import lazy_exports

_LAZY: dict[str, str] = {
    "MemoryOptimizer": "rl2fx.memory.optimizer",
    "MemoryConfig": "rl2fx.memory.optimizer",
    "enable_checkpointing": "rl2fx.memory.optimizer",
    "disable_checkpointing": "rl2fx.memory.optimizer",
    "find_executable_batch_size": "rl2fx.memory.optimizer",
    "offload_optimizer_state": "rl2fx.memory.optimizer",
    "MemoryProfiler": "rl2fx.memory.profiler",
    "TensorMemoryTracker": "rl2fx.memory.profiler",
    "MemoryBudgetExceeded": "rl2fx.memory.profiler",
    "load_timeline": "rl2fx.memory.profiler",
    "timeline_to_dataframe": "rl2fx.memory.profiler",
    "memory_efficient_context": "rl2fx.memory.context",
    "AdaptiveBatchSizer": "rl2fx.control.batch_size",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports('rl2fx.memory', _LAZY, globals())
