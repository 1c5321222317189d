"""Search-space validation and the unit-cube encoding."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rl2fx import HyperparameterConfig, create_ppo_hyperparameter_configs
from rl2fx.tuning.samplers import sample_from_unit
from rl2fx.tuning.space import (
    as_configs,
    decode,
    default_params,
    encode,
    encoded_dim,
    validate_params,
)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(name="a", type="float", low=1.0, high=1.0), r"'a': low must be < high, got low=1.0, high=1.0"),
        (dict(name="a", type="float", low=2.0, high=1.0), "low must be < high"),
        (dict(name="a", type="float", low=0.0, high=1.0, default=2.0), r"default must be a number in \[0.0, 1.0\], got 2.0"),
        (dict(name="a", type="float", low=0.0, high=1.0, log=True), "log=True needs low > 0, got low=0.0"),
        (dict(name="a", type="int", low=-1, high=5, log=True), "log=True needs low > 0"),
        (dict(name="a", type="categorical", choices=[]), "non-empty list of choices"),
        (dict(name="a", type="categorical"), "non-empty list of choices"),
        (dict(name="a", type="categorical", choices=["x", "x"]), "distinct"),
        (dict(name="a", type="categorical", choices=["x", "y"], default="z"), r"default must be one of \['x', 'y'\], got 'z'"),
        (dict(name="a", type="categorical", choices=["x"], log=True), "log=True is only for float and int"),
        (dict(name="a", type="float", low=None, high=1.0), "needs numeric low and high"),
        (dict(name="a", type="int", low=0.5, high=3), "integer low and high"),
        (dict(name="a", type="int", low=0, high=3, default=1.5), "must be an integer"),
        (dict(name="a", type="float", low=0.0, high=math.inf), "finite"),
        (dict(name="a", type="uniform", low=0.0, high=1.0), r"type must be one of \['float', 'int', 'categorical', 'bool'\], got 'uniform'"),
        (dict(name="", type="float", low=0.0, high=1.0), "non-empty string"),
        (dict(name="a", type="bool", low=0, high=1), "only for float and int"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HyperparameterConfig(**kwargs)


def test_defaults_and_bool():
    assert HyperparameterConfig("lr", "float", low=1e-4, high=1e-2, log=True).default == pytest.approx(1e-3)
    b = HyperparameterConfig("flag", "bool")
    assert b.choices == (False, True) and b.default is False
    assert HyperparameterConfig("c", "categorical", choices=[1, True]).index_of(True) == 1


def test_as_configs_rejects_duplicates_and_empty():
    c = HyperparameterConfig("x", "float", low=0.0, high=1.0)
    with pytest.raises(ValueError, match=r"duplicate names \['x'\]"):
        as_configs([c, c])
    with pytest.raises(ValueError, match="empty list"):
        as_configs([])
    with pytest.raises(ValueError, match="must be a list"):
        as_configs(c)


def test_validate_params_errors():
    cs = [HyperparameterConfig("x", "float", low=0.0, high=1.0), HyperparameterConfig("n", "int", low=1, high=3)]
    validate_params(cs, {"x": 0.5, "n": 2})
    with pytest.raises(ValueError, match=r"parameter 'n' must be in \[1, 3\], got 4"):
        validate_params(cs, {"x": 0.5, "n": 4})
    with pytest.raises(ValueError, match="exactly the keys"):
        validate_params(cs, {"x": 0.5})


MIXED = [
    HyperparameterConfig("lr", "float", low=1e-5, high=1e-1, log=True),
    HyperparameterConfig("clip", "float", low=0.1, high=0.3),
    HyperparameterConfig("epochs", "int", low=1, high=8),
    HyperparameterConfig("bs", "int", low=8, high=512, log=True),
    HyperparameterConfig("opt", "categorical", choices=["adam", "sgd", "lion"]),
    HyperparameterConfig("flag", "bool"),
]


@given(st.lists(st.floats(0.0, 1.0), min_size=len(MIXED), max_size=len(MIXED)))
def test_encode_decode_roundtrip(us):
    params = {c.name: sample_from_unit(c, u) for c, u in zip(MIXED, us, strict=True)}
    validate_params(MIXED, params)
    z = encode(MIXED, params)
    assert len(z) == encoded_dim(MIXED) == 4 + 3 + 2
    assert all(0.0 <= v <= 1.0 + 1e-12 for v in z)
    back = decode(MIXED, z)
    for c in MIXED:
        if c.type == "float":
            assert back[c.name] == pytest.approx(params[c.name], rel=1e-9)
        else:
            assert back[c.name] == params[c.name]


def test_log_encoding_is_linear_in_log():
    c = MIXED[0]
    for x in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
        assert c.to_unit(x) == pytest.approx((math.log10(x) + 5) / 4)


def test_int_sampling_is_uniform_over_integers():
    # an independent check: a fine uniform grid of u must hit every integer equally often
    c = HyperparameterConfig("n", "int", low=2, high=6)
    counts = {}
    n = 100_000
    for i in range(n):
        v = sample_from_unit(c, (i + 0.5) / n)
        counts[v] = counts.get(v, 0) + 1
    assert sorted(counts) == [2, 3, 4, 5, 6]
    assert max(counts.values()) - min(counts.values()) <= 2


def test_ppo_space_is_sensible():
    cfgs = create_ppo_hyperparameter_configs()
    names = [c.name for c in cfgs]
    assert len(set(names)) == len(names)
    for key in ("actor.lr", "actor.clip", "adv.gamma", "adv.lamda", "actor.kl.adaptive_kl.target_kl",
                "actor.kl.adaptive_kl.initial_coef", "trainer.entropy_coef", "data.prompts_per_rollout",
                "trainer.update_epochs"):
        assert key in names
    by = {c.name: c for c in cfgs}
    assert by["actor.lr"].log and by["actor.lr"].low > 0
    assert 0 <= by["adv.gamma"].low and by["adv.gamma"].high <= 1
    validate_params(cfgs, default_params(cfgs))
