"""Adaptive batch sizing from memory use, throughput and the success of recent steps.

``batch_size_update(state, memory_usage, training_time, success)`` looks at the
step that just ran with ``state.batch_size`` samples and picks the size of the
next one. ``memory_usage`` is the peak memory of that step as a **fraction in
[0, 1] of the device budget** (e.g. ``torch.cuda.max_memory_allocated() /
torch.cuda.get_device_properties(0).total_memory``, or of whatever budget the
caller allots); ``training_time`` its wall time in seconds; ``success`` whether
it completed (``False`` after an out-of-memory error or another failure).
With :math:`b` the current size, :math:`a` = ``adaptation_factor``, the first
rule that applies wins:

1. **failure** (``success`` is False, e.g. OOM): shrink at once,
   :math:`b \\leftarrow \\min(b - 1, \\lfloor b \\cdot\\ ` ``failure_factor`` :math:`\\rfloor)`.
2. **memory high** (``memory_usage > high_memory``, default 0.9): shrink,
   :math:`b \\leftarrow \\min(b - 1, \\lfloor b (1 - a) \\rfloor)`.
3. **success rate low**: fewer than ``min_success_rate`` (0.9) of the last
   ``window`` (10) steps succeeded: hold (no growth right after failures, so the
   size does not oscillate between OOM and halving).
4. **memory low** (``memory_usage < low_memory``, default 0.7): grow,
   :math:`b \\leftarrow \\max(b + 1, \\lceil b (1 + a) \\rceil)`, unless the last change was a
   growth and throughput (samples/s :math:`= b / \\text{training\\_time}`) fell by more
   than ``throughput_tolerance`` (5%) compared with the size before it: then hold,
   since bigger batches no longer pay.
5. otherwise hold.

The result is always within ``[min_batch_size, max_batch_size]``. The rules
follow the spec's three features (memory-based adaptation, performance-based
adaptation, success-rate monitoring); the multiplicative grow / halve-on-failure
shape is the usual additive-or-multiplicative-increase, multiplicative-decrease
scheme (as in TCP congestion control, and in batch-size finders such as
PyTorch Lightning's ``BatchSizeFinder``, which doubles until OOM).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rl2fx.control._scalars import as_float, as_int

__all__ = ["BatchSizeState", "batch_size_init", "batch_size_update", "AdaptiveBatchSizer"]


@dataclass(frozen=True)
class BatchSizeState:
    """Current batch size, settings, and the memory of recent steps (immutable).

    ``outcomes`` holds the success flags of the last ``window`` steps;
    ``throughput`` the samples/s of the last step, ``prev_throughput`` the last
    samples/s measured at the size before the most recent change;
    ``last_change`` is ``"grow"``, ``"shrink"`` or ``None``; ``last_action`` names
    the rule applied by the last update (for logs).

    >>> batch_size_init().batch_size
    8
    """

    batch_size: int
    min_batch_size: int
    max_batch_size: int
    adaptation_factor: float
    high_memory: float = 0.9
    low_memory: float = 0.7
    failure_factor: float = 0.5
    window: int = 10
    min_success_rate: float = 0.9
    throughput_tolerance: float = 0.05
    outcomes: tuple[bool, ...] = ()
    throughput: float | None = None
    prev_throughput: float | None = None
    last_change: str | None = None
    last_action: str = "init"
    count: int = 0


def _frac(name: str, value: Any, *, low_open: bool = False, high_open: bool = False) -> float:
    v = as_float(name, value)
    lo_ok = v > 0 if low_open else v >= 0
    hi_ok = v < 1 if high_open else v <= 1
    if not (lo_ok and hi_ok):
        raise ValueError(f"{name} must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, got {value}")
    return v


def batch_size_init(
    initial_batch_size: int = 8,
    min_batch_size: int = 1,
    max_batch_size: int = 64,
    adaptation_factor: float = 0.1,
    *,
    high_memory: float = 0.9,
    low_memory: float = 0.7,
    failure_factor: float = 0.5,
    window: int = 10,
    min_success_rate: float = 0.9,
    throughput_tolerance: float = 0.05,
) -> BatchSizeState:
    """Create the sizer state; every setting is checked and a bad one raises ``ValueError`` naming it.

    >>> batch_size_init(initial_batch_size=100)
    Traceback (most recent call last):
    ...
    ValueError: initial_batch_size must be in [min_batch_size, max_batch_size] = [1, 64], got 100
    """
    lo = as_int("min_batch_size", min_batch_size, low=1)
    hi = as_int("max_batch_size", max_batch_size, low=1)
    if lo > hi:
        raise ValueError(f"min_batch_size ({lo}) must be <= max_batch_size ({hi})")
    b = as_int("initial_batch_size", initial_batch_size)
    if not lo <= b <= hi:
        raise ValueError(f"initial_batch_size must be in [min_batch_size, max_batch_size] = [{lo}, {hi}], got {b}")
    a = _frac("adaptation_factor", adaptation_factor, low_open=True, high_open=True)
    hm = _frac("high_memory", high_memory, low_open=True)
    lm = _frac("low_memory", low_memory)
    if lm >= hm:
        raise ValueError(f"low_memory ({lm}) must be < high_memory ({hm})")
    ff = _frac("failure_factor", failure_factor, high_open=True)
    w = as_int("window", window, low=1)
    msr = _frac("min_success_rate", min_success_rate)
    tol = _frac("throughput_tolerance", throughput_tolerance, high_open=True)
    return BatchSizeState(batch_size=b, min_batch_size=lo, max_batch_size=hi, adaptation_factor=a,
                          high_memory=hm, low_memory=lm, failure_factor=ff, window=w,
                          min_success_rate=msr, throughput_tolerance=tol)


def batch_size_update(state: BatchSizeState, memory_usage: Any, training_time: Any, success: Any) -> BatchSizeState:
    """Pick the next batch size from the step just run (rules in the module docstring); pure.

    >>> s = batch_size_init()                                   # b = 8
    >>> s = batch_size_update(s, 0.3, 1.0, True); s.batch_size, s.last_action
    (9, 'grow')
    >>> s = batch_size_update(s, 0.95, 1.0, True); s.batch_size, s.last_action
    (8, 'shrink_memory')
    >>> s = batch_size_update(s, 0.5, 1.0, False); s.batch_size, s.last_action
    (4, 'shrink_failure')
    >>> batch_size_update(s, 1.5, 1.0, True)
    Traceback (most recent call last):
    ...
    ValueError: memory_usage must be in [0, 1] (a fraction of the device memory budget), got 1.5
    """
    mem = as_float("memory_usage", memory_usage)
    if not 0 <= mem <= 1:
        raise ValueError(f"memory_usage must be in [0, 1] (a fraction of the device memory budget), got {memory_usage}")
    t = as_float("training_time", training_time)
    if t <= 0:
        raise ValueError(f"training_time must be > 0 seconds, got {training_time}")
    if not isinstance(success, bool | np.bool_):
        raise ValueError(f"success must be a bool, got {success!r}")
    success = bool(success)

    b = state.batch_size
    outcomes = (state.outcomes + (success,))[-state.window:]
    throughput = b / t

    def shrink(target: int) -> int:
        return max(state.min_batch_size, min(b - 1, target))

    def grow() -> int:
        return min(state.max_batch_size, max(b + 1, math.ceil(b * (1 + state.adaptation_factor))))

    if not success:
        new, action = shrink(math.floor(b * state.failure_factor)), "shrink_failure"
        throughput = None  # a failed step's time says nothing about this size's speed
    elif mem > state.high_memory:
        new, action = shrink(math.floor(b * (1 - state.adaptation_factor))), "shrink_memory"
    elif sum(outcomes) < state.min_success_rate * len(outcomes):
        new, action = b, "hold_success_rate"
    elif mem < state.low_memory:
        fell = (state.last_change == "grow" and state.prev_throughput is not None
                and throughput < (1 - state.throughput_tolerance) * state.prev_throughput)
        new, action = (b, "hold_throughput") if fell else (grow(), "grow")
    else:
        new, action = b, "hold"

    if new != b:
        prev_tp = None if not success else throughput
        change: str | None = "grow" if new > b else "shrink"
        throughput_next = None
    else:
        prev_tp, change, throughput_next = state.prev_throughput, state.last_change, throughput
    if action == "grow" and new == b:  # already at max_batch_size
        action = "hold_max"
    return dataclasses.replace(state, batch_size=new, outcomes=outcomes, throughput=throughput_next,
                               prev_throughput=prev_tp, last_change=change, last_action=action,
                               count=state.count + 1)


class AdaptiveBatchSizer:
    """The spec's adaptive batch sizer: one :class:`BatchSizeState` updated by :func:`batch_size_update`.

    ``memory_usage`` is a fraction in [0, 1] of the device memory budget.
    ``history`` lists one dict per update (inputs, new size, rule applied).

    >>> sizer = AdaptiveBatchSizer(initial_batch_size=8, min_batch_size=1, max_batch_size=64, adaptation_factor=0.1)
    >>> sizer.update_batch_size(0.4, 2.0, True), sizer.update_batch_size(0.4, 2.0, True)
    (9, 10)
    >>> sizer.update_batch_size(0.99, 2.0, False)    # OOM: halve at once
    5
    """

    def __init__(
        self,
        initial_batch_size: int = 8,
        min_batch_size: int = 1,
        max_batch_size: int = 64,
        adaptation_factor: float = 0.1,
        **settings: Any,
    ) -> None:
        self.state: BatchSizeState = batch_size_init(initial_batch_size, min_batch_size, max_batch_size,
                                                     adaptation_factor, **settings)
        self.history: list[dict[str, Any]] = []

    @property
    def batch_size(self) -> int:
        """The batch size to use for the next step."""
        return self.state.batch_size

    def update_batch_size(self, memory_usage: Any, training_time: Any, success: Any) -> int:
        """Observe the step just run and return the next batch size."""
        old = self.state.batch_size
        self.state = batch_size_update(self.state, memory_usage, training_time, success)
        self.history.append({"batch_size": old, "memory_usage": float(memory_usage),
                             "training_time": float(training_time), "success": bool(success),
                             "new_batch_size": self.state.batch_size, "action": self.state.last_action})
        return self.state.batch_size

    def state_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self.state)
        d["outcomes"] = list(self.state.outcomes)
        return {"state": d, "history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "state" not in state_dict:
            raise ValueError(f"state_dict must have a 'state' entry, got keys {sorted(state_dict)}")
        d = dict(state_dict["state"])
        fields = {f.name for f in dataclasses.fields(BatchSizeState)}
        if set(d) != fields:
            raise ValueError(f"state_dict['state'] keys must be {sorted(fields)}, got {sorted(d)}")
        fresh = batch_size_init(d["batch_size"], d["min_batch_size"], d["max_batch_size"], d["adaptation_factor"],
                                high_memory=d["high_memory"], low_memory=d["low_memory"],
                                failure_factor=d["failure_factor"], window=d["window"],
                                min_success_rate=d["min_success_rate"],
                                throughput_tolerance=d["throughput_tolerance"])
        outcomes = tuple(bool(o) for o in d["outcomes"])[-fresh.window:]
        if d["last_change"] not in (None, "grow", "shrink"):
            raise ValueError(f"last_change must be None, 'grow' or 'shrink', got {d['last_change']!r}")
        opt = {k: (None if d[k] is None else as_float(k, d[k])) for k in ("throughput", "prev_throughput")}
        self.state = dataclasses.replace(fresh, outcomes=outcomes, last_change=d["last_change"],
                                         last_action=str(d["last_action"]), count=as_int("count", d["count"], low=0),
                                         **opt)
        self.history = [dict(h) for h in state_dict.get("history", [])]

    def __repr__(self) -> str:
        return f"AdaptiveBatchSizer(batch_size={self.batch_size}, last_action={self.state.last_action!r})"
