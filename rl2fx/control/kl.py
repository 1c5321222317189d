"""Adaptive KL-penalty coefficient controllers: a frozen state plus pure ``kl_init`` / ``kl_update``.

The coefficient :math:`\\beta` multiplies the KL term of the RL loss
(:math:`\\mathcal{L} = \\mathcal{L}_{PG} + \\beta\\,\\mathrm{KL}(\\pi \\,\\|\\, \\pi_{ref})`).
Each call ``kl_update(state, kl, step)`` reads the measured KL of the last
batch and returns a new state whose ``coef`` is :math:`\\beta_{t+1}`. With
:math:`r_t = \\mathrm{KL}_t / \\mathrm{KL}_{target}` and every result clamped to
``[min_coef, max_coef]``:

================  ======================================================================  ===============================
``fixed``         :math:`\\beta_{t+1} = \\beta_0`                                            constant penalty
``exponential``   :math:`\\beta_{t+1} = \\beta_t \\cdot` ``exp_factor`` if :math:`r_t > 1`,  multiplicative increase/decrease
                  ``exp_decay`` if :math:`r_t < 1`, unchanged if equal                      (RL2 spec)
``linear``        :math:`\\beta_{t+1} = \\beta_t\\,(1 + f\\,(r_t - 1))`, ``f = linear_factor``   proportional step on the ratio
``pid``           :math:`\\log\\beta_{t+1} = \\log\\beta_0 + k_p e_t + k_i \\sum_{s\\le t} e_s`    PID, positional form, on the
                  :math:`+ k_d (e_t - e_{t-1})`, :math:`e_t = r_t - 1`, anti-windup           relative error (Åström & Murray)
``schedule``      :math:`\\beta_t = \\mathrm{sched}(t;\\ \\beta_0 \\to` ``min_coef``, ``schedule_steps``)   open loop, step only
``proportional``  :math:`\\beta_{t+1} = \\beta_t\\,(1 + \\mathrm{clip}(r_t - 1, \\pm 0.2)\\,n/H)`     Ziegler et al. 2019; TRL
================  ======================================================================  ===============================

One config block can switch ``controller_type`` freely: parameters of the other
controller types are validated and kept but do not act.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from rl2fx._typing import check_choice
from rl2fx.control._scalars import as_float, as_int
from rl2fx.control.schedules import SCHEDULES, schedule_value

__all__ = [
    "CONTROLLER_TYPES",
    "FEEDBACK_TYPES",
    "DEFAULTS",
    "KLState",
    "kl_init",
    "kl_update",
    "kl_state_to_dict",
    "kl_state_from_dict",
    "AdaptiveKLController",
]

CONTROLLER_TYPES = ("fixed", "exponential", "linear", "pid", "schedule", "proportional")
#: The controllers that read the measured KL (the others depend on the step only).
FEEDBACK_TYPES = ("exponential", "linear", "pid", "proportional")

#: Every parameter ``kl_init`` accepts, with its default.
DEFAULTS: dict[str, Any] = {
    "initial_coef": 0.2,
    "target_kl": 0.01,
    "min_coef": 0.001,
    "max_coef": 10.0,
    # exponential
    "exp_factor": 1.03,
    "exp_decay": 0.99,
    # linear
    "linear_factor": 0.5,
    # pid
    "kp": 0.1,
    "ki": 0.01,
    "kd": 0.001,
    "integral_limit": None,  # None: log(max_coef / min_coef) / ki, the integral alone can span the range once
    # schedule
    "schedule_type": "cosine",
    "schedule_steps": 1000,
    "warmup_steps": None,  # warmup_cosine only; None: schedule_steps // 10
    # proportional (Ziegler et al. 2019 / TRL)
    "horizon": 10000,
    "n_steps": None,  # None: the steps elapsed since the previous update (at least 1)
}

#: TRL's and lm-human-preferences' clip on the proportional error.
PROPORTIONAL_CLIP = 0.2
# A KL ratio above this saturates every rule at max_coef anyway; capping it keeps
# the arithmetic finite for any finite input (kl / target can overflow to inf).
_RATIO_CAP = 1e12


@dataclass(frozen=True)
class KLState:
    """Everything a KL controller knows; ``coef`` is the coefficient to use for the next batch.

    ``params`` holds the controller parameters as sorted ``(name, value)`` pairs
    (immutable); read them with :attr:`param`. ``integral`` and ``prev_error``
    are the PID memory, ``last_step`` the step of the previous update, ``count``
    the number of updates so far.

    >>> s = kl_init("exponential")
    >>> s.coef, s.param["exp_factor"]
    (0.2, 1.03)
    """

    controller_type: str
    coef: float
    target_kl: float
    initial_coef: float
    min_coef: float
    max_coef: float
    params: tuple[tuple[str, Any], ...]
    integral: float = 0.0
    prev_error: float | None = None
    last_step: int = 0
    count: int = 0

    @property
    def param(self) -> dict[str, Any]:
        """The controller parameters as a fresh dict (changing it does not touch the state)."""
        return dict(self.params)


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def _check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    v = as_float(name, value)
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return v


def _validate(controller_type: str, p: dict[str, Any]) -> dict[str, Any]:
    """Check every parameter, returning them as plain Python numbers/strings."""
    out: dict[str, Any] = {}
    out["target_kl"] = _check_positive("target_kl", p["target_kl"])
    out["min_coef"] = _check_positive("min_coef", p["min_coef"], allow_zero=True)
    out["max_coef"] = _check_positive("max_coef", p["max_coef"], allow_zero=True)
    if out["min_coef"] > out["max_coef"]:
        raise ValueError(f"min_coef ({out['min_coef']}) must be <= max_coef ({out['max_coef']})")
    multiplicative = controller_type in FEEDBACK_TYPES or (
        controller_type == "schedule" and p["schedule_type"] == "exponential")
    if multiplicative and out["min_coef"] == 0:
        # zero is an absorbing state of a multiplicative rule (and log 0 breaks the PID)
        raise ValueError(f"min_coef must be > 0 for controller_type={controller_type!r}, got 0.0")
    out["initial_coef"] = as_float("initial_coef", p["initial_coef"])
    if not out["min_coef"] <= out["initial_coef"] <= out["max_coef"]:
        raise ValueError(f"initial_coef must be in [min_coef, max_coef] = [{out['min_coef']}, "
                         f"{out['max_coef']}], got {out['initial_coef']}")
    ef = as_float("exp_factor", p["exp_factor"])
    if ef < 1:
        raise ValueError(f"exp_factor must be >= 1 (it increases the coefficient), got {ef}")
    ed = as_float("exp_decay", p["exp_decay"])
    if not 0 < ed <= 1:
        raise ValueError(f"exp_decay must be in (0, 1] (it decreases the coefficient), got {ed}")
    out["exp_factor"], out["exp_decay"] = ef, ed
    lf = as_float("linear_factor", p["linear_factor"])
    if not 0 < lf <= 1:
        # 1 + f (r - 1) >= 1 - f must stay >= 0 for every kl >= 0
        raise ValueError(f"linear_factor must be in (0, 1], got {lf}")
    out["linear_factor"] = lf
    for k in ("kp", "ki", "kd"):
        out[k] = _check_positive(k, p[k], allow_zero=True)
    out["integral_limit"] = (None if p["integral_limit"] is None
                             else _check_positive("integral_limit", p["integral_limit"]))
    check_choice("schedule_type", p["schedule_type"], SCHEDULES)
    out["schedule_type"] = p["schedule_type"]
    out["schedule_steps"] = as_int("schedule_steps", p["schedule_steps"], low=1)
    if p["warmup_steps"] is None:
        out["warmup_steps"] = None
    else:
        w = as_int("warmup_steps", p["warmup_steps"], low=0)
        if w >= out["schedule_steps"]:
            raise ValueError(f"warmup_steps must be < schedule_steps ({out['schedule_steps']}), got {w}")
        out["warmup_steps"] = w
    out["horizon"] = _check_positive("horizon", p["horizon"])
    out["n_steps"] = None if p["n_steps"] is None else as_int("n_steps", p["n_steps"], low=1)
    return out


def _schedule_coef(s: KLState, step: int) -> float:
    p = s.param
    kw: dict[str, Any] = {}
    if p["schedule_type"] == "warmup_cosine":
        w = p["warmup_steps"]
        kw["warmup_steps"] = p["schedule_steps"] // 10 if w is None else w
    return schedule_value(p["schedule_type"], step, start=s.initial_coef, end=s.min_coef,
                          steps=p["schedule_steps"], **kw)


def kl_init(controller_type: str = "exponential", **params: Any) -> KLState:
    """Create the state of a KL controller of type ``controller_type``.

    ``params`` are any of :data:`DEFAULTS` (``initial_coef`` 0.2, ``target_kl``
    0.01, ``min_coef`` 0.001, ``max_coef`` 10.0, ``exp_factor`` 1.03,
    ``exp_decay`` 0.99, ``linear_factor`` 0.5, ``kp`` 0.1, ``ki`` 0.01, ``kd``
    0.001, ``schedule_type`` "cosine", ``schedule_steps`` 1000, ``horizon`` 10000,
    ...). A bad or unknown one raises ``ValueError`` naming it. The formulas and
    sources of each rule are in :func:`kl_update`.

    >>> kl_init("pid", kp=0.2).param["kp"]
    0.2
    >>> kl_init("pdi")
    Traceback (most recent call last):
    ...
    ValueError: controller_type must be one of ['fixed', 'exponential', 'linear', 'pid', 'schedule', 'proportional'], got 'pdi'
    >>> kl_init("exponential", min_coef=1.0, max_coef=0.5)
    Traceback (most recent call last):
    ...
    ValueError: min_coef (1.0) must be <= max_coef (0.5)
    """
    check_choice("controller_type", controller_type, CONTROLLER_TYPES)
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown KL controller parameter {unknown[0]!r}; known parameters: {sorted(DEFAULTS)}")
    p = _validate(controller_type, {**DEFAULTS, **params})
    common = ("initial_coef", "target_kl", "min_coef", "max_coef")
    state = KLState(
        controller_type=controller_type,
        coef=p["initial_coef"],
        target_kl=p["target_kl"],
        initial_coef=p["initial_coef"],
        min_coef=p["min_coef"],
        max_coef=p["max_coef"],
        params=tuple(sorted((k, v) for k, v in p.items() if k not in common)),
    )
    if controller_type == "schedule":
        state = dataclasses.replace(state, coef=_clamp(_schedule_coef(state, 0), state.min_coef, state.max_coef))
    return state


def kl_update(state: KLState, kl: Any, step: Any) -> KLState:
    """Return the state after observing ``kl`` (the batch's mean KL, ``>= 0``) at ``step`` (``>= 0``).

    Pure: ``state`` is not changed. ``kl`` may be a float or a one-element
    tensor; a negative or non-finite ``kl`` raises ``ValueError``. With
    :math:`r = \\mathrm{KL}/\\mathrm{KL}_{target}` and the result clamped to
    ``[min_coef, max_coef]``:

    - ``fixed``: :math:`\\beta` stays ``initial_coef``.
    - ``exponential`` (the RL2 spec's rule): :math:`\\beta \\leftarrow \\beta \\cdot`
      ``exp_factor`` when :math:`r > 1`, :math:`\\beta \\cdot` ``exp_decay`` when
      :math:`r < 1`. Because the factors are asymmetric (1.03 vs 0.99) the loop
      settles where KL exceeds the target about a quarter of the time.
    - ``linear``: :math:`\\beta \\leftarrow \\beta\\,(1 + f\\,(r - 1))`,
      ``f = linear_factor``: a step proportional to the relative error.
    - ``pid``: textbook PID in positional form on :math:`e_t = r_t - 1`, acting on
      :math:`\\log\\beta` so the gains are scale free:
      :math:`\\log\\beta_{t+1} = \\log\\beta_0 + k_p e_t + k_i I_t + k_d (e_t - e_{t-1})`,
      :math:`I_t = \\mathrm{clip}(I_{t-1} + e_t, \\pm I_{max})`. Anti-windup by
      conditional integration (the integral is frozen while the output is
      saturated and the error pushes further into saturation) and by the clamp
      :math:`I_{max}` (``integral_limit``, default :math:`\\log(\\beta_{max}/\\beta_{min})/k_i`).
      One call is one control period. Source: K. J. Åström, R. M. Murray,
      *Feedback Systems*, 2nd ed., ch. 11 (PID, integrator windup).
    - ``schedule``: :math:`\\beta_t = ` ``schedule_type`` shape from
      ``initial_coef`` to ``min_coef`` over ``schedule_steps`` (see
      :mod:`rl2fx.control.schedules`); a function of ``step`` only, ``kl`` is
      checked and ignored.
    - ``proportional``: the adaptive KL controller of D. Ziegler et al.,
      "Fine-Tuning Language Models from Human Preferences", 2019 (sec. 2.2), as in
      TRL's ``AdaptiveKLController``:
      :math:`\\beta \\leftarrow \\beta\\,(1 + \\mathrm{clip}(r - 1, -0.2, 0.2)\\,n/H)`,
      ``H = horizon``; ``n`` is ``n_steps`` when set (TRL passes the batch size),
      else the steps elapsed since the previous update, at least 1. The paper's
      :math:`K_\\beta = n/H = 0.1`.

    >>> s = kl_init("exponential")
    >>> s = kl_update(s, 0.02, step=1)   # KL above target: coefficient x 1.03
    >>> round(s.coef, 6)
    0.206
    >>> round(kl_update(kl_init("linear"), 0.03, 0).coef, 6)   # r = 3: x (1 + 0.5 * 2)
    0.4
    >>> round(kl_update(kl_init("proportional", n_steps=1000), 0.03, 0).coef, 6)   # clip(2) = 0.2, x 1.02
    0.204
    >>> kl_update(s, -0.1, 2)
    Traceback (most recent call last):
    ...
    ValueError: kl must be >= 0, got -0.1
    """
    kl_v = as_float("kl", kl)
    if kl_v < 0:
        raise ValueError(f"kl must be >= 0, got {kl}")
    step_v = as_int("step", step, low=0)
    ct = state.controller_type
    p = state.param
    r = min(kl_v / state.target_kl, _RATIO_CAP)
    coef = state.coef
    integral, prev_error = state.integral, state.prev_error
    if ct == "fixed":
        coef = state.initial_coef
    elif ct == "exponential":
        if r > 1:
            coef = coef * p["exp_factor"]
        elif r < 1:
            coef = coef * p["exp_decay"]
    elif ct == "linear":
        coef = coef * (1.0 + p["linear_factor"] * (r - 1.0))
    elif ct == "proportional":
        n = p["n_steps"] if p["n_steps"] is not None else max(step_v - state.last_step, 1)
        err = _clamp(r - 1.0, -PROPORTIONAL_CLIP, PROPORTIONAL_CLIP)
        coef = coef * max(1.0 + err * n / p["horizon"], 0.0)
    elif ct == "pid":
        coef, integral, prev_error = _pid(state, p, r - 1.0)
    elif ct == "schedule":
        coef = _schedule_coef(state, step_v)
    else:  # pragma: no cover - kl_init rejects unknown types
        raise ValueError(f"controller_type must be one of {list(CONTROLLER_TYPES)}, got {ct!r}")
    return dataclasses.replace(
        state,
        coef=_clamp(coef, state.min_coef, state.max_coef),
        integral=integral,
        prev_error=prev_error,
        last_step=step_v,
        count=state.count + 1,
    )


def _pid(state: KLState, p: dict[str, Any], e: float) -> tuple[float, float, float]:
    kp, ki, kd = p["kp"], p["ki"], p["kd"]
    lo, hi = math.log(state.min_coef), math.log(state.max_coef)
    if p["integral_limit"] is not None:
        i_max = p["integral_limit"]
    else:
        i_max = (hi - lo) / ki if ki > 0 else math.inf
    i_max = max(i_max, 1.0)  # a zero-width range (min == max) must not collapse the clamp to 0
    d = 0.0 if state.prev_error is None else e - state.prev_error
    base = math.log(state.initial_coef) + kp * e + kd * d
    integral = _clamp(state.integral + e, -i_max, i_max)
    u = base + ki * integral
    if (u > hi and e > 0) or (u < lo and e < 0):
        # conditional integration: do not let the integral wind up while saturated
        integral = state.integral
        u = base + ki * integral
    return math.exp(_clamp(u, lo, hi)), integral, e


def kl_state_to_dict(state: KLState) -> dict[str, Any]:
    """Plain-Python dict of ``state`` (JSON and ``torch.save`` friendly).

    >>> s = kl_update(kl_init("pid"), 0.02, 0)
    >>> kl_state_from_dict(kl_state_to_dict(s)) == s
    True
    """
    d = dataclasses.asdict(state)
    d["params"] = dict(state.params)
    return d


def kl_state_from_dict(d: dict[str, Any]) -> KLState:
    """Inverse of :func:`kl_state_to_dict`; the parameters are re-validated."""
    d = dict(d)
    fields = {f.name for f in dataclasses.fields(KLState)}
    missing = sorted(fields - set(d))
    extra = sorted(set(d) - fields)
    if missing or extra:
        raise ValueError(f"state dict keys do not match KLState: missing {missing}, unexpected {extra}")
    fresh = kl_init(d["controller_type"], initial_coef=d["initial_coef"], target_kl=d["target_kl"],
                    min_coef=d["min_coef"], max_coef=d["max_coef"], **dict(d["params"]))
    coef = as_float("coef", d["coef"])
    if not fresh.min_coef <= coef <= fresh.max_coef:
        raise ValueError(f"coef must be in [{fresh.min_coef}, {fresh.max_coef}], got {coef}")
    prev = d["prev_error"]
    return dataclasses.replace(
        fresh,
        coef=coef,
        integral=as_float("integral", d["integral"]),
        prev_error=None if prev is None else as_float("prev_error", prev),
        last_step=as_int("last_step", d["last_step"], low=0),
        count=as_int("count", d["count"], low=0),
    )


class AdaptiveKLController:
    """The spec's adaptive KL controller: one :class:`KLState`, updated by :func:`kl_update`.

    ``controller_type`` is one of ``fixed``, ``exponential``, ``linear``, ``pid``,
    ``schedule``, ``proportional``; ``controller_params`` are the rule's
    parameters (``exp_factor``, ``exp_decay``, ``linear_factor``, ``kp``, ``ki``,
    ``kd``, ``schedule_type``, ``schedule_steps``, ``horizon``, ``n_steps``, ...;
    see :data:`DEFAULTS`). ``history`` records ``step``, ``kl`` and ``coef`` (the
    coefficient after the update) for plotting; ``state_dict()`` /
    ``load_state_dict()`` carry state and history, so a resumed run continues
    exactly as an uninterrupted one.

    >>> controller = AdaptiveKLController(initial_coef=0.2, target_kl=0.01, controller_type="exponential")
    >>> round(controller.update(0.02, step=0), 4), round(controller.update(0.005, step=1), 4)
    (0.206, 0.2039)
    >>> controller.history["coef"] == [controller.history["coef"][0], controller.coef]
    True
    >>> resumed = AdaptiveKLController()
    >>> resumed.load_state_dict(controller.state_dict())
    >>> resumed.update(0.02, 2) == controller.update(0.02, 2)
    True
    """

    def __init__(
        self,
        initial_coef: float = 0.2,
        target_kl: float = 0.01,
        controller_type: str = "exponential",
        min_coef: float = 0.001,
        max_coef: float = 10.0,
        **controller_params: Any,
    ) -> None:
        self.state: KLState = kl_init(controller_type, initial_coef=initial_coef, target_kl=target_kl,
                                      min_coef=min_coef, max_coef=max_coef, **controller_params)
        self.history: dict[str, list[float]] = {"step": [], "kl": [], "coef": []}

    @property
    def coef(self) -> float:
        """The current KL coefficient."""
        return self.state.coef

    @property
    def controller_type(self) -> str:
        return self.state.controller_type

    @property
    def target_kl(self) -> float:
        return self.state.target_kl

    def update(self, current_kl: Any, step: Any) -> float:
        """Observe ``current_kl`` at ``step`` and return the coefficient for the next batch."""
        self.state = kl_update(self.state, current_kl, step)
        self.history["step"].append(self.state.last_step)
        self.history["kl"].append(as_float("current_kl", current_kl))
        self.history["coef"].append(self.state.coef)
        return self.state.coef

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python checkpoint: ``{"state": ..., "history": ...}``."""
        return {"state": kl_state_to_dict(self.state), "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (validated; the controller type comes from the checkpoint)."""
        if "state" not in state_dict:
            raise ValueError(f"state_dict must have a 'state' entry, got keys {sorted(state_dict)}")
        state = kl_state_from_dict(state_dict["state"])
        hist = state_dict.get("history", {"step": [], "kl": [], "coef": []})
        if set(hist) != {"step", "kl", "coef"}:
            raise ValueError(f"state_dict['history'] must have keys ['coef', 'kl', 'step'], got {sorted(hist)}")
        self.state = state
        self.history = {k: list(v) for k, v in hist.items()}

    def __repr__(self) -> str:
        return (f"AdaptiveKLController(controller_type={self.controller_type!r}, coef={self.coef:.6g}, "
                f"target_kl={self.target_kl:.6g}, updates={self.state.count})")
