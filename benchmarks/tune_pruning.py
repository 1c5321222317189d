"""Pruning benchmark: ``rl2fx tune`` on the demo config with and without the median pruner.

One study of ``--trials`` PPO runs of ``--steps`` steps each (1 thread, ``random``
sampler, seed ``--seed``, so both studies draw the same parameters in the same order),
reporting the running reward (mean task reward over the last ``trainer.summary_window``
steps) every ``--interval`` steps; once with ``hyperopt.pruner: none`` and once with
``median`` (``n_startup_trials`` = ``--startup``, ``n_warmup_steps`` = ``--warmup``).
A reference run of the shipped demo config with the same step budget gives the target:
its final reward (``reward_end``).

Reported per study: total wall time, trials pruned, best reward of a complete trial,
and the wall time from the study's start until the first complete trial whose reward
reaches the reference (``-`` when none does).

    PYTHONPATH=. python benchmarks/tune_pruning.py                # 10 trials x 100 steps
    PYTHONPATH=. python benchmarks/tune_pruning.py --trials 4 --steps 40 --out /tmp/t

Prints a table and writes <--out DIR>/tune_pruning.json (default outputs/benchmarks;
``--out benchmarks/results`` rewrites the committed one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _results import add_out_argument, write_json  # noqa: E402

from rl2fx.trainer.config import load_config  # noqa: E402
from rl2fx.trainer.ppo import PPOTrainer  # noqa: E402
from rl2fx.trainer.tune import tune_from_config  # noqa: E402

QUIET = {"experiment_tracking.enabled": False, "memory_optimization.profiling.enabled": False,
         "trainer.progress_bar": False, "trainer.num_threads": 1}


def reference(steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("demo", overrides={**QUIET, "trainer.total_steps": steps, "trainer.output_dir": tmp})
        t0 = time.perf_counter()
        r = PPOTrainer(cfg).train()
    return {"reward_end": r["reward_end"], "wall_time_s": time.perf_counter() - t0}


def study(args, pruner: str, target: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("demo", overrides={
            **QUIET, "trainer.total_steps": args.steps, "trainer.seed": args.seed,
            "hyperopt.optimizer_type": "random", "hyperopt.n_trials": args.trials, "hyperopt.save_dir": tmp,
            "hyperopt.report_interval": args.interval, "hyperopt.pruner": pruner,
            "hyperopt.median.n_startup_trials": args.startup, "hyperopt.median.n_warmup_steps": args.warmup})
        t0 = time.time()
        tune_from_config(cfg, show_progress_bar=False, verbose=False)
        wall = time.time() - t0
        trials = [json.loads(line) for line in (Path(tmp) / "trials.jsonl").read_text().splitlines()]
    done = [t for t in trials if t["state"] == "complete"]
    hit = [t["finished_at"] - t0 for t in done if t["value"] >= target]
    return {"pruner": pruner, "wall_time_s": wall, "n_trials": len(trials), "n_pruned": sum(t["state"] == "pruned" for t in trials),
            "n_failed": sum(t["state"] == "failed" for t in trials), "best_reward": max((t["value"] for t in done), default=None),
            "time_to_reference_s": min(hit) if hit else None,
            "steps_run": sum(max(map(int, t["intermediate"]), default=0) for t in trials),
            "trials": [{"number": t["number"], "state": t["state"], "value": t["value"], "params": t["params"],
                        "last_step": max(map(int, t["intermediate"]), default=0)} for t in trials]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--interval", type=int, default=10, help="hyperopt.report_interval")
    ap.add_argument("--startup", type=int, default=3, help="hyperopt.median.n_startup_trials")
    ap.add_argument("--warmup", type=int, default=30, help="hyperopt.median.n_warmup_steps")
    ap.add_argument("--seed", type=int, default=0)
    add_out_argument(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ref = reference(args.steps)
    rows = [study(args, p, ref["reward_end"]) for p in ("none", "median")]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    print(f"demo config, {args.trials} trials x {args.steps} steps, random sampler (seed {args.seed}), "
          f"report every {args.interval} steps; reference (shipped demo config, {args.steps} steps): "
          f"reward_end {ref['reward_end']:.4f} in {ref['wall_time_s']:.1f} s")
    print(f"{'pruner':8} {'wall s':>7} {'pruned':>7} {'steps run':>9} {'best reward':>11} {'s to reference':>14}")
    for r in rows:
        print(f"{r['pruner']:8} {r['wall_time_s']:7.1f} {r['n_pruned']:>3}/{r['n_trials']:<3} {r['steps_run']:9d} "
              f"{f(r['best_reward'], '.4f'):>11} {f(r['time_to_reference_s'], '.1f'):>14}")
    write_json(args.out, "tune_pruning.json",
               {"settings": vars(args), "reference": ref, "studies": rows,
                "machine": {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpus": os.cpu_count()}}, indent=1)


if __name__ == "__main__":
    main()
