"""``train_step`` (one composable optimisation step) and ``PPOTrainer`` (the reference loop).

:func:`train_step` is the whole update, with no globals and no hidden state:
micro-batches with gradient accumulation (each micro-batch loss uses the token
and sequence counts of the *global* batch, so the accumulated gradient equals
the full-batch gradient exactly, also across data-parallel ranks), gradient
clipping, optional autocast, and the controllers (KL coefficient, Lagrange
multipliers) passed in as states and returned updated. The loss is any callable
``loss_fn(model, micro_batch, ctx) -> (loss, metrics)``; :func:`make_ppo_loss`
builds the PPO one (clipped surrogate, KL to a reference, entropy, constraint
penalties, multi-objective scalarisation).

:class:`PPOTrainer` drives the spec's YAML schema end to end: rollouts with
``model.generate``, task rewards, reference-model KL, optional critic,
``adv.estimator``, adaptive KL, constraints, multi-objective loss, memory
options and profiling, MLflow/W&B tracking, checkpoint and exact resume, and
data parallelism under ``torchrun`` (DDP + global advantage whitening).

Run it: ``python -m rl2fx.train --config-name demo trainer.total_steps=50``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from rl2fx.config import (
    VALUE_ESTIMATORS,
    ConfigError,
    load_config,
    structured_from_hydra,
    to_container,
)
from rl2fx.logprobs import response_logits, token_logprobs_and_entropy
from rl2fx.losses import (
    entropy_bonus,
    kl_estimate,
    kl_loss,
    kl_penalized_rewards,
    policy_loss,
    value_loss,
)

__all__ = [
    "LossContext",
    "train_step",
    "make_ppo_loss",
    "make_value_loss",
    "compute_logprobs",
    "PPOTrainer",
    "main",
]

Batch = Mapping[str, torch.Tensor]

#: ``adv.estimator`` values that need no critic: group baselines over the responses of a prompt
GROUP_ESTIMATORS = ("reinforce", "grpo", "dr_grpo", "rloo", "reinforce_pp", "remax", "opo", "gpg", "grpo_passk",
                    "reinforce_pp_baseline")
LossFn = Callable[[torch.nn.Module, Batch, "LossContext"], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class LossContext:
    """What a loss function needs from outside its micro-batch (read-only).

    ``global_tokens`` / ``global_seqs``: mask sum and row count of the whole batch on
    all ranks (the denominators that make micro-batch losses add up to the batch
    loss). ``kl_coef``: the KL coefficient from the controller (``None``: the loss
    function's own). ``lagrangian``: a :class:`~rl2fx.control.lagrangian.LagrangianState`
    or ``None``. ``multi_objective``: a :class:`~rl2fx.pareto.optimizer.MultiObjectiveOptimizer`
    (its archive is read, not changed) or ``None``.
    """

    global_tokens: float
    global_seqs: float
    kl_coef: float | None = None
    lagrangian: Any = None
    multi_objective: Any = None


def _rows(batch: Batch) -> int:
    return int(next(iter(batch.values())).shape[0])


def _slice(batch: Batch, s: int, e: int) -> dict[str, torch.Tensor]:
    return {k: v[s:e] for k, v in batch.items()}


def _dist_on(group: Any = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    *,
    loss_fn: LossFn,
    micro_batch_size: int | None = None,
    max_grad_norm: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    kl_state: Any = None,
    lagrangian_state: Any = None,
    multi_objective: Any = None,
    step: int = 0,
    scheduler: Any = None,
    process_group: Any = None,
) -> dict[str, Any]:
    """One optimisation step of ``model`` on ``batch``; returns metrics and the controllers' new states.

    ``batch`` maps names to tensors whose first dimension is the sequence index
    and must hold ``response_mask`` ``[batch, time]``; everything else is for
    ``loss_fn``. The batch is cut into micro-batches of ``micro_batch_size`` rows;
    for each, ``loss_fn(model, micro_batch, ctx)`` returns the micro-batch's share
    of the batch loss (normalised by ``ctx.global_tokens`` / ``ctx.global_seqs``),
    which is back-propagated. Under ``torch.distributed`` the counts are summed
    over ranks and the loss multiplied by the world size, so DDP's gradient
    averaging yields the gradient of the global-batch loss; gradient sync happens
    on the last micro-batch only (``no_sync``). Then the gradient norm is clipped
    to ``max_grad_norm`` and ``optimizer.step()`` runs.

    Controllers: ``kl_state`` (a :class:`~rl2fx.control.kl.KLState`) supplies
    ``ctx.kl_coef`` and is updated with the step's mean KL
    (:func:`~rl2fx.control.kl.kl_update`); ``lagrangian_state`` supplies the
    multipliers and takes one dual ascent step on the measured KL and entropy.
    The returned dict holds float metrics (averaged over micro-batches and ranks,
    weighted by tokens) plus ``"kl_state"`` / ``"lagrangian_state"`` when given.

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
    from rl2fx.control.kl import kl_update
    from rl2fx.control.lagrangian import lagrangian_update

    n = _rows(batch)
    mb = n if micro_batch_size is None else int(micro_batch_size)
    if mb < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if "response_mask" not in batch:
        raise ValueError(f"batch must hold 'response_mask'; got keys {sorted(batch)}")
    mask = batch["response_mask"]
    counts = torch.tensor([float(mask.sum()), float(n)], dtype=torch.float64, device=mask.device)
    world = 1
    if _dist_on(process_group):
        dist.all_reduce(counts, group=process_group)
        world = dist.get_world_size(process_group)
    ctx = LossContext(
        global_tokens=float(counts[0].clamp_min(1.0)), global_seqs=float(counts[1]),
        kl_coef=None if kl_state is None else float(kl_state.coef),
        lagrangian=lagrangian_state, multi_objective=multi_objective,
    )
    device_type = mask.device.type
    optimizer.zero_grad(set_to_none=True)
    total_loss = torch.zeros((), dtype=torch.float64, device=mask.device)
    sums: dict[str, torch.Tensor] = {}
    starts = list(range(0, n, mb))
    for i, s in enumerate(starts):
        micro = _slice(batch, s, min(s + mb, n))
        weight = micro["response_mask"].sum().to(torch.float64)
        last = i == len(starts) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        amp = (torch.autocast(device_type=device_type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        with sync:
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
    if max_grad_norm is not None:
        gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        gn = torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])) if params else \
            torch.zeros(())
    out["grad_norm"] = float(gn)
    if not math.isfinite(out["grad_norm"]):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite gradient norm ({out['grad_norm']}) at step {step}; step skipped")
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    out["lr"] = float(optimizer.param_groups[0]["lr"])
    if kl_state is not None:
        out["kl_coef"] = float(kl_state.coef)
        out["kl_state"] = kl_update(kl_state, max(out.get("kl", 0.0), 0.0), step)
    if lagrangian_state is not None:
        out["lagrangian_state"] = lagrangian_update(lagrangian_state, kl=max(out.get("kl", 0.0), 0.0),
                                                    entropy=out.get("entropy"))
    return out


def compute_logprobs(
    model: torch.nn.Module,
    batch: Batch,
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of ``batch["response_ids"]`` under ``model``: ``[batch, response_len]``."""
    resp = batch["response_ids"]
    logits = response_logits(model, batch["input_ids"], batch.get("attention_mask"), resp.shape[-1])
    return token_logprobs_and_entropy(logits, resp, temperature=temperature, chunk_size=chunk_size,
                                      with_entropy=with_entropy)


def make_ppo_loss(
    *,
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
) -> LossFn:
    """The PPO policy loss as a ``loss_fn`` for :func:`train_step`.

    Needs ``input_ids``, ``attention_mask``, ``response_ids``, ``response_mask``,
    ``old_logprobs``, ``advantages`` in the batch; ``ref_logprobs`` for the KL
    term; ``behavior_logprobs`` for truncated importance sampling. The loss is

    .. math::

        \\mathcal{L} = \\mathcal{L}^{CLIP} + \\beta\\,\\mathrm{agg}(\\widehat{KL}_t)
        - \\beta_H\\,\\mathrm{agg}(H_t) + \\lambda_{KL}(\\mathrm{KL} - c_{KL}) + \\lambda_H(c_H - H)

    (``β`` from ``ctx.kl_coef`` if set, else ``kl_coef``; the last two terms with a
    Lagrangian state). With ``ctx.multi_objective`` the loss is instead its
    scalarisation of ``{"reward": -L^CLIP, "kl_penalty": -KL, "entropy": H}``
    (micro-batch means, weighted by the micro-batch's share of the tokens).
    """
    from rl2fx.control.lagrangian import lagrangian_penalty

    def loss_fn(model: torch.nn.Module, mb: Batch, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = mb["response_mask"]
        need_ent = entropy_coef > 0 or ctx.lagrangian is not None or ctx.multi_objective is not None
        lp, ent = compute_logprobs(model, mb, temperature=temperature, chunk_size=chunk_size,
                                   with_entropy=True)
        agg = {"global_tokens": ctx.global_tokens, "global_seqs": ctx.global_seqs}
        pg, metrics = policy_loss(lp, mb["old_logprobs"], mb["advantages"], mask, clip=clip, clip_high=clip_high,
                                  dual_clip=dual_clip, behavior_logprobs=mb.get("behavior_logprobs"),
                                  tis_cap=tis_cap, agg_mode=agg_mode, **agg)
        beta = kl_coef if ctx.kl_coef is None else ctx.kl_coef
        loss = pg
        if "ref_logprobs" in mb:
            kl_term, kl_metrics = kl_loss(lp, mb["ref_logprobs"], beta, estimator=kl_estimator, mask=mask,
                                          agg_mode=agg_mode, **agg)
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
            if "ref_logprobs" in mb:
                kl_mean = (kl_estimate(lp, mb["ref_logprobs"], kl_estimator) * mask).sum() / n_tok
            else:
                kl_mean = torch.zeros((), device=lp.device)
            ent_mean = (ent * mask).sum() / n_tok
        if ctx.lagrangian is not None:
            terms = lagrangian_penalty(ctx.lagrangian, kl=kl_mean, entropy=ent_mean)
            loss = loss + frac * terms["total"]
            metrics["lagrangian_penalty"] = terms["total"].detach()
        if ctx.multi_objective is not None:
            surrogate = (_pg_token_loss(lp, mb, clip, clip_high, dual_clip) * mask).sum() / n_tok
            objectives = {"reward": -surrogate, "kl_penalty": -kl_mean, "entropy": ent_mean}
            unknown = [o for o in ctx.multi_objective.objectives if o not in objectives]
            if unknown:
                raise ValueError(f"multi_objective.objectives {unknown} are not computed by the PPO loss; "
                                 f"available: {sorted(objectives)}")
            wanted = {k: objectives[k] for k in ctx.multi_objective.objectives}
            loss = frac * ctx.multi_objective.compute_pareto_loss(wanted)
            metrics["pareto_loss"] = (loss / frac).detach()
        return loss, metrics

    return loss_fn


def _pg_token_loss(lp: torch.Tensor, mb: Batch, clip: float, clip_high: float | None,
                dual_clip: float | None) -> torch.Tensor:
    """Per-token clipped surrogate loss (for objectives that need it unaggregated)."""
    ratio = torch.exp(lp - mb["old_logprobs"])
    adv = mb["advantages"]
    hi = clip if clip_high is None else clip_high
    loss = -torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + hi) * adv)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    return loss


def make_value_loss(*, clip: float | None = 0.2, coef: float = 1.0, agg_mode: str = "token-mean") -> LossFn:
    """Clipped value loss as a ``loss_fn`` for a value model (batch: ``old_values``, ``returns``)."""

    def loss_fn(model: torch.nn.Module, mb: Batch, ctx: LossContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r = mb["response_mask"].shape[-1]
        values = model(mb["input_ids"], mb.get("attention_mask"))[:, -r - 1:-1]
        loss, metrics = value_loss(values, mb["old_values"], mb["returns"], mb["response_mask"], clip=clip,
                                   agg_mode=agg_mode, global_tokens=ctx.global_tokens,
                                   global_seqs=ctx.global_seqs)
        return coef * loss, metrics

    return loss_fn


# ============================================================================ trainer
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def _as_config(config: Any) -> DictConfig:
    if config is None:
        return load_config()
    if isinstance(config, str | os.PathLike):
        return load_config(config)
    if isinstance(config, Mapping) and not isinstance(config, DictConfig):
        config = OmegaConf.create(dict(config))
    if isinstance(config, DictConfig):
        return structured_from_hydra(config)
    raise ConfigError(f"config must be a DictConfig, a mapping or a YAML path, got {type(config).__name__}")


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "prompts": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["prompts"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PPOTrainer:
    """The reference PPO/GRPO loop driven by the spec's configuration schema (:func:`rl2fx.load_config`).

    ``config``: a ``DictConfig`` (for instance from Hydra), a plain mapping or a
    YAML path; it is validated against the schema. Under ``torchrun`` (``WORLD_SIZE``
    > 1) a process group is started (gloo on CPU, nccl on CUDA), the policy and
    critic are wrapped in DDP, every rank draws its own prompts, and advantages
    are whitened over the global batch.

    ``train()`` runs ``trainer.total_steps`` steps (continuing from a checkpoint
    when ``trainer.resume_from`` is set) and returns the final metrics:
    ``reward_start`` / ``reward_end`` (mean task reward over the first / last
    ``trainer.summary_window`` steps), ``chance_reward``, ``kl``, ``steps``,
    ``wall_time_s``, and the paths of the checkpoint, MLflow store and memory profile.
    """

    def __init__(self, config: Any = None) -> None:
        from rl2fx.tasks import DigitCopyTask, build_tiny_critic, build_tiny_lm, build_tokenizer

        self.cfg = cfg = _as_config(config)
        t = cfg.trainer
        if cfg.data.train_data_path is not None or cfg.data.test_data_path is not None:
            raise ConfigError("config key 'data.train_data_path' / 'data.test_data_path' must be null: the "
                              "built-in digits task generates its prompts (task.*)")
        if t.num_threads is not None:
            torch.set_num_threads(int(t.num_threads))
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and t.device != "cpu" else "gloo"
            dist.init_process_group(backend=backend)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        if t.device == "auto":
            if torch.cuda.is_available():
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            else:
                self.device = torch.device("cpu")
        else:
            self.device = torch.device(t.device)
        # Every rank gets its own stream (different prompts and samples), reproducible from the seed.
        seed = int(t.seed) + 1000 * self.rank
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        self.prompt_generator = torch.Generator().manual_seed(seed)

        self.tokenizer = build_tokenizer()
        self.task = DigitCopyTask(n_digits=int(cfg.task.n_digits), mode=str(cfg.task.mode))
        self.prompts_per_rollout = int(cfg.data.prompts_per_rollout or 8)
        self.group_size = int(cfg.data.responses_per_prompt or 8)
        self.max_new_tokens = int(cfg.rollout.max_new_tokens or self.task.answer_len + 1)
        m = cfg.model
        arch = dict(arch=m.arch, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                    intermediate_size=m.intermediate_size, max_position_embeddings=m.max_position_embeddings,
                    pad_token_id=self.tokenizer.pad_token_id, bos_token_id=self.tokenizer.bos_token_id,
                    eos_token_id=self.tokenizer.eos_token_id)
        if cfg.actor.model_name is not None:
            from transformers import AutoModelForCausalLM

            # local_files_only: a model name that is not a local directory fails instead of downloading
            policy = AutoModelForCausalLM.from_pretrained(cfg.actor.model_name, local_files_only=True)
        else:
            policy = build_tiny_lm(len(self.tokenizer), seed=int(m.seed), **arch)
        self.policy = policy.to(self.device)
        self.ref_model = copy.deepcopy(self.policy).eval().requires_grad_(False)
        need_values = cfg.adv.estimator in VALUE_ESTIMATORS
        self.use_critic = bool(need_values if cfg.critic.enabled is None else cfg.critic.enabled)
        self.critic = (build_tiny_critic(len(self.tokenizer), seed=int(m.seed) + 1, **arch).to(self.device)
                       if self.use_critic else None)

        mem = cfg.memory_optimization
        self.memory_optimizer = None
        self.autocast_dtype: torch.dtype | None = None
        if mem.enabled:
            from rl2fx.memory.optimizer import MemoryOptimizer, autocast_dtype

            self.memory_optimizer = MemoryOptimizer.from_config(to_container(mem))
            self.memory_optimizer.optimize_model_memory(self.policy)
            if self.critic is not None:
                self.memory_optimizer.optimize_model_memory(self.critic)
            if mem.enable_mixed_precision:
                self.autocast_dtype = autocast_dtype(self.device.type)
        from rl2fx.memory.profiler import MemoryProfiler

        prof = mem.profiling
        self.profiler = MemoryProfiler(enabled=bool(prof.enabled) and self.rank == 0,
                                       profile_interval=float(prof.profile_interval), save_path=prof.save_path)

        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=float(cfg.actor.lr),
                                           weight_decay=float(t.weight_decay))
        self.critic_optimizer = (torch.optim.AdamW(self.critic.parameters(), lr=float(cfg.critic.lr))
                                 if self.critic is not None else None)
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.policy = DDP(self.policy, device_ids=ids)
            if self.critic is not None:
                self.critic = DDP(self.critic, device_ids=ids)

        from rl2fx.control.kl import kl_init
        from rl2fx.control.lagrangian import lagrangian_init

        ak = cfg.actor.kl.adaptive_kl
        self.kl_state = None
        if ak.enabled:
            params = {k: ak[k] for k in ("exp_factor", "exp_decay", "linear_factor", "kp", "ki", "kd",
                                         "schedule_type", "schedule_steps")}
            self.kl_state = kl_init(ak.controller_type, initial_coef=ak.initial_coef, target_kl=ak.target_kl,
                                    min_coef=ak.min_coef, max_coef=ak.max_coef, **params)
        co = cfg.actor.kl.constraint_optimization
        self.lagrangian_state = (lagrangian_init(kl_constraint=co.kl_constraint,
                                                 entropy_constraint=co.entropy_constraint,
                                                 use_lagrangian=co.use_lagrangian, lagrangian_lr=co.lagrangian_lr)
                                 if co.enabled else None)
        mo = cfg.multi_objective
        self.multi_objective = None
        if mo.enabled:
            from rl2fx.pareto.optimizer import MultiObjectiveOptimizer

            self.multi_objective = MultiObjectiveOptimizer(
                objectives=list(mo.objectives), objective_weights=dict(mo.objective_weights),
                pareto_method=mo.pareto_method, diversity_weight=mo.diversity_weight, archive_size=mo.archive_size)
        self.loss_fn = make_ppo_loss(
            clip=float(cfg.actor.clip), clip_high=t.clip_high, dual_clip=t.dual_clip,
            kl_coef=float(cfg.actor.kl.coef) if t.kl_type == "loss" else 0.0, kl_estimator=t.kl_estimator,
            entropy_coef=float(t.entropy_coef), agg_mode=t.agg_mode, temperature=float(cfg.rollout.temperature),
            chunk_size=int(t.logprob_chunk_size))
        self.value_loss_fn = make_value_loss(clip=cfg.critic.clip, coef=float(cfg.critic.coef), agg_mode=t.agg_mode)

        self.output_dir = Path(t.output_dir)
        self.step = 0
        self.history: dict[str, list[float]] = {"reward": [], "kl": []}
        if t.resume_from is not None:
            path = self.latest_checkpoint() if t.resume_from == "auto" else Path(t.resume_from)
            if path is not None:
                self.load_checkpoint(path)

    # ------------------------------------------------------------------ rollout
    def kl_coef(self) -> float:
        """The KL coefficient in force: the controller's, else ``actor.kl.coef``."""
        return float(self.kl_state.coef) if self.kl_state is not None else float(self.cfg.actor.kl.coef)

    @torch.no_grad()
    def greedy_rewards(self, prompts: Any) -> torch.Tensor:
        """ReMax's baselines: the task reward of one greedy response per prompt, ``[n_prompts]``.

        The greedy response goes through the same :func:`~rl2fx.rollout.rollout`
        path with ``do_sample=False`` (no RNG is drawn, so the sampled rollouts
        are unchanged). The baseline is the task reward alone, without the KL
        penalty of ``kl_type=reward`` (as verl's ReMax).
        """
        from rl2fx.rollout import rollout

        greedy = rollout(self.policy, prompts.input_ids.to(self.device), responses_per_prompt=1,
                         max_new_tokens=self.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                         pad_token_id=self.tokenizer.pad_token_id, do_sample=False)
        return self.task.reward(greedy["response_ids"], prompts.answers.to(self.device))

    @torch.no_grad()
    def make_experience(self) -> dict[str, torch.Tensor]:
        """One rollout batch with rewards, old/ref log-probs, values and advantages."""
        from rl2fx.returns import advantages, whiten
        from rl2fx.rollout import rollout, scatter_last

        cfg = self.cfg
        prompts = self.task.sample_prompts(self.prompts_per_rollout, self.prompt_generator)
        batch = rollout(self.policy, prompts.input_ids.to(self.device), responses_per_prompt=self.group_size,
                        max_new_tokens=self.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                        pad_token_id=self.tokenizer.pad_token_id, temperature=float(cfg.rollout.temperature),
                        top_k=int(cfg.rollout.top_k), top_p=float(cfg.rollout.top_p))
        answers = prompts.answers.repeat_interleave(self.group_size, 0).to(self.device)
        scores = self.task.reward(batch["response_ids"], answers)
        mask = batch["response_mask"]
        temp, chunk = float(cfg.rollout.temperature), int(cfg.trainer.logprob_chunk_size)
        self.policy.eval()
        old_lp, _ = compute_logprobs(_unwrap(self.policy), batch, temperature=temp, chunk_size=chunk)
        ref_lp, _ = compute_logprobs(self.ref_model, batch, temperature=temp, chunk_size=chunk)
        self.policy.train()
        kl_tok = kl_estimate(old_lp, ref_lp, cfg.trainer.kl_estimator) * mask
        rewards = scatter_last(scores, mask)
        if cfg.trainer.kl_type == "reward" and self.kl_coef() > 0:
            coef = self.kl_state if self.kl_state is not None else float(cfg.actor.kl.coef)
            rewards = kl_penalized_rewards(rewards, old_lp, ref_lp, coef, estimator=cfg.trainer.kl_estimator,
                                           mask=mask)
        est = cfg.adv.estimator
        group = dist.group.WORLD if self.distributed else None
        kw: dict[str, Any] = {"mask": mask}
        if est in GROUP_ESTIMATORS:
            # opo reads the response lengths from the mask
            kw.update(rewards=rewards, group_size=self.group_size)
            if est == "reinforce_pp":
                kw.update(gamma=float(cfg.adv.gamma), group=group)
            elif est == "reinforce_pp_baseline":
                kw.update(group=group)
            elif est == "remax":
                kw.update(greedy_rewards=self.greedy_rewards(prompts))
        else:
            if self.critic is None:
                raise ConfigError(f"config key 'critic.enabled' must be true for adv.estimator={est!r}")
            values = _unwrap(self.critic)(batch["input_ids"], batch["attention_mask"])[:, -mask.shape[1] - 1:-1]
            batch["old_values"] = values * mask
            kw.update(rewards=rewards, values=batch["old_values"], gamma=float(cfg.adv.gamma),
                      lamda=float(cfg.adv.lamda))
            if est == "vtrace":
                kw.update(rho_bar=cfg.adv.vtrace.rho_bar, c_bar=cfg.adv.vtrace.c_bar)
            elif est == "retrace":
                kw.update(lamda=float(cfg.adv.retrace.lamda))
            elif est == "clipped_is":
                kw.update(clip_ratio=cfg.adv.clipped_is.clip_ratio)
            elif est == "multistep":
                kw.update(n_steps=cfg.adv.multistep.n_steps, bootstrap_method=cfg.adv.multistep.bootstrap_method)
            if est in ("vtrace", "retrace", "clipped_is"):
                # On-policy rollouts: the behaviour policy is pi_old, so log rho = 0 here;
                # the PPO ratio corrects for the drift of later epochs.
                kw["log_rhos"] = torch.zeros_like(old_lp)
        out = advantages(est, **kw)
        adv = out["advantages"].to(old_lp.dtype)
        if adv.ndim == 1:
            adv = adv.unsqueeze(-1) * mask
        if cfg.trainer.whiten_advantages and est in VALUE_ESTIMATORS + ("clipped_is",):
            adv = whiten(adv, mask, group=group)
        batch.update(scores=scores, old_logprobs=old_lp, ref_logprobs=ref_lp, advantages=adv * mask,
                     returns=out["returns"].to(old_lp.dtype) * mask if out["returns"].ndim == 2 else
                     out["returns"].unsqueeze(-1).to(old_lp.dtype) * mask, kl=kl_tok)
        return batch

    # ------------------------------------------------------------------ one step
    def train_iteration(self) -> dict[str, Any]:
        """Rollout, then ``trainer.update_epochs`` policy (and critic) updates; returns step metrics."""
        cfg = self.cfg
        t = cfg.trainer
        # Per-step regions on about 20 evenly spaced steps keep the timeline readable.
        every = max(1, int(t.total_steps) // 20)
        region = self.profiler.profile_context if self.step % every == 0 else (lambda name: contextlib.nullcontext())
        with region("rollout"):
            exp = self.make_experience()
        keys = ["input_ids", "attention_mask", "response_ids", "response_mask", "old_logprobs", "ref_logprobs",
                "advantages"]
        policy_batch = {k: exp[k] for k in keys}
        metrics: dict[str, Any] = {}
        # kl_type=reward: the penalty is already in the rewards, so the loss gets no KL term
        # and the controller is updated below from the rollout KL instead of inside train_step.
        in_loss = t.kl_type == "loss"
        with region("update"):
            for _ in range(int(t.update_epochs)):
                out = train_step(self.policy, self.optimizer, policy_batch, loss_fn=self.loss_fn,
                                 micro_batch_size=t.micro_batch_size, max_grad_norm=t.max_grad_norm,
                                 autocast_dtype=self.autocast_dtype, kl_state=self.kl_state if in_loss else None,
                                 lagrangian_state=self.lagrangian_state, multi_objective=self.multi_objective,
                                 step=self.step)
                self.kl_state = out.pop("kl_state", self.kl_state)
                self.lagrangian_state = out.pop("lagrangian_state", self.lagrangian_state)
                metrics.update(out)
                if self.critic is not None:
                    vb = {k: exp[k] for k in ("input_ids", "attention_mask", "response_mask", "old_values",
                                              "returns")}
                    vout = train_step(self.critic, self.critic_optimizer, vb, loss_fn=self.value_loss_fn,
                                      micro_batch_size=t.micro_batch_size, max_grad_norm=t.max_grad_norm,
                                      autocast_dtype=self.autocast_dtype, step=self.step)
                    metrics.update({f"critic/{k}": v for k, v in vout.items()})
        stats = torch.stack([exp["scores"].mean(), exp["kl"].sum() / exp["response_mask"].sum().clamp_min(1.0),
                             exp["response_mask"].sum(1).mean()]).double()
        if self.distributed:
            dist.all_reduce(stats)
            stats /= self.world_size
        metrics.update(reward=float(stats[0]), rollout_kl=float(stats[1]), response_length=float(stats[2]),
                       kl_coef=self.kl_coef())
        if not in_loss and self.kl_state is not None:
            from rl2fx.control.kl import kl_update

            self.kl_state = kl_update(self.kl_state, max(metrics["rollout_kl"], 0.0), self.step)
        if self.lagrangian_state is not None:
            metrics.update(kl_multiplier=self.lagrangian_state.kl_multiplier,
                           entropy_multiplier=self.lagrangian_state.entropy_multiplier)
        if self.multi_objective is not None:
            point = {"reward": metrics["reward"], "kl_penalty": -metrics["rollout_kl"],
                     "entropy": metrics.get("entropy", 0.0)}
            self.multi_objective.update_pareto_archive({k: point[k] for k in self.multi_objective.objectives})
            metrics["pareto_archive_size"] = float(len(self.multi_objective))
        self.history["reward"].append(metrics["reward"])
        self.history["kl"].append(metrics["rollout_kl"])
        self.step += 1
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self, step: int) -> Path:
        return self.output_dir / "checkpoints" / f"step-{step:06d}"

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint directory under ``trainer.output_dir`` (``None`` if there is none)."""
        root = self.output_dir / "checkpoints"
        done = sorted(p for p in root.glob("step-*") if (p / "state.pt").exists()) if root.exists() else []
        return done[-1] if done else None

    def save_checkpoint(self) -> Path:
        """Write model, optimizer, controller states and every rank's RNG state; returns the directory."""
        from rl2fx.control.kl import kl_state_to_dict

        path = self.checkpoint_dir(self.step)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
        if self.distributed:
            dist.barrier()
        torch.save(_rng_state(self.prompt_generator), path / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            state = {
                "step": self.step,
                "world_size": self.world_size,
                "policy": _unwrap(self.policy).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "critic": None if self.critic is None else _unwrap(self.critic).state_dict(),
                "critic_optimizer": None if self.critic_optimizer is None else self.critic_optimizer.state_dict(),
                "kl_state": None if self.kl_state is None else kl_state_to_dict(self.kl_state),
                "lagrangian_state": None if self.lagrangian_state is None else dataclasses.asdict(self.lagrangian_state),
                "multi_objective": None if self.multi_objective is None else self.multi_objective.state_dict(),
                "history": self.history,
                "config": to_container(self.cfg),
            }
            tmp = path / "state.pt.tmp"
            torch.save(state, tmp)
            os.replace(tmp, path / "state.pt")  # state.pt marks the checkpoint complete
        if self.distributed:
            dist.barrier()
        return path

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; the run continues identically."""
        from rl2fx.control.kl import kl_state_from_dict
        from rl2fx.control.lagrangian import LagrangianState

        path = Path(path)
        if not (path / "state.pt").exists():
            raise FileNotFoundError(f"no checkpoint at {path} (expected {path / 'state.pt'})")
        state = torch.load(path / "state.pt", map_location=self.device, weights_only=False)
        if state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {path} was written with world_size={state['world_size']}, "
                             f"this run has {self.world_size}")
        _unwrap(self.policy).load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.critic is not None:
            if state["critic"] is None:
                raise ValueError(f"checkpoint {path} has no critic but this config uses one")
            _unwrap(self.critic).load_state_dict(state["critic"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        if state["kl_state"] is not None and self.kl_state is not None:
            self.kl_state = kl_state_from_dict(state["kl_state"])
        if state["lagrangian_state"] is not None and self.lagrangian_state is not None:
            self.lagrangian_state = LagrangianState(**state["lagrangian_state"])
        if state["multi_objective"] is not None and self.multi_objective is not None:
            self.multi_objective.load_state_dict(state["multi_objective"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.step = int(state["step"])
        _set_rng_state(torch.load(path / f"rng_rank{self.rank}.pt", weights_only=False), self.prompt_generator)

    # ------------------------------------------------------------------ loop
    def _tracker(self) -> Any:
        et = self.cfg.experiment_tracking
        if not et.enabled or self.rank != 0:
            return contextlib.nullcontext(None)
        from rl2fx.tracking import ExperimentConfig, ExperimentTracker

        return ExperimentTracker(ExperimentConfig.from_dict(to_container(et)))

    def train(self) -> dict[str, Any]:
        """Run the loop to ``trainer.total_steps``; returns the final metrics (see the class docstring)."""
        from tqdm.auto import tqdm

        from rl2fx.memory.context import memory_efficient_context

        cfg, t = self.cfg, self.cfg.trainer
        total = int(t.total_steps)
        t0 = time.perf_counter()
        last: dict[str, Any] = {}
        mem_ctx = (memory_efficient_context(self.memory_optimizer) if self.memory_optimizer is not None
                   else contextlib.nullcontext())
        with self._tracker() as tracker:
            if tracker is not None:
                tracker.log_params(to_container(cfg))
            with mem_ctx, self.profiler.profile_context("training"):
                bar = tqdm(total=total, initial=self.step, disable=not t.progress_bar or self.rank != 0,
                           desc="rl2fx train", dynamic_ncols=True)
                while self.step < total:
                    last = self.train_iteration()
                    if tracker is not None:
                        tracker.log_metrics({k: v for k, v in last.items() if isinstance(v, float)}, step=self.step)
                    bar.set_postfix(reward=f"{last['reward']:.3f}", kl=f"{last['rollout_kl']:.4f}",
                                    kl_coef=f"{last['kl_coef']:.3g}")
                    bar.update(1)
                    if t.save_interval and self.step % int(t.save_interval) == 0 and self.step < total:
                        self.save_checkpoint()
                bar.close()
            ckpt = self.save_checkpoint()
            model_dir = self.output_dir / "final_model"
            if self.rank == 0:
                _unwrap(self.policy).save_pretrained(model_dir)
                self.tokenizer.save_pretrained(model_dir)
            if self.profiler.enabled and self.profiler.save_path:
                self.profiler.save()
            result = self.summary(time.perf_counter() - t0, ckpt, model_dir)
            if tracker is not None:
                tracker.log_metrics({k: v for k, v in result.items() if isinstance(v, float)}, step=self.step)
                if cfg.experiment_tracking.log_artifacts:
                    tracker.log_artifact(str(ckpt / "state.pt"))
                    if result["memory_profile"]:
                        tracker.log_artifact(result["memory_profile"])
                if cfg.experiment_tracking.log_models:
                    tracker.log_model(_unwrap(self.policy), "policy", step=self.step)
                result["mlflow_run_id"] = tracker.mlflow_run_id
        result["wall_time_s"] = float(time.perf_counter() - t0)
        result.update({k: v for k, v in last.items() if isinstance(v, float) and k not in result})
        return result

    def summary(self, wall_time: float, ckpt: Path, model_dir: Path) -> dict[str, Any]:
        """Start/end reward over ``trainer.summary_window`` steps and where the outputs are."""
        w = int(self.cfg.trainer.summary_window)
        r = self.history["reward"]
        et = self.cfg.experiment_tracking
        uri = None
        if et.enabled and et.enable_mlflow:
            from rl2fx.tracking import ExperimentConfig

            uri = ExperimentConfig.from_dict(to_container(et)).resolved_tracking_uri()
        prof = self.cfg.memory_optimization.profiling
        return {
            "reward_start": float(np.mean(r[:w])) if r else float("nan"),
            "reward_end": float(np.mean(r[-w:])) if r else float("nan"),
            "chance_reward": self.task.chance_reward(len(self.tokenizer)),
            "kl": float(np.mean(self.history["kl"][-w:])) if r else float("nan"),
            "steps": float(self.step),
            "wall_time_s": float(wall_time),
            "checkpoint": str(ckpt.resolve()),
            "final_model": str(model_dir.resolve()),
            "mlflow_tracking_uri": uri,
            "memory_profile": str(Path(prof.save_path).resolve()) if prof.enabled else None,
        }


def format_summary(result: Mapping[str, Any], window: int) -> str:
    """Human-readable end-of-run summary (what :func:`main` prints)."""
    lines = [
        "",
        "=" * 72,
        "rl2fx training summary",
        f"  steps: {int(result['steps'])}   wall time: {result['wall_time_s']:.1f} s",
        f"  mean task reward, first {window} steps: {result['reward_start']:.3f}",
        f"  mean task reward, last {window} steps:  {result['reward_end']:.3f}",
        f"  chance level (uniform over the vocabulary): {result['chance_reward']:.3f}  "
        f"-> end / chance = {result['reward_end'] / result['chance_reward']:.1f}x",
        f"  KL(policy || reference), last {window} steps: {result['kl']:.4f}",
        f"  checkpoint: {result['checkpoint']}",
        f"  final model (save_pretrained): {result['final_model']}",
    ]
    uri = result.get("mlflow_tracking_uri")
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())  # usable from any directory
    if uri:
        lines += [f"  MLflow store: {uri}  (run {result.get('mlflow_run_id')})",
                  f"    open it:  mlflow ui --backend-store-uri {uri}   then browse http://127.0.0.1:5000"]
    prof = result.get("memory_profile")
    if prof:
        lines += [f"  memory profile: {prof}",
                  "    open it:  python -c \"from rl2fx.memory.profiler import load_timeline, plot_timeline; "
                  f"plot_timeline(load_timeline('{prof}'), 'memory_profile.png')\""]
    lines.append("=" * 72)
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train with ``cfg`` and print the summary on rank 0."""
    trainer = PPOTrainer(cfg)
    try:
        result = trainer.train()
        if trainer.rank == 0:
            print(format_summary(result, int(trainer.cfg.trainer.summary_window)), flush=True)
        return result
    finally:
        if trainer.distributed and dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    """Hydra entry point: ``python -m rl2fx.train [--config-name demo] key=value ...``."""
    import sys

    import hydra

    from rl2fx.config import check_override_keys

    try:  # Hydra would reject a misspelt key too, but without suggesting the right one
        check_override_keys(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    @hydra.main(config_path="configs", config_name="ppo", version_base=None)
    def _main(cfg: DictConfig) -> None:
        run(cfg)

    _main()


if __name__ == "__main__":
    main()
