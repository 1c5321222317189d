"""``rl2fx tune``: run a config's ``hyperopt`` section over PPO training runs.

Each trial is a :class:`~rl2fx.trainer.ppo.PPOTrainer` run of the config with the trial's
parameters applied as overrides (the search space's names are dotted config keys);
its objective is ``reward_end``, the mean task reward over the last
``trainer.summary_window`` steps, maximised; with ``hyperopt.seeds_per_trial = n`` a trial is
``n`` runs (seeds ``trainer.seed + i``, ``model.seed + i``) and its value their mean, so the
study does not pick a configuration for one lucky seed. Every ``hyperopt.report_interval`` steps
the run reports the same running value (the mean task reward over the last
``trainer.summary_window`` steps so far; the first seed's) to the study, at step = training step, and
stops when ``hyperopt.pruner`` says so; such a trial is recorded as ``pruned`` with its
last reported value, and the study goes on. The study lives in
``hyperopt.save_dir`` (or the database ``hyperopt.storage`` names) and is resumed when
it already holds it: rerunning the same command after an interruption continues where
it stopped, raising ``hyperopt.n_trials`` extends a finished study, and several
commands started on one study share its trials and its ``n_trials`` budget.

>>> import tempfile
>>> from rl2fx.tuning.space import HyperparameterConfig
>>> cfg = load_config("demo", overrides={"trainer.total_steps": 1, "experiment_tracking.enabled": False,
...     "memory_optimization.profiling.enabled": False, "hyperopt.n_trials": 2,
...     "hyperopt.save_dir": tempfile.mkdtemp()})
>>> space = [HyperparameterConfig("actor.lr", "float", low=1e-4, high=1e-2, log=True)]
>>> best = tune_from_config(cfg, param_configs=space, show_progress_bar=False, verbose=False)
>>> sorted(best), 1e-4 <= best["actor.lr"] <= 1e-2
(['actor.lr'], True)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rl2fx.trainer.config import ConfigError, load_config, pruner_args, validate_config
from rl2fx.trainer.ppo import PPOTrainer
from rl2fx.tuning.pruners import TrialPruned, make_pruner
from rl2fx.tuning.space import HyperparameterConfig, create_ppo_hyperparameter_configs
from rl2fx.tuning.tuner import HyperparameterTuner

__all__ = ["ppo_search_space", "select_params", "apply_params", "tune_from_config", "format_best_trials"]

_INIT = "actor.kl.adaptive_kl.initial_coef"


#: Centred log-scale ranges reach at most this many decades either side of the config's value.
_CENTRE_DECADES = 1.0


def _centred(c: HyperparameterConfig, value: Any) -> HyperparameterConfig:
    """``c`` moved to contain, and default to, the config's ``value``.

    A log-scale range is re-centred geometrically on a positive ``value`` with the generic
    range's width, at most :data:`_CENTRE_DECADES` decades either side; a linear or int range
    is widened to include ``value``; a categorical gains ``value`` as a choice. A non-positive
    value of a log-scale parameter (e.g. ``entropy_coef: 0``, off) keeps the generic range.
    """
    if value is None:  # null: derived elsewhere (e.g. from the task); the generic range stands
        return c
    if c.type == "categorical":
        choices = list(c.choices or [])
        return dataclasses.replace(c, choices=choices if value in choices else [*choices, value], default=value)
    if c.type not in ("float", "int") or isinstance(value, bool) or not isinstance(value, int | float):
        return c
    if c.log:
        if value <= 0:
            return c
        half = min(math.log10(c.high / c.low) / 2, _CENTRE_DECADES)
        lo, hi = value / 10**half, value * 10**half
        if c.type == "int":
            lo, hi = max(1, math.floor(lo)), max(math.ceil(hi), math.floor(lo) + 1)
        return dataclasses.replace(c, low=lo, high=hi, default=value)
    return dataclasses.replace(c, low=min(c.low, value), high=max(c.high, value), default=value)


def ppo_search_space(cfg: DictConfig) -> list[HyperparameterConfig]:
    """:func:`~rl2fx.tuning.space.create_ppo_hyperparameter_configs` centred on ``cfg``.

    The generic ranges are those of fine-tuning a pretrained LM (``actor.lr`` around 1e-6);
    a config that works elsewhere (the demo trains from scratch at ``actor.lr=1e-3``) would
    see every trial at chance. So each range is moved to contain the config's own value,
    which becomes the default: log-scale ranges are re-centred on it (the generic width, at
    most one decade either side), linear ranges widened to include it, categoricals given it
    as a choice. Every name must be a key of the config schema (``ConfigError`` otherwise).
    The KL controller's ``initial_coef`` must lie within the config's ``[min_coef, max_coef]``
    (the config validation rejects it otherwise), so its range is intersected with those
    bounds; an empty intersection is an error.

    >>> space = {c.name: c for c in ppo_search_space(load_config("demo"))}
    >>> lr = space["actor.lr"]; lr.low, lr.default, lr.high
    (0.0001, 0.001, 0.01)
    >>> c = space["actor.kl.adaptive_kl.initial_coef"]; c.low, c.default, c.high
    (0.001, 0.01, 0.1)
    >>> space = {c.name: c for c in ppo_search_space(load_config(overrides={"actor.kl.adaptive_kl.max_coef": 0.02,
    ...                                                                    "actor.kl.adaptive_kl.initial_coef": 0.01}))}
    >>> space["actor.kl.adaptive_kl.initial_coef"].low, space["actor.kl.adaptive_kl.initial_coef"].high
    (0.001, 0.02)
    """
    out = []
    for c in create_ppo_hyperparameter_configs():
        value = OmegaConf.select(cfg, c.name, default="__missing__")
        if value == "__missing__":
            raise ConfigError(f"search-space parameter {c.name!r} is not a config key")
        c = _centred(c, value)
        if c.name == _INIT:
            ak = cfg.actor.kl.adaptive_kl
            low, high = max(c.low, float(ak.min_coef)), min(c.high, float(ak.max_coef))
            if not low < high:
                raise ConfigError(f"config keys 'actor.kl.adaptive_kl.min_coef'/'max_coef' ([{ak.min_coef}, "
                                  f"{ak.max_coef}]) leave no room for tuning {_INIT} in [{c.low}, {c.high}]")
            default = min(max(c.default, low), high)
            c = dataclasses.replace(c, low=low, high=high, default=default)
        out.append(c)
    return out


def select_params(space: Sequence[HyperparameterConfig], names: Sequence[str] | None) -> list[HyperparameterConfig]:
    """The parameters of ``space`` named in ``names`` (``hyperopt.params``), in ``space``'s order; ``None``: all.

    >>> [c.name for c in select_params(ppo_search_space(load_config("demo")), ["actor.clip", "actor.lr"])]
    ['actor.lr', 'actor.clip']
    """
    if names is None:
        return list(space)
    known = [c.name for c in space]
    unknown = [n for n in names if n not in known]
    if unknown or not names or len(set(names)) != len(names):
        raise ConfigError(f"config key 'hyperopt.params' must be distinct names of the search space {known}, "
                          f"got {list(names)!r}")
    return [c for c in space if c.name in names]


def apply_params(cfg: DictConfig, params: dict[str, Any]) -> DictConfig:
    """A validated copy of ``cfg`` with each dotted ``params`` key set to its value.

    >>> apply_params(load_config(), {"actor.clip": 0.1}).actor.clip
    0.1
    """
    out = copy.deepcopy(cfg)
    for k, v in params.items():
        if OmegaConf.select(out, k, default="__missing__") == "__missing__":
            load_config(overrides={k: v})  # raises the schema's did-you-mean error
        OmegaConf.update(out, k, v, merge=False)
    return validate_config(out)


def _reporter(trial: Any, interval: int, window: int):
    """``PPOTrainer.train``'s ``on_step``: every ``interval`` steps report the mean reward of the
    last ``window`` steps at the training step, and raise ``TrialPruned`` if the pruner says so
    (not at the last step: the run is done, and is recorded as complete)."""
    def on_step(trainer: PPOTrainer, metrics: dict[str, Any]) -> None:
        if trainer.step % interval:
            return
        r = trainer.history["reward"][-window:]
        trial.report(float(sum(r) / len(r)), int(trainer.step))
        if trainer.step < int(trainer.cfg.trainer.total_steps) and trial.should_prune():  # a finished run stays
            raise TrialPruned(f"pruned at step {trainer.step}")

    return on_step


def _objective(cfg: DictConfig, *, report: bool = True):
    """The objective of one trial: a PPO run of ``cfg`` with the trial's parameters. With
    ``report=False`` (trials run in other processes, e.g. on Dask workers, whose trials are not
    bound to the study) it takes the parameters only and reports nothing."""
    interval, window = int(cfg.hyperopt.report_interval), int(cfg.trainer.summary_window)

    n_seeds = int(cfg.hyperopt.seeds_per_trial)

    def run_seed(params: dict[str, Any], trial: Any, i: int) -> dict[str, Any]:
        # seed i of a trial: both seeds moved by i from the trial's own (a search space may tune them)
        seeds = {k: int(params.get(k, OmegaConf.select(cfg, k))) + i for k in ("trainer.seed", "model.seed")}
        with tempfile.TemporaryDirectory(prefix="rl2fx-tune-") as tmp:
            # checkpoints go to a folder deleted after the trial, but every trial's tracking goes to
            # the study's one store: the paths the base config derives from its trainer.output_dir
            et = cfg.experiment_tracking
            run_cfg = apply_params(cfg, {**params, "trainer.output_dir": tmp, "trainer.progress_bar": False,
                                         "trainer.resume_from": None, **seeds,
                                         "experiment_tracking.tracking_uri": str(et.tracking_uri),
                                         "experiment_tracking.wandb_dir": et.wandb_dir,
                                         "memory_optimization.profiling.save_path": str(Path(tmp) / "mem.json")})
            # the pruner compares trials at one training step: only the first seed reports
            on_step = _reporter(trial, interval, window) if trial is not None and i == 0 else None
            return PPOTrainer(run_cfg).train(on_step=on_step)

    def run_one(params: dict[str, Any], trial: Any) -> dict[str, Any]:
        results = [run_seed(params, trial, i) for i in range(n_seeds)]
        out = {k: sum(float(r[src]) for r in results) / n_seeds
               for k, src in (("reward", "reward_end"), ("reward_start", "reward_start"), ("kl", "kl"))}
        out["wall_time_s"] = sum(float(r["wall_time_s"]) for r in results)
        if n_seeds > 1:
            rewards = [float(r["reward_end"]) for r in results]
            out["reward_std"] = statistics.stdev(rewards)
            out.update({f"reward_seed{i}": x for i, x in enumerate(rewards)})
        return out

    def fn(params: dict[str, Any], trial: Any) -> dict[str, Any]:
        return run_one(params, trial)

    def fn_remote(params: dict[str, Any]) -> dict[str, Any]:
        return run_one(params, None)

    return fn if report else fn_remote


def format_best_trials(tuner: Any, top: int = 5) -> str:
    """The ``top`` best complete trials as a text table, one column per trial, one row per parameter."""
    done = sorted(tuner.study.complete_trials, key=lambda t: t.value, reverse=tuner.maximize)[:top]
    failed = sum(t.state == "failed" for t in tuner.study.trials)
    pruned = sum(t.state == "pruned" for t in tuner.study.trials)
    if not done:
        return f"no complete trial ({failed} failed, {pruned} pruned)"
    rows = [("trial", [str(t.number) for t in done]), (tuner.objective_name, [f"{t.value:.4g}" for t in done])]
    for extra in ("kl", "wall_time_s"):
        if all(extra in t.metrics for t in done):
            rows.append((extra, [f"{t.metrics[extra]:.4g}" for t in done]))
    for c in tuner.param_configs:
        rows.append((c.name, [f"{t.params[c.name]:.4g}" if isinstance(t.params[c.name], float)
                              else str(t.params[c.name]) for t in done]))
    w0 = max(len(r[0]) for r in rows)
    ws = [max(len(r[1][j]) for r in rows) for j in range(len(done))]
    lines = [f"best {len(done)} of {len(tuner.study.trials)} trials ({failed} failed, {pruned} pruned), "
             f"{'max' if tuner.maximize else 'min'}imising {tuner.objective_name}:"]
    for name, vals in rows:
        lines.append("  " + name.ljust(w0) + "  " + "  ".join(v.rjust(w) for v, w in zip(vals, ws, strict=True)))
    return "\n".join(lines)


def tune_from_config(
    cfg: DictConfig,
    *,
    param_configs: Sequence[HyperparameterConfig] | None = None,
    show_progress_bar: bool = True,
    verbose: bool = True,
    executor: Any = None,
    n_jobs: int = 1,
) -> dict[str, Any]:
    """Run ``cfg.hyperopt`` (``optimizer_type``, ``n_trials``, ``save_dir``, ``storage``, ``bayesian``,
    ``grid``, ``pruner``, ``report_interval``) over PPO runs of ``cfg``; returns the best parameters.

    ``param_configs`` defaults to :func:`ppo_search_space` (``cfg``). The sampler's seed
    is ``trainer.seed``. ``verbose`` prints the table of the best trials at the end;
    ``show_progress_bar`` shows a tqdm bar over trials. A trial whose run raises is
    recorded as failed and the study goes on (the error is kept in ``trials.csv``); one
    stopped by the pruner (:func:`~rl2fx.trainer.config.pruner_args`) is recorded as pruned.

    ``executor`` (a Dask ``distributed.Client`` or a ``concurrent.futures.Executor``) runs
    ``n_jobs`` trials at once on its workers; their runs report nothing to the study (the
    trial objects stay in this process), so ``hyperopt.pruner`` must then be ``none``.
    """
    h = cfg.hyperopt
    if executor is not None and str(h.pruner) != "none":
        raise ConfigError(f"config key 'hyperopt.pruner' must be 'none' when trials run on another executor "
                          f"(--dask-scheduler): their runs cannot report to the study for pruning, got {h.pruner!r}")
    space = list(param_configs) if param_configs is not None else select_params(ppo_search_space(cfg), h.params)
    for c in space:
        if OmegaConf.select(cfg, c.name, default="__missing__") == "__missing__":
            raise ConfigError(f"search-space parameter {c.name!r} is not a config key")
    tuner = HyperparameterTuner(
        str(h.optimizer_type), space, objective_name="reward", maximize=True, n_trials=int(h.n_trials),
        save_dir=str(h.save_dir), storage=None if h.storage is None else str(h.storage),
        seed=int(cfg.trainer.seed), grid_size=int(h.grid.grid_size),
        exploration_weight=float(h.bayesian.exploration_weight), show_progress_bar=show_progress_bar,
        pruner=make_pruner(**pruner_args(cfg)), executor=executor, n_jobs=n_jobs)
    best = tuner.optimize(_objective(cfg, report=executor is None))
    if verbose:
        print(format_best_trials(tuner))
        where = f"{tuner.study.storage.location}; summary in {Path(h.save_dir).resolve()}" if h.storage is not None \
            else str(Path(h.save_dir).resolve())
        print(f"study: {where} (best_params.json, trials.csv)")
    return best
