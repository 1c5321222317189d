"""The spec's YAML configuration as a typed, validated structured config (dataclasses + OmegaConf).

The sections ``data``, ``actor``, ``adv``, ``multi_objective``, ``hyperopt``,
``memory_optimization`` and ``experiment_tracking`` are the spec's "Complete
Configuration Schema", with the same keys and defaults. rl2fx adds:

* under ``actor.kl.adaptive_kl``: the parameters of the other controllers the
  spec documents (``linear_factor``, ``kp``, ``ki``, ``kd``, ``schedule_type``,
  ``schedule_steps``), with the spec's defaults;
* new sections for what a runnable trainer needs: ``trainer`` (steps, seed,
  optimisation and loss settings, output, checkpoints), ``rollout``
  (generation), ``task`` (the verifiable-reward task), ``model`` (the tiny
  transformers model built locally when ``actor.model_name`` is null) and
  ``critic`` (the value model GAE-style estimators need).

:func:`load_config` reads a YAML file (default: the packaged ``configs/ppo.yaml``),
applies dotted overrides and validates: unknown keys (with a did-you-mean
suggestion), wrong types, out-of-range values and unknown names raise
:class:`ConfigError` (a ``ValueError``) naming the key.

>>> cfg = load_config(overrides=["actor.kl.adaptive_kl.enabled=true"])
>>> cfg.actor.kl.adaptive_kl.enabled, cfg.actor.lr, cfg.adv.estimator
(True, 1e-06, 'gae')
>>> load_config(overrides=["actor.lrr=0.1"])
Traceback (most recent call last):
...
rl2fx.config.ConfigError: unknown config key 'actor.lrr'; did you mean 'actor.lr'?
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "ConfigError",
    "RL2Config",
    "ESTIMATORS",
    "VALUE_ESTIMATORS",
    "PARETO_METHODS",
    "OPTIMIZER_TYPES",
    "CONFIG_DIR",
    "load_config",
    "validate_config",
    "to_container",
    "check_override_keys",
]

CONFIG_DIR = Path(__file__).parent / "configs"

#: Every name ``adv.estimator`` accepts (the spec's list plus the group-relative estimators).
ESTIMATORS = ("gae", "reinforce", "vtrace", "retrace", "td_lambda", "clipped_is", "multistep",
              "grpo", "dr_grpo", "rloo", "reinforce_pp", "remax", "opo", "gpg", "grpo_passk",
              "reinforce_pp_baseline")
#: Estimators that need a value model (``critic.enabled``).
VALUE_ESTIMATORS = ("gae", "vtrace", "retrace", "td_lambda", "multistep")
PARETO_METHODS = ("weighted_sum", "tchebycheff", "pareto_dominance", "hypervolume")
OPTIMIZER_TYPES = ("random", "grid", "bayesian", "skopt")
KL_CONTROLLERS = ("fixed", "exponential", "linear", "pid", "schedule", "proportional")
SCHEDULE_TYPES = ("cosine", "linear", "exponential", "warmup_cosine")
BOOTSTRAP_METHODS = ("gae", "td", "mc")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the dotted key."""


# ----------------------------------------------------------------------------- spec sections
@dataclass
class DataConfig:
    train_data_path: str | None = None
    test_data_path: str | None = None
    prompts_per_rollout: int | None = None
    responses_per_prompt: int | None = None


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
    lr: float = 1e-6
    clip: float = 0.2
    kl: KLConfig = field(default_factory=KLConfig)


@dataclass
class VTraceConfig:
    rho_bar: float = 1.0
    c_bar: float = 1.0


@dataclass
class RetraceConfig:
    lamda: float = 0.95


@dataclass
class ClippedISConfig:
    clip_ratio: float = 0.2


@dataclass
class MultistepConfig:
    n_steps: int = 5
    bootstrap_method: str = "gae"


@dataclass
class AdvConfig:
    estimator: str = "gae"
    gamma: float = 0.99
    lamda: float = 0.95
    vtrace: VTraceConfig = field(default_factory=VTraceConfig)
    retrace: RetraceConfig = field(default_factory=RetraceConfig)
    clipped_is: ClippedISConfig = field(default_factory=ClippedISConfig)
    multistep: MultistepConfig = field(default_factory=MultistepConfig)


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
class HyperoptConfig:
    enabled: bool = False
    optimizer_type: str = "random"
    n_trials: int = 100
    save_dir: str = "hyperopt_results"
    bayesian: BayesianConfig = field(default_factory=BayesianConfig)
    grid: GridConfig = field(default_factory=GridConfig)


@dataclass
class ProfilingConfig:
    enabled: bool = False
    profile_interval: float = 1.0
    save_path: str = "memory_profile.json"


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
    # rl2fx: where MLflow writes (the design's embedded SQLite store by default)
    tracking_uri: str = "sqlite:///mlruns.db"


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
    kl_estimator: str = "k3"  # k1 | k2 | k3
    kl_type: str = "loss"  # loss: beta * KL added to the loss; reward: -beta * KL folded into rewards
    clip_high: float | None = None  # DAPO clip-higher; null = actor.clip
    dual_clip: float | None = None
    entropy_coef: float = 0.0
    whiten_advantages: bool = True
    logprob_chunk_size: int = 256
    output_dir: str = "outputs/rl2fx"
    save_interval: int = 0  # steps between checkpoints; 0 = only at the end
    resume_from: str | None = None  # a checkpoint file, or "auto" (latest in output_dir)
    progress_bar: bool = True
    summary_window: int = 20  # steps averaged for the start/end reward summary


@dataclass
class RolloutConfig:
    """Generation settings (rl2fx extension)."""

    max_new_tokens: int | None = None  # null: the task's answer length + 1 (room for <eos>)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class TaskConfig:
    """The verifiable-reward task (rl2fx extension)."""

    name: str = "digits"
    mode: str = "reverse"  # copy | reverse | repeat
    n_digits: int = 2


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
    data: DataConfig = field(default_factory=DataConfig)
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
_FREE_MAPPINGS = {"multi_objective.objective_weights"}


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
        low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        if optional:
            return
        _fail(key, value, "must be set")
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        lb, rb = ("(" if low_open else "["), (")" if high_open else "]")
        _fail(key, value, f"must be in {lb}{'-inf' if low is None else low}, {'inf' if high is None else high}{rb}")


def _choice(cfg: DictConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in allowed:
        best = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.5)
        hint = f"; did you mean '{best[0]}'?" if best else ""
        raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}{hint}")


def validate_config(cfg: DictConfig) -> DictConfig:
    """Range and name checks on a config merged into the schema; returns ``cfg``.

    >>> cfg = load_config()
    >>> cfg.adv.estimator = "vtrce"
    >>> validate_config(cfg)
    Traceback (most recent call last):
    ...
    rl2fx.config.ConfigError: config key 'adv.estimator' must be one of ['gae', 'reinforce', 'vtrace', 'retrace', 'td_lambda', 'clipped_is', 'multistep', 'grpo', 'dr_grpo', 'rloo', 'reinforce_pp', 'remax', 'opo', 'gpg', 'grpo_passk', 'reinforce_pp_baseline'], got 'vtrce'; did you mean 'vtrace'?
    """
    _in(cfg, "data.prompts_per_rollout", 1, optional=True)
    _in(cfg, "data.responses_per_prompt", 1, optional=True)
    _in(cfg, "actor.lr", 0.0, low_open=True)
    _in(cfg, "actor.clip", 0.0, 1.0)
    _in(cfg, "actor.kl.coef", 0.0)
    ak = "actor.kl.adaptive_kl"
    _choice(cfg, f"{ak}.controller_type", KL_CONTROLLERS)
    _in(cfg, f"{ak}.target_kl", 0.0, low_open=True)
    _in(cfg, f"{ak}.min_coef", 0.0, low_open=True)
    _in(cfg, f"{ak}.max_coef", cfg.actor.kl.adaptive_kl.min_coef)
    _in(cfg, f"{ak}.initial_coef", cfg.actor.kl.adaptive_kl.min_coef, cfg.actor.kl.adaptive_kl.max_coef)
    _in(cfg, f"{ak}.exp_factor", 1.0)
    _in(cfg, f"{ak}.exp_decay", 0.0, 1.0, low_open=True)
    _in(cfg, f"{ak}.linear_factor", 0.0)
    for gain in ("kp", "ki", "kd"):
        _in(cfg, f"{ak}.{gain}", 0.0)
    _choice(cfg, f"{ak}.schedule_type", SCHEDULE_TYPES)
    _in(cfg, f"{ak}.schedule_steps", 1)
    co = "actor.kl.constraint_optimization"
    _in(cfg, f"{co}.kl_constraint", 0.0, low_open=True)
    _in(cfg, f"{co}.entropy_constraint", 0.0)
    _in(cfg, f"{co}.lagrangian_lr", 0.0, low_open=True)

    _choice(cfg, "adv.estimator", ESTIMATORS)
    _in(cfg, "adv.gamma", 0.0, 1.0)
    _in(cfg, "adv.lamda", 0.0, 1.0)
    _in(cfg, "adv.vtrace.rho_bar", 0.0, low_open=True)
    _in(cfg, "adv.vtrace.c_bar", 0.0, low_open=True)
    _in(cfg, "adv.retrace.lamda", 0.0, 1.0)
    _in(cfg, "adv.clipped_is.clip_ratio", 0.0, low_open=True)
    _in(cfg, "adv.multistep.n_steps", 1)
    _choice(cfg, "adv.multistep.bootstrap_method", BOOTSTRAP_METHODS)

    mo = cfg.multi_objective
    if len(mo.objectives) == 0:
        _fail("multi_objective.objectives", list(mo.objectives), "must name at least one objective")
    for name in mo.objective_weights:
        if name not in mo.objectives:
            _fail(f"multi_objective.objective_weights.{name}", name,
                  f"must be one of multi_objective.objectives {list(mo.objectives)}")
    _choice(cfg, "multi_objective.pareto_method", PARETO_METHODS)
    _in(cfg, "multi_objective.diversity_weight", 0.0)
    _in(cfg, "multi_objective.archive_size", 1)

    _choice(cfg, "hyperopt.optimizer_type", OPTIMIZER_TYPES)
    _in(cfg, "hyperopt.n_trials", 1)
    _in(cfg, "hyperopt.bayesian.exploration_weight", 0.0)
    _in(cfg, "hyperopt.grid.grid_size", 1)

    mem = "memory_optimization"
    _in(cfg, f"{mem}.memory_threshold", 0.0, 1.0, low_open=True)
    _in(cfg, f"{mem}.gc_threshold", 0.0, 1.0, low_open=True)
    _in(cfg, f"{mem}.memory_threshold", 0.0, cfg.memory_optimization.gc_threshold, low_open=True)
    _in(cfg, f"{mem}.profiling.profile_interval", 0.0, low_open=True)
    abs_ = cfg.memory_optimization.adaptive_batch_sizing
    _in(cfg, f"{mem}.adaptive_batch_sizing.min_batch_size", 1)
    _in(cfg, f"{mem}.adaptive_batch_sizing.max_batch_size", abs_.min_batch_size)
    _in(cfg, f"{mem}.adaptive_batch_sizing.initial_batch_size", abs_.min_batch_size, abs_.max_batch_size)
    _in(cfg, f"{mem}.adaptive_batch_sizing.adaptation_factor", 0.0, 1.0, low_open=True)

    _in(cfg, "trainer.total_steps", 1)
    _in(cfg, "trainer.update_epochs", 1)
    _in(cfg, "trainer.num_threads", 1, optional=True)
    _in(cfg, "trainer.micro_batch_size", 1, optional=True)
    _in(cfg, "trainer.max_grad_norm", 0.0, low_open=True, optional=True)
    _in(cfg, "trainer.weight_decay", 0.0)
    _choice(cfg, "trainer.agg_mode", AGG_MODES)
    _choice(cfg, "trainer.kl_estimator", ("k1", "k2", "k3"))
    _choice(cfg, "trainer.kl_type", ("loss", "reward"))
    _in(cfg, "trainer.clip_high", 0.0, optional=True)
    _in(cfg, "trainer.dual_clip", 1.0, low_open=True, optional=True)
    _in(cfg, "trainer.logprob_chunk_size", 1)
    _in(cfg, "trainer.save_interval", 0)
    _in(cfg, "trainer.summary_window", 1)
    dev = cfg.trainer.device
    if not (dev in ("auto", "cpu", "cuda") or str(dev).startswith("cuda:")):
        _fail("trainer.device", dev, "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")

    _in(cfg, "rollout.max_new_tokens", 1, optional=True)
    _in(cfg, "rollout.temperature", 0.0, low_open=True)
    _in(cfg, "rollout.top_k", 0)
    _in(cfg, "rollout.top_p", 0.0, 1.0, low_open=True)
    _choice(cfg, "task.name", ("digits",))
    _choice(cfg, "task.mode", ("copy", "reverse", "repeat"))
    _in(cfg, "task.n_digits", 1, 16)
    _choice(cfg, "model.arch", ("llama", "gpt2"))
    for k in ("hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
        _in(cfg, f"model.{k}", 1)
    if cfg.model.hidden_size % cfg.model.num_heads:
        _fail("model.hidden_size", cfg.model.hidden_size, f"must be divisible by model.num_heads ({cfg.model.num_heads})")
    _in(cfg, "critic.lr", 0.0, low_open=True)
    _in(cfg, "critic.clip", 0.0, optional=True)
    _in(cfg, "critic.coef", 0.0)
    if cfg.critic.enabled is False and cfg.adv.estimator in VALUE_ESTIMATORS:
        _fail("critic.enabled", False, f"must be true (or null) for adv.estimator={cfg.adv.estimator!r}, "
              "which needs a value model")
    rpp = cfg.data.responses_per_prompt
    if cfg.adv.estimator in ("rloo", "grpo_passk") and rpp is not None and rpp < 2:
        _fail("data.responses_per_prompt", rpp, f"must be >= 2 for adv.estimator={cfg.adv.estimator!r}, "
              "which compares each response with the others of its prompt")
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


def _merge_into_schema(raw: dict[str, Any]) -> DictConfig:
    _check_keys(raw, RL2Config, "")
    base = OmegaConf.structured(RL2Config)
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


def load_config(path: str | os.PathLike[str] | None = None, overrides: Any = ()) -> DictConfig:
    """Load a YAML config (a file path or a packaged name such as ``"demo"``), apply overrides, validate.

    ``overrides`` are dotted ``key=value`` strings (values parsed as YAML:
    ``actor.lr=1e-4``, ``multi_objective.objectives=[reward,entropy]``) or a
    mapping of dotted keys to values. The result is a structured ``DictConfig``
    (typed: assigning a wrong type later raises too).

    >>> load_config("demo").task.mode
    'reverse'
    >>> load_config(overrides={"adv.gamma": 2.0})
    Traceback (most recent call last):
    ...
    rl2fx.config.ConfigError: config key 'adv.gamma' must be in [0.0, 1.0], got 2.0
    >>> load_config(overrides=["actor.clip=abc"])
    Traceback (most recent call last):
    ...
    rl2fx.config.ConfigError: config key 'actor.clip' has the wrong type: Value 'abc' of type 'str' could not be converted to Float
    """
    raw = _load_composed(_resolve_path(path))
    if isinstance(overrides, dict):
        items = [(str(k), v) for k, v in overrides.items()]
    else:
        items = []
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override {o!r} must look like 'dotted.key=value'")
            k, v = o.split("=", 1)
            items.append((k.lstrip("+"), _parse_value(v)))
    for key, value in items:
        _set_dotted(raw, key, value)
    return validate_config(_merge_into_schema(raw))


def _load_composed(path: Path, depth: int = 0) -> dict[str, Any]:
    """Load ``path`` and the packaged configs its Hydra ``defaults`` list names (``_self_`` last)."""
    if depth > 8:
        raise ConfigError(f"config defaults nest too deeply at {str(path)!r}")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping")
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


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = raw
    schema: Any = RL2Config
    for i, part in enumerate(parts[:-1]):
        prefix = ".".join(parts[:i])
        if schema is not None:
            known = {f.name: f for f in fields(schema)}
            if part not in known:
                path = ".".join(parts[: i + 1])
                full_known = [f"{prefix + '.' if prefix else ''}{k}" for k in known]
                raise ConfigError(f"unknown config key '{path}'{_suggest(path, full_known)}")
            default = getattr(schema(), part)
            schema = type(default) if is_dataclass(default) else None
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' is not a section")
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value)
    node[parts[-1]] = value


def check_override_keys(overrides: Any) -> None:
    """Raise :class:`ConfigError` (with a did-you-mean) for a ``key=value`` override naming no schema key.

    Hydra's own options (``hydra.*``, ``--flags``) and deletions (``~key``) are skipped.

    >>> check_override_keys(["actor.lr=1e-4", "hydra.run.dir=."])
    >>> check_override_keys(["actor.kl.adaptive_kl.enabeld=true"])
    Traceback (most recent call last):
    ...
    rl2fx.config.ConfigError: unknown config key 'actor.kl.adaptive_kl.enabeld'; did you mean 'actor.kl.adaptive_kl.enabled'?
    """
    for o in overrides:
        if o.startswith(("-", "~")) or "=" not in o:
            continue
        key = o.split("=", 1)[0].lstrip("+")
        if key.split(".")[0] in _HYDRA_KEYS:
            continue
        raw: dict[str, Any] = {}
        _set_dotted(raw, key, None)
        _check_keys(raw, RL2Config, "")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain nested dicts (for logging and checkpoints)."""
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]


def structured_from_hydra(cfg: DictConfig) -> DictConfig:
    """Validate a config that Hydra composed (drops Hydra's own keys)."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    for k in _HYDRA_KEYS:
        raw.pop(k, None)
    return validate_config(_merge_into_schema(raw))
