"""rl2fx's open ``PPOTrainer`` against TRL's ``GRPOTrainer``: time per step, peak memory, start-up, reward curve.

Both trainers get the same work (issue 20, item 3):

* the demo's model, a fresh copy per run: ``build_tiny_lm(len(tok), seed=0, **model section of
  rl2fx/configs/demo.yaml)`` (a 2-layer Llama, hidden 64) with ``build_tokenizer()``;
* the same data: a ``datasets.Dataset`` of the 100 digit-reversal prompts ``"<bos> d1 d2 :"`` (text,
  which both trainers tokenise to the demo's ids ``[1, 3+d1, 3+d2, 13]``; checked below) with an
  ``answer`` column, shuffled by each trainer's own sampler;
* one reward function ``digit_reward(prompts, completions, answer)``: the fraction of answer digits
  in place in the decoded completion (the demo task's reward, on text);
* 8 prompts x 8 completions per step, one optimizer step per batch (TRL:
  ``per_device_train_batch_size=64``, ``gradient_accumulation_steps=1``, so ``steps_per_generation=1``
  and ``generation_batch_size=64``; ``num_iterations=1``), at most answer length + 1 = 3 new tokens,
  temperature 1, top-k 0, top-p 1, AdamW (torch, unfused) at the demo's ``actor.lr`` = 1e-3 with a
  constant schedule, gradient norm clipped at 1, clip ratio 0.2, float32;
* no KL term and no reference model (TRL ``beta=0``; rl2fx ``actor.kl.coef=0``, no adaptive KL,
  ``trainer.log_kl=false``), GRPO advantages ``(r - mean_g) / (std_g + 1e-4)`` with the unbiased
  group std (TRL ``scale_rewards="group"``; rl2fx ``adv.estimator=grpo``, ``adv.grpo.eps=1e-4``);
* the same loss aggregation: rl2fx ``trainer.agg_mode=token-mean`` (the masked token sum over the
  batch's token count) is TRL's ``loss_type="dapo"`` with one process and no accumulation
  (normaliser = ``num_items_in_batch``, the active tokens of the batch), and equal to ``"bnpo"``;
* the same forward passes: a prefill and one cached forward per new token to sample (TRL through
  ``model.generate``; rl2fx through its own copy of ``generate``'s sampling loop, which draws the same
  tokens from the same RNG state, see ``tests/test_rollout.py``), then one forward and backward for
  the loss; both compute the token entropy there (logged, not in the loss); neither runs an
  old-log-prob forward (one update on on-policy data: the loss's own detached log-probs) nor a
  reference forward; TRL's default ``gradient_checkpointing=True`` is turned off (rl2fx's
  ``memory_optimization`` is off), and both use the same unfused ``torch.optim.AdamW``;
* no tracking (TRL ``report_to="none"``; rl2fx ``experiment_tracking.enabled=false``), no progress
  bar, no checkpoints in the timed region (TRL ``save_strategy="no"``; rl2fx writes its final
  checkpoint and model after the last step, outside the timed steps), TRL logs every step.

Each (library, seed) runs in a fresh subprocess with one torch thread (``OMP_NUM_THREADS=1``), the
libraries interleaved seed by seed. Per run: start-up (constructing the trainer until the start of
the first step, i.e. ``on_train_begin``), time per step (intervals between consecutive
``on_step_end`` callbacks; median over the steps after the first 2; wall and process CPU time, the
latter less sensitive to other processes on a shared machine), peak RSS (``ru_maxrss`` at the
end) and its increase over the RSS after the imports, and the mean reward of every step. Ratios are
given both of the means over seeds and as the median of the per-seed ratios (each seed's two runs
are back to back, so a change in the machine's load affects both).

    PYTHONPATH=. python benchmarks/trainer.py            # 10 seeds x 30 steps
    PYTHONPATH=. python benchmarks/trainer.py --quick    # 2 seeds x 8 steps

Prints a table; writes ``outputs/benchmarks/trainer.json`` (``--out DIR`` to change the directory).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import add_out_argument, write_json

os.environ.setdefault("OMP_NUM_THREADS", "1")

LIBRARIES = ("rl2fx", "trl")
N_PROMPTS, N_GENERATIONS, N_DIGITS = 8, 8, 2
CLIP, MAX_GRAD_NORM, GRPO_EPS = 0.2, 1.0, 1e-4
SKIP_STEPS = 2  # steps left out of the time per step (warm-up)
LAST_STEPS = 10  # final reward: mean over these last steps


# ---------------------------------------------------------------------------- the shared setup
def digit_reward(prompts: list[str], completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    """Fraction of the answer's digits in place in the completion (whitespace-separated tokens).

    >>> digit_reward(["<bos> 3 1 :"] * 3, ["1 3", "1 4", ""], ["1 3"] * 3)
    [1.0, 0.5, 0.0]
    """
    out = []
    for completion, want in zip(completions, answer, strict=True):
        got, ref = completion.split(), want.split()
        out.append(sum(1 for i, d in enumerate(ref) if i < len(got) and got[i] == d) / len(ref))
    return out


def rows() -> list[dict[str, str]]:
    """Every 2-digit reversal prompt with its answer (the demo's task, ``mode: reverse``)."""
    return [{"prompt": f"<bos> {a} {b} :", "answer": f"{b} {a}"} for a in range(10) for b in range(10)]


def demo_settings() -> tuple[dict[str, Any], float]:
    """The demo config's ``model`` section (as :func:`build_tiny_lm` keywords) and ``actor.lr``."""
    from rl2fx.trainer.config import load_config

    cfg = load_config("demo")
    m = cfg.model
    arch = dict(arch=m.arch, hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                intermediate_size=m.intermediate_size, max_position_embeddings=m.max_position_embeddings)
    return arch, float(cfg.actor.lr)


def setup() -> tuple[Any, Any, Any]:
    """A fresh model, the tokenizer and the prompt data set (identical in both workers)."""
    from datasets import Dataset

    from rl2fx.trainer.tasks import build_tiny_lm, build_tokenizer

    tok = build_tokenizer()
    arch = ast.literal_eval(os.environ["RL2FX_BENCH_ARCH"])  # the demo model section, from the driver
    model = build_tiny_lm(len(tok), seed=0, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, **arch)
    data = rows()
    for r in data[:3]:  # both trainers encode text prompts with the tokenizer's default special tokens
        a, b = r["prompt"].split()[1:3]
        want = [1, 3 + int(a), 3 + int(b), 13]
        for special in (True, False):
            got = tok(r["prompt"], add_special_tokens=special)["input_ids"]
            if got != want:
                raise SystemExit(f"prompt {r['prompt']!r} encodes to {got} (add_special_tokens={special}), "
                                 f"not the demo's {want}")
    return model, tok, Dataset.from_list(data)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------------------- workers
class _Clock:
    """Wall and process-CPU time at each training callback (train begin, then every step end), and the rewards."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.cpu: list[float] = []
        self.rewards: list[float] = []

    def tick(self) -> None:
        self.marks.append(time.perf_counter())
        self.cpu.append(time.process_time())


def run_rl2fx(seed: int, steps: int, lr: float) -> dict[str, Any]:
    import torch

    from rl2fx.trainer.config import load_config
    from rl2fx.trainer.ppo import PPOTrainer

    torch.set_num_threads(1)
    base = _rss_mib()
    model, tok, ds = setup()
    clock = _Clock()

    class Timer:
        def on_train_begin(self, trainer: Any) -> None:
            clock.tick()

        def on_step_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
            clock.tick()
            clock.rewards.append(float(metrics["reward"]))

    with tempfile.TemporaryDirectory(prefix="rl2fx-bench-") as out:
        cfg = load_config("demo", overrides={
            "trainer.total_steps": steps, "trainer.seed": seed, "trainer.num_threads": 1,
            "trainer.progress_bar": False, "trainer.output_dir": out, "trainer.save_interval": 0,
            "trainer.log_kl": False, "trainer.agg_mode": "token-mean", "trainer.max_grad_norm": MAX_GRAD_NORM,
            "trainer.update_epochs": 1, "trainer.micro_batch_size": None, "trainer.weight_decay": 0.0,
            "trainer.entropy_coef": 0.0,
            "actor.lr": lr, "actor.clip": CLIP, "actor.kl.coef": 0.0, "actor.kl.adaptive_kl.enabled": False,
            "adv.estimator": "grpo", "adv.grpo.eps": GRPO_EPS,
            "data.prompts_per_rollout": N_PROMPTS, "data.responses_per_prompt": N_GENERATIONS,
            "rollout.max_new_tokens": N_DIGITS + 1, "rollout.temperature": 1.0, "rollout.top_k": 0,
            "rollout.top_p": 1.0,
            "memory_optimization.enabled": False, "memory_optimization.profiling.enabled": False,
            "experiment_tracking.enabled": False,
        })
        t0 = time.perf_counter()
        trainer = PPOTrainer(cfg, model=model, tokenizer=tok, reward_funcs=[digit_reward], train_dataset=ds,
                             callbacks=[Timer()])
        trainer.train()
        extra = {"old_logprob_forward": trainer.needs.old, "reference_forward": trainer.needs.ref}
    return _result(t0, clock.marks, clock.cpu, clock.rewards, base, extra)


def run_trl(seed: int, steps: int, lr: float) -> dict[str, Any]:
    import torch
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    base = _rss_mib()
    model, tok, ds = setup()
    clock = _Clock()

    class Timer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.tick()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.tick()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and "reward" in logs:
                clock.rewards.append(float(logs["reward"]))

    with tempfile.TemporaryDirectory(prefix="trl-bench-") as out:
        args = GRPOConfig(
            output_dir=out, max_steps=steps, seed=seed, use_cpu=True, bf16=False, fp16=False,
            per_device_train_batch_size=N_PROMPTS * N_GENERATIONS, gradient_accumulation_steps=1,
            num_generations=N_GENERATIONS, num_iterations=1, max_completion_length=N_DIGITS + 1,
            temperature=1.0, top_k=0, top_p=1.0,
            learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            optim="adamw_torch", max_grad_norm=MAX_GRAD_NORM, epsilon=CLIP,
            beta=0.0, scale_rewards="group", loss_type="dapo",
            gradient_checkpointing=False,  # TRL's default is True: recomputation rl2fx (memory_optimization off) skips
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
            dataloader_num_workers=0, remove_unused_columns=False,
        )
        if args.generation_batch_size != N_PROMPTS * N_GENERATIONS or args.steps_per_generation != 1:
            raise SystemExit(f"TRL batch: generation_batch_size={args.generation_batch_size}, "
                             f"steps_per_generation={args.steps_per_generation}; want 64 and 1")
        t0 = time.perf_counter()
        trainer = GRPOTrainer(model=model, reward_funcs=[digit_reward], args=args, train_dataset=ds,
                              processing_class=tok, callbacks=[Timer()])
        trainer.train()
        extra = {"reference_model": trainer.ref_model is not None}
    return _result(t0, clock.marks, clock.cpu, clock.rewards, base, extra)


def _result(t0: float, marks: list[float], cpu: list[float], rewards: list[float], base: float,
            extra: dict[str, Any]) -> dict[str, Any]:
    steps = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
    cpu_steps = [b - a for a, b in zip(cpu[:-1], cpu[1:], strict=True)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"startup_s": marks[0] - t0, "step_s": steps, "step_cpu_s": cpu_steps, "rewards": rewards, "peak_rss_mib": peak,
            "baseline_rss_mib": base, "rss_increase_mib": peak - base, **extra}


def worker(lib: str, seed: int, steps: int, lr: float, result: str) -> None:
    res = (run_rl2fx if lib == "rl2fx" else run_trl)(seed, steps, lr)
    write_json(Path(result).parent, Path(result).name, res)  # the worker's result, read back by the driver


# ---------------------------------------------------------------------------- driver
def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _machine() -> str:
    from rl2fx.tracking.system import cpu_model

    cpu = cpu_model()
    import torch
    import transformers
    import trl

    return (f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"trl {trl.__version__}")


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=10, help="runs per library (seeds 0..N-1)")
    ap.add_argument("--steps", type=int, default=30, help="training steps per run")
    ap.add_argument("--quick", action="store_true", help="2 seeds x 8 steps")
    add_out_argument(ap)
    ap.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.seed, args.steps, args.lr, args.result)
        return
    if args.quick:
        args.seeds, args.steps = 2, 8
    if args.steps <= SKIP_STEPS:
        raise SystemExit(f"--steps must be > {SKIP_STEPS} (the first {SKIP_STEPS} steps are warm-up), got {args.steps}")
    arch, lr = demo_settings()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RL2FX_BENCH_ARCH": repr(arch),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    load_start = _load()
    t_all = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for lib in LIBRARIES:
                res_file = Path(tmp) / f"{lib}-{seed}.json"
                cmd = [sys.executable, __file__, "--worker", lib, "--seed", str(seed), "--steps", str(args.steps),
                       "--lr", repr(lr), "--result", str(res_file)]
                p = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
                if p.returncode != 0:
                    raise SystemExit(f"{lib} seed {seed} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
                res = {"library": lib, "seed": seed, **json.loads(res_file.read_text())}
                runs.append(res)
                t = statistics.median(res["step_s"][SKIP_STEPS:]) * 1e3
                c = statistics.median(res["step_cpu_s"][SKIP_STEPS:]) * 1e3
                print(f"{lib:5s} seed {seed}: {t:6.1f} ms/step ({c:5.1f} ms CPU), start-up {res['startup_s']:.2f} s, peak RSS "
                      f"{res['peak_rss_mib']:.0f} MiB, reward {statistics.fmean(res['rewards'][-LAST_STEPS:]):.3f}",
                      flush=True)
    last = min(LAST_STEPS, args.steps)
    summary: dict[str, dict[str, Any]] = {}
    for lib in LIBRARIES:
        rs = [r for r in runs if r["library"] == lib]
        step_ms = [statistics.median(r["step_s"][SKIP_STEPS:]) * 1e3 for r in rs]
        cpu_ms = [statistics.median(r["step_cpu_s"][SKIP_STEPS:]) * 1e3 for r in rs]
        curve = [statistics.fmean(r["rewards"][i] for r in rs) for i in range(args.steps)]
        summary[lib] = {
            "step_ms": _mean_std(step_ms), "step_cpu_ms": _mean_std(cpu_ms), "peak_rss_mib": _mean_std([r["peak_rss_mib"] for r in rs]),
            "rss_increase_mib": _mean_std([r["rss_increase_mib"] for r in rs]),
            "startup_s": _mean_std([r["startup_s"] for r in rs]),
            "final_reward": _mean_std([statistics.fmean(r["rewards"][-last:]) for r in rs]),
            "first_reward": _mean_std([r["rewards"][0] for r in rs]),
            "reward_curve": curve,
        }
    a, b = summary["rl2fx"], summary["trl"]
    ratios = {k: a[k][0] / b[k][0] for k in ("step_ms", "step_cpu_ms", "peak_rss_mib", "rss_increase_mib", "startup_s")}

    def per_seed(key: str) -> list[float]:
        by = {(r["library"], r["seed"]): statistics.median(r[key][SKIP_STEPS:]) for r in runs}
        return [by[("rl2fx", s)] / by[("trl", s)] for s in range(args.seeds)]

    paired = {"step_ms": statistics.median(per_seed("step_s")), "step_cpu_ms": statistics.median(per_seed("step_cpu_s"))}
    targets = {"step_ms <= 0.75x TRL": ratios["step_ms"] <= 0.75, "peak_rss <= TRL": ratios["peak_rss_mib"] <= 1.0}
    load_end = _load()
    cmd = "PYTHONPATH=. python benchmarks/trainer.py" + (" --quick" if args.quick else
                                                         f" --seeds {args.seeds} --steps {args.steps}")
    lines = [f"| library | time/step (ms) | ratio | CPU time/step (ms) | ratio | peak RSS (MiB) | ratio | RSS increase (MiB) | ratio | "
             f"start-up (s) | ratio | reward, first step | reward, last {last} steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for lib, name in (("rl2fx", "rl2fx PPOTrainer"), ("trl", "TRL GRPOTrainer")):
        s = summary[lib]

        def cell(k: str, fmt: str, s: dict[str, Any] = s) -> str:
            return f"{s[k][0]:{fmt}} ± {s[k][1]:{fmt}}"

        def ratio(k: str, lib: str = lib) -> str:
            return f"{ratios[k]:.2f}x" if lib == "rl2fx" else "1"

        lines.append(f"| {name} | {cell('step_ms', '.1f')} | {ratio('step_ms')} | {cell('step_cpu_ms', '.1f')} | "
                     f"{ratio('step_cpu_ms')} | {cell('peak_rss_mib', '.0f')} | "
                     f"{ratio('peak_rss_mib')} | {cell('rss_increase_mib', '.0f')} | {ratio('rss_increase_mib')} | "
                     f"{cell('startup_s', '.2f')} | {ratio('startup_s')} | {cell('first_reward', '.3f')} | "
                     f"{cell('final_reward', '.3f')} |")
    table = "\n".join(lines)
    print(f"\n{table}\n\n{args.seeds} seeds x {args.steps} steps; time/step: median over steps {SKIP_STEPS + 1}.."
          f"{args.steps} per run, mean ± std over runs; load average {load_start} at start, {load_end} at end")
    print(f"median of per-seed ratios rl2fx/TRL: time/step {paired['step_ms']:.2f}x, CPU time/step "
          f"{paired['step_cpu_ms']:.2f}x")
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in targets.items()))
    print("reward curve (mean over seeds), rl2fx: " + " ".join(f"{x:.2f}" for x in a["reward_curve"]))
    print("reward curve (mean over seeds), TRL:   " + " ".join(f"{x:.2f}" for x in b["reward_curve"]))
    out = {"command": cmd, "machine": _machine(), "load_average_start": load_start, "load_average_end": load_end,
           "seeds": args.seeds, "steps": args.steps, "skip_steps": SKIP_STEPS, "last_steps": last,
           "wall_s": time.perf_counter() - t_all, "summary": summary, "ratios": ratios, "paired_ratios": paired, "targets": targets,
           "table": table, "runs": runs}
    write_json(args.out, "trainer.json", out, indent=1)


if __name__ == "__main__":
    main()
