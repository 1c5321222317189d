"""Schedule shapes as plain functions of the step: cosine, linear, exponential, warmup_cosine.

Each function maps a step ``t >= 0`` to a value going from ``start`` (at
``t = 0``) to ``end`` (at ``t >= steps``, held there afterwards), with
progress :math:`p = \\min(t, T) / T`. They know nothing about KL: the
``schedule`` KL controller (:mod:`rl2fx.control.kl`) uses them from
``initial_coef`` down to ``min_coef``, and they serve learning rates just as
well (``warmup_cosine(step, start=peak_lr, end=0.0, steps=..., warmup_steps=...)``).

=================  ===============================================================  ============================
name               value at progress :math:`p`                                      source
=================  ===============================================================  ============================
``linear``         :math:`s + (e - s)\\,p`                                           linear decay (common)
``cosine``         :math:`e + (s - e)\\,\\tfrac12 (1 + \\cos \\pi p)`                  Loshchilov & Hutter 2017
``exponential``    :math:`s\\,(e / s)^{p}` (geometric; needs ``s, e > 0``)           exponential/step decay
``warmup_cosine``  linear ramp from ``warmup_start`` to ``s`` over ``warmup_steps``,    Goyal et al. 2017 warmup +
                   then ``cosine`` from ``s`` to ``e`` over the remaining steps       Loshchilov & Hutter 2017
=================  ===============================================================  ============================

All are monotone in ``t`` (``warmup_cosine`` on each of its two phases) and stay
inside the closed interval spanned by their end points.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from rl2fx._typing import check_choice
from rl2fx.control._scalars import as_float, as_int

__all__ = ["linear", "cosine", "exponential", "warmup_cosine", "SCHEDULES", "schedule_value"]


def _progress(step: float | int, steps: int) -> float:
    t = as_float("step", step)
    if t < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    steps = as_int("steps", steps, low=1)
    return min(t, steps) / steps


def _ends(start: float, end: float) -> tuple[float, float]:
    return as_float("start", start), as_float("end", end)


def _inside(x: float, a: float, b: float, p: float) -> float:
    # The end points exactly: e + (s - e) * 1 loses s to cancellation when |e| >> |s|
    # (cosine from 1e-6 to 131073 gave 1.0000076e-6 at step 0). Inside, rounding in
    # cos/pow can overshoot an end by one ulp; keep the documented interval exact.
    if p <= 0.0:
        return a
    if p >= 1.0:
        return b
    lo, hi = (a, b) if a <= b else (b, a)
    return min(max(x, lo), hi)


def linear(step: float | int, *, start: float, end: float, steps: int) -> float:
    """Linear interpolation from ``start`` to ``end`` over ``steps``: :math:`s + (e - s)\\,p`.

    >>> linear(0, start=1.0, end=0.0, steps=10), linear(5, start=1.0, end=0.0, steps=10)
    (1.0, 0.5)
    >>> linear(50, start=1.0, end=0.0, steps=10)
    0.0
    """
    p = _progress(step, steps)
    s, e = _ends(start, end)
    return _inside(s + (e - s) * p, s, e, p)


def cosine(step: float | int, *, start: float, end: float, steps: int) -> float:
    """Half-cosine from ``start`` to ``end``: :math:`e + (s - e)\\,\\tfrac12(1 + \\cos \\pi p)`.

    Source: I. Loshchilov, F. Hutter, "SGDR: Stochastic Gradient Descent with
    Warm Restarts", ICLR 2017 (one cycle, no restart).

    >>> cosine(0, start=1.0, end=0.0, steps=10), cosine(5, start=1.0, end=0.0, steps=10)
    (1.0, 0.5)
    >>> cosine(10, start=1.0, end=0.0, steps=10)
    0.0
    """
    p = _progress(step, steps)
    s, e = _ends(start, end)
    return _inside(e + (s - e) * 0.5 * (1.0 + math.cos(math.pi * p)), s, e, p)


def exponential(step: float | int, *, start: float, end: float, steps: int) -> float:
    """Geometric interpolation :math:`s\\,(e/s)^{p}`: a constant factor per step, ``start`` and ``end`` > 0.

    The per-step factor is :math:`(e/s)^{1/T}`, i.e. the classic exponential
    decay :math:`s\\,\\gamma^t` with :math:`\\gamma` chosen to land on ``end`` at ``steps``.

    >>> round(exponential(5, start=1.0, end=0.01, steps=10), 6)
    0.1
    """
    p = _progress(step, steps)
    s, e = _ends(start, end)
    if s <= 0 or e <= 0:
        bad, val = ("start", s) if s <= 0 else ("end", e)
        raise ValueError(f"{bad} must be > 0 for the exponential schedule (geometric interpolation), got {val}")
    return _inside(math.exp(math.log(s) + p * (math.log(e) - math.log(s))), s, e, p)


def warmup_cosine(
    step: float | int,
    *,
    start: float,
    end: float,
    steps: int,
    warmup_steps: int,
    warmup_start: float | None = None,
) -> float:
    """Linear warm-up from ``warmup_start`` (default ``end``) to ``start``, then cosine to ``end``.

    For :math:`t < W`: :math:`w + (s - w)\\,t/W`; afterwards
    ``cosine(t - W, start=s, end=e, steps=T - W)``. Needs ``0 <= warmup_steps < steps``.
    For a learning rate pass ``end=0.0`` (warm-up from 0); for a KL coefficient
    the warm-up starts at ``min_coef`` so the penalty is light while the policy
    is still close to the reference. Sources: P. Goyal et al., "Accurate, Large
    Minibatch SGD", 2017 (warm-up); Loshchilov & Hutter 2017 (cosine).

    >>> [round(warmup_cosine(t, start=1.0, end=0.0, steps=10, warmup_steps=2), 3) for t in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    steps = as_int("steps", steps, low=1)
    warmup_steps = as_int("warmup_steps", warmup_steps, low=0)
    if warmup_steps >= steps:
        raise ValueError(f"warmup_steps must be < steps ({steps}), got {warmup_steps}")
    s, e = _ends(start, end)
    w = e if warmup_start is None else as_float("warmup_start", warmup_start)
    t = as_float("step", step)
    if t < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if t < warmup_steps:
        return _inside(w + (s - w) * (t / warmup_steps), w, s, t / warmup_steps)
    return cosine(t - warmup_steps, start=s, end=e, steps=steps - warmup_steps)


#: name -> schedule function; every function takes ``(step, *, start, end, steps, ...)``.
SCHEDULES: dict[str, Callable[..., float]] = {
    "cosine": cosine,
    "linear": linear,
    "exponential": exponential,
    "warmup_cosine": warmup_cosine,
}


def schedule_value(schedule_type: str, step: float | int, *, start: float, end: float, steps: int,
                   **kwargs: float | int | None) -> float:
    """Evaluate the schedule named ``schedule_type`` (a key of :data:`SCHEDULES`) at ``step``.

    >>> schedule_value("linear", 2, start=1.0, end=0.0, steps=4)
    0.5
    >>> schedule_value("step", 2, start=1.0, end=0.0, steps=4)
    Traceback (most recent call last):
    ...
    ValueError: schedule_type must be one of ['cosine', 'linear', 'exponential', 'warmup_cosine'], got 'step'
    """
    check_choice("schedule_type", schedule_type, SCHEDULES)
    return SCHEDULES[schedule_type](step, start=start, end=end, steps=steps, **kwargs)
