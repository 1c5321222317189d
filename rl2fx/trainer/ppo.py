"""``PPOTrainer``: the reference loop over the core pieces, driven by the YAML schema (application layer).

One iteration: a rollout with ``model.generate``, task rewards, reference-model KL,
optional critic values, advantages from the registered ``adv.estimator``, then
``trainer.update_epochs`` calls of :func:`rl2fx.step.train_step`; after them the
loop steps its controllers once (KL coefficient, Lagrange multipliers, Pareto
archive) from the iteration's measurements. Plus memory options and profiling,
MLflow/W&B tracking, checkpoint and exact resume, and data parallelism under
``torchrun`` (DDP + global advantage whitening).

Run it: ``python -m rl2fx.train --config-name demo trainer.total_steps=50``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import os
import pickle
import random
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from rl2fx.control.kl import KLState, kl_init, kl_state_from_dict, kl_state_to_dict, kl_update
from rl2fx.control.lagrangian import LagrangianState, lagrangian_init, lagrangian_update
from rl2fx.losses import kl_estimate, kl_penalized_rewards
from rl2fx.memory.context import memory_efficient_context
from rl2fx.memory.optimizer import MemoryOptimizer, autocast_dtype
from rl2fx.memory.profiler import MemoryProfiler
from rl2fx.pareto.optimizer import MultiObjectiveOptimizer
from rl2fx.returns import advantages, get_estimator, whiten
from rl2fx.rollout import rollout, scatter_last
from rl2fx.step import compute_logprobs, make_ppo_loss, make_value_loss, train_step
from rl2fx.tracking import ExperimentConfig, ExperimentTracker
from rl2fx.trainer.config import (
    CONFIG_DIR,
    ConfigError,
    check_override_keys,
    estimator_params,
    kl_controller_args,
    lagrangian_args,
    load_config,
    multi_objective_args,
    policy_loss_params,
    structured_from_hydra,
    to_container,
)
from rl2fx.trainer.tasks import DigitCopyTask, build_tiny_critic, build_tiny_lm, build_tokenizer

try:  # exported by rl2fx.returns once the per-thread workspace is public
    from rl2fx.returns import release_workspace
except ImportError:  # pragma: no cover - older rl2fx.returns
    from rl2fx.returns._workspace import release_workspace

__all__ = ["PPOTrainer", "CheckpointError", "run", "format_summary", "main"]


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
    """Every RNG state as tensors, lists and numbers, so the file loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [int(version), [int(x) for x in internal], gauss_next],
        "prompts": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    generator.set_state(state["prompts"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or written; the message names the file and the cause."""


def _load_file(file: Path, map_location: Any = None) -> Any:
    """``torch.load(file, weights_only=True)``: tensors, containers and numbers only, never arbitrary objects.

    A file holding anything else (a pickle that would run code) or a corrupt file
    raises one :class:`CheckpointError` naming the file.
    """
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # torch words both a blocked global (a pickle that would run code) and plain garbage as
        # "Weights only load failed"; only the former names a GLOBAL
        if "global" in str(e).lower():
            raise CheckpointError(f"refusing to load checkpoint file {file}: it holds objects other than "
                                  "tensors, containers and numbers (loaded with weights_only=True)") from None
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln.endswith("WeightsUnpickler error:")), first)
        raise CheckpointError(f"cannot read checkpoint file {file}: corrupt or not a checkpoint ({detail})") from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint file {file}: corrupt or not a checkpoint "
                              f"({type(e).__name__}: {first})") from None


def _cause(e: OSError) -> str:
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    text = e.strerror or str(e) or type(e).__name__
    return f"{name}: {text}" if name else text


def _check_writable_dir(key: str, directory: str | os.PathLike[str]) -> None:
    """Create ``directory`` if needed and write a probe file there; else one ConfigError naming key, path, cause."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".rl2fx-write-check-", dir=directory)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"config key '{key}': cannot write to {directory}: {_cause(e)}") from None


def _check_output_paths(cfg: DictConfig) -> None:
    """Fail at start, not at the end: ``trainer.output_dir``, the memory-profile file's directory and an
    SQLite tracking store's directory must be writable."""
    _check_writable_dir("trainer.output_dir", cfg.trainer.output_dir)
    prof = cfg.memory_optimization.profiling
    if prof.enabled and prof.save_path:
        _check_writable_dir("memory_optimization.profiling.save_path",
                            Path(str(prof.save_path)).expanduser().absolute().parent)
    et = cfg.experiment_tracking
    if et.enabled and et.enable_mlflow:
        uri = ExperimentConfig.from_dict(to_container(et)).resolved_tracking_uri()
        if uri.startswith("sqlite:///"):
            _check_writable_dir("experiment_tracking.tracking_uri", Path(uri[len("sqlite:///"):]).absolute().parent)


def _loggable_params(cfg: DictConfig, source: DictConfig | None = None) -> dict[str, Any]:
    """The resolved config for ``log_params``, without the values of ``${oc.env:VAR}`` interpolations.

    A value interpolated from an environment variable is logged as its unresolved
    text (``${oc.env:MLFLOW_TOKEN}``), also when it reaches a key through another
    interpolation; any other string containing such a value is logged as ``***``.
    ``source``: the config as given, before validation resolved it (its unresolved text).
    """
    resolved = to_container(cfg)
    raw = OmegaConf.to_container(cfg if source is None else source, resolve=False)
    secrets: set[str] = set()

    def collect(r: Any, v: Any) -> None:
        if isinstance(r, dict) and isinstance(v, dict):
            for k in r:
                collect(r[k], v.get(k))
        elif isinstance(r, list) and isinstance(v, list):
            for a, b in zip(r, v, strict=False):
                collect(a, b)
        elif isinstance(r, str) and "oc.env" in r and v is not None and str(v) != "":
            secrets.add(str(v))

    def leaks(v: Any) -> bool:
        text = v if isinstance(v, str) else repr(v)
        return any(sec in text for sec in secrets)

    def mask(r: Any, v: Any) -> Any:
        if isinstance(r, dict) and isinstance(v, dict):
            return {k: mask(r.get(k), v[k]) for k in v}
        if isinstance(r, list) and isinstance(v, list) and len(r) == len(v):
            return [mask(a, b) for a, b in zip(r, v, strict=True)]
        if isinstance(r, str) and "${" in r and ("oc.env" in r or leaks(v)):
            return r
        if isinstance(v, str) and leaks(v):
            return "***"
        return v

    collect(raw, resolved)
    return mask(raw, resolved)


def _save_atomic(obj: Any, file: Path, trainer: PPOTrainer) -> None:
    """``torch.save`` to ``file.tmp`` then rename; on failure the temp file is removed and one
    :class:`CheckpointError` names the file and the cause (the previous complete checkpoint stays)."""
    tmp = file.with_name(file.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, file)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise trainer._checkpoint_write_error(file, e) from None


class PPOTrainer:
    """The reference PPO/GRPO loop driven by the spec's configuration schema (:func:`rl2fx.load_config`).

    ``config``: a ``DictConfig`` (for instance from Hydra), a plain mapping or a
    YAML path; it is validated against the schema. Under ``torchrun`` (``WORLD_SIZE``
    > 1) a process group is started (gloo on CPU, nccl on CUDA), the policy and
    critic are wrapped in DDP, every rank draws its own prompts, and advantages
    are whitened over the global batch.

    The loop owns the controllers (``kl_state``, ``lagrangian_state``,
    ``multi_objective``): every update epoch of an iteration reads the same values,
    and :meth:`step_controllers` steps each once per iteration, so
    ``kl_state.count`` is the number of iterations whatever ``trainer.update_epochs``
    and ``trainer.kl_type`` are.

    ``train()`` runs ``trainer.total_steps`` steps (continuing from a checkpoint
    when ``trainer.resume_from`` is set) and returns the final metrics:
    ``reward_start`` / ``reward_end`` (mean task reward over the first / last
    ``trainer.summary_window`` steps), ``chance_reward``, ``kl``, ``steps``,
    ``wall_time_s``, and the paths of the checkpoint, MLflow store and memory profile.
    """

    def __init__(self, config: Any = None) -> None:
        self.cfg = cfg = _as_config(config)
        self._given_cfg = config if isinstance(config, DictConfig) else None  # unresolved, for log_params
        t = cfg.trainer
        if cfg.data.train_data_path is not None or cfg.data.test_data_path is not None:
            raise ConfigError("config key 'data.train_data_path' / 'data.test_data_path' must be null: the "
                              "built-in digits task generates its prompts (task.*)")
        _check_output_paths(cfg)
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
            # local_files_only: a model name that is not a local directory fails instead of downloading
            try:
                policy = AutoModelForCausalLM.from_pretrained(cfg.actor.model_name, local_files_only=True)
            except (OSError, ValueError) as e:  # a directory or cache entry without a loadable model
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"config key 'actor.model_name' {cfg.actor.model_name!r} cannot be loaded "
                                  f"from local files: {first}") from None
        else:
            policy = build_tiny_lm(len(self.tokenizer), seed=int(m.seed), **arch)
        self.policy = policy.to(self.device)
        self.ref_model = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.estimator = get_estimator(str(cfg.adv.estimator))
        self.estimator_params = estimator_params(cfg)
        need_values = self.estimator.needs_values
        self.use_critic = bool(need_values if cfg.critic.enabled is None else cfg.critic.enabled)
        self.critic = (build_tiny_critic(len(self.tokenizer), seed=int(m.seed) + 1, **arch).to(self.device)
                       if self.use_critic else None)

        mem = cfg.memory_optimization
        self.memory_optimizer = None
        self.autocast_dtype: torch.dtype | None = None
        if mem.enabled:
            self.memory_optimizer = MemoryOptimizer.from_config(to_container(mem))
            self.memory_optimizer.optimize_model_memory(self.policy)
            if self.critic is not None:
                self.memory_optimizer.optimize_model_memory(self.critic)
            if mem.enable_mixed_precision:
                self.autocast_dtype = autocast_dtype(self.device.type)
        prof = mem.profiling
        self.profiler = MemoryProfiler(enabled=bool(prof.enabled) and self.rank == 0,
                                       profile_interval=float(prof.profile_interval), save_path=prof.save_path)

        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=float(cfg.actor.lr),
                                           weight_decay=float(t.weight_decay))
        self.critic_optimizer = (torch.optim.AdamW(self.critic.parameters(), lr=float(cfg.critic.lr))
                                 if self.critic is not None else None)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.policy = DistributedDataParallel(self.policy, device_ids=ids)
            if self.critic is not None:
                self.critic = DistributedDataParallel(self.critic, device_ids=ids)

        # The controllers are the loop's: stepped once per iteration in train_iteration.
        ak = cfg.actor.kl.adaptive_kl
        self.kl_state: KLState | None = kl_init(**kl_controller_args(cfg)) if ak.enabled else None
        co = cfg.actor.kl.constraint_optimization
        self.lagrangian_state: LagrangianState | None = (
            lagrangian_init(**lagrangian_args(cfg)) if co.enabled else None)
        self.multi_objective = (MultiObjectiveOptimizer(**multi_objective_args(cfg))
                                if cfg.multi_objective.enabled else None)
        self.loss_fn = make_ppo_loss(
            loss_type=str(cfg.actor.loss_type), loss_params=policy_loss_params(cfg),
            clip=float(cfg.actor.clip), clip_high=t.clip_high, dual_clip=t.dual_clip,
            kl_coef=float(cfg.actor.kl.coef) if t.kl_type == "loss" else 0.0, kl_estimator=t.kl_estimator,
            entropy_coef=float(t.entropy_coef), agg_mode=t.agg_mode, temperature=float(cfg.rollout.temperature),
            chunk_size=int(t.logprob_chunk_size))
        self.value_loss_fn = make_value_loss(clip=cfg.critic.clip, coef=float(cfg.critic.coef), agg_mode=t.agg_mode)

        self.output_dir = Path(t.output_dir)
        self.step = 0
        self.mlflow_run_id: str | None = None  # from a resumed checkpoint, then the live tracker's run
        self._active_tracker: Any = None
        self.history: dict[str, list[float]] = {"reward": [], "kl": [], "kl_coef": []}
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
        greedy = rollout(self.policy, prompts.input_ids.to(self.device), responses_per_prompt=1,
                         max_new_tokens=self.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                         pad_token_id=self.tokenizer.pad_token_id, do_sample=False)
        return self.task.reward(greedy["response_ids"], prompts.answers.to(self.device))

    @torch.no_grad()
    def make_experience(self) -> dict[str, torch.Tensor]:
        """One rollout batch with rewards, old/ref log-probs, values and advantages.

        The estimator gets the batch (``rewards``, ``values`` when there is a
        critic, ``mask``, ``log_rhos`` = 0 since the rollout is on-policy,
        ``group_size``, ``group`` = the process group, and ``greedy_rewards`` only
        when it reads them: they cost a greedy rollout) plus its hyperparameters
        (:func:`~rl2fx.trainer.config.estimator_params`); inputs it does not read
        are ignored. Advantages of estimators that read values are whitened
        (``trainer.whiten_advantages``), over all ranks.
        """
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
        # the sampling policy's entropy locates the iteration in the Pareto archive's objective space
        old_lp, old_ent = compute_logprobs(_unwrap(self.policy), batch, temperature=temp, chunk_size=chunk,
                                           with_entropy=self.multi_objective is not None)
        ref_lp, _ = compute_logprobs(self.ref_model, batch, temperature=temp, chunk_size=chunk)
        self.policy.train()
        kl_tok = kl_estimate(old_lp, ref_lp, cfg.trainer.kl_estimator) * mask
        rewards = scatter_last(scores, mask)
        if cfg.trainer.kl_type == "reward" and self.kl_coef() > 0:
            coef = self.kl_state if self.kl_state is not None else float(cfg.actor.kl.coef)
            rewards = kl_penalized_rewards(rewards, old_lp, ref_lp, coef, estimator=cfg.trainer.kl_estimator,
                                           mask=mask)
        est = self.estimator
        group = dist.group.WORLD if self.distributed else None
        # On-policy rollouts: the behaviour policy is pi_old, so log rho = 0 here;
        # the PPO ratio corrects for the drift of later epochs.
        kw: dict[str, Any] = {"rewards": rewards, "mask": mask, "log_rhos": torch.zeros_like(old_lp),
                              "group_size": self.group_size, "group": group, "old_logprobs": old_lp,
                              "reward_components": scores.unsqueeze(-1)}
        if self.critic is not None:
            values = _unwrap(self.critic)(batch["input_ids"], batch["attention_mask"])[:, -mask.shape[1] - 1:-1]
            batch["old_values"] = values * mask
            kw["values"] = batch["old_values"]
        if "greedy_rewards" in est.inputs:
            kw["greedy_rewards"] = self.greedy_rewards(prompts)
        out = advantages(est.name, **kw, **self.estimator_params)
        adv = out["advantages"].to(old_lp.dtype)
        if adv.ndim == 1:
            adv = adv.unsqueeze(-1) * mask
        if cfg.trainer.whiten_advantages and est.needs_values:
            adv = whiten(adv, mask, group=group)
        batch.update(scores=scores, old_logprobs=old_lp, ref_logprobs=ref_lp, advantages=adv * mask,
                     returns=out["returns"].to(old_lp.dtype) * mask if out["returns"].ndim == 2 else
                     out["returns"].unsqueeze(-1).to(old_lp.dtype) * mask, kl=kl_tok)
        if old_ent is not None:
            batch["entropy"] = old_ent
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
        # The controllers' values for this whole iteration: read by every update epoch, stepped once below.
        # kl_type=reward: the penalty is already in the rewards, so the loss gets no KL term.
        kl_coef = self.kl_coef() if t.kl_type == "loss" and self.kl_state is not None else None
        first: dict[str, Any] = {}
        objective_point = self.objective_point(exp) if self.multi_objective is not None else None
        with region("update"):
            for epoch in range(int(t.update_epochs)):
                out = train_step(self.policy, self.optimizer, policy_batch, loss_fn=self.loss_fn,
                                 micro_batch_size=t.micro_batch_size, max_grad_norm=t.max_grad_norm,
                                 autocast_dtype=self.autocast_dtype, kl_coef=kl_coef,
                                 lagrangian=self.lagrangian_state, multi_objective=self.multi_objective,
                                 objective_point=objective_point, step=self.step)
                first = out if epoch == 0 else first
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
        self.step_controllers(reward=metrics["reward"], kl=metrics["rollout_kl"], entropy=first.get("entropy"))
        if self.lagrangian_state is not None:
            metrics.update(kl_multiplier=self.lagrangian_state.kl_multiplier,
                           entropy_multiplier=self.lagrangian_state.entropy_multiplier)
        if self.multi_objective is not None:
            metrics["pareto_archive_size"] = float(len(self.multi_objective))
        self.history["reward"].append(metrics["reward"])
        self.history["kl"].append(metrics["rollout_kl"])
        self.history.setdefault("kl_coef", []).append(float(metrics.get("kl_coef", 0.0)))
        self.step += 1
        return metrics

    def objective_point(self, exp: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The rollout's measured objectives on the Pareto archive's scale: mean task score, ``-KL``
        (token mean of ``trainer.kl_estimator``) and the sampling policy's token-mean entropy, over all ranks.
        The multi-objective loss weighs its surrogates at this point (``train_step(objective_point=...)``)."""
        mask = exp["response_mask"]
        n = mask.sum().clamp_min(1.0)
        ent = exp.get("entropy")
        stats = torch.stack([exp["scores"].mean(), exp["kl"].sum() / n,
                             torch.where(mask != 0, ent, 0.0).sum() / n if ent is not None else torch.zeros((), device=n.device)]).double()
        if self.distributed:
            dist.all_reduce(stats)
            stats /= self.world_size
        return {"reward": float(stats[0]), "kl_penalty": -max(float(stats[1]), 0.0), "entropy": float(stats[2])}

    def step_controllers(self, *, reward: float, kl: float, entropy: float | None) -> None:
        """Step every controller once, from this iteration's measurements (the optax pattern).

        ``kl``: the rollout KL, the token mean of ``trainer.kl_estimator`` between
        the policy that sampled the rollout and the reference, over all ranks; the
        same measurement for ``kl_type=loss`` and ``kl_type=reward``, whatever
        ``trainer.update_epochs`` is. ``entropy``: the token-mean entropy of the
        first update epoch's forward pass, which runs before any optimiser step,
        so it is also the sampling policy's. ``reward``: the mean task score.
        The KL controller, the Lagrange multipliers and the Pareto archive each
        take one step; their new values act from the next iteration on.
        """
        kl = max(kl, 0.0)  # k1 can be slightly negative on a finite sample
        if self.kl_state is not None:
            self.kl_state = kl_update(self.kl_state, kl, self.step)
        if self.lagrangian_state is not None:
            self.lagrangian_state = lagrangian_update(self.lagrangian_state, kl=kl, entropy=entropy)
        if self.multi_objective is not None:
            point = {"reward": reward, "kl_penalty": -kl, "entropy": 0.0 if entropy is None else entropy}
            self.multi_objective.update_pareto_archive({k: point[k] for k in self.multi_objective.objectives})

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
        path = self.checkpoint_dir(self.step)
        if self.rank == 0:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise self._checkpoint_write_error(path, e) from None
        if self._active_tracker is not None:
            self._active_tracker.flush()  # everything logged so far is sent (or buffered) before the checkpoint
        if self.distributed:
            dist.barrier()
        _save_atomic(_rng_state(self.prompt_generator), path / f"rng_rank{self.rank}.pt", self)
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
                "mlflow_run_id": self.mlflow_run_id,
            }
            _save_atomic(state, path / "state.pt", self)  # state.pt marks the checkpoint complete
        if self.distributed:
            dist.barrier()
        return path

    def _checkpoint_write_error(self, file: Path, e: BaseException) -> CheckpointError:
        cause = _cause(e) if isinstance(e, OSError) else f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        last = self.latest_checkpoint()
        kept = f"the last good checkpoint {last} is kept" if last is not None else "no earlier checkpoint"
        return CheckpointError(f"cannot write checkpoint file {file}: {cause}; {kept}")

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore everything :meth:`save_checkpoint` wrote; the run continues identically."""
        path = Path(path)
        if not (path / "state.pt").exists():
            raise FileNotFoundError(f"no checkpoint at {path} (expected {path / 'state.pt'})")
        state = _load_file(path / "state.pt", map_location=self.device)
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
        self.mlflow_run_id = state.get("mlflow_run_id")
        _set_rng_state(_load_file(path / f"rng_rank{self.rank}.pt"), self.prompt_generator)

    # ------------------------------------------------------------------ loop
    def _tracker(self) -> Any:
        et = self.cfg.experiment_tracking
        if not et.enabled or self.rank != 0:
            return contextlib.nullcontext(None)
        d = to_container(et)
        d["buffer_dir"] = str(self.output_dir / "tracking_buffer")  # the outage buffer lives with the run
        if self.mlflow_run_id is not None:
            d["run_id"] = self.mlflow_run_id  # a resumed run continues its MLflow run
        return ExperimentTracker(ExperimentConfig.from_dict(d))

    def _log_params(self, tracker: Any) -> None:
        """The config as params (env interpolations masked); a resumed run whose config changed
        keeps its first values and records the new ones as ``resumed.<key>`` tags (params are immutable)."""
        from rl2fx.tracking.records import flatten_typed

        params = flatten_typed(_loggable_params(self.cfg, self._given_cfg))
        old = getattr(tracker, "params", {}) or {}
        changed = {k: v for k, v in params.items() if k in old and old[k] != str(v)}
        tracker.log_params({k: v for k, v in params.items() if k not in changed})
        if changed:
            tracker.set_tags({f"resumed.{k}": str(v) for k, v in changed.items()})

    def _track(self, tracker: Any) -> Any:
        """Make ``tracker`` the live one (run id into checkpoints, flush before each); a crash ends its run FAILED."""
        self._active_tracker = tracker
        self.mlflow_run_id = tracker.mlflow_run_id or self.mlflow_run_id

        def _end(exc_type: Any, exc: Any, tb: Any) -> bool:
            self._active_tracker = None
            if exc_type is not None:
                with contextlib.suppress(Exception):
                    tracker.finish(status="FAILED")
            return False

        return _end

    def train(self, on_step: Callable[[PPOTrainer, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Run the loop to ``trainer.total_steps``; returns the final metrics (see the class docstring).

        ``on_step(trainer, metrics)``, if given, is called after each iteration (after its
        metrics are logged, before a periodic checkpoint); an exception it raises stops the
        run and propagates (``rl2fx tune`` raises ``TrialPruned`` from it).

        At the end the estimators' per-thread scratch buffers are released
        (:func:`~rl2fx.returns.release_workspace`), whether the run ends normally or not.
        """
        cfg, t = self.cfg, self.cfg.trainer
        total = int(t.total_steps)
        t0 = time.perf_counter()
        last: dict[str, Any] = {}
        mem_ctx = (memory_efficient_context(self.memory_optimizer) if self.memory_optimizer is not None
                   else contextlib.nullcontext())
        with contextlib.ExitStack() as stack:
            stack.callback(release_workspace)
            tracker = stack.enter_context(self._tracker())
            if tracker is not None:
                stack.push(self._track(tracker))
                self._log_params(tracker)
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
                    if on_step is not None:
                        on_step(self, last)
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
    try:  # Hydra would reject a misspelt key too, but without suggesting the right one
        check_override_keys(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None

    @hydra.main(config_path=str(CONFIG_DIR), config_name="ppo", version_base=None)
    def _main(cfg: DictConfig) -> None:
        try:
            run(cfg)
        except (ConfigError, CheckpointError) as e:  # one line, as the rl2fx command (Hydra would print a traceback)
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    _main()
