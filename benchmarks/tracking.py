"""What experiment tracking costs a training loop: none, the naive synchronous path, and ExperimentTracker.

Run:  PYTHONPATH=. python benchmarks/tracking.py [--quick] [--steps N] [--repeats N] [--no-demo] [--out PATH]

Part 1, a loop shaped like the demo's: ``--steps`` steps of 10 float metrics each,
logged to a fresh MLflow SQLite store, with two kinds of step: ``cpu``, a real
training step of a small MLP on one torch thread (a few ms, Python-heavy, so it
needs the GIL most of the time), and ``sleep``, 5 ms spent off the CPU (as a step
waiting on a GPU is). Rows, interleaved round-robin
over ``--repeats`` rounds (median reported):

- ``none``: no tracking;
- ``naive log_batch/step``: the previous tracker's path, reimplemented here: one
  synchronous ``MlflowClient.log_batch`` per step on the training thread;
- ``naive log_metric/metric``: the common hand-written path, one synchronous
  ``MlflowClient.log_metric`` per value;
- ``ExperimentTracker``: ``log_metrics`` per step (queued; the background writer
  thread sends batches), ``finish()`` inside the timed region, so draining the queue
  counts;
- ``ExperimentTracker, metrics_process``: the same with ``metrics_process=True`` (after
  1000 metrics a child process writes MLflow's share).

Wall time is the loop plus whatever the variant needs to have every metric in the
store (``finish s``: the part spent after the last step, sending what was left and
ending the run); the one-time setup (client, experiment, run) is a separate column. Every
tracked variant's metrics are read back from the store and counted: the benchmark
fails if one is missing.

Part 2, the outage buffer: 930 buffered metric records (10 metrics each) replayed
into the store one ``log_batch`` per record (the previous replay) and in batches
(``replay_buffer``), both read back and counted; and the time for a tracker to
start on a SQLite path that cannot be opened (the pre-flight check; MLflow itself
retries opening for sum 0.1 (2^k - 1), k = 1..9 = 101 s).

Part 3 (skipped with --no-demo or --quick): the real demo trainer
(``rl2fx.load_config("demo")`` + ``rl2fx.PPOTrainer(cfg).train()``) for 50 steps
with tracking off, with ``ExperimentTracker``, and with a tracker whose
``log_metrics`` sends synchronously (the previous behaviour); MLflow only, no
model logging or system metrics, so the rows differ in metric logging alone.

Results go to <--out DIR>/tracking.json (default outputs/benchmarks; the committed table is
benchmarks/results/tracking.json, rewritten with ``--out benchmarks/results``).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from _results import add_out_argument, write_json

KEYS = ["loss", "reward", "kl", "entropy", "clip_frac", "grad_norm", "value_loss", "adv_mean",
        "adv_std", "lr"]


def make_sleep_work(ms: float = 5.0) -> Any:
    """A step whose time is spent off the CPU (as waiting on a GPU is), returning 10 float metrics."""

    def step() -> dict[str, float]:
        time.sleep(ms / 1e3)
        return {k: 0.5 for k in KEYS}

    return step


def make_work(batch: int = 128, width: int = 256) -> Any:
    """A real training step of a small MLP on the CPU returning 10 float metrics."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.Tanh(),
                                torch.nn.Linear(2 * width, width))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, width)

    def step() -> dict[str, float]:
        out = model(x)
        loss = (out - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        opt.step()
        lv = float(loss.detach())
        return {"loss": lv, "reward": -lv, "kl": lv * 1e-3, "entropy": 1.0 / (1.0 + lv),
                "clip_frac": 0.1, "grad_norm": float(gn), "value_loss": 0.5 * lv,
                "adv_mean": float(out.mean()), "adv_std": float(out.std()), "lr": 1e-3}

    return step


def _count(client: Any, run_id: str) -> int:
    return sum(len(client.get_metric_history(run_id, k)) for k in KEYS)


def run_loop(kind: str, steps: int, uri: str, buffer_dir: str, work: Any) -> dict[str, Any]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from rl2fx.tracking import ExperimentConfig, ExperimentTracker

    setup_t0 = time.perf_counter()
    client = run_id = tracker = None
    if kind.startswith("naive"):
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("bench")
        exp_id = exp.experiment_id if exp else client.create_experiment("bench")
        run_id = client.create_run(exp_id).info.run_id
    elif kind.startswith("ExperimentTracker"):
        tracker = ExperimentTracker(ExperimentConfig(
            experiment_name="bench", tracking_uri=uri, enable_wandb=False, log_system_metrics=False,
            log_models=False, log_artifacts=False, buffer_dir=buffer_dir,
            metrics_process=kind == "ExperimentTracker, metrics_process"))
        run_id = tracker.mlflow_run_id
        client = MlflowClient(uri)
    setup = time.perf_counter() - setup_t0

    t0 = time.perf_counter()
    for step in range(steps):
        m = work()
        if kind == "naive log_batch/step":
            ts = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v in m.items()])
        elif kind == "naive log_metric/metric":
            for k, v in m.items():
                client.log_metric(run_id, k, v, step=step)
        elif tracker is not None:
            tracker.log_metrics(m, step=step)
    t_end = time.perf_counter()
    if tracker is not None:
        tracker.finish()
    elif client is not None:
        client.set_terminated(run_id)
    wall = time.perf_counter() - t0
    finish = time.perf_counter() - t_end

    logged = None
    if client is not None:
        logged = _count(client, run_id)
        assert logged == steps * len(KEYS), f"{kind}: {logged} metrics in the store, expected {steps * len(KEYS)}"
    return {"variant": kind, "wall_s": wall, "setup_s": setup, "finish_s": finish, "metrics_read_back": logged}


def loop_benchmark(steps: int, repeats: int, root: Path, workload: str) -> list[dict[str, Any]]:
    from mlflow import MlflowClient

    kinds = ["none", "naive log_batch/step", "ExperimentTracker", "ExperimentTracker, metrics_process"]
    if workload == "cpu" and steps <= 200:  # thousands of synchronous calls: one short case shows it
        kinds.insert(2, "naive log_metric/metric")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    MlflowClient(uri).search_experiments()  # migrations once, outside every timed region
    work = make_work() if workload == "cpu" else make_sleep_work()
    for _ in range(20):
        work()  # warm-up
    t0 = time.perf_counter()
    for _ in range(50):
        work()
    work_ms = (time.perf_counter() - t0) / 50 * 1e3
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for r in range(repeats):
        order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]
        for kind in order:
            runs[kind].append(run_loop(kind, steps, uri, str(root / "buffer"), work))
    base = statistics.median(x["wall_s"] for x in runs["none"])
    rows = []
    for kind in kinds:
        wall = statistics.median(x["wall_s"] for x in runs[kind])
        rows.append({
            "workload": workload, "variant": kind, "steps": steps, "metrics_per_step": len(KEYS), "work_ms_per_step": work_ms,
            "wall_s": wall, "wall_s_all": [x["wall_s"] for x in runs[kind]],
            "overhead_pct": 100.0 * (wall - base) / base,
            "per_step_overhead_ms": 1e3 * (wall - base) / steps,
            "setup_s": statistics.median(x["setup_s"] for x in runs[kind]),
            "finish_s": statistics.median(x["finish_s"] for x in runs[kind]),
            "metrics_read_back": runs[kind][-1]["metrics_read_back"],
        })
    return rows


def replay_benchmark(root: Path, n_records: int = 930) -> dict[str, Any]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from rl2fx.tracking import ExperimentConfig, replay_buffer
    from rl2fx.tracking.buffer import OutageBuffer

    uri = f"sqlite:///{root / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench_replay")
    exp_id = exp.experiment_id if exp else client.create_experiment("bench_replay")
    out: dict[str, Any] = {"records": n_records, "metrics_per_record": len(KEYS)}

    def records(run_id: str) -> list[dict[str, Any]]:
        t = int(time.time() * 1000)
        return [{"backend": "mlflow", "op": "metrics", "time_ms": t + s, "step": s,
                 "metrics": {k: float(s) for k in KEYS}, "run_id": run_id, "tracking_uri": uri,
                 "experiment": "bench_replay"} for s in range(n_records)]

    run_id = client.create_run(exp_id).info.run_id
    t0 = time.perf_counter()
    for rec in records(run_id):  # the previous replay: one call per buffered record
        client.log_batch(run_id, metrics=[Metric(k, v, rec["time_ms"], rec["step"])
                                          for k, v in rec["metrics"].items()])
    out["one_by_one_s"] = time.perf_counter() - t0
    assert _count(client, run_id) == n_records * len(KEYS)

    run_id = client.create_run(exp_id).info.run_id
    path = root / "replay" / "buffer.jsonl"
    OutageBuffer(path).append(records(run_id))
    t0 = time.perf_counter()
    applied = replay_buffer(path)
    out["batched_s"] = time.perf_counter() - t0
    assert applied == n_records and _count(client, run_id) == n_records * len(KEYS)

    bad = root / "not_a_db"
    bad.mkdir(exist_ok=True)
    from rl2fx.tracking import ExperimentTracker

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        t = ExperimentTracker(ExperimentConfig(
            experiment_name="bench_broken", tracking_uri=f"sqlite:///{bad}", enable_wandb=False,
            log_system_metrics=False, retry_interval=3600, buffer_dir=str(root / "broken_buf")))
        t.log_metrics({"a": 1.0}, step=0)
        t.flush()
        out["broken_store_start_s"] = time.perf_counter() - t0
        assert [r["op"] for r in t.buffered()] == ["start", "metrics"]
        t.finish()
    out["mlflow_open_retry_s"] = sum(0.1 * (2 ** k - 1) for k in range(1, 10))
    return out


def demo_benchmark(root: Path, steps: int = 50) -> list[dict[str, Any]]:
    import rl2fx
    import rl2fx.tracking
    from rl2fx.tracking import ExperimentTracker

    class SyncTracker(ExperimentTracker):
        """The previous behaviour: every log_metrics call sent before it returns."""

        def log_metrics(self, metrics: Any, step: int | None = None) -> None:
            super().log_metrics(metrics, step)
            self.flush()

    rows = []
    for variant in ("tracking off", "synchronous tracker", "ExperimentTracker", "tracking off"):
        out_dir = root / "demo" / variant.replace(" ", "_")
        shutil.rmtree(out_dir, ignore_errors=True)
        over = [f"trainer.total_steps={steps}", f"trainer.output_dir={out_dir}", "trainer.progress_bar=false",
                f"experiment_tracking.enabled={variant != 'tracking off'}",
                "experiment_tracking.log_models=false", "experiment_tracking.log_system_metrics=false",
                "experiment_tracking.log_artifacts=false",
                f"experiment_tracking.tracking_uri=sqlite:///{root / 'demo_mlruns.db'}"]
        cfg = rl2fx.load_config("demo", overrides=over)
        real = rl2fx.tracking.ExperimentTracker
        if variant == "synchronous tracker":
            rl2fx.tracking.ExperimentTracker = SyncTracker  # the trainer imports it from here
        try:
            trainer = rl2fx.PPOTrainer(cfg)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = trainer.train()
            wall = time.perf_counter() - t0
        finally:
            rl2fx.tracking.ExperimentTracker = real
        read_back = None
        if result.get("mlflow_run_id"):
            from mlflow import MlflowClient

            client = MlflowClient(f"sqlite:///{root / 'demo_mlruns.db'}")
            hist = client.get_metric_history(result["mlflow_run_id"], "reward")
            read_back = len({m.step for m in hist})
            assert read_back >= steps, f"{variant}: reward at {read_back} steps, expected {steps}"
        rows.append({"variant": variant, "steps": steps, "train_s": wall, "reward_steps_read_back": read_back})
    off = statistics.mean(r["train_s"] for r in rows if r["variant"] == "tracking off")
    for r in rows:
        r["overhead_pct"] = 100.0 * (r["train_s"] - off) / off
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="50 steps, 1 round, no demo")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-demo", action="store_true")
    add_out_argument(ap)
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats, args.no_demo = 50, 1, True
    torch.set_num_threads(1)
    import mlflow

    root = Path(tempfile.mkdtemp(prefix="rl2fx-bench-tracking-"))
    try:
        rows = [r for w in ("cpu", "sleep") for r in loop_benchmark(args.steps, args.repeats, root, w)]
        replay = replay_benchmark(root)
        demo = [] if args.no_demo else demo_benchmark(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nTraining loop: {args.steps} steps x {len(KEYS)} metrics, median of {args.repeats}")
    print(f"{'work/step':<16}{'variant':<32}{'wall s':>9}{'overhead':>10}{'ms/step':>9}{'finish s':>10}"
          f"{'setup s':>9}{'read back':>11}")
    for r in rows:
        rb = "-" if r["metrics_read_back"] is None else str(r["metrics_read_back"])
        work = f"{r['workload']} {r['work_ms_per_step']:.1f} ms"
        print(f"{work:<16}{r['variant']:<32}{r['wall_s']:>9.3f}{r['overhead_pct']:>9.1f}%"
              f"{r['per_step_overhead_ms']:>9.2f}{r['finish_s']:>10.3f}{r['setup_s']:>9.3f}{rb:>11}")
    print(f"\nReplay of {replay['records']} buffered records: one by one {replay['one_by_one_s']:.2f} s, "
          f"batched {replay['batched_s']:.2f} s")
    print(f"Start on an unopenable SQLite path: {replay['broken_store_start_s']:.3f} s "
          f"(MLflow's own open retries: {replay['mlflow_open_retry_s']:.0f} s)")
    if demo:
        print("\nDemo trainer, 50 steps (MLflow metrics only)")
        for r in demo:
            print(f"{r['variant']:<26}{r['train_s']:>9.2f} s{r['overhead_pct']:>9.1f}%")

    print()
    write_json(args.out, "tracking.json", {
        "machine": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
        "torch": torch.__version__, "mlflow": mlflow.__version__, "steps": args.steps, "repeats": args.repeats,
        "loop": rows, "replay": replay, "demo": demo,
    })


if __name__ == "__main__":
    main()
