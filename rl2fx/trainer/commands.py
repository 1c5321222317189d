"""What the ``rl2fx`` sub-commands do (the parser and the lazy dispatch live in :mod:`rl2fx.cli`).

Each ``cmd_*`` takes the parsed ``argparse.Namespace`` and returns the exit status.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rl2fx.losses import get_policy_loss, list_policy_losses
from rl2fx.returns import get_estimator, list_estimators
from rl2fx.trainer.ablate import run_ablation
from rl2fx.trainer.config import load_config
from rl2fx.trainer.ppo import run
from rl2fx.trainer.tune import tune_from_config

__all__ = ["BENCH_AREAS", "cmd_train", "cmd_tune", "cmd_ablate", "cmd_bench", "cmd_config_show",
           "cmd_config_registry", "cmd_tracking_replay", "registry_table"]

from rl2fx.cli import BENCH_AREAS


def _load(args: argparse.Namespace) -> DictConfig:
    return load_config(args.config, overrides=tuple(args.overrides))


def _data_overrides(args: argparse.Namespace) -> list[str]:
    """``--model/--dataset/--eval-dataset/--reward`` as the config overrides they stand for."""
    out = []
    if getattr(args, "model", None) is not None:
        out.append(f"actor.model_name={args.model}")
    if getattr(args, "dataset", None) is not None:
        out.append(f"data.train_data_path={args.dataset}")
    if getattr(args, "eval_dataset", None) is not None:
        out.append(f"data.test_data_path={args.eval_dataset}")
    if getattr(args, "reward", None):
        out.append("reward.functions=[" + ",".join(repr(r) for r in args.reward) + "]")
    return out


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, overrides=(*_data_overrides(args), *args.overrides))
    run(cfg)  # prints the end-of-run summary
    return 0


def _dask_client(address: str):
    """A Dask ``distributed.Client`` on the scheduler at ``address``, and its worker thread count."""
    from dask.distributed import Client

    try:
        client = Client(address, timeout=10)
    except (OSError, TimeoutError, ValueError) as e:
        raise ValueError(f"--dask-scheduler {address!r}: cannot connect to the Dask scheduler ({e})") from None
    workers = client.scheduler_info().get("workers", {})
    n_jobs = sum(int(w.get("nthreads", 1)) for w in workers.values())
    if n_jobs < 1:
        client.close()
        raise ValueError(f"--dask-scheduler {address!r}: the scheduler has no workers; start some with "
                         f"'dask worker {address}'")
    return client, n_jobs


def cmd_tune(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if getattr(args, "dask_scheduler", None):
        client, n_jobs = _dask_client(args.dask_scheduler)
        try:
            best = tune_from_config(cfg, executor=client, n_jobs=n_jobs)
        finally:
            client.close()
    else:
        best = tune_from_config(cfg)
    print("best parameters:")
    for k, v in sorted(best.items()):
        print(f"  {k}: {v}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    arms = [a for a in args.arms.split(",") if a] if args.arms is not None else None
    out = run_ablation(args.name, seeds=args.seeds, out_dir=args.out, overrides=tuple(args.overrides),
                       config=args.config, arms=arms, workers=args.workers)
    print(Path(args.out, f"{args.name}.md").read_text(), end="")
    print(f"wrote {args.out}/{args.name}.md, .json and .png ({out['total_wall_time_s'] / 60:.1f} min)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    root = Path.cwd()
    areas = [args.area] if args.area else list(BENCH_AREAS)
    for area in areas:
        script = root / "benchmarks" / f"{area}.py"
        if not script.is_file():
            raise ValueError(f"no benchmark script {script}: run 'rl2fx bench' from the repository root")
        cmd = [sys.executable, str(script), "--out", str(args.out)] + (["--quick"] if args.quick else [])
        print(f"== {area}: {' '.join(cmd)}", flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            return rc
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    print(OmegaConf.to_yaml(_load(args), resolve=bool(getattr(args, "resolve", False))), end="")
    return 0


def registry_table() -> str:
    """The registered estimators and policy losses with their hyperparameters' defaults.

    >>> print(registry_table())  # doctest: +ELLIPSIS
    estimators (adv.estimator; hyperparameters under adv.<name>, gamma/lamda shared as adv.gamma/adv.lamda):
      gae                     critic  gamma=0.99 lamda=0.95
    ...
    policy losses (actor.loss_type; clip, clip_high, dual_clip from actor.clip, trainer.clip_high, trainer.dual_clip; others under actor.loss_params):
      vanilla  clip=0.2 clip_high=None dual_clip=None tis_cap=None
    ...
    """
    lines = ["estimators (adv.estimator; hyperparameters under adv.<name>, gamma/lamda shared as "
             "adv.gamma/adv.lamda):"]
    for name in list_estimators():
        e = get_estimator(name)
        params = " ".join(f"{k}={e.defaults.get(k)}" for k in e.hyperparameters)
        lines.append(f"  {name:<22}  {'critic' if e.needs_values else '      '}  {params}".rstrip())
    lines.append("policy losses (actor.loss_type; clip, clip_high, dual_clip from actor.clip, trainer.clip_high, "
                 "trainer.dual_clip; others under actor.loss_params):")
    for name in list_policy_losses():
        loss = get_policy_loss(name)
        lines.append(f"  {name}  " + " ".join(f"{k}={loss.defaults.get(k)}" for k in loss.hyperparameters))
    return "\n".join(lines)


def cmd_config_registry(args: argparse.Namespace) -> int:
    load_config(args.config, overrides=tuple(args.overrides))  # imports the config's `imports` modules
    print(registry_table())
    return 0


def cmd_tracking_replay(args: argparse.Namespace) -> int:
    from rl2fx.tracking import replay_buffer

    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"no tracking buffer at {path} (expected a directory of *.jsonl files or one file)")
    n = replay_buffer(path, tracking_uri=args.tracking_uri)
    print(f"replayed {n} record(s) from {path}")
    return 0
