"""The typing foundation: shape errors name the argument; the error helpers name key, value and range."""

import pytest
import torch
from torch import Tensor

from rl2fx._typing import Float, check_choice, check_finite, check_range, typechecked


@typechecked
def _add(x: Float[Tensor, "batch time"], y: Float[Tensor, "batch time"]) -> Float[Tensor, "batch time"]:
    return x + y


def test_shape_mismatch_names_the_argument():
    with pytest.raises(Exception, match="y"):
        _add(torch.zeros(2, 3), torch.zeros(2, 4))


def test_check_finite_accepts_finite_values_whose_sum_overflows():
    # the fast path sums first; a sum of finite values may overflow to inf
    check_finite("rewards", torch.tensor([3e38, 3e38]))
    check_finite("rewards", torch.full((4,), 60000.0, dtype=torch.float16))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_names_tensor_and_first_index(bad):
    x = torch.zeros(3, 4)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"values contains 1 non-finite value\(s\).*\(1, 2\)"):
        check_finite("values", x)
    check_finite("values", x, allow_nonfinite=True)


def test_check_finite_inf_minus_inf_sum_is_caught():
    with pytest.raises(ValueError, match="2 non-finite"):
        check_finite("x", torch.tensor([float("inf"), float("-inf"), 1.0]))


def test_range_and_choice_errors_name_parameter_value_and_allowed():
    with pytest.raises(ValueError, match=r"gamma.*1\.5"):
        check_range("gamma", 1.5, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"backend.*loop.*'gpu'"):
        check_choice("backend", "gpu", ["loop", "chunked"])


# ------------------------------------------------ checked once per signature


_calls: list[tuple] = []


@typechecked
def _scale(x: Float[Tensor, "batch time"], k: float | int, how: str = "mul") -> Float[Tensor, "batch"]:
    _calls.append((tuple(x.shape), how))
    return x.sum(-1) * k if how == "mul" else x[0]  # "bad": [time], not [batch]


def test_repeated_signature_still_runs_and_new_shapes_are_checked():
    ok = torch.ones(2, 3)
    for _ in range(3):
        assert torch.equal(_scale(ok, 2.0), torch.full((2,), 6.0))
    # a seen signature with different values gives the new result
    assert torch.equal(_scale(torch.zeros(2, 3), 2.0), torch.zeros(2))
    # a new rank is a new signature: still rejected, naming the argument
    with pytest.raises(TypeError, match="x"):
        _scale(torch.ones(2, 3, 4), 2.0)
    # a new argument type is checked too
    with pytest.raises(TypeError, match="k"):
        _scale(ok, "2")


def test_a_failing_signature_is_never_remembered():
    x = torch.ones(2, 1)
    for _ in range(2):  # the return check fails every time, not only the first
        with pytest.raises(TypeError, match="return"):
            _scale(x, 1, "bad")
    # strings are part of the signature: "mul" with the same shapes passes
    assert _scale(x, 1, "mul").shape == (2,)


def test_calls_with_containers_are_checked_every_time():
    @typechecked
    def first(xs: list[Float[Tensor, " n"]]) -> Float[Tensor, " n"]:
        return xs[0]

    assert first([torch.ones(3)]).shape == (3,)
    with pytest.raises(TypeError):
        first([torch.ones(3, 2)])
