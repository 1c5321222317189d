"""Samplers: how the next trial's parameters are chosen from the trials seen so far.

A sampler is a frozen dataclass with one pure method,
``sample(configs, finished, pending, number, maximize) -> (params, info)``: it looks
at the finished trials (complete and failed), the trials still running (pending)
and the new trial's ``number``, and returns the parameters plus a small JSON-able
``info`` dict stored with the trial. Samplers keep no hidden state: every draw is a
function of the seed, the trial number and the history, so a study resumed from
disk continues exactly as an uninterrupted one would.

- :class:`RandomSampler`: independent uniform draws (log-uniform for ``log=True``),
  seeded per trial by ``(seed, number)`` (Bergstra & Bengio, 2012).
- :class:`GridSampler`: the full factorial grid, ``grid_size`` points per numeric
  dimension, enumerated in a fixed order; exhausting it raises :class:`StudyExhausted`.
- :class:`BayesianSampler`: BoTorch GP Bayesian optimisation (SingleTaskGP +
  qLogNoisyExpectedImprovement, Ament et al. 2023) after a scrambled Sobol design.
- :class:`SkoptSampler`: scikit-optimize's ask/tell ``Optimizer`` (GP + EI).

>>> from rl2fx import HyperparameterConfig
>>> cs = [HyperparameterConfig("x", "float", low=0.0, high=1.0)]
>>> params, info = RandomSampler(seed=0).sample(cs, [], [], number=0, maximize=True)
>>> params == RandomSampler(seed=0).sample(cs, [], [], number=0, maximize=True)[0]
True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from rl2fx._typing import check_choice, check_range
from rl2fx.tuning.space import (
    HyperparameterConfig,
    active_params,
    decode,
    encode,
    encoded_dim,
    is_active,
)

if TYPE_CHECKING:  # pragma: no cover
    from rl2fx.tuning.study import Trial

__all__ = [
    "Sampler",
    "StudyExhausted",
    "RandomSampler",
    "GridSampler",
    "BayesianSampler",
    "SkoptSampler",
    "make_sampler",
    "SAMPLERS",
    "sample_from_unit",
    "grid_values",
]


class StudyExhausted(RuntimeError):
    """Raised by ``ask`` when the sampler has no new point left (a fully enumerated grid)."""


class Sampler(Protocol):
    name: str
    seed: int | None

    def sample(
        self,
        configs: Sequence[HyperparameterConfig],
        finished: Sequence[Trial],
        pending: Sequence[Trial],
        number: int,
        maximize: bool,
    ) -> tuple[dict[str, Any], dict[str, Any]]: ...

    def settings(self) -> dict[str, Any]: ...


def sample_from_unit(c: HyperparameterConfig, u: float) -> Any:
    """Map ``u ~ U[0, 1)`` to a uniformly distributed value of ``c``.

    Floats: uniform (log-uniform for ``log=True``) on [low, high]. Ints: every integer
    gets the same probability (``low - 0.5 .. high + 0.5`` in the sampling scale, then
    rounded; log-uniform bins for ``log=True``). Categoricals: ``floor(u k)``-th choice.

    >>> c = HyperparameterConfig("n", "int", low=1, high=3)
    >>> [sample_from_unit(c, u) for u in (0.0, 0.34, 0.99)]
    [1, 2, 3]
    """
    u = min(max(float(u), 0.0), 1.0)
    if c.type == "float":
        return c.from_unit(u)
    if c.type == "int":
        lo, hi = c.low - 0.5, c.high + 0.5
        if c.log:
            x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        else:
            x = lo + u * (hi - lo)
        return int(min(max(round(x), c.low), c.high))
    k = len(c.choices)
    return c.choices[min(int(u * k), k - 1)]


def _params_key(params: Mapping[str, Any]) -> str:
    return repr(sorted((k, repr(v)) for k, v in params.items()))


@dataclass(frozen=True)
class RandomSampler:
    """Uniform random search (log-uniform on ``log=True`` parameters).

    Trial ``n`` draws from ``numpy.random.default_rng([seed, n])``, so the point depends
    only on the seed and the trial number: reproducible, order-independent under
    parallel evaluation, and identical after a resume (Bergstra & Bengio, 2012,
    "Random search for hyper-parameter optimization", JMLR 13).
    """

    seed: int | None = None
    name: str = field(default="random", init=False)
    multi_objective: bool = field(default=True, init=False, repr=False)

    def sample(self, configs, finished, pending, number, maximize):  # noqa: D102
        rng = np.random.default_rng([int(self.seed or 0), int(number)])
        return sample_params(configs, rng.random(len(configs))), {}

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed}


def grid_values(c: HyperparameterConfig, grid_size: int) -> list[Any]:
    """The grid of one parameter: ``grid_size`` evenly spaced values (in log space for
    ``log=True``) including both ends; ints are rounded and de-duplicated (so a range
    with fewer than ``grid_size`` integers gives each integer once); categoricals and
    bools list every choice.

    >>> grid_values(HyperparameterConfig("lr", "float", low=1e-4, high=1e-2, log=True), 3)
    [0.0001, 0.001, 0.01]
    >>> grid_values(HyperparameterConfig("e", "int", low=1, high=3), 10)
    [1, 2, 3]
    """
    if not c.is_numeric:
        return list(c.choices)
    vals = [c.from_unit(i / (grid_size - 1)) for i in range(grid_size)]
    if c.type == "int":
        seen: list[int] = []
        for v in vals:
            if v not in seen:
                seen.append(v)
        return seen
    return [float(f"{v:.12g}") for v in vals]


@dataclass(frozen=True)
class GridSampler:
    """Exhaustive grid search over the Cartesian product of :func:`grid_values`.

    Points are enumerated in lexicographic order (first parameter slowest, last
    fastest). Each ask takes the lowest grid index not yet used by a finished or
    running trial, so trials lost to a crash are re-run on resume and parallel asks
    never collide. When every index is used, ``sample`` raises :class:`StudyExhausted`.
    A conditional parameter is enumerated only where its condition holds: indices
    where an inactive parameter is not at its first grid value are skipped, so each
    distinct configuration is asked once.
    """

    grid_size: int = 10
    seed: int | None = None
    name: str = field(default="grid", init=False)
    multi_objective: bool = field(default=True, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.grid_size, bool) or not isinstance(self.grid_size, int):
            raise ValueError(f"grid_size must be an integer >= 2, got {self.grid_size!r}")
        check_range("grid_size", self.grid_size, 2, None)

    def axes(self, configs: Sequence[HyperparameterConfig]) -> list[list[Any]]:
        return [grid_values(c, self.grid_size) for c in configs]

    def size(self, configs: Sequence[HyperparameterConfig]) -> int:
        """Number of distinct points: conditional parameters count only under their parent values."""
        n = {c.name: len(a) for c, a in zip(configs, self.axes(configs), strict=True)}
        total = 1
        for c in configs:
            if c.parent is not None:
                continue
            children = [k for k in configs if k.parent == c.name]
            if not children:
                total *= n[c.name]
            else:
                total *= sum(math.prod(n[k.name] for k in children if is_active(k, {c.name: v})) for v in c.choices)
        return total

    def _index_digits(self, configs, index: int) -> list[int]:
        digits = []
        for a in reversed(self.axes(configs)):
            index, r = divmod(index, len(a))
            digits.append(r)
        return digits[::-1]

    def _canonical(self, configs, index: int) -> bool:
        # an inactive parameter's digit must be 0, else the point repeats another index
        digits = self._index_digits(configs, index)
        point = {c.name: a[d] for c, a, d in zip(configs, self.axes(configs), digits, strict=True)}
        return all(d == 0 or is_active(c, point) for c, d in zip(configs, digits, strict=True))

    def point(self, configs: Sequence[HyperparameterConfig], index: int) -> dict[str, Any]:
        axes = self.axes(configs)
        out: dict[str, Any] = {}
        for c, a in zip(reversed(configs), reversed(axes), strict=True):
            index, r = divmod(index, len(a))
            out[c.name] = a[r]
        return active_params(configs, {c.name: out[c.name] for c in configs})

    def sample(self, configs, finished, pending, number, maximize):  # noqa: D102
        used = {t.info.get("grid_index") for t in [*finished, *pending]}
        total = self.size(configs)
        full = math.prod(len(a) for a in self.axes(configs))
        conditional = any(c.condition is not None for c in configs)
        i = 0
        while i < full and (i in used or conditional and not self._canonical(configs, i)):
            i += 1
        if i >= full:
            raise StudyExhausted(
                f"grid search exhausted: all {total} grid points (grid_size={self.grid_size}) "
                f"have been asked; increase grid_size or use another optimizer_type"
            )
        return self.point(configs, i), {"grid_index": i}

    def settings(self) -> dict[str, Any]:
        return {"grid_size": self.grid_size}


def _successful(finished: Sequence[Trial], maximize: bool | Sequence[bool]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Params and values of complete trials, values signed for maximisation (a list per
    trial in a multi-objective study)."""
    xs, ys = [], []
    for t in finished:
        if t.state != "complete":
            continue
        if isinstance(maximize, list | tuple):
            if t.values is not None and all(math.isfinite(v) for v in t.values):
                xs.append(t.params)
                ys.append([float(v) if m else -float(v) for v, m in zip(t.values, maximize, strict=True)])
        elif t.value is not None and math.isfinite(t.value):
            xs.append(t.params)
            ys.append(float(t.value) if maximize else -float(t.value))
    return xs, ys


def _n_initial(configs: Sequence[HyperparameterConfig], n_initial: int | None) -> int:
    return n_initial if n_initial is not None else max(5, 2 * len(configs))


ACQUISITIONS = ("auto", "logei", "qlognei")


def sample_params(configs: Sequence[HyperparameterConfig], u: Sequence[float]) -> dict[str, Any]:
    """One point of the space from one uniform number per config (:func:`sample_from_unit`),
    without the conditional parameters whose condition fails."""
    return active_params(configs, {c.name: sample_from_unit(c, float(ui)) for c, ui in zip(configs, u, strict=True)})


def _sobol_point(configs: Sequence[HyperparameterConfig], seed: int | None, number: int) -> dict[str, Any]:
    import torch

    sobol = torch.quasirandom.SobolEngine(len(configs), scramble=True, seed=int(seed or 0))
    sobol.fast_forward(int(number))
    return sample_params(configs, sobol.draw(1, dtype=torch.float64)[0].tolist())


@dataclass(frozen=True)
class BayesianSampler:
    """Gaussian-process Bayesian optimisation on BoTorch.

    The first ``n_initial`` (default ``max(5, d + 2)`` for ``d`` parameters) successful
    trials come from a scrambled Sobol sequence (trial ``n`` takes Sobol point ``n``),
    as do asks while all observed values are equal (nothing to model yet). After that,
    every ask:

    1. encodes the successful trials into $[0,1]^D$ (:func:`rl2fx.tuning.space.encode`:
       log/int dimensions transformed, categoricals one-hot, inactive conditional
       parameters at their default), negating values when minimising, and (one
       objective) passes the standardised values $z$ through ``y_transform``, by default
       bilog $\\operatorname{sign}(z)\\log(1+|z|)$ (Eriksson & Poloczek, 2021): a
       monotone map that keeps a few extreme values from setting the model's scale;
    2. fits ``SingleTaskGP`` with BoTorch's defaults (RBF ARD kernel with the
       dimension-scaled log-normal lengthscale prior of Hvarfner et al., 2024,
       "Vanilla Bayesian optimization performs great in high dimensions", ICML),
       ``Normalize`` inputs and ``Standardize`` outcomes, in float64, by maximising the
       marginal likelihood (``fit_gpytorch_mll``). With ``warm_start`` the fit starts
       from the hyperparameters the previous ask stored in its trial's ``info["gp"]``
       (so a resumed study fits exactly as an uninterrupted one), and with
       ``refit_every = k > 1`` the hyperparameters are re-optimised only every ``k``
       model-based asks (the GP is still conditioned on all data). With one objective,
       nothing running and no categorical parameter, steps 2 and 3 run on
       :mod:`rl2fx.tuning._gp`, the same model and LogEI as dense torch operations
       (tested equal to BoTorch's), because gpytorch's per-call overhead dominates at
       tens of points;
    3. maximises the acquisition: analytic LogEI (Ament et al., 2023, "Unexpected
       improvements to expected improvement for Bayesian optimization", NeurIPS) over
       the incumbent $\\max_i \\mu(x_i)$ (the posterior mean at the observed points,
       robust to noise) when no trial is running, else qLogNoisyExpectedImprovement
       with the running trials as ``X_pending``, so parallel asks spread out instead of
       repeating the same point (``acquisition="qlognei"`` always uses the latter).
       Starting points: the best ``num_restarts`` of ``raw_samples`` Sobol points,
       Gaussian perturbations of the incumbent and the previous candidates, each then
       refined by L-BFGS-B (``gen_candidates_scipy``). Categoricals: with at most
       ``max_categorical_combos`` (4) combinations, each is optimised separately by
       BoTorch's ``optimize_acqf_mixed``; with more, the one-hot blocks are relaxed to
       [0, 1], optimised jointly with the continuous dimensions, and then every
       combination (up to ``max_enumerated_points``, else the arg-max of each block) is
       scored exactly at the optimum's continuous coordinates. A space with no
       continuous dimension is scored exhaustively.

    ``exploration_weight`` ($\\xi$) is the improvement margin of EI (Lizotte, 2008;
    the ``xi`` of GPyOpt/scikit-optimize): improvement is measured over the incumbent
    plus $\\xi \\sigma_y$, where $\\sigma_y$ is the standard deviation of the observed
    values,

    $$\\alpha(x) = \\log \\mathbb{E}\\big[\\max(f(x) - f^* - \\xi\\sigma_y, 0)\\big].$$

    Larger $\\xi$ discounts small, likely improvements near the incumbent relative to
    uncertain regions that could improve a lot (more exploration); $\\xi = 0$, the
    default, is plain (q)LogEI, which had the lowest regret on every benchmark problem
    (docs/tuning.md, "Levers").

    Failed trials are left out of the model. A candidate that rounds onto a point
    already tried or running (possible only with int/categorical parameters) is
    replaced by a random untried point, recorded as ``info["fallback"]``.
    """

    seed: int | None = None
    exploration_weight: float = 0.0
    n_initial: int | None = None
    num_restarts: int = 4
    raw_samples: int = 256
    mc_samples: int = 128
    max_categorical_combos: int = 4
    max_enumerated_points: int = 1024
    acquisition: str = "auto"
    warm_start: bool = True
    refit_every: int = 1
    local_starts: int = 0
    maxiter: int = 100
    xi_scale: str = "observed"
    gp_mean: str = "constant"
    y_transform: str = "bilog"
    name: str = field(default="bayesian", init=False)
    multi_objective: bool = field(default=True, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range("exploration_weight", self.exploration_weight, 0.0, None)
        if self.n_initial is not None:
            check_range("n_initial", self.n_initial, 2, None)
        check_range("num_restarts", self.num_restarts, 1, None)
        check_range("raw_samples", self.raw_samples, 1, None)
        check_choice("acquisition", self.acquisition, ACQUISITIONS)
        check_range("refit_every", self.refit_every, 1, None)
        check_range("local_starts", self.local_starts, 0, None)
        check_range("maxiter", self.maxiter, 1, None)
        check_choice("xi_scale", self.xi_scale, ("observed", "posterior"))
        check_choice("gp_mean", self.gp_mean, ("constant", "zero"))
        check_choice("y_transform", self.y_transform, Y_TRANSFORMS)

    def settings(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "exploration_weight": self.exploration_weight,
            "n_initial": self.n_initial,
            "num_restarts": self.num_restarts,
            "raw_samples": self.raw_samples,
            "mc_samples": self.mc_samples,
            "max_categorical_combos": self.max_categorical_combos,
            "max_enumerated_points": self.max_enumerated_points,
            "acquisition": self.acquisition,
            "warm_start": self.warm_start,
            "refit_every": self.refit_every,
            "local_starts": self.local_starts,
            "maxiter": self.maxiter,
            "xi_scale": self.xi_scale,
            "gp_mean": self.gp_mean,
            "y_transform": self.y_transform,
        }

    def n_initial_for(self, configs: Sequence[HyperparameterConfig]) -> int:
        return self.n_initial if self.n_initial is not None else max(5, len(configs) + 2)

    def sample(self, configs, finished, pending, number, maximize):  # noqa: D102
        import torch

        xs, ys = _successful(finished, maximize)
        if len(xs) < self.n_initial_for(configs) or len({repr(y) for y in ys}) < 2:
            return _sobol_point(configs, self.seed, number), {"design": "sobol"}
        history = sorted([*finished, *pending], key=lambda t: t.number)
        prev = next((t.info for t in reversed(history) if isinstance(t.info.get("gp"), dict)), None)
        if self.y_transform != "none" and not isinstance(ys[0], list):
            ys = _transform_values(ys, self.y_transform)
        with torch.random.fork_rng():
            torch.manual_seed(int(np.random.SeedSequence([int(self.seed or 0), int(number)]).generate_state(1)[0]))
            params, acq_value, gp_info = self._optimize(configs, xs, ys, [t.params for t in pending], prev)
        used = {_params_key(t.params) for t in [*finished, *pending]}
        info: dict[str, Any] = {"design": "gp", "log_acq": acq_value, "gp": gp_info}
        if _params_key(params) in used:
            rng = np.random.default_rng([int(self.seed or 0), int(number), 1])
            for _ in range(1000):
                cand = sample_params(configs, rng.random(len(configs)))
                if _params_key(cand) not in used:
                    params = cand
                    info["fallback"] = "duplicate candidate replaced by a random untried point"
                    break
        return params, info

    def _fit(self, X, Y, D, prev):
        """SingleTaskGP on ``X`` (unit cube) and ``Y`` (``[n, m]``), warm-started from ``prev``."""
        import torch
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskGP
        from botorch.models.transforms import Normalize, Standardize
        from gpytorch.mlls import ExactMarginalLogLikelihood

        dt = X.dtype
        bounds = torch.stack([torch.zeros(D, dtype=dt), torch.ones(D, dtype=dt)])
        model = SingleTaskGP(
            X, Y, input_transform=Normalize(d=D, bounds=bounds), outcome_transform=Standardize(m=Y.shape[-1])
        )
        warm = self.warm_start and prev is not None and _load_hypers(model, prev["gp"].get("hypers", {}))
        age = int(prev["gp"].get("age", 0)) + 1 if warm else 0
        refit = not warm or age >= self.refit_every
        if refit:
            mll = ExactMarginalLogLikelihood(model.likelihood, model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if warm:
                    # One adding a point moves the optimum a little: a single L-BFGS-B run
                    # from the previous optimum with ftol 1e-6 reaches it (docs/tuning.md,
                    # "Levers": 10x faster than fit_gpytorch_mll, same lengthscales to 2
                    # digits); fit_gpytorch_mll's tight default tolerance ends warm starts
                    # in an "ABNORMAL" line-search warning, which it answers by restarting
                    # from prior samples, i.e. by paying for a cold fit.
                    from botorch.optim.fit import fit_gpytorch_mll_scipy

                    mll.train()
                    try:
                        fit_gpytorch_mll_scipy(mll, options={"ftol": 1e-6, "maxiter": 200})
                    except Exception:  # noqa: BLE001 - a failed warm fit falls back to the full fit
                        fit_gpytorch_mll(mll)
                else:
                    fit_gpytorch_mll(mll)
            age = 0
        model.eval()
        hypers = {n: p.detach().reshape(-1).tolist() for n, p in model.named_parameters()}
        return model, {"hypers": hypers, "age": age, "refit": refit}

    def _fast_logei(self, configs, xs, ys, prev) -> tuple[dict[str, Any], float, dict[str, Any]]:
        """One objective, nothing running, no categoricals: the same model and LogEI as the
        BoTorch path, computed by :mod:`rl2fx.tuning._gp` (about ten times cheaper)."""
        import torch

        from rl2fx.tuning import _gp

        dt = torch.float64
        D = encoded_dim(configs)
        X = torch.tensor([encode(configs, p) for p in xs], dtype=dt)
        y = torch.tensor(ys, dtype=dt)
        init = _gp.hypers_from_botorch(prev["gp"].get("hypers", {}), D) if (self.warm_start and prev is not None) else None
        age = int(prev["gp"].get("age", 0)) + 1 if init is not None else 0
        refit = init is None or age >= self.refit_every
        # a cold fit converges tightly once; warm fits start next to the optimum
        gp = _gp.fit(X, y, init, ftol=1e-6 if init is not None else 1e-9, maxiter=200 if refit else 0,
                     zero_mean=self.gp_mean == "zero")
        age = 0 if refit else age
        with torch.no_grad():
            mean_obs = gp.mean(X)
        incumbent = X[int(mean_obs.argmax())]
        best_f = float(mean_obs.max())
        if self.xi_scale == "posterior":
            with torch.no_grad():
                best_f += self.exploration_weight * float(gp.mean_std(incumbent.unsqueeze(0))[1])
        elif len(ys) > 1:
            best_f += self.exploration_weight * float(y.std())
        starts = self._starts(X, incumbent, D, lambda c: _gp.log_ei(gp, c, best_f))
        cands, vals = _gp.maximize_log_ei(gp, best_f, starts, self.maxiter)
        best = int(vals.argmax())
        return decode(configs, cands[best].tolist()), float(vals[best]), {"hypers": gp.hypers(), "age": age, "refit": refit}

    def _starts(self, X, incumbent, D, acq_fn):
        """Starting points of the multi-start optimiser: the best ``num_restarts`` of
        ``raw_samples`` Sobol points, the incumbent, the last three observations and
        ``local_starts`` Gaussian perturbations (sd 0.05) of each of those."""
        import torch

        # local starts refine the region the model already believes in, which purely
        # global starts often miss in 6+ dimensions
        dt = X.dtype
        sob = torch.quasirandom.SobolEngine(D, scramble=True).draw(self.raw_samples, dtype=dt)
        centres = torch.cat([incumbent.unsqueeze(0), X[-min(3, X.shape[0]) :]])
        extra = [centres]
        if self.local_starts:
            reps = centres.repeat_interleave(self.local_starts, 0)
            extra.append((reps + 0.05 * torch.randn_like(reps)).clamp(0, 1))
        cand = torch.cat([sob, *extra])
        with torch.no_grad():
            vals = acq_fn(cand)
        return cand[vals.topk(min(self.num_restarts, vals.numel())).indices]

    def _optimize(self, configs, xs, ys, pending_params, prev) -> tuple[dict[str, Any], float, dict[str, Any]]:
        import itertools

        import torch
        from botorch.acquisition.analytic import LogExpectedImprovement
        from botorch.generation.gen import gen_candidates_scipy
        from botorch.optim import optimize_acqf_mixed
        from botorch.sampling import SobolQMCNormalSampler

        single = not isinstance(ys[0], list)
        if (
            single
            and not pending_params
            and self.acquisition in ("auto", "logei")
            and all(c.is_numeric for c in configs)
        ):
            return self._fast_logei(configs, xs, ys, prev)
        dt = torch.float64
        D = encoded_dim(configs)
        X = torch.tensor([encode(configs, p) for p in xs], dtype=dt)
        Y = torch.tensor(ys, dtype=dt)
        Y = Y.unsqueeze(-1) if Y.ndim == 1 else Y
        bounds = torch.stack([torch.zeros(D, dtype=dt), torch.ones(D, dtype=dt)])
        model, gp_info = self._fit(X, Y, D, prev)
        X_pending = torch.tensor([encode(configs, p) for p in pending_params], dtype=dt) if pending_params else None
        xi = self.exploration_weight * float(Y.std()) if len(ys) > 1 else 0.0
        with torch.no_grad():
            mean_obs = model.posterior(X).mean
        if Y.shape[-1] > 1:
            from botorch.acquisition.multi_objective.logei import (
                qLogNoisyExpectedHypervolumeImprovement,
            )
            from botorch.utils.multi_objective.hypervolume import infer_reference_point

            # qLogNEHVI (Daulton et al., 2021; Ament et al., 2023) with the reference
            # point BoTorch infers from the observed front (its nadir, pushed out by 10 %)
            incumbent = X[-1]
            acq = qLogNoisyExpectedHypervolumeImprovement(
                model=model,
                ref_point=infer_reference_point(Y).tolist(),
                X_baseline=X,
                X_pending=X_pending,
                sampler=SobolQMCNormalSampler(sample_shape=torch.Size([self.mc_samples])),
                prune_baseline=True,
            )
        elif self.acquisition == "logei" or (self.acquisition == "auto" and X_pending is None):
            mean_obs = mean_obs.squeeze(-1)
            incumbent = X[int(mean_obs.argmax())]
            if self.xi_scale == "posterior":
                with torch.no_grad():
                    xi = self.exploration_weight * float(model.posterior(incumbent.unsqueeze(0)).variance.sqrt())
            acq = LogExpectedImprovement(model=model, best_f=float(mean_obs.max()) + xi)
        else:
            incumbent = X[int(mean_obs.squeeze(-1).argmax())]
            acq = ExplorationLogNEI(
                model=model,
                X_baseline=X,
                X_pending=X_pending,
                sampler=SobolQMCNormalSampler(sample_shape=torch.Size([self.mc_samples])),
                xi=xi,
                prune_baseline=True,
            )
        # categorical one-hot column groups
        groups: list[list[int]] = []
        i = 0
        for c in configs:
            if c.is_numeric:
                i += 1
            else:
                groups.append(list(range(i, i + len(c.choices))))
                i += len(c.choices)
        n_combos = math.prod(len(g) for g in groups)
        opts = {"batch_limit": 8, "maxiter": self.maxiter}

        def all_combos() -> list[dict[int, float]]:
            out = []
            for combo in itertools.product(*groups):
                fixed = {j: 0.0 for g in groups for j in g}
                fixed.update({j: 1.0 for j in combo})
                out.append(fixed)
            return out

        def initial_conditions() -> torch.Tensor:
            return self._starts(X, incumbent, D, lambda c: acq(c.unsqueeze(-2))).unsqueeze(-2)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if groups and len(all_combos()[0]) == D and n_combos <= self.max_enumerated_points:
                # nothing continuous: score every combination exactly
                cands = torch.tensor([[f[j] for j in range(D)] for f in all_combos()], dtype=dt)
                with torch.no_grad():
                    vals = acq(cands.unsqueeze(-2))
                best = int(vals.argmax())
                cand, val = cands[best : best + 1], vals[best]
            elif groups and n_combos <= self.max_categorical_combos:
                cand, val = optimize_acqf_mixed(
                    acq, bounds=bounds, q=1, num_restarts=self.num_restarts,
                    raw_samples=self.raw_samples, fixed_features_list=all_combos(), options=opts,
                )
            else:
                starts = initial_conditions()
                cands, vals = gen_candidates_scipy(starts, acq, lower_bounds=0.0, upper_bounds=1.0,
                                                   options={"maxiter": self.maxiter})
                best = int(vals.argmax())
                cand, val = cands[best].reshape(1, D), vals[best]
                if groups and n_combos <= self.max_enumerated_points:
                    # relaxed one-hot optimum: keep its continuous part, score every combination there
                    cands = cand.repeat(n_combos, 1)
                    for r, fixed in enumerate(all_combos()):
                        for j, v in fixed.items():
                            cands[r, j] = v
                    with torch.no_grad():
                        vals = acq(cands.unsqueeze(-2))
                    best = int(vals.argmax())
                    cand, val = cands[best : best + 1], vals[best]
        return decode(configs, cand[0].tolist()), float(val), gp_info


Y_TRANSFORMS = ("none", "bilog", "log_worse")


def _transform_values(ys: Sequence[float], how: str) -> list[float]:
    """A monotone transform of the standardised values $z$ (maximised) before the GP.

    ``"bilog"``: $\\operatorname{sign}(z)\\log(1 + |z|)$ (Eriksson & Poloczek, 2021,
    SCBO). ``"log_worse"``: $z$ for $z \\ge 0$, $-\\log(1 - z)$ below: only the
    worse-than-average tail is compressed, in the spirit of Ax's winsorization of bad
    outcomes, so a few catastrophic values (Branin's 300s beside an optimum of 0.4)
    no longer set the scale of the model while the good end, where the optimum is
    chosen, stays linear.
    """
    a = np.asarray(ys, dtype=np.float64)
    sd = a.std(ddof=1) if a.size > 1 else 1.0
    z = (a - a.mean()) / (sd if sd > 0 else 1.0)
    if how == "bilog":
        return (np.sign(z) * np.log1p(np.abs(z))).tolist()
    return np.where(z >= 0, z, -np.log1p(-np.minimum(z, 0.0))).tolist()


def _load_hypers(model, hypers: Mapping[str, Sequence[float]]) -> bool:
    """Copy stored raw hyperparameters into ``model`` when every shape matches."""
    import torch

    params = dict(model.named_parameters())
    if set(params) != set(hypers):
        return False
    for name, p in params.items():
        if p.numel() != len(hypers[name]):
            return False
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.tensor(hypers[name], dtype=p.dtype).reshape(p.shape))
    return True


def _xi_log_nei_class():
    from botorch.acquisition.logei import qLogNoisyExpectedImprovement

    class _ExplorationLogNEI(qLogNoisyExpectedImprovement):
        """qLogNEI whose incumbent is raised by a margin ``xi`` (EI's exploration parameter)."""

        def __init__(self, *args: Any, xi: float = 0.0, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.xi = float(xi)

        def compute_best_f(self, obj):  # type: ignore[override]
            return super().compute_best_f(obj) + self.xi

    return _ExplorationLogNEI


def ExplorationLogNEI(*args: Any, xi: float = 0.0, **kwargs: Any):
    """``qLogNoisyExpectedImprovement`` with improvement measured over ``best_f + xi``.

    BoTorch is imported only when this is first called, which keeps ``import rl2fx`` light.
    With ``xi=0`` it equals ``qLogNoisyExpectedImprovement`` exactly.
    """
    global _EXPLORATION_CLS
    if _EXPLORATION_CLS is None:
        _EXPLORATION_CLS = _xi_log_nei_class()
    return _EXPLORATION_CLS(*args, xi=xi, **kwargs)


_EXPLORATION_CLS = None


@dataclass(frozen=True)
class SkoptSampler:
    """scikit-optimize's ask/tell ``Optimizer`` as a second Bayesian backend.

    A GP (Matérn-5/2, ``base_estimator="GP"``) with expected improvement
    (``acq_func="EI"``) after ``n_initial`` (default ``max(5, 2 d)``) Sobol points;
    ``xi = exploration_weight * std(observed values)``, the same margin as
    :class:`BayesianSampler`. The optimizer is rebuilt from the history on each ask
    (stateless, hence resumable); running trials are told with the constant liar
    ``min(y)`` (skopt's ``"cl_min"`` strategy), so parallel asks differ.
    """

    seed: int | None = None
    exploration_weight: float = 0.1
    n_initial: int | None = None
    name: str = field(default="skopt", init=False)
    multi_objective: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range("exploration_weight", self.exploration_weight, 0.0, None)

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "exploration_weight": self.exploration_weight, "n_initial": self.n_initial}

    @staticmethod
    def _space(configs):
        from skopt.space import Categorical, Integer, Real

        dims = []
        for c in configs:
            if c.type == "float":
                dims.append(Real(c.low, c.high, prior="log-uniform" if c.log else "uniform", name=c.name))
            elif c.type == "int":
                dims.append(Integer(c.low, c.high, prior="log-uniform" if c.log else "uniform", name=c.name))
            else:
                # categories by index: skopt compares values with numpy, which conflates 1 and True
                dims.append(Categorical(list(range(len(c.choices))), name=c.name))
        return dims

    @staticmethod
    def _to_skopt(configs, params):
        # an absent conditional parameter is told at its default (the encoding's imputation)
        vals = [params.get(c.name, c.default) for c in configs]
        return [v if c.is_numeric else c.index_of(v) for c, v in zip(configs, vals, strict=True)]

    def sample(self, configs, finished, pending, number, maximize):  # noqa: D102
        from skopt import Optimizer

        xs, ys = _successful(finished, maximize)
        y_min = [-y for y in ys]  # skopt minimises
        xi = self.exploration_weight * float(np.std(y_min)) if len(ys) > 1 else 0.0
        opt = Optimizer(
            self._space(configs),
            base_estimator="GP",
            acq_func="EI",
            acq_func_kwargs={"xi": xi},
            n_initial_points=_n_initial(configs, self.n_initial),
            initial_point_generator="sobol",
            random_state=int(self.seed or 0),
        )
        told_x = [self._to_skopt(configs, p) for p in xs]
        told_y = list(y_min)
        if pending:
            lie = min(y_min) if y_min else 0.0
            told_x += [self._to_skopt(configs, t.params) for t in pending]
            told_y += [lie] * len(pending)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if told_x:
                opt.tell(told_x, told_y)
            x = opt.ask()
        out: dict[str, Any] = {}
        for c, v in zip(configs, x, strict=True):
            v = v.item() if hasattr(v, "item") else v
            if c.type == "float":
                out[c.name] = float(min(max(v, c.low), c.high))
            elif c.type == "int":
                out[c.name] = int(v)
            else:
                out[c.name] = c.choices[int(v)]
        return active_params(configs, out), {}


SAMPLERS = ("random", "grid", "bayesian", "skopt")


def make_sampler(
    optimizer_type: str,
    *,
    seed: int | None = None,
    grid_size: int = 10,
    exploration_weight: float | None = None,
    **options: Any,
):
    """Build a sampler by name (``"random"``, ``"grid"``, ``"bayesian"``, ``"skopt"``).

    >>> make_sampler("grid", grid_size=3).grid_size
    3
    >>> make_sampler("tpe")
    Traceback (most recent call last):
    ...
    ValueError: optimizer_type must be one of ['random', 'grid', 'bayesian', 'skopt'], got 'tpe'
    """
    check_choice("optimizer_type", optimizer_type, SAMPLERS)
    if optimizer_type == "random":
        return RandomSampler(seed=seed, **options)
    if optimizer_type == "grid":
        return GridSampler(grid_size=grid_size, seed=seed, **options)
    # None: the sampler's own default (0.0 for "bayesian", 0.1 for "skopt")
    xi = {} if exploration_weight is None else {"exploration_weight": exploration_weight}
    if optimizer_type == "bayesian":
        return BayesianSampler(seed=seed, **xi, **options)
    return SkoptSampler(seed=seed, **xi, **options)
