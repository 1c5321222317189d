"""Mixed and conditional search spaces under every sampler."""

from __future__ import annotations

import math

import pytest

from rl2fx import HyperparameterConfig
from rl2fx.tuning import Study
from rl2fx.tuning.samplers import GridSampler
from rl2fx.tuning.space import (
    active_params,
    as_configs,
    decode,
    default_params,
    encode,
    validate_params,
)

SPACE = [
    HyperparameterConfig("estimator", "categorical", choices=["svm", "tree", "linear"]),
    HyperparameterConfig("C", "float", low=1e-2, high=1e2, log=True, condition={"estimator": "svm"}),
    HyperparameterConfig("depth", "int", low=1, high=3, condition={"estimator": ["tree"]}),
    HyperparameterConfig("lr", "float", low=1e-4, high=1e-1, log=True),
    HyperparameterConfig("batch", "int", low=8, high=64, log=True),
]


def _check(params):
    assert ("C" in params) == (params["estimator"] == "svm")
    assert ("depth" in params) == (params["estimator"] == "tree")
    validate_params(SPACE, params)
    assert isinstance(params["batch"], int) and 8 <= params["batch"] <= 64
    if "depth" in params:
        assert isinstance(params["depth"], int)


def objective(p):
    base = {"svm": (math.log10(p.get("C", 1.0)) - 1) ** 2, "tree": abs(p.get("depth", 0) - 2), "linear": 1.5}[p["estimator"]]
    return base + (math.log10(p["lr"]) + 2) ** 2 + 0.01 * abs(math.log2(p["batch"]) - 5)


def test_conditional_config_validation_names_the_problem():
    est = SPACE[0]
    cases = [
        ([est, HyperparameterConfig("C", "float", low=0.1, high=1.0, condition={"model": "svm"})], "there is no parameter 'model'"),
        ([est, HyperparameterConfig("C", "float", low=0.1, high=1.0, condition={"estimator": "knn"})], r"\['knn'\] are not choices of 'estimator'"),
        ([HyperparameterConfig("a", "float", low=0.0, high=1.0),
          HyperparameterConfig("C", "float", low=0.1, high=1.0, condition={"a": 0.5})], "a condition's parent must be categorical or bool"),
        ([est, HyperparameterConfig("k", "categorical", choices=["x", "y"], condition={"estimator": "svm"}),
          HyperparameterConfig("C", "float", low=0.1, high=1.0, condition={"k": "x"})], "'k' is itself conditional"),
    ]
    for cfgs, match in cases:
        with pytest.raises(ValueError, match=match):
            as_configs(cfgs)
    with pytest.raises(ValueError, match="condition must be a one-entry dict"):
        HyperparameterConfig("C", "float", low=0.1, high=1.0, condition={"a": 1, "b": 2})
    with pytest.raises(ValueError, match="condition must name another parameter"):
        HyperparameterConfig("C", "float", low=0.1, high=1.0, condition={"C": 1})


def test_encoding_imputes_defaults_and_decoding_drops_inactive():
    p = {"estimator": "tree", "depth": 3, "lr": 1e-2, "batch": 16}
    u = encode(SPACE, p)
    assert len(u) == 3 + 1 + 1 + 1 + 1
    assert u[3] == pytest.approx(SPACE[1].to_unit(SPACE[1].default))  # C at its default
    back = decode(SPACE, u)
    assert set(back) == set(p) and back["depth"] == 3 and back["estimator"] == "tree"
    assert default_params(SPACE) == {"estimator": "svm", "C": pytest.approx(1.0), "lr": pytest.approx(10 ** -2.5), "batch": 23}
    assert active_params(SPACE, {**p, "C": 3.0}) == p
    with pytest.raises(ValueError, match="params must have exactly the keys"):
        validate_params(SPACE, {**p, "C": 3.0})  # an inactive parameter may not be given


@pytest.mark.parametrize("sampler", ["random", "skopt", "bayesian"])
def test_every_sampler_handles_conditional_mixed_spaces(sampler):
    opts = {"bayesian": dict(n_initial=6, num_restarts=2, raw_samples=64), "skopt": dict(n_initial=5)}.get(sampler, {})
    study = Study(SPACE, sampler, maximize=False, seed=0, **opts)
    for _ in range(10):
        t = study.ask()
        _check(t.params)
        study.tell(t, objective(t.params))
    assert {t.params["estimator"] for t in study.trials} >= {"svm", "tree"}
    if sampler == "bayesian":
        assert study.trials[-1].info["design"] == "gp"


def test_grid_enumerates_each_conditional_configuration_once():
    cs = [SPACE[0], SPACE[1], SPACE[2]]
    g = GridSampler(grid_size=3)
    assert g.size(cs) == 3 + 3 + 1  # svm x 3 C values, tree x 3 depths, linear
    study = Study(cs, g)
    seen = []
    while True:
        try:
            t = study.ask()
        except Exception as e:  # StudyExhausted
            assert "all 7 grid points" in str(e)
            break
        seen.append(tuple(sorted(t.params.items())))
        study.tell(t, 0.0)
    assert len(seen) == len(set(seen)) == 7
    assert sum(1 for s in seen if dict(s)["estimator"] == "linear") == 1


def test_conditional_study_resumes(tmp_path):
    a = Study(SPACE, "random", seed=1, storage=tmp_path)
    for _ in range(4):
        t = a.ask()
        a.tell(t, objective(t.params))
    b = Study(SPACE, "random", storage=tmp_path)
    assert [t.params for t in b.trials] == [t.params for t in a.trials]
