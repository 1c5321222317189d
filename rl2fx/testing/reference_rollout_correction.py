r"""Slow float64 references for :mod:`rl2fx.rollout_correction`: products and sums over each row's
masked-in tokens, as Yao et al. 2025 and verl's rollout-correction options define them."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ref_truncated_is_weights", "ref_masked_is", "ref_mismatch_metrics"]


def _rows(lp: Tensor, mu: Tensor, mask: Tensor | None):
    a, b = lp.double().tolist(), mu.double().tolist()
    m = [[True] * len(r) for r in a] if mask is None else (mask != 0).tolist()
    return a, b, m


def ref_truncated_is_weights(lp, mu, mask=None, *, level="token", cap=2.0):
    a, b, m = _rows(lp, mu, mask)
    out = []
    for ra, rb, rm in zip(a, b, m, strict=True):
        if level == "token":
            out.append([min(math.exp(x - y), cap) if k else 0.0 for x, y, k in zip(ra, rb, rm, strict=True)])
        else:
            prod = 1.0
            for x, y, k in zip(ra, rb, rm, strict=True):
                if k:
                    prod *= math.exp(x - y)
            out.append([min(prod, cap) if k else 0.0 for k in rm])
    return torch.tensor(out, dtype=torch.float64)


def ref_masked_is(lp, mu, mask=None, *, level="token", low=0.5, high=2.0):
    a, b, m = _rows(lp, mu, mask)
    out = []
    for ra, rb, rm in zip(a, b, m, strict=True):
        rho = [math.exp(x - y) for x, y in zip(ra, rb, strict=True)]
        if level == "token":
            out.append([k and low <= r <= high for r, k in zip(rho, rm, strict=True)])
            continue
        kept = [r for r, k in zip(rho, rm, strict=True) if k]
        stat = math.prod(kept)
        if level == "geometric":
            stat = stat ** (1 / len(kept)) if kept else 1.0
        out.append([k and low <= stat <= high for k in rm])
    return torch.tensor(out, dtype=torch.bool)


def ref_mismatch_metrics(lp, mu, mask=None, *, cap=2.0):
    a, b, m = _rows(lp, mu, mask)
    toks = [x - y for ra, rb, rm in zip(a, b, m, strict=True) for x, y, k in zip(ra, rb, rm, strict=True) if k]
    seqs = [[x - y for x, y, k in zip(ra, rb, rm, strict=True) if k] for ra, rb, rm in zip(a, b, m, strict=True)]
    seqs = [s for s in seqs if s]
    n = len(toks)
    if n == 0:
        return None
    rho = [math.exp(x) for x in toks]
    mean = sum(rho) / n
    return {
        "kl_k1": sum(-x for x in toks) / n,
        "kl_k3": sum(math.exp(x) - 1 - x for x in toks) / n,
        "log_ppl_diff": sum(sum(s) / len(s) for s in seqs) / len(seqs),
        "ratio_mean": mean,
        "ratio_std": math.sqrt(sum((r - mean) ** 2 for r in rho) / max(n - 1, 1)),
        "ratio_min": min(rho),
        "ratio_max": max(rho),
        "ratio_frac_high": sum(r > cap for r in rho) / n,
        "ratio_frac_low": sum(r < 1 / cap for r in rho) / n,
        "seq_log_ratio_mean": sum(sum(s) for s in seqs) / len(seqs),
        "seq_log_ratio_max": max(sum(s) for s in seqs),
        "ess": sum(rho) ** 2 / (n * sum(r * r for r in rho)),
    }
