r"""Slow float64 reference estimators, written straight from each paper's formula.

These are the oracles the fast estimators in :mod:`rl2fx.returns` are tested
against. They are deliberately independent of the fast code: no
``reverse_scan``, no shared helpers, plain Python loops over rows and steps.
Where the paper gives a closed sum (GAE, V-trace, Retrace, n-step) the sum is
evaluated term by term instead of as a recursion, so that a mistake in a
recurrence coefficient cannot hide in both implementations at once.

Masks are handled the way DESIGN.md defines them: each row is *packed* (only
masked-in steps are kept, in order), the estimator runs on the packed row, and
results are scattered back, zeros elsewhere.

Every function accepts torch tensors ``[*batch, time]`` (any dtype) and returns
float64 tensors of the same shape.

>>> import torch
>>> adv, ret = ref_gae(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]), gamma=1.0, lamda=1.0)
>>> adv.tolist(), ret.tolist()
([0.5, 0.5], [1.0, 1.0])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "ref_gae",
    "ref_lambda_returns",
    "ref_discounted",
    "ref_n_step",
    "ref_vtrace",
    "ref_retrace",
    "ref_clipped_is",
    "ref_multistep",
    "ref_reinforce",
    "ref_grpo",
    "ref_dr_grpo",
    "ref_rloo",
    "ref_reinforce_pp",
    "ref_whiten",
    "ref_remax",
    "ref_opo",
    "ref_gpg",
    "ref_grpo_passk",
    "ref_reinforce_pp_baseline",
    "ref_grpo_batch_std",
    "ref_gdpo",
    "ref_optimal_token_baseline",
]

Row = dict[str, list[float]]


def _rows(x: Tensor | float | None, shape: Sequence[int], default: float) -> list[list[float]]:
    """``x`` as a list of float64 rows of length ``shape[-1]`` (scalars are broadcast)."""
    T = shape[-1]
    n = math.prod(shape[:-1])
    if x is None:
        return [[default] * T for _ in range(n)]
    if not isinstance(x, Tensor):
        return [[float(x)] * T for _ in range(n)]
    return x.detach().to(torch.float64).reshape(n, T).tolist()


def _per_row(x: Tensor | None, shape: Sequence[int], default: float) -> list[float]:
    n = math.prod(shape[:-1])
    if x is None:
        return [default] * n
    return x.detach().to(torch.float64).reshape(n).tolist()


def _apply(
    shape: Sequence[int],
    mask: Tensor | None,
    row_fn: Callable[[int, Row], list[list[float]]],
    series: dict[str, Tensor | float | None],
    defaults: dict[str, float],
    n_out: int,
) -> list[Tensor]:
    """Pack every row by ``mask``, call ``row_fn(row_index, packed_series)``, scatter the outputs."""
    T = shape[-1]
    rows = {k: _rows(v, shape, defaults.get(k, 0.0)) for k, v in series.items()}
    masks = _rows(mask, shape, 1.0)
    outs = [[[0.0] * T for _ in masks] for _ in range(n_out)]
    for b, mrow in enumerate(masks):
        keep = [t for t in range(T) if mrow[t] != 0]
        packed = {k: [rows[k][b][t] for t in keep] for k in rows}
        results = row_fn(b, packed)
        for o, res in enumerate(results):
            for k, t in enumerate(keep):
                outs[o][b][t] = res[k]
    return [torch.tensor(o, dtype=torch.float64).reshape(tuple(shape)) for o in outs]


def _prod(xs: Sequence[float]) -> float:
    p = 1.0
    for x in xs:
        p *= x
    return p


def ref_gae(rewards, values, *, gamma, lamda, bootstrap_value=None, mask=None, terminated=None, done=None):
    r"""GAE as the closed sum of Schulman et al. (2015), eq. 16, per packed row.

    :math:`A_t = \sum_{l \ge 0} \big(\prod_{i<l} \gamma_{t+i}\lambda_{t+i}(1-d_{t+i})\big)\, \delta_{t+l}`
    (:math:`d` = done or terminated),
    :math:`\delta_t = r_t + \gamma_t (1-\mathrm{term}_t) V_{t+1} - V_t`, :math:`V_N` = bootstrap.
    """
    shape = rewards.shape
    boot = _per_row(bootstrap_value, shape, 0.0)
    if terminated is None:
        terminated = done

    def row(b: int, s: Row) -> list[list[float]]:
        n = len(s["r"])
        v_next = [s["v"][k + 1] if k + 1 < n else boot[b] for k in range(n)]
        delta = [s["r"][k] + s["g"][k] * (1 - s["term"][k]) * v_next[k] - s["v"][k] for k in range(n)]
        adv = []
        for t in range(n):
            total = 0.0
            for j in range(t, n):
                w = _prod([s["g"][i] * s["l"][i] * (1 - max(s["done"][i], s["term"][i])) for i in range(t, j)])
                total += w * delta[j]
            adv.append(total)
        return [adv, [adv[k] + s["v"][k] for k in range(n)]]

    series = {"r": rewards, "v": values, "g": gamma, "l": lamda, "term": terminated, "done": done}
    return tuple(_apply(shape, mask, row, series, {}, 2))


def ref_lambda_returns(rewards, values, *, gamma, lamda, bootstrap_value=None, mask=None, terminated=None, done=None):
    r"""λ-return by its recursive definition (Sutton & Barto 2018, eq. 12.18), per packed row.

    :math:`G_t = r_t + \gamma_t(1-\mathrm{term}_t)\,[(1-\lambda_t) V_{t+1} + \lambda_t G_{t+1}]`,
    where :math:`G_{t+1}` is replaced by :math:`V_{t+1}` after a ``done`` step or past the end.
    """
    shape = rewards.shape
    boot = _per_row(bootstrap_value, shape, 0.0)
    if terminated is None:
        terminated = done

    def row(b: int, s: Row) -> list[list[float]]:
        n = len(s["r"])
        out = [0.0] * n
        for t in reversed(range(n)):
            v_next = s["v"][t + 1] if t + 1 < n else boot[b]
            g_next = out[t + 1] if (t + 1 < n and not s["done"][t]) else v_next
            cont = (1 - s["l"][t]) * v_next + s["l"][t] * g_next
            out[t] = s["r"][t] + s["g"][t] * (1 - s["term"][t]) * cont
        return [out]

    series = {"r": rewards, "v": values, "g": gamma, "l": lamda, "term": terminated, "done": done}
    return _apply(shape, mask, row, series, {}, 1)[0]


def ref_discounted(rewards, *, gamma, bootstrap_value=None, mask=None, done=None):
    r"""Discounted return as a closed sum: :math:`G_t = \sum_{j \ge t} (\prod_{t \le i < j}\gamma_i) r_j + (\prod_{i \ge t}\gamma_i) V_N`.

    The sum stops after the first ``done`` step at or after ``t`` (and then has no bootstrap term).
    """
    shape = rewards.shape
    boot = _per_row(bootstrap_value, shape, 0.0)

    def row(b: int, s: Row) -> list[list[float]]:
        n = len(s["r"])
        out = []
        for t in range(n):
            total, disc, ended = 0.0, 1.0, False
            for j in range(t, n):
                total += disc * s["r"][j]
                disc *= s["g"][j]
                if s["done"][j]:
                    ended = True
                    break
            out.append(total + (0.0 if ended else disc * boot[b]))
        return [out]

    return _apply(shape, mask, row, {"r": rewards, "g": gamma, "done": done}, {}, 1)[0]


def ref_n_step(rewards, values, *, gamma, n_steps, bootstrap_value=None, mask=None):
    r""":math:`G^{(n)}_t = \sum_{k<\min(n, N-t)} (\prod_{i<k}\gamma_{t+i}) r_{t+k} + (\prod_{i<\min(n,N-t)}\gamma_{t+i}) V_{\min(t+n, N)}`."""
    shape = rewards.shape
    boot = _per_row(bootstrap_value, shape, 0.0)

    def row(b: int, s: Row) -> list[list[float]]:
        n = len(s["r"])
        out = []
        for t in range(n):
            end = min(t + n_steps, n)
            total = sum(_prod(s["g"][t:j]) * s["r"][j] for j in range(t, end))
            tail = s["v"][end] if end < n else boot[b]
            out.append(total + _prod(s["g"][t:end]) * tail)
        return [out]

    return _apply(shape, mask, row, {"r": rewards, "v": values, "g": gamma}, {}, 1)[0]


def ref_vtrace(
    rewards, values, log_rhos, *, gamma, rho_bar=1.0, c_bar=1.0, pg_rho_bar=None, lamda=1.0,
    bootstrap_value=None, mask=None, terminated=None, done=None,
):
    r"""V-trace targets (Espeholt et al. 2018, eq. 1) as the closed sum, and the policy-gradient advantage.

    :math:`v_s = V_s + \sum_{t \ge s} \big(\prod_{i=s}^{t-1} \gamma_i c_i (1-d_i)\big) \rho_t \delta_t`,
    :math:`\rho_t = \min(\bar\rho, \pi/\mu)`, :math:`c_i = \lambda \min(\bar c, \pi/\mu)`,
    :math:`A^{pg}_s = \min(\bar\rho_{pg}, \pi/\mu)\,(r_s + \gamma_s (1-\mathrm{term}_s) v_{s+1} - V_s)`.
    """
    shape = rewards.shape
    boot = _per_row(bootstrap_value, shape, 0.0)
    pg_bar = rho_bar if pg_rho_bar is None else pg_rho_bar
    if terminated is None:
        terminated = done

    def row(b: int, s: Row) -> list[list[float]]:
        n = len(s["r"])
        ratio = [math.exp(x) for x in s["lr"]]
        rho = [min(rho_bar, x) for x in ratio]
        c = [s["l"][i] * min(c_bar, x) for i, x in enumerate(ratio)]
        v_next = [s["v"][k + 1] if k + 1 < n else boot[b] for k in range(n)]
        delta = [s["r"][k] + s["g"][k] * (1 - s["term"][k]) * v_next[k] - s["v"][k] for k in range(n)]
        vs = []
        for t0 in range(n):
            total = s["v"][t0]
            for t in range(t0, n):
                w = _prod([s["g"][i] * c[i] * (1 - max(s["done"][i], s["term"][i])) for i in range(t0, t)])
                total += w * rho[t] * delta[t]
            vs.append(total)
        pg = []
        for k in range(n):
            nxt = vs[k + 1] if (k + 1 < n and not (s["done"][k] or s["term"][k])) else v_next[k]
            pg.append(min(pg_bar, ratio[k]) * (s["r"][k] + s["g"][k] * (1 - s["term"][k]) * nxt - s["v"][k]))
        return [vs, pg]

    series = {"r": rewards, "v": values, "lr": log_rhos, "g": gamma, "l": lamda, "term": terminated, "done": done}
    return tuple(_apply(shape, mask, row, series, {}, 2))


def ref_retrace(rewards, q_values, v_next, log_rhos, *, gamma, lamda=0.95, bootstrap_value=None, mask=None):
    r"""Retrace(λ) targets (Munos et al. 2016, eq. 3 with :math:`c_s = \lambda\min(1, \pi/\mu)`).

    :math:`Q^{ret}_t = Q_t + \sum_{s \ge t} \big(\prod_{i=t+1}^{s} \gamma_{i-1} c_i\big)
    \big(r_s + \gamma_s\, \mathbb{E}_\pi Q(x_{s+1}, \cdot) - Q_s\big)`; ``bootstrap_value``,
    when given, replaces :math:`\mathbb{E}_\pi Q` after the row's last step.
    """
    shape = rewards.shape
    boot = None if bootstrap_value is None else _per_row(bootstrap_value, shape, 0.0)

    def row(b: int, s: Row) -> list[list[float]]:
        n = len(s["r"])
        vn = list(s["vn"])
        if boot is not None and n:
            vn[-1] = boot[b]
        c = [s["l"][i] * min(1.0, math.exp(s["lr"][i])) for i in range(n)]
        err = [s["r"][k] + s["g"][k] * vn[k] - s["q"][k] for k in range(n)]
        out = []
        for t in range(n):
            total = s["q"][t]
            for j in range(t, n):
                total += _prod([s["g"][i - 1] * c[i] for i in range(t + 1, j + 1)]) * err[j]
            out.append(total)
        return [out]

    series = {"r": rewards, "q": q_values, "vn": v_next, "lr": log_rhos, "g": gamma, "l": lamda}
    return _apply(shape, mask, row, series, {}, 1)[0]


def ref_clipped_is(advantages, log_rhos, *, clip_ratio=0.2, mask=None):
    r""":math:`\mathrm{clip}(\pi/\mu, 1-\epsilon, 1+\epsilon)\, A_t` elementwise, zero where masked out."""
    a = advantages.detach().to(torch.float64).flatten().tolist()
    lr = log_rhos.detach().to(torch.float64).flatten().tolist()
    m = [1.0] * len(a) if mask is None else mask.detach().to(torch.float64).flatten().tolist()
    out = [
        (min(max(math.exp(x), 1 - clip_ratio), 1 + clip_ratio) * y if mk else 0.0)
        for x, y, mk in zip(lr, a, m, strict=True)
    ]
    return torch.tensor(out, dtype=torch.float64).reshape(advantages.shape)


def ref_multistep(rewards, values, *, gamma, lamda=0.95, n_steps=5, bootstrap_method="gae", bootstrap_value=None, mask=None):
    r"""n rewards, then a tail estimate of :math:`V(s_{t+n})`: ``td`` :math:`V`, ``gae`` the λ-return, ``mc`` the MC return."""
    kw = dict(bootstrap_value=bootstrap_value, mask=mask)
    if bootstrap_method == "td":
        tail = values
    elif bootstrap_method == "gae":
        tail = ref_lambda_returns(rewards, values, gamma=gamma, lamda=lamda, **kw)
    elif bootstrap_method == "mc":
        tail = ref_discounted(rewards, gamma=gamma, **kw)
    else:
        raise ValueError(bootstrap_method)
    ret = ref_n_step(rewards, tail, gamma=gamma, n_steps=n_steps, **kw)
    adv = ret - values.detach().to(torch.float64)
    if mask is not None:
        adv = adv * (mask != 0)
    return adv, ret


# ---------------------------------------------------------------- group baselines


def _scores(rewards: Tensor, mask: Tensor | None) -> list[float]:
    r = rewards.detach().to(torch.float64)
    if r.ndim == 1:
        return r.tolist()
    m = torch.ones_like(r) if mask is None else (mask != 0).to(torch.float64)
    return [sum(a * b for a, b in zip(rr, mm, strict=True)) for rr, mm in zip(r.tolist(), m.tolist(), strict=True)]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: Sequence[float]) -> float:
    """Sample standard deviation (Bessel-corrected); 0 for a single element."""
    if len(xs) < 2:
        return 0.0
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def _spread(adv: list[float], rewards: Tensor, mask: Tensor | None) -> Tensor:
    a = torch.tensor(adv, dtype=torch.float64)
    if rewards.ndim == 1 and mask is None:
        return a
    T = rewards.shape[-1] if rewards.ndim == 2 else mask.shape[-1]
    m = torch.ones(len(adv), T, dtype=torch.float64) if mask is None else (mask != 0).to(torch.float64)
    return torch.tensor([[a[i].item() * m[i, t].item() for t in range(T)] for i in range(len(adv))], dtype=torch.float64)


def _groups(scores: list[float], group_size: int) -> list[list[float]]:
    return [scores[i : i + group_size] for i in range(0, len(scores), group_size)]


def ref_reinforce(rewards, group_size, *, norm_std=False, global_norm=False, mask=None, eps=1e-6):
    r"""RL2's REINFORCE baseline: :math:`A_i = (s_i - \bar s_{g(i)}) / (\sigma_{g(i)} + \epsilon)` (or batch-wide stats)."""
    s = _scores(rewards, mask)
    adv = []
    for grp in ([s] if global_norm else _groups(s, group_size)):
        mu, sd = _mean(grp), _std(grp)
        adv += [(x - mu) / (sd + eps) if norm_std else x - mu for x in grp]
    return _spread(adv, rewards, mask)


def ref_grpo(rewards, group_size, *, norm_std=True, mask=None, eps=1e-6):
    r"""GRPO (Shao et al. 2024): :math:`A_i = (s_i - \mathrm{mean}_g) / (\mathrm{std}_g + \epsilon)`."""
    return ref_reinforce(rewards, group_size, norm_std=norm_std, mask=mask, eps=eps)


def ref_dr_grpo(rewards, group_size, *, mask=None):
    r"""Dr. GRPO (Liu et al. 2025): :math:`A_i = s_i - \mathrm{mean}_g` (no std division)."""
    return ref_reinforce(rewards, group_size, norm_std=False, mask=mask)


def ref_rloo(rewards, group_size, *, mask=None):
    r"""RLOO (Ahmadian et al. 2024): :math:`A_i = s_i - \frac{1}{k-1}\sum_{j \ne i} s_j`."""
    s = _scores(rewards, mask)
    adv = []
    for grp in _groups(s, group_size):
        for i, x in enumerate(grp):
            others = [y for j, y in enumerate(grp) if j != i]
            adv.append(x - _mean(others))
    return _spread(adv, rewards, mask)


def ref_whiten(x, mask=None, *, shift_mean=True, eps=1e-8):
    r"""Masked whitening: :math:`(x - \mu)/\sqrt{\sigma^2 + \epsilon}` with Bessel-corrected masked variance."""
    xs = x.detach().to(torch.float64).flatten().tolist()
    ms = [1.0] * len(xs) if mask is None else mask.detach().to(torch.float64).flatten().tolist()
    kept = [a for a, m in zip(xs, ms, strict=True) if m]
    if not kept:
        return torch.zeros(x.shape, dtype=torch.float64)
    mu = _mean(kept)
    var = sum((a - mu) ** 2 for a in kept) / (len(kept) - 1) if len(kept) > 1 else 0.0
    out = [((a - mu) / math.sqrt(var + eps) + (0.0 if shift_mean else mu)) if m else 0.0 for a, m in zip(xs, ms, strict=True)]
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)


def ref_reinforce_pp(rewards, group_size=1, *, gamma=1.0, mask=None, eps=1e-8):
    r"""REINFORCE++ (Hu 2025): discounted token returns, minus the group-mean score when
    ``group_size > 1`` (the "-baseline" variant), whitened over every masked-in token of the batch."""
    r = rewards.detach().to(torch.float64)
    B = r.shape[0]
    if r.ndim == 1:
        T = 1 if mask is None else mask.shape[-1]
        tok = torch.zeros(B, T, dtype=torch.float64)
        m = torch.ones(B, T) if mask is None else (mask != 0).to(torch.float64)
        for i in range(B):  # the sequence reward sits on the last masked-in token
            on = [t for t in range(T) if m[i, t]]
            if on:
                tok[i, on[-1]] = r[i].item()
    else:
        tok = r
        m = torch.ones_like(r) if mask is None else (mask != 0).to(torch.float64)
    G = ref_discounted(tok, gamma=gamma, mask=m)
    if group_size > 1:
        s = _scores(rewards, mask)
        base = [_mean(g) for g in _groups(s, group_size) for _ in range(group_size)]
        G = torch.stack([G[i] - base[i] for i in range(B)]) * m
    out = ref_whiten(G, m, eps=eps)
    if rewards.ndim == 1 and mask is None:
        return out[:, 0]
    return out


def ref_remax(rewards, greedy_rewards, group_size=1, *, mask=None):
    r"""ReMax (Li et al. 2023): :math:`A_i = s_i - s(\hat y_{k(i)})`, the greedy response's reward of prompt k."""
    s = _scores(rewards, mask)
    greedy = greedy_rewards.detach().to(torch.float64).tolist()
    adv = [s[i] - greedy[i // group_size] for i in range(len(s))]
    return _spread(adv, rewards, mask)


def ref_opo(rewards, group_size, *, mask=None, lengths=None):
    r"""OPO (Hao et al. 2025): :math:`A_i = s_i - \sum_j l_j s_j / \sum_j l_j` over the group."""
    s = _scores(rewards, mask)
    if lengths is not None:
        ls = [float(x) for x in lengths.tolist()]
    elif mask is not None:
        ls = [float(sum(1 for v in row if v)) for row in mask.tolist()]
    else:
        ls = [float(rewards.shape[-1])] * len(s)
    adv = []
    for k in range(0, len(s), group_size):
        grp, w = s[k : k + group_size], ls[k : k + group_size]
        if all(x == grp[0] for x in grp):
            adv += [0.0] * len(grp)
            continue
        tot = sum(w)
        b = sum(a * c for a, c in zip(w, grp, strict=True)) / tot if tot > 0 else _mean(grp)
        adv += [x - b for x in grp]
    return _spread(adv, rewards, mask)


def ref_gpg(rewards, group_size, *, mask=None, norm_std=False, eps=1e-6):
    r"""GPG (Chu et al. 2025): :math:`A_i = \frac{B}{B-M}(s_i - \bar s_g)/F`, M = responses in zero-variance groups."""
    s = _scores(rewards, mask)
    groups = _groups(s, group_size)
    degenerate = [all(x == g[0] for x in g) for g in groups]
    B, M = len(s), sum(len(g) for g, d in zip(groups, degenerate, strict=True) if d)
    alpha = B / (B - M) if B > M else 1.0
    adv = []
    for g, d in zip(groups, degenerate, strict=True):
        f = (_std(g) + eps) if norm_std else 1.0
        adv += [0.0 if d else alpha * (x - _mean(g)) / f for x in g]
    return _spread(adv, rewards, mask)


def ref_grpo_passk(rewards, group_size, *, mask=None, norm_std=True, eps=1e-6):
    r"""GRPO pass@k (Thrampoulidis et al. 2025): the first best response gets :math:`s_{(1)} - s_{(2)}`, others 0."""
    s = _scores(rewards, mask)
    adv = []
    for g in _groups(s, group_size):
        best = 0
        for j in range(1, len(g)):
            if g[j] > g[best]:
                best = j
        second = max(x for j, x in enumerate(g) if j != best)
        gap = g[best] - second
        if norm_std and gap != 0:
            gap = gap / (_std(g) + eps)
        adv += [gap if j == best else 0.0 for j in range(len(g))]
    return _spread(adv, rewards, mask)


def ref_reinforce_pp_baseline(rewards, group_size, *, mask=None, eps=1e-8):
    r"""REINFORCE++-baseline (Hu 2025): score minus group mean (0 for a single response) on every masked-in
    token, whitened over the batch's masked-in tokens."""
    s = _scores(rewards, mask)
    centred = []
    for g in _groups(s, group_size):
        mu = _mean(g) if len(g) > 1 else 0.0
        centred += [x - mu for x in g]
    tok = _spread(centred, rewards, mask)
    if rewards.ndim == 1 and mask is None:
        return ref_whiten(tok, eps=eps)
    m = torch.ones_like(tok) if mask is None else (mask != 0).to(torch.float64)
    return ref_whiten(tok, m, eps=eps)


# ---------------------------------------------------------------- advantage variants (rl2fx/returns/variants.py)


def ref_grpo_batch_std(rewards, group_size, *, mask=None, eps=1e-6):
    r"""TRL ``scale_rewards="batch"``: :math:`A_i = (s_i - \mathrm{mean}_g) / (\mathrm{std}_{batch}(s) + \epsilon)`."""
    s = _scores(rewards, mask)
    sd = _std(s)
    adv = []
    for g in _groups(s, group_size):
        mu = _mean(g)
        adv += [0.0 if all(y == g[0] for y in g) else (x - mu) / (sd + eps) for x in g]
    return _spread(adv, rewards, mask)


def ref_gdpo(reward_components, group_size, *, reward_weights=None, mask=None, eps=1e-6, batch_norm=True):
    r"""GDPO (Liu et al. 2026): per-component group normalisation, weighted sum, then batch normalisation."""
    rc = reward_components.detach().to(torch.float64).tolist()
    B, K = len(rc), len(rc[0])
    w = [1.0] * K if reward_weights is None else reward_weights.to(torch.float64).tolist()
    total = [0.0] * B
    for k in range(K):
        col = [row[k] for row in rc]
        for start in range(0, B, group_size):
            g = col[start : start + group_size]
            if all(y == g[0] for y in g):
                continue
            mu, sd = _mean(g), _std(g)
            for j, x in enumerate(g):
                total[start + j] += w[k] * (x - mu) / (sd + eps)
    if batch_norm and not all(a == total[0] for a in total):
        mu, sd = _mean(total), _std(total)
        total = [(a - mu) / (sd + eps) for a in total]
    elif batch_norm:
        total = [0.0] * B
    if mask is None:
        return torch.tensor(total, dtype=torch.float64)
    m = (mask != 0).tolist()
    return torch.tensor([[total[i] if m[i][t] else 0.0 for t in range(len(m[i]))] for i in range(B)],
                        dtype=torch.float64)


def ref_optimal_token_baseline(rewards, old_logprobs, sum_pi_squared, group_size, *, mask=None,
                               rollout_is_weights=None, handle_zero_tail=False, eps=1e-8):
    r"""Optimal Token Baseline (Li et al. 2026): :math:`B_{g,t} = \sum_i G_{i,t} W_{i,t} / (\sum_i W_{i,t} + \epsilon)`
    over the group's trajectories masked in at ``t``, with :math:`W_{i,t} = \sum_{j \le t, m_{ij}}
    (1 - 2\pi_{ij} + \Sigma\pi^2_{ij})\bar\rho_{ij}^2` and :math:`G_{i,t}` the masked reward-to-go, each a closed sum."""
    B, T = rewards.shape
    r, lp, s2 = (x.detach().to(torch.float64).tolist() for x in (rewards, old_logprobs, sum_pi_squared))
    rho = [[1.0] * T for _ in range(B)] if rollout_is_weights is None else rollout_is_weights.to(torch.float64).tolist()
    m = [[True] * T for _ in range(B)] if mask is None else (mask != 0).tolist()
    G = [[sum(r[i][u] for u in range(t, T) if m[i][u]) for t in range(T)] for i in range(B)]
    W = [[sum((1 - 2 * math.exp(lp[i][j]) + s2[i][j]) * rho[i][j] ** 2 for j in range(t + 1) if m[i][j])
          for t in range(T)] for i in range(B)]
    out = [[0.0] * T for _ in range(B)]
    for start in range(0, B, group_size):
        idx = list(range(start, start + group_size))
        lens = [sum(m[i]) for i in idx]
        srt = sorted(lens)
        for i in idx:
            for t in range(T):
                if not m[i][t]:
                    continue
                if group_size == 1:
                    b = 0.0
                else:
                    num = sum(G[j][t] * W[j][t] for j in idx if m[j][t])
                    den = sum(W[j][t] for j in idx if m[j][t]) + eps
                    b = num / den
                    if (handle_zero_tail and lens.count(srt[-1]) == 1 and lens[i - start] == srt[-1]
                            and srt[-1] > srt[-2] and t >= srt[-2]):
                        b = 0.0
                out[i][t] = G[i][t] - b
    return torch.tensor(out, dtype=torch.float64)
