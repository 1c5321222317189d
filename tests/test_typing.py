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
