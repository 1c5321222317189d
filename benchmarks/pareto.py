"""Pareto ranking and hypervolume: rl2fx vs moocore vs pymoo vs BoTorch, in one run.

    PYTHONPATH=. python benchmarks/pareto.py            # N in {1e3, 1e4}, M in {2, 3, 5}
    PYTHONPATH=. python benchmarks/pareto.py --quick    # N = 1e3, M in {2, 3}

Data: ranks and front masks on a uniform random cloud in [0, 1]^M (many fronts, like
a population); hypervolume on N mutually non-dominated points on the positive unit
sphere (the hard case: every point is on the front), reference point 0.
Every time is the best of several repeats (wall clock, seconds). Results are checked
for equality between libraries before they are timed. Prints a Markdown table and
writes <--out DIR>/pareto.json (default outputs/benchmarks; ``--out benchmarks/results`` rewrites the committed one).
"""

from __future__ import annotations

import argparse
import platform
import time

import moocore
import numpy as np
import torch
from _results import add_out_argument, write_json
from botorch.utils.multi_objective.hypervolume import Hypervolume as BoTorchHV
from botorch.utils.multi_objective.pareto import is_non_dominated
from pymoo.indicators.hv import HV
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from rl2fx import pareto as P

CUDA = torch.cuda.is_available()


def best_time(fn, *, budget=2.0, max_repeats=5, cuda=False):
    """Best wall time of up to ``max_repeats`` calls, stopping once ``budget`` seconds are spent."""
    times, spent = [], 0.0
    out = None
    for _ in range(max_repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if spent > budget:
            break
    return min(times), out


def pymoo_ranks(x):
    fronts = NonDominatedSorting().do(-x)
    r = np.empty(len(x), dtype=np.int64)
    for i, f in enumerate(fronts):
        r[f] = i
    return r


def sphere(n, m, rng):
    x = np.abs(rng.normal(size=(n, m)))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def run(sizes, dims, *, budget):
    rng = np.random.default_rng(0)
    rows = []
    for m in dims:
        for n in sizes:
            rows.append(bench_case(n, m, rng, budget))
            print(f"done N={n} M={m}", flush=True)
    return rows


def bench_case(n, m, rng, budget):
    cloud = rng.random((n, m))
    t_cloud = torch.from_numpy(cloud)
    row = {"N": n, "M": m}

    # ---- ranks (non-dominated sorting)
    want = moocore.pareto_rank(cloud, maximise=True)
    row["ranks_moocore"], _ = best_time(lambda: moocore.pareto_rank(cloud, maximise=True), budget=budget)
    row["ranks_rl2fx"], got = best_time(lambda: P.dominance_ranks(cloud), budget=budget)
    assert np.array_equal(got, want)
    row["ranks_pymoo"], got = best_time(lambda: pymoo_ranks(cloud), budget=budget)
    assert np.array_equal(got, want)
    row["ranks_rl2fx_torch_cpu"], got = best_time(
        lambda: P.dominance_ranks(t_cloud, backend="torch"), budget=budget, max_repeats=2)
    assert np.array_equal(got.numpy(), want)
    row["n_fronts"] = int(want.max()) + 1

    # ---- first front (mask)
    want_mask = want == 0
    row["mask_moocore"], _ = best_time(lambda: moocore.is_nondominated(cloud, maximise=True, keep_weakly=True), budget=budget)
    row["mask_rl2fx"], got = best_time(lambda: P.pareto_front_mask(cloud), budget=budget)
    assert np.array_equal(got, want_mask)
    row["mask_rl2fx_torch_cpu"], got = best_time(
        lambda: P.pareto_front_mask(t_cloud, backend="torch"), budget=budget, max_repeats=3)
    assert np.array_equal(got.numpy(), want_mask)
    row["mask_botorch_cpu"], got = best_time(
        lambda: is_non_dominated(t_cloud, deduplicate=False), budget=budget, max_repeats=3)
    assert np.array_equal(got.numpy(), want_mask)

    if CUDA:
        g = t_cloud.cuda()
        P.dominance_ranks(g)  # warm-up (kernels, allocator)
        row["ranks_rl2fx_torch_gpu"], got = best_time(lambda: P.dominance_ranks(g), budget=budget, cuda=True)
        assert np.array_equal(got.cpu().numpy(), want)
        row["mask_rl2fx_torch_gpu"], got = best_time(lambda: P.pareto_front_mask(g), budget=budget, cuda=True)
        assert np.array_equal(got.cpu().numpy(), want_mask)
        is_non_dominated(g, deduplicate=False)
        row["mask_botorch_gpu"], got = best_time(
            lambda: is_non_dominated(g, deduplicate=False), budget=budget, cuda=True)
        assert np.array_equal(got.cpu().numpy(), want_mask)

    # ---- hypervolume of an all-non-dominated front
    front = sphere(n, m, rng)
    ref = np.zeros(m)
    hv_want = moocore.hypervolume(front, ref=ref, maximise=True)
    row["hv_moocore"], _ = best_time(lambda: moocore.hypervolume(front, ref=ref, maximise=True), budget=budget)
    row["hv_rl2fx"], hv = best_time(lambda: P.hypervolume(front, ref), budget=budget)
    assert abs(hv - hv_want) <= 1e-9 * abs(hv_want)
    row["hv_pymoo"], hv = best_time(lambda: HV(ref_point=-ref)(-front), budget=budget)
    assert abs(hv - hv_want) <= 1e-9 * abs(hv_want)
    # BoTorch's pure-Python dimension sweep: 117 s for 163 points at M=5 on this
    # machine, so it is only timed where it finishes in seconds.
    if m <= 3 and (m == 2 or n <= 1000):
        bt = BoTorchHV(ref_point=torch.zeros(m, dtype=torch.float64))
        t_front = torch.from_numpy(front)
        row["hv_botorch"], hv = best_time(lambda: bt.compute(t_front), budget=budget, max_repeats=2)
        assert abs(hv - hv_want) <= 1e-9 * abs(hv_want)
    else:
        row["hv_botorch"] = None
    row["hv_front_size"] = n
    return row


def fmt(t):
    if t is None:
        return "—"
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def table(rows):
    cols = [
        ("ranks: rl2fx (moocore)", "ranks_rl2fx"), ("ranks: moocore", "ranks_moocore"),
        ("ranks: pymoo", "ranks_pymoo"), ("ranks: rl2fx torch CPU", "ranks_rl2fx_torch_cpu"),
        ("front: rl2fx", "mask_rl2fx"), ("front: moocore", "mask_moocore"),
        ("front: rl2fx torch CPU", "mask_rl2fx_torch_cpu"), ("front: BoTorch CPU", "mask_botorch_cpu"),
    ]
    if CUDA:
        cols += [("ranks: rl2fx torch GPU", "ranks_rl2fx_torch_gpu"), ("front: rl2fx torch GPU", "mask_rl2fx_torch_gpu"),
                 ("front: BoTorch GPU", "mask_botorch_gpu")]
    cols += [("HV: rl2fx (pymoo)", "hv_rl2fx"), ("HV: moocore", "hv_moocore"), ("HV: pymoo", "hv_pymoo"),
             ("HV: BoTorch", "hv_botorch")]
    head = "| N | M | fronts | " + " | ".join(c for c, _ in cols) + " |"
    sep = "|" + "---|" * (3 + len(cols))
    lines = [head, sep]
    for r in rows:
        lines.append(f"| {r['N']} | {r['M']} | {r['n_fronts']} | " + " | ".join(fmt(r.get(k)) for _, k in cols) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 1e3 and M in {2, 3} only")
    add_out_argument(ap)
    args = ap.parse_args()
    torch.set_num_threads(1)  # moocore and pymoo are single-threaded; compare like with like
    sizes = [1000] if args.quick else [1000, 10_000]
    dims = [2, 3] if args.quick else [2, 3, 5]
    rows = run(sizes, dims, budget=0.5 if args.quick else 2.0)
    md = table(rows)
    print(md)
    targets = {}
    r = next((r for r in rows if r["N"] == 10_000 and r["M"] == 3), None)
    if r is not None:
        ratio = r["ranks_rl2fx"] / r["ranks_moocore"]
        targets["cpu_ranks_vs_moocore_N1e4_M3"] = {"ratio": ratio, "target": 2.0, "met": ratio <= 2.0}
        print(f"\ntarget: rl2fx CPU ranks / moocore at N=1e4, M=3 = {ratio:.2f} (<= 2: {ratio <= 2.0})")
    if CUDA:
        for r in rows:
            ratio = r["mask_botorch_gpu"] / r["mask_rl2fx_torch_gpu"]
            targets[f"gpu_front_speedup_vs_botorch_N{r['N']}_M{r['M']}"] = {"ratio": ratio, "met": ratio > 1.0}
    meta = {
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if CUDA else None,
        "versions": {"torch": torch.__version__, "moocore": moocore.__version__,
                     "pymoo": __import__("pymoo").__version__, "botorch": __import__("botorch").__version__},
        "quick": args.quick,
    }
    print()
    write_json(args.out, "pareto.json", {"meta": meta, "rows": rows, "targets": targets, "table": md})


if __name__ == "__main__":
    main()
