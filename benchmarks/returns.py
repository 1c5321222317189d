"""GAE end to end: rl2fx backends vs a Python loop, TorchRL and the memory floor, in one run.

    PYTHONPATH=. python benchmarks/returns.py            # full: 64x1024, 256x4096, 1024x8192
    PYTHONPATH=. python benchmarks/returns.py --quick    # one small shape, few repeats

Every method computes GAE advantages and value targets (gamma=0.99, lamda=0.95,
float32) for the same rewards/values/bootstrap, with and without an action mask
(masked-out steps are skipped, RL2 style). Before timing, each method's output is
checked against rl2fx's loop backend. Reported: median wall time over repeats,
speed-up over the Python loop (``x loop``), cost relative to one elementwise
pass over the same tensors (``x floor``, ``rewards + gamma * values``: the least
any estimator must do is read its inputs and write its output once) and minor
page faults per call (``faults``: fresh pages touched for the first time, when
the C allocator has handed freed memory back to the OS; each costs microseconds).

The compiled backend's one-off compile cost is timed separately (first call per
shape family) and never mixed into the medians. On a CUDA device the same table
is produced for the GPU, with achieved bandwidth (bytes read + written by GAE /
time) against the device's copy bandwidth and its spec-sheet peak.

Results go to <--out DIR>/returns.json (returns_scan.json with --scan; default outputs/benchmarks,
``--out benchmarks/results`` rewrites the committed ones).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
from _results import add_out_argument, write_json

from rl2fx.returns import gae, reverse_scan

GAMMA, LAMDA = 0.99, 0.95
SHAPES = [(64, 1024), (256, 4096), (1024, 8192)]
QUICK_SHAPES = [(64, 1024)]
RL2FX_BACKENDS = ("loop", "chunked", "compiled", "auto")
# TorchRL's vectorised GAE with per-step discounts builds [B, T, T] tensors; refuse
# above this many bytes (a few such tensors are alive at once).
VEC_MEMORY_CAP = 2 * 1024**3

# Spec-sheet DRAM bandwidth (GB/s) for the GPUs we expect; matched by substring.
GPU_PEAK_GBS = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "L4": 300,
    "A10G": 600,
    "A10": 600,
    "RTX 4090": 1008,
    "RTX 3090": 936,
    "RTX 2000 Ada": 224,
    "V100": 900,
    "T4": 320,
}


# ----------------------------------------------------------------- methods


def python_loop_gae(r, v, boot, mask):
    """The textbook loop (CleanRL style), vectorised over batch, one Python step per time step."""
    T = r.shape[-1]
    adv = torch.empty_like(r)
    last = torch.zeros_like(boot)
    v_next = boot
    gl = GAMMA * LAMDA
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + GAMMA * v_next - v[:, t]
        new = delta + gl * last
        if mask is None:
            last = new
            adv[:, t] = new
            v_next = v[:, t]
        else:
            m = mask[:, t]
            last = torch.where(m, new, last)
            adv[:, t] = torch.where(m, new, 0.0)
            v_next = torch.where(m, v[:, t], v_next)
    ret = adv + v
    if mask is not None:
        ret = torch.where(mask, ret, 0.0)
    return adv, ret


def torchrl_inputs(r, v, boot, mask):
    """TorchRL's layout: time_dim=-2, a trailing feature dim of 1.

    TorchRL has no action mask. Masked-out steps are made transparent the way
    rl2fx does it internally (reward, values 0; per-step gamma = lamda = 1, so the
    recursion carries through), with the next masked-in value precomputed; this
    preparation is not timed. Per-step discounts send the vectorised version to
    its [B, T, T] path.
    """
    if mask is None:
        v_next = torch.cat([v[:, 1:], boot[:, None]], -1)
        g, lam = GAMMA, LAMDA
        r_, v_, vn = r, v, v_next
    else:
        T = r.shape[-1]
        steps = torch.arange(T, device=mask.device).expand(mask.shape)
        idx = torch.where(mask, steps, T)
        nxt = (
            torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], T)], -1)
            .flip(-1)
            .cummin(-1)
            .values.flip(-1)
        )
        v_next = torch.cat([v, boot[:, None]], -1).gather(-1, nxt)
        r_ = torch.where(mask, r, 0.0)
        v_ = torch.where(mask, v, 0.0)
        vn = torch.where(mask, v_next, 0.0)
        one = torch.ones_like(r)
        g = torch.where(mask, GAMMA * one, one)[..., None]
        lam = torch.where(mask, LAMDA * one, one)[..., None]
    done = torch.zeros(r.shape + (1,), dtype=torch.bool, device=r.device)
    return dict(
        gamma=g,
        lmbda=lam,
        state_value=v_[..., None],
        next_state_value=vn[..., None],
        reward=r_[..., None],
        done=done,
        terminated=done.clone(),
    )


def make_torchrl(fn_name: str, r, v, boot, mask):
    from torchrl.objectives.value import functional as TF

    fn = getattr(TF, fn_name)
    kw = torchrl_inputs(r, v, boot, mask)

    def run():
        adv, ret = fn(**kw)
        adv, ret = adv[..., 0], ret[..., 0]
        if mask is not None:
            adv = torch.where(mask, adv, 0.0)
            ret = torch.where(mask, ret, 0.0)
        return adv, ret

    return run


# ----------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def keep_freed_memory() -> str:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS.

    By default glibc returns the top of the heap to the OS once more than a
    (dynamic) threshold is free, and serves multi-MB requests from fresh mmaps;
    which calls then pay first-touch page faults (~2,000 per call for two 4 MiB
    outputs, 2-6 ms here) depends on the order of earlier frees, not on the
    method. Fixing the thresholds (what jemalloc / tcmalloc, recommended by
    PyTorch's CPU tuning guide, do by design) times every method's steady state
    alike. ``--default-malloc`` skips this; the faults column shows the effect.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or platform.system() != "Linux":
        return "default (not glibc)"
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return "default (no mallopt)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_trim_threshold, ctypes.c_int(2**31 - 1)) and libc.mallopt(
        m_mmap_threshold, ctypes.c_int(32 * 1024**2)  # glibc's maximum
    )
    return "glibc, trim threshold 2 GiB, mmap threshold 32 MiB" if ok else "default (mallopt failed)"


MIN_TIME_S = 2.0
MAX_REPEATS = 300


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_it(
    fn: Callable[[], object],
    device,
    repeats: int,
    budget_s: float,
    faults: list | None = None,
    min_time_s: float = 0.0,
) -> list[float]:
    """Wall times (ms) of ``repeats`` calls after one warm-up, stopping early past ``budget_s``.

    ``faults`` (if given) receives the mean minor page faults per timed call: fresh
    pages touched for the first time, the allocator's share of the time.
    """
    fn()
    sync(device)
    times: list[float] = []
    f0 = minor_faults()
    start = time.perf_counter()
    # at least `repeats` calls, and fast methods keep going for MIN_TIME_S (up to
    # MAX_REPEATS calls): medians of a few millisecond-long calls on a shared
    # machine move by 30% from run to run, medians of hundreds do not
    while len(times) < MAX_REPEATS:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        elapsed = time.perf_counter() - start
        if len(times) >= 3 and elapsed > budget_s:
            break
        if len(times) >= repeats and elapsed > min_time_s:
            break
    if faults is not None:
        faults.append((minor_faults() - f0) / len(times))
    return times


def make_inputs(B: int, T: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g)
    v = torch.randn(B, T, generator=g)
    boot = torch.randn(B, generator=g)
    # LLM-style mask: a prompt prefix, then turns where environment tokens
    # (masked out) alternate with action tokens; about 35% of steps masked out
    mask = torch.ones(B, T, dtype=torch.bool)
    prompt = torch.randint(T // 16, T // 8 + 1, (B,), generator=g)
    mask &= torch.arange(T)[None, :] >= prompt[:, None]
    seg = max(T // 64, 4)
    env_seg = torch.rand(B, T // seg + 1, generator=g) < 0.3
    mask &= ~env_seg.repeat_interleave(seg, -1)[:, :T]
    mask[:, -1] = True
    return (r.to(device), v.to(device), boot.to(device), mask.to(device))


def close(a, b, scale) -> bool:
    return bool(((a - b).abs().max() / scale) < 1e-4)


def scan_operands(r, v, boot, mask):
    """The (x, c, mask) that gae hands the scan engine.

    Without a mask: x = the lambda-return input r_t + gamma (1 - lamda) V_{t+1}, c =
    gamma * lamda (a float). With a mask on CPU, gae scans K = G + a V along the
    decisions (x = r + a V, a = (1 - lamda) / lamda, the same float c, the mask), i.e.
    ``reverse_scan(x, c, mask=mask)``; on other devices it encodes masked-out steps
    as x = 0, c = 1 (a c tensor, no mask argument).
    """
    if mask is None:
        v_next = torch.cat([v[:, 1:], boot[:, None]], -1)
        return r + GAMMA * (1 - LAMDA) * v_next, GAMMA * LAMDA, None
    if r.device.type == "cpu":
        return r + (1 - LAMDA) / LAMDA * v, GAMMA * LAMDA, mask
    adv_inputs = torchrl_inputs(r, v, boot, mask)
    vn = adv_inputs["next_state_value"][..., 0]
    delta = torch.where(mask, r + GAMMA * vn - v, 0.0)
    return delta, torch.where(mask, GAMMA * LAMDA, 1.0), None


def build_methods(r, v, boot, mask, masked, B, T, args) -> dict[str, Callable[[], object] | str]:
    """Name -> zero-argument callable (or the reason it is skipped)."""

    def rl2fx_gae(backend: str):
        return lambda: gae(
            r, v, gamma=GAMMA, lamda=LAMDA, bootstrap_value=boot, mask=mask, backend=backend
        )

    methods: dict[str, Callable[[], object] | str] = {}
    methods["python loop"] = lambda: python_loop_gae(r, v, boot, mask)
    for b in RL2FX_BACKENDS:
        skip = b == "compiled" and args.no_compile
        methods[f"rl2fx {b}"] = "skipped: --no-compile" if skip else rl2fx_gae(b)
    # the engine alone, on the (x, c) that gae hands it: what the scan costs inside gae
    x_scan, c_scan, m_scan = scan_operands(r, v, boot, mask)
    methods["rl2fx scan only"] = lambda: reverse_scan(x_scan, c_scan, mask=m_scan)
    if args.no_torchrl:
        methods["torchrl loop"] = methods["torchrl vec"] = "skipped: --no-torchrl"
    else:
        methods["torchrl loop"] = make_torchrl("generalized_advantage_estimate", r, v, boot, mask)
        need = B * T * T * 4
        if masked and need > VEC_MEMORY_CAP:
            methods["torchrl vec"] = (
                f"skipped: per-step discounts need [B,T,T] tensors "
                f"({need / 1024**3:.1f} GiB each > {VEC_MEMORY_CAP / 1024**3:.0f} GiB cap)"
            )
        else:
            methods["torchrl vec"] = make_torchrl(
                "vec_generalized_advantage_estimate", r, v, boot, mask
            )
    methods["elementwise floor"] = lambda: torch.add(r, v, alpha=GAMMA)
    return methods


def bench_device(device, shapes, args, rows, meta):
    peak = None
    copy_gbs = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((p for k, p in GPU_PEAK_GBS.items() if k in name), None)
        big = torch.empty(256 * 1024**2 // 4, device=device)
        ts = time_it(lambda: big.clone(), device, 10, 5.0)
        copy_gbs = 2 * big.numel() * 4 / (statistics.median(ts) / 1e3) / 1e9
        del big
        meta["gpu"] = {"name": name, "spec_peak_GBps": peak, "copy_GBps": round(copy_gbs, 1)}
        print(
            f"GPU: {name}; clone bandwidth {copy_gbs:.0f} GB/s; spec peak {peak or 'unknown'} GB/s"
        )
    for B, T in shapes:
        r, v, boot, mask_all = make_inputs(B, T, device)
        for masked in (False, True):
            mask = mask_all if masked else None
            ref_adv, ref_ret = gae(
                r, v, gamma=GAMMA, lamda=LAMDA, bootstrap_value=boot, mask=mask, backend="loop"
            )
            scale = float(ref_adv.abs().max())
            methods = build_methods(r, v, boot, mask, masked, B, T, args)
            results: dict[str, dict] = {}
            for name, fn in methods.items():
                rec: dict = {"device": device.type, "B": B, "T": T, "mask": masked, "method": name}
                if isinstance(fn, str):
                    rec["skipped"] = fn
                    print(f"  {B}x{T} mask={masked} {name}: {fn}", flush=True)
                else:
                    if name == "rl2fx compiled" or (name == "rl2fx auto" and device.type == "cuda"):
                        # first call compiles (once per shape family): timed on its own
                        t0 = time.perf_counter()
                        fn()
                        sync(device)
                        rec["first_call_s"] = round(time.perf_counter() - t0, 2)
                    if name not in ("elementwise floor", "rl2fx scan only"):
                        adv, ret = fn()
                        rec["matches_reference"] = close(adv, ref_adv, scale) and close(
                            ret, ref_ret, scale
                        )
                    slow = name in ("python loop", "torchrl loop", "rl2fx loop")
                    reps = max(3, args.repeats // 3) if slow else args.repeats
                    nf: list[float] = []
                    ts = time_it(fn, device, reps, args.budget, nf, args.min_time)
                    rec["median_ms"] = statistics.median(ts)
                    rec["repeats"] = len(ts)
                    rec["faults_per_call"] = round(nf[0], 1)
                rows.append(rec)
                results[name] = rec
            base = results["python loop"].get("median_ms")
            floor = results["elementwise floor"]["median_ms"]
            bytes_moved = B * T * (4 * 4 + (1 if masked else 0))  # r, v in; adv, ret out; mask
            for rec in results.values():
                if "median_ms" in rec:
                    rec["x_loop"] = base / rec["median_ms"]
                    rec["x_floor"] = rec["median_ms"] / floor
                    if device.type == "cuda":
                        rec["GBps"] = bytes_moved / (rec["median_ms"] / 1e3) / 1e9
                        if peak:
                            rec["frac_peak"] = rec["GBps"] / peak


def print_table(rows, cuda: bool) -> str:
    head = f"{'device':6} {'B x T':>11} {'mask':>5} {'method':<18} {'median ms':>10} {'x loop':>8} {'x floor':>8} {'faults':>7}"
    if cuda:
        head += f" {'GB/s':>8} {'%peak':>6}"
    head += "  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = f"{r['B']}x{r['T']}"
        if "median_ms" not in r:
            lines.append(
                f"{r['device']:6} {shape:>11} {str(r['mask']):>5} {r['method']:<18} {'-':>10} {'':>8} {'':>8} {'':>7}  {r['skipped']}"
            )
            continue
        line = (
            f"{r['device']:6} {shape:>11} {str(r['mask']):>5} {r['method']:<18} {r['median_ms']:10.3f} "
            f"{r['x_loop']:8.1f} {r['x_floor']:8.1f} {r.get('faults_per_call', 0):7.0f}"
        )
        if cuda:
            line += f" {r.get('GBps', 0):8.1f} {100 * r.get('frac_peak', 0):6.1f}"
        notes = []
        if "first_call_s" in r:
            notes.append(f"first call {r['first_call_s']} s")
        if r.get("matches_reference") is False:
            notes.append("MISMATCH vs reference")
        line += "  " + "; ".join(notes)
        lines.append(line)
    return "\n".join(lines)


def accuracy_table() -> list[dict]:
    """float32 against float64 at T = 16384: the scan per backend, and GAE end to end.

    Error = max |y32 - y64| / max |y64| (relative to the output scale). A float c is
    compared at its float32 value, which is what every backend uses.
    """
    rows = []
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 16384, generator=g)
    skip = torch.rand(x.shape, generator=g) < 0.35
    cut = torch.rand(x.shape, generator=g) < 0.001
    runs = torch.where(skip, 1.0, torch.where(cut, 0.0, 0.9999))
    cases = {
        # (x, c, mask)
        "scan, c = 0.9999 (float)": (x, 0.9999, None),
        "scan, c = 0.9999 per step": (x, torch.full_like(x, 0.9999), None),
        "scan, c ~ U[0.99, 1] per step": (x, torch.rand(x.shape, generator=g) * 0.01 + 0.99, None),
        "scan, masked runs (c in {0.9999, 1, 0}, x = 0 where c = 1)": (
            torch.where(skip, 0.0, x),
            runs,
            None,
        ),
        # reverse_scan(x, c, mask=...) with a float c: the masked constant path
        "scan, mask=, c = 0.9999 (float): the masked constant path": (x, 0.9999, ~skip),
    }

    def err(y, ref):
        return float((y.double() - ref).abs().max() / ref.abs().max())

    for name, (xx, c, m) in cases.items():
        c64 = c.double() if isinstance(c, torch.Tensor) else float(torch.tensor(c))
        ref = reverse_scan(xx.double(), c64, mask=m, backend="loop")
        rec = {"case": name}
        for b in ("loop", "auto"):
            rec["default" if b == "auto" else b] = err(reverse_scan(xx, c, mask=m, backend=b), ref)
        rows.append(rec)
    # GAE end to end with gamma * lamda ~ 0.9999
    r = torch.randn(16, 16384, generator=g)
    v = torch.randn(16, 16384, generator=g)
    boot = torch.randn(16, generator=g)
    mask = ~skip
    for masked in (False, True):
        m = mask if masked else None
        kw = dict(gamma=0.99995, lamda=0.99995, bootstrap_value=boot, mask=m)
        # the float64 reference gets the coefficients float32 arithmetic uses: gamma
        # rounded to float32, and lamda such that gamma * lamda is the float32 c (the
        # rounding of c alone moves c**10000 by ~1e-5: an input difference, not error)
        g32 = float(torch.tensor(0.99995, dtype=torch.float32))
        c32 = float(torch.tensor(g32 * g32, dtype=torch.float32))
        kw64 = {**kw, "gamma": g32, "lamda": c32 / g32, "bootstrap_value": boot.double()}
        ref_adv, _ = gae(r.double(), v.double(), **kw64, backend="loop")
        rec = {"case": f"GAE advantages, gamma = lamda = 0.99995, {'mask' if masked else 'no mask'}"}
        for b in ("loop", "auto"):
            rec["default" if b == "auto" else b] = err(gae(r, v, **kw, backend=b)[0], ref_adv)
        rows.append(rec)
    return rows


SCAN_SHAPES = [(256, 16), (256, 64), (256, 256), (256, 1024), (256, 4096), (1024, 8192)]


def scan_table(args) -> list[dict]:
    """reverse_scan alone per backend and T (per-step c, the masked case): the data behind ``auto``."""
    rows = []
    shapes = SCAN_SHAPES[:4] if args.quick else SCAN_SHAPES
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for B, T in shapes:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(B, T, generator=g).to(device)
            c = (0.9 + 0.1 * torch.rand(B, T, generator=g)).to(device)
            rec = {"device": device.type, "B": B, "T": T}
            for b in ("loop", "chunked", "compiled"):
                if b == "compiled" and args.no_compile:
                    continue
                if b == "loop" and T * B > 256 * 4096 and device.type == "cpu":
                    reps = 3
                else:
                    reps = args.repeats
                ts = time_it(
                    lambda b=b, x=x, c=c: reverse_scan(x, c, backend=b), device, reps, args.budget
                )
                rec[b] = statistics.median(ts)
            print(
                f"{device.type:5} {B:5}x{T:<6} "
                + " ".join(
                    f"{k} {rec[k]:9.3f} ms" for k in ("loop", "chunked", "compiled") if k in rec
                ),
                flush=True,
            )
            rows.append(rec)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="one small shape, few repeats, no CPU compile"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="timed calls per method (default 15, quick 5)"
    )
    p.add_argument(
        "--budget", type=float, default=None, help="seconds per method before stopping early"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's default)"
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=None,
        help=f"seconds each fast method keeps repeating (default {MIN_TIME_S}, quick 0)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile backend")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's heap trimming on (see keep_freed_memory)",
    )
    p.add_argument("--no-torchrl", action="store_true", help="skip TorchRL")
    p.add_argument("--cpu-only", action="store_true")
    p.add_argument("--scan", action="store_true", help="only time reverse_scan per backend and T")
    p.add_argument(
        "--shapes", default=None, help="comma-separated BxT list (default 64x1024,256x4096,1024x8192)"
    )
    add_out_argument(p)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (5 if args.quick else 15)
    args.budget = args.budget or (3.0 if args.quick else 20.0)
    if args.min_time is None:
        args.min_time = 0.0 if args.quick else MIN_TIME_S
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = "default" if args.default_malloc else keep_freed_memory()
    if args.quick and not torch.cuda.is_available():
        args.no_compile = True  # a CPU compile takes a minute or more: not "quick"
    try:
        import torchrl  # noqa: F401
    except ImportError:
        print("torchrl not installed (pip install -e '.[bench]'): skipping TorchRL columns")
        args.no_torchrl = True

    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(n) for n in bt.split("x")) for bt in args.shapes.split(",")]
    meta = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gamma": GAMMA,
        "lamda": LAMDA,
        "dtype": "float32",
        "quick": args.quick,
        "allocator": allocator,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(
        f"torch {meta['torch']}, {meta['cpu_count']} CPUs, {meta['threads']} torch threads, "
        f"allocator: {allocator}"
    )
    if args.scan:
        rows = scan_table(args)
        write_json(args.out, "returns_scan.json", {"meta": meta, "rows": rows}, indent=1)
        return 0
    rows: list[dict] = []
    accuracy = accuracy_table()
    print("accuracy at T = 16384, float32 vs float64, relative to max|y| (target 1e-5):")
    for rec in accuracy:
        print(f"  {rec['case']:<62} loop {rec['loop']:.1e}  default {rec['default']:.1e}")
    bench_device(torch.device("cpu"), shapes, args, rows, meta)
    cuda = torch.cuda.is_available() and not args.cpu_only
    if cuda:
        gpu_shapes = shapes + ([(512, 4096)] if not args.quick else [])
        bench_device(torch.device("cuda"), gpu_shapes, args, rows, meta)
    table = print_table(rows, cuda)
    print()
    print(table)
    print()
    write_json(args.out, "returns.json", {"meta": meta, "rows": rows, "accuracy": accuracy}, indent=1)
    bad = [r for r in rows if r.get("matches_reference") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
