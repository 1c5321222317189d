"""The direct torch GP path equals BoTorch's default SingleTaskGP (likelihood, posterior, LogEI)."""

from __future__ import annotations

import torch

from rl2fx.tuning import _gp


def _botorch(X, y, hypers):
    from botorch.models import SingleTaskGP
    from botorch.models.transforms import Normalize, Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    d = X.shape[1]
    bounds = torch.stack([torch.zeros(d, dtype=X.dtype), torch.ones(d, dtype=X.dtype)])
    m = SingleTaskGP(X, y.unsqueeze(-1), input_transform=Normalize(d=d, bounds=bounds), outcome_transform=Standardize(m=1))
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.tensor(hypers[name], dtype=p.dtype).reshape(p.shape))
    return m, ExactMarginalLogLikelihood(m.likelihood, m)


def test_likelihood_posterior_and_log_ei_match_botorch():
    from botorch.acquisition.analytic import LogExpectedImprovement

    g = torch.Generator().manual_seed(0)
    X = torch.rand(15, 3, generator=g, dtype=torch.float64)
    y = torch.sin(5 * X).sum(-1) + 0.05 * torch.randn(15, generator=g, dtype=torch.float64)
    gp = _gp.fit(X, y)
    m, mll = _botorch(X, y, gp.hypers())
    # BoTorch's objective at the same hyperparameters
    m.train()
    out = m(*m.train_inputs)
    ref = -mll(out, m.train_targets)
    ys = (y - y.mean()) / y.std()
    mine = _gp.neg_mll(X, ys, gp.ls, torch.tensor(gp.noise, dtype=torch.float64), torch.tensor(gp.c, dtype=torch.float64))
    torch.testing.assert_close(mine, ref.reshape(()), rtol=1e-8, atol=1e-8)
    m.eval()
    Xq = torch.rand(20, 3, generator=g, dtype=torch.float64)
    post = m.posterior(Xq)
    mu, sd = gp.mean_std(Xq)
    torch.testing.assert_close(mu, post.mean.squeeze(-1), rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(sd, post.variance.squeeze(-1).clamp_min(1e-12).sqrt(), rtol=1e-6, atol=1e-8)
    best = float(y.max())
    torch.testing.assert_close(_gp.log_ei(gp, Xq, best), LogExpectedImprovement(m, best_f=best)(Xq.unsqueeze(-2)),
                               rtol=1e-6, atol=1e-8)


def test_fit_reaches_botorchs_optimum_and_warm_starts():
    from botorch.fit import fit_gpytorch_mll

    g = torch.Generator().manual_seed(1)
    X = torch.rand(20, 4, generator=g, dtype=torch.float64)
    y = torch.cos(3 * X[:, 0]) + X[:, 1] ** 2
    gp = _gp.fit(X, y, ftol=1e-12, maxiter=1000)
    m, mll = _botorch(X, y, gp.hypers())
    fit_gpytorch_mll(mll)
    m.train()
    ref = float(-mll(m(*m.train_inputs), m.train_targets))
    ys = (y - y.mean()) / y.std()
    mine = float(_gp.neg_mll(X, ys, gp.ls, torch.tensor(gp.noise, dtype=torch.float64), torch.tensor(gp.c, dtype=torch.float64)))
    assert mine <= ref + 1e-4  # at least as good an optimum as fit_gpytorch_mll's
    warm = _gp.fit(X, y, init=_gp.hypers_from_botorch(gp.hypers(), 4))
    torch.testing.assert_close(warm.ls, gp.ls, rtol=1e-3, atol=1e-3)
    assert _gp.hypers_from_botorch(gp.hypers(), 5) is None
