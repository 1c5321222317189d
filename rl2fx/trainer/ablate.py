"""Reproducible ablations of the demo task: ``rl2fx ablate estimators | kl | pareto | multi_turn``.

An ablation is a list of *arms* (named sets of config overrides) run on the
shipped demo configuration (GRPO on digit reversal with a tiny random Llama)
for several seeds each. Every arm × seed is one :class:`~rl2fx.trainer.ppo.PPOTrainer`
run in its own process (``ProcessPoolExecutor``, one torch thread per run),
with tracking, memory profiling and the per-run progress bar off. Seed ``s``
sets ``trainer.seed=s`` and ``model.seed=s`` (prompts, samples and the initial
weights), so a run is a pure function of its config and seed.

``multi_turn`` runs on the shipped multi-turn task instead
(:mod:`rl2fx.envs_examples.higher_lower`: its prompt file, ``env_step`` file and
:data:`~rl2fx.envs_examples.higher_lower.TRAINING` settings); seed ``s``'s initial
model is ``higher_lower.build_model(tokenizer, seed=s)``, saved with its tokenizer to a
temporary folder that ``actor.model_name`` names.

Written to ``out_dir`` (default ``outputs/ablations``; the shipped pages in
``docs/ablations`` are regenerated only by asking for them, ``--out docs/ablations``):

* ``<name>.md``: the reproducing command, machine, date, and a table of mean ±
  sample standard deviation over seeds of the final reward (mean task reward over
  the last ``trainer.summary_window`` steps), the final KL to the reference
  (same window), and the wall time per run, plus the task's chance level;
* ``<name>.json``: every run's numbers and reward/KL curves, and all overrides;
* ``<name>.png``: reward curves per arm, mean over seeds with a ±1 std band.

>>> [a for a, _ in ablation_arms("kl", total_steps=100)][:3]
['no_kl', 'fixed', 'exponential']
>>> dict(ablation_arms("estimators", total_steps=100))["clipped_is"]
{'adv.estimator': 'clipped_is'}
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from rl2fx.losses import list_policy_losses
from rl2fx.returns import get_estimator, list_estimators
from rl2fx.tracking.system import cpu_model
from rl2fx.trainer.ablate_names import ABLATIONS, DEFAULT_OUT
from rl2fx.trainer.config import load_config, parse_override, trainer_supports
from rl2fx.trainer.ppo import PPOTrainer

matplotlib.use("Agg")  # files only; must precede pyplot's import
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["ABLATIONS", "DEFAULT_STEPS", "ablation_arms", "format_table", "run_ablation", "run_one"]

#: Default ``trainer.total_steps`` per ablation, chosen so that each default run
#: (3 seeds, 2 worker processes) takes about 10 minutes on 2 idle CPU cores.
DEFAULT_STEPS: dict[str, int] = {"estimators": 150, "kl": 400, "kl_frontier": 400, "losses": 300, "pareto": 400,
                                 "multi_turn": 200}

DEFAULT_CONFIG = "demo"

# Every run: no tracking, no memory profile, no inner progress bar, one thread.
_RUN_OVERRIDES = {
    "experiment_tracking.enabled": False,
    "memory_optimization.profiling.enabled": False,
    "trainer.progress_bar": False,
    "trainer.num_threads": 1,
    "trainer.save_interval": 0,
    "trainer.resume_from": None,
}

_AK = "actor.kl.adaptive_kl"
_MO = "multi_objective"
# The demo's KL budget (its adaptive controller's target).
_DEMO_TARGET_KL = 0.5
# The KL-target sweep: each feedback controller and the Lagrangian constraint at each budget. The
# coefficient's ceiling is raised so that the tightest budget is reachable (at max_coef 1 the
# controllers saturate above a KL of 0.1).
_FRONTIER_TARGETS = (0.1, 0.3, 1.0, 3.0)
_FRONTIER_CONTROLLERS = ("exponential", "linear", "proportional", "pid")
_FRONTIER_MAX_COEF = 10.0
# Weights for the Pareto arms: reward first, KL penalised (kl_penalty = -KL is
# maximised, so its weight is positive), a small entropy bonus.
_PARETO_WEIGHTS = {"reward": 1.0, "kl_penalty": 0.1, "entropy": 0.01}
# The turn-level arm's discount per decision token: one token per turn in the multi-turn task, so a
# turn's tokens get the rewards of that turn and the later ones, discounted by 0.5 per turn.
_TURN_GAMMA = 0.5
# The multi-turn task's best success rate without reading the feedback: three distinct guesses of 1..4.
_NO_FEEDBACK_WINS = 0.75


# The estimator ablation's task, where the estimators' mechanisms differ: token-level partial credit
# (a critic's TD errors or returns-to-go can tell which digit earned it, a baseline of the outcome
# cannot), three digits, four update epochs per rollout with the advantages re-estimated before each
# (V-trace, Retrace and clipped IS then see ratios other than 1), and no KL control (the demo's KL
# budget would hold every estimator at the reward that budget allows).
_ESTIMATOR_TASK: dict[str, Any] = {"task.n_digits": 3, "task.reward_level": "token", "trainer.update_epochs": 4,
                                   "trainer.recompute_advantages": True, f"{_AK}.enabled": False}


def _task_overrides(name: str, seed: int, models: Path | None) -> dict[str, Any]:
    """The task of ablation ``name`` for seed ``seed``: for ``estimators`` the demo's digits task made to
    separate them (:data:`_ESTIMATOR_TASK`); nothing for the other ablations on the demo; for
    ``multi_turn`` the shipped multi-turn task, with seed ``seed``'s initial model saved under ``models``."""
    if name == "estimators":
        return dict(_ESTIMATOR_TASK)
    if name != "multi_turn":
        return {}
    from rl2fx.envs_examples import higher_lower as hl

    hp = hl.TRAINING
    over: dict[str, Any] = {
        "data.train_data_path": str(hl.DATA), "rollout.env_path": hl.__file__,
        "rollout.max_turns": hp["max_turns"], "rollout.max_new_tokens": hp["max_new_tokens"],
        "rollout.temperature": hp["temperature"], "data.prompts_per_rollout": hp["prompts_per_step"],
        "data.responses_per_prompt": hp["responses_per_prompt"], "actor.lr": hp["lr"], "actor.clip": hp["clip"],
        "actor.kl.coef": hp["kl_coef"], f"{_AK}.enabled": False, "trainer.update_epochs": hp["update_epochs"],
        "trainer.max_grad_norm": hp["max_grad_norm"], "memory_optimization.enabled": False,
        "actor.local_files_only": True,
    }
    if models is not None:
        folder = models / f"seed{seed}"
        if not folder.exists():
            tok = hl.build_tokenizer()
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # its save bar would interleave with the ablation's own
            try:
                hl.build_model(tok, seed=seed).save_pretrained(folder)
                tok.save_pretrained(folder)
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
        over["actor.model_name"] = str(folder)
    return over


def ablation_arms(name: str, *, total_steps: int) -> list[tuple[str, dict[str, Any]]]:
    """The arms of ablation ``name``: ``(arm name, dotted overrides)`` in table order.

    ``total_steps`` is needed by the scheduled KL arm, whose schedule spans the run.
    ``estimators``: every registered estimator (:func:`~rl2fx.returns.list_estimators`),
    users' included, except those needing batch inputs the trainer does not supply
    (:func:`~rl2fx.trainer.config.trainer_supports`); the trainer builds a critic for
    those that read values.
    """
    if name not in ABLATIONS:
        raise ValueError(f"ablation name must be one of {list(ABLATIONS)}, got {name!r}")
    if name == "estimators":
        return [(e, {"adv.estimator": e}) for e in list_estimators() if trainer_supports(e)]
    if name == "kl":
        ctl = {f"{_AK}.enabled": True}
        return [
            ("no_kl", {f"{_AK}.enabled": False, "actor.kl.coef": 0.0}),
            ("fixed", {**ctl, f"{_AK}.controller_type": "fixed"}),
            ("exponential", {**ctl, f"{_AK}.controller_type": "exponential"}),
            ("linear", {**ctl, f"{_AK}.controller_type": "linear"}),
            ("proportional", {**ctl, f"{_AK}.controller_type": "proportional"}),
            ("pid", {**ctl, f"{_AK}.controller_type": "pid"}),
            ("schedule", {**ctl, f"{_AK}.controller_type": "schedule", f"{_AK}.schedule_type": "cosine",
                          f"{_AK}.schedule_steps": int(total_steps)}),
            ("lagrangian", {f"{_AK}.enabled": False, "actor.kl.coef": 0.0,
                            "actor.kl.constraint_optimization.enabled": True,
                            "actor.kl.constraint_optimization.kl_constraint": _DEMO_TARGET_KL}),
        ]
    if name == "losses":
        return [(n, {"actor.loss_type": n}) for n in list_policy_losses()]
    if name == "multi_turn":
        return [
            ("gae_critic", {"adv.estimator": "gae"}),
            ("grpo", {"adv.estimator": "grpo"}),
            ("rloo", {"adv.estimator": "rloo"}),
            ("turn_returns", {"adv.estimator": "reinforce_pp", "adv.gamma": _TURN_GAMMA}),
        ]
    if name == "kl_frontier":
        arms = []
        for t in _FRONTIER_TARGETS:
            for c in _FRONTIER_CONTROLLERS:
                arms.append((f"{c}@{t:g}", {f"{_AK}.enabled": True, f"{_AK}.controller_type": c,
                                            f"{_AK}.target_kl": t, f"{_AK}.max_coef": _FRONTIER_MAX_COEF}))
            arms.append((f"lagrangian@{t:g}", {f"{_AK}.enabled": False, "actor.kl.coef": 0.0,
                                               "actor.kl.constraint_optimization.enabled": True,
                                               "actor.kl.constraint_optimization.kl_constraint": t}))
        return arms
    mo = {f"{_MO}.enabled": True, f"{_MO}.objective_weights": dict(_PARETO_WEIGHTS)}
    return [
        ("ppo_loss", {f"{_MO}.enabled": False}),
        ("weighted_sum", {**mo, f"{_MO}.pareto_method": "weighted_sum"}),
        ("weighted_sum_kl1", {**mo, f"{_MO}.pareto_method": "weighted_sum",
                              f"{_MO}.objective_weights": {**_PARETO_WEIGHTS, "kl_penalty": 1.0}}),
        ("tchebycheff", {**mo, f"{_MO}.pareto_method": "tchebycheff"}),
        ("pareto_dominance", {**mo, f"{_MO}.pareto_method": "pareto_dominance"}),
        ("hypervolume", {**mo, f"{_MO}.pareto_method": "hypervolume"}),
    ]


_ARM_NOTES = {
    "estimators": ("`adv.estimator`: every registered estimator (those that read values train a critic), on "
                   "the demo's digits task with " + ", ".join(f"`{k}={str(v).lower()}`" for k, v in _ESTIMATOR_TASK.items())
                   + ": three-digit reversal with token-level partial credit (each right digit's 1/3 on its "
                   "own token), four update epochs per rollout with the advantages re-estimated before each "
                   "later one from the current policy's ratios and critic, no KL control."),
    "kl": (f"the KL controller (`{_AK}.controller_type`; each controller starts from the demo's "
           f"`initial_coef`, bounds and `target_kl={_DEMO_TARGET_KL}`), no KL at all, and the Lagrangian "
           f"constraint `KL <= {_DEMO_TARGET_KL}` instead of a controller."),
    "losses": "`actor.loss_type`: every registered policy loss (`rl2fx.losses.list_policy_losses()`) "
              "with its default hyperparameters.",
    "kl_frontier": (f"the KL budget: `{_AK}.target_kl` in {list(_FRONTIER_TARGETS)} for each feedback "
                    f"controller (`{_AK}.max_coef={_FRONTIER_MAX_COEF:g}`) and the Lagrangian constraint's "
                    "`kl_constraint` at the same values; arm `controller@target`."),
    "multi_turn": ("the advantage estimator on the multi-turn task `rl2fx.envs_examples.higher_lower` (guess 1..4 "
                   "with higher/lower feedback, 3 turns, one token per turn, its `TRAINING` settings, seed s's "
                   "model `higher_lower.build_model(seed=s)`): `gae_critic`, GAE with a critic over the decision "
                   "tokens and the per-turn rewards (`adv.gamma` 0.99, `adv.lamda` 0.95); `grpo` and `rloo`, "
                   "outcome-only group baselines over whole trajectories; `turn_returns`, turn-level credit, "
                   f"REINFORCE++ token returns of the per-turn rewards discounted by {_TURN_GAMMA} per turn."),
    "pareto": ("`multi_objective.pareto_method` with objectives reward, kl_penalty = -KL, entropy and weights "
               f"{_PARETO_WEIGHTS} (`weighted_sum_kl1`: kl_penalty weight 1.0); `ppo_loss` is the plain "
               "PPO loss (multi-objective off)."),
}


def _run_overrides(arm_overrides: dict[str, Any], user: dict[str, Any], seed: int, total_steps: int,
                   output_dir: str) -> dict[str, Any]:
    """Overrides of one run: defaults < arm < user < the run's seed and output folder."""
    return {"trainer.total_steps": int(total_steps), **_RUN_OVERRIDES, **arm_overrides, **user,
            "trainer.seed": int(seed), "model.seed": int(seed), "trainer.output_dir": output_dir}


def run_one(config: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """One training run with ``overrides`` on ``config``; its final numbers and curves.

    Checkpoints go to a temporary folder (``trainer.output_dir`` is replaced) that is deleted.
    """
    with tempfile.TemporaryDirectory(prefix="rl2fx-ablate-") as tmp:
        cfg = load_config(config, overrides={**overrides, "trainer.output_dir": tmp})
        # transformers' save_pretrained bar would interleave with the ablation's own
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            t0 = time.perf_counter()
            trainer = PPOTrainer(cfg)
            result = trainer.train()
            wall = time.perf_counter() - t0
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    return {
        "reward_end": float(result["reward_end"]),
        "reward_start": float(result["reward_start"]),
        "kl": float(result["kl"]),
        "chance_reward": float(result["chance_reward"]),
        "steps": int(result["steps"]),
        "wall_time_s": float(wall),
        "torch_threads": torch.get_num_threads(),
        "reward_curve": [float(x) for x in trainer.history["reward"]],
        "kl_curve": [float(x) for x in trainer.history["kl"]],
        "kl_coef_curve": [float(x) for x in trainer.history.get("kl_coef", [])],
        # the multi-objective arms' final archive: the non-dominated (reward, -KL, entropy) points seen
        "pareto_front": (trainer.multi_objective.get_pareto_front()
                         if trainer.multi_objective is not None else []),
    }


def _job(args: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return run_one(*args)


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return m, s


def _welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's two-sample t-test of mean(a) - mean(b) (``scipy.stats.ttest_ind(equal_var=False)``):
    ``(difference, half-width of its 95% CI, two-sided p)``.

    With fewer than 2 values on a side, or no spread at all, the CI and p are NaN (nothing to test).
    """
    from scipy import stats

    d = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2 or (np.var(a) == 0.0 and np.var(b) == 0.0):
        return d, math.nan, math.nan
    res = stats.ttest_ind(a, b, equal_var=False)
    lo, hi = res.confidence_interval(0.95)
    return d, float(hi - lo) / 2, float(res.pvalue)


def _holm(ps: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (Holm 1979), in the input order; NaN stays NaN."""
    idx = sorted((i for i, p in enumerate(ps) if not math.isnan(p)), key=lambda i: ps[i])
    out = [math.nan] * len(ps)
    running = 0.0
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - rank) * ps[i]))
        out[i] = running
    return out


def _compare(out: dict[str, Any], reference: str) -> list[dict[str, Any]]:
    """Each other arm's final reward against ``reference``'s: Welch difference, 95% CI, p, Holm-adjusted p."""
    by_arm = {s["arm"]: [r["reward_end"] for r in out["runs"] if r["arm"] == s["arm"]] for s in out["summary"]}
    rows = [{"arm": arm, **dict(zip(("diff", "ci95", "p"), _welch(xs, by_arm[reference]), strict=True))}
            for arm, xs in by_arm.items() if arm != reference]
    for row, adj in zip(rows, _holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = adj
    return rows


# Estimators that optimise another objective than the mean reward, left out of the family comparison.
_OTHER_OBJECTIVE = ("grpo_passk",)
# Each off-policy correction and the estimator it computes when every ratio is 1: with the advantages
# re-estimated at every epoch from the same critic, the pair's difference is the correction's effect.
# (V-trace's on-policy form is none of the arms: its advantage bootstraps on the next step's target.)
_CORRECTION_PAIRS = (("retrace", "td_lambda"), ("clipped_is", "gae"))


def _estimator_tests(out: dict[str, Any]) -> dict[str, Any]:
    """The estimator ablation's two planned tests.

    ``family``: the value-based arms (with a critic) against the critic-free ones (those of
    :data:`_OTHER_OBJECTIVE` aside), paired by seed: per seed, the mean final reward over the
    value-based arms minus the mean over the critic-free ones; a one-sample t-test of those
    differences (difference, 95% CI half-width, p). ``corrections``: each pair of
    :data:`_CORRECTION_PAIRS` present, Welch's test of its difference.
    """
    from scipy import stats

    runs: dict[str, dict[int, float]] = {}
    for r in out["runs"]:
        runs.setdefault(r["arm"], {})[r["seed"]] = r["reward_end"]
    value = [a for a in runs if get_estimator(a).needs_values]
    free = [a for a in runs if not get_estimator(a).needs_values and a not in _OTHER_OBJECTIVE]
    res: dict[str, Any] = {"corrections": [
        {"arm": a, "base": b, **dict(zip(("diff", "ci95", "p"), _welch(list(runs[a].values()),
                                                                       list(runs[b].values())), strict=True))}
        for a, b in _CORRECTION_PAIRS if a in runs and b in runs]}
    if value and free and len(out["seeds"]) > 1:
        d = [float(np.mean([runs[a][s] for a in value]) - np.mean([runs[a][s] for a in free])) for s in out["seeds"]]
        t = stats.ttest_1samp(d, 0.0)
        lo, _ = t.confidence_interval(0.95)
        res["family"] = {"value_arms": value, "free_arms": free, "per_seed": d, "diff": float(np.mean(d)),
                         "ci95": float(np.mean(d) - lo), "p": float(t.pvalue)}
    return res


def _machine() -> str:
    cpu = cpu_model()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}; load average at start {load}")


def _command(name: str, seeds: int, out_dir: str, user_overrides: Sequence[str], config: str | None,
             arm_names: Sequence[str] | None, workers: int) -> str:
    """The ``rl2fx ablate`` command line that reproduces a call of :func:`run_ablation`."""
    parts = ["rl2fx", "ablate", name]
    if seeds != 3:
        parts += ["--seeds", str(seeds)]
    if arm_names is not None:
        parts += ["--arms", ",".join(arm_names)]
    if workers != 2:
        parts += ["--workers", str(workers)]
    if str(out_dir) != DEFAULT_OUT:
        parts += ["--out", str(out_dir)]
    if config is not None and config != DEFAULT_CONFIG:
        parts += ["--config", str(config)]
    parts += list(user_overrides)
    return " ".join(shlex.quote(p) for p in parts)


def _fmt(m: float, s: float, digits: int) -> str:
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def run_ablation(
    name: str,
    seeds: int = 3,
    out_dir: str | os.PathLike[str] = DEFAULT_OUT,
    overrides: Sequence[str] = (),
    config: str | os.PathLike[str] | None = None,
    *,
    arms: Sequence[str] | None = None,
    workers: int = 2,
    show_progress_bar: bool = True,
) -> dict[str, Any]:
    """Run ablation ``name`` (one of :data:`ABLATIONS`) and write its table, JSON and plot.

    ``out_dir``: the folder for ``<name>.md``, ``.json`` and ``.png`` (default
    ``outputs/ablations``; pass ``"docs/ablations"`` to regenerate a shipped page).
    ``seeds``: seeds ``0 .. seeds-1`` per arm. ``overrides``: dotted ``key=value``
    strings applied on top of every arm (``trainer.total_steps=5`` for a quick look).
    ``config``: base YAML (default: the shipped ``demo``). ``arms``: a subset of the
    arm names (default all). ``workers``: processes running at once (1: run inline).
    Every run's config is built and validated before anything runs, so a bad override
    fails at once. Returns the contents of ``<name>.json``.
    """
    if name not in ABLATIONS:
        raise ValueError(f"ablation name must be one of {list(ABLATIONS)}, got {name!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    base = str(config) if config is not None else DEFAULT_CONFIG
    user = dict(parse_override(o) for o in overrides)
    for key in ("trainer.seed", "model.seed", "trainer.output_dir"):
        if key in user:
            raise ValueError(f"override {key!r} is set by rl2fx ablate for every run (seeds: --seeds; "
                             f"checkpoints: a temporary folder); remove it")
    steps = int(user.get("trainer.total_steps", DEFAULT_STEPS[name]))
    base_cfg = load_config(base, overrides=user)  # imports the config's `imports`: their estimators become arms
    all_arms = ablation_arms(name, total_steps=steps)
    if arms is not None:
        unknown = [a for a in arms if a not in dict(all_arms)]
        if unknown or not arms:
            raise ValueError(f"arms must be a non-empty subset of {[a for a, _ in all_arms]}, got {list(arms)!r}")
        all_arms = [(a, o) for a, o in all_arms if a in arms]

    jobs: list[tuple[str, int, dict[str, Any]]] = []
    models_tmp = tempfile.TemporaryDirectory(prefix="rl2fx-ablate-models-") if name == "multi_turn" else None
    models = Path(models_tmp.name) if models_tmp is not None else None
    for arm, arm_over in all_arms:
        for s in range(seeds):
            run_over = _run_overrides({**_task_overrides(name, s, models), **arm_over}, user, s, steps, "unused")
            run_over.pop("trainer.output_dir")
            load_config(base, overrides=run_over)  # fail fast on a bad key or value
            jobs.append((arm, s, run_over))
    first_cfg = load_config(base, overrides=jobs[0][2])
    window = int(first_cfg.trainer.summary_window)
    target_kl = float(first_cfg.actor.kl.adaptive_kl.target_kl) if name == "kl" else None
    # the arm every other is tested against: the base config's own choice
    base_choice = {"estimators": str(base_cfg.adv.estimator), "losses": str(base_cfg.actor.loss_type)}.get(name)
    reference = base_choice if base_choice in dict(all_arms) else None

    started = _dt.datetime.now().astimezone()
    machine = _machine()
    t0 = time.perf_counter()
    results: dict[tuple[str, int], dict[str, Any]] = {}
    bar = tqdm(total=len(jobs), desc=f"ablate {name}", disable=not show_progress_bar, dynamic_ncols=True)
    try:
        def done(arm: str, s: int, res: dict[str, Any]) -> None:
            results[(arm, s)] = res
            bar.set_postfix_str(f"{arm} seed {s}: reward {res['reward_end']:.3f}")
            bar.update(1)

        if workers == 1:
            for arm, s, over in jobs:
                try:
                    res = run_one(base, over)
                except Exception as e:
                    raise RuntimeError(f"ablation {name!r}: run of arm {arm!r}, seed {s} failed: {e}") from e
                done(arm, s, res)
        else:
            # spawn: fresh interpreters, no forked torch thread pools
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                futs = {pool.submit(_job, (base, over)): (arm, s) for arm, s, over in jobs}
                for fut in cf.as_completed(futs):
                    arm, s = futs[fut]
                    try:
                        res = fut.result()
                    except Exception as e:
                        pool.shutdown(wait=True, cancel_futures=True)  # the runs not started yet
                        raise RuntimeError(f"ablation {name!r}: run of arm {arm!r}, seed {s} failed: {e}") from e
                    done(arm, s, res)
    finally:
        bar.close()
        if models_tmp is not None:
            models_tmp.cleanup()
    total_wall = time.perf_counter() - t0

    runs = [{"arm": arm, "seed": s, "overrides": over, **results[(arm, s)]} for arm, s, over in jobs]
    summary = []
    for arm, arm_over in all_arms:
        rs = [r for r in runs if r["arm"] == arm]
        rm, rsd = _mean_std([r["reward_end"] for r in rs])
        km, ksd = _mean_std([r["kl"] for r in rs])
        wm, wsd = _mean_std([r["wall_time_s"] for r in rs])
        summary.append({"arm": arm, "overrides": arm_over, "n_seeds": len(rs), "reward_mean": rm, "reward_std": rsd,
                        "kl_mean": km, "kl_std": ksd, "wall_time_mean_s": wm, "wall_time_std_s": wsd})
    out = {
        "ablation": name,
        "command": _command(name, seeds, str(out_dir), list(overrides), None if config is None else str(config),
                            arms, workers),
        "machine": machine,
        "workers": workers,
        "date": started.isoformat(timespec="seconds"),
        "base_config": base,
        "seeds": list(range(seeds)),
        "total_steps": steps,
        "summary_window": window,
        "user_overrides": list(overrides),
        "chance_reward": runs[0]["chance_reward"],
        "target_kl": target_kl,
        "total_wall_time_s": total_wall,
        "summary": summary,
        "runs": runs,
        "reference_arm": reference,
    }
    if reference is not None and seeds > 1:
        out["comparisons"] = _compare(out, reference)
    if name == "estimators" and all(s["arm"] in list_estimators() for s in summary):
        out["estimator_tests"] = _estimator_tests(out)
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    _plot(out, out_path / f"{name}.png")
    (out_path / f"{name}.md").write_text(format_table(out))
    return out


def format_table(out: dict[str, Any]) -> str:
    """The Markdown page of an ablation result (the contents of ``<name>.json``)."""
    name, w = out["ablation"], out["summary_window"]
    lines = [
        f"# Ablation: {name}",
        "",
        "Reproduce with (from the repository root):",
        "",
        "```bash",
        out["command"],
        "```",
        "",
        f"- varied: {_ARM_NOTES[name]}",
        f"- base: the shipped `{out['base_config']}` config, `trainer.total_steps={out['total_steps']}`, "
        f"seeds {out['seeds']} (`trainer.seed` = `model.seed` = seed), tracking and profiling off"
        + (f", overrides `{' '.join(out['user_overrides'])}`" if out["user_overrides"] else ""),
        f"- machine: {out['machine']}; {out['workers']} run(s) at once, 1 torch thread each",
        f"- date: {out['date']}; whole ablation {out['total_wall_time_s'] / 60:.1f} min",
        "",
        f"Final reward = mean task reward over the last {min(w, out['total_steps'])} steps "
        "(`trainer.summary_window`); "
        f"final KL = mean KL(policy ‖ reference) per token over the same steps; mean ± sample std "
        f"over {len(out['seeds'])} seed(s); wall time of each run while {out['workers']} ran at once (the first "
        f"run in each process also pays one-time start-up). "
        + ("Reward = games won within 3 turns: uniform guesses win 1 - (3/4)^3 = 0.578, three distinct guesses "
           f"that ignore the feedback **{_NO_FEEDBACK_WINS:g}**, and only a policy that reads the feedback "
           "wins every game (1.0)." if name == "multi_turn" else
           f"Chance level of the task (uniform over the vocabulary): **{out['chance_reward']:.3f}**."),
        "",
        "| arm | final reward | final KL | wall time per run (s) |",
        "|---|---|---|---|",
    ]
    if name == "kl_frontier":
        lines[-2:] = ["| method | target KL | final reward | final KL | KL / target |", "|---|---|---|---|---|"]
        for s in out["summary"]:
            method, t = s["arm"].split("@")
            lines.append(f"| {method} | {t} | {_fmt(s['reward_mean'], s['reward_std'], 3)} | "
                         f"{_fmt(s['kl_mean'], s['kl_std'], 3)} | {s['kl_mean'] / float(t):.2f} |")
        lines += ["", f"![frontier]({name}.png)", "",
                  "Left: final reward against final KL per method, one point per target (mean ± std over "
                  "seeds). Right: the KL reached against its budget. A budget above the KL that training "
                  "reaches on its own does not bind. All per-run numbers and curves: "
                  f"[{name}.json]({name}.json).", ""]
        return "\n".join(lines)
    target = out.get("target_kl")
    if target is not None:  # the KL ablation: how far each arm's final KL is from the controllers' target
        lines[-2:] = ["| arm | final reward | final KL | KL / target | wall time per run (s) |",
                      "|---|---|---|---|---|"]
    for s in out["summary"]:
        ratio = f" {s['kl_mean'] / target:.2f} |" if target is not None else ""
        lines.append(f"| {s['arm']} | {_fmt(s['reward_mean'], s['reward_std'], 3)} | "
                     f"{_fmt(s['kl_mean'], s['kl_std'], 3)} |{ratio} "
                     f"{_fmt(s['wall_time_mean_s'], s['wall_time_std_s'], 1)} |")
    if target is not None:
        lines += ["", f"Target KL {target:g}: a feedback controller holds it when KL / target is within "
                  "0.75–1.25 (the shaded band in the middle panel). `fixed`, `no_kl` and `schedule` do not "
                  "use the measured KL, so they are not expected to."]
    if out.get("comparisons"):
        lines += _comparison_lines(out)
    if any(r.get("pareto_front") for r in out["runs"]):
        lines += ["", "The trade-off each multi-objective arm reached: its end point (reward, KL) is in the "
                  "table; its final Pareto archive (the non-dominated iterations' measured reward, -KL and "
                  "entropy, all seeds) is the right panel of the plot and in the JSON (`pareto_front`)."]
    lines += ["", f"![reward curves]({name}.png)", "",
              ("Left: reward per step; middle: rollout KL per token; right: the KL coefficient "
               "(log scale). Curves are means over seeds" if target is not None else
               "Reward per step (left: the value-based arms, with a critic; right: the critic-free ones), "
               "mean over seeds" if name == "estimators" else "Reward per step, mean over seeds")
              + (f" (moving average over {_smooth_window(out)} steps)" if _smooth_window(out) > 1 else "")
              + " with a ±1 std band. All per-run numbers and curves: "
              f"[{name}.json]({name}.json).", ""]
    return "\n".join(lines)


def _comparison_lines(out: dict[str, Any]) -> list[str]:
    """The page's test of every arm against the reference arm, and which differences exceed the noise."""
    ref, rows = out["reference_arm"], out["comparisons"]

    def p_fmt(p: float) -> str:
        return "n/a" if math.isnan(p) else f"{p:.2g}" if p >= 1e-3 else "<0.001"

    lines = ["", f"Each arm against `{ref}` (the base config's choice): difference of final reward, its 95% "
             f"confidence interval and two-sided p of Welch's t-test over the {len(out['seeds'])} seeds, and p "
             f"adjusted for the {len(rows)} comparisons (Holm–Bonferroni). **Bold**: beyond the noise "
             "(adjusted p < 0.05).", "",
             f"| arm | Δ reward vs {ref} | 95% CI | p | p (Holm) |", "|---|---|---|---|---|"]
    def ci(r: dict[str, Any]) -> str:
        return "n/a" if math.isnan(r["ci95"]) else f"[{r['diff'] - r['ci95']:+.3f}, {r['diff'] + r['ci95']:+.3f}]"

    for r in rows:
        sig = not math.isnan(r["p_holm"]) and r["p_holm"] < 0.05
        arm = f"**{r['arm']}**" if sig else r["arm"]
        lines.append(f"| {arm} | {r['diff']:+.3f} | {ci(r)} | {p_fmt(r['p'])} | {p_fmt(r['p_holm'])} |")
    tests = out.get("estimator_tests")
    if tests and tests.get("family"):
        f = tests["family"]
        lines += ["", f"Planned tests. **Value-based against critic-free**, paired by seed (per seed: mean final reward "
                  f"of the {len(f['value_arms'])} value-based arms minus that of the {len(f['free_arms'])} critic-free "
                  f"ones, {', '.join(f'`{a}`' for a in _OTHER_OBJECTIVE)} aside; t-test of the "
                  f"{len(f['per_seed'])} differences): {f['diff']:+.3f}, 95% CI {ci(f)}, p {p_fmt(f['p'])}."]
    if tests and tests.get("corrections"):
        lines += ["", "**Off-policy corrections** (each against the estimator it equals when every ratio is 1; "
                  "both re-estimate from the current critic at every epoch, so the difference is the "
                  "correction's): " + "; ".join(f"`{r['arm']}` − `{r['base']}` {r['diff']:+.3f}, 95% CI {ci(r)}, "
                                                f"Welch p {p_fmt(r['p'])}" for r in tests["corrections"]) + "."]
    return lines


def _smooth_window(out: dict[str, Any]) -> int:
    return max(1, min(10, out["total_steps"] // 10))


def _seed_curves(out: dict[str, Any], arm: str, key: str, k: int) -> np.ndarray:
    """``[seeds, steps]`` curves ``key`` of ``arm``, moving-averaged over ``k`` steps."""
    curves = np.array([r[key] for r in out["runs"] if r["arm"] == arm], dtype=float)
    if k > 1:
        kern = np.ones(k) / k
        curves = np.array([np.convolve(c, kern, mode="valid") for c in curves])
    return curves


def _frontier_points(out: dict[str, Any]) -> dict[str, list[tuple[float, float, float, float, float]]]:
    """Per method: ``(target, KL mean, KL std, reward mean, reward std)`` from ``controller@target`` arms."""
    pts: dict[str, list[tuple[float, float, float, float, float]]] = {}
    for s in out["summary"]:
        method, target = s["arm"].split("@")
        pts.setdefault(method, []).append((float(target), s["kl_mean"], s["kl_std"], s["reward_mean"],
                                           s["reward_std"]))
    return pts


def _plot_frontier(out: dict[str, Any], path: Path) -> None:
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(13, 4.8))
    for method, pts in _frontier_points(out).items():
        t, km, ks, rm, rs = (np.array(v) for v in zip(*sorted(pts), strict=True))
        (line,) = ax.plot(km, rm, marker="o", label=method)
        ax.errorbar(km, rm, xerr=ks, yerr=rs, fmt="none", color=line.get_color(), lw=0.8)
        ax_t.errorbar(t, km, yerr=ks, marker="o", label=method, color=line.get_color(), capsize=3)
    ax.axhline(out["chance_reward"], color="k", ls=":", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("final rollout KL per token (log)")
    ax.set_ylabel("final task reward")
    ax.set_title("reward-KL frontier: what a tighter KL budget costs", fontsize=10)
    ax.legend(fontsize=8)
    lim = np.array([min(_FRONTIER_TARGETS) / 1.5, max(_FRONTIER_TARGETS) * 1.5])
    ax_t.plot(lim, lim, "k:", lw=1, label="KL = target")
    ax_t.fill_between(lim, 0.75 * lim, 1.25 * lim, color="k", alpha=0.06, lw=0)
    ax_t.set_xscale("log")
    ax_t.set_yscale("log")
    ax_t.set_xlabel("target KL")
    ax_t.set_ylabel("final rollout KL per token")
    ax_t.set_title("reached KL against the budget (band: ±25%)", fontsize=10)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot(out: dict[str, Any], path: Path) -> None:
    k = _smooth_window(out)
    kl_panel = out["ablation"] == "kl" and all(r.get("kl_coef_curve") for r in out["runs"])
    front_panel = out["ablation"] == "pareto" and any(r.get("pareto_front") for r in out["runs"])
    if out["ablation"] == "kl_frontier":
        _plot_frontier(out, path)
        return
    # estimators: value-based arms (with a critic) on the left, critic-free ones on the right, one y scale
    by_family = out["ablation"] == "estimators" and all(s["arm"] in list_estimators() for s in out["summary"])
    if by_family:
        fig, (ax, ax_free) = plt.subplots(1, 2, figsize=(14, 4.8), sharey=True)
    elif front_panel:  # each arm's final Pareto archive in the reward-KL plane
        fig, (ax, ax_f) = plt.subplots(1, 2, figsize=(13, 4.8))
    elif kl_panel:  # second row: KL and coefficient against step, with the target
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
        ax, ax_kl, ax_c = axes
    else:
        fig, ax = plt.subplots(figsize=(8, 4.8))
    styles = ["-", "--", "-.", ":"]  # arms that coincide stay visible
    for i, s in enumerate(out["summary"]):
        curves = _seed_curves(out, s["arm"], "reward_curve", k)
        x = np.arange(curves.shape[1]) + k
        m, sd = curves.mean(0), curves.std(0, ddof=1) if len(curves) > 1 else np.zeros(curves.shape[1])
        here = ax_free if by_family and not get_estimator(s["arm"]).needs_values else ax
        (line,) = here.plot(x, m, label=s["arm"], lw=1.5, ls=styles[i % len(styles)])
        here.fill_between(x, m - sd, m + sd, color=line.get_color(), alpha=0.15, lw=0)
        if kl_panel:
            kl = _seed_curves(out, s["arm"], "kl_curve", k).mean(0)
            ax_kl.plot(x, kl, lw=1.2, ls=styles[i % len(styles)], color=line.get_color(), label=s["arm"])
            coef = _seed_curves(out, s["arm"], "kl_coef_curve", 1).mean(0)
            if np.any(coef > 0):
                ax_c.plot(np.arange(len(coef)) + 1, coef, lw=1.2, ls=styles[i % len(styles)],
                          color=line.get_color(), label=s["arm"])
    if front_panel:
        markers = "os^Dv<>"
        for i, s in enumerate(out["summary"]):
            pts = [(-p["kl_penalty"], p["reward"]) for r in out["runs"] if r["arm"] == s["arm"]
                   for p in r.get("pareto_front", [])]
            if pts:
                kl_pts, rw = zip(*pts, strict=True)
                ax_f.scatter(kl_pts, rw, s=14, marker=markers[i % len(markers)], label=s["arm"], alpha=0.7)
            ax_f.errorbar(s["kl_mean"], s["reward_mean"], xerr=s["kl_std"], yerr=s["reward_std"], fmt="x",
                          color="k", ms=8, lw=1)
        ax_f.set_xlabel("rollout KL per token")
        ax_f.set_ylabel("task reward")
        ax_f.set_title("final Pareto archives (all seeds); x: each arm's end point, mean ± std", fontsize=9)
        ax_f.legend(fontsize=7)
    if kl_panel:
        target = out.get("target_kl")
        if target is not None:
            ax_kl.axhline(target, color="k", ls=":", lw=1, label=f"target {target:g}")
            ax_kl.axhspan(0.75 * target, 1.25 * target, color="k", alpha=0.06, lw=0)
        ax_kl.set_xlabel("training step")
        ax_kl.set_ylabel("rollout KL per token (mean over seeds)")
        ax_kl.legend(fontsize=7, ncol=2)
        ax_c.set_yscale("log")
        ax_c.set_xlabel("training step")
        ax_c.set_ylabel("KL coefficient (mean over seeds)")
        ax_c.legend(fontsize=7, ncol=2)
    if out["ablation"] == "multi_turn":  # its reference level: the chance level of one token is not the game's
        ax.axhline(_NO_FEEDBACK_WINS, color="k", ls=":", lw=1, label="best without the feedback")
    else:
        ax.axhline(out["chance_reward"], color="k", ls=":", lw=1, label="chance")
    ax.set_xlabel("training step")
    ax.set_ylabel("task reward")
    ax.set_title(f"rl2fx ablate {out['ablation']}: {len(out['seeds'])} seed(s), mean ± std"
                 + (": value-based (critic)" if by_family else ""))
    ax.legend(fontsize=8, ncol=2)
    if by_family:
        ax_free.axhline(out["chance_reward"], color="k", ls=":", lw=1, label="chance")
        ax_free.set_xlabel("training step")
        ax_free.set_title("critic-free", fontsize=10)
        ax_free.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
