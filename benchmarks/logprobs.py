"""Peak memory and time of token log-probs + entropy, forward and backward, four ways.

Two sections.

``head`` (from the last hidden states through the LM head, the whole cost of
scoring a response): ``hidden [B, T, H]`` and the head ``W [V, H]`` are
resident (bf16, as a model in mixed precision holds them), the step computes
log-probs and entropies of ``T`` labels and backpropagates into both.

* naive: ``logits = h W^T``; ``log_softmax(logits.float())``, gather, entropy.
* TRL ``selective_log_softmax`` idea (reimplemented here, TRL not imported):
  ``logits = h W^T``; per batch row, gather minus ``logsumexp`` of the row
  (upcast to float32); entropy from a ``log_softmax`` over chunks of rows, as
  TRL's ``entropy_from_logits``.
* chunked (rl2fx today): ``logits = h W^T``, then
  :func:`rl2fx.logprobs.token_logprobs_and_entropy`.
* fused (rl2fx): :func:`rl2fx.logprobs.linear_logprobs_and_entropy`, no logits.

``logits`` (the older table): the logits are resident and only the
log-softmax part is measured (naive vs chunked).

Peak memory is the exact tensor high-water mark of the step above the resident
tensors (rl2fx.memory's TensorMemoryTracker, a dispatch-mode tracker; on CUDA
the allocator's peak counter too). Every path of the ``head`` section produces
``grad_W`` (as large as the head, its size is a column) and ``grad_h``. Times are the best of ``--repeats``
rounds, the cases interleaved within each round; the head section also times the
step under ``torch.no_grad()`` (how old and reference log-probs are computed).

    PYTHONPATH=. python benchmarks/logprobs.py [--quick] [--section head|logits|all] [--shapes 1x512]
        [--memory-shapes 4x512] [--repeats 3] [--out PATH]

Results go to ``<--out DIR>/logprobs.json`` (default ``outputs/benchmarks``; ``--out benchmarks/results``
rewrites the committed table).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
from _results import add_out_argument, write_json

from rl2fx.logprobs import (
    linear_logprobs_and_entropy,
    naive_logprobs_and_entropy,
    token_logprobs_and_entropy,
)
from rl2fx.memory.profiler import TensorMemoryTracker

MiB = 2**20


def _peak(step: Callable[[], None], device: str, clear: Callable[[], None]) -> tuple[float, float | None]:
    """(peak tracked MiB, CUDA allocator peak MiB or None) of one ``step``."""
    base = 0
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with TensorMemoryTracker() as tracker:
        step()
    clear()
    cuda_peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        cuda_peak = (torch.cuda.max_memory_allocated() - base) / MiB
    return tracker.peak_bytes / MiB, cuda_peak


def _time_rounds(cases: list[tuple[dict, Callable[[], None], Callable[[], None]]], key: str, device: str,
                 repeats: int) -> None:
    """Best-of-``repeats`` ms of each case's step into ``row[key]``, the cases interleaved round by round.

    Interleaving spreads a busy machine's slow spells over all cases instead of
    charging them to whichever case happened to run then.
    """
    best: list[float] = [float("inf")] * len(cases)
    for _ in range(repeats):
        for i, (_, step, clear) in enumerate(cases):
            t0 = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - t0)
            clear()
    for (row, _, _), t in zip(cases, best, strict=True):
        row[key] = 1e3 * t if repeats else None


# --- head section -------------------------------------------------------------------------------------------------


def head_naive(h, w, y):
    return naive_logprobs_and_entropy(h @ w.T, y)


def head_trl(h, w, y, entropy_rows: int = 128):
    """TRL's selective_log_softmax idea: gather, minus a row-by-row logsumexp; entropy over chunks of rows."""
    logits = h @ w.T
    lp = torch.stack([row.gather(-1, lab.unsqueeze(-1)).squeeze(-1).float() - torch.logsumexp(row.float(), dim=-1)
                      for row, lab in zip(logits, y, strict=True)])
    flat = logits.reshape(-1, logits.shape[-1])
    ents = []
    for s in range(0, flat.shape[0], entropy_rows):
        logp = torch.log_softmax(flat[s:s + entropy_rows].float(), dim=-1)
        ents.append(-(logp.exp() * logp).sum(-1))
    return lp, torch.cat(ents).reshape(y.shape)


def head_chunked(h, w, y, chunk: int = 256):
    return token_logprobs_and_entropy(h @ w.T, y, chunk_size=chunk)


def head_fused(h, w, y, chunk: int = 256):
    return linear_logprobs_and_entropy(h, w, None, y, chunk_size=chunk)


def setup_head(name, fn, b, t, hdim, v, device):
    """The row (with peak memory) and the training and no-grad steps of one head-section case."""
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(b, t, hdim, generator=g).to(device=device, dtype=torch.bfloat16).requires_grad_(True)
    w = (torch.randn(v, hdim, generator=g) / hdim**0.5).to(device=device, dtype=torch.bfloat16).requires_grad_(True)
    y = torch.randint(0, v, (b, t), generator=g).to(device)
    c = torch.randn(b, t, generator=g).to(device)

    def step():
        lp, ent = fn(h, w, y)
        (lp * c + 0.01 * ent * c).sum().backward()

    def infer():  # old / reference log-probs: no graph, no backward
        with torch.no_grad():
            fn(h, w, y)

    def clear():
        h.grad = w.grad = None

    peak, cuda_peak = _peak(step, device, clear)
    row = {"section": "head", "impl": name, "device": device, "batch": b, "time": t, "hidden": hdim, "vocab": v,
           "logits_MiB": b * t * v * 2 / MiB, "grad_W_MiB": v * hdim * 2 / MiB, "peak_MiB": peak,
           "cuda_peak_MiB": cuda_peak}
    return row, step, infer, clear


# --- logits section (the log-softmax alone, logits resident) ---------------------------------------------------


def setup_logits(name, fn, b, t, v, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(b, t, v, generator=g).to(device=device, dtype=torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, v, (b, t), generator=g).to(device)
    c = torch.randn(b, t, generator=g).to(device)

    def step():
        lp, ent = fn(logits, labels)
        (lp * c + 0.01 * ent * c).sum().backward()

    def clear():
        logits.grad = None

    peak, cuda_peak = _peak(step, device, clear)
    row = {"section": "logits", "impl": name, "device": device, "batch": b, "time": t, "vocab": v,
           "logits_MiB": logits.numel() * 2 / MiB, "peak_MiB": peak, "cuda_peak_MiB": cuda_peak}
    return row, step, clear


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes, one timed repeat")
    ap.add_argument("--section", choices=["head", "logits", "all"], default="all")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed rounds (default 3, 1 with --quick; 0: peak memory only)")
    ap.add_argument("--shapes", default=None, help="head section B x T list, timed and measured (default 1x512)")
    ap.add_argument("--memory-shapes", default=None,
                    help="head section B x T list, peak memory only (default 4x512; 'none' for none)")
    ap.add_argument("--hidden", type=int, default=896, help="hidden size of the head section (Qwen2.5-0.5B: 896)")
    add_out_argument(ap)
    args = ap.parse_args()
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    if args.section in ("head", "all"):
        v = 32000 if args.quick else 151936
        def parse(text, default):
            if text is None:
                return default
            return [] if text == "none" else [tuple(int(x) for x in bt.split("x")) for bt in text.split(",")]

        # a CPU step at 4 x 512 takes tens of seconds per case: that shape is measured for memory only
        timed = parse(args.shapes, [(1, 128)] if args.quick else [(1, 512)])
        untimed = parse(args.memory_shapes, [] if args.quick else [(4, 512)])
        shapes = [(bt, repeats) for bt in timed] + [(bt, 0) for bt in untimed]
        impls = {
            "naive (full log_softmax)": head_naive,
            "TRL selective_log_softmax": head_trl,
            "chunked (rl2fx today, 256)": head_chunked,
            "fused (rl2fx, chunk 256)": head_fused,
            "fused (rl2fx, chunk 128)": lambda h, w, y: head_fused(h, w, y, chunk=128),
            "fused (rl2fx, chunk 64)": lambda h, w, y: head_fused(h, w, y, chunk=64),
        }
        for device in devices:
            for (b, t), n_rounds in shapes:
                cases = [setup_head(name, fn, b, t, args.hidden, v, device) for name, fn in impls.items()]
                for row, *_ in cases:
                    print(f"  {device} {b}x{t} {row['impl']}: {row['peak_MiB']:.1f} MiB", flush=True)
                _time_rounds([(r, st, cl) for r, st, _, cl in cases], "ms", device, n_rounds)
                _time_rounds([(r, inf, cl) for r, _, inf, cl in cases], "no_grad_ms", device, n_rounds)
                rows += [r for r, *_ in cases]
    if args.section in ("logits", "all"):
        shapes3 = [(2, 256, 32000)] if args.quick else [(2, 256, 32000), (4, 512, 32000), (1, 512, 151936)]
        impls2 = {
            "naive (full log_softmax)": lambda x, y: naive_logprobs_and_entropy(x, y),
            "chunked (rl2fx, chunk=256)": lambda x, y: token_logprobs_and_entropy(x, y, chunk_size=256),
        }
        for device in devices:
            for b, t, v in shapes3:
                cases2 = [setup_logits(name, fn, b, t, v, device) for name, fn in impls2.items()]
                _time_rounds(cases2, "ms", device, repeats)
                rows += [r for r, *_ in cases2]

    head_rows = [r for r in rows if r["section"] == "head"]
    if head_rows:
        hdr = (f"{'device':6} {'B x T x H x V':>20} {'impl':28} {'logits MiB':>10} {'peak MiB':>9} "
               f"{'grad_W MiB':>10} {'ms':>8} {'vs today':>8} {'no-grad ms':>10} {'vs today':>8}")
        print("\nfrom hidden states (bf16 h and W resident; grads of both)")
        print(hdr)
        print("-" * len(hdr))
        for r in head_rows:
            today = next(x for x in head_rows if x["impl"].startswith("chunked") and x["device"] == r["device"]
                         and (x["batch"], x["time"]) == (r["batch"], r["time"]))
            shape = f"{r['batch']}x{r['time']}x{r['hidden']}x{r['vocab']}"
            cols = []
            for key in ("ms", "no_grad_ms"):
                cols.append("-" if r[key] is None else f"{r[key]:.0f}")
                cols.append("-" if r[key] is None or not today[key] else f"{r[key] / today[key]:.2f}x")
            print(f"{r['device']:6} {shape:>20} {r['impl']:28} {r['logits_MiB']:10.1f} {r['peak_MiB']:9.1f} "
                  f"{r['grad_W_MiB']:10.1f} {cols[0]:>8} {cols[1]:>8} {cols[2]:>10} {cols[3]:>8}")
    logit_rows = [r for r in rows if r["section"] == "logits"]
    if logit_rows:
        hdr = f"{'device':6} {'B x T x V':>18} {'impl':28} {'logits MiB':>10} {'peak MiB':>9} {'ms':>8}"
        print("\nfrom resident logits (bf16)")
        print(hdr)
        print("-" * len(hdr))
        for r in logit_rows:
            shape = f"{r['batch']}x{r['time']}x{r['vocab']}"
            ms = "-" if r["ms"] is None else f"{r['ms']:.1f}"
            print(f"{r['device']:6} {shape:>18} {r['impl']:28} {r['logits_MiB']:10.1f} {r['peak_MiB']:9.1f} {ms:>8}")
    meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "repeats": repeats, "see": "docs/performance.md"}
    write_json(args.out, "logprobs.json", {**meta, "rows": rows})


if __name__ == "__main__":
    main()
