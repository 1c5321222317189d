"""Tuning benchmark: simple regret after N evaluations, rl2fx samplers vs Optuna, side by side.

Problems (all minimised, from ``botorch.test_functions``): Branin (2-D, optimum
0.397887), Hartmann6 (6-D, optimum -3.32237) and Hartmann6 with Gaussian
observation noise (sd 0.1; the regret is the noise-free value of the point with the
best *observed* value, i.e. of what the tuner would recommend). Methods: rl2fx
``random``, ``grid``, ``bayesian`` (BoTorch), ``skopt``, and Optuna's ``TPESampler``
and ``GPSampler``, each with the same seeds. Also measured: seconds per ``ask`` with
100 observed trials in 6-D.

Grid search uses ``grid_size = max(2, round(N ** (1 / d)))`` so its grid has about N
points (Branin: 5 x 5 = 25 points; Hartmann6: 2^6 = 64 points, of which the first N
in enumeration order are evaluated).

    PYTHONPATH=. python benchmarks/tuning.py            # 10 seeds, all problems
    PYTHONPATH=. python benchmarks/tuning.py --quick    # 2 seeds, Branin + Hartmann6
    PYTHONPATH=. python benchmarks/tuning.py --problems hartmann6 --seeds 10

Prints a table and writes <--out DIR>/tuning.json (``--name`` for another file name; default
folder outputs/benchmarks, ``--out benchmarks/results`` rewrites the committed one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _results, also when imported as benchmarks.tuning

from _results import add_out_argument, write_json  # noqa: E402

from rl2fx.tuning import HyperparameterConfig, Study  # noqa: E402
from rl2fx.tuning.samplers import make_sampler  # noqa: E402

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

PROBLEMS = ("branin", "hartmann6", "hartmann6_noisy")
METHODS = ("random", "grid", "bayesian", "skopt", "optuna_tpe", "optuna_gp")
NOISE_SD = 0.1


def make_problem(name: str):
    from botorch.test_functions import Branin, Hartmann

    f = Branin() if name == "branin" else Hartmann(dim=6)
    bounds = f.bounds.tolist()
    cfgs = [HyperparameterConfig(f"x{i}", "float", low=float(lo), high=float(hi)) for i, (lo, hi) in enumerate(zip(*bounds, strict=True))]

    def true_value(params: dict) -> float:
        x = torch.tensor([[params[c.name] for c in cfgs]], dtype=torch.float64)
        return float(f(x))

    return cfgs, true_value, float(f.optimal_value), name.endswith("_noisy")


BAYES_OPTIONS: dict = {}


def run_rl2fx(method, cfgs, observe, n_evals, seed):
    d = len(cfgs)
    opts = {"grid_size": max(2, round(n_evals ** (1 / d)))} if method == "grid" else {}
    if method == "bayesian":
        opts.update(BAYES_OPTIONS)
    study = Study(cfgs, make_sampler(method, seed=seed, **opts), maximize=False)
    from rl2fx.tuning.samplers import StudyExhausted

    for _ in range(n_evals):
        try:
            t = study.ask()
        except StudyExhausted:
            break
        study.tell(t, observe(t.params))
    return [t.params for t in study.trials], [t.value for t in study.trials]


def run_optuna(method, cfgs, observe, n_evals, seed):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed) if method == "optuna_tpe" else optuna.samplers.GPSampler(seed=seed)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    xs, ys = [], []
    for _ in range(n_evals):
        tr = study.ask()
        p = {c.name: tr.suggest_float(c.name, c.low, c.high) for c in cfgs}
        y = observe(p)
        study.tell(tr, y)
        xs.append(p)
        ys.append(y)
    return xs, ys


def simple_regret(problem, method, seed, n_evals):
    cfgs, true_value, opt, noisy = make_problem(problem)
    rng = np.random.default_rng([seed, 12345])

    def observe(p):
        y = true_value(p)
        return y + NOISE_SD * float(rng.standard_normal()) if noisy else y

    t0 = time.perf_counter()
    runner = run_optuna if method.startswith("optuna") else run_rl2fx
    xs, ys = runner(method, cfgs, observe, n_evals, seed)
    elapsed = time.perf_counter() - t0
    best = int(np.argmin(ys))
    return true_value(xs[best]) - opt, elapsed


def ask_latency(method, n_obs=100, n_asks=4, seed=0):
    """Median (wall, CPU) seconds per ask with ``n_obs`` observed Hartmann6 trials.

    CPU time is this process's CPU time: on a shared machine wall time also counts
    the time other processes held the cores."""
    cfgs, true_value, _, _ = make_problem("hartmann6")
    rng = np.random.default_rng(seed)
    pts = [{c.name: float(rng.random()) for c in cfgs} for _ in range(n_obs)]
    vals = [true_value(p) for p in pts]
    times, cpus = [], []
    if method.startswith("optuna"):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=seed) if method == "optuna_tpe" else optuna.samplers.GPSampler(seed=seed)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        dists = {c.name: optuna.distributions.FloatDistribution(c.low, c.high) for c in cfgs}
        for p, v in zip(pts, vals, strict=True):
            study.add_trial(optuna.trial.create_trial(params=p, distributions=dists, value=v))
        for _ in range(n_asks):
            t0, c0 = time.perf_counter(), time.process_time()
            tr = study.ask()
            for c in cfgs:
                tr.suggest_float(c.name, c.low, c.high)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            study.tell(tr, true_value(tr.params))
    else:
        study = Study(cfgs, make_sampler(method, seed=seed), maximize=False)
        for p, v in zip(pts, vals, strict=True):
            study.add_trial(p, v)
        for _ in range(n_asks):
            t0, c0 = time.perf_counter(), time.process_time()
            t = study.ask()
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            study.tell(t, true_value(t.params))
    return statistics.median(times[1:]), statistics.median(cpus[1:])  # first ask warms imports up


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 seeds, Branin and Hartmann6")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 10, quick 2)")
    ap.add_argument("--problems", default=None, help=f"comma list from {','.join(PROBLEMS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}")
    ap.add_argument("--evals", type=int, default=30)
    ap.add_argument("--no-latency", action="store_true")
    add_out_argument(ap)
    ap.add_argument("--name", default="tuning.json",
                    help="file name of the results in --out (the committed exploration_weight=0 run: tuning_xi0.json)")
    ap.add_argument("--bayesian-options", default="{}",
                    help='JSON settings for rl2fx bayesian, e.g. \'{"exploration_weight": 0.0}\'')
    ap.add_argument("--table-from", default=None, help="print the Markdown table of a saved JSON and exit")
    a = ap.parse_args(argv)
    if a.table_from:
        print(markdown_table(json.loads(Path(a.table_from).read_text())))
        return None
    BAYES_OPTIONS.update(json.loads(a.bayesian_options))
    n_seeds = a.seeds or (2 if a.quick else 10)
    problems = a.problems.split(",") if a.problems else (["branin", "hartmann6"] if a.quick else list(PROBLEMS))
    methods = a.methods.split(",")
    for p in problems:
        assert p in PROBLEMS, f"unknown problem {p!r}; choose from {PROBLEMS}"
    for m in methods:
        assert m in METHODS, f"unknown method {m!r}; choose from {METHODS}"

    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared), torch threads 1",
        "evals": a.evals,
        "seeds": n_seeds,
        "bayesian_options": BAYES_OPTIONS,
        "regret": {},
        "ask_latency_s": {},
    }
    print(f"simple regret after {a.evals} evaluations, mean ± s.e. over {n_seeds} seeds (lower is better)")
    header = f"{'problem':<17}" + "".join(f"{m:>20}" for m in methods)
    print(header)
    for prob in problems:
        row = f"{prob:<17}"
        results["regret"][prob] = {}
        # seeds outermost, methods inside: on a shared machine the load then weighs on
        # every method alike, so the seconds-per-study columns stay comparable
        runs = {m: ([], []) for m in methods}
        for s in range(n_seeds):
            for m in methods:
                r, e = simple_regret(prob, m, s, a.evals)
                runs[m][0].append(r)
                runs[m][1].append(e)
        for m in methods:
            regs, secs = runs[m]
            mean = statistics.fmean(regs)
            se = statistics.stdev(regs) / math.sqrt(len(regs)) if len(regs) > 1 else float("nan")
            results["regret"][prob][m] = {"mean": mean, "se": se, "median": statistics.median(regs), "worst": max(regs),
                                          "per_seed": regs, "seconds_per_run": statistics.fmean(secs)}
            row += f"{mean:>13.3f} ± {se:<5.3f}"
        print(row, flush=True)
        _save(a.out, a.name, results)  # partial results survive an interrupted long run
    if not a.no_latency:
        print("\nseconds per ask with 100 observed trials, 6-D (median of 3 asks after one warm-up)")
        for m in methods:
            if m == "grid":
                continue
            wall, cpu = ask_latency(m)
            results["ask_latency_s"][m] = {"wall": wall, "cpu": cpu}
            print(f"  {m:<12} wall {wall:.3f}   cpu {cpu:.3f}", flush=True)
    _save(a.out, a.name, results)
    print("\n" + markdown_table(results))
    print(f"\nsaved {a.out}")
    return results


def markdown_table(results) -> str:
    """The regret and latency tables of a results JSON, as Markdown."""
    regret = results["regret"]
    methods = list(next(iter(regret.values())).keys()) if regret else []
    lines = [f"Simple regret after {results['evals']} evaluations over {results['seeds']} seeds "
             f"(lower is better): mean ± standard error, then median / worst seed:", "",
             "| problem | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for prob, d in regret.items():
        cells = [f"{d[m]['mean']:.3f} ± {d[m]['se']:.3f} ({statistics.median(d[m]['per_seed']):.3f} / "
                 f"{max(d[m]['per_seed']):.3f})" for m in methods]
        lines.append(f"| {prob} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds per study (mean over seeds, same run):", "",
              "| problem | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for prob, d in regret.items():
        lines.append(f"| {prob} | " + " | ".join(f"{d[m]['seconds_per_run']:.2f}" for m in methods) + " |")
    lat = results.get("ask_latency_s") or {}
    if lat:
        lines += ["", "Seconds per `ask` with 100 observed trials in 6-D (median of 3 after a warm-up):", "",
                  "| method | wall | CPU |", "|---|---|---|"]
        lines += [f"| {m} | {v['wall']:.3f} | {v['cpu']:.3f} |" for m, v in lat.items()]
    return "\n".join(lines)


def _save(out_dir, name, results):
    write_json(out_dir, name, results)


if __name__ == "__main__":
    main()
