"""Hypothesis strategies for the controllers in :mod:`rl2fx.control` (valid configurations and inputs).

>>> from hypothesis import given
>>> from rl2fx.control import kl_init
>>> @given(kl_controller_configs())
... def test_init(cfg):
...     controller_type, params = cfg
...     assert kl_init(controller_type, **params).coef > 0
>>> test_init()
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from rl2fx.control.kl import CONTROLLER_TYPES

__all__ = ["kl_controller_configs", "kl_values", "finite_floats"]

#: Any finite float, including huge and subnormal ones.
finite_floats = st.floats(allow_nan=False, allow_infinity=False)


def kl_values(max_value: float = 1e300) -> st.SearchStrategy[float]:
    """Measured KL values: 0, tiny, ordinary and huge (all finite and ``>= 0``)."""
    return st.one_of(
        st.just(0.0),
        st.floats(min_value=0.0, max_value=max_value, allow_nan=False, allow_infinity=False),
        st.floats(min_value=0.0, max_value=0.1),
    )


@st.composite
def kl_controller_configs(draw: Any, controller_types: tuple[str, ...] = CONTROLLER_TYPES) -> tuple[str, dict[str, Any]]:
    """``(controller_type, params)`` pairs that :func:`~rl2fx.control.kl.kl_init` accepts."""
    ct = draw(st.sampled_from(controller_types))
    lo = draw(st.floats(min_value=1e-6, max_value=1.0))
    hi = draw(st.floats(min_value=lo, max_value=1e3))
    init = draw(st.floats(min_value=lo, max_value=hi))
    params: dict[str, Any] = {
        "initial_coef": init, "min_coef": lo, "max_coef": hi,
        "target_kl": draw(st.floats(min_value=1e-6, max_value=10.0)),
    }
    if ct == "exponential":
        params["exp_factor"] = draw(st.floats(min_value=1.0, max_value=2.0))
        params["exp_decay"] = draw(st.floats(min_value=0.5, max_value=1.0))
    elif ct == "linear":
        params["linear_factor"] = draw(st.floats(min_value=1e-3, max_value=1.0))
    elif ct == "pid":
        for k in ("kp", "ki", "kd"):
            params[k] = draw(st.floats(min_value=0.0, max_value=2.0))
    elif ct == "schedule":
        params["schedule_type"] = draw(st.sampled_from(["cosine", "linear", "exponential", "warmup_cosine"]))
        params["schedule_steps"] = draw(st.integers(min_value=2, max_value=5000))
    elif ct == "proportional":
        params["horizon"] = draw(st.floats(min_value=1.0, max_value=1e5))
        params["n_steps"] = draw(st.one_of(st.none(), st.integers(min_value=1, max_value=10_000)))
    return ct, params
