r"""Slow float64 reference loops for the policy losses of :mod:`rl2fx.policy_losses`, from the papers.

Each row is packed (only its masked-in tokens kept, in order), the paper's
per-sequence or per-token objective is evaluated with Python floats and
``math``, and the result is reduced by :func:`ref_aggregate`, a loop over rows.
Nothing is shared with the fast code. Every function returns the loss as a float.

>>> import torch
>>> ref_gspo(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -2.0]]), torch.tensor([[1.0, 1.0]]))
-1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "ref_aggregate",
    "ref_gspo",
    "ref_gspo_token_value",
    "ref_cispo",
    "ref_sapo",
    "ref_gmpo",
    "ref_clip_cov",
    "ref_kl_cov",
    "ref_dppo_tv",
    "ref_dppo_kl",
    "ref_dro",
    "ref_covariances",
]

Rows = list[list[float]]


def _rows(x: Tensor) -> Rows:
    return x.detach().to(torch.float64).reshape(-1, x.shape[-1]).tolist()


def _packed(logprobs: Tensor, old: Tensor, adv: Tensor, mask: Tensor | None) -> list[tuple[list[float], ...]]:
    """Per row: (logprobs, old_logprobs, advantages) of the masked-in tokens, in order."""
    lp, ol, ad = _rows(logprobs), _rows(old), _rows(adv)
    mk = [[1.0] * len(r) for r in lp] if mask is None else _rows(mask.to(torch.float64))
    out = []
    for a, b, c, m in zip(lp, ol, ad, mk, strict=True):
        keep = [t for t in range(len(m)) if m[t] != 0]
        out.append(([a[t] for t in keep], [b[t] for t in keep], [c[t] for t in keep]))
    return out


def ref_aggregate(
    per_token: Sequence[Sequence[float]], mode: str, *, time: int, normalizer: float | None = None,
    global_tokens: float | None = None, global_seqs: float | None = None,
) -> float:
    r"""Reduce packed per-token losses (one list per row) as :func:`rl2fx.losses.aggregate` defines each mode."""
    n_rows = len(per_token) if global_seqs is None else global_seqs
    total = sum(sum(r) for r in per_token)
    if mode == "token-mean":
        n_tok = sum(len(r) for r in per_token)
        return total / (max(n_tok, 1) if global_tokens is None else global_tokens)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / max(len(r), 1) for r in per_token) / n_rows
    if mode == "seq-mean-token-sum":
        return total / n_rows
    if mode == "seq-mean-token-sum-norm":
        return total / (n_rows * (time if normalizer is None else normalizer))
    if mode == "token-sum":
        return total
    raise ValueError(mode)


def _run(logprobs, old, adv, mask, row_fn: Callable, agg_mode: str, agg_kw: dict) -> float:
    per_token = [row_fn(*row) for row in _packed(logprobs, old, adv, mask)]
    return ref_aggregate(per_token, agg_mode, time=logprobs.shape[-1], **agg_kw)


def _clip(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def ref_gspo(logprobs, old_logprobs, advantages, mask=None, *, clip=3e-4, clip_high=4e-4,
             agg_mode="seq-mean-token-mean", **agg_kw) -> float:
    r"""GSPO (arXiv:2507.18071): :math:`s_i = \exp(\frac{1}{|y_i|}\sum_t \log\frac{\pi}{\pi_{old}})`,
    token loss :math:`-\min(s_i A_t, \mathrm{clip}(s_i, 1-\epsilon, 1+\epsilon_h) A_t)`."""
    hi = clip if clip_high is None else clip_high

    def row(lp, ol, ad):
        if not lp:
            return []
        s = math.exp(sum(a - b for a, b in zip(lp, ol, strict=True)) / len(lp))
        return [-min(s * a, _clip(s, 1 - clip, 1 + hi) * a) for a in ad]

    return _run(logprobs, old_logprobs, advantages, mask, row, agg_mode, agg_kw)


def ref_gspo_token_value(logprobs, old_logprobs, advantages, mask=None, **kw) -> float:
    r"""GSPO-token: its value equals GSPO's (:math:`s_{i,t} = s_i` numerically)."""
    return ref_gspo(logprobs, old_logprobs, advantages, mask, **kw)


def ref_cispo(logprobs, old_logprobs, advantages, mask=None, *, epsilon_low=None, epsilon_high=0.2,
              ratio_cap=None, agg_mode="token-mean", **agg_kw) -> float:
    r"""CISPO (arXiv:2506.13585): :math:`-\mathrm{clip}(r, 1-\epsilon_l, 1+\epsilon_h)\, A \log\pi`."""
    lo = 0.0 if epsilon_low is None else 1 - epsilon_low
    hi = 1 + epsilon_high if ratio_cap is None else ratio_cap

    def row(lp, ol, ad):
        return [-_clip(math.exp(a - b), lo, hi) * c * a for a, b, c in zip(lp, ol, ad, strict=True)]

    return _run(logprobs, old_logprobs, advantages, mask, row, agg_mode, agg_kw)


def ref_sapo(logprobs, old_logprobs, advantages, mask=None, *, tau_pos=1.0, tau_neg=1.05,
             agg_mode="seq-mean-token-mean", **agg_kw) -> float:
    r"""SAPO (arXiv:2511.20347): :math:`-\frac{4}{\tau}\sigma(\tau(r-1)) A`, :math:`\tau = \tau_{pos}` iff A > 0."""

    def row(lp, ol, ad):
        out = []
        for a, b, c in zip(lp, ol, ad, strict=True):
            tau = tau_pos if c > 0 else tau_neg
            out.append(-(4 / tau) / (1 + math.exp(-tau * (math.exp(a - b) - 1))) * c)
        return out

    return _run(logprobs, old_logprobs, advantages, mask, row, agg_mode, agg_kw)


def ref_gmpo(logprobs, old_logprobs, advantages, mask=None, *, clip=0.4, clip_high=None,
             agg_mode="seq-mean-token-mean", **agg_kw) -> float:
    r"""GMPO (arXiv:2507.20673) as the product form:
    :math:`-\{\prod_t |\min(\rho_t A, \mathrm{clip}(\rho_t, e^{-\epsilon}, e^{\epsilon_h}) A)|\}^{1/|o|}\,\mathrm{sgn}(A)`,
    A the row's mean advantage."""
    hi = clip if clip_high is None else clip_high

    def row(lp, ol, ad):
        if not lp:
            return []
        A = sum(ad) / len(ad)
        prod = 1.0
        for a, b in zip(lp, ol, strict=True):
            r = math.exp(a - b)
            prod *= abs(min(r * A, _clip(r, math.exp(-clip), math.exp(hi)) * A))
        sgn = (A > 0) - (A < 0)
        return [-(prod ** (1 / len(lp))) * sgn] * len(lp)

    return _run(logprobs, old_logprobs, advantages, mask, row, agg_mode, agg_kw)


def ref_covariances(logprobs, advantages, mask=None) -> list[float]:
    r""":math:`(\log\pi_t - \overline{\log\pi})(A_t - \bar A)` over the batch's masked-in tokens, row-major."""
    rows = _packed(logprobs, logprobs, advantages, mask)
    lps = [x for r in rows for x in r[0]]
    ads = [x for r in rows for x in r[2]]
    if not lps:
        return []
    ml, ma = sum(lps) / len(lps), sum(ads) / len(ads)
    return [(a - ml) * (c - ma) for a, c in zip(lps, ads, strict=True)]


def _split(flat: list, rows: list) -> list[list]:
    out, k = [], 0
    for r in rows:
        out.append(flat[k : k + len(r[0])])
        k += len(r[0])
    return out


def ref_clip_cov(logprobs, old_logprobs, advantages, mask=None, *, cov_ratio=2e-4, cov_low=1.0, cov_high=5.0,
                 generator=None, agg_mode="token-mean", **agg_kw) -> float:
    r"""Clip-Cov (arXiv:2505.22617): :math:`\lfloor rN\rfloor` tokens drawn uniformly (one
    ``torch.randperm`` over the candidates in row-major order) among those with
    :math:`\omega_{low} \le \mathrm{Cov} \le \omega_{high}` lose their term; the others keep :math:`-rA`."""
    rows = _packed(logprobs, old_logprobs, advantages, mask)
    cov = ref_covariances(logprobs, advantages, mask)
    cands = [i for i, c in enumerate(cov) if cov_low <= c <= cov_high]
    n_pick = int(cov_ratio * len(cov))
    perm = torch.randperm(len(cands), generator=generator).tolist()
    picked = {cands[j] for j in perm[:n_pick]}
    flags = _split([i in picked for i in range(len(cov))], rows)
    per_token = [
        [0.0 if f else -math.exp(a - b) * c for a, b, c, f in zip(*r, fl, strict=True)]
        for r, fl in zip(rows, flags, strict=True)
    ]
    return ref_aggregate(per_token, agg_mode, time=logprobs.shape[-1], **agg_kw)


def ref_kl_cov(logprobs, old_logprobs, advantages, mask=None, *, cov_ratio=2e-3, beta=1.0,
               agg_mode="token-mean", **agg_kw) -> float:
    r"""KL-Cov (arXiv:2505.22617): the :math:`\lfloor kN\rfloor` largest covariances (ties: earlier
    token first) add :math:`\beta|\log\pi - \log\pi_{old}|` to :math:`-rA`."""
    rows = _packed(logprobs, old_logprobs, advantages, mask)
    cov = ref_covariances(logprobs, advantages, mask)
    k = int(cov_ratio * len(cov))
    ranked = sorted(range(len(cov)), key=lambda i: (-cov[i], i))
    picked = set(ranked[:k])
    flags = _split([i in picked for i in range(len(cov))], rows)
    per_token = [
        [-math.exp(a - b) * c + (beta * abs(a - b) if f else 0.0) for a, b, c, f in zip(*r, fl, strict=True)]
        for r, fl in zip(rows, flags, strict=True)
    ]
    return ref_aggregate(per_token, agg_mode, time=logprobs.shape[-1], **agg_kw)


def _dppo(logprobs, old_logprobs, advantages, mask, outside, agg_mode, agg_kw) -> float:
    def row(lp, ol, ad):
        out = []
        for a, b, c in zip(lp, ol, ad, strict=True):
            out.append(0.0 if outside(math.exp(a), math.exp(b), c) else -math.exp(a - b) * c)
        return out

    return _run(logprobs, old_logprobs, advantages, mask, row, agg_mode, agg_kw)


def ref_dppo_tv(logprobs, old_logprobs, advantages, mask=None, *, delta=0.15, delta_high=None,
                agg_mode="token-mean", **agg_kw) -> float:
    r"""DPPO-Binary-TV (arXiv:2602.04879): :math:`-rA` unless :math:`|p - q|` exceeds the threshold in A's direction."""
    hi = delta if delta_high is None else delta_high

    def outside(p, q, a):
        return (a > 0 and p - q > hi) or (a < 0 and q - p > delta)

    return _dppo(logprobs, old_logprobs, advantages, mask, outside, agg_mode, agg_kw)


def ref_dppo_kl(logprobs, old_logprobs, advantages, mask=None, *, delta=0.05, delta_high=None,
                agg_mode="token-mean", **agg_kw) -> float:
    r"""DPPO-Binary-KL: as TV with :math:`q\log\frac qp + (1-q)\log\frac{1-q}{1-p}` (inf when p = 1 > q)."""
    hi = delta if delta_high is None else delta_high

    def bkl(p, q):
        first = q * math.log(q / p)
        if q == 1:
            return first
        return first + (1 - q) * math.log((1 - q) / (1 - p)) if p < 1 else math.inf

    def outside(p, q, a):
        return (a > 0 and p > q and bkl(p, q) > hi) or (a < 0 and p < q and bkl(p, q) > delta)

    return _dppo(logprobs, old_logprobs, advantages, mask, outside, agg_mode, agg_kw)


def ref_dro(logprobs, old_logprobs, advantages, mask=None, *, beta=0.05, agg_mode="token-mean", **agg_kw) -> float:
    r"""DRO (Richemond et al. 2024; Tinker's ``dro``): :math:`-A\log\pi + \frac\beta2 (\log\pi - \log q)^2`."""

    def row(lp, ol, ad):
        return [-c * a + 0.5 * beta * (a - b) ** 2 for a, b, c in zip(lp, ol, ad, strict=True)]

    return _run(logprobs, old_logprobs, advantages, mask, row, agg_mode, agg_kw)
