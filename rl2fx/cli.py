"""The ``rl2fx`` command: train, tune, ablate, bench, the config tools and ``tracking replay``.

A thin entry: the parser is defined here, and a sub-command's module
(:mod:`rl2fx.trainer.commands`, which loads torch, transformers and the trainer)
is imported only when that sub-command runs, so that ``rl2fx --help`` and a bad
command line answer at once.

Every sub-command takes dotted config overrides (``actor.lr=1e-5 adv.estimator=grpo``)
and an optional ``--config`` (a YAML path, or the name of a shipped config such as
``demo`` or ``ppo``). User estimators and policy losses: ``imports=[my_pkg.my_estimators]``
imports their module before the config is validated. Bad input ends with a one-line
error and exit status 2.

Exit status: 0 on success, 2 for bad input (unknown sub-command or ablation name,
unknown config key, bad value, missing config file), or a benchmark script's own
non-zero status.

>>> main(["config", "show", "--config", "ppo", "adv.estimator=grpo"]) == 0  # doctest: +ELLIPSIS
imports: []
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
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from rl2fx.trainer.ablate_names import ABLATIONS, DEFAULT_OUT, SHIPPED_OUT

BENCH_AREAS = ("returns", "pareto", "tuning", "control", "memory", "scale")
#: Where ``rl2fx bench`` (and each ``benchmarks/*.py``) writes its JSON unless given ``--out``.
BENCH_OUT = "outputs/benchmarks"
#: The committed results: regenerating them takes ``--out benchmarks/results`` explicitly.
BENCH_SHIPPED_OUT = "benchmarks/results"


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """``rl2fx.trainer.commands.<name>``, imported when the sub-command runs (keeps ``--help`` fast)."""

    def call(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module("rl2fx.trainer.commands"), name)(args))

    return call


def _add_config_args(p: argparse.ArgumentParser, default_help: str = "the spec's defaults (ppo)") -> None:
    p.add_argument("--config", default=None,
                   help=f"YAML file, or a shipped config name (ppo, demo); default: {default_help}")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. actor.lr=1e-5 adv.estimator=grpo "
                                                "(imports=[my_pkg.my_estimators] loads user estimators)")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): ``rl2fx <cmd>: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``rl2fx`` argument parser (every sub-command and its options)."""
    parser = _Parser(prog="rl2fx", description="rl2fx: RL for LLM post-training.",
                     epilog="Exit status: 0 ok, 2 bad input (one-line error on stderr). "
                            "'rl2fx config registry' lists the estimators and policy losses.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="train with PPOTrainer on the configured task or your own data",
                       description="Train with PPOTrainer (rollouts, rewards, advantages, PPO updates, "
                                   "checkpoints, tracking) and print the end-of-run summary. Without --model/"
                                   "--dataset/--reward it trains the built-in digits task.",
                       epilog="example: rl2fx train --model ./my-model --dataset prompts.jsonl "
                              "--reward my_rewards.py:accuracy --reward my_rewards.py:fmt "
                              "rollout.max_new_tokens=64 actor.lora.enabled=true")
    p.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="a model directory or a hub id in the local cache (actor.model_name)")
    p.add_argument("--dataset", default=None, metavar="PATH",
                   help="prompts: a .jsonl/.json/.parquet file with a 'prompt' column (data.train_data_path)")
    p.add_argument("--eval-dataset", default=None, metavar="PATH", help="eval prompts (data.test_data_path)")
    p.add_argument("--reward", action="append", default=None, metavar="MODULE:FUNCTION",
                   help="a reward function f(prompts, completions, **columns) as package.module:function or "
                        "path/to/file.py:function; repeat for several (reward.functions)")
    _add_config_args(p)
    p.set_defaults(func=_command("cmd_train"))

    p = sub.add_parser("tune", help="hyperparameter search over PPO training runs (the hyperopt section)",
                       description="Run the config's hyperopt section: each trial is a training run with the "
                                   "trial's parameters as overrides, objective = final mean reward. Resumes the "
                                   "study found in hyperopt.save_dir (or the database hyperopt.storage names; "
                                   "several commands on one study share it).")
    p.add_argument("--dask-scheduler", metavar="ADDRESS", default=None,
                   help="run the trials on the workers of this Dask scheduler (e.g. tcp://host:8786), as many at "
                        "once as they have threads; needs hyperopt.pruner=none")
    _add_config_args(p)
    p.set_defaults(func=_command("cmd_tune"))

    p = sub.add_parser("ablate", help="run a documented ablation and write its table and plot",
                       description="Run one ablation of the demo task over several seeds and write "
                                   "<out>/<name>.md (table), .json (every run) and .png (reward curves); "
                                   f"regenerate a shipped page with --out {SHIPPED_OUT}. "
                                   "Overrides apply on top of every arm (trainer.total_steps=5 for a quick look). "
                                   "'estimators' compares every registered estimator.")
    p.add_argument("name", choices=ABLATIONS, help="which ablation: " + ", ".join(ABLATIONS))
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per arm (default 3)")
    p.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                   help=f"output folder (default {DEFAULT_OUT}; {SHIPPED_OUT} rewrites the shipped page)")
    p.add_argument("--arms", default=None, help="comma-separated subset of the arms (default all)")
    p.add_argument("--workers", type=int, default=2, help="runs at once, one process each (default 2)")
    _add_config_args(p, default_help="the shipped demo config")
    p.set_defaults(func=_command("cmd_ablate"))

    p = sub.add_parser("bench", help="run benchmarks (from the repository root)",
                       description="Run benchmarks/<area>.py (all areas by default) from the repository root; "
                                   f"each prints its table and writes <out>/<area>.json (default {BENCH_OUT}; "
                                   f"--out {BENCH_SHIPPED_OUT} rewrites the committed results).")
    p.add_argument("area", nargs="?", choices=BENCH_AREAS, help="one area (" + ", ".join(BENCH_AREAS) + "); default all")
    p.add_argument("--quick", action="store_true", help="small sizes for a fast look")
    p.add_argument("--out", metavar="DIR", default=BENCH_OUT,
                   help=f"folder for the JSON results (default {BENCH_OUT}; {BENCH_SHIPPED_OUT} rewrites the "
                        "committed ones)")
    p.set_defaults(func=_command("cmd_bench"))

    p = sub.add_parser("config", help="configuration tools", description="Configuration tools.")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND", parser_class=_Parser)
    s = csub.add_parser("show", help="print the composed configuration as YAML",
                        description="Print the configuration after loading --config and applying the "
                                    "overrides, validated against the schema, as YAML. Paths derived from "
                                    "trainer.output_dir are shown as ${trainer.output_dir}/... unless --resolve.")
    s.add_argument("--resolve", action="store_true",
                   help="print interpolations resolved (the values a run uses), as Hydra's --resolve")
    _add_config_args(s)
    s.set_defaults(func=_command("cmd_config_show"))
    s = csub.add_parser("registry", help="list the registered estimators and policy losses",
                        description="List every registered advantage estimator (adv.estimator, with its "
                                    "hyperparameters' defaults and whether it trains a critic) and policy loss "
                                    "(actor.loss_type), after importing the config's 'imports' modules.")
    _add_config_args(s)
    s.set_defaults(func=_command("cmd_config_registry"))

    p = sub.add_parser("tracking", help="experiment-tracking tools", description="Experiment-tracking tools.")
    tsub = p.add_subparsers(dest="tracking_command", required=True, metavar="SUBCOMMAND", parser_class=_Parser)
    s = tsub.add_parser("replay", help="send the MLflow records an outage left in a tracking buffer",
                        description="Replay the outage buffer of a run (a *.jsonl file, or a directory such as "
                                    "<trainer.output_dir>/tracking_buffer) into MLflow: records go to the run they "
                                    "were meant for; applied records are removed from the files.")
    s.add_argument("path", metavar="DIR", help="buffer directory (or one .jsonl buffer file)")
    s.add_argument("--tracking-uri", default=None,
                   help="send to this MLflow tracking URI instead of the one each record was meant for")
    s.set_defaults(func=_command("cmd_tracking_replay"))
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
