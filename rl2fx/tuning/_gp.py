"""A direct torch path for BoTorch's default ``SingleTaskGP``: marginal-likelihood fit
and analytic LogEI, for the one-objective, nothing-pending asks of the Bayesian sampler.

Why it exists: at tens of observations every gpytorch/BoTorch call spends milliseconds
in dispatch, lazy tensors and transform bookkeeping around a 30x30 Cholesky; one ask
makes about 80 such calls (40 marginal-likelihood evaluations in the fit, 40
acquisition evaluations in its optimisation). The same formulas written as a handful
of dense torch operations cost a tenth of that (docs/tuning.md, "Levers"). The model
is exactly BoTorch 0.18's ``SingleTaskGP`` default with ``Normalize`` on unit-cube
bounds (the identity) and ``Standardize``:

$$k(x, x') = \\exp\\big(-\\tfrac12 \\lVert (x - x') / \\ell \\rVert^2\\big),\\quad
\\ell_j \\sim \\mathrm{LogNormal}(\\sqrt2 + \\tfrac12\\log d, \\sqrt3),\\quad
\\sigma_n^2 \\sim \\mathrm{LogNormal}(-4, 1),$$

constant mean $c$, $\\ell_j \\ge 0.025$, $\\sigma_n^2 \\ge 10^{-4}$ (Hvarfner et al.,
2024), and the objective maximised is gpytorch's ``ExactMarginalLogLikelihood``: the
log evidence plus the log priors, divided by $n$. Tests check the likelihood, the
posterior and LogEI against BoTorch's to 1e-6; the hyperparameters are stored under
BoTorch's parameter names, so either path can warm-start the other.

>>> import torch
>>> X = torch.rand(8, 2, dtype=torch.float64); y = X.sum(-1)
>>> gp = fit(X, y)
>>> float(gp.mean(X[:1]) - y[0]) ** 2 < 1e-2
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["ExactGP", "fit", "log_ei", "hypers_to_botorch", "hypers_from_botorch"]

LS_MIN, NOISE_MIN = 0.025, 1e-4
NAMES = ("likelihood.noise_covar.raw_noise", "mean_module.raw_constant", "covar_module.raw_lengthscale")


def _lognormal_logpdf(x: Tensor, loc: float, scale: float) -> Tensor:
    lx = torch.log(x)
    return -lx - math.log(scale) - 0.5 * math.log(2 * math.pi) - (lx - loc) ** 2 / (2 * scale**2)


def _ls_prior(d: int) -> tuple[float, float]:
    return math.sqrt(2) + 0.5 * math.log(d), math.sqrt(3)


def _kernel(a: Tensor, b: Tensor, ls: Tensor) -> Tensor:
    a, b = a / ls, b / ls
    d2 = (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(-1)
    return torch.exp(-0.5 * d2)


def neg_mll(X: Tensor, ys: Tensor, ls: Tensor, noise: Tensor, c: Tensor) -> Tensor:
    """gpytorch's ``-ExactMarginalLogLikelihood`` of the default model (standardised ``ys``)."""
    n, d = X.shape
    K = _kernel(X, X, ls) + noise * torch.eye(n, dtype=X.dtype)
    L = torch.linalg.cholesky(K)
    r = (ys - c).unsqueeze(-1)
    alpha = torch.cholesky_solve(r, L)
    ll = -0.5 * (r * alpha).sum() - torch.log(torch.diagonal(L)).sum() - 0.5 * n * math.log(2 * math.pi)
    loc, scale = _ls_prior(d)
    lp = _lognormal_logpdf(ls, loc, scale).sum() + _lognormal_logpdf(noise, -4.0, 1.0).sum()
    return -(ll + lp) / n


@dataclass(frozen=True)
class ExactGP:
    """A fitted GP: training data, hyperparameters and the Cholesky factor, in raw units."""

    X: Tensor
    y_mean: float
    y_std: float
    ls: Tensor
    noise: float
    c: float
    L: Tensor
    alpha: Tensor

    def mean(self, x: Tensor) -> Tensor:
        k = _kernel(x, self.X, self.ls)
        return self.y_mean + self.y_std * (self.c + (k @ self.alpha).squeeze(-1))

    def mean_std(self, x: Tensor) -> tuple[Tensor, Tensor]:
        k = _kernel(x, self.X, self.ls)
        m = self.c + (k @ self.alpha).squeeze(-1)
        v = torch.linalg.solve_triangular(self.L, k.transpose(-1, -2), upper=False)
        var = (1.0 - v.pow(2).sum(-2)).clamp_min(1e-12)  # BoTorch's LogEI clamps the same way
        return self.y_mean + self.y_std * m, self.y_std * var.sqrt()

    def hypers(self) -> dict[str, list[float]]:
        """Hyperparameters under BoTorch's parameter names (raw = constrained in 0.18)."""
        return {NAMES[0]: [self.noise], NAMES[1]: [self.c], NAMES[2]: self.ls.tolist()}


def hypers_from_botorch(h: Mapping[str, Sequence[float]], d: int) -> tuple[list[float], float, float] | None:
    """``(lengthscales, noise, constant)`` from stored BoTorch names, or ``None`` if they do not fit."""
    if set(h) != set(NAMES) or len(h[NAMES[2]]) != d:
        return None
    return list(h[NAMES[2]]), float(h[NAMES[0]][0]), float(h[NAMES[1]][0])


def hypers_to_botorch(gp: ExactGP) -> dict[str, list[float]]:
    return gp.hypers()


def _standardize(y: Tensor) -> tuple[Tensor, float, float]:
    mu = float(y.mean())
    sd = float(y.std()) if y.numel() > 1 else 1.0
    if not sd >= 1e-8:  # Standardize's min_stdv
        sd = 1.0
    return (y - mu) / sd, mu, sd


def fit(
    X: Tensor,
    y: Tensor,
    init: tuple[Sequence[float], float, float] | None = None,
    *,
    ftol: float = 1e-6,
    maxiter: int = 200,
    zero_mean: bool = False,
) -> ExactGP:
    """Maximise the marginal likelihood with L-BFGS-B from ``init`` (lengthscales, noise,
    constant; default: the priors' modes and 0, BoTorch's initial values)."""
    from scipy.optimize import minimize

    X = X.to(torch.float64)
    n, d = X.shape
    ys, mu, sd = _standardize(y.to(torch.float64))
    if init is None:
        loc, scale = _ls_prior(d)
        init = ([math.exp(loc - scale**2)] * d, math.exp(-4.0 - 1.0), 0.0)
    x0 = np.array([*init[0], init[1], init[2]], dtype=np.float64)
    x0[:d] = np.maximum(x0[:d], LS_MIN)
    x0[d] = max(x0[d], NOISE_MIN)
    if zero_mean:
        x0[d + 1] = 0.0

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        try:
            loss = neg_mll(X, ys, t[:d], t[d], t[d + 1])
        except torch.linalg.LinAlgError:
            return 1e10, np.zeros_like(theta)
        (g,) = torch.autograd.grad(loss, t)
        return float(loss), g.numpy()

    theta = x0
    if maxiter > 0:  # maxiter=0: condition on the data with the given hyperparameters
        bounds = [(LS_MIN, None)] * d + [(NOISE_MIN, None), (0.0, 0.0) if zero_mean else (None, None)]
        res = minimize(f, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"ftol": ftol, "maxiter": maxiter})
        if np.isfinite(res.fun) and res.fun < 1e9:
            theta = res.x
    ls = torch.tensor(theta[:d], dtype=torch.float64)
    noise, c = float(theta[d]), float(theta[d + 1])
    K = _kernel(X, X, ls) + noise * torch.eye(n, dtype=torch.float64)
    L = torch.linalg.cholesky(K)
    alpha = torch.cholesky_solve((ys - c).unsqueeze(-1), L)
    return ExactGP(X=X, y_mean=mu, y_std=sd, ls=ls, noise=noise, c=c, L=L, alpha=alpha)


def log_ei(gp: ExactGP, x: Tensor, best_f: float) -> Tensor:
    """Analytic LogEI (Ament et al., 2023) at ``x`` ``[..., d]``: BoTorch's ``_log_ei_helper``
    of $u = (\\mu - f^*)/\\sigma$ plus $\\log\\sigma$."""
    from botorch.acquisition.analytic import _log_ei_helper

    m, s = gp.mean_std(x)
    return _log_ei_helper((m - best_f) / s) + torch.log(s)


def maximize_log_ei(gp: ExactGP, best_f: float, starts: Tensor, maxiter: int) -> tuple[Tensor, Tensor]:
    """L-BFGS-B from each row of ``starts`` ``[r, d]`` within the unit cube, with
    BoTorch's batched L-BFGS-B: one torch evaluation serves every start still running,
    and each start stops on its own convergence test (a joint run on the sum would
    share one line search and one stopping test, and stop early for some starts)."""
    from botorch.optim.batched_lbfgs_b import fmin_l_bfgs_b_batched

    r, d = starts.shape

    def f(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = torch.tensor(z.reshape(-1, d), dtype=torch.float64, requires_grad=True)
        vals = -log_ei(gp, t, best_f)
        (g,) = torch.autograd.grad(vals.sum(), t)
        return vals.detach().numpy(), g.numpy()

    xs, _, _ = fmin_l_bfgs_b_batched(f, starts.detach().numpy().reshape(r, d), bounds=[(0.0, 1.0)] * d, maxiter=maxiter)
    x = torch.tensor(np.asarray(xs).reshape(r, d), dtype=torch.float64).clamp(0, 1)
    with torch.no_grad():
        return x, log_ei(gp, x, best_f)
