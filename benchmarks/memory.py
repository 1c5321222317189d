"""Memory benchmark: peak step memory and step time of memory techniques on a tiny Llama.

One run compares, on the same randomly initialised ``LlamaForCausalLM`` and the same batch,
a policy-gradient style step (token log-probs of the sampled tokens times an advantage,
backward):

* baseline        fp32, no checkpointing, log-probs from a full ``log_softmax`` of the logits
* checkpointing   transformers' own switch (MemoryOptimizer.optimize_model_memory)
* checkpointing (torch.utils.checkpoint) the generic path on the same decoder layers
* chunked log-probs  rl2fx.logprobs instead of the full float32 log_softmax (if present)
* mixed precision bf16 autocast (MemoryOptimizer.memory_efficient_forward)
* all together

Memory on CPU is measured exactly with rl2fx.memory.TensorMemoryTracker (bytes of tensors
the step allocates, live at the worst moment; weights excluded); on CUDA with
``torch.cuda.max_memory_allocated``. Time is the best of N untracked steps (process CPU
time on CPU, synchronised wall time on CUDA), the configs interleaved round by round.

    PYTHONPATH=. python benchmarks/memory.py            # full (~2-3 min on 2 cores)
    PYTHONPATH=. python benchmarks/memory.py --quick    # small, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable

import torch
from _results import add_out_argument, write_json

from rl2fx.memory.optimizer import MemoryOptimizer, disable_checkpointing, enable_checkpointing
from rl2fx.memory.profiler import TensorMemoryTracker
from rl2fx.testing.memory_models import tiny_llama

MIB = 2.0**20
HAS_LOGPROBS = importlib.util.find_spec("rl2fx.logprobs") is not None


def naive_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The usual way: a full float32 log_softmax over the vocabulary, then gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


LOGPROB_CHUNK = 32


def chunked_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """rl2fx.logprobs: float32 log-sum-exp per token, chunked over time (``LOGPROB_CHUNK``
    positions x the whole batch per chunk), softmax recomputed chunk by chunk in backward."""
    from rl2fx import logprobs as L

    return L.token_logprobs(logits, tokens, chunk_size=LOGPROB_CHUNK)


def make_step(model, optimizer: MemoryOptimizer | None, logprob_fn: Callable, ids, adv):
    def forward():
        if optimizer is not None:
            out = optimizer.memory_efficient_forward(model, {"input_ids": ids})
        else:
            out = model(input_ids=ids)
        logits = out.logits[:, :-1]
        logp = logprob_fn(logits, ids[:, 1:])
        return -(logp * adv).mean()

    return forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_memory(name: str, model, forward: Callable[[], torch.Tensor], device: torch.device) -> dict:
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        forward().backward()  # warm-up: cuBLAS workspaces and the allocator pool are one-off
        model.zero_grad(set_to_none=True)
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = forward()
        _sync(device)
        after_fwd = torch.cuda.memory_allocated() - base
        loss.backward()
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with TensorMemoryTracker() as tracker:
            loss = forward()
            after_fwd = tracker.current_bytes
            loss.backward()
        peak = tracker.peak_bytes
    loss_value = float(loss.detach())
    del loss
    model.zero_grad(set_to_none=True)
    return {"config": name, "device": str(device), "loss": loss_value,
            "after_forward_mib": after_fwd / MIB, "peak_mib": peak / MIB, "step_times_s": [],
            "step_cpu_times_s": []}


def time_step(model, forward: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward+backward."""
    model.zero_grad(set_to_none=True)
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    forward().backward()
    _sync(device)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    model.zero_grad(set_to_none=True)
    return dt, dc


def run(device: torch.device, sizes: dict, repeats: int) -> list[dict]:
    model = tiny_llama(hidden_size=sizes["hidden"], num_layers=sizes["layers"],
                       vocab_size=sizes["vocab"], max_positions=sizes["seq"]).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, sizes["vocab"], (sizes["batch"], sizes["seq"]), generator=g).to(device)
    adv = torch.randn(sizes["batch"], sizes["seq"] - 1, generator=g).to(device)

    plain = MemoryOptimizer(enable_gradient_checkpointing=False, enable_activation_checkpointing=False,
                            enable_mixed_precision=False, enable_cpu_offload=False)
    ckpt = MemoryOptimizer(enable_mixed_precision=False, enable_cpu_offload=False)
    amp = MemoryOptimizer(enable_gradient_checkpointing=False, enable_activation_checkpointing=False,
                          enable_mixed_precision=True, enable_cpu_offload=False)
    full = MemoryOptimizer(enable_mixed_precision=True, enable_cpu_offload=False)
    lp_fast = chunked_token_logprobs if HAS_LOGPROBS else None

    configs: list[tuple[str, MemoryOptimizer, Callable | None, str | None]] = [
        ("baseline", plain, naive_token_logprobs, None),
        ("checkpointing (transformers)", ckpt, naive_token_logprobs, "transformers"),
        ("checkpointing (torch.utils.checkpoint)", plain, naive_token_logprobs, "torch"),
        ("chunked log-probs", plain, lp_fast, None),
        ("mixed precision (bf16 autocast)", amp, naive_token_logprobs, None),
        ("all together", full, lp_fast, "transformers"),
    ]
    if device.type == "cuda":
        offload = MemoryOptimizer(enable_gradient_checkpointing=False,
                                  enable_activation_checkpointing=False,
                                  enable_mixed_precision=False, enable_cpu_offload=True)
        configs.insert(5, ("cpu offload (save_on_cpu)", offload, naive_token_logprobs, None))
    def prepare(ck: str | None) -> None:
        disable_checkpointing(model)
        if ck == "transformers":
            enable_checkpointing(model)
        elif ck == "torch":
            enable_checkpointing(model, prefer_transformers=False)

    active = []
    for name, opt, lp, ck in configs:
        if lp is None:
            print(f"  skipped {name}: rl2fx.logprobs not available", flush=True)
            continue
        active.append((name, make_step(model, opt, lp, ids, adv), ck))
    rows = []
    for name, step, ck in active:
        prepare(ck)
        rows.append(measure_memory(name, model, step, device))
        print(f"  {name:<40} peak {rows[-1]['peak_mib']:8.1f} MiB", flush=True)
    # Timing rounds interleave the configs, so load from other processes on a shared
    # machine spreads over all of them instead of landing on one.
    for _ in range(repeats):
        for row, (_name, step, ck) in zip(rows, active, strict=True):
            prepare(ck)
            wall, cpu = time_step(model, step, device)
            row["step_times_s"].append(wall)
            row["step_cpu_times_s"].append(cpu)
    for row in rows:
        # best-of-N, as timeit does: the least disturbed run is closest to the intrinsic cost.
        # On CPU the process CPU time is the figure compared: on a shared machine the wall
        # clock mostly measures the other tenants. On CUDA, wall time (synchronised).
        row["step_wall_s"] = min(row["step_times_s"])
        row["step_cpu_s"] = min(row["step_cpu_times_s"])
        row["step_s"] = row["step_wall_s"] if device.type == "cuda" else row["step_cpu_s"]
        print(f"  {row['config']:<40} step {row['step_s']:.3f} s (wall {row['step_wall_s']:.3f} s)",
              flush=True)
    disable_checkpointing(model)
    base = rows[0]
    for r in rows:
        r["peak_vs_baseline"] = r["peak_mib"] / base["peak_mib"]
        r["after_forward_vs_baseline"] = r["after_forward_mib"] / base["after_forward_mib"]
        r["time_vs_baseline"] = r["step_s"] / base["step_s"]
    return rows


def table(rows: list[dict]) -> str:
    head = ("| config | device | saved after forward (MiB) | peak step (MiB) | peak vs baseline "
            "| step time (s) | time vs baseline | wall (s) | loss |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['device']} | {r['after_forward_mib']:.1f} | {r['peak_mib']:.1f} "
            f"| {100 * (r['peak_vs_baseline'] - 1):+.0f}% | {r['step_s']:.3f} "
            f"| {100 * (r['time_vs_baseline'] - 1):+.0f}% | {r['step_wall_s']:.3f} | {r['loss']:.6f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, one timed repeat")
    add_out_argument(parser)  # writes memory.json there (memory_quick.json with --quick)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: CPU time is then a clean cost measure)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        sizes = dict(hidden=64, layers=2, vocab=512, batch=4, seq=128)
        repeats = 2
    else:
        # Narrow and long: activation bytes grow with tokens x width x layers while FLOPs grow
        # with tokens x width^2 x layers, so a narrow model reaches a few hundred MB of
        # activations at a step cost a shared 2-core machine can repeat.
        sizes = dict(hidden=64, layers=6, vocab=1024, batch=16, seq=256)
        repeats = 2
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    t0 = time.perf_counter()
    rows = []
    for device in devices:
        print(f"device {device}, sizes {sizes}", flush=True)
        rows += run(device, sizes, repeats)
    print()
    print(table(rows))
    result = {
        "benchmark": "memory",
        "quick": args.quick,
        "sizes": sizes,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "chunked_logprobs_available": HAS_LOGPROBS,
        "logprob_chunk_size": LOGPROB_CHUNK,
        "rows": rows,
        "wall_s": time.perf_counter() - t0,
    }
    print(f"\n{result['wall_s']:.0f} s")
    write_json(args.out, "memory_quick.json" if args.quick else "memory.json", result, indent=1)
    return result


if __name__ == "__main__":
    main()
