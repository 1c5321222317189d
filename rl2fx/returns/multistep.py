r"""Multi-step returns: ``n_steps`` rewards, then a tail estimate of the state value.

.. math::

    G_t = \sum_{k=0}^{n-1} \Big(\prod_{j<k}\gamma_{t+j}\Big) r_{t+k}
        + \Big(\prod_{j<n}\gamma_{t+j}\Big)\, \hat V_{t+n}

where the tail :math:`\hat V` is chosen by ``bootstrap_method``:

* ``"td"``: the critic's value :math:`V_{t+n}` (the classic n-step TD return,
  Sutton & Barto 2018 §7.1);
* ``"gae"``: the λ-return :math:`G^\lambda_{t+n}` (equivalently
  :math:`V + A^{GAE}`, Schulman et al. 2015), a lower-bias tail;
* ``"mc"``: the Monte Carlo return :math:`G_{t+n}` (then :math:`G_t` is the full
  discounted return for every ``n``).

Past the end of the row the tail is ``bootstrap_value``. Advantages are
:math:`G_t - V_t`.
"""

from __future__ import annotations

from torch import Tensor

from rl2fx._typing import Float, Shaped, check_choice, check_range, typechecked
from rl2fx.returns import _common as C
from rl2fx.returns.gae import _n_step, discounted, td_lambda
from rl2fx.returns.registry import register_estimator

__all__ = ["multistep", "BOOTSTRAP_METHODS"]

BOOTSTRAP_METHODS = ("gae", "td", "mc")


@register_estimator("multistep", needs_values=True, defaults={"gamma": 0.99})
@typechecked
def multistep(
    rewards: Float[Tensor, "*batch time"],
    values: Float[Tensor, "*batch time"],
    *,
    gamma: float | int | Float[Tensor, "*batch time"],
    lamda: float | int | Float[Tensor, "*batch time"] = 0.95,
    n_steps: int = 5,
    bootstrap_method: str = "gae",
    bootstrap_value: Float[Tensor, "*batch"] | None = None,
    mask: Shaped[Tensor, "*batch time"] | None = None,
    backend: str = "auto",
    allow_nonfinite: bool = False,
) -> tuple[Float[Tensor, "*batch time"], Float[Tensor, "*batch time"]]:
    r"""Multi-step returns: ``n_steps`` discounted rewards plus a ``bootstrap_method`` tail (``gae``, ``td``, ``mc``).

    See the module docstring for the formula and the tails.

    Returns ``(advantages, returns)``.

    >>> import torch
    >>> adv, ret = multistep(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.0, 2.0, 4.0]),
    ...                      gamma=0.5, n_steps=1, bootstrap_method="td")
    >>> ret
    tensor([2., 3., 1.])
    """
    check_range("n_steps", n_steps, 1, None)
    check_choice("bootstrap_method", bootstrap_method, BOOTSTRAP_METHODS)
    check_range("lamda", lamda, 0.0, 1.0)
    C.check_all_finite(allow_nonfinite, rewards=rewards, values=values, bootstrap_value=bootstrap_value)
    dt = C.acc_dtype(rewards.dtype, values.dtype)
    r, v = rewards.to(dt), values.to(dt)
    # the inputs were checked above: the tails skip the check
    if bootstrap_method == "td":
        tail = v
    elif bootstrap_method == "gae":
        tail = td_lambda(r, v, gamma=gamma, lamda=lamda, bootstrap_value=bootstrap_value, mask=mask, backend=backend,
                         allow_nonfinite=True)
    else:
        tail = discounted(r, gamma=gamma, bootstrap_value=bootstrap_value, mask=mask, backend=backend,
                          allow_nonfinite=True)
    ret = _n_step(r, tail, gamma=gamma, n_steps=n_steps, bootstrap_value=bootstrap_value, mask=mask)
    adv = C.masked_out(ret - v, C.as_bool("mask", mask))
    out = C.out_dtype(rewards.dtype, values.dtype)
    return adv.to(out), ret.to(out)
