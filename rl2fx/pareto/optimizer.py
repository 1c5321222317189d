"""``MultiObjectiveOptimizer``: the spec's multi-objective loss with a Pareto archive.

Objectives are named, **maximized** scalars (the spec passes ``"kl_penalty": -kl``).
Every method returns a differentiable loss to *minimize*; gradients flow to every
objective value given as a tensor with ``requires_grad``.

Weight signs, per method (details and formulas in ``docs/pareto.md``):

- ``weighted_sum``: the signed linear utility, ``loss = -sum_i w_i f_i``. Signs are
  taken literally: a negative weight asks for smaller values of that objective.
- ``tchebycheff``, ``pareto_dominance``, ``hypervolume``: these methods are defined
  by Pareto dominance, whose direction is fixed (every objective maximized), so a
  weight is a preference *magnitude*: ``|w_i|`` is used. With the spec's
  ``kl_penalty: -0.1`` and ``kl_penalty = -kl`` these methods penalize KL with
  strength 0.1. All-zero weights are an error.

The archive-based methods add ``-diversity_weight * D(f)``, where ``D`` is the
preference-weighted Euclidean distance ``min_a ||w * (f - a)||`` from ``f`` to the nearest archived point
(novelty in objective space, Lehman & Stanley 2011), so that, other things
equal, points away from what is already archived are preferred.
``weighted_sum`` stays the bare linear utility.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rl2fx._typing import check_choice, check_range
from rl2fx.pareto.archive import ArchiveState, archive_init, archive_update
from rl2fx.pareto.hypervolume import hypervolume_gradient, nadir_reference_point
from rl2fx.pareto.scalarize import tchebycheff, weighted_sum

__all__ = ["MultiObjectiveOptimizer", "PARETO_METHODS"]

PARETO_METHODS = ("weighted_sum", "tchebycheff", "pareto_dominance", "hypervolume")
_NEEDS_TWO = ("pareto_dominance", "hypervolume")
# Smooths sqrt at zero distance so a point equal to an archived one gets zero
# (not NaN) diversity gradient.
_DIST_EPS = 1e-12


def _check_names(what: str, given: Sequence[str], allowed: Sequence[str]) -> None:
    unknown = [k for k in given if k not in allowed]
    missing = [k for k in allowed if k not in given]
    if unknown:
        raise ValueError(f"{what} has unknown objective(s) {unknown}; allowed objectives: {list(allowed)}")
    if missing:
        raise ValueError(f"{what} is missing objective(s) {missing}; expected all of {list(allowed)}")


class MultiObjectiveOptimizer:
    """Scalarize named objectives into one loss and keep a bounded Pareto archive.

    Args:
        objectives: objective names, in the order used for vectors and archives.
        objective_weights: one finite weight per objective (see the module
            docstring for how signs are read by each method).
        pareto_method: ``"weighted_sum"``, ``"tchebycheff"``, ``"pareto_dominance"``
            or ``"hypervolume"``.
        diversity_weight: ``>= 0``; strength of the archive-distance bonus for
            the archive-based methods.
        archive_size: capacity of the Pareto archive (``>= 1``).

    Losses, for the objective vector :math:`f`, weights :math:`w`, archive :math:`A`
    and :math:`\\kappa` = ``diversity_weight`` (all archive quantities are
    constants for autograd):

    - ``weighted_sum``: :math:`L = -\\sum_i w_i f_i`.
    - ``tchebycheff``: :math:`L = \\max_i |w_i| (z_i - f_i) - \\kappa D(f)`, ideal
      :math:`z = \\max(\\max_{a \\in A} a, f)` componentwise (Miettinen 1999).
    - ``pareto_dominance``: :math:`L = -\\sum_i \\lambda_i f_i - \\kappa D(f)`,
      :math:`\\lambda_i = |w_i| (1 + c_i)`, where :math:`c_i` counts the archived
      points that dominate :math:`f` and beat it in objective :math:`i`: a
      non-dominated point gets the plain weights, a dominated one is pushed
      hardest where it is dominated most often (the dominance count is
      Fonseca & Fleming's 1993 rank).
    - ``hypervolume``: :math:`L = -\\sum_i \\lambda_i f_i - \\kappa D(f)`,
      :math:`\\lambda_i = |w_i| \\, M g_i / \\sum_j g_j` with
      :math:`g = \\partial \\operatorname{HV}(A_f \\cup \\{f\\}) / \\partial f`
      (:func:`~rl2fx.pareto.hypervolume.hypervolume_gradient`), :math:`A_f` the
      archived points that do not weakly dominate :math:`f` (for a dominated
      :math:`f`, its own layer, as in hypervolume indicator gradient ascent,
      Wang et al. 2017) and the reference point
      :func:`~rl2fx.pareto.hypervolume.nadir_reference_point` of
      :math:`A \\cup \\{f\\}`. The gradient of :math:`-\\sum_i \\lambda_i f_i` is
      the (preference-weighted, normalized) hypervolume gradient.

    With an empty archive the three archive-based methods reduce to
    :math:`-\\sum_i |w_i| f_i`.

    >>> import torch
    >>> opt = MultiObjectiveOptimizer(["reward", "kl_penalty"], {"reward": 1.0, "kl_penalty": 0.1})
    >>> r = torch.tensor(0.5, requires_grad=True)
    >>> loss = opt.compute_pareto_loss({"reward": r, "kl_penalty": -0.2})
    >>> loss
    tensor(-0.4800, grad_fn=<NegBackward0>)
    >>> opt.update_pareto_archive({"reward": 0.5, "kl_penalty": -0.2})
    True
    >>> opt.get_pareto_front()
    [{'reward': 0.5, 'kl_penalty': -0.2}]
    """

    def __init__(
        self,
        objectives: Sequence[str],
        objective_weights: Mapping[str, float],
        pareto_method: str = "weighted_sum",
        diversity_weight: float = 0.1,
        archive_size: int = 100,
    ) -> None:
        self._configure(objectives, objective_weights, pareto_method, diversity_weight, archive_size)
        self._archive = archive_init(len(self.objectives), self.archive_size)
        self._step = 0

    def _configure(
        self,
        objectives: Sequence[str],
        objective_weights: Mapping[str, float],
        pareto_method: str,
        diversity_weight: float,
        archive_size: int,
    ) -> None:
        if isinstance(objectives, str) or not all(isinstance(o, str) for o in objectives):
            raise ValueError(f"objectives must be a sequence of names, got {objectives!r}")
        objectives = list(objectives)
        if not objectives:
            raise ValueError("objectives must name at least one objective, got []")
        dupes = sorted({o for o in objectives if objectives.count(o) > 1})
        if dupes:
            raise ValueError(f"objectives must be unique, got duplicates {dupes}")
        if not isinstance(objective_weights, Mapping):
            raise ValueError(f"objective_weights must be a mapping name -> weight, got {objective_weights!r}")
        _check_names("objective_weights", list(objective_weights), objectives)
        weights = {}
        for name in objectives:
            w = objective_weights[name]
            w = w.item() if isinstance(w, Tensor) and w.numel() == 1 else w
            if not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
                raise ValueError(f"objective_weights[{name!r}] must be a finite number, got {w!r}")
            weights[name] = float(w)
        if all(w == 0.0 for w in weights.values()):
            raise ValueError(f"objective_weights are all zero ({weights}); at least one must be non-zero")
        check_choice("pareto_method", pareto_method, PARETO_METHODS)
        if pareto_method in _NEEDS_TWO and len(objectives) < 2:
            raise ValueError(
                f"pareto_method={pareto_method!r} needs at least 2 objectives, got {objectives}; "
                f"use 'weighted_sum' or 'tchebycheff' for one"
            )
        check_range("diversity_weight", diversity_weight, 0.0, None)
        if isinstance(archive_size, bool) or not isinstance(archive_size, numbers.Integral):
            raise ValueError(f"archive_size must be an integer >= 1, got {archive_size!r}")
        check_range("archive_size", archive_size, 1, None)
        self.objectives: list[str] = objectives
        self.objective_weights: dict[str, float] = weights
        self.pareto_method: str = pareto_method
        self.diversity_weight: float = float(diversity_weight)
        self.archive_size: int = int(archive_size)

    # ------------------------------------------------------------------ inputs
    def _values(self, objectives_dict: Mapping[str, Any]) -> list[Any]:
        if not isinstance(objectives_dict, Mapping):
            raise ValueError(f"objectives_dict must be a mapping name -> value, got {type(objectives_dict).__name__}")
        _check_names("objectives_dict", list(objectives_dict), self.objectives)
        values = []
        for name in self.objectives:
            v = objectives_dict[name]
            if isinstance(v, Tensor):
                if v.dim() != 0 or not v.is_floating_point():
                    raise ValueError(
                        f"objectives_dict[{name!r}] must be a Python number or a 0-d floating tensor, "
                        f"got a {v.dtype} tensor of shape {tuple(v.shape)}"
                    )
                finite = bool(torch.isfinite(v.detach()))
            elif isinstance(v, numbers.Real) and not isinstance(v, bool):
                finite = math.isfinite(float(v))
            else:
                raise ValueError(f"objectives_dict[{name!r}] must be a Python number or a 0-d tensor, got {v!r}")
            if not finite:
                raise ValueError(f"objectives_dict[{name!r}] must be finite, got {v!r}")
            values.append(v)
        return values

    def _vector(self, values: list[Any]) -> Tensor:
        tensors = [v for v in values if isinstance(v, Tensor)]
        if tensors:
            dtype = torch.float32
            for t in tensors:
                dtype = torch.promote_types(dtype, t.dtype)
            device = tensors[0].device
        else:
            dtype, device = torch.get_default_dtype(), torch.device("cpu")
        return torch.stack([torch.as_tensor(v, dtype=dtype, device=device) for v in values])

    # ------------------------------------------------------------------ loss
    def compute_pareto_loss(self, objectives_dict: Mapping[str, Any], *, at: Mapping[str, Any] | None = None) -> Tensor:
        """The scalar loss (to minimize) for one objective vector; see the class docstring.

        Values may be Python numbers or 0-d tensors; gradients flow to every tensor
        that requires them. The archive is read, never changed.

        ``at``: the *measured* objective vector, on the archive's scale, where the
        method's archive-relative weighting is evaluated. In RL the differentiable
        objectives are surrogates: the policy-gradient surrogate of the reward has
        the reward's gradient but not its value (on-policy it is the mean
        advantage, about 0), so comparing it with archived *rewards* puts the
        point in the wrong place (Tchebycheff's active term, the hypervolume
        layer and reference point, the nearest archived point). With ``at`` the
        loss is :math:`L(a) + \\lambda^\top (f - \\mathrm{sg}(f))`,
        :math:`\\lambda = \\partial L/\\partial f|_{f=a}`
        (:meth:`gradient_weights`): the method's value at the measured point
        :math:`a` and its gradient, carried by the surrogates.

        >>> import torch
        >>> opt = MultiObjectiveOptimizer(["reward", "kl_penalty"], {"reward": 1.0, "kl_penalty": 0.1},
        ...                               pareto_method="tchebycheff", diversity_weight=0.0)
        >>> _ = opt.update_pareto_archive({"reward": 0.6, "kl_penalty": -0.1})
        >>> surrogate = torch.tensor(0.0, requires_grad=True)  # the PG surrogate's value is ~0
        >>> loss = opt.compute_pareto_loss({"reward": surrogate, "kl_penalty": -0.5},
        ...                                at={"reward": 0.3, "kl_penalty": -0.5})
        >>> loss.backward(); round(loss.item(), 6), surrogate.grad.item()  # reward term active: 1 * (0.6 - 0.3)
        (0.3, -1.0)
        """
        f = self._vector(self._values(objectives_dict))
        if at is None:
            return self._loss_at(f)
        value, lam = self._value_and_gradient(at, dtype=f.dtype, device=f.device)
        return value + (lam * (f - f.detach())).sum()

    def gradient_weights(self, at: Mapping[str, Any]) -> dict[str, float]:
        r""":math:`\lambda_i = \partial L / \partial f_i` at the objective vector ``at``: how strongly the
        loss pushes each objective there (negative: increased). For ``weighted_sum`` these are ``-w``;
        for ``tchebycheff`` only the active term is non-zero (plus the diversity term's share).

        >>> opt = MultiObjectiveOptimizer(["reward", "kl_penalty"], {"reward": 1.0, "kl_penalty": 0.1})
        >>> opt.gradient_weights({"reward": 0.5, "kl_penalty": -0.2})
        {'reward': -1.0, 'kl_penalty': -0.1}
        """
        _, lam = self._value_and_gradient(at, dtype=torch.float64, device=None)
        return {o: float(v) for o, v in zip(self.objectives, lam.tolist(), strict=True)}

    def _value_and_gradient(self, at: Mapping[str, Any], *, dtype: torch.dtype, device: Any) -> tuple[Tensor, Tensor]:
        """:math:`L(a)` and :math:`\\partial L/\\partial f|_{f=a}` at the objective vector ``at``, both detached."""
        pos = self._vector(self._values(at)).detach().to(dtype=dtype, device=device).requires_grad_(True)
        with torch.enable_grad():
            value = self._loss_at(pos)
            (lam,) = torch.autograd.grad(value, pos)
        return value.detach(), lam

    def _loss_at(self, f: Tensor) -> Tensor:
        w = torch.tensor([self.objective_weights[o] for o in self.objectives], dtype=f.dtype, device=f.device)
        if self.pareto_method == "weighted_sum":
            return -weighted_sum(f, w)
        mag = w.abs()
        archive = self._archive.points
        if len(archive) == 0:
            return -weighted_sum(f, mag)
        p = f.detach().cpu().double().numpy()
        a = torch.as_tensor(np.array(archive), dtype=f.dtype, device=f.device)
        if self.pareto_method == "tchebycheff":
            ideal = torch.maximum(a.max(dim=0).values, f.detach())
            loss = tchebycheff(f, mag, ideal)
        elif self.pareto_method == "pareto_dominance":
            better = archive > p
            dominators = (archive >= p).all(axis=1) & better.any(axis=1)
            counts = (better & dominators[:, None]).sum(axis=0)
            lam = mag * (1.0 + torch.as_tensor(counts, dtype=f.dtype, device=f.device))
            loss = -weighted_sum(f, lam)
        else:
            layer = archive[~(archive >= p).all(axis=1)]
            ref = nadir_reference_point(np.vstack([archive, p[None]]))
            g = hypervolume_gradient(torch.from_numpy(p), layer, ref)
            total = float(g.sum())
            lam = mag * (len(p) * g.to(f) / total) if total > 0 else mag
            loss = -weighted_sum(f, lam)
        if self.diversity_weight > 0:
            loss = loss - self.diversity_weight * self._diversity(f, a)
        return loss

    def _diversity(self, f: Tensor, a: Tensor) -> Tensor:
        # Distance in preference-weighted units |w_i| f_i, the scale the methods' own terms use, so that
        # |d(kappa D)/df_i| <= kappa |w_i|: the novelty bonus cannot outweigh the objectives. (Dividing by
        # the archive's range instead made the bonus's gradient 1 / range, which dominates while the
        # archive is narrow and drove the demo's Tchebycheff arm to push its reward down.)
        mag = torch.tensor([abs(self.objective_weights[o]) for o in self.objectives], dtype=f.dtype, device=f.device)
        sq = ((mag * (f[None, :] - a)) ** 2).sum(dim=1)
        return torch.sqrt(sq.min() + _DIST_EPS**2) - _DIST_EPS

    # ------------------------------------------------------------------ archive
    def update_pareto_archive(self, objectives_dict: Mapping[str, Any]) -> bool:
        """Offer the (detached) objective vector to the archive; ``True`` if it was kept.

        Every call advances the step counter stored with archived points.
        """
        values = self._values(objectives_dict)
        floats = {o: float(v.detach()) if isinstance(v, Tensor) else float(v) for o, v in zip(self.objectives, values, strict=True)}
        step = self._step
        self._step += 1
        self._archive = archive_update(
            self._archive,
            np.array([floats[o] for o in self.objectives]),
            step=step,
            metadata={"step": step, "objectives": floats},
        )
        return step in self._archive.steps

    def get_pareto_front(self) -> list[dict[str, float]]:
        """The archived objective dicts (mutually non-dominated), oldest first."""
        order = np.argsort(np.asarray(self._archive.steps, dtype=np.int64), kind="stable")
        return [dict(self._archive.metadata[i]["objectives"]) for i in order]

    @property
    def archive(self) -> ArchiveState:
        """The current immutable archive state (points, steps, metadata)."""
        return self._archive

    @property
    def pareto_archive(self) -> list[dict[str, Any]]:
        """Archived entries with their metadata: ``{"step": int, "objectives": dict}``, oldest first."""
        order = np.argsort(np.asarray(self._archive.steps, dtype=np.int64), kind="stable")
        return [{"step": self._archive.metadata[i]["step"], "objectives": dict(self._archive.metadata[i]["objectives"])} for i in order]

    def __len__(self) -> int:
        return len(self._archive)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Configuration, step counter and archive as plain Python data."""
        return {
            "objectives": list(self.objectives),
            "objective_weights": dict(self.objective_weights),
            "pareto_method": self.pareto_method,
            "diversity_weight": self.diversity_weight,
            "archive_size": self.archive_size,
            "step": self._step,
            "archive": {
                "points": self._archive.points.tolist(),
                "steps": list(self._archive.steps),
                "metadata": [
                    {"step": m["step"], "objectives": dict(m["objectives"])} for m in self._archive.metadata
                ],
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` produced (configuration included)."""
        required = ["objectives", "objective_weights", "pareto_method", "diversity_weight", "archive_size", "step", "archive"]
        missing = [k for k in required if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict is missing keys {missing}; expected {required}")
        previous = dict(vars(self))
        try:
            self._load(state_dict)
        except Exception:
            vars(self).clear()
            vars(self).update(previous)  # a failed load leaves the optimizer as it was
            raise

    def _load(self, state_dict: Mapping[str, Any]) -> None:
        self._configure(
            state_dict["objectives"],
            state_dict["objective_weights"],
            state_dict["pareto_method"],
            state_dict["diversity_weight"],
            state_dict["archive_size"],
        )
        arch = state_dict["archive"]
        points = np.asarray(arch["points"], dtype=np.float64).reshape(-1, len(self.objectives))
        if not (len(points) == len(arch["steps"]) == len(arch["metadata"])) or len(points) > self.archive_size:
            raise ValueError(
                f"state_dict['archive'] is inconsistent: {len(points)} points, {len(arch['steps'])} steps, "
                f"{len(arch['metadata'])} metadata entries, archive_size={self.archive_size}"
            )
        state = archive_init(len(self.objectives), self.archive_size)
        for p, s, m in zip(points, arch["steps"], arch["metadata"], strict=True):
            state = archive_update(state, p, step=int(s), metadata=m)
        if len(state) != len(points):
            raise ValueError("state_dict['archive'] holds points that dominate or duplicate each other")
        self._archive = state
        self._step = int(state_dict["step"])
