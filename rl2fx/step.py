"""``train_step`` (one composable optimisation step) and the loss-function factories (core layer).

:func:`train_step` is the whole update, with no globals and no hidden state:
micro-batches with gradient accumulation (each micro-batch loss uses the token
and sequence counts of the *global* batch, so the accumulated gradient equals
the full-batch gradient exactly, also across data-parallel ranks), gradient
clipping and optional autocast. It returns metrics only. Controllers (KL
coefficient, Lagrange multipliers, the Pareto archive) belong to the caller, who
steps them once per iteration from that iteration's measurements (the optax
pattern) and hands their current values in through the loss context.

The loss is any callable ``loss_fn(model, micro_batch, ctx) -> (loss, metrics)``;
:func:`make_ppo_loss` builds the PPO one (a registered policy loss chosen by name,
KL to a reference, entropy, constraint penalties, multi-objective scalarisation)
and :func:`make_value_loss` the critic's.

This module is core: it never imports the application layer (``rl2fx.trainer``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rl2fx._typing import check_choice, check_range
from rl2fx.control.lagrangian import LagrangianState, lagrangian_penalty
from rl2fx.distributed import gradient_sync, is_sharded, reshard, total_grad_norm, unwrap
from rl2fx.logprobs import response_logits, token_logprobs_and_entropy
from rl2fx.losses import (
    AGG_MODES,
    KL_ESTIMATORS,
    check_policy_loss_hyperparameters,
    compute_policy_loss,
    entropy_bonus,
    get_policy_loss,
    kl_estimate,
    kl_loss,
    value_loss,
)

__all__ = [
    "LossContext",
    "LossFn",
    "train_step",
    "check_step_args",
    "make_ppo_loss",
    "make_value_loss",
    "compute_logprobs",
]

Batch = Mapping[str, torch.Tensor]

LossFn = Callable[[torch.nn.Module, Batch, "LossContext"], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class LossContext:
    """What a loss function needs from outside its micro-batch (read-only).

    ``global_tokens`` / ``global_seqs``: mask sum and row count of the whole batch on
    all ranks (the denominators that make micro-batch losses add up to the batch
    loss). ``kl_coef``: the KL coefficient in force, read from the caller's
    controller (``None``: the loss function's own). ``lagrangian``: the caller's
    :class:`~rl2fx.control.lagrangian.LagrangianState` (frozen; its multipliers are
    read) or ``None``. ``multi_objective``: a
    :class:`~rl2fx.pareto.optimizer.MultiObjectiveOptimizer` (its archive is read,
    not changed) or ``None``. ``objective_point``: the iteration's measured objective
    vector (``{"reward": mean score, "kl_penalty": -rollout KL, "entropy": ...}``, the
    archive's scale), where ``multi_objective`` evaluates its archive-relative weights
    (``compute_pareto_loss(..., at=objective_point)``); ``None``: at the surrogates' values.
    """

    global_tokens: float
    global_seqs: float
    kl_coef: float | None = None
    lagrangian: LagrangianState | None = None
    multi_objective: Any = None
    objective_point: Mapping[str, float] | None = None


def _rows(batch: Batch) -> int:
    return int(next(iter(batch.values())).shape[0])


def _slice(batch: Batch, s: int, e: int) -> dict[str, torch.Tensor]:
    return {k: v[s:e] for k, v in batch.items()}


def _dist_on(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def check_step_args(*, micro_batch_size: int | None = None, max_grad_norm: float | None = None) -> None:
    """The checks :func:`train_step` makes of its settings (for callers that validate a config up front).

    >>> check_step_args(micro_batch_size=0)
    Traceback (most recent call last):
    ...
    ValueError: micro_batch_size must be in [1, inf], got 0
    """
    if micro_batch_size is not None:
        check_range("micro_batch_size", micro_batch_size, 1, None)
    if max_grad_norm is not None:
        check_range("max_grad_norm", max_grad_norm, 0.0, None, low_inclusive=False)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    *,
    loss_fn: LossFn,
    micro_batch_size: int | None = None,
    max_grad_norm: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    kl_coef: float | None = None,
    lagrangian: LagrangianState | None = None,
    multi_objective: Any = None,
    objective_point: Mapping[str, float] | None = None,
    step: int = 0,
    scheduler: Any = None,
    process_group: Any = None,
) -> dict[str, Any]:
    """One optimisation step of ``model`` on ``batch``; returns metrics (no controller state in or out).

    ``batch`` maps names to tensors whose first dimension is the sequence index
    and must hold ``response_mask`` ``[batch, time]``; everything else is for
    ``loss_fn``. The batch is cut into micro-batches of ``micro_batch_size`` rows;
    for each, ``loss_fn(model, micro_batch, ctx)`` returns the micro-batch's share
    of the batch loss (normalised by ``ctx.global_tokens`` / ``ctx.global_seqs``),
    which is back-propagated. Under ``torch.distributed`` the counts are summed
    over ranks and the loss multiplied by the world size, so the gradient averaging
    of DDP and of FSDP2 (:func:`rl2fx.distributed.wrap_policy`) yields the gradient
    of the global-batch loss; gradient sync happens on the last micro-batch only
    (:func:`rl2fx.distributed.gradient_sync`: DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync``; under FSDP2 every rank must have the same number
    of micro-batches, else all raise). Then the gradient norm, over all parameters
    and, under FSDP2, over all their shards, is clipped to ``max_grad_norm`` and
    ``optimizer.step()`` runs.

    Controllers are the caller's: ``kl_coef`` (e.g. ``kl_state.coef`` of a
    :class:`~rl2fx.control.kl.KLState`), ``lagrangian`` (a frozen
    :class:`~rl2fx.control.lagrangian.LagrangianState`) and ``multi_objective``
    (with ``objective_point``, the measured objective vector it is evaluated at)
    reach the loss through ``ctx`` and are only read; the caller updates them once
    per iteration from that iteration's measurements (``kl_update``,
    ``lagrangian_update``), however many update epochs it runs. The returned dict
    holds float metrics, averaged over micro-batches and ranks weighted by tokens
    (plus ``kl_coef`` when given).

    >>> import torch
    >>> model = torch.nn.Linear(1, 1, bias=False)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> def loss_fn(m, mb, ctx):  # mean squared error over masked tokens
    ...     err = (m(mb["x"].unsqueeze(-1)).squeeze(-1) - mb["y"]) ** 2 * mb["response_mask"]
    ...     return err.sum() / ctx.global_tokens, {}
    >>> batch = {"x": torch.ones(4, 2), "y": torch.zeros(4, 2), "response_mask": torch.ones(4, 2)}
    >>> with torch.no_grad(): _ = model.weight.fill_(1.0)
    >>> out = train_step(model, opt, batch, loss_fn=loss_fn, micro_batch_size=1)
    >>> round(out["loss"], 4), round(model.weight.item(), 4)  # d/dw (w^2) = 2w: 1 - 0.1 * 2
    (1.0, 0.8)
    """
    n = _rows(batch)
    check_step_args(micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm)
    mb = n if micro_batch_size is None else int(micro_batch_size)
    if "response_mask" not in batch:
        raise ValueError(f"batch must hold 'response_mask'; got keys {sorted(batch)}")
    mask = batch["response_mask"]
    counts = torch.tensor([float(mask.sum()), float(n)], dtype=torch.float64, device=mask.device)
    world = 1
    if _dist_on(process_group):
        world = dist.get_world_size(process_group)
        if not (is_sharded(model) or unwrap(model) is not model or hasattr(model, "no_sync")):
            # the loss is scaled by the world size for a wrapper that averages gradients;
            # a bare model would step on its own, world-times-scaled gradient
            raise ValueError(f"train_step under torch.distributed ({world} processes) needs a data-parallel "
                             f"model (DDP or FSDP2: rl2fx.distributed.wrap_policy), got {type(model).__name__}")
        dist.all_reduce(counts, group=process_group)
    ctx = LossContext(
        global_tokens=float(counts[0].clamp_min(1.0)), global_seqs=float(counts[1]),
        kl_coef=None if kl_coef is None else float(kl_coef), lagrangian=lagrangian,
        multi_objective=multi_objective, objective_point=objective_point,
    )
    device_type = mask.device.type
    optimizer.zero_grad(set_to_none=True)
    total_loss = torch.zeros((), dtype=torch.float64, device=mask.device)
    sums: dict[str, torch.Tensor] = {}
    starts = list(range(0, n, mb))
    if world > 1 and is_sharded(model):
        # every forward pass of an FSDP2 model all-gathers with the other ranks: a rank with
        # fewer micro-batches would leave the others waiting; all ranks see this and raise
        spread = torch.tensor([len(starts), -len(starts)], dtype=torch.float64, device=mask.device)
        dist.all_reduce(spread, op=dist.ReduceOp.MAX, group=process_group)
        if spread[0] != -spread[1]:
            raise ValueError(f"under FSDP2 every rank must run the same number of micro-batches; they range from "
                             f"{int(-spread[1])} to {int(spread[0])} (this rank: {n} rows, micro_batch_size={mb}); "
                             "give every rank the same number of rows")
    for i, s in enumerate(starts):
        micro = _slice(batch, s, min(s + mb, n))
        weight = micro["response_mask"].sum().to(torch.float64)
        last = i == len(starts) - 1
        amp = (torch.autocast(device_type=device_type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        with gradient_sync(model, last):
            with amp:
                loss, metrics = loss_fn(model, micro, ctx)
            (loss * world).backward()
        total_loss += loss.detach().to(torch.float64)
        for k, v in metrics.items():
            sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=mask.device)) + \
                v.detach().to(torch.float64) * weight
    names = sorted(sums)
    packed = torch.stack([total_loss, counts[0].new_tensor(float(mask.sum()))] + [sums[k] for k in names])
    if world > 1:
        dist.all_reduce(packed, group=process_group)
    tokens = float(packed[1].clamp_min(1.0))
    out: dict[str, Any] = {"loss": float(packed[0])}
    out.update({k: float(packed[2 + j]) / tokens for j, k in enumerate(names)})
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    out["grad_norm"] = total_grad_norm(params, max_grad_norm)
    if not math.isfinite(out["grad_norm"]):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite gradient norm ({out['grad_norm']}) at step {step}; step skipped")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    out["lr"] = float(optimizer.param_groups[0]["lr"])
    if kl_coef is not None:
        out["kl_coef"] = float(kl_coef)
    return out


def compute_logprobs(
    model: torch.nn.Module,
    batch: Batch,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of ``batch["response_ids"]`` under ``model``: ``[batch, response_len]``.

    Without gradients (old and reference log-probs) an FSDP2 model is resharded after
    the forward pass, so no rank keeps gathered parameters between passes.
    """
    resp = batch["response_ids"]
    logits = response_logits(model, batch["input_ids"], batch.get("attention_mask"), resp.shape[-1])
    if not torch.is_grad_enabled():
        # no backward follows to free an FSDP2 model's gathered root parameters
        reshard(model)
    return token_logprobs_and_entropy(logits, resp, temperature=temperature, chunk_size=chunk_size,
                                      with_entropy=with_entropy)


def make_ppo_loss(
    *,
    loss_type: str = "vanilla",
    loss_params: Mapping[str, Any] | None = None,
    clip: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy_coef: float = 0.0,
    agg_mode: str = "token-mean",
    temperature: float = 1.0,
    chunk_size: int = 256,
    tis_cap: float | None = None,
    kl_log_ratio_clamp: float | None = None,
    kl_value_clamp: float | None = None,
) -> LossFn:
    """The PPO policy loss as a ``loss_fn`` for :func:`train_step`.

    Needs ``input_ids``, ``attention_mask``, ``response_ids``, ``response_mask``,
    ``advantages`` in the batch; ``old_logprobs`` (without them the loss's own
    detached log-probs stand in: right for one update on on-policy data only,
    see :func:`rl2fx.experience.experience_needs`); ``ref_logprobs`` for the KL
    term; ``behavior_logprobs`` for truncated importance sampling. The policy term
    :math:`\\mathcal{L}^{PG}` is the registered policy loss ``loss_type``
    (:func:`~rl2fx.losses.register_policy_loss`; ``vanilla``: PPO's clipped
    surrogate, Schulman et al. 2017). ``clip``, ``clip_high``, ``dual_clip`` and
    ``tis_cap`` go to every policy loss that takes them; ``kl_log_ratio_clamp`` and
    ``kl_value_clamp`` are verl's ``low_var_kl`` clamps of the KL estimate; ``loss_params`` holds its
    other hyperparameters. Both are checked by the loss's own rules here, before
    any training. The loss is

    .. math::

        \\mathcal{L} = \\mathcal{L}^{PG} + \\beta\\,\\mathrm{agg}(\\widehat{KL}_t)
        - \\beta_H\\,\\mathrm{agg}(H_t) + \\lambda_{KL}(\\mathrm{KL} - c_{KL}) + \\lambda_H(c_H - H)

    (``β`` from ``ctx.kl_coef`` if set, else ``kl_coef``; the last two terms with a
    Lagrangian state). With ``ctx.multi_objective`` the loss is instead its
    scalarisation of ``{"reward": -L^PG, "kl_penalty": -KL, "entropy": H}``
    (micro-batch means, weighted by the micro-batch's share of the tokens).

    >>> make_ppo_loss(loss_type="vanilla", dual_clip=0.5)
    Traceback (most recent call last):
    ...
    ValueError: dual_clip must be in (1.0, inf], got 0.5
    """
    check_choice("agg_mode", agg_mode, AGG_MODES)
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if kl_log_ratio_clamp is not None:
        check_range("kl_log_ratio_clamp", kl_log_ratio_clamp, 0.0, None, low_inclusive=False)
    if kl_value_clamp is not None:
        check_range("kl_value_clamp", kl_value_clamp, 0.0, None, low_inclusive=False)
    clamps = {"log_ratio_clamp": kl_log_ratio_clamp, "value_clamp": kl_value_clamp}
    spec = get_policy_loss(loss_type)
    shared = {"clip": clip, "clip_high": clip_high, "dual_clip": dual_clip, "tis_cap": tis_cap}
    params = {**{k: v for k, v in shared.items() if k in spec.hyperparameters}, **dict(loss_params or {})}
    check_policy_loss_hyperparameters(loss_type, params)

    def loss_fn(model: torch.nn.Module, mb: Batch, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = mb["response_mask"]
        need_ent = entropy_coef > 0 or ctx.lagrangian is not None or ctx.multi_objective is not None
        lp, ent = compute_logprobs(model, mb, temperature=temperature, chunk_size=chunk_size,
                                   with_entropy=True)
        agg = {"global_tokens": ctx.global_tokens, "global_seqs": ctx.global_seqs}
        # No old log-probs: on-policy data with one update (rl2fx.experience.experience_needs), where the
        # sampler's log-probs are this forward pass's own, detached (ratio exactly 1, gradient unchanged).
        old = mb["old_logprobs"] if "old_logprobs" in mb else lp.detach()
        pg, metrics = compute_policy_loss(loss_type, lp, old, mb["advantages"], mask,
                                          behavior_logprobs=mb.get("behavior_logprobs"), agg_mode=agg_mode,
                                          params=params, **agg)
        beta = kl_coef if ctx.kl_coef is None else ctx.kl_coef
        loss = pg
        if "ref_logprobs" in mb:
            kl_term, kl_metrics = kl_loss(lp, mb["ref_logprobs"], beta, estimator=kl_estimator, mask=mask,
                                          agg_mode=agg_mode, old_logprobs=old, **clamps, **agg)
            metrics.update(kl_metrics)
            if beta > 0:
                loss = loss + kl_term
        assert ent is not None
        ent_term, ent_metrics = entropy_bonus(ent if need_ent else ent.detach(), mask, coef=entropy_coef,
                                              agg_mode=agg_mode, **agg)
        metrics.update(ent_metrics)
        if entropy_coef > 0:
            loss = loss + ent_term
        if ctx.lagrangian is not None or ctx.multi_objective is not None:
            # Constraints and objectives are defined on batch means; each micro-batch
            # contributes its local means weighted by its share of the tokens, which
            # adds up exactly for linear terms (Lagrangian, weighted sum).
            n_tok = mask.sum().clamp_min(1.0)
            frac = n_tok / ctx.global_tokens
            # select before any arithmetic: a NaN/inf at a padded position times 0 is NaN (and so is its gradient)
            keep = mask != 0
            if "ref_logprobs" in mb:
                kl_t = kl_estimate(torch.where(keep, lp, 0.0), torch.where(keep, mb["ref_logprobs"], 0.0), kl_estimator,
                                   old_logprobs=torch.where(keep, old, 0.0), **clamps)
                kl_mean = (kl_t * mask).sum() / n_tok
            else:
                kl_mean = torch.zeros((), device=lp.device)
            ent_mean = (torch.where(keep, ent, 0.0) * mask).sum() / n_tok
        if ctx.lagrangian is not None:
            terms = lagrangian_penalty(ctx.lagrangian, kl=kl_mean, entropy=ent_mean)
            loss = loss + frac * terms["total"]
            metrics["lagrangian_penalty"] = terms["total"].detach()
        if ctx.multi_objective is not None:
            # the policy loss as a local token mean (for a token-level loss, the mean surrogate)
            surrogate, _ = compute_policy_loss(loss_type, lp, old, mb["advantages"], mask,
                                               behavior_logprobs=mb.get("behavior_logprobs"),
                                               agg_mode="token-mean", params=params)
            objectives = {"reward": -surrogate, "kl_penalty": -kl_mean, "entropy": ent_mean}
            unknown = [o for o in ctx.multi_objective.objectives if o not in objectives]
            if unknown:
                raise ValueError(f"multi_objective.objectives {unknown} are not computed by the PPO loss; "
                                 f"available: {sorted(objectives)}")
            wanted = {k: objectives[k] for k in ctx.multi_objective.objectives}
            at = None
            if ctx.objective_point is not None:
                at = {k: ctx.objective_point[k] for k in ctx.multi_objective.objectives}
                # which objective the method pushes, and how hard, at the measured point (logged per step)
                for k, w in ctx.multi_objective.gradient_weights(at).items():
                    metrics[f"pareto_weight_{k}"] = torch.tensor(-w)
            loss = frac * ctx.multi_objective.compute_pareto_loss(wanted, at=at)
            metrics["pareto_loss"] = (loss / frac).detach()
        return loss, metrics

    return loss_fn


def make_value_loss(*, clip: float | None = 0.2, coef: float = 1.0, agg_mode: str = "token-mean") -> LossFn:
    """Clipped value loss as a ``loss_fn`` for a value model (batch: ``old_values``, ``returns``).

    The settings are checked at once by :func:`~rl2fx.losses.value_loss` itself (a probe call).

    >>> make_value_loss(clip=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: clip must be in [0.0, inf], got -1.0
    """
    probe = torch.zeros(1, 1)
    value_loss(probe, probe, probe, clip=clip, agg_mode=agg_mode)

    def loss_fn(model: torch.nn.Module, mb: Batch, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r = mb["response_mask"].shape[-1]
        values = model(mb["input_ids"], mb.get("attention_mask"))[:, -r - 1:-1]
        loss, metrics = value_loss(values, mb["old_values"], mb["returns"], mb["response_mask"], clip=clip,
                                   agg_mode=agg_mode, global_tokens=ctx.global_tokens,
                                   global_seqs=ctx.global_seqs)
        return coef * loss, metrics

    return loss_fn


