r"""More per-token KL estimators: ``abs``, straight-through ``k1+`` / ``k3+``, verl's clamps, IS-weighted ``k3``.

Same calling style as :func:`rl2fx.losses.kl_estimate` (``logprobs`` of the
policy that sampled the tokens, ``ref_logprobs`` of the reference, the
estimator's name) and the same values for ``k1``, ``k2``, ``k3``; with
:math:`\delta = \log\pi - \log\pi_{ref}` and :math:`\rho = \pi_{ref}/\pi = e^{-\delta}`:

* ``abs`` :math:`= |\delta|` (verl's ``abs``),
* ``k1+`` : value of ``k1``, gradient of ``k2``; ``k3+`` : value of ``k3``, gradient of ``k2``
  (verl's straight-through ``"+"`` estimators: ``k2 - sg(k2) + sg(value)``). The
  expected *value* of k1 and k3 is the KL, but the expected *gradient* of a k1 or k3
  loss is not the gradient of :math:`\mathrm{KL}(\pi\|\pi_{ref})`; the gradient of
  k2, :math:`\delta\,\nabla\log\pi`, is (on-policy samples),
* ``k3_unbiased`` :math:`= \frac{\pi_\theta}{\pi_{old}}\,(\rho - 1 + \delta)`: k3 weighted by the
  importance ratio of the current policy to the sampler, the weight *keeping* its
  gradient (DeepSeek-V3.2's unbiased KL estimate, as OpenRLHF and slime pass an
  ``importance_ratio`` to ``compute_approx_kl``). Its value is an unbiased estimate of
  :math:`\mathrm{KL}(\pi_\theta\|\pi_{ref})` from samples of :math:`\pi_{old}`, and its
  gradient is :math:`\frac{\pi_\theta}{\pi_{old}}\,\delta\,\nabla\log\pi_\theta`, an unbiased
  estimate of the KL's gradient. Without ``old_logprobs`` the samples are taken as
  on-policy (:math:`\pi_{old} = \mathrm{sg}(\pi_\theta)`): the value is k3 and the gradient k2's.

verl clamps its ``low_var_kl`` (k3): the log-ratio to :math:`[-20, 20]` before the
exponential and the value to :math:`[-10, 10]`. Here both are keyword options
(``log_ratio_clamp=20.0, value_clamp=10.0`` reproduce verl) and apply to every
estimator; for the straight-through ones the clamps act on the value only (as in
verl, whose ``k3+`` takes the clamped k3 as value and the unclamped k2 as gradient).
"""

from __future__ import annotations

import torch

from rl2fx._typing import Float, Tensor, check_choice, check_range, typechecked

__all__ = ["KL_ESTIMATORS", "kl_estimate"]

#: Names :func:`kl_estimate` accepts (``k1``, ``k2``, ``k3`` as in :mod:`rl2fx.losses`).
KL_ESTIMATORS = ("k1", "k2", "k3", "abs", "k1+", "k3+", "k3_unbiased")


def _k3(delta: Tensor) -> Tensor:
    # exp(-δ) - 1 + δ via expm1 (accurate for small δ); the clamp removes last-ulp negatives
    return (torch.expm1(-delta) + delta).clamp_min(0.0)


@typechecked
def kl_estimate(
    logprobs: Float[Tensor, "*batch time"],
    ref_logprobs: Float[Tensor, "*batch time"],
    estimator: str = "k3",
    *,
    old_logprobs: Float[Tensor, "*batch time"] | None = None,
    log_ratio_clamp: float | int | None = None,
    value_clamp: float | int | None = None,
) -> Float[Tensor, "*batch time"]:
    r"""Per-token estimate of :math:`\mathrm{KL}(\pi\|\pi_{ref})`, one of :data:`KL_ESTIMATORS`.

    ``old_logprobs`` (the sampler's log-probs) is read by ``k3_unbiased`` only.
    ``log_ratio_clamp`` :math:`c` clamps :math:`\delta` to :math:`[-c, c]` before the
    estimate, ``value_clamp`` :math:`v` clamps the estimate to :math:`[-v, v]`
    (verl's ``low_var_kl`` uses 20 and 10).

    >>> lp = torch.tensor([[-1.0, -2.0]], requires_grad=True); ref = torch.tensor([[-1.5, -2.5]])
    >>> kl_estimate(lp, ref, "abs").tolist()
    [[0.5, 0.5]]
    >>> v = kl_estimate(lp, ref, "k3+"); v.sum().backward()
    >>> [round(x, 6) for x in v[0].tolist()], lp.grad.tolist()  # value of k3, gradient of k2 (= δ)
    ([0.106531, 0.106531], [[0.5, 0.5]])
    """
    check_choice("estimator", estimator, KL_ESTIMATORS)
    if log_ratio_clamp is not None:
        check_range("log_ratio_clamp", log_ratio_clamp, 0.0, None, low_inclusive=False)
    if value_clamp is not None:
        check_range("value_clamp", value_clamp, 0.0, None, low_inclusive=False)
    # computed in at least float32 (a float16 clamp bound such as 1e9 is not representable),
    # returned in the inputs' promoted dtype
    out_dtype = torch.promote_types(logprobs.dtype, ref_logprobs.dtype)
    acc = torch.promote_types(out_dtype, torch.float32)
    logprobs, ref_logprobs = logprobs.to(acc), ref_logprobs.to(acc)
    if old_logprobs is not None:
        old_logprobs = old_logprobs.to(acc)
    raw = logprobs - ref_logprobs
    delta = raw if log_ratio_clamp is None else raw.clamp(-log_ratio_clamp, log_ratio_clamp)
    if estimator in ("k1", "k1+"):
        value = delta
    elif estimator == "k2":
        value = 0.5 * delta.square()
    elif estimator == "abs":
        value = delta.abs()
    elif estimator in ("k3", "k3+"):
        value = _k3(delta)
    else:  # k3_unbiased
        old = logprobs.detach() if old_logprobs is None else old_logprobs
        value = torch.exp(logprobs - old) * _k3(delta)
    if value_clamp is not None:
        value = value.clamp(-value_clamp, value_clamp)
    if estimator.endswith("+"):
        # straight-through: the value of `value`, the gradient of k2 (verl's kl_penalty "+")
        k2 = 0.5 * raw.square()
        return (k2 - k2.detach() + value.detach()).to(out_dtype)
    return value.to(out_dtype)
