"""The ``rl2fx`` command: train, tune, ablate, bench, and show the resolved config.

Every sub-command takes dotted config overrides (``actor.lr=1e-5 adv.estimator=grpo``)
and an optional ``--config`` (a YAML path, or the name of a shipped config such as
``demo`` or ``ppo``). Bad input ends with a one-line error and exit status 2.

Exit status: 0 on success, 2 for bad input (unknown sub-command or ablation name,
unknown config key, bad value, missing config file), or a benchmark script's own
non-zero status.

>>> main(["config", "show", "--config", "ppo", "adv.estimator=grpo"]) == 0  # doctest: +ELLIPSIS
data:
...
adv:
  estimator: grpo
...
True
>>> main(["config", "show", "actor.lrr=1"])
2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

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
    from rl2fx.train import run

    run(_load(args))  # prints the end-of-run summary
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

    arms = [a for a in args.arms.split(",") if a] if args.arms is not None else None
    out = run_ablation(args.name, seeds=args.seeds, out_dir=args.out, overrides=tuple(args.overrides),
                       config=args.config, arms=arms, workers=args.workers)
    print(Path(args.out, f"{args.name}.md").read_text(), end="")
    print(f"wrote {args.out}/{args.name}.md, .json and .png ({out['total_wall_time_s'] / 60:.1f} min)")
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


def _add_config_args(p: argparse.ArgumentParser, default_help: str = "the spec's defaults (ppo)") -> None:
    p.add_argument("--config", default=None,
                   help=f"YAML file, or a shipped config name (ppo, demo); default: {default_help}")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. actor.lr=1e-5 adv.estimator=grpo")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``rl2fx <cmd>: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``rl2fx`` argument parser (every sub-command and its options)."""
    parser = _Parser(prog="rl2fx", description="rl2fx: RL for LLM post-training.",
                     epilog="Exit status: 0 ok, 2 bad input (one-line error on stderr).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="train with PPOTrainer on the configured task",
                       description="Train with PPOTrainer (rollouts, rewards, advantages, PPO updates, "
                                   "checkpoints, tracking) and print the end-of-run summary.")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("tune", help="hyperparameter search over PPO training runs (the hyperopt section)",
                       description="Run the config's hyperopt section: each trial is a training run with the "
                                   "trial's parameters as overrides, objective = final mean reward. Resumes the "
                                   "study found in hyperopt.save_dir.")
    _add_config_args(p)
    p.set_defaults(func=_cmd_tune)

    from rl2fx.ablate_names import ABLATIONS

    p = sub.add_parser("ablate", help="run a documented ablation and write its table and plot",
                       description="Run one ablation of the demo task over several seeds and write "
                                   "<out>/<name>.md (table), .json (every run) and .png (reward curves). "
                                   "Overrides apply on top of every arm (trainer.total_steps=5 for a quick look).")
    p.add_argument("name", choices=ABLATIONS, help="which ablation: " + ", ".join(ABLATIONS))
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm (default 3)")
    p.add_argument("--out", default="docs/ablations", help="output folder (default docs/ablations)")
    p.add_argument("--arms", default=None, help="comma-separated subset of the arms (default all)")
    p.add_argument("--workers", type=int, default=2, help="runs at once, one process each (default 2)")
    _add_config_args(p, default_help="the shipped demo config")
    p.set_defaults(func=_cmd_ablate)

    p = sub.add_parser("bench", help="run benchmarks (from the repository root)",
                       description="Run benchmarks/<area>.py (all areas by default) from the repository root; "
                                   "each prints its table and writes benchmarks/results/<area>.json.")
    p.add_argument("area", nargs="?", choices=BENCH_AREAS, help="one area (" + ", ".join(BENCH_AREAS) + "); default all")
    p.add_argument("--quick", action="store_true", help="small sizes for a fast look")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("config", help="configuration tools", description="Configuration tools.")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND", parser_class=_Parser)
    s = csub.add_parser("show", help="print the resolved configuration as YAML",
                        description="Print the configuration after loading --config and applying the "
                                    "overrides, validated against the schema, as YAML.")
    _add_config_args(s)
    s.set_defaults(func=_cmd_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rl2fx`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse binds a nargs="*" positional early (``ablate kl --seeds 1 a=b`` leaves
    # ``a=b`` over), so overrides after the options arrive here
    if extra and hasattr(args, "overrides") and not any(x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args))
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"rl2fx: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
