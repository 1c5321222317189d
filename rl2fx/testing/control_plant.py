"""A closed-loop KL "plant": how the measured KL of a policy responds to the KL-penalty coefficient.

Used by the control tests, ``benchmarks/control.py`` and the notebooks to
compare KL controllers on the same footing, without training a model.

Model (one step = one PPO update). A KL penalty :math:`\\beta` on a policy
pushed by reward pressure :math:`p` settles where the marginal reward gain
equals the marginal penalty; for a locally quadratic KL and linear reward this
gives an equilibrium KL falling as a power of :math:`\\beta`:

.. math::

    \\mathrm{KL}^*(\\beta) = \\mathrm{KL}_{ref}\\,(\\beta_{ref} / \\beta)^{\\epsilon}

(:math:`\\epsilon` = ``elasticity``). The policy moves toward it with a
first-order lag (``response_rate`` :math:`\\alpha`: a few PPO epochs per
update), starting from the reference policy (KL 0):

.. math::

    \\mathrm{KL}_{t+1} = (1 - \\alpha)\\,\\mathrm{KL}_t + \\alpha\\,\\mathrm{KL}^*(\\beta_t)

and the controller sees it through unbiased log-normal noise (``noise`` =
:math:`\\sigma`, the batch-to-batch scatter of a mean-KL estimate):
:math:`\\widehat{\\mathrm{KL}}_t = \\mathrm{KL}_t \\exp(\\sigma \\xi_t - \\sigma^2/2)`,
:math:`\\xi_t \\sim N(0, 1)`. An optional step disturbance multiplies the reward
pressure :math:`\\mathrm{KL}_{ref}` by ``disturbance_gain`` from
``disturbance_step`` on (e.g. the policy reaching a region where the reward
pulls harder).

With the defaults (``KL_ref`` 0.03 at ``β_ref`` 0.2) a target of 0.01 needs
:math:`\\beta^* = 0.6`, three times the spec's initial 0.2, so every
controller has to move.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from rl2fx.control.kl import kl_init, kl_update

__all__ = ["KLPlant", "TRLAdaptiveKLController", "closed_loop", "simulate", "settling_step", "tracking_metrics"]


@dataclass(frozen=True)
class KLPlant:
    """Parameters of the simulated KL response (see the module docstring).

    >>> round(KLPlant().equilibrium_kl(0.6), 6)
    0.01
    """

    kl_ref: float = 0.03
    coef_ref: float = 0.2
    elasticity: float = 1.0
    response_rate: float = 0.3
    noise: float = 0.2
    disturbance_step: int | None = None
    disturbance_gain: float = 2.0

    def equilibrium_kl(self, coef: float, step: int = 0) -> float:
        """:math:`\\mathrm{KL}^*(\\beta)` at ``step`` (after the disturbance when there is one)."""
        gain = self.disturbance_gain if self.disturbance_step is not None and step >= self.disturbance_step else 1.0
        return gain * self.kl_ref * (self.coef_ref / coef) ** self.elasticity

    def coef_for(self, kl: float, step: int = 0) -> float:
        """The coefficient that holds the KL at ``kl`` in equilibrium (the ideal answer)."""
        gain = self.disturbance_gain if self.disturbance_step is not None and step >= self.disturbance_step else 1.0
        return self.coef_ref * (gain * self.kl_ref / kl) ** (1.0 / self.elasticity)


def simulate(
    controller_type: str,
    *,
    plant: KLPlant | None = None,
    steps: int = 1000,
    seed: int = 0,
    **params: Any,
) -> dict[str, np.ndarray]:
    """Run ``controller_type`` (with ``params`` for :func:`~rl2fx.control.kl.kl_init`) in closed loop.

    Returns arrays of length ``steps``: ``kl`` (true plant KL during the step),
    ``observed`` (what the controller saw), ``coef`` (the coefficient used
    during the step).

    >>> out = simulate("exponential", steps=300, seed=0)
    >>> bool(0.75 < out["kl"][-100:].mean() / 0.01 < 1.25)
    True
    """
    state = kl_init(controller_type, **params)

    def observe(observed: float, t: int) -> None:
        nonlocal state
        state = kl_update(state, observed, t)

    return closed_loop(lambda: float(state.coef), observe, plant=plant, steps=steps, seed=seed)


def closed_loop(
    coef: Callable[[], float],
    observe: Callable[[float, int], None],
    *,
    plant: KLPlant | None = None,
    steps: int = 1000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Drive any controller through the plant: read ``coef()``, step the plant, call ``observe(kl, t)``.

    The KL relaxes toward :meth:`KLPlant.equilibrium_kl` at ``response_rate`` and is
    observed with mean-one log-normal noise; :func:`simulate` is this loop around an
    rl2fx controller state, the control benchmark runs TRL's controller through it.

    >>> out = closed_loop(lambda: 0.2, lambda kl, t: None, steps=50)
    >>> out["coef"].max(), out["kl"].shape
    (np.float64(0.2), (50,))
    """
    plant = plant or KLPlant()
    rng = np.random.default_rng(seed)
    kl = 0.0
    out = {k: np.empty(steps) for k in ("kl", "observed", "coef")}
    sigma = plant.noise
    for t in range(steps):
        c = coef()
        kl = (1 - plant.response_rate) * kl + plant.response_rate * plant.equilibrium_kl(c, t)
        observed = kl * math.exp(sigma * rng.standard_normal() - 0.5 * sigma * sigma)
        out["kl"][t], out["observed"][t], out["coef"][t] = kl, observed, c
        observe(observed, t)
    return out


def settling_step(kl: np.ndarray, target: float, *, tol: float = 0.25, window: int = 20, start: int = 0) -> int | None:
    """First step ``t >= start`` from which on the mean of ``kl`` over every ``window``-step
    stretch stays within ``tol`` (relative) of ``target`` until the end of the run; ``None`` if never.

    The returned count is relative to ``start`` (steps needed to settle). Averaging
    over a window is what "on average" means for a noisy, lagged loop: a single
    noisy step outside the band does not un-settle a controller.

    >>> settling_step(np.r_[np.zeros(30), np.full(70, 0.01)], 0.01, window=10)
    28
    """
    x = np.asarray(kl, dtype=float)[start:]
    if len(x) < window:
        return None
    ma = np.convolve(x, np.ones(window) / window, mode="valid")  # ma[i] averages x[i : i + window]
    ok = np.abs(ma / target - 1.0) <= tol
    if not ok[-1]:
        return None
    bad = np.flatnonzero(~ok)
    return 0 if len(bad) == 0 else int(bad[-1]) + 1


def tracking_metrics(run: dict[str, np.ndarray], target: float, *, start: int = 0, tol: float = 0.25,
                     window: int = 20) -> dict[str, float | int | None]:
    """Settling steps (from ``start``; see :func:`settling_step`), the peak of
    :math:`\\mathrm{KL}_t/\\mathrm{KL}_{target}` from ``start`` on (the transient's overshoot) and, over the steps after settling (or after ``start`` + half the
    remaining run when it never settles), the mean relative tracking error
    :math:`\\overline{|\\mathrm{KL}_t / \\mathrm{KL}_{target} - 1|}`, the mean ratio
    :math:`\\overline{\\mathrm{KL}_t} / \\mathrm{KL}_{target}` and the coefficient variance.

    >>> m = tracking_metrics(simulate("exponential", steps=300), 0.01)
    >>> m["settling_steps"] is not None and m["mean_rel_error"] < 0.25
    True
    """
    kl, coef = np.asarray(run["kl"]), np.asarray(run["coef"])
    s = settling_step(kl, target, tol=tol, window=window, start=start)
    begin = start + s if s is not None else start + (len(kl) - start) // 2
    seg, cseg = kl[begin:], coef[begin:]
    return {
        "settling_steps": s,
        "peak_kl_ratio": float(np.max(kl[start:]) / target),
        "mean_rel_error": float(np.mean(np.abs(seg / target - 1.0))),
        "mean_kl_ratio": float(np.mean(seg) / target),
        "coef_var": float(np.var(cseg)),
        "coef_mean": float(np.mean(cseg)),
    }


class TRLAdaptiveKLController:
    """TRL's ``trl.trainer.utils.AdaptiveKLController`` (Ziegler et al. 2019), copied verbatim.

    The independent reference for the ``proportional`` controller (TRL is not a
    dependency of rl2fx). ``update`` multiplies ``value`` by
    ``1 + clip(kl/target - 1, -0.2, 0.2) * n_steps / horizon``.

    >>> c = TRLAdaptiveKLController(0.2, 0.01, 10000)
    >>> c.update(0.02, 1000); round(float(c.value), 4)
    0.204
    """

    def __init__(self, init_kl_coef, target, horizon):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current, n_steps):
        target = self.target
        proportional_error = np.clip(current / target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult
