"""Samplers: grid enumeration, seeded random search, BoTorch and skopt Bayesian search."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from rl2fx import HyperparameterConfig, Study
from rl2fx.tuning.samplers import (
    BayesianSampler,
    ExplorationLogNEI,
    GridSampler,
    RandomSampler,
    SkoptSampler,
    StudyExhausted,
    make_sampler,
)
from rl2fx.tuning.space import encode


def _run(study: Study, fn, n: int):
    for _ in range(n):
        t = study.ask()
        study.tell(t, fn(t.params))
    return study


# ----------------------------------------------------------------------------- grid
def test_grid_enumerates_exactly_in_lexicographic_order():
    cs = [
        HyperparameterConfig("lr", "float", low=1e-4, high=1e-1, log=True),
        HyperparameterConfig("clip", "float", low=0.1, high=0.3),
        HyperparameterConfig("opt", "categorical", choices=["adam", "sgd"]),
        HyperparameterConfig("flag", "bool"),
    ]
    g = 4
    # independent reference: numpy spacing and itertools.product (last factor fastest)
    axes = [np.geomspace(1e-4, 1e-1, g).tolist(), np.linspace(0.1, 0.3, g).tolist(), ["adam", "sgd"], [False, True]]
    expected = list(itertools.product(*axes))
    study = Study(cs, GridSampler(grid_size=g))
    got = []
    for _ in range(len(expected)):
        t = study.ask()
        got.append(tuple(t.params[c.name] for c in cs))
        study.tell(t, 0.0)
    assert len(got) == len(expected) == 64
    for a, b in zip(got, expected, strict=True):
        assert a[0] == pytest.approx(b[0], rel=1e-9) and a[1] == pytest.approx(b[1], rel=1e-9)
        assert a[2:] == b[2:]
    assert len(set(got)) == len(got)
    with pytest.raises(StudyExhausted, match=r"all 64 grid points \(grid_size=4\)"):
        study.ask()


def test_grid_ints_deduplicate_and_parallel_asks_are_distinct():
    cs = [HyperparameterConfig("epochs", "int", low=1, high=3), HyperparameterConfig("x", "float", low=0.0, high=1.0)]
    study = Study(cs, "grid", grid_size=10)
    assert study.sampler.size(cs) == 30
    pending = [study.ask() for _ in range(30)]  # all asked before any tell: no repeats
    assert len({(t.params["epochs"], t.params["x"]) for t in pending}) == 30
    with pytest.raises(StudyExhausted):
        study.ask()
    # a failed grid point is not retried, a lost (never told) one is: see test_tuning_study


def test_grid_size_validated():
    with pytest.raises(ValueError, match="grid_size must be in"):
        GridSampler(grid_size=1)
    with pytest.raises(ValueError, match="grid_size must be an integer"):
        GridSampler(grid_size=2.5)


# ----------------------------------------------------------------------------- random
SPACE = [
    HyperparameterConfig("lr", "float", low=1e-6, high=1e-2, log=True),
    HyperparameterConfig("clip", "float", low=0.1, high=0.3),
    HyperparameterConfig("epochs", "int", low=1, high=4),
    HyperparameterConfig("opt", "categorical", choices=["adam", "sgd", "lion"]),
    HyperparameterConfig("flag", "bool"),
]


def _params(study, n):
    out = []
    for _ in range(n):
        t = study.ask()
        out.append(t.params)
        study.tell(t, 1.0)
    return out


def test_random_is_reproducible_by_seed():
    a = _params(Study(SPACE, "random", seed=7), 20)
    b = _params(Study(SPACE, "random", seed=7), 20)
    c = _params(Study(SPACE, "random", seed=8), 20)
    assert a == b
    assert a != c


def test_random_depends_only_on_seed_and_number():
    s = RandomSampler(seed=3)
    p5 = s.sample(SPACE, [], [], 5, True)[0]
    study = Study(SPACE, RandomSampler(seed=3))
    asked = [study.ask() for _ in range(6)]  # six in flight at once
    assert asked[5].params == p5


def test_random_log_uniform_distribution():
    s = RandomSampler(seed=0)
    lrs = np.array([s.sample(SPACE, [], [], n, True)[0]["lr"] for n in range(2000)])
    u = (np.log10(lrs) + 6) / 4
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    assert lrs.min() >= 1e-6 and lrs.max() <= 1e-2


# ----------------------------------------------------------------------------- bayesian
def _quadratic(p):
    return (p["x0"] - 0.7) ** 2 + (p["x1"] - 0.2) ** 2


BOX = [HyperparameterConfig("x0", "float", low=0.0, high=1.0), HyperparameterConfig("x1", "float", low=0.0, high=1.0)]


def test_bayesian_reproducible_and_beats_random_on_a_quadratic():
    fast = dict(n_initial=5, num_restarts=2, raw_samples=64)
    b1 = _run(Study(BOX, "bayesian", maximize=False, seed=0, **fast), _quadratic, 12)
    b2 = _run(Study(BOX, "bayesian", maximize=False, seed=0, **fast), _quadratic, 12)
    assert [t.params for t in b1.trials] == [t.params for t in b2.trials]
    assert [t.info["design"] for t in b1.trials] == ["sobol"] * 5 + ["gp"] * 7
    r = _run(Study(BOX, "random", maximize=False, seed=0), _quadratic, 12)
    assert b1.best_value < r.best_value
    assert b1.best_value < 1e-2


def test_bayesian_parallel_asks_do_not_repeat_points():
    study = _run(Study(BOX, "bayesian", maximize=False, seed=1, n_initial=5, num_restarts=2, raw_samples=64), _quadratic, 6)
    asked = [study.ask() for _ in range(4)]
    assert all(t.info["design"] == "gp" for t in asked)
    z = np.array([encode(BOX, t.params) for t in asked])
    d = np.linalg.norm(z[:, None] - z[None], axis=-1)[np.triu_indices(4, 1)]
    assert d.min() > 1e-3
    # without the pending points the model proposes (nearly) the same point again
    s = study.sampler
    alone = [s.sample(BOX, study.trials, [], 50 + k, False)[0] for k in range(2)]
    za = np.array([encode(BOX, p) for p in alone])
    assert np.linalg.norm(za[0] - za[1]) < d.min()


def test_bayesian_maximize_and_minimize_agree():
    fast = dict(n_initial=5, num_restarts=2, raw_samples=64)
    mx = _run(Study(BOX, "bayesian", maximize=True, seed=2, **fast), lambda p: -_quadratic(p), 9)
    mn = _run(Study(BOX, "bayesian", maximize=False, seed=2, **fast), _quadratic, 9)
    assert [t.params for t in mx.trials] == [t.params for t in mn.trials]


def test_exploration_weight_is_the_improvement_margin():
    from botorch.acquisition.logei import qLogNoisyExpectedImprovement
    from botorch.models import SingleTaskGP
    from botorch.sampling import SobolQMCNormalSampler

    torch.manual_seed(0)
    X = torch.rand(10, 2, dtype=torch.float64)
    Y = torch.sin(6 * X).sum(-1, keepdim=True)
    model = SingleTaskGP(X, Y)
    Xq = torch.rand(32, 1, 2, dtype=torch.float64)

    def acq(cls, **kw):
        return cls(model=model, X_baseline=X, sampler=SobolQMCNormalSampler(torch.Size([64]), seed=0),
                   prune_baseline=False, cache_root=False, **kw)

    ref = acq(qLogNoisyExpectedImprovement)(Xq)
    a0 = acq(ExplorationLogNEI, xi=0.0)
    zero = a0(Xq)
    torch.testing.assert_close(zero, ref)
    obj = torch.zeros(64, 32, 1, dtype=torch.float64)
    prev = zero
    for xi in (0.05, 0.2, 1.0):
        a = acq(ExplorationLogNEI, xi=xi)
        cur = a(Xq)
        assert bool((cur < prev).all())  # a higher bar lowers every improvement
        diff = a.compute_best_f(obj) - a0.compute_best_f(obj)
        torch.testing.assert_close(diff, torch.full_like(diff, xi))
        prev = cur
    with pytest.raises(ValueError, match="exploration_weight must be in"):
        BayesianSampler(exploration_weight=-0.1)


def test_bayesian_mixed_space_with_enumerated_and_relaxed_categoricals():
    def f(p):
        bonus = {"adam": 0.0, "sgd": 1.0, "lion": 0.5}[p["opt"]]
        return (math.log10(p["lr"]) + 4) ** 2 + 0.1 * abs(p["epochs"] - 2) + bonus + (0.3 if p["flag"] else 0.0)

    for combos in (8, 1):  # 3 x 2 = 6 combos: optimize_acqf_mixed; limit 1: relaxed, then scored
        study = _run(Study(SPACE, "bayesian", maximize=False, seed=0, n_initial=6, num_restarts=2,
                           raw_samples=64, max_categorical_combos=combos), f, 9)
        assert sum(t.info["design"] == "gp" for t in study.trials) == 3
        assert len({repr(t.params) for t in study.trials}) == 9
        for t in study.trials:
            assert t.params["opt"] in ("adam", "sgd", "lion") and isinstance(t.params["epochs"], int)


def test_bayesian_all_discrete_space_never_repeats():
    cs = [HyperparameterConfig("a", "bool"), HyperparameterConfig("b", "categorical", choices=[1, 2, 3])]
    study = _run(Study(cs, "bayesian", seed=0, n_initial=2, num_restarts=2, raw_samples=16),
                 lambda p: float(p["a"]) + p["b"], 6)
    assert len({(t.params["a"], t.params["b"]) for t in study.trials}) == 6


def test_failed_trials_are_excluded_from_the_model():
    fast = dict(n_initial=5, num_restarts=2, raw_samples=64)
    study = Study(BOX, "bayesian", maximize=False, seed=0, **fast)
    for i in range(8):
        t = study.ask()
        study.tell(t, RuntimeError("diverged") if i % 3 == 0 else _quadratic(t.params))
    assert sum(t.state == "failed" for t in study.trials) == 3
    # 5 successes reached only at trial 7: the GP starts after that
    assert [t.info["design"] for t in study.trials] == ["sobol"] * 8
    t = study.ask()
    assert t.info["design"] == "gp"


# ----------------------------------------------------------------------------- skopt
def test_skopt_backend_mixed_space_reproducible_and_parallel():
    import skopt

    assert skopt.__version__  # imports with the installed numpy (2.x)

    def f(p):
        return (math.log10(p["lr"]) + 4) ** 2 + (p["clip"] - 0.2) ** 2 + (p["opt"] != "adam") + p["flag"]

    a = _run(Study(SPACE, "skopt", maximize=False, seed=0, n_initial=4), f, 7)
    b = _run(Study(SPACE, "skopt", maximize=False, seed=0, n_initial=4), f, 7)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    for t in a.trials:
        assert isinstance(t.params["flag"], bool) and isinstance(t.params["epochs"], int)
        assert isinstance(t.params["clip"], float)
    asked = [a.ask() for _ in range(3)]
    assert len({repr(t.params) for t in asked}) == 3


def test_make_sampler_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"optimizer_type must be one of \['random', 'grid', 'bayesian', 'skopt'\], got 'cmaes'"):
        make_sampler("cmaes")
    assert isinstance(make_sampler("skopt", seed=1), SkoptSampler)


def test_value_transforms_are_monotone_and_tame_outliers():
    from rl2fx.tuning.samplers import _transform_values

    ys = [0.1, 0.2, 0.4, 0.5, -300.0]
    for how in ("bilog", "log_worse"):
        t = _transform_values(ys, how)
        assert np.argsort(t).tolist() == np.argsort(ys).tolist()
        assert max(t) - min(t) < max(ys) - min(ys)
    # the fast path and the BoTorch path see the same transformed values; settings record it
    assert BayesianSampler().settings()["y_transform"] == "bilog"
    with pytest.raises(ValueError, match="y_transform must be one of"):
        BayesianSampler(y_transform="log")
