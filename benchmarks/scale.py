"""Scale benchmark: per-rank memory of the policy's parameters, gradients and AdamW state,
one process against 2 processes under DDP and under FSDP2.

Each run builds the same randomly initialised ``LlamaForCausalLM`` from a ``LlamaConfig``
(nothing downloaded), prepares it with :func:`rl2fx.distributed.wrap_policy` (``single``,
``ddp`` or ``fsdp``, on the CPU), builds ``torch.optim.AdamW`` on the wrapped parameters and
takes one :func:`rl2fx.step.train_step` with :func:`rl2fx.step.make_ppo_loss` on a small
synthetic batch per rank (``ROWS`` sequences of ``PROMPT + RESP`` tokens). Then each rank
counts, exactly from the tensors it holds (``numel * element_size``; for FSDP2's ``DTensor``
parameters, gradients and optimizer states the local shard, ``to_local()``):

* params  the model's parameters,
* grads   their gradients (``.grad`` after the step),
* optim   the optimizer state tensors (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``).

Secondary columns: the process's resident set size after the step and its peak
(``resource.getrusage``). On the CPU they include the Python and torch runtime (a few
hundred MiB before any model exists: the ``start RSS`` column), activations, communication
buffers (DDP's gradient buckets, FSDP2's all-gathered blocks) and, for FSDP2, the full model
each rank builds before ``wrap_policy`` shards it; they are not the sharded figure.

The 2-process runs are 2 gloo processes under ``torchrun`` (``--worker`` mode of this
script); the single-process run is a fresh process too, so no run inherits another's peak.

    PYTHONPATH=. python benchmarks/scale.py            # 58 M-parameter Llama, about 4 min on 2 busy cores
    PYTHONPATH=. python benchmarks/scale.py --quick    # 1.4 M parameters, a minute (process start-up)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from _results import add_out_argument, write_json

from rl2fx.distributed import wrap_policy
from rl2fx.step import make_ppo_loss, train_step
from rl2fx.tracking.system import cpu_model

ROOT = Path(__file__).resolve().parents[1]
MIB = 2.0**20
#: Llama sizes: ``full`` is the table in docs/performance.md, ``quick`` a fast look, ``tiny`` the smoke test's.
SIZES: dict[str, dict[str, int]] = {
    "full": {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
             "num_attention_heads": 8},
    "quick": {"vocab_size": 4000, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
              "num_attention_heads": 4},
    "tiny": {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2},
}
#: (strategy, processes) of each run, the reference first.
RUNS: tuple[tuple[str, int], ...] = (("single", 1), ("ddp", 2), ("fsdp", 2))
ROWS, PROMPT, RESP = 2, 8, 24  # per rank: 2 sequences x 32 tokens, 24 of them response
LR = 1e-5


def build_model(size: str, seed: int = 0) -> torch.nn.Module:
    """The ``LlamaForCausalLM`` of ``SIZES[size]``, float32, random weights from ``seed`` (untied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=PROMPT + RESP, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg)


def parameter_count(size: str) -> int:
    """Parameters of ``build_model(size)``, from a model on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(size).parameters())


def synthetic_batch(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """``ROWS`` sequences of ``PROMPT + RESP`` random tokens, every response token masked in,
    random advantages (no old or reference log-probs: on-policy, no KL term)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (ROWS, PROMPT + RESP), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_ids": ids[:, PROMPT:],
            "response_mask": torch.ones(ROWS, RESP), "advantages": torch.randn(ROWS, RESP, generator=g)}


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of the part of ``t`` this rank holds: the local shard of a ``DTensor``, else all of it."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def _rss_now_mib() -> float:
    """The current resident set size (``VmRSS`` of ``/proc/self/status``; NaN where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MIB
    except OSError:
        pass
    return float("nan")


def _rss_peak_mib() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS; Linux updates it lazily (it can read a
    # few pages below the VmRSS just read), so the peak is at least the current RSS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mib = peak / MIB if sys.platform == "darwin" else peak * 1024 / MIB
    now = _rss_now_mib()
    return peak_mib if now != now else max(peak_mib, now)  # now != now: NaN, no /proc


def measure(strategy: str, size: str) -> dict[str, Any]:
    """One AdamW ``train_step`` of ``build_model(size)`` under ``strategy`` in this process; this rank's bytes.

    ``ddp`` and ``fsdp`` need ``torch.distributed`` initialised (every rank calls this). Returns
    the exact local bytes of parameters, gradients and optimizer state, their total, the
    process's RSS (MiB) at the start, after ``wrap_policy``, after the step and at its peak, and
    the step's loss and gradient norm.
    """
    import torch.distributed as dist
    import transformers.models.llama.modeling_llama  # noqa: F401  (the runtime counts in the start RSS)

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    rss_start = _rss_now_mib()
    model = wrap_policy(build_model(size), strategy, device="cpu")
    rss_wrapped = _rss_now_mib()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    batch = synthetic_batch(SIZES[size]["vocab_size"], seed=1 + rank)
    metrics = train_step(model, opt, batch, loss_fn=make_ppo_loss(), max_grad_norm=1.0)
    params = list(model.parameters())
    row = {
        "strategy": strategy, "rank": rank,
        "params_bytes": sum(local_bytes(p) for p in params),
        "grads_bytes": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optim_bytes": sum(local_bytes(v) for s in opt.state.values() for v in s.values()
                           if isinstance(v, torch.Tensor)),
        "grads_missing": sum(p.grad is None for p in params),
        "rss_start_mib": rss_start, "rss_wrapped_mib": rss_wrapped, "rss_after_mib": _rss_now_mib(),
        "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
    }
    row["rss_peak_mib"] = _rss_peak_mib()
    row["total_bytes"] = row["params_bytes"] + row["grads_bytes"] + row["optim_bytes"]
    return row


def _worker(strategy: str, size: str, result_dir: str) -> None:
    """``--worker`` mode: measure in this process (``torchrun`` rank, or alone for ``single``); rank 0 writes
    every rank's row to ``result_dir/<strategy>.json``."""
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if strategy == "single":
        write_json(result_dir, f"{strategy}.json", [measure(strategy, size)])
        return
    dist.init_process_group("gloo")
    try:
        row = measure(strategy, size)
        rows: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
        if dist.get_rank() == 0:
            write_json(result_dir, f"{strategy}.json", rows)
    finally:
        dist.destroy_process_group()


def run(strategy: str, world: int, size: str, timeout: float = 600) -> list[dict[str, Any]]:
    """Every rank's :func:`measure` row of ``strategy`` on ``world`` fresh processes (``torchrun`` if
    ``world > 1``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        args = [str(Path(__file__).resolve()), "--worker", strategy, "--size", size, "--result-dir", tmp]
        if world == 1:
            cmd = [sys.executable, *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out = Path(tmp) / f"{strategy}.json"
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{strategy} on {world} process(es) failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``ratio``: each row's params+grads+optim bytes over the single-process row's."""
    ref = next(r["total_bytes"] for r in rows if r["strategy"] == "single")
    for r in rows:
        r["ratio"] = r["total_bytes"] / ref


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'strategy':<8} {'world':>5} {'rank':>4} {'params MiB':>10} {'grads MiB':>9} {'optim MiB':>9} "
            f"{'total MiB':>9} {'ratio':>6} {'start RSS':>9} {'RSS after':>9} {'peak RSS':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['strategy']:<8} {r['world']:>5} {r['rank']:>4} {r['params_bytes'] / MIB:>10.1f} "
                     f"{r['grads_bytes'] / MIB:>9.1f} {r['optim_bytes'] / MIB:>9.1f} {r['total_bytes'] / MIB:>9.1f} "
                     f"{r['ratio']:>5.3f}x {r['rss_start_mib']:>9.0f} {r['rss_after_mib']:>9.0f} "
                     f"{r['rss_peak_mib']:>9.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small Llama (1.4 M parameters)")
    ap.add_argument("--worker", choices=[s for s, _ in RUNS], help=argparse.SUPPRESS)
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result-dir", help=argparse.SUPPRESS)
    add_out_argument(ap)  # writes scale.json there (scale_quick.json with --quick)
    args = ap.parse_args(argv)
    size = args.size or ("quick" if args.quick else "full")
    if args.worker:
        _worker(args.worker, size, args.result_dir)
        return 0
    n = parameter_count(size)
    print(f"{cpu_model()}, torch {torch.__version__}")
    print(f"LlamaForCausalLM {SIZES[size]}: {n:,} parameters ({n * 4 / MIB:.1f} MiB float32); "
          f"per rank {ROWS} sequences x {PROMPT + RESP} tokens, one AdamW step", flush=True)
    rows: list[dict[str, Any]] = []
    for strategy, world in RUNS:
        print(f"== {strategy} on {world} process(es)", flush=True)
        rows += [{**r, "world": world} for r in run(strategy, world, size)]
    add_ratios(rows)
    print(table(rows))
    print("params/grads/optim: exact bytes of the tensors each rank holds (FSDP2: local shards); RSS columns "
          "(MiB) include the Python/torch runtime, activations and communication buffers")
    fsdp = max(r["ratio"] for r in rows if r["strategy"] == "fsdp")
    print(f"fsdp on 2 ranks: {fsdp:.3f}x the single-process params+grads+optim (target <= 0.55x)")
    result = {
        "machine": cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
        "size": size, "config": SIZES[size], "parameters": n,
        "batch_per_rank": {"rows": ROWS, "prompt": PROMPT, "response": RESP}, "optimizer": "AdamW",
        "fsdp_ratio": fsdp, "rows": rows,
    }
    write_json(args.out, "scale.json" if size == "full" else f"scale_{size}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
