"""KL and entropy constraints with Lagrange multipliers (projected dual gradient ascent).

The constrained problem behind ``actor.kl.constraint_optimization``:

.. math::

    \\min_\\theta\\ \\mathcal{L}(\\theta) \\quad \\text{s.t.}\\quad
    \\mathrm{KL}(\\theta) \\le c_{KL},\\qquad H(\\theta) \\ge c_H

has the Lagrangian
:math:`\\mathcal{L} + \\lambda_{KL}(\\mathrm{KL} - c_{KL}) + \\lambda_H (c_H - H)`
with :math:`\\lambda \\ge 0`. The policy descends it (the penalty terms returned
here are added to the loss, multipliers held constant), and the multipliers
ascend it by projected gradient ascent on the dual:

.. math::

    \\lambda_{KL} \\leftarrow \\max(0,\\ \\lambda_{KL} + \\eta\\,(\\mathrm{KL} - c_{KL})), \\qquad
    \\lambda_H \\leftarrow \\max(0,\\ \\lambda_H + \\eta\\,(c_H - H))

(gradient descent-ascent for constrained MDPs: E. Altman, *Constrained Markov
Decision Processes*, 1999; C. Tessler et al., "Reward Constrained Policy
Optimization", ICLR 2019; A. Stooke et al., "Responsive Safety in RL by PID
Lagrangian Methods", ICML 2020). A multiplier grows while its constraint is
violated and shrinks back to 0 once it holds with slack.

With ``use_lagrangian=False`` the multipliers stay fixed at ``penalty_coef``
and the terms become hinge penalties
:math:`\\rho\\max(0, \\mathrm{KL} - c_{KL})` and :math:`\\rho\\max(0, c_H - H)`
(the exact-penalty method), which only act while a constraint is violated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from rl2fx._typing import Float, Tensor, check_finite, typechecked
from rl2fx.control._scalars import as_float, as_int

__all__ = [
    "LagrangianState",
    "lagrangian_init",
    "lagrangian_update",
    "lagrangian_penalty",
    "LagrangianConstraints",
]


@dataclass(frozen=True)
class LagrangianState:
    """Multipliers and settings of the KL / entropy constraints (immutable).

    >>> lagrangian_init().kl_multiplier
    0.0
    """

    kl_multiplier: float
    entropy_multiplier: float
    kl_constraint: float
    entropy_constraint: float
    use_lagrangian: bool
    lagrangian_lr: float
    penalty_coef: float
    count: int = 0


def lagrangian_init(
    kl_constraint: float = 0.01,
    entropy_constraint: float = 0.01,
    use_lagrangian: bool = True,
    lagrangian_lr: float = 0.01,
    initial_multiplier: float = 0.0,
    penalty_coef: float = 1.0,
) -> LagrangianState:
    """Create the constraint state. Both multipliers start at ``initial_multiplier`` (``>= 0``).

    ``kl_constraint`` (the KL budget) and ``lagrangian_lr`` must be ``> 0``;
    ``entropy_constraint`` (the entropy floor) ``>= 0``. With
    ``use_lagrangian=False`` both multipliers are ``penalty_coef`` and never change.

    >>> lagrangian_init(lagrangian_lr=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: lagrangian_lr must be > 0, got -1.0
    """
    kc = as_float("kl_constraint", kl_constraint)
    if kc <= 0:
        raise ValueError(f"kl_constraint must be > 0, got {kl_constraint}")
    ec = as_float("entropy_constraint", entropy_constraint)
    if ec < 0:
        raise ValueError(f"entropy_constraint must be >= 0, got {entropy_constraint}")
    if not isinstance(use_lagrangian, bool):
        raise ValueError(f"use_lagrangian must be a bool, got {use_lagrangian!r}")
    lr = as_float("lagrangian_lr", lagrangian_lr)
    if lr <= 0:
        raise ValueError(f"lagrangian_lr must be > 0, got {lagrangian_lr}")
    m0 = as_float("initial_multiplier", initial_multiplier)
    if m0 < 0:
        raise ValueError(f"initial_multiplier must be >= 0 (multipliers of inequality constraints), got {m0}")
    rho = as_float("penalty_coef", penalty_coef)
    if rho < 0:
        raise ValueError(f"penalty_coef must be >= 0, got {penalty_coef}")
    m = m0 if use_lagrangian else rho
    return LagrangianState(kl_multiplier=m, entropy_multiplier=m, kl_constraint=kc, entropy_constraint=ec,
                           use_lagrangian=use_lagrangian, lagrangian_lr=lr, penalty_coef=rho)


def lagrangian_update(state: LagrangianState, kl: Any = None, entropy: Any = None) -> LagrangianState:
    """One projected dual ascent step from the measured ``kl`` (``>= 0``) and ``entropy``; pure.

    :math:`\\lambda_{KL} \\leftarrow \\max(0, \\lambda_{KL} + \\eta(\\mathrm{KL} - c_{KL}))`,
    :math:`\\lambda_H \\leftarrow \\max(0, \\lambda_H + \\eta(c_H - H))`. A constraint whose
    measurement is ``None`` keeps its multiplier. ``kl``/``entropy`` may be
    floats or one-element tensors (read without gradient).

    >>> s = lagrangian_update(lagrangian_init(lagrangian_lr=1.0), kl=0.05, entropy=0.0)
    >>> round(s.kl_multiplier, 6), round(s.entropy_multiplier, 6)
    (0.04, 0.01)
    >>> round(lagrangian_update(s, kl=0.0).kl_multiplier, 6)
    0.03
    """
    km, em = state.kl_multiplier, state.entropy_multiplier
    if kl is not None:
        kl_v = as_float("kl", kl)
        if kl_v < 0:
            raise ValueError(f"kl must be >= 0, got {kl_v}")
        if state.use_lagrangian:
            km = max(0.0, km + state.lagrangian_lr * (kl_v - state.kl_constraint))
    if entropy is not None:
        ent_v = as_float("entropy", entropy)
        if state.use_lagrangian:
            em = max(0.0, em + state.lagrangian_lr * (state.entropy_constraint - ent_v))
    return dataclasses.replace(state, kl_multiplier=km, entropy_multiplier=em, count=state.count + 1)


@typechecked
def lagrangian_penalty(
    state: LagrangianState,
    kl: Float[Tensor, "*kl_batch"] | float | None = None,
    entropy: Float[Tensor, "*entropy_batch"] | float | None = None,
) -> dict[str, Any]:
    """Penalty terms to add to the loss, differentiable in ``kl`` and ``entropy`` when they are tensors.

    Lagrangian mode: ``kl_penalty`` :math:`= \\lambda_{KL}(\\mathrm{KL} - c_{KL})`,
    ``entropy_penalty`` :math:`= \\lambda_H (c_H - H)`; penalty mode
    (``use_lagrangian=False``): the same with :math:`\\max(0, \\cdot)` and
    :math:`\\lambda = \\rho`. ``total`` is their sum. A term whose input is
    ``None`` is left out. The multipliers are constants here (no gradient).

    >>> import torch
    >>> s = dataclasses.replace(lagrangian_init(), kl_multiplier=2.0)
    >>> kl = torch.tensor(0.03, requires_grad=True)
    >>> terms = lagrangian_penalty(s, kl=kl)
    >>> terms["total"].backward(); round(terms["kl_penalty"].item(), 6), kl.grad.item()
    (0.04, 2.0)
    """
    terms: dict[str, Any] = {}
    if kl is not None:
        if isinstance(kl, Tensor):
            check_finite("kl", kl)
        else:
            as_float("kl", kl)
        g = kl - state.kl_constraint
        terms["kl_penalty"] = state.kl_multiplier * (g if state.use_lagrangian else _relu(g))
    if entropy is not None:
        if isinstance(entropy, Tensor):
            check_finite("entropy", entropy)
        else:
            as_float("entropy", entropy)
        g = state.entropy_constraint - entropy
        terms["entropy_penalty"] = state.entropy_multiplier * (g if state.use_lagrangian else _relu(g))
    total: Any = 0.0
    for v in terms.values():
        total = total + v
    terms["total"] = total
    return terms


def _relu(x: Any) -> Any:
    return torch.clamp(x, min=0.0) if isinstance(x, Tensor) else max(0.0, x)


class LagrangianConstraints:
    """The spec's ``constraint_optimization`` block: one :class:`LagrangianState` and its updates.

    ``update(kl=..., entropy=...)`` returns the penalty terms computed with the
    current multipliers (add ``terms["total"]`` to the loss; it is differentiable
    when ``kl``/``entropy`` are tensors), then takes one dual ascent step, as in
    simultaneous gradient descent-ascent.

    >>> import torch
    >>> lc = LagrangianConstraints(kl_constraint=0.01, entropy_constraint=0.5, lagrangian_lr=1.0)
    >>> terms = lc.update(kl=torch.tensor(0.03), entropy=torch.tensor(0.2))
    >>> float(terms["total"]), round(lc.kl_multiplier, 6), round(lc.entropy_multiplier, 6)
    (0.0, 0.02, 0.3)
    >>> round(float(lc.update(kl=0.03, entropy=0.2)["total"]), 6)   # 0.02 * 0.02 + 0.3 * 0.3
    0.0904
    """

    def __init__(
        self,
        kl_constraint: float = 0.01,
        entropy_constraint: float = 0.01,
        use_lagrangian: bool = True,
        lagrangian_lr: float = 0.01,
        initial_multiplier: float = 0.0,
        penalty_coef: float = 1.0,
    ) -> None:
        self.state: LagrangianState = lagrangian_init(kl_constraint, entropy_constraint, use_lagrangian,
                                                      lagrangian_lr, initial_multiplier, penalty_coef)

    @property
    def kl_multiplier(self) -> float:
        return self.state.kl_multiplier

    @property
    def entropy_multiplier(self) -> float:
        return self.state.entropy_multiplier

    def penalty(self, kl: Any = None, entropy: Any = None) -> dict[str, Any]:
        """The penalty terms at the current multipliers, without updating them."""
        return lagrangian_penalty(self.state, kl, entropy)

    def update(self, kl: Any = None, entropy: Any = None) -> dict[str, Any]:
        """Penalty terms at the current multipliers, then one projected dual ascent step."""
        terms = lagrangian_penalty(self.state, kl, entropy)
        self.state = lagrangian_update(self.state, _detached(kl), _detached(entropy))
        return terms

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        d = dict(state_dict)
        fields = {f.name for f in dataclasses.fields(LagrangianState)}
        if set(d) != fields:
            raise ValueError(f"state_dict keys must be {sorted(fields)}, got {sorted(d)}")
        fresh = lagrangian_init(d["kl_constraint"], d["entropy_constraint"], d["use_lagrangian"],
                                d["lagrangian_lr"], 0.0, d["penalty_coef"])
        km, em = as_float("kl_multiplier", d["kl_multiplier"]), as_float("entropy_multiplier", d["entropy_multiplier"])
        for name, v in (("kl_multiplier", km), ("entropy_multiplier", em)):
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        self.state = dataclasses.replace(fresh, kl_multiplier=km, entropy_multiplier=em,
                                         count=as_int("count", d["count"], low=0))

    def __repr__(self) -> str:
        return (f"LagrangianConstraints(kl_multiplier={self.kl_multiplier:.6g}, "
                f"entropy_multiplier={self.entropy_multiplier:.6g}, use_lagrangian={self.state.use_lagrangian})")


def _detached(x: Any) -> Any:
    # The dual step reads the batch mean; per-token tensors are averaged here so
    # update() accepts whatever was passed to the penalty.
    if isinstance(x, Tensor):
        return x.detach().float().mean()
    return x
