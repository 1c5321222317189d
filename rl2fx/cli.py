"""The ``rl2fx`` command: train, tune, ablate, bench, and show the resolved config.

Every sub-command takes dotted config overrides (``actor.lr=1e-5 adv.estimator=grpo``)
and an optional ``--config`` (a YAML path, or the name of a shipped config such as
``demo`` or ``ppo``). Bad input ends with a one-line error and exit status 2.

>>> main(["config", "show", "--config", "ppo", "adv.estimator=grpo"]) == 0  # doctest: +SKIP
True
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

BENCH_AREAS = ("returns", "pareto", "tuning", "control", "memory")


def _resolve_config(name_or_path: str | None) -> str | None:
    """A YAML path as given, or the shipped ``rl2fx/configs/<name>.yaml``."""
    if name_or_path is None:
        return None
    p = Path(name_or_path)
    if p.is_file():
        return str(p)
    shipped = Path(__file__).parent / "configs" / f"{name_or_path}.yaml"
    if shipped.is_file():
        return str(shipped)
    names = sorted(q.stem for q in (Path(__file__).parent / "configs").glob("*.yaml"))
    raise ValueError(f"--config must be a YAML file or one of the shipped configs {names}, got {name_or_path!r}")


def _load(args: argparse.Namespace):
    from rl2fx.config import load_config

    return load_config(_resolve_config(args.config), overrides=tuple(args.overrides))


def _cmd_train(args: argparse.Namespace) -> int:
    from rl2fx.train import PPOTrainer

    metrics = PPOTrainer(_load(args)).train()
    for k, v in sorted(metrics.items()):
        print(f"{k}: {v}")
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from rl2fx.tuning.cli import tune_from_config

    best = tune_from_config(_load(args))
    print("best parameters:")
    for k, v in sorted(best.items()):
        print(f"  {k}: {v}")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from rl2fx.ablate import run_ablation

    run_ablation(args.name, seeds=args.seeds, out_dir=args.out, overrides=tuple(args.overrides),
                 config=_resolve_config(args.config))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    root = Path.cwd()
    areas = [args.area] if args.area else list(BENCH_AREAS)
    for area in areas:
        script = root / "benchmarks" / f"{area}.py"
        if not script.is_file():
            raise ValueError(f"no benchmark script {script}: run 'rl2fx bench' from the repository root")
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        print(f"== {area}: {' '.join(cmd)}", flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            return rc
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(_load(args)), end="")
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML file, or a shipped config name (ppo, demo); default: the spec's defaults")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. actor.lr=1e-5 adv.estimator=grpo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rl2fx", description="rl2fx: RL for LLM post-training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train with PPOTrainer on the configured task")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("tune", help="hyperparameter search over PPO training runs (the hyperopt section)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_tune)

    from rl2fx.ablate_names import ABLATIONS

    p = sub.add_parser("ablate", help="run a documented ablation and write its table and plot")
    p.add_argument("name", choices=ABLATIONS, help="which ablation")
    p.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    p.add_argument("--out", default="docs/ablations", help="output folder (default docs/ablations)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_ablate)

    p = sub.add_parser("bench", help="run benchmarks (from the repository root)")
    p.add_argument("area", nargs="?", choices=BENCH_AREAS, help="one area; default all")
    p.add_argument("--quick", action="store_true", help="small sizes for a fast look")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    s = csub.add_parser("show", help="print the resolved configuration as YAML")
    _add_config_args(s)
    s.set_defaults(func=_cmd_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rl2fx`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"rl2fx: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
