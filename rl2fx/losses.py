"""Stateless RL losses for LLM post-training: KL estimators, PPO policy/value losses, aggregation.

Everything here maps tensors ``[*batch, time]`` (time last, ``mask`` marking the
response tokens that are decisions) to a scalar loss plus metrics, and keeps no
state. Metrics are returned as detached 0-d tensors so that a caller can
all-reduce them before calling ``.item()``.

KL estimators (J. Schulman, "Approximating KL Divergence", 2020,
http://joschu.net/blog/kl-approx.html), with the log-ratio
:math:`\\delta = \\log \\pi(a) - \\log \\pi_{ref}(a)` of a token sampled from :math:`\\pi`:

* ``k1`` :math:`= \\delta` (unbiased, high variance, can be negative),
* ``k2`` :math:`= \\tfrac12 \\delta^2` (biased, low variance, :math:`\\ge 0`),
* ``k3`` :math:`= e^{-\\delta} - 1 + \\delta` (unbiased, :math:`\\ge 0`), RL2's and GRPO's choice.

KL placement (where the penalty :math:`\\beta\\,\\mathrm{KL}` enters the objective):
:func:`kl_penalized_rewards` subtracts it from the token rewards before the
advantage estimator (Ziegler et al. 2019, InstructGPT, RL2/OpenRLHF
``kl_type: reward``); :func:`kl_loss` adds it to the loss (GRPO, Shao et al.
2024; ``kl_type: loss``). Both take a fixed :math:`\\beta` or the state of an
adaptive controller (:class:`rl2fx.control.kl.KLState`).

The PPO clipped surrogate is from Schulman et al., "Proximal Policy Optimization
Algorithms", 2017; dual clip from Ye et al., "Mastering Complex Control in MOBA
Games with Deep RL", AAAI 2020; truncated importance weights (TIS) from Yao et
al., "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training",
2025; the constant normaliser of Dr. GRPO from Liu et al., "Understanding
R1-Zero-Like Training: A Critical Perspective", 2025.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import torch

from rl2fx._registry import lookup, put
from rl2fx._typing import Float, Shaped, Tensor, check_choice, check_mask, check_range, typechecked
from rl2fx.kl_estimators import KL_ESTIMATORS, kl_estimate  # one source of KL estimator names

__all__ = [
    "KL_ESTIMATORS",
    "AGG_MODES",
    "kl_estimate",
    "kl_coef_value",
    "kl_penalized_rewards",
    "kl_loss",
    "aggregate",
    "policy_loss",
    "value_loss",
    "entropy_bonus",
    "POLICY_LOSS_INPUTS",
    "PolicyLoss",
    "register_policy_loss",
    "unregister_policy_loss",
    "list_policy_losses",
    "get_policy_loss",
    "check_policy_loss_hyperparameters",
    "compute_policy_loss",
    "vanilla_policy_loss",
]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")

#: A mask: bool, or any dtype holding only 0/1 (:func:`rl2fx._typing.check_mask`, the estimators' rule too).
MaskT = Shaped[Tensor, "*batch time"] | None


def _mask_like(x: Tensor, mask: Tensor | None) -> Tensor:
    return torch.ones_like(x) if mask is None else mask.to(x.dtype)


def _at_least_f32(*xs: Tensor | None) -> tuple[Tensor | None, ...]:
    """``xs`` computed in at least float32 (float16/bfloat16 promoted; the gradient flows back)."""
    return tuple(None if x is None else x.to(torch.promote_types(x.dtype, torch.float32)) for x in xs)


def _masked_in(mask: Tensor | None, *xs: Tensor | None) -> tuple[Tensor | None, ...]:
    """``xs`` with every masked-out entry replaced by 0, selected before any arithmetic.

    ``x * mask`` is not enough: a NaN or inf at a padded position gives NaN * 0 = NaN, in the
    result and in the gradient. Selecting first keeps every later op finite there, and the
    gradient of ``torch.where`` is 0 at the replaced entries (the "double where" pattern).
    """
    if mask is None:
        return xs
    keep = mask != 0
    return tuple(None if x is None else torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
                 for x in xs)


def kl_coef_value(coef: Any) -> float:
    """The KL coefficient as a float: a number, or the ``.coef`` of a KL controller state.

    Accepts a float/int, a :class:`~rl2fx.control.kl.KLState` or an
    :class:`~rl2fx.control.kl.AdaptiveKLController` (anything with a numeric
    ``coef``); the value must be finite and >= 0.

    >>> from rl2fx.control.kl import kl_init
    >>> kl_coef_value(0.1), kl_coef_value(kl_init("fixed", initial_coef=0.05))
    (0.1, 0.05)
    """
    value = coef.coef if hasattr(coef, "coef") else coef
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"coef must be a float >= 0 or a KL controller state with a .coef (rl2fx.control.kl.KLState), "
            f"got {coef!r}"
        )
    check_range("coef", float(value), 0.0, None)
    _check_finite("coef", value)
    return float(value)


def _check_finite(name: str, value: float | int) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is finite (``check_range`` with no upper bound lets inf pass)."""
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")


@typechecked
def kl_penalized_rewards(
    rewards: Float[Tensor, "*batch time"],
    logprobs: Float[Tensor, "*batch time"],
    ref_logprobs: Float[Tensor, "*batch time"],
    coef: Any,
    *,
    estimator: str = "k1",
    mask: MaskT = None,
    log_ratio_clamp: float | int | None = None,
    value_clamp: float | int | None = None,
) -> Float[Tensor, "*batch time"]:
    """KL in the reward: :math:`\\tilde r_t = r_t - \\beta\\,\\widehat{KL}_t` on every masked-in token.

    The per-token penalty of Ziegler et al., "Fine-Tuning Language Models from
    Human Preferences", 2019 (and InstructGPT, RL2/OpenRLHF's ``kl_type:
    reward``): the penalty becomes part of the return the advantage estimator
    sees, so it is applied *before* the estimator. :math:`\\widehat{KL}_t` is
    :func:`kl_estimate` (Schulman's ``k1`` :math:`= \\log\\pi - \\log\\pi_{ref}`
    by default, the unbiased per-token log-ratio the original papers use).
    ``coef`` is :math:`\\beta`: a float or a KL controller state (its ``.coef``,
    see :func:`kl_coef_value`). Masked-out positions keep their reward. No
    gradient is meant to flow (the rewards are data), but nothing is detached.
    ``log_ratio_clamp`` / ``value_clamp``: verl's ``low_var_kl`` clamps (:func:`kl_estimate`).

    >>> r = torch.tensor([[0.0, 1.0]]); lp = torch.tensor([[-1.0, -2.0]]); ref = torch.tensor([[-1.5, -2.0]])
    >>> kl_penalized_rewards(r, lp, ref, 0.5).tolist()  # 0 - 0.5 * 0.5, 1 - 0.5 * 0
    [[-0.25, 1.0]]
    """
    beta = kl_coef_value(coef)
    mask = check_mask("mask", mask)
    logprobs, ref_logprobs = _masked_in(mask, logprobs, ref_logprobs)
    kl = kl_estimate(logprobs, ref_logprobs, estimator, log_ratio_clamp=log_ratio_clamp, value_clamp=value_clamp)
    if mask is not None:
        kl = torch.where(mask, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    return rewards - beta * kl


@typechecked
def kl_loss(
    logprobs: Float[Tensor, "*batch time"],
    ref_logprobs: Float[Tensor, "*batch time"],
    coef: Any,
    *,
    estimator: str = "k3",
    mask: MaskT = None,
    agg_mode: str = "token-mean",
    old_logprobs: Float[Tensor, "*batch time"] | None = None,
    log_ratio_clamp: float | int | None = None,
    value_clamp: float | int | None = None,
    **agg_kwargs: float | None,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """KL in the loss: :math:`\\beta \\cdot \\mathrm{agg}(\\widehat{KL}_t)`, to be added to the policy loss.

    GRPO's placement (Shao et al. 2024, DeepSeekMath, eq. 3, with the ``k3``
    estimator :math:`e^{-\\delta} - 1 + \\delta`, unbiased and >= 0; Schulman's
    k1/k2/k3 approximations, see :func:`kl_estimate`), RL2's ``kl_type: loss``.
    The gradient flows into ``logprobs``. ``coef`` is :math:`\\beta` (a float or
    a KL controller state); ``agg_mode`` and ``agg_kwargs`` (``global_tokens``,
    ``global_seqs``, ``normalizer``) are those of :func:`aggregate`. Returns the
    term and ``kl`` (the detached token-mean KL estimate, a metric).
    ``old_logprobs`` (the sampler's) is read by the ``k3_unbiased`` estimator;
    ``log_ratio_clamp`` / ``value_clamp`` are verl's ``low_var_kl`` clamps (:func:`kl_estimate`).

    >>> lp = torch.tensor([[-1.0, -2.0]], requires_grad=True); ref = torch.tensor([[-1.5, -2.0]])
    >>> term, metrics = kl_loss(lp, ref, 0.5, estimator="k1")
    >>> term.item(), metrics["kl"].item()  # 0.5 * mean(0.5, 0)
    (0.125, 0.25)
    """
    beta = kl_coef_value(coef)
    mask = check_mask("mask", mask)
    logprobs, ref_logprobs = _masked_in(mask, logprobs, ref_logprobs)
    if old_logprobs is not None:
        (old_logprobs,) = _masked_in(mask, old_logprobs)
    kl = kl_estimate(logprobs, ref_logprobs, estimator, old_logprobs=old_logprobs, log_ratio_clamp=log_ratio_clamp,
                     value_clamp=value_clamp)
    m = _mask_like(kl, mask)
    term = beta * _aggregate(kl, m, agg_mode, **agg_kwargs)
    return term, {"kl": _masked_mean(kl, m).detach()}


@typechecked
def aggregate(
    loss: Float[Tensor, "*batch time"],
    mask: MaskT = None,
    mode: str = "token-mean",
    *,
    normalizer: float | int | None = None,
    global_tokens: float | int | None = None,
    global_seqs: float | int | None = None,
) -> Float[Tensor, ""]:
    """Reduce a per-token loss to a scalar.

    * ``token-mean``: :math:`\\sum_{i,t} m_{it} \\ell_{it} / \\sum_{i,t} m_{it}` (DAPO, RL2's default),
    * ``seq-mean-token-mean``: :math:`\\frac1N \\sum_i \\frac{\\sum_t m_{it}\\ell_{it}}{\\sum_t m_{it}}` (GRPO paper),
    * ``seq-mean-token-sum``: :math:`\\frac1N \\sum_i \\sum_t m_{it}\\ell_{it}`,
    * ``seq-mean-token-sum-norm``: :math:`\\frac{1}{N L} \\sum_{i,t} m_{it}\\ell_{it}` with a constant
      ``normalizer`` :math:`L` (Dr. GRPO; defaults to the time length),
    * ``token-sum``: :math:`\\sum_{i,t} m_{it}\\ell_{it}`, no denominator (verl's ``token-sum``:
      ``(loss * mask).sum()``, for losses whose scale is already set, e.g. by per-token weights
      that sum to one over the batch; verl multiplies by the data-parallel size to undo DDP's
      gradient averaging, which a trainer must do too).

    ``global_tokens`` / ``global_seqs`` replace the local denominators; a trainer
    that splits one batch into micro-batches (or across processes) passes the
    counts of the whole batch so that the summed micro-batch losses equal the
    loss of the whole batch exactly.

    >>> loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    >>> mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    >>> [round(aggregate(loss, mask, m).item(), 4) for m in AGG_MODES]
    [2.5, 3.0, 5.0, 1.6667, 10.0]
    """
    return _aggregate(loss, check_mask("mask", mask), mode, normalizer=normalizer, global_tokens=global_tokens,
                      global_seqs=global_seqs)


def _aggregate(
    loss: Tensor,
    mask: Tensor | None,
    mode: str,
    *,
    normalizer: float | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> Tensor:
    """:func:`aggregate` for a mask already checked (bool, or 0/1 floats made by :func:`_mask_like`)."""
    check_choice("mode", mode, AGG_MODES)
    for name, v in (("global_tokens", global_tokens), ("global_seqs", global_seqs), ("normalizer", normalizer)):
        # a denominator: 0, negative or NaN would give inf, a sign flip or NaN (checked in every
        # mode, also where unused, so that a bad value never passes silently)
        if v is not None:
            check_range(name, float(v), 0.0, None, low_inclusive=False)
            _check_finite(name, v)
    m = _mask_like(loss, mask)
    (loss,) = _masked_in(m, loss)
    masked = loss * m
    # the number of sequences is the product of the batch dims (also for T = 0, where the loss is 0)
    # (an empty batch divides by 1, not 0: its loss is 0, like that of an all-masked batch)
    n_seqs = float(max(masked.shape[:-1].numel(), 1)) if global_seqs is None else global_seqs
    if mode == "token-mean":
        denom = m.sum().clamp_min(1.0) if global_tokens is None else global_tokens
        return masked.sum() / denom
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / m.sum(-1).clamp_min(1.0)
        return per_seq.sum() / n_seqs
    if mode == "seq-mean-token-sum":
        return masked.sum() / n_seqs
    if mode == "token-sum":
        return masked.sum()
    norm = float(max(loss.shape[-1], 1)) if normalizer is None else normalizer
    check_range("normalizer", norm, 0.0, None, low_inclusive=False)
    return masked.sum() / (n_seqs * norm)


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    (x,) = _masked_in(m, x)
    return (x * m).sum() / m.sum().clamp_min(1.0)


@typechecked
def policy_loss(
    logprobs: Float[Tensor, "*batch time"],
    old_logprobs: Float[Tensor, "*batch time"],
    advantages: Float[Tensor, "*batch time"],
    mask: MaskT = None,
    *,
    clip: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    behavior_logprobs: Float[Tensor, "*batch time"] | None = None,
    tis_cap: float | None = None,
    agg_mode: str = "token-mean",
    **agg_kwargs: float | None,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """PPO clipped surrogate loss with optional dual clip and truncated importance weights.

    With :math:`\\rho_t = \\exp(\\log\\pi_\\theta - \\log\\pi_{old})`:

    .. math::

        \\ell_t = -\\min\\big(\\rho_t A_t,\\ \\mathrm{clip}(\\rho_t, 1-\\epsilon, 1+\\epsilon_{high}) A_t\\big),

    and with ``dual_clip`` :math:`c > 1`, for :math:`A_t < 0`:
    :math:`\\ell_t \\leftarrow \\min(\\ell_t, -c A_t)` (bounds the loss of a very
    unlikely-now action). With ``behavior_logprobs`` (the sampler's, e.g. a
    vLLM engine's, log-probs) and ``tis_cap`` :math:`C`, every term is weighted by
    the truncated importance weight :math:`\\min(\\pi_{old}/\\mu, C)` (no gradient).
    ``clip_high`` defaults to ``clip`` (DAPO's clip-higher when larger).

    Returns the aggregated loss and metrics: ``clip_frac`` (fraction of tokens whose
    gradient the clip removed), ``approx_kl`` (k3 estimate of KL(old || new)),
    ``ratio_mean``, and ``dual_clip_frac`` when dual clip is on.

    At :math:`\\rho = 1` the gradient is the plain policy gradient
    :math:`-\\nabla \\log\\pi \\cdot A`:

    >>> lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    >>> adv = torch.tensor([[1.0, -2.0]])
    >>> loss, metrics = policy_loss(lp, lp.detach(), adv)
    >>> loss.backward(); lp.grad.tolist(), metrics["clip_frac"].item()
    ([[-0.5, 1.0]], 0.0)
    """
    check_range("clip", clip, 0.0, 1.0)
    hi = clip if clip_high is None else clip_high
    check_range("clip_high", hi, 0.0, None)
    if dual_clip is not None:
        check_range("dual_clip", dual_clip, 1.0, None, low_inclusive=False)
    # at least float32: a float16 clamp bound such as 1 + clip_high = 1e9 is not representable
    logprobs, old_logprobs, advantages, behavior_logprobs = _at_least_f32(
        logprobs, old_logprobs, advantages, behavior_logprobs)
    m = _mask_like(logprobs, check_mask("mask", mask))
    # padding may hold anything (old_logprobs = -inf with A < 0 gave inf * 0 = NaN): select first
    logprobs, old_logprobs, advantages, behavior_logprobs = _masked_in(
        m, logprobs, old_logprobs, advantages, behavior_logprobs)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1.0 - clip, 1.0 + hi) * advantages
    loss = -torch.minimum(surr1, surr2)
    clipped = (surr2 < surr1).to(loss.dtype)
    metrics: dict[str, Tensor] = {}
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual = ((advantages < 0) & (loss > bound)).to(loss.dtype)
        loss = torch.where(advantages < 0, torch.minimum(loss, bound), loss)
        metrics["dual_clip_frac"] = _masked_mean(dual, m).detach()
    if behavior_logprobs is not None:
        if tis_cap is None:
            raise ValueError("tis_cap must be set (a float > 0) when behavior_logprobs is given")
        check_range("tis_cap", tis_cap, 0.0, None, low_inclusive=False)
        weight = torch.exp(old_logprobs - behavior_logprobs).clamp(max=tis_cap).detach()
        loss = loss * weight
        metrics["tis_weight_mean"] = _masked_mean(weight, m).detach()
    out = _aggregate(loss, m, agg_mode, **agg_kwargs)
    with torch.no_grad():
        metrics["clip_frac"] = _masked_mean(clipped, m)
        metrics["approx_kl"] = _masked_mean(torch.expm1(log_ratio) - log_ratio, m)
        metrics["ratio_mean"] = _masked_mean(ratio, m)
    return out, metrics


@typechecked
def value_loss(
    values: Float[Tensor, "*batch time"],
    old_values: Float[Tensor, "*batch time"],
    returns: Float[Tensor, "*batch time"],
    mask: MaskT = None,
    *,
    clip: float | None = 0.2,
    agg_mode: str = "token-mean",
    **agg_kwargs: float | None,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """Clipped value loss (PPO2, as in OpenAI baselines and RL2's critic).

    .. math::

        \\ell_t = \\tfrac12 \\max\\big((V_t - R_t)^2,\\ (\\mathrm{clip}(V_t, V^{old}_t \\pm \\epsilon) - R_t)^2\\big)

    ``clip=None`` gives the plain squared error. Metrics: ``vf_clip_frac``, ``value_mean``.

    >>> v = torch.tensor([[1.0, 0.0]]); r = torch.tensor([[0.0, 1.0]])
    >>> value_loss(v, v, r, clip=None)[0].item()
    0.5
    >>> value_loss(v + 1.0, v, r, clip=0.5)[0].item()  # max(4, 2.25) and max(0, 0.25), halved, averaged
    1.0625
    """
    values, old_values, returns = _at_least_f32(values, old_values, returns)  # a float16 clip may overflow
    m = _mask_like(values, check_mask("mask", mask))
    values, old_values, returns = _masked_in(m, values, old_values, returns)
    err = (values - returns).square()
    metrics: dict[str, Tensor] = {}
    if clip is not None:
        check_range("clip", clip, 0.0, None)
        clipped_v = old_values + (values - old_values).clamp(-clip, clip)
        err_c = (clipped_v - returns).square()
        metrics["vf_clip_frac"] = _masked_mean((err_c > err).to(err.dtype), m).detach()
        err = torch.maximum(err, err_c)
    metrics["value_mean"] = _masked_mean(values, m).detach()
    return _aggregate(0.5 * err, m, agg_mode, **agg_kwargs), metrics


@typechecked
def entropy_bonus(
    entropy: Float[Tensor, "*batch time"],
    mask: MaskT = None,
    *,
    coef: float = 0.0,
    agg_mode: str = "token-mean",
    **agg_kwargs: float | None,
) -> tuple[Float[Tensor, ""], dict[str, Tensor]]:
    """Entropy regulariser :math:`-\\beta_H \\cdot \\mathrm{agg}(H_t)` (to be added to the loss).

    Returns the term and ``entropy`` (the token-mean entropy, a metric).

    >>> h = torch.tensor([[1.0, 3.0]])
    >>> term, metrics = entropy_bonus(h, coef=0.1)
    >>> round(term.item(), 6), metrics["entropy"].item()
    (-0.2, 2.0)
    """
    _check_finite("coef", coef)
    m = _mask_like(entropy, check_mask("mask", mask))
    (entropy,) = _masked_in(m, entropy)
    term = -coef * _aggregate(entropy, m, agg_mode, **agg_kwargs)
    return term, {"entropy": _masked_mean(entropy, m).detach()}


# ============================================================================ policy-loss registry
#: What a registered policy loss may read from the caller (not set in a config). Every loss is
#: called as ``fn(logprobs, old_logprobs, advantages, mask, *, agg_mode, global_tokens,
#: global_seqs, [behavior_logprobs], **hyperparameters) -> (loss, metrics)`` with ``[batch, time]``
#: tensors; a sequence-level loss (GSPO, GMPO, ...) forms its per-sequence quantities with
#: ``mask`` and divides by ``global_seqs`` (the row count of the whole batch on all ranks), a
#: token-level one aggregates with :func:`aggregate` and the global counts, so that
#: micro-batch losses add up to the batch loss.
POLICY_LOSS_INPUTS: frozenset[str] = frozenset({
    "logprobs", "old_logprobs", "advantages", "mask", "behavior_logprobs", "agg_mode", "global_tokens",
    "global_seqs",
})
_LOSS_REQUIRED_INPUTS = ("logprobs", "old_logprobs", "advantages", "mask")

L = TypeVar("L", bound=Callable[..., Any])


@dataclass(frozen=True)
class PolicyLoss:
    """A registered policy loss: the function and what its signature says it takes.

    ``inputs``: the caller-supplied arguments it reads (:data:`POLICY_LOSS_INPUTS`);
    ``hyperparameters``: every other keyword; ``defaults``: the hyperparameters'
    defaults (the function's own, overridden by the registration's ``defaults``);
    ``required``: hyperparameters without a default.
    """

    name: str
    fn: Callable[..., Any]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    hyperparameters: tuple[str, ...] = ()
    required: tuple[str, ...] = ()


_LOSSES: dict[str, PolicyLoss] = {}


def _describe_loss(name: str, fn: Callable[..., Any], defaults: Mapping[str, Any]) -> PolicyLoss:
    sig = inspect.signature(fn)
    inputs, hypers, required = [], [], []
    own: dict[str, Any] = {}
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TypeError(f"policy loss {name!r}: parameter {p} of {fn.__qualname__}{sig} must be a named "
                            "keyword-capable parameter (no *args/**kwargs, no positional-only)")
        if p.name in POLICY_LOSS_INPUTS:
            inputs.append(p.name)
            continue
        hypers.append(p.name)
        if p.default is not p.empty:
            own[p.name] = p.default
        elif p.name not in defaults:
            required.append(p.name)
    missing = [k for k in _LOSS_REQUIRED_INPUTS if k not in inputs]
    if missing:
        raise TypeError(f"policy loss {name!r}: {fn.__qualname__} must take {list(_LOSS_REQUIRED_INPUTS)}; "
                        f"missing {missing}")
    unknown = sorted(set(defaults) - set(hypers))
    if unknown:
        raise ValueError(f"register_policy_loss({name!r}): defaults {unknown} are not hyperparameters of "
                         f"{fn.__qualname__}; its hyperparameters are {hypers}")
    merged = {**own, **dict(defaults)}
    return PolicyLoss(name=name, fn=fn, defaults=MappingProxyType({k: merged[k] for k in hypers if k in merged}),
                      inputs=tuple(inputs), hyperparameters=tuple(hypers), required=tuple(required))


def register_policy_loss(name: str, *, defaults: Mapping[str, Any] | None = None) -> Callable[[L], L]:
    """Decorator: register ``fn`` as the policy loss ``name`` (the config's ``actor.loss_type``).

    ``fn`` takes ``logprobs, old_logprobs, advantages, mask`` and optionally
    ``behavior_logprobs, agg_mode, global_tokens, global_seqs`` (see
    :data:`POLICY_LOSS_INPUTS`); its other keywords are hyperparameters, with
    ``defaults`` replacing the function's own. It returns ``(loss, metrics)``: a
    0-d loss and a dict of detached 0-d metric tensors. Registering a name twice
    raises unless it is the same function.

    >>> @register_policy_loss("pg_demo")
    ... def pg_demo(logprobs, old_logprobs, advantages, mask, *, agg_mode="token-mean", scale=1.0):
    ...     return aggregate(-scale * logprobs * advantages, mask, agg_mode), {}
    >>> get_policy_loss("pg_demo").hyperparameters, "pg_demo" in list_policy_losses()
    (('scale',), True)
    >>> unregister_policy_loss("pg_demo")
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"policy loss name must be a Python identifier, got {name!r}")

    def deco(fn: L) -> L:
        put(_LOSSES, "policy loss", name, _describe_loss(name, fn, defaults or {}), fn=fn,
            unregister="unregister_policy_loss")
        return fn

    return deco


def unregister_policy_loss(name: str) -> None:
    """Remove ``name`` from the registry (for tests and interactive redefinition)."""
    get_policy_loss(name)
    del _LOSSES[name]


def list_policy_losses() -> list[str]:
    """Names of the registered policy losses, built-ins first.

    >>> {"vanilla", "gspo", "cispo"} <= set(list_policy_losses())
    True
    """
    _ensure_builtin_losses()
    return list(_LOSSES)


def _ensure_builtin_losses() -> None:
    import rl2fx.policy_losses  # noqa: F401  (importing it registers GSPO, CISPO, SAPO, ... by name)


def get_policy_loss(name: str) -> PolicyLoss:
    """The registered :class:`PolicyLoss` called ``name``; ``ValueError`` with a did-you-mean otherwise.

    >>> get_policy_loss("vanila")
    Traceback (most recent call last):
    ...
    ValueError: unknown policy loss 'vanila'; did you mean 'vanilla'? Registered: [...]
    """
    _ensure_builtin_losses()
    return lookup(_LOSSES, "policy loss", name)


def compute_policy_loss(
    name: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    *,
    behavior_logprobs: Tensor | None = None,
    agg_mode: str = "token-mean",
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    params: Mapping[str, Any] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Call the registered policy loss ``name`` with the inputs it reads and its hyperparameters.

    ``params`` are hyperparameters; names the loss does not take raise ``ValueError``
    (with a did-you-mean). Inputs the loss does not read are not passed.

    >>> lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    >>> loss, _ = compute_policy_loss("vanilla", lp, lp.detach(), torch.tensor([[1.0, -2.0]]), params={"clip": 0.2})
    >>> loss.item()  # -mean(1 * 1, 1 * -2)
    0.5
    """
    spec = get_policy_loss(name)
    params = dict(params or {})
    _check_loss_names(spec, params)
    for arg, x in (("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages),
                   ("mask", mask), ("behavior_logprobs", behavior_logprobs)):
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{arg} must be a torch tensor, got {type(x).__name__} (convert it with torch.as_tensor)")
    given = {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages,
             "mask": torch.ones_like(logprobs) if mask is None else mask, "behavior_logprobs": behavior_logprobs,
             "agg_mode": agg_mode, "global_tokens": global_tokens, "global_seqs": global_seqs}
    args = {**spec.defaults, **params, **{k: v for k, v in given.items() if k in spec.inputs}}
    missing = [k for k in spec.required if k not in args]
    if missing:
        raise ValueError(f"policy loss {name!r} needs hyperparameter(s) {missing}")
    return spec.fn(**args)


def _check_loss_names(spec: PolicyLoss, params: Mapping[str, Any]) -> None:
    for key, value in params.items():
        if key not in spec.hyperparameters:
            best = difflib.get_close_matches(str(key), list(spec.hyperparameters), n=1, cutoff=0.5)
            hint = f"; did you mean {best[0]!r}?" if best else ";"
            raise ValueError(f"policy loss {spec.name!r} has no hyperparameter {key!r}{hint} It takes "
                             f"{list(spec.hyperparameters)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} must be finite, got {value}")


def check_policy_loss_hyperparameters(name: str, params: Mapping[str, Any]) -> None:
    """Check hyperparameters of policy loss ``name`` by the loss's own rules (a probe call).

    Unknown names raise ``ValueError`` with a did-you-mean; values are checked by
    calling the loss once on a tiny batch, so its own checks speak.

    >>> check_policy_loss_hyperparameters("vanilla", {"clip": 0.2, "dual_clip": 3.0})
    >>> check_policy_loss_hyperparameters("vanilla", {"dual_clip": 1.0})
    Traceback (most recent call last):
    ...
    ValueError: dual_clip must be in (1.0, inf], got 1.0
    """
    spec = get_policy_loss(name)
    _check_loss_names(spec, params)
    if any(k not in params and k not in spec.defaults for k in spec.required):
        return  # a probe cannot invent required hyperparameters; the first real call checks them
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]])
    with torch.no_grad():
        compute_policy_loss(name, lp, lp - 0.1, torch.tensor([[1.0, -1.0], [0.5, -0.5]]), torch.ones_like(lp),
                            params=params)


@register_policy_loss("vanilla")
def vanilla_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    behavior_logprobs: Tensor | None = None,
    agg_mode: str = "token-mean",
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    clip: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    tis_cap: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``actor.loss_type=vanilla``: :func:`policy_loss` (PPO clipped surrogate, dual clip, clip-higher, TIS)."""
    return policy_loss(logprobs, old_logprobs, advantages, mask, clip=clip, clip_high=clip_high, dual_clip=dual_clip,
                       behavior_logprobs=behavior_logprobs, tis_cap=tis_cap, agg_mode=agg_mode,
                       global_tokens=global_tokens, global_seqs=global_seqs)
