"""KL controllers on the closed-loop KL plant, side by side, plus the adaptive batch sizer on a simulated device.

Run:  PYTHONPATH=. python benchmarks/control.py [--quick] [--seeds N] [--steps N]

For every controller and scenario (stationary plant; reward pressure doubling
half way) it prints, averaged over seeds: settling steps (every later 20-step average of KL
within 25% of target for good), the mean relative tracking error
|KL/target - 1| and the mean KL ratio after settling, the variance of the
coefficient after settling, the peak KL/target of the transient, and the cost of one ``kl_update`` call. Rows:

- ``fixed`` (the naive baseline, the spec's initial 0.2) and ``fixed-oracle``
  (the coefficient that gives the target on the undisturbed plant, known only
  to the simulator);
- ``schedule`` (open loop, cosine 0.2 -> min_coef over 1000 steps);
- the feedback rules ``exponential``, ``linear``, ``pid`` with the spec's
  defaults and ``proportional`` with K_beta = n_steps/horizon = 0.1 (Ziegler et al.);
- ``trl-reference``: TRL's AdaptiveKLController copied verbatim, in the same
  loop, which must reproduce ``proportional``.

The batch-sizer part compares AdaptiveBatchSizer with the naive
"double until OOM, then halve" search on a device whose memory grows linearly
with the batch size. Results go to <--out DIR>/control.json (default outputs/benchmarks;
``--out benchmarks/results`` rewrites the committed table).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from _results import add_out_argument, write_json

from rl2fx.control import AdaptiveBatchSizer, kl_init, kl_update
from rl2fx.testing.control_plant import (
    KLPlant,
    TRLAdaptiveKLController,
    closed_loop,
    simulate,
    tracking_metrics,
)

TARGET = 0.01
CONTROLLERS: dict[str, dict] = {
    "fixed": {},
    "fixed-oracle": {"initial_coef": KLPlant().coef_for(TARGET)},
    "schedule": {"schedule_type": "cosine", "schedule_steps": 1000},
    "exponential": {},
    "linear": {},
    "pid": {},
    "proportional": {"n_steps": 1000, "horizon": 10000},
}


def simulate_trl(plant: KLPlant, steps: int, seed: int) -> dict[str, np.ndarray]:
    ctl = TRLAdaptiveKLController(0.2, TARGET, 10000)
    return closed_loop(lambda: float(ctl.value), lambda obs, t: ctl.update(obs, 1000),
                       plant=plant, steps=steps, seed=seed)


def update_cost_us(controller_type: str, params: dict, n: int = 2000) -> float:
    ct = "fixed" if controller_type == "fixed-oracle" else controller_type
    s = kl_init(ct, target_kl=TARGET, **params)
    kls = np.random.default_rng(0).lognormal(np.log(TARGET), 0.5, n).tolist()
    t0 = time.perf_counter()
    for i, kl in enumerate(kls):
        s = kl_update(s, kl, i)
    return (time.perf_counter() - t0) / n * 1e6


def kl_benchmark(steps: int, seeds: int) -> list[dict]:
    rows = []
    for scenario, dist in (("stationary", None), ("pressure x2 at half", steps // 2)):
        plant = KLPlant(disturbance_step=dist)
        start = dist or 0
        names = list(CONTROLLERS) + ["trl-reference"]
        for name in names:
            ms = []
            for seed in range(seeds):
                if name == "trl-reference":
                    run = simulate_trl(plant, steps, seed)
                else:
                    ct = "fixed" if name == "fixed-oracle" else name
                    run = simulate(ct, plant=plant, steps=steps, seed=seed, target_kl=TARGET, **CONTROLLERS[name])
                ms.append(tracking_metrics(run, TARGET, start=start))
            settled = [m["settling_steps"] for m in ms if m["settling_steps"] is not None]
            rows.append({
                "scenario": scenario,
                "controller": name,
                "settled_runs": f"{len(settled)}/{seeds}",
                "settling_steps": float(np.mean(settled)) if settled else None,
                "peak_kl_ratio": float(np.mean([m["peak_kl_ratio"] for m in ms])),
                "mean_rel_error": float(np.mean([m["mean_rel_error"] for m in ms])),
                "mean_kl_ratio": float(np.mean([m["mean_kl_ratio"] for m in ms])),
                "coef_var": float(np.mean([m["coef_var"] for m in ms])),
                "coef_mean": float(np.mean([m["coef_mean"] for m in ms])),
                "update_us": None if name == "trl-reference" else update_cost_us(name, CONTROLLERS[name]),
            })
    return rows


def batch_benchmark(steps: int, seeds: int) -> list[dict]:
    """Device: memory fraction 0.1 + 0.02 b (+-2% noise), OOM above 1 (b > 45); step time 0.5 + 0.01 b s."""

    def device(b: int, rng: np.random.Generator) -> tuple[float, float, bool]:
        mem = 0.1 + 0.02 * b + rng.normal(0, 0.02)
        return min(max(mem, 0.0), 1.0), 0.5 + 0.01 * b, mem <= 1.0

    rows = []
    for name in ("AdaptiveBatchSizer", "double-until-OOM"):
        res = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            sizer = AdaptiveBatchSizer(initial_batch_size=8, min_batch_size=1, max_batch_size=64)
            b, frozen = 8, False
            ooms = samples = 0
            wall = 0.0
            for _ in range(steps):
                mem, t, ok = device(b, rng)
                ooms += not ok
                wall += t
                samples += b if ok else 0
                if name == "AdaptiveBatchSizer":
                    b = sizer.update_batch_size(mem, t, ok)
                elif not ok:
                    b, frozen = max(1, b // 2), True
                elif not frozen:
                    b = min(64, 2 * b)
            res.append((b, ooms, samples / wall))
        rows.append({"sizer": name, "final_batch_size": float(np.mean([r[0] for r in res])),
                     "ooms": float(np.mean([r[1] for r in res])),
                     "samples_per_s": float(np.mean([r[2] for r in res]))})
    return rows


def fmt(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds, 400 steps")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    add_out_argument(ap)
    args = ap.parse_args()
    seeds = args.seeds or (3 if args.quick else 20)
    steps = args.steps or (400 if args.quick else 1000)

    rows = kl_benchmark(steps, seeds)
    print(f"KL plant: target {TARGET}, {steps} steps, {seeds} seeds; metrics after settling "
          f"(or over the second half of the scenario window when a run never settles)\n")
    print("| scenario | controller | settled | settling steps | peak KL/target | mean rel. error | mean KL/target | "
          "coef var | coef mean | update (us) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['controller']} | {r['settled_runs']} | {fmt(r['settling_steps'], '.1f')} | "
              f"{r['peak_kl_ratio']:.2f} | "
              f"{r['mean_rel_error']:.3f} | {r['mean_kl_ratio']:.3f} | {r['coef_var']:.2e} | "
              f"{r['coef_mean']:.3f} | {fmt(r['update_us'], '.1f')} |")

    brows = batch_benchmark(steps // 2, seeds)
    print("\nBatch sizing on a simulated device (OOM above batch 45), "
          f"{steps // 2} steps, {seeds} seeds\n")
    print("| sizer | final batch size | OOMs per run | samples/s |")
    print("|---|---|---|---|")
    for r in brows:
        print(f"| {r['sizer']} | {r['final_batch_size']:.1f} | {r['ooms']:.1f} | {r['samples_per_s']:.2f} |")

    print()
    write_json(args.out, "control.json", {
        "machine": f"{platform.machine()} {platform.system()}, Python {platform.python_version()}",
        "steps": steps, "seeds": seeds, "target_kl": TARGET, "kl": rows, "batch_size": brows,
    })


if __name__ == "__main__":
    main()
