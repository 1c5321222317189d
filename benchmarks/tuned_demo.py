"""Does tuning find something? The best trial of an ``rl2fx tune`` study against the shipped config.

Reads a finished study (``--study``, the ``hyperopt.save_dir`` of the run below), re-runs its
best parameters and the shipped ``demo`` config side by side on fresh seeds (``--seeds``, not
the study's), ``--steps`` steps each, then the shipped config for as many steps as the tuned
one's wall time buys (equal compute), and reports the final reward (mean task reward over the
last ``trainer.summary_window`` steps) and KL of both, mean ± std, with the study's convergence
(best reward so far against trial). The study itself::

    rl2fx tune --config demo 'hyperopt.params=[actor.lr,actor.clip,actor.kl.adaptive_kl.target_kl,trainer.entropy_coef,trainer.update_epochs]' \\
        hyperopt.n_trials=24 hyperopt.seeds_per_trial=2 hyperopt.optimizer_type=bayesian trainer.total_steps=150 \\
        hyperopt.save_dir=outputs/tune_demo experiment_tracking.enabled=false \\
        memory_optimization.profiling.enabled=false trainer.save_interval=0 trainer.output_dir=outputs/tune_demo/run
    PYTHONPATH=. python benchmarks/tuned_demo.py --study outputs/tune_demo

The second study keeps the demo's KL budget (``target_kl`` 0.5 is not tuned; ``initial_coef`` is)
and runs 300 steps, long enough for the budget to bind::

    rl2fx tune --config demo 'hyperopt.params=[actor.lr,actor.clip,actor.kl.adaptive_kl.initial_coef,trainer.entropy_coef,trainer.update_epochs]' \\
        hyperopt.n_trials=24 hyperopt.seeds_per_trial=2 hyperopt.optimizer_type=bayesian trainer.total_steps=300 \\
        hyperopt.save_dir=outputs/tune_demo_kl experiment_tracking.enabled=false \\
        memory_optimization.profiling.enabled=false trainer.save_interval=0 trainer.output_dir=outputs/tune_demo_kl/run
    PYTHONPATH=. python benchmarks/tuned_demo.py --study outputs/tune_demo_kl --steps 300 --name tuned_demo_kl

Prints a table and writes ``<--out DIR>/<--name>.json`` and ``.png`` (default
``outputs/benchmarks/tuned_demo.json``; the committed ones are ``benchmarks/results/tuned_demo.json`` and
``tuned_demo_kl.json``, ``--out benchmarks/results``, and the plots shown in docs/ablations.md,
``docs/ablations/tuned_demo.png`` and ``tuned_demo_kl.png``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _results import add_out_argument, write_json  # noqa: E402

from rl2fx.trainer.ablate import _RUN_OVERRIDES, _machine, _mean_std, _welch, run_one  # noqa: E402


def _trials(study: Path) -> list[dict]:
    rows = [json.loads(line) for line in (study / "trials.jsonl").read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r.get("number", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", default="outputs/tune_demo")
    ap.add_argument("--seeds", default="10,11,12,13,14", help="fresh seeds, comma-separated")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--name", default="tuned_demo", help="result file name: <--out>/<name>.json and .png")
    add_out_argument(ap)
    args = ap.parse_args()
    study = Path(args.study)
    trials = _trials(study)
    done = [t for t in trials if t.get("state") == "complete" and t.get("value") is not None]
    if not done:
        raise SystemExit(f"--study {study}: no complete trial in {study / 'trials.jsonl'}")
    best = max(done, key=lambda t: t["value"])
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = {"shipped demo": ({}, args.steps), f"tuned (trial {best['number']})": (dict(best["params"]), args.steps)}
    runs = []

    def run_arm(arm: str, params: dict, steps: int) -> None:
        for s in seeds:
            over = {"trainer.total_steps": steps, **_RUN_OVERRIDES, **params, "trainer.seed": s, "model.seed": s}
            res = run_one("demo", over)
            runs.append({"arm": arm, "seed": s, "steps": steps, "params": params, **res})
            print(f"{arm} seed {s}: reward {res['reward_end']:.3f}, KL {res['kl']:.3f}", flush=True)

    for arm, (params, steps) in arms.items():
        run_arm(arm, params, steps)
    # the same compute for both: the shipped config for as many steps as the tuned one's wall time buys
    names = list(arms)
    wall = {a: sum(r["wall_time_s"] for r in runs if r["arm"] == a) for a in names}
    eq_steps = round(args.steps * wall[names[1]] / wall[names[0]])
    names.append(f"shipped demo, equal wall time ({eq_steps} steps)")
    arms[names[2]] = ({}, eq_steps)
    run_arm(names[2], {}, eq_steps)
    summary = []
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        rm, rsd = _mean_std([r["reward_end"] for r in rs])
        km, ksd = _mean_std([r["kl"] for r in rs])
        wm, wsd = _mean_std([r["wall_time_s"] for r in rs])
        summary.append({"arm": arm, "steps": arms[arm][1], "reward_mean": rm, "reward_std": rsd, "kl_mean": km,
                        "kl_std": ksd, "wall_time_mean_s": wm, "wall_time_std_s": wsd})
    def rewards(arm: str) -> list[float]:
        return [r["reward_end"] for r in runs if r["arm"] == arm]

    diff, half, p = _welch(rewards(names[1]), rewards(names[0]))
    diff_eq, half_eq, p_eq = _welch(rewards(names[1]), rewards(names[2]))
    out = {"study": str(study), "n_trials": len(trials), "best_trial": best, "seeds": seeds, "steps": args.steps,
           "machine": _machine(), "summary": summary, "runs": runs,
           "tuned_minus_shipped": {"diff": diff, "ci95": half, "p_welch": p},
           "tuned_minus_shipped_equal_time": {"diff": diff_eq, "ci95": half_eq, "p_welch": p_eq, "steps": eq_steps},
           "convergence": [{"number": t["number"], "value": t.get("value"), "state": t.get("state")}
                           for t in trials]}
    print(f"\n| config | steps | final reward (seeds {seeds}) | final KL | wall time per run (s) |\n"
          "|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['arm']} | {s['steps']} | {s['reward_mean']:.3f} ± {s['reward_std']:.3f} | "
              f"{s['kl_mean']:.3f} ± {s['kl_std']:.3f} | {s['wall_time_mean_s']:.1f} ± {s['wall_time_std_s']:.1f} |")
    print(f"\ntuned - shipped: {diff:+.3f}, 95% CI [{diff - half:+.3f}, {diff + half:+.3f}], Welch p = {p:.2g}")
    print(f"tuned - shipped at equal wall time: {diff_eq:+.3f}, 95% CI [{diff_eq - half_eq:+.3f}, "
          f"{diff_eq + half_eq:+.3f}], Welch p = {p_eq:.2g}")
    print(f"\nbest params: {best['params']}")
    path = write_json(args.out, f"{args.name}.json", out, indent=1)
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [t["number"] for t in done]
    vals = [t["value"] for t in done]
    best_so_far = [max(vals[: i + 1]) for i in range(len(vals))]
    ax.scatter(xs, vals, s=14, label="trial")
    ax.step(xs, best_so_far, where="post", label="best so far")
    ax.axhline(summary[0]["reward_mean"], color="k", ls=":", lw=1, label="shipped demo (fresh seeds)")
    ax.axhline(summary[1]["reward_mean"], color="C1", ls="--", lw=1, label="best trial (fresh seeds)")
    ax.axhline(summary[2]["reward_mean"], color="k", ls="-.", lw=1,
               label=f"shipped demo, equal wall time ({eq_steps} steps)")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"final reward ({args.steps} steps)")
    ax.set_title("rl2fx tune on the demo: convergence", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    print(f"saved {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
