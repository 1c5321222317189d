"""Peak memory and time of chunked vs naive token log-probs + entropy (forward and backward).

Naive: ``log_softmax(logits.float())``, gather, entropy from the full ``[B, T, V]``
float32 log-probs (what most RL code does). Chunked: :func:`rl2fx.logprobs.token_logprobs_and_entropy`.
Peak memory is the exact tensor high-water mark of the step above the resident
logits (rl2fx.memory's TensorMemoryTracker, a dispatch-mode tracker; on CUDA the
allocator's peak counter is reported too). The logits are bf16 (as a model in
mixed precision produces them) and their gradient is the same size either way.

    PYTHONPATH=. python benchmarks/logprobs.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rl2fx.logprobs import naive_logprobs_and_entropy, token_logprobs_and_entropy
from rl2fx.memory.profiler import TensorMemoryTracker


def _step(fn, logits, labels, w):
    lp, ent = fn(logits, labels)
    (lp * w + 0.01 * ent * w).sum().backward()


def measure(name, fn, b, t, v, device, repeats):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(b, t, v, generator=g).to(device=device, dtype=torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, v, (b, t), generator=g).to(device)
    w = torch.randn(b, t, generator=g).to(device)
    _step(fn, logits, labels, w)  # warm-up
    logits.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with TensorMemoryTracker() as tracker:
        _step(fn, logits, labels, w)
    logits.grad = None
    cuda_peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        cuda_peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _step(fn, logits, labels, w)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        logits.grad = None
    return {"impl": name, "device": device, "batch": b, "time": t, "vocab": v,
            "logits_MiB": logits.numel() * 2 / 2**20, "peak_MiB": tracker.peak_bytes / 2**20,
            "cuda_peak_MiB": None if cuda_peak is None else cuda_peak / 2**20, "ms": 1e3 * min(times)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/logprobs.json")
    args = ap.parse_args()
    shapes = [(2, 256, 32000)] if args.quick else [(2, 256, 32000), (4, 512, 32000), (1, 512, 151936)]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    impls = {
        "naive (full log_softmax)": lambda x, y: naive_logprobs_and_entropy(x, y),
        "chunked (rl2fx, chunk=256)": lambda x, y: token_logprobs_and_entropy(x, y, chunk_size=256),
    }
    rows = []
    for device in devices:
        for b, t, v in shapes:
            for name, fn in impls.items():
                rows.append(measure(name, fn, b, t, v, device, 1 if args.quick else 3))
    hdr = f"{'device':6} {'B x T x V':>18} {'impl':28} {'logits MiB':>10} {'peak MiB':>9} {'ms':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        shape = f"{r['batch']}x{r['time']}x{r['vocab']}"
        print(f"{r['device']:6} {shape:>18} {r['impl']:28} {r['logits_MiB']:10.1f} {r['peak_MiB']:9.1f} {r['ms']:8.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": "see docs/training.md", "rows": rows}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
