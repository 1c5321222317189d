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
import json
import math
import os
import pickle
import random
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from rl2fx.control.kl import KLState, kl_init, kl_state_from_dict, kl_state_to_dict, kl_update
from rl2fx.control.lagrangian import LagrangianState, lagrangian_init, lagrangian_update
from rl2fx.distributed import (
    generate_kwargs,
    load_sharded,
    reshard,
    save_consolidated,
    save_sharded,
    wrap_policy,
)
from rl2fx.envs import load_env
from rl2fx.experience import critic_values, estimate_advantages, experience_needs, make_experience
from rl2fx.logprobs import eval_mode
from rl2fx.memory.context import memory_efficient_context
from rl2fx.memory.optimizer import MemoryOptimizer, autocast_dtype
from rl2fx.memory.profiler import MemoryProfiler
from rl2fx.multiturn import multi_turn_rollout, multi_turn_stats
from rl2fx.pareto.optimizer import MultiObjectiveOptimizer
from rl2fx.returns import get_estimator
from rl2fx.rewards import load_reward_func
from rl2fx.rollout import concat_rollouts, rollout, scatter_last, select_rows
from rl2fx.shaping import overlong_penalty
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
    parse_yaml_file,
    policy_loss_params,
    structured_from_hydra,
    to_container,
)
from rl2fx.trainer.models import (
    apply_peft,
    build_critic,
    frozen_copy,
    is_peft_model,
    load_model,
    load_tokenizer,
)
from rl2fx.trainer.sources import DatasetSource, Prompts, Scored, TaskSource
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


#: Estimator inputs the trainer makes besides the batch (a greedy rollout's reward), kept in the experience
#: for re-estimating at later epochs.
_EXTRA_INPUTS = ("greedy_rewards",)

CALLBACK_HOOKS = ("on_train_begin", "on_step_end", "on_evaluate", "on_save", "on_train_end")


def _check_callbacks(callbacks: Sequence[Any] | None) -> list[Any]:
    """Callback objects, each with at least one of :data:`CALLBACK_HOOKS` (called as ``hook(trainer, ...)``)."""
    if callbacks is None:
        return []
    if not isinstance(callbacks, Sequence) or isinstance(callbacks, str):
        callbacks = [callbacks]
    for i, cb in enumerate(callbacks):
        if not any(callable(getattr(cb, h, None)) for h in CALLBACK_HOOKS):
            raise ConfigError(f"callbacks[{i}] ({type(cb).__name__}) has none of the hooks {list(CALLBACK_HOOKS)}")
    return list(callbacks)


def _reward_funcs(reward_funcs: Any, cfg: DictConfig) -> list[Any] | None:
    """``reward_funcs`` (one callable or a list), else the config's ``reward.functions`` specs loaded."""
    if reward_funcs is None:
        specs = list(cfg.reward.functions)
        return [load_reward_func(str(s)) for s in specs] if specs else None
    funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
    if not funcs:
        raise ConfigError("reward_funcs is empty: pass at least one reward function")
    for i, f in enumerate(funcs):
        if not callable(f):
            raise ConfigError(f"reward_funcs[{i}] is a {type(f).__name__}, not a callable "
                              "f(prompts, completions, **columns) -> list[float | None]")
    return funcs


def _check_tokenizer(tokenizer: Any) -> None:
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ConfigError("tokenizer.pad_token is not set; prompts are left-padded: set one, e.g. "
                          "tokenizer.pad_token = tokenizer.eos_token")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ConfigError("tokenizer.eos_token is not set: a response ends at the first eos token")


def _check_task_model(policy: torch.nn.Module, tokenizer: Any, spec: Any, key: str, task_tokenizer: Any,
                      local: bool) -> None:
    """A model for the built-in digits task must speak its vocabulary (e.g. a previous run's final_model)."""
    try:
        tok = load_tokenizer(tokenizer, spec, local_files_only=local)
    except ConfigError:
        tok = None
    if tok is None or tok.get_vocab() != task_tokenizer.get_vocab():
        raise ConfigError(f"{key} was given without train_dataset and reward_funcs, so the built-in digits task "
                          "would train it, and its tokenizer is not the task's 16-token one: pass "
                          "train_dataset=... (or data.train_data_path) and reward_funcs=... to train on your data")


def _lora_from_config(cfg: DictConfig) -> Any:
    lo = cfg.actor.lora
    if not lo.enabled:
        return None
    from peft import LoraConfig

    targets = lo.target_modules if isinstance(lo.target_modules, str) else list(lo.target_modules)
    return LoraConfig(r=int(lo.r), lora_alpha=int(lo.alpha), lora_dropout=float(lo.dropout),
                      target_modules=targets, task_type="CAUSAL_LM")


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

    def __init__(
        self,
        config: Any = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        ref_model: Any = None,
        reward_funcs: Any = None,
        reward_weights: Sequence[float] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        peft_config: Any = None,
        callbacks: Sequence[Any] | None = None,
        env: Any = None,
    ) -> None:
        self.cfg = cfg = _as_config(config)
        self._given_cfg = config if isinstance(config, DictConfig) else None  # unresolved, for log_params
        t = cfg.trainer
        _check_output_paths(cfg)
        self.callbacks = _check_callbacks(callbacks)
        if t.num_threads is not None:
            torch.set_num_threads(int(t.num_threads))
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        backend = "nccl" if torch.cuda.is_available() and t.device != "cpu" else "gloo"
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(backend=backend)
        elif t.strategy == "fsdp" and not dist.is_initialized():
            # FSDP2 in one process (e.g. resuming a sharded run on one machine): a process group of one
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
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
        self.prompts_per_rollout = int(cfg.data.prompts_per_rollout or 8)
        self.group_size = int(cfg.data.responses_per_prompt or 8)

        # ---- what to train on: the user's data and reward functions, else the built-in digits task
        funcs = _reward_funcs(reward_funcs, cfg)
        env_spec = env if env is not None else cfg.rollout.env_path
        self.env = load_env(env_spec) if env_spec is not None else None
        weights = list(reward_weights) if reward_weights is not None else cfg.reward.weights
        train_src = train_dataset if train_dataset is not None else cfg.data.train_data_path
        eval_src = eval_dataset if eval_dataset is not None else cfg.data.test_data_path
        self.user_data = funcs is not None or train_src is not None or self.env is not None
        model_spec = model if model is not None else cfg.actor.model_name
        model_key = "model" if model is not None else "actor.model_name"
        local = bool(cfg.actor.local_files_only)
        if self.user_data:
            if funcs is None and self.env is None:
                raise ConfigError("train_dataset (or data.train_data_path) was given without reward functions: "
                                  "pass reward_funcs=[f, ...] or set reward.functions=['module:function']")
            if funcs is not None and self.env is not None:
                raise ConfigError("with an environment (env= / rollout.env_path) the rewards are the environment's: "
                                  "pass no reward_funcs (fold a reward function into env_step instead)")
            if self.env is not None and eval_src is not None:
                raise ConfigError("eval_dataset / data.test_data_path with an environment is not supported: "
                                  "evaluate with your own multi_turn_rollout on the eval rows")
            if train_src is None:
                raise ConfigError("reward_funcs (or an environment) were given without prompts: pass "
                                  "train_dataset=... or set data.train_data_path")
            if model_spec is None:
                raise ConfigError("a model is required with train_dataset: pass model=<module, directory or hub "
                                  "id> or set actor.model_name")
            if cfg.rollout.max_new_tokens is None:
                raise ConfigError("config key 'rollout.max_new_tokens' must be set when training on your own "
                                  "data (the response length limit)")
            policy = load_model(model_spec, key=model_key, local_files_only=local)
            self.tokenizer = load_tokenizer(tokenizer, model_spec, local_files_only=local)
            _check_tokenizer(self.tokenizer)
            self.task = None
            self.max_new_tokens = int(cfg.rollout.max_new_tokens)
            if cfg.task.reward_level != "sequence":
                raise ConfigError(f"config key 'task.reward_level' {cfg.task.reward_level!r} is a setting of the "
                                  "built-in digits task; reward functions give one reward per completion (a "
                                  "multi-turn environment gives per-turn rewards): leave it at 'sequence'")
        else:
            if eval_src is not None:
                raise ConfigError("eval_dataset (data.test_data_path) needs train_dataset and reward_funcs; the "
                                  "built-in digits task has no eval data")
            self.tokenizer = build_tokenizer()
            self.task = DigitCopyTask(n_digits=int(cfg.task.n_digits), mode=str(cfg.task.mode))
            self.max_new_tokens = int(cfg.rollout.max_new_tokens or self.task.answer_len + 1)
            if model_spec is not None:
                policy = load_model(model_spec, key=model_key, local_files_only=local)
                _check_task_model(policy, tokenizer, model_spec, model_key, self.tokenizer, local)
            else:
                m = cfg.model
                policy = build_tiny_lm(len(self.tokenizer), seed=int(m.seed), **self._tiny_arch())
        peft_cfg = peft_config if peft_config is not None else _lora_from_config(cfg)
        if peft_cfg is not None:
            policy = apply_peft(policy, peft_cfg)
        self.policy = policy.to(self.device)
        self.is_peft = is_peft_model(self.policy)

        # ---- the forward passes this configuration needs (rl2fx.experience.experience_needs)
        self.estimator = get_estimator(str(cfg.adv.estimator))
        self.estimator_params = estimator_params(cfg)
        ak, co = cfg.actor.kl.adaptive_kl, cfg.actor.kl.constraint_optimization
        kl_on = float(cfg.actor.kl.coef) > 0 or bool(ak.enabled)
        mo_on = bool(cfg.multi_objective.enabled)
        self.needs = experience_needs(
            estimator=self.estimator.name, update_epochs=int(t.update_epochs),
            kl_in_loss=(t.kl_type == "loss" and kl_on) or bool(co.enabled)
            or (mo_on and "kl_penalty" in cfg.multi_objective.objectives),
            kl_in_reward=t.kl_type == "reward" and kl_on, log_kl=bool(t.log_kl) or ref_model is not None,
            with_entropy=mo_on, off_policy=self._wants_behavior(t))
        # re-estimating changes something only for an estimator that reads the ratios or the values
        self.recompute_advantages = (bool(t.recompute_advantages) and int(t.update_epochs) > 1
                                     and ("log_rhos" in self.estimator.inputs or self.estimator.needs_values))
        if self.needs.ref:
            if ref_model is not None:
                self.ref_model: torch.nn.Module | None = load_model(ref_model, key="ref_model", local_files_only=local)
                self.ref_model = self.ref_model.to(self.device).eval().requires_grad_(False)
            elif self.is_peft:
                self.ref_model = None  # the adapter-disabled base of the policy: no second copy
            else:
                self.ref_model = frozen_copy(self.policy)
        else:
            self.ref_model = None
        need_values = self.estimator.needs_values
        self.use_critic = bool(need_values if cfg.critic.enabled is None else cfg.critic.enabled)
        self.critic: torch.nn.Module | None = None
        if self.use_critic:
            self.critic = (build_tiny_critic(len(self.tokenizer), seed=int(cfg.model.seed) + 1, **self._tiny_arch())
                           if self.task is not None and model_spec is None else build_critic(self.policy))
            self.critic = self.critic.to(self.device)

        if t.overlong_buffer_len is not None and not 0 < int(t.overlong_buffer_len) <= self.max_new_tokens:
            raise ConfigError(f"config key 'trainer.overlong_buffer_len' must be in [1, {self.max_new_tokens}] (the "
                              f"response length limit), got {t.overlong_buffer_len}")
        if self.env is not None and "greedy_rewards" in self.estimator.inputs:
            raise ConfigError(f"config key 'adv.estimator' {self.estimator.name!r} needs a greedy rollout's reward, "
                              "which a multi-turn environment does not give; use grpo, rloo, gae, ...")
        if self.task is not None:
            self.source: Any = TaskSource(self.task, self.tokenizer, self.prompts_per_rollout,
                                          token_level=cfg.task.reward_level == "token")
        else:
            self.source = DatasetSource(
                train_src, self.tokenizer, funcs, prompts_per_rollout=self.prompts_per_rollout,
                generator=self.prompt_generator, weights=weights, combine=str(cfg.reward.combine),
                prompt_column=str(cfg.data.prompt_column), max_prompt_length=cfg.data.max_prompt_length,
                shuffle=bool(cfg.data.shuffle), name="train_dataset" if train_dataset is not None
                else "data.train_data_path")
        self.eval_source: DatasetSource | None = None
        if eval_src is not None:
            self.eval_source = DatasetSource(
                eval_src, self.tokenizer, funcs, prompts_per_rollout=self.prompts_per_rollout,
                generator=torch.Generator().manual_seed(seed), weights=weights, combine=str(cfg.reward.combine),
                prompt_column=str(cfg.data.prompt_column), max_prompt_length=cfg.data.max_prompt_length,
                shuffle=False, name="eval_dataset" if eval_dataset is not None else "data.test_data_path",
                evaluation=True)

        mem = cfg.memory_optimization
        self.memory_optimizer = None
        self.autocast_dtype: torch.dtype | None = None
        if mem.enabled:
            self.memory_optimizer = MemoryOptimizer.from_config(to_container(mem))
            self.memory_optimizer.optimize_model_memory(self.policy)
            if self.is_peft and mem.enable_gradient_checkpointing:
                # frozen embeddings: the checkpointed blocks' inputs must require grad for the adapters to get one
                _unwrap(self.policy).enable_input_require_grads()
            if self.critic is not None:
                self.memory_optimizer.optimize_model_memory(self.critic)
            if mem.enable_mixed_precision:
                self.autocast_dtype = autocast_dtype(self.device.type)
        prof = mem.profiling
        self.profiler = MemoryProfiler(enabled=bool(prof.enabled) and self.rank == 0,
                                       profile_interval=float(prof.profile_interval), save_path=prof.save_path)

        # the parallel strategy (rl2fx.distributed.wrap_policy); FSDP2 shards before the optimizer is built
        self.strategy = str(t.strategy) if t.strategy != "auto" else ("ddp" if self.distributed else "single")
        if self.strategy == "fsdp" and self.is_peft:
            raise ConfigError("config key 'trainer.strategy' 'fsdp' with LoRA adapters is not supported: use "
                              "trainer.strategy=ddp with peft_config, or full fine-tuning with fsdp")
        if self.strategy == "fsdp" and self.env is not None and self.world_size > 1:
            # multi_turn_rollout's per-turn generate calls differ in number across ranks (synced_gpus would
            # have to span turns): sharded sampling there would deadlock
            raise ConfigError("config key 'trainer.strategy' 'fsdp' on several ranks with an environment is not "
                              "supported: use trainer.strategy=ddp for multi-turn training")
        if self.strategy == "fsdp":
            fsdp = {"device": self.device, "wrap_cls": t.fsdp_wrap, "cpu_offload": bool(t.fsdp_cpu_offload),
                    "mixed_precision": getattr(torch, t.fsdp_param_dtype) if t.fsdp_param_dtype else None}
            try:
                self.policy = wrap_policy(self.policy, "fsdp", **fsdp)
                if self.ref_model is not None:
                    self.ref_model = wrap_policy(self.ref_model, "fsdp", **fsdp)
                if self.critic is not None:
                    self.critic = wrap_policy(self.critic, "fsdp", **fsdp)
            except ValueError as e:
                raise ConfigError(f"config key 'trainer.strategy' 'fsdp': {e}") from None
        # only the trainable parameters: with adapters, the adapter weights
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=float(cfg.actor.lr), weight_decay=float(t.weight_decay))
        self.critic_optimizer = (torch.optim.AdamW(self.critic.parameters(), lr=float(cfg.critic.lr))
                                 if self.critic is not None else None)
        if self.strategy == "single" and self.distributed:
            raise ConfigError(f"config key 'trainer.strategy' 'single' runs one process, but WORLD_SIZE is "
                              f"{self.world_size}: use ddp or fsdp under torchrun")
        if self.strategy == "ddp" and self.distributed:  # (one process: DDP would only add a wrapper)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.policy = DistributedDataParallel(self.policy, device_ids=ids)
            if self.critic is not None:
                self.critic = DistributedDataParallel(self.critic, device_ids=ids)

        # The controllers are the loop's: stepped once per iteration in train_iteration.
        self.kl_state: KLState | None = kl_init(**kl_controller_args(cfg)) if ak.enabled else None
        self.lagrangian_state: LagrangianState | None = (
            lagrangian_init(**lagrangian_args(cfg)) if co.enabled else None)
        self.multi_objective = (MultiObjectiveOptimizer(**multi_objective_args(cfg))
                                if cfg.multi_objective.enabled else None)
        self.loss_fn = make_ppo_loss(
            loss_type=str(cfg.actor.loss_type), loss_params=policy_loss_params(cfg),
            clip=float(cfg.actor.clip), clip_high=t.clip_high, dual_clip=t.dual_clip,
            kl_coef=float(cfg.actor.kl.coef) if t.kl_type == "loss" else 0.0, kl_estimator=t.kl_estimator,
            entropy_coef=float(t.entropy_coef), agg_mode=t.agg_mode, temperature=float(cfg.rollout.temperature),
            chunk_size=int(t.logprob_chunk_size), kl_log_ratio_clamp=t.kl_log_ratio_clamp,
            kl_value_clamp=t.kl_value_clamp)
        self.value_loss_fn = make_value_loss(clip=cfg.critic.clip, coef=float(cfg.critic.coef), agg_mode=t.agg_mode)

        self.output_dir = Path(t.output_dir)
        self.step = 0
        self.mlflow_run_id: str | None = None  # from a resumed checkpoint, then the live tracker's run
        self._active_tracker: Any = None
        self.history: dict[str, list[float]] = {"reward": [], "kl": [], "kl_coef": []}
        self.eval_history: list[dict[str, float]] = []
        if t.resume_from is not None:
            path = self.latest_checkpoint() if t.resume_from == "auto" else Path(t.resume_from)
            if path is not None:
                self.load_checkpoint(path)

    @staticmethod
    def _wants_behavior(t: Any) -> bool:
        """Whether rollouts return the sampler's log-probs: a rollout correction or mismatch logging asks."""
        return t.rollout_is is not None or t.rollout_rs is not None or bool(t.log_rollout_mismatch)

    def _tiny_arch(self) -> dict[str, Any]:
        m = self.cfg.model
        return dict(arch=m.arch, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                    intermediate_size=m.intermediate_size, max_position_embeddings=m.max_position_embeddings,
                    pad_token_id=self.tokenizer.pad_token_id, bos_token_id=self.tokenizer.bos_token_id,
                    eos_token_id=self.tokenizer.eos_token_id)

    def _callback(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, hook, None)
            if fn is not None:
                fn(self, *args)

    # ------------------------------------------------------------------ rollout
    def kl_coef(self) -> float:
        """The KL coefficient in force: the controller's, else ``actor.kl.coef``."""
        return float(self.kl_state.coef) if self.kl_state is not None else float(self.cfg.actor.kl.coef)

    def _rollout(self, prompts: Prompts, n: int, *, do_sample: bool = True) -> dict[str, torch.Tensor]:
        r = self.cfg.rollout
        return rollout(self.policy, prompts.input_ids.to(self.device), prompt_mask=prompts.attention_mask.to(self.device),
                       responses_per_prompt=n, max_new_tokens=self.max_new_tokens,
                       eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                       temperature=float(r.temperature), top_k=int(r.top_k), top_p=float(r.top_p), do_sample=do_sample,
                       generate_kwargs=generate_kwargs(self.policy),
                       return_logprobs=do_sample and self._wants_behavior(self.cfg.trainer))

    def _multi_turn(self, prompts: Prompts) -> tuple[dict[str, torch.Tensor], Scored]:
        """A token-in-token-out rollout of ``rollout.max_turns`` turns with the environment
        (:func:`rl2fx.multiturn.multi_turn_rollout`); its trajectory scores and per-turn rewards."""
        r, col = self.cfg.rollout, str(self.cfg.data.prompt_column)
        rows = [{col: p, **{k: v[i] for k, v in prompts.columns.items()}} for i, p in enumerate(prompts.raw)]
        batch = multi_turn_rollout(
            _unwrap(self.policy), self.tokenizer, rows, self.env, prompt_texts=prompts.texts,
            prompt_ids=prompts.input_ids.to(self.device), prompt_mask=prompts.attention_mask.to(self.device),
            responses_per_prompt=self.group_size, max_turns=int(r.max_turns), max_new_tokens=self.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
            temperature=float(r.temperature), top_k=int(r.top_k), top_p=float(r.top_p), stop=list(r.stop))
        segmented = batch["response_mask"].shape[0] != batch["turns"].shape[0]
        if segmented and self.cfg.trainer.dynamic_sampling:
            raise ValueError(f"environment {self.env.name}: a next_state did not extend the text so far (a new "
                             "segment), and trainer.dynamic_sampling selects rows by group: turn one of them off")
        # a trajectory over several rows (RL2's segments): the estimators run per trajectory (make_experience)
        self._trajectories = ({k: batch[k] for k in ("sample_index", "segment_index", "turns")} if segmented
                              else None)
        scores = batch["scores"].float()
        stats = {f"multi_turn/{k}": float(v) for k, v in multi_turn_stats(batch).items()}
        # per-trajectory bookkeeping stays out of the training batch (rows are trajectories here)
        for k in ("scores", "turns", "failed", "truncated", "sample_index", "segment_index", "turn_ids"):
            batch.pop(k, None)
        return batch, Scored(scores=scores, components=scores.unsqueeze(-1), metrics=stats)

    @torch.no_grad()
    def greedy_rewards(self, prompts: Prompts) -> torch.Tensor:
        """ReMax's baselines: the reward of one greedy response per prompt, ``[n_prompts]``.

        The greedy response goes through the same :func:`~rl2fx.rollout.rollout`
        path with ``do_sample=False`` (no RNG is drawn, so the sampled rollouts
        are unchanged). The baseline is the reward alone, without the KL
        penalty of ``kl_type=reward`` (as verl's ReMax).
        """
        greedy = self._rollout(prompts, 1, do_sample=False)
        return self.source.score(prompts, greedy, 1).scores

    def _draw(self) -> tuple[dict[str, torch.Tensor], Scored, torch.Tensor | None]:
        prompts = self.source.sample(self.prompt_generator)
        if self.env is not None:
            return (*self._multi_turn(prompts), None)
        batch = self._rollout(prompts, self.group_size)
        scored = self.source.score(prompts, batch, self.group_size)
        if scored.token_rewards is not None:  # per-token credit: the estimator reads it as the batch's rewards
            batch["rewards"] = scored.token_rewards
        t = self.cfg.trainer
        if t.overlong_buffer_len is not None:  # DAPO's soft overlong punishment, added to the reward
            pen = overlong_penalty(batch["response_mask"].sum(1), max_len=self.max_new_tokens,
                                   cache_len=int(t.overlong_buffer_len), factor=float(t.overlong_penalty_factor))
            scored.scores = scored.scores + pen.to(scored.scores.dtype)
            if "rewards" in batch:  # on the last token, where the outcome would be
                batch["rewards"] = batch["rewards"] + scatter_last(pen.to(batch["rewards"].dtype),
                                                                   batch["response_mask"])
            scored.metrics["overlong_penalty_mean"] = float(pen.mean())
        greedy = self.greedy_rewards(prompts) if "greedy_rewards" in self.estimator.inputs else None
        return batch, scored, greedy

    def _sample_groups(self) -> tuple[dict[str, torch.Tensor], Scored, dict[str, Any]]:
        """One rollout batch; with ``trainer.dynamic_sampling`` (DAPO, Yu et al. 2025, arXiv:2503.14476),
        groups whose rewards are all equal (zero advantage under a group baseline) are dropped and
        the batch refilled from further rollouts, at most ``trainer.dynamic_sampling_max_rollouts``
        rollouts per iteration; short of groups then, the batch is completed with dropped ones.
        Logged: ``dynamic_sampling/rollouts``, ``/dropped_groups``, ``/filled_groups``, and
        ``reward_sampled`` (the mean reward over every sampled response, filtered or not)."""
        t = self.cfg.trainer
        batch, scored, greedy = self._draw()
        if not t.dynamic_sampling:
            self._sampling_metrics: dict[str, float] = {}
            return batch, scored, ({} if greedy is None else {"greedy_rewards": greedy})
        G, need = self.group_size, self.prompts_per_rollout
        kept: list[tuple[Any, ...]] = []
        spare: list[tuple[Any, ...]] = []
        sampled: list[torch.Tensor] = []
        metrics: list[dict[str, float]] = []
        rollouts = 0
        while True:
            rollouts += 1
            sampled.append(scored.scores)
            metrics.append(scored.metrics)
            s = scored.scores.view(-1, G)
            varied = ~(s == s[:, :1]).all(1)
            for g in range(s.shape[0]):
                rows = torch.arange(g * G, (g + 1) * G, device=s.device)
                item = (select_rows(batch, rows), scored.scores[rows], scored.components[rows],
                        None if greedy is None else greedy[g:g + 1])
                (kept if bool(varied[g]) else spare).append(item)
            if len(kept) >= need or rollouts >= int(t.dynamic_sampling_max_rollouts):
                break
            batch, scored, greedy = self._draw()
        filled = max(0, need - len(kept))
        chosen = (kept + spare[:filled])[:need]
        merged = concat_rollouts([c[0] for c in chosen], pad_token_id=self.tokenizer.pad_token_id)
        out = Scored(scores=torch.cat([c[1] for c in chosen]), components=torch.cat([c[2] for c in chosen]),
                     metrics={k: float(np.sum([m[k] for m in metrics]) if k.endswith("/skipped")
                                        else np.mean([m[k] for m in metrics if k in m]))
                              for k in metrics[0]})
        self._sampling_metrics = {
            "dynamic_sampling/rollouts": float(rollouts),
            "dynamic_sampling/dropped_groups": float(len(spare)),
            "dynamic_sampling/filled_groups": float(filled),
            "reward_sampled": float(torch.cat(sampled).mean()),
        }
        extra = {} if greedy is None else {"greedy_rewards": torch.cat([c[3] for c in chosen])}
        return merged, out, extra

    @torch.no_grad()
    def make_experience(self) -> dict[str, torch.Tensor]:
        """One rollout batch with rewards, old/ref log-probs, values and advantages.

        Prompts come from the source (the user's data set or the digits task), the
        rewards from its reward functions; :func:`rl2fx.experience.make_experience`
        runs the forward passes ``self.needs`` lists (no old-log-prob pass with one
        update epoch on on-policy data, no reference pass without a KL term or KL
        logging) and the registered estimator ``adv.estimator`` with its
        hyperparameters; ``greedy_rewards`` are computed only for an estimator that
        reads them (a greedy rollout). Advantages of estimators that read values are
        whitened (``trainer.whiten_advantages``), over all ranks.
        """
        cfg = self.cfg
        batch, scored, extra = self._sample_groups()
        stats: dict[str, float] = {}
        coef = self.kl_state if self.kl_state is not None else float(cfg.actor.kl.coef)
        exp = make_experience(
            _unwrap(self.policy), batch, scored.scores, group_size=self.group_size, estimator=self.estimator.name,
            estimator_params=self.estimator_params, ref_model=self.ref_model, critic=self.critic, needs=self.needs,
            kl_coef=coef, kl_in_reward=cfg.trainer.kl_type == "reward" and self.needs.ref and self.kl_coef() > 0,
            kl_estimator=str(cfg.trainer.kl_estimator), kl_log_ratio_clamp=cfg.trainer.kl_log_ratio_clamp,
            kl_value_clamp=cfg.trainer.kl_value_clamp, reward_components=scored.components,
            whiten_advantages=bool(cfg.trainer.whiten_advantages), temperature=float(cfg.rollout.temperature),
            chunk_size=int(cfg.trainer.logprob_chunk_size), with_entropy=self.multi_objective is not None,
            group=dist.group.WORLD if self.distributed else None, extra_inputs=extra,
            rollout_is=cfg.trainer.rollout_is, rollout_is_cap=float(cfg.trainer.rollout_is_cap),
            rollout_rs=cfg.trainer.rollout_rs, rollout_rs_low=float(cfg.trainer.rollout_rs_low),
            rollout_rs_high=float(cfg.trainer.rollout_rs_high), stats=stats,
            token_rewards=batch.get("rewards"),
            trajectories=self._trajectories if self.env is not None else None)
        exp.update(extra)  # an estimator's extra inputs, for re-estimating at later epochs
        self._reward_metrics = {**scored.metrics, **stats}
        for m in (self.policy, self.ref_model, self.critic):  # free FSDP2 parameters the no-grad passes gathered
            if m is not None:
                reshard(m)
        return exp

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Score one greedy response per eval prompt; returns ``eval/reward`` and ``eval/reward/<function>``.

        The samples (step, prompt, completion, reward, each function's reward) are
        written to ``<output_dir>/eval/step-NNNNNN.jsonl`` and logged as an MLflow
        table (``mlflow.load_table("eval/step-NNNNNN.json", run_ids=[run_id])`` with the run's
        experiment active) and a
        W&B table. Greedy decoding draws no random numbers, so evaluating does not
        change the training run.
        """
        if self.eval_source is None:
            raise ValueError("no eval data: pass eval_dataset=... or set data.test_data_path")
        rows: dict[str, list[Any]] = {"step": [], "prompt": [], "completion": [], "reward": []}
        per: dict[str, list[float | None]] = {}
        for prompts in self.eval_source.batches():
            out = self._rollout(prompts, 1, do_sample=False)
            sc = self.eval_source.score(prompts, out, 1)
            rows["step"] += [self.step] * len(sc.completions)
            rows["prompt"] += prompts.texts
            rows["completion"] += sc.completions
            rows["reward"] += [float(x) for x in sc.scores.tolist()]
            assert sc.per_function is not None
            for j, name in enumerate(sc.per_function.names):
                col = sc.per_function.values[:, j].tolist()
                per.setdefault(name, []).extend(None if math.isnan(v) else float(v) for v in col)
        rows.update({f"reward/{k}": v for k, v in per.items()})
        metrics = {"eval/reward": float(np.mean(rows["reward"]))}
        for k, v in per.items():
            vals = [x for x in v if x is not None]
            if vals:
                metrics[f"eval/reward/{k}"] = float(np.mean(vals))
        if self.rank == 0:
            name = f"step-{self.step:06d}"
            d = self.output_dir / "eval"
            d.mkdir(parents=True, exist_ok=True)
            with open(d / f"{name}.jsonl", "w") as f:
                for i in range(len(rows["step"])):
                    f.write(json.dumps({k: v[i] for k, v in rows.items()}) + "\n")
            if self._active_tracker is not None:
                self._active_tracker.log_table(rows, f"eval/{name}.json", step=self.step)
                self._active_tracker.log_metrics(metrics, step=self.step)
        self.eval_history.append({"step": float(self.step), **metrics})
        self._callback("on_evaluate", metrics)
        return metrics

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
        policy_batch = {k: exp[k] for k in keys if k in exp}
        metrics: dict[str, Any] = {}
        # The controllers' values for this whole iteration: read by every update epoch, stepped once below.
        # kl_type=reward: the penalty is already in the rewards, so the loss gets no KL term.
        kl_coef = self.kl_coef() if t.kl_type == "loss" and self.kl_state is not None else None
        first: dict[str, Any] = {}
        objective_point = self.objective_point(exp) if self.multi_objective is not None else None
        with region("update"):
            for epoch in range(int(t.update_epochs)):
                if epoch > 0 and self.recompute_advantages:
                    policy_batch["advantages"], exp["returns"], rho = self.reestimate_advantages(exp)
                    metrics.update(rho)
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
        mask = exp["response_mask"]
        kl_sum = exp["kl"].sum() if "kl" in exp else torch.zeros((), device=mask.device)
        sampled = self._sampling_metrics.pop("reward_sampled", None)
        stats = torch.stack([exp["scores"].mean(), kl_sum / mask.sum().clamp_min(1.0), mask.sum(1).mean(),
                             exp["scores"].mean() if sampled is None else torch.tensor(sampled)]).double()
        if self.distributed:
            dist.all_reduce(stats)
            stats /= self.world_size
        # reward: over every response sampled this iteration (with dynamic sampling, also the dropped groups);
        # reward_trained: over the batch the update used
        metrics.update(reward=float(stats[3]), response_length=float(stats[2]), kl_coef=self.kl_coef())
        if sampled is not None:
            metrics["reward_trained"] = float(stats[0])
        metrics.update(self._reward_metrics)
        metrics.update(self._sampling_metrics)
        kl = float(stats[1]) if "kl" in exp else None
        if kl is not None:
            metrics["rollout_kl"] = kl
        self.step_controllers(reward=metrics["reward"], kl=kl, entropy=first.get("entropy"))
        if self.lagrangian_state is not None:
            metrics.update(kl_multiplier=self.lagrangian_state.kl_multiplier,
                           entropy_multiplier=self.lagrangian_state.entropy_multiplier)
        if self.multi_objective is not None:
            metrics["pareto_archive_size"] = float(len(self.multi_objective))
        self.history["reward"].append(metrics["reward"])
        if kl is not None:
            self.history["kl"].append(kl)
        self.history.setdefault("kl_coef", []).append(float(metrics.get("kl_coef", 0.0)))
        self.step += 1
        return metrics

    @torch.no_grad()
    def reestimate_advantages(self, exp: Mapping[str, torch.Tensor]
                              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        r"""The advantages and returns of ``exp`` under the current policy and critic (``trainer.recompute_advantages``).

        After the first update epoch the policy :math:`\pi_\theta` is no longer the sampler
        :math:`\pi_{old}`; this pass measures ``log_rhos`` :math:`= \log\pi_\theta - \log\pi_{old}`
        on the rollout's tokens and the current critic's values, and runs the estimator again
        (:func:`rl2fx.experience.estimate_advantages`), so that V-trace (Espeholt et al. 2018) and
        Retrace (Munos et al. 2016) truncate what has gone off-policy. Also returns
        ``recompute/abs_log_rho`` (token mean of :math:`|\log\rho|`) and ``recompute/rho_above_1``
        (fraction of tokens with :math:`\rho > 1`), over all ranks.
        """
        policy = _unwrap(self.policy)
        inner: Any = getattr(policy, "module", policy)
        with eval_mode(inner):
            cur, _ = compute_logprobs(inner, exp, temperature=float(self.cfg.rollout.temperature),
                                      chunk_size=int(self.cfg.trainer.logprob_chunk_size))
        reshard(policy)
        keep = exp["response_mask"] != 0
        log_rhos = torch.where(keep, cur - exp["old_logprobs"], 0.0)
        values = critic_values(self.critic, exp) if self.critic is not None and self.estimator.needs_values else None
        if self.critic is not None:
            reshard(self.critic)
        adv, ret = estimate_advantages(
            exp, estimator=self.estimator.name, estimator_params=self.estimator_params, group_size=self.group_size,
            log_rhos=log_rhos, values=values, whiten_advantages=bool(self.cfg.trainer.whiten_advantages),
            group=dist.group.WORLD if self.distributed else None,
            trajectories=self._trajectories if self.env is not None else None,
            extra_inputs={k: exp[k] for k in self.estimator.inputs if k in _EXTRA_INPUTS and k in exp})
        stats = torch.stack([log_rhos.abs().sum(), ((log_rhos > 0) & keep).sum(), keep.sum()]).double()
        if self.distributed:
            dist.all_reduce(stats)
        n = float(stats[2].clamp_min(1.0))
        return adv, ret, {"recompute/abs_log_rho": float(stats[0]) / n, "recompute/rho_above_1": float(stats[1]) / n}

    def objective_point(self, exp: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """The rollout's measured objectives on the Pareto archive's scale: mean task score, ``-KL``
        (token mean of ``trainer.kl_estimator``) and the sampling policy's token-mean entropy, over all ranks.
        The multi-objective loss weighs its surrogates at this point (``train_step(objective_point=...)``)."""
        mask = exp["response_mask"]
        n = mask.sum().clamp_min(1.0)
        ent = exp.get("entropy")
        zero = torch.zeros((), device=n.device)
        stats = torch.stack([exp["scores"].mean(), exp["kl"].sum() / n if "kl" in exp else zero,
                             torch.where(mask != 0, ent, 0.0).sum() / n if ent is not None else zero]).double()
        if self.distributed:
            dist.all_reduce(stats)
            stats /= self.world_size
        return {"reward": float(stats[0]), "kl_penalty": -max(float(stats[1]), 0.0), "entropy": float(stats[2])}

    def step_controllers(self, *, reward: float, kl: float | None, entropy: float | None) -> None:
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
        kl = max(kl, 0.0) if kl is not None else 0.0  # k1 can be slightly negative on a finite sample
        # (None: KL is not measured, which the configuration allows only without KL controllers)
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
        sharded = self.strategy == "fsdp"
        if sharded:  # every rank writes its shards (torch.distributed.checkpoint); any world size reads them
            save_sharded(path / "policy", self.policy, self.optimizer)
            if self.critic is not None:
                save_sharded(path / "critic", self.critic, self.critic_optimizer)
        if self.rank == 0:
            state = {
                "step": self.step,
                "world_size": self.world_size,
                "sharded": sharded,
                "policy": None if sharded else _unwrap(self.policy).state_dict(),
                "optimizer": None if sharded else self.optimizer.state_dict(),
                "critic": None if self.critic is None or sharded else _unwrap(self.critic).state_dict(),
                "critic_optimizer": (None if self.critic_optimizer is None or sharded
                                     else self.critic_optimizer.state_dict()),
                "kl_state": None if self.kl_state is None else kl_state_to_dict(self.kl_state),
                "lagrangian_state": None if self.lagrangian_state is None else dataclasses.asdict(self.lagrangian_state),
                "multi_objective": None if self.multi_objective is None else self.multi_objective.state_dict(),
                "history": self.history,
                "eval_history": self.eval_history,
                "source": self.source.state_dict(),
                "config": to_container(self.cfg),
                "mlflow_run_id": self.mlflow_run_id,
            }
            _save_atomic(state, path / "state.pt", self)  # state.pt marks the checkpoint complete
        if self.distributed:
            dist.barrier()
        self._callback("on_save", path)
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
        sharded = bool(state.get("sharded", False))
        if sharded != (self.strategy == "fsdp"):
            raise CheckpointError(f"checkpoint {path} was written with trainer.strategy="
                                  f"{'fsdp' if sharded else 'single/ddp'}; this run uses {self.strategy!r}: "
                                  "resume with the same kind of strategy")
        if state["world_size"] != self.world_size and not (sharded and self.world_size < state["world_size"]):
            # a sharded checkpoint reshards onto fewer ranks; the per-rank RNG files of more ranks do not exist
            raise ValueError(f"checkpoint {path} was written with world_size={state['world_size']}, "
                             f"this run has {self.world_size}")
        if self.critic is not None and not (path / "critic").exists() and state["critic"] is None:
            raise ValueError(f"checkpoint {path} has no critic but this config uses one")
        if sharded:
            load_sharded(path / "policy", self.policy, self.optimizer)
            if self.critic is not None:
                load_sharded(path / "critic", self.critic, self.critic_optimizer)
        else:
            _unwrap(self.policy).load_state_dict(state["policy"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.critic is not None:
                _unwrap(self.critic).load_state_dict(state["critic"])
                self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        if state["kl_state"] is not None and self.kl_state is not None:
            self.kl_state = kl_state_from_dict(state["kl_state"])
        if state["lagrangian_state"] is not None and self.lagrangian_state is not None:
            self.lagrangian_state = LagrangianState(**state["lagrangian_state"])
        if state["multi_objective"] is not None and self.multi_objective is not None:
            self.multi_objective.load_state_dict(state["multi_objective"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.eval_history = [dict(e) for e in state.get("eval_history", [])]
        self.source.load_state_dict(state.get("source", {}))
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
            self._callback("on_train_begin")
            with mem_ctx, self.profiler.profile_context("training"):
                bar = tqdm(total=total, initial=self.step, disable=not t.progress_bar or self.rank != 0,
                           desc="rl2fx train", dynamic_ncols=True)
                while self.step < total:
                    last = self.train_iteration()
                    if tracker is not None:
                        tracker.log_metrics({k: v for k, v in last.items() if isinstance(v, float)}, step=self.step)
                    post = {"reward": f"{last['reward']:.3f}"}
                    if "rollout_kl" in last:
                        post.update(kl=f"{last['rollout_kl']:.4f}", kl_coef=f"{last['kl_coef']:.3g}")
                    bar.set_postfix(post)
                    bar.update(1)
                    if on_step is not None:
                        on_step(self, last)
                    self._callback("on_step_end", last)
                    if (self.eval_source is not None and t.eval_interval
                            and (self.step % int(t.eval_interval) == 0 or self.step == total)):
                        last.update(self.evaluate())
                    if t.save_interval and self.step % int(t.save_interval) == 0 and self.step < total:
                        self.save_checkpoint()
                bar.close()
            ckpt = self.save_checkpoint()
            model_dir = self.output_dir / "final_model"
            if self.strategy == "fsdp":  # gathered to rank 0 tensor by tensor; every rank takes part
                save_consolidated(self.policy, self.tokenizer, model_dir)
            elif self.rank == 0:
                policy = _unwrap(self.policy)
                policy.save_pretrained(model_dir)  # a PEFT model saves its adapters only
                self.tokenizer.save_pretrained(model_dir)
                if self.is_peft and t.merge_adapters:
                    merged = copy.deepcopy(policy).merge_and_unload()
                    merged.save_pretrained(self.output_dir / "final_model_merged")
                    self.tokenizer.save_pretrained(self.output_dir / "final_model_merged")
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
                    if self.strategy == "fsdp":  # the sharded module cannot be pickled whole: log the consolidated one
                        tracker.log_artifact(str(model_dir), "policy")
                    else:
                        tracker.log_model(_unwrap(self.policy), "policy", step=self.step)
                result["mlflow_run_id"] = tracker.mlflow_run_id
        result["wall_time_s"] = float(time.perf_counter() - t0)
        result.update({k: v for k, v in last.items() if isinstance(v, float) and k not in result})
        self._callback("on_train_end", result)
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
            "chance_reward": self.source.chance_reward(),
            "kl": float(np.mean(self.history["kl"][-w:])) if self.history["kl"] else float("nan"),
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
    ]
    if math.isfinite(result.get("chance_reward", float("nan"))):
        lines.append(f"  chance level (uniform over the vocabulary): {result['chance_reward']:.3f}  "
                     f"-> end / chance = {result['reward_end'] / result['chance_reward']:.1f}x")
    kl = result.get("kl", float("nan"))
    lines += [
        f"  KL(policy || reference), last {window} steps: "
        + (f"{kl:.4f}" if math.isfinite(kl) else "not measured (no KL term; trainer.log_kl=false)"),
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
    try:
        trainer = PPOTrainer(cfg)
        result = trainer.train()
        if trainer.rank == 0:
            print(format_summary(result, int(trainer.cfg.trainer.summary_window)), flush=True)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _hydra_config_file(argv: Sequence[str]) -> Path | None:
    """The YAML file ``--config-path``/``-cp`` and ``--config-name``/``-cn`` name, if it exists (else Hydra reports)."""
    opts: dict[str, str] = {}
    it = iter(argv)
    for a in it:
        for long, short in (("--config-path", "-cp"), ("--config-name", "-cn")):
            if a in (long, short):
                opts[long] = next(it, "")
            elif a.startswith(long + "="):
                opts[long] = a.split("=", 1)[1]
    if "--config-path" not in opts:
        return None
    name = opts.get("--config-name", "ppo")
    path = Path(opts["--config-path"]).expanduser() / (name if name.endswith(".yaml") else f"{name}.yaml")
    return path if path.is_file() else None


def main() -> None:
    """Hydra entry point: ``python -m rl2fx.train [--config-name demo] key=value ...``."""
    try:  # Hydra would reject a misspelt key too, but without suggesting the right one
        check_override_keys(sys.argv[1:])
        user_file = _hydra_config_file(sys.argv[1:])
        if user_file is not None:  # Hydra would print a 40-line YAML traceback for a broken file
            parse_yaml_file(user_file)
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
