"""The spec's YAML configuration as a typed, validated structured config (dataclasses + OmegaConf).

The sections ``data``, ``actor``, ``adv``, ``multi_objective``, ``hyperopt``,
``memory_optimization`` and ``experiment_tracking`` are the spec's "Complete
Configuration Schema", with the same keys and defaults. rl2fx adds:

* under ``actor.kl.adaptive_kl``: the parameters of the other controllers the
  spec documents (``linear_factor``, ``kp``, ``ki``, ``kd``, ``schedule_type``,
  ``schedule_steps``), with the spec's defaults;
* ``actor.loss_type`` (a registered policy loss, :func:`rl2fx.losses.register_policy_loss`;
  default ``vanilla``, PPO's clipped surrogate) and ``actor.loss_params`` (its
  other hyperparameters);
* ``adv.<name>`` sections built from the estimator registry
  (:func:`rl2fx.returns.register_estimator`): one per registered estimator that
  has hyperparameters, holding those other than the shared ``adv.gamma`` /
  ``adv.lamda`` with the registry's defaults, plus ``gamma`` / ``lamda`` (null:
  the shared value) where the estimator takes them. A user's estimator gets its section
  once its module is imported: list the module under the top-level ``imports``
  key (``imports=[my_pkg.my_estimators]``), which :func:`load_config` imports
  before validating;
* paths derived from ``trainer.output_dir``, so that everything a run writes is in its
  folder and overriding ``trainer.output_dir`` alone moves it all:
  ``experiment_tracking.tracking_uri`` (``sqlite:///${trainer.output_dir}/mlruns.db``),
  ``experiment_tracking.wandb_dir`` and ``memory_optimization.profiling.save_path``
  (the spec's ``memory_profile.json``, in that folder);
* new sections for what a runnable trainer needs: ``trainer`` (steps, seed,
  optimisation and loss settings, output, checkpoints), ``rollout``
  (generation), ``task`` (the verifiable-reward task), ``model`` (the tiny
  transformers model built locally when ``actor.model_name`` is null) and
  ``critic`` (the value model GAE-style estimators need).

:func:`load_config` reads a YAML file (default: the packaged ``configs/ppo.yaml``),
applies dotted overrides and validates: unknown keys (with a did-you-mean
suggestion), wrong types, out-of-range values and unknown names raise
:class:`ConfigError` (a ``ValueError``) naming the key. Value checks are the
library's own: each section is handed to the function that consumes it
(``kl_init``, ``lagrangian_init``, ``MultiObjectiveOptimizer``,
``check_hyperparameters`` of the estimator registry, ``make_ppo_loss``, ...) and
its error is re-raised under the config key; no list of names or range is
repeated here. Only settings that no library function takes (the loop's own:
``trainer.total_steps``, ``rollout.top_p``, ``critic.lr``, ...) are range-checked here.

>>> cfg = load_config(overrides=["actor.kl.adaptive_kl.enabled=true"])
>>> cfg.actor.kl.adaptive_kl.enabled, cfg.actor.lr, cfg.adv.estimator
(True, 1e-06, 'gae')
>>> load_config(overrides=["actor.lrr=0.1"])
Traceback (most recent call last):
...
rl2fx.trainer.config.ConfigError: unknown config key 'actor.lrr'; did you mean 'actor.lr'?
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rl2fx.control.batch_size import batch_size_init
from rl2fx.control.kl import DEFAULTS as KL_DEFAULTS
from rl2fx.control.kl import kl_init
from rl2fx.control.lagrangian import lagrangian_init
from rl2fx.distributed import STRATEGIES
from rl2fx.losses import get_policy_loss, kl_coef_value
from rl2fx.memory.optimizer import MemoryOptimizer
from rl2fx.memory.profiler import MemoryProfiler
from rl2fx.pareto.optimizer import MultiObjectiveOptimizer
from rl2fx.returns import check_hyperparameters, get_estimator, list_estimators
from rl2fx.rewards import COMBINE_METHODS
from rl2fx.rollout_correction import LEVELS as IS_LEVELS
from rl2fx.rollout_correction import RS_LEVELS
from rl2fx.step import check_step_args, make_ppo_loss, make_value_loss
from rl2fx.trainer.tasks import VOCAB, DigitCopyTask, check_model_args
from rl2fx.trainer.tasks.digits import REWARD_LEVELS
from rl2fx.tuning.pruners import make_pruner
from rl2fx.tuning.samplers import make_sampler
from rl2fx.tuning.tuner import HyperparameterTuner

__all__ = [
    "ConfigError",
    "RL2Config",
    "SHARED_ADV_PARAMS",
    "CONFIG_DIR",
    "schema",
    "load_config",
    "validate_config",
    "pruner_args",
    "to_container",
    "check_override_keys",
    "parse_override",
    "estimator_params",
    "TRAINER_INPUTS",
    "trainer_supports",
    "policy_loss_params",
    "kl_controller_args",
    "lagrangian_args",
    "multi_objective_args",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

#: ``adv.gamma`` / ``adv.lamda``: shared by every estimator that takes them (a section may override them).
SHARED_ADV_PARAMS = ("gamma", "lamda")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key."""


# ----------------------------------------------------------------------------- spec sections
@dataclass
class DataConfig:
    train_data_path: str | None = None
    test_data_path: str | None = None
    prompts_per_rollout: int | None = None
    responses_per_prompt: int | None = None
    # rl2fx: the user's prompt data (train_data_path / test_data_path, or PPOTrainer(train_dataset=...))
    prompt_column: str = "prompt"
    max_prompt_length: int | None = None  # null: no limit; a longer prompt is an error, never truncated
    shuffle: bool = True


@dataclass
class RewardConfig:
    """The user's reward functions (rl2fx extension): ``module:function`` or ``file.py:function`` specs,
    or ``PPOTrainer(reward_funcs=...)``; several are combined by ``combine`` with ``weights``."""

    functions: list[str] = field(default_factory=list)
    weights: list[float] | None = None  # null: all 1
    combine: str = "weighted_sum"  # rl2fx.rewards.COMBINE_METHODS


@dataclass
class LoraSection:
    """LoRA adapters through peft (rl2fx extension); ``PPOTrainer(peft_config=...)`` takes any peft config."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Any = "all-linear"


@dataclass
class AdaptiveKLConfig:
    enabled: bool = False
    controller_type: str = "exponential"
    target_kl: float = 0.01
    initial_coef: float = 0.2
    exp_factor: float = 1.03
    exp_decay: float = 0.99
    min_coef: float = 0.001
    max_coef: float = 10.0
    # rl2fx: the other controllers' parameters (spec "Supported Controllers" defaults)
    linear_factor: float = 0.5
    kp: float = 0.1
    ki: float = 0.01
    kd: float = 0.001
    schedule_type: str = "cosine"
    schedule_steps: int = 1000
    # proportional (Ziegler et al. 2019): gain n_steps / horizon per update. TRL's horizon of 10000 with
    # n = 1 update per iteration moves the coefficient by at most 0.002% a step.
    horizon: int = 10000
    n_steps: int | None = None  # null: the iterations since the previous update (1)


@dataclass
class ConstraintOptimizationConfig:
    enabled: bool = False
    kl_constraint: float = 0.01
    entropy_constraint: float = 0.01
    use_lagrangian: bool = True
    lagrangian_lr: float = 0.01


@dataclass
class KLConfig:
    coef: float = 0.0
    adaptive_kl: AdaptiveKLConfig = field(default_factory=AdaptiveKLConfig)
    constraint_optimization: ConstraintOptimizationConfig = field(default_factory=ConstraintOptimizationConfig)


@dataclass
class ActorConfig:
    model_name: str | None = None
    # rl2fx: a hub id is read from the local Hugging Face cache only, unless this is false
    local_files_only: bool = True
    lora: LoraSection = field(default_factory=LoraSection)
    lr: float = 1e-6
    clip: float = 0.2
    kl: KLConfig = field(default_factory=KLConfig)
    # rl2fx: the policy loss by its registered name, and its hyperparameters besides
    # actor.clip / trainer.clip_high / trainer.dual_clip
    loss_type: str = "vanilla"
    loss_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdvConfig:
    """``adv``: the estimator's name and the shared discount and trace parameters.

    The per-estimator sections ``adv.<name>`` are added from the registry by :func:`schema`.
    """

    estimator: str = "gae"
    gamma: float = 0.99
    lamda: float = 0.95


def _field_type(default: Any) -> Any:
    # Typed from the default, so OmegaConf converts and rejects on merge; None: any type.
    return type(default) if isinstance(default, bool | int | float | str) else Any


def _section_type(name: str) -> type | None:
    """The dataclass of ``adv.<name>``: the estimator's hyperparameters (None if it has none to set)."""
    spec = get_estimator(name)
    specs = []
    for p in spec.hyperparameters:
        if p in SHARED_ADV_PARAMS:
            specs.append((p, float | None, None))  # type: ignore[arg-type]
        else:
            d = spec.defaults.get(p)
            specs.append((p, _field_type(d), d))
    if not specs:
        return None
    cls = dataclasses.make_dataclass(f"{name}_params", [(n, t, field(default=d)) for n, t, d in specs])
    cls.__module__ = __name__
    return cls


def _adv_type() -> type:
    extra = [(n, t, field(default_factory=t)) for n in list_estimators() if (t := _section_type(n)) is not None]
    cls = dataclasses.make_dataclass("AdvConfig", extra, bases=(AdvConfig,))
    cls.__module__ = __name__
    return cls


@dataclass
class MultiObjectiveConfig:
    enabled: bool = False
    objectives: list[str] = field(default_factory=lambda: ["reward", "kl_penalty", "entropy"])
    objective_weights: dict[str, float] = field(
        default_factory=lambda: {"reward": 1.0, "kl_penalty": -0.1, "entropy": 0.01})
    pareto_method: str = "weighted_sum"
    diversity_weight: float = 0.1
    archive_size: int = 100


@dataclass
class BayesianConfig:
    exploration_weight: float = 0.1


@dataclass
class GridConfig:
    grid_size: int = 10


@dataclass
class MedianPrunerConfig:
    n_startup_trials: int = 5
    n_warmup_steps: int = 0


@dataclass
class HalvingPrunerConfig:
    reduction_factor: int = 3


@dataclass
class HyperoptConfig:
    enabled: bool = False
    optimizer_type: str = "random"
    n_trials: int = 100
    save_dir: str = "hyperopt_results"
    # where the study lives when shared between machines: a database URL (sqlite:///study.db,
    # postgresql+psycopg://...); null: the save_dir directory (safe for processes on one machine)
    storage: str | None = None
    report_interval: int = 10
    # training runs per trial, seeds trainer.seed + i and model.seed + i; the objective is their mean
    # reward (one lucky seed cannot win the study); the pruner sees the first seed's reports
    seeds_per_trial: int = 1
    pruner: str = "none"
    # the search space's parameters to tune (dotted config keys of ppo_search_space); null: all of them
    params: list[str] | None = None
    bayesian: BayesianConfig = field(default_factory=BayesianConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    median: MedianPrunerConfig = field(default_factory=MedianPrunerConfig)
    successive_halving: HalvingPrunerConfig = field(default_factory=HalvingPrunerConfig)
    hyperband: HalvingPrunerConfig = field(default_factory=HalvingPrunerConfig)


@dataclass
class ProfilingConfig:
    enabled: bool = False
    profile_interval: float = 1.0
    # the spec's file name, under the run's folder: moving trainer.output_dir moves the profile too
    save_path: str = "${trainer.output_dir}/memory_profile.json"


@dataclass
class AdaptiveBatchSizingConfig:
    enabled: bool = False
    initial_batch_size: int = 8
    min_batch_size: int = 1
    max_batch_size: int = 64
    adaptation_factor: float = 0.1


@dataclass
class MemoryOptimizationConfig:
    enabled: bool = True
    enable_gradient_checkpointing: bool = True
    enable_mixed_precision: bool = True
    enable_cpu_offload: bool = True
    enable_activation_checkpointing: bool = True
    memory_threshold: float = 0.8
    gc_threshold: float = 0.9
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    adaptive_batch_sizing: AdaptiveBatchSizingConfig = field(default_factory=AdaptiveBatchSizingConfig)


@dataclass
class ModelVersioningConfig:
    enabled: bool = False
    enable_auto_versioning: bool = True


@dataclass
class ExperimentTrackingConfig:
    enabled: bool = True
    experiment_name: str = "RL2_PPO_Experiment"
    enable_mlflow: bool = True
    enable_wandb: bool = True
    log_models: bool = True
    log_artifacts: bool = True
    log_system_metrics: bool = True
    model_versioning: ModelVersioningConfig = field(default_factory=ModelVersioningConfig)
    # rl2fx: where MLflow writes: the design's embedded SQLite store, in the run's folder (artifacts and
    # models go to mlartifacts/ beside it), so that everything a run writes is under trainer.output_dir
    tracking_uri: str = "sqlite:///${trainer.output_dir}/mlruns.db"
    # rl2fx: the folder W&B writes its wandb/ run folders under (null: $WANDB_DIR or the working directory)
    wandb_dir: str | None = "${trainer.output_dir}"


# ----------------------------------------------------------------------------- rl2fx sections
@dataclass
class TrainerConfig:
    """Loop, optimisation and loss settings (rl2fx extension)."""

    total_steps: int = 100
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int | None = None  # torch CPU threads per process; null = torch's default
    update_epochs: int = 1
    micro_batch_size: int | None = None  # sequences per forward/backward; null = whole batch
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0
    agg_mode: str = "token-mean"
    kl_estimator: str = "k3"  # rl2fx.losses.KL_ESTIMATORS: k1 | k2 | k3 | abs | k1+ | k3+ | k3_unbiased
    kl_log_ratio_clamp: float | None = None  # clamp log(pi/pi_ref) to [-c, c] before the estimate (verl: 20)
    kl_value_clamp: float | None = None  # clamp the estimate to [-v, v] (verl's low_var_kl: 10)
    kl_type: str = "loss"  # loss: beta * KL added to the loss; reward: -beta * KL folded into rewards
    clip_high: float | None = None  # DAPO clip-higher; null = actor.clip
    dual_clip: float | None = None
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    # re-estimate advantages before every update epoch after the first, from the current policy's
    # log-prob ratios to the sampler (log_rhos) and the current critic: what V-trace/Retrace/clipped IS correct
    recompute_advantages: bool = False
    logprob_chunk_size: int = 256
    output_dir: str = "outputs/rl2fx"
    save_interval: int = 0  # steps between checkpoints; 0 = only at the end
    resume_from: str | None = None  # a checkpoint file, or "auto" (latest in output_dir)
    progress_bar: bool = True
    summary_window: int = 20  # steps averaged for the start/end reward summary
    eval_interval: int = 0  # steps between evaluations on the eval data (0: never)
    log_kl: bool = True  # measure KL(policy || reference) without a KL term (costs a reference forward)
    merge_adapters: bool = False  # also save the LoRA-merged model at the end
    # parallel strategy: auto = ddp under torchrun (WORLD_SIZE > 1), else single; fsdp = FSDP2 per decoder block
    strategy: str = "auto"
    fsdp_wrap: str | None = None  # the decoder block's class name, for models without _no_split_modules
    fsdp_cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy (CUDA only)
    fsdp_param_dtype: str | None = None  # FSDP2 MixedPrecisionPolicy parameter dtype, e.g. bfloat16 (CUDA only)
    # rollout correction (Yao et al. 2025; verl's rollout_is / rollout_rs): the sampler's log-probs vs the trainer's
    rollout_is: str | None = None  # null | token | sequence: advantages times min(pi_old / mu, rollout_is_cap)
    rollout_is_cap: float = 2.0
    rollout_rs: str | None = None  # null | token | sequence | geometric: mask ratios outside [low, high]
    rollout_rs_low: float = 0.5
    rollout_rs_high: float = 2.0
    log_rollout_mismatch: bool = False  # sampler log-probs and mismatch metrics without a correction
    # DAPO soft overlong punishment: the last overlong_buffer_len tokens before rollout.max_new_tokens cost reward
    overlong_buffer_len: int | None = None
    overlong_penalty_factor: float = 1.0
    dynamic_sampling: bool = False  # DAPO: drop groups with all-equal rewards and refill from more rollouts
    dynamic_sampling_max_rollouts: int = 4  # rollouts per iteration at most (then dropped groups fill the batch)


@dataclass
class RolloutConfig:
    """Generation settings (rl2fx extension)."""

    max_new_tokens: int | None = None  # null: the task's answer length + 1 (room for <eos>)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # multi-turn rollouts with an environment (RL2's env_step protocol, rl2fx.envs)
    env_path: str | None = None  # a .py file with env_step(sample), or PPOTrainer(env=...)
    max_turns: int = 1
    stop: list[str] = field(default_factory=list)  # strings that end a turn (e.g. a tool call's closing tag)


@dataclass
class TaskConfig:
    """The verifiable-reward task (rl2fx extension)."""

    name: str = "digits"
    mode: str = "reverse"  # copy | reverse | repeat
    n_digits: int = 2
    # sequence: one outcome reward per response; token: each right digit's 1/n_digits on its own token
    reward_level: str = "sequence"


@dataclass
class ModelConfig:
    """The tiny randomly initialised transformers model used when actor.model_name is null."""

    arch: str = "llama"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int | None = None
    max_position_embeddings: int = 64
    seed: int = 0


@dataclass
class CriticConfig:
    """Value model: enabled automatically for estimators that need values (rl2fx extension)."""

    enabled: bool | None = None  # null: on iff adv.estimator needs values
    lr: float = 1e-3
    clip: float | None = 0.2
    coef: float = 1.0


@dataclass
class RL2Config:
    #: modules imported before validation: where user estimators / policy losses register themselves
    imports: list[str] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    adv: AdvConfig = field(default_factory=AdvConfig)
    multi_objective: MultiObjectiveConfig = field(default_factory=MultiObjectiveConfig)
    hyperopt: HyperoptConfig = field(default_factory=HyperoptConfig)
    memory_optimization: MemoryOptimizationConfig = field(default_factory=MemoryOptimizationConfig)
    experiment_tracking: ExperimentTrackingConfig = field(default_factory=ExperimentTrackingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)


# Keys that are Hydra's, not ours: dropped before validation.
_HYDRA_KEYS = ("defaults", "hydra")
# Mappings whose keys are free (user-chosen names).
_FREE_MAPPINGS = {"multi_objective.objective_weights", "actor.loss_params"}


def schema() -> type:
    """The config schema: :class:`RL2Config` with ``adv`` sections for every registered estimator."""
    adv = _adv_type()
    cls = dataclasses.make_dataclass("RL2Config", [("adv", adv, field(default_factory=adv))], bases=(RL2Config,))
    cls.__module__ = __name__
    return cls


def _import_modules(names: Any) -> None:
    """Import the ``imports`` modules (user estimators and losses register on import)."""
    if names is None:
        return
    if isinstance(names, str) or not isinstance(names, list | tuple | ListConfig):
        raise ConfigError(f"config key 'imports' must be a list of module names, got {names!r}")
    for name in names:
        try:
            importlib.import_module(str(name))
        except ImportError as e:
            raise ConfigError(f"config key 'imports' names module {name!r}, which cannot be imported: {e}") from None


# ----------------------------------------------------------------------------- checks
def _suggest(key: str, known: list[str]) -> str:
    best = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"; did you mean '{best[0]}'?" if best else f"; known keys here: {sorted(known)}"


def _check_keys(raw: Any, schema: Any, prefix: str) -> None:
    """Raise ConfigError for the first key in ``raw`` that the dataclass ``schema`` lacks."""
    if not isinstance(raw, dict):
        return
    known = {f.name: f for f in fields(schema)}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in known:
            full_known = [f"{prefix}{k}" for k in known]
            raise ConfigError(f"unknown config key '{path}'{_suggest(path, full_known)}")
        default = getattr(schema(), key) if is_dataclass(schema) else None
        if is_dataclass(default) and path not in _FREE_MAPPINGS:
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"config key '{path}' must be a mapping (section), got {value!r}")
            _check_keys(value, type(default), f"{path}.")


def _fail(key: str, value: Any, what: str) -> None:
    raise ConfigError(f"config key '{key}' {what}, got {value!r}")


def _in(cfg: DictConfig, key: str, low: float | None = None, high: float | None = None, *,
        low_open: bool = False, optional: bool = False) -> None:
    """Ranges of the loop's own settings (the library has no function that takes them)."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        if optional:
            return
        _fail(key, value, "must be set")
    if not ((low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)):
        lb = "(" if low_open else "["
        _fail(key, value, f"must be in {lb}{'-inf' if low is None else low}, {'inf' if high is None else high}]")


_LEADING_NAME = re.compile(r"^\s*'?([A-Za-z_]\w*)'?")


def _as_config_error(e: ValueError, keys: Mapping[str, str], fallback: str) -> ConfigError:
    """``e`` from a library validator, re-worded under the config key of the parameter it names.

    ``keys`` maps the library's parameter names to config keys; the parameter is
    the first word of the message (the library's errors start with it). A choice
    error gets a did-you-mean.
    """
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    m = _LEADING_NAME.match(msg)
    param = m.group(1) if m else None
    if param in keys:
        text = f"config key '{keys[param]}'{msg[m.end():]}"
    else:
        text = f"config key '{fallback}': {msg}"
    choice = re.search(r"must be one of (\[.*\]), got (.+)$", msg)
    if choice:
        try:
            allowed, got = ast.literal_eval(choice.group(1)), ast.literal_eval(choice.group(2))
        except (ValueError, SyntaxError):
            allowed, got = [], None
        best = difflib.get_close_matches(str(got), [str(a) for a in allowed], n=1, cutoff=0.5)
        if best:
            text += f"; did you mean '{best[0]}'?"
    return ConfigError(text)


def _checked(fn: Callable[..., Any], kwargs: Mapping[str, Any], keys: Mapping[str, str], fallback: str) -> Any:
    """``fn(**kwargs)``, its ``ValueError`` re-raised as a :class:`ConfigError` naming the key."""
    try:
        return fn(**kwargs)
    except ValueError as e:
        raise _as_config_error(e, keys, fallback) from None


def _keys(prefix: str, names: Any) -> dict[str, str]:
    return {n: f"{prefix}.{n}" for n in names}


def estimator_params(cfg: DictConfig, name: str | None = None) -> dict[str, Any]:
    """The hyperparameters the config gives estimator ``name`` (default ``adv.estimator``).

    ``adv.gamma`` / ``adv.lamda`` go to every estimator that takes them; the
    section ``adv.<name>`` holds the others and may override ``gamma`` / ``lamda``
    for that estimator (null: the shared value).

    >>> p = estimator_params(load_config(overrides=["adv.estimator=vtrace", "adv.vtrace.rho_bar=2.0"]))
    >>> p["rho_bar"], p["lamda"], p["gamma"]  # lamda is the shared adv.lamda, not vtrace's own default 1.0
    (2.0, 0.95, 0.99)
    """
    name = str(cfg.adv.estimator) if name is None else name
    spec = get_estimator(name)
    out = {k: cfg.adv[k] for k in SHARED_ADV_PARAMS if k in spec.hyperparameters}
    section = cfg.adv.get(name)
    if section is not None:
        out.update({k: v for k, v in section.items() if v is not None or k not in SHARED_ADV_PARAMS})
    return {k: v for k, v in out.items() if v is not None or k not in spec.required}


def _adv_keys(cfg: DictConfig, name: str) -> dict[str, str]:
    section = cfg.adv.get(name) or {}
    return {p: (f"adv.{name}.{p}" if section.get(p) is not None or p not in SHARED_ADV_PARAMS else f"adv.{p}")
            for p in get_estimator(name).hyperparameters}


def policy_loss_params(cfg: DictConfig) -> dict[str, Any]:
    """``actor.loss_params``: the hyperparameters of ``actor.loss_type`` besides the shared clip settings."""
    return dict(cfg.actor.loss_params)


def kl_controller_args(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`~rl2fx.control.kl.kl_init` from ``actor.kl.adaptive_kl``."""
    ak = cfg.actor.kl.adaptive_kl
    return {"controller_type": ak.controller_type, **{k: ak[k] for k in ak if k in KL_DEFAULTS}}


def lagrangian_args(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`~rl2fx.control.lagrangian.lagrangian_init` (``constraint_optimization``)."""
    co = cfg.actor.kl.constraint_optimization
    return {k: co[k] for k in ("kl_constraint", "entropy_constraint", "use_lagrangian", "lagrangian_lr")}


def pruner_args(cfg: DictConfig) -> dict[str, Any]:
    """:func:`~rl2fx.tuning.pruners.make_pruner`'s arguments for ``hyperopt.pruner``: the name and,
    for ``median`` / ``successive_halving`` / ``hyperband``, the section of that name.

    >>> pruner_args(load_config(overrides={"hyperopt.pruner": "median"}))
    {'name': 'median', 'n_startup_trials': 5, 'n_warmup_steps': 0}
    """
    name = str(cfg.hyperopt.pruner)
    section = cfg.hyperopt.get(name) if name != "none" else None
    return {"name": name, **(dict(section) if section is not None else {})}


def multi_objective_args(cfg: DictConfig) -> dict[str, Any]:
    """Keyword arguments of :class:`~rl2fx.pareto.optimizer.MultiObjectiveOptimizer` (``multi_objective``)."""
    mo = cfg.multi_objective
    return {"objectives": list(mo.objectives), "objective_weights": dict(mo.objective_weights),
            "pareto_method": mo.pareto_method, "diversity_weight": mo.diversity_weight,
            "archive_size": mo.archive_size}


#: The batch inputs the reference trainer (:class:`~rl2fx.trainer.PPOTrainer`) passes to an estimator.
#: An estimator that requires any other input can be called directly but not chosen as ``adv.estimator``.
TRAINER_INPUTS: frozenset[str] = frozenset({
    "rewards", "values", "mask", "log_rhos", "greedy_rewards", "group_size", "group",
    "reward_components", "old_logprobs",
})


def trainer_supports(name: str) -> bool:
    """Whether the reference trainer supplies every input estimator ``name`` requires.

    >>> trainer_supports("grpo"), trainer_supports("gae")
    (True, True)
    """
    spec = get_estimator(name)
    return all(i in TRAINER_INPUTS for i in spec.inputs if i in spec.required)


def _validate_adv(cfg: DictConfig) -> None:
    est = str(cfg.adv.estimator)
    _checked(get_estimator, {"name": est}, {}, "adv.estimator")  # the registry's did-you-mean
    spec = get_estimator(est)
    unsupplied = [i for i in spec.inputs if i in spec.required and i not in TRAINER_INPUTS]
    if unsupplied:
        _fail("adv.estimator", est, f"requires batch input(s) {unsupplied} that the trainer does not supply "
              f"(it supplies {sorted(TRAINER_INPUTS)}); call rl2fx.returns.advantages({est!r}, ...) in your own "
              "loop instead")
    # Every section is checked (a typo in an unused one is still a typo), the shared values with each
    # estimator that takes them.
    for name in list_estimators():
        spec = get_estimator(name)
        if name != est and name not in cfg.adv and not set(SHARED_ADV_PARAMS) & set(spec.hyperparameters):
            continue
        params = estimator_params(cfg, name)
        missing = [p for p in spec.required if p not in params and p in spec.hyperparameters]
        if missing and name == est:
            _fail(f"adv.{name}.{missing[0]}", None, f"must be set for adv.estimator={name!r}")
        _checked(check_hyperparameters, {"name": name, "params": params}, _adv_keys(cfg, name), f"adv.{name}")
    spec = get_estimator(est)
    if cfg.critic.enabled is False and spec.needs_values:
        _fail("critic.enabled", False, f"must be true (or null) for adv.estimator={est!r}, which needs a value model")
    rpp = cfg.data.responses_per_prompt
    params = estimator_params(cfg)
    if rpp is not None and "group_size" in spec.inputs and set(spec.required) <= {"rewards", "group_size", *params}:
        # the estimator's own check on groups of this size (rloo and grpo_passk need 2 responses)
        _checked(spec.fn, {**spec.defaults, **params, "rewards": torch.zeros(2 * int(rpp), 1), "group_size": int(rpp)},
                 {"group_size": "data.responses_per_prompt"}, "data.responses_per_prompt")


def _raw_leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> unresolved value of every leaf of ``node`` (a plain container)."""
    if isinstance(node, dict):
        return {k: v for key, sub in node.items() for k, v in _raw_leaves(sub, f"{prefix}{key}.").items()}
    if isinstance(node, list):
        return {k: v for i, sub in enumerate(node) for k, v in _raw_leaves(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: node}


def _check_interpolations(cfg: DictConfig) -> None:
    """Resolve every ``${...}`` now, so a missing key is named at load time, not deep in the run.

    The key named is the one whose own text holds the broken reference: a default that merely
    interpolates it (``memory_optimization.profiling.save_path: ${trainer.output_dir}/...``) fails
    too, but is not where the user has to look.
    """
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raws = _raw_leaves(OmegaConf.to_container(cfg, resolve=False))
        errors: dict[str, OmegaConfBaseException] = {}
        for key, raw in raws.items():
            if isinstance(raw, str) and "${" in raw:
                try:
                    OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
                except OmegaConfBaseException as inner:
                    errors[key] = inner
        roots = [k for k in errors if not any("${" + other in str(raws[k]) for other in errors if other != k)]
        key = (roots or list(errors) or [getattr(e, "full_key", None) or "?"])[0]
        err = errors.get(key, e)
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"config key '{key}' holds an interpolation that cannot be resolved: {msg}") from None


def _check_device(dev: str) -> None:
    """``trainer.device``: 'auto', 'cpu', or a CUDA device that exists on this machine."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available = ["auto", "cpu"] + (["cuda"] + [f"cuda:{i}" for i in range(n)] if n else [])
    m = re.fullmatch(r"cuda(?::(\d+))?", dev)
    if dev in ("auto", "cpu") or (m is not None and n > 0 and (m.group(1) is None or int(m.group(1)) < n)):
        return
    what = "is not a device of this machine" if m is not None else "must be 'auto', 'cpu', 'cuda' or 'cuda:N'"
    _fail("trainer.device", dev, f"{what} (available: {available})")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _check_model_name(name: str | None) -> None:
    """``actor.model_name``: a local model directory, or a hub id already in the local cache (no download)."""
    if name is None or Path(name).expanduser().is_dir():
        return
    how = "give a local model directory, or download the model into the Hugging Face cache first " \
          "('huggingface-cli download <id>'); rl2fx never downloads at run time"
    if _HUB_ID.fullmatch(name) is None or Path(name).expanduser().exists():
        _fail("actor.model_name", name, f"is not a model directory (no such directory); {how}")
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        _fail("actor.model_name", name, f"is neither a local directory nor a hub id in the local cache; {how}")


def validate_config(cfg: DictConfig) -> DictConfig:
    """Range and name checks on a config merged into the schema; returns ``cfg``.

    Each section goes to the library function that consumes it; its error names the key.

    >>> cfg = load_config()
    >>> cfg.adv.estimator = "vtrce"
    >>> validate_config(cfg)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    rl2fx.trainer.config.ConfigError: config key 'adv.estimator': unknown estimator 'vtrce'; did you mean 'vtrace'? Registered: [...]
    >>> validate_config(load_config(overrides=["actor.kl.adaptive_kl.linear_factor=2.0"]))
    Traceback (most recent call last):
    ...
    rl2fx.trainer.config.ConfigError: config key 'actor.kl.adaptive_kl.linear_factor' must be in (0, 1], got 2.0
    """
    _check_interpolations(cfg)
    _in(cfg, "data.prompts_per_rollout", 1, optional=True)
    _in(cfg, "data.responses_per_prompt", 1, optional=True)
    _in(cfg, "actor.lr", 0.0, low_open=True)
    _checked(kl_coef_value, {"coef": cfg.actor.kl.coef}, {"coef": "actor.kl.coef"}, "actor.kl")
    ak = "actor.kl.adaptive_kl"
    _checked(kl_init, kl_controller_args(cfg), _keys(ak, KL_DEFAULTS) | {"controller_type": f"{ak}.controller_type"},
             ak)
    co = "actor.kl.constraint_optimization"
    _checked(lagrangian_init, lagrangian_args(cfg), _keys(co, lagrangian_args(cfg)), co)
    _validate_adv(cfg)

    mo = cfg.multi_objective
    for name in mo.objective_weights:  # named per weight, before the optimizer's own check of the set
        if name not in mo.objectives:
            _fail(f"multi_objective.objective_weights.{name}", name,
                  f"must be one of multi_objective.objectives {list(mo.objectives)}")
    _checked(MultiObjectiveOptimizer, multi_objective_args(cfg), _keys("multi_objective", multi_objective_args(cfg)),
             "multi_objective")

    h = cfg.hyperopt
    hk = {"optimizer_type": "hyperopt.optimizer_type", "n_trials": "hyperopt.n_trials",
          "grid_size": "hyperopt.grid.grid_size", "exploration_weight": "hyperopt.bayesian.exploration_weight"}
    # the tuner checks its own settings and the chosen sampler's (no study is written: save_dir=None) ...
    _checked(HyperparameterTuner, {"optimizer_type": h.optimizer_type, "n_trials": h.n_trials, "save_dir": None,
                                   "grid_size": h.grid.grid_size, "exploration_weight": h.bayesian.exploration_weight,
                                   "show_progress_bar": False}, hk, "hyperopt")
    # ... and the samplers of the other sections check theirs (a switch of optimizer_type must not fail later)
    _checked(make_sampler, {"optimizer_type": "grid", "grid_size": h.grid.grid_size}, hk, "hyperopt.grid")
    _checked(make_sampler, {"optimizer_type": "bayesian", "exploration_weight": h.bayesian.exploration_weight}, hk,
             "hyperopt.bayesian")
    _in(cfg, "hyperopt.report_interval", 1)
    _in(cfg, "hyperopt.seeds_per_trial", 1)
    if h.storage is not None and "://" not in str(h.storage):  # a typo must not become a directory named "sqlite:"
        _fail("hyperopt.storage", h.storage, "must be null or a database URL such as 'sqlite:///study.db' "
              "(a directory study goes in hyperopt.save_dir)")
    # the pruner name and each pruner section's settings go to the tuning package's make_pruner
    _checked(make_pruner, {"name": h.pruner}, {"pruner": "hyperopt.pruner"}, "hyperopt.pruner")
    for name in ("median", "successive_halving", "hyperband"):
        _checked(make_pruner, {"name": name, **h[name]}, _keys(f"hyperopt.{name}", h[name]), f"hyperopt.{name}")

    mem = cfg.memory_optimization
    section = {k: mem[k] for k in mem if k not in ("profiling", "adaptive_batch_sizing")}
    _checked(MemoryOptimizer.from_config, {"section": section}, _keys("memory_optimization", section),
             "memory_optimization")
    _checked(MemoryProfiler, {"enabled": False, "profile_interval": mem.profiling.profile_interval},
             {"profile_interval": "memory_optimization.profiling.profile_interval"}, "memory_optimization.profiling")
    abs_ = {k: v for k, v in mem.adaptive_batch_sizing.items() if k != "enabled"}
    _checked(batch_size_init, abs_, _keys("memory_optimization.adaptive_batch_sizing", abs_),
             "memory_optimization.adaptive_batch_sizing")

    t = cfg.trainer
    _in(cfg, "trainer.total_steps", 1)
    _in(cfg, "trainer.update_epochs", 1)
    _in(cfg, "trainer.num_threads", 1, optional=True)
    _checked(check_step_args, {"micro_batch_size": t.micro_batch_size, "max_grad_norm": t.max_grad_norm},
             _keys("trainer", ("micro_batch_size", "max_grad_norm")), "trainer")
    _in(cfg, "trainer.weight_decay", 0.0)
    if t.kl_type not in ("loss", "reward"):
        _fail("trainer.kl_type", t.kl_type, "must be one of ['loss', 'reward']")
    _checked(get_policy_loss, {"name": str(cfg.actor.loss_type)}, {}, "actor.loss_type")
    loss_keys = {**_keys("actor.loss_params", get_policy_loss(str(cfg.actor.loss_type)).hyperparameters),
                 "clip": "actor.clip", "clip_high": "trainer.clip_high", "dual_clip": "trainer.dual_clip",
                 "agg_mode": "trainer.agg_mode", "kl_estimator": "trainer.kl_estimator",
                 "kl_log_ratio_clamp": "trainer.kl_log_ratio_clamp", "kl_value_clamp": "trainer.kl_value_clamp",
                 "chunk_size": "trainer.logprob_chunk_size"}
    _checked(make_ppo_loss, {"loss_type": str(cfg.actor.loss_type), "loss_params": policy_loss_params(cfg),
                             "clip": cfg.actor.clip, "clip_high": t.clip_high, "dual_clip": t.dual_clip,
                             "agg_mode": t.agg_mode, "kl_estimator": t.kl_estimator,
                             "kl_log_ratio_clamp": t.kl_log_ratio_clamp, "kl_value_clamp": t.kl_value_clamp},
             loss_keys, "actor")
    _in(cfg, "trainer.logprob_chunk_size", 1)
    _in(cfg, "trainer.save_interval", 0)
    _in(cfg, "trainer.summary_window", 1)
    _check_device(str(t.device))
    if cfg.actor.local_files_only:
        _check_model_name(cfg.actor.model_name)
    _in(cfg, "trainer.eval_interval", 0)
    _in(cfg, "trainer.dynamic_sampling_max_rollouts", 1)
    _in(cfg, "rollout.max_turns", 1)
    _in(cfg, "trainer.overlong_buffer_len", 1, optional=True)
    _in(cfg, "trainer.overlong_penalty_factor", 0.0)
    if t.rollout_is is not None and t.rollout_is not in IS_LEVELS:
        _fail("trainer.rollout_is", t.rollout_is, f"must be null or one of {list(IS_LEVELS)}")
    if t.rollout_rs is not None and t.rollout_rs not in RS_LEVELS:
        _fail("trainer.rollout_rs", t.rollout_rs, f"must be null or one of {list(RS_LEVELS)}")
    _in(cfg, "trainer.rollout_is_cap", 1.0)
    _in(cfg, "trainer.rollout_rs_low", 0.0, low_open=True)
    if not t.rollout_rs_high > t.rollout_rs_low:
        _fail("trainer.rollout_rs_high", t.rollout_rs_high, f"must be > trainer.rollout_rs_low ({t.rollout_rs_low})")
    if t.strategy not in ("auto", *STRATEGIES):
        _fail("trainer.strategy", t.strategy, f"must be one of {['auto', *STRATEGIES]}")
    if t.fsdp_param_dtype is not None and t.fsdp_param_dtype not in ("bfloat16", "float16", "float32"):
        _fail("trainer.fsdp_param_dtype", t.fsdp_param_dtype, "must be null, 'bfloat16', 'float16' or 'float32'")
    if t.strategy != "fsdp" and (t.fsdp_cpu_offload or t.fsdp_param_dtype is not None or t.fsdp_wrap is not None):
        key = next(k for k in ("fsdp_cpu_offload", "fsdp_param_dtype", "fsdp_wrap") if t[k] not in (None, False))
        _fail(f"trainer.{key}", t[key], f"is an FSDP2 setting: it needs trainer.strategy=fsdp (got {t.strategy!r})")
    _in(cfg, "data.max_prompt_length", 1, optional=True)
    rw = cfg.reward
    if rw.combine not in COMBINE_METHODS:
        _fail("reward.combine", rw.combine, f"must be one of {list(COMBINE_METHODS)}")
    if rw.weights is not None:
        bad = [w for w in rw.weights if not math.isfinite(float(w))]
        if bad:
            _fail("reward.weights", list(rw.weights), "must be finite numbers")
        if rw.functions and len(rw.weights) != len(rw.functions):
            _fail("reward.weights", list(rw.weights), f"must have one weight per reward.functions entry "
                  f"({len(rw.functions)})")
    _in(cfg, "actor.lora.r", 1)
    _in(cfg, "actor.lora.alpha", 1)
    _in(cfg, "actor.lora.dropout", 0.0, 1.0)

    _in(cfg, "rollout.max_new_tokens", 1, optional=True)
    _in(cfg, "rollout.temperature", 0.0, low_open=True)
    _in(cfg, "rollout.top_k", 0)
    _in(cfg, "rollout.top_p", 0.0, 1.0, low_open=True)
    if cfg.task.name != "digits":
        _fail("task.name", cfg.task.name, "must be one of ['digits']")
    if cfg.task.reward_level not in REWARD_LEVELS:
        _fail("task.reward_level", cfg.task.reward_level, f"must be one of {list(REWARD_LEVELS)}")
    _checked(DigitCopyTask, {"n_digits": cfg.task.n_digits, "mode": cfg.task.mode}, _keys("task", ("n_digits", "mode")),
             "task")
    m = cfg.model
    margs = {k: m[k] for k in ("arch", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                               "max_position_embeddings")}
    _checked(check_model_args, {"vocab_size": len(VOCAB), **margs}, _keys("model", margs), "model")
    _in(cfg, "critic.lr", 0.0, low_open=True)
    _in(cfg, "critic.coef", 0.0)
    _checked(make_value_loss, {"clip": cfg.critic.clip, "agg_mode": t.agg_mode},
             {"clip": "critic.clip", "agg_mode": "trainer.agg_mode"}, "critic")
    return cfg


def _resolve_path(path: str | os.PathLike[str] | None) -> Path:
    if path is None:
        return CONFIG_DIR / "ppo.yaml"
    p = Path(path)
    if p.exists():
        return p
    packaged = CONFIG_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if packaged.exists():
        return packaged
    shipped = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {str(path)!r} not found (packaged configs: {shipped})")


def _merge_into_schema(raw: dict[str, Any], cls: type) -> DictConfig:
    _check_keys(raw, cls, "")
    base = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(base, OmegaConf.create(raw))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config key '{key}' has the wrong type: {msg}") from None
    assert isinstance(merged, DictConfig)
    # A free mapping given in the file or an override replaces the default one
    # (merging would keep default names the user dropped).
    for path in _FREE_MAPPINGS:
        node: Any = raw
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            OmegaConf.update(merged, path, node, merge=False)
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """``"dotted.key=value"`` as ``(key, value)``, the value parsed as YAML.

    >>> parse_override("adv.estimator=grpo"), parse_override("imports=[a.b]")
    (('adv.estimator', 'grpo'), ('imports', ['a.b']))
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like 'dotted.key=value'")
    k, v = text.split("=", 1)
    try:
        value = yaml.safe_load(v)
    except yaml.YAMLError:
        value = v
    return k.lstrip("+"), value


def load_config(path: str | os.PathLike[str] | None = None, overrides: Any = ()) -> DictConfig:
    """Load a YAML config (a file path or a packaged name such as ``"demo"``), apply overrides, validate.

    ``overrides`` are dotted ``key=value`` strings (values parsed as YAML:
    ``actor.lr=1e-4``, ``multi_objective.objectives=[reward,entropy]``) or a
    mapping of dotted keys to values. The modules listed under ``imports`` are
    imported first, so that estimators and policy losses they register are known
    to the schema and the checks. The result is a structured ``DictConfig``
    (typed: assigning a wrong type later raises too).

    >>> load_config("demo").task.mode
    'reverse'
    >>> load_config(overrides={"adv.gamma": 2.0})
    Traceback (most recent call last):
    ...
    rl2fx.trainer.config.ConfigError: config key 'adv.gamma' must be in [0.0, 1.0], got 2.0
    >>> load_config(overrides=["actor.clip=abc"])
    Traceback (most recent call last):
    ...
    rl2fx.trainer.config.ConfigError: config key 'actor.clip' has the wrong type: Value 'abc' of type 'str' could not be converted to Float
    """
    raw = _load_composed(_resolve_path(path))
    if isinstance(overrides, Mapping):
        items = [(str(k), v) for k, v in overrides.items()]
    else:
        items = [parse_override(o) for o in overrides]
    for key, value in items:
        if key == "imports":
            raw["imports"] = value
    _import_modules(raw.get("imports"))
    cls = schema()
    for key, value in items:
        _set_dotted(raw, key, value, cls)
    return validate_config(_merge_into_schema(raw, cls))


def parse_yaml_file(path: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds, unresolved; one :class:`ConfigError` line (file, line, problem)
    for invalid YAML (syntax, tabs, duplicate keys, ``!!python`` tags), an unreadable, empty or non-mapping file."""
    try:
        text = path.read_text(encoding="utf-8")
        loaded = OmegaConf.create(text) if text.strip() else None
    except yaml.YAMLError as e:  # syntax, tabs, duplicate keys, !!python tags (OmegaConf loads safely)
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        raise ConfigError(f"config file {str(path)!r}{where}: invalid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config file {str(path)!r} cannot be read: {first}") from None
    if loaded is None or (isinstance(loaded, DictConfig) and len(loaded) == 0):
        raise ConfigError(f"config file {str(path)!r} is empty; give at least one section "
                          "(or leave out --config for the defaults)")
    raw = OmegaConf.to_container(loaded, resolve=False)
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping")
    return raw


def _load_composed(path: Path, depth: int = 0) -> dict[str, Any]:
    """Load ``path`` and the packaged configs its Hydra ``defaults`` list names (``_self_`` last)."""
    if depth > 8:
        raise ConfigError(f"config defaults nest too deeply at {str(path)!r}")
    raw = parse_yaml_file(path)
    defaults = raw.pop("defaults", None) or []
    raw.pop("hydra", None)
    merged = OmegaConf.create({})
    for entry in defaults:
        if isinstance(entry, str) and entry != "_self_":
            base = _load_composed(_resolve_path(entry), depth + 1)
            merged = OmegaConf.merge(merged, base)
    merged = OmegaConf.merge(merged, OmegaConf.create(raw))
    out = OmegaConf.to_container(merged, resolve=False)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def _set_dotted(raw: dict[str, Any], key: str, value: Any, cls: Any) -> None:
    parts = key.split(".")
    node: Any = raw
    section: Any = cls
    for i, part in enumerate(parts[:-1]):
        prefix = ".".join(parts[:i])
        if section is not None:
            known = {f.name: f for f in fields(section)}
            if part not in known:
                path = ".".join(parts[: i + 1])
                full_known = [f"{prefix + '.' if prefix else ''}{k}" for k in known]
                raise ConfigError(f"unknown config key '{path}'{_suggest(path, full_known)}")
            default = getattr(section(), part)
            section = type(default) if is_dataclass(default) else None
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is not a section")
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value)
    node[parts[-1]] = value


def check_override_keys(overrides: Any) -> None:
    """Raise :class:`ConfigError` (with a did-you-mean) for a ``key=value`` override naming no schema key.

    Hydra's own options (``hydra.*``, ``--flags``) and deletions (``~key``) are skipped;
    an ``imports=[...]`` override is imported first (its estimators add ``adv`` sections).

    >>> check_override_keys(["actor.lr=1e-4", "hydra.run.dir=."])
    >>> check_override_keys(["actor.kl.adaptive_kl.enabeld=true"])
    Traceback (most recent call last):
    ...
    rl2fx.trainer.config.ConfigError: unknown config key 'actor.kl.adaptive_kl.enabeld'; did you mean 'actor.kl.adaptive_kl.enabled'?
    """
    items = [parse_override(o) for o in overrides
             if not o.startswith(("-", "~")) and "=" in o and o.split("=", 1)[0].lstrip("+").split(".")[0]
             not in _HYDRA_KEYS]
    for key, value in items:
        if key == "imports":
            _import_modules(value)
    cls = schema()
    for key, _ in items:
        raw: dict[str, Any] = {}
        _set_dotted(raw, key, None, cls)
        _check_keys(raw, cls, "")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain nested dicts (for logging and checkpoints)."""
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def structured_from_hydra(cfg: DictConfig) -> DictConfig:
    """Validate a config that Hydra composed (drops Hydra's own keys, imports ``imports``)."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    for k in _HYDRA_KEYS:
        raw.pop(k, None)
    _import_modules(raw.get("imports"))
    return validate_config(_merge_into_schema(raw, schema()))
