"""Masked GAE on CPU: the shipped eager path vs the same math with Inductor-compiled pieces.

    PYTHONPATH=. python benchmarks/masked_compile.py            # 256x4096, 5 rounds
    PYTHONPATH=. python benchmarks/masked_compile.py --quick    # 64x1024, 2 rounds (own JSON)

Measures whether compiling the elementwise parts of the masked constant path
(:func:`rl2fx.returns._backends.masked.masked_const_scan_` and the K-form of
:func:`rl2fx.returns._backends.gae_const.k_form`) with ``torch.compile`` brings masked GAE under 10x the
elementwise floor, and what it costs. The 16-wide block products stay in BLAS
(Inductor does not vectorise 16-long reductions; see docs/performance.md):

* ``eager``: ``gae(..., mask=...)`` as shipped (``backend="auto"``);
* ``compiled pro/epi``: mask floats and both products eager; ``z = W m (r + a V)``
  (prologue) and ``A, G`` from the suffix sums (epilogue) compiled;
* ``compiled pro/epi/carries``: the float64 block-carry levels compiled as well.

Rounds interleave the methods (this machine's speed drifts by ~15% between runs);
the table gives the median over rounds of per-round medians, and the first-call
(compile) time separately. Every variant is checked against ``gae`` first. Results
go to <--out DIR>/masked_compile.json (masked_compile_quick.json with --quick; default
outputs/benchmarks, ``--out benchmarks/results`` rewrites the committed ones).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import add_out_argument, write_json  # noqa: E402
from returns import keep_freed_memory  # noqa: E402

from rl2fx.returns import gae  # noqa: E402
from rl2fx.returns._backends.masked import masked_carries, tri  # noqa: E402

GAMMA, LAMDA, L = 0.99, 0.95, 16
C = GAMMA * LAMDA
A_K = (1.0 - LAMDA) / LAMDA  # K_t = G_t + a V_t (see rl2fx.returns._backends.gae_const)
LOG_C = math.log(C)


def prologue(e, mu8, r, v):
    """z = W m x with W = exp(E), x = r + a V."""
    mf = mu8.to(torch.float32)
    return torch.exp(e) * mf * (r + A_K * v)


def epilogue(s, bk, e, mu8, v):
    """y = (s + B_k) m / W, then A = y - m V / lamda and G = y - a m V."""
    mf = mu8.to(torch.float32)
    n, k = bk.shape
    y = (s.view(n, k, L) + bk.unsqueeze(-1)).view(n, -1) * (mf * torch.exp(-e))
    return y - (mf / LAMDA) * v, y - (A_K * mf) * v


def carries(ys, lb, y_end):
    """The shipped carry stage on a copy of ``ys``: compiled, a function that overwrites
    its input pays for writing it back (measured no faster than eager that way)."""
    return masked_carries(ys.clone(), lb=lb, y_end=y_end)


def masked_gae(r, v, boot, mask, pro, epi, car):
    n, t_len = r.shape
    k = t_len // L
    mu8 = mask.view(torch.uint8)
    mf = mu8.to(torch.float32)
    e = torch.mm(mf.view(-1, L), tri(L, torch.float32, strict=False).t() * LOG_C).view(n, t_len)
    lb = e.view(n, k, L)[:, :, -1].to(torch.float64)
    z = pro(e, mu8, r, v)
    s = torch.mm(z.view(-1, L), tri(L, torch.float32, strict=False))
    ys = s.view(n, k, L)[:, :, 0].to(torch.float64)
    ys, bk = car(ys, lb, C * (boot / LAMDA).double())
    if not bool(torch.isfinite(ys.sum())):  # the shipped path's check, paid here too
        raise FloatingPointError("non-finite carries")
    return epi(s.view(n, t_len), bk.float(), e, mu8, v)


def median_ms(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    add_out_argument(ap)
    args = ap.parse_args()
    allocator = keep_freed_memory()
    torch.set_num_threads(args.threads)
    b, t_len = (64, 1024) if args.quick else (256, 4096)
    rounds, calls = (2, 10) if args.quick else (5, 50)
    g = torch.Generator().manual_seed(0)
    r = torch.randn(b, t_len, generator=g)
    v = torch.randn(b, t_len, generator=g)
    boot = torch.randn(b, generator=g)
    mask = torch.rand(b, t_len, generator=g) < 0.7

    def eager():
        return gae(r, v, bootstrap_value=boot, gamma=GAMMA, lamda=LAMDA, mask=mask)

    methods = {"elementwise floor": lambda: torch.add(r, v, alpha=GAMMA), "eager (auto)": eager}
    variants = {
        "compiled pro/epi": (
            torch.compile(prologue, dynamic=False),
            torch.compile(epilogue, dynamic=False),
            carries,
        ),
        "compiled pro/epi/carries": (
            torch.compile(prologue, dynamic=False),
            torch.compile(epilogue, dynamic=False),
            torch.compile(carries, dynamic=False),
        ),
    }
    ref = eager()
    first_call_s = {}
    for name, (pro, epi, car) in variants.items():
        t0 = time.perf_counter()
        out = masked_gae(r, v, boot, mask, pro, epi, car)
        first_call_s[name] = time.perf_counter() - t0
        err = max(float((o - q).abs().max()) for o, q in zip(out, ref, strict=True))
        scale = float(ref[0].abs().max())
        if not err <= 1e-5 * scale:
            raise SystemExit(f"{name}: max error {err:.3g} against gae (scale {scale:.3g})")
        methods[name] = lambda p=pro, e=epi, c=car: masked_gae(r, v, boot, mask, p, e, c)

    per_round: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            per_round[name].append(median_ms(fn, calls))
    floor = statistics.median(per_round["elementwise floor"])
    rows = []
    print(f"masked GAE {b}x{t_len} float32, {args.threads} threads, {rounds} rounds x {calls} calls ({allocator})")
    print(f"{'method':<26} {'median ms':>10} {'x floor':>8} {'first call s':>13}  rounds")
    for name, ms in per_round.items():
        med = statistics.median(ms)
        first = first_call_s.get(name)
        rows.append({"method": name, "median_ms": med, "x_floor": med / floor, "rounds_ms": ms, "first_call_s": first})
        first_txt = f"{first:13.2f}" if first is not None else f"{'':13}"
        print(f"{name:<26} {med:10.3f} {med / floor:8.1f} {first_txt}  " + " ".join(f"{x:.2f}" for x in ms))
    meta = {
        "shape": [b, t_len],
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "allocator": allocator,
        "rounds": rounds,
        "calls_per_round": calls,
    }
    print("first call: compile of what this process had not compiled yet (Inductor's on-disk cache may be warm)")
    write_json(args.out, "masked_compile_quick.json" if args.quick else "masked_compile.json",
               {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
