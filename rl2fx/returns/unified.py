r"""One entry point for every estimator: ``advantages(method, **kw)`` and RL2's ``compute_advantages_unified``.

``advantages`` returns a dict with at least ``"advantages"`` and ``"returns"``
(value targets); V-trace adds ``"vs"``. Arguments a method does not take raise
a ``ValueError`` listing what it accepts; an argument passed as ``None`` counts
as not given, so a caller may pass one superset of tensors with unused ones set
to ``None``.

Method defaults follow the feature spec: ``gamma`` 0.99, ``lamda`` 0.95,
``rho_bar`` 1.0, ``c_bar`` 1.0, ``clip_ratio`` 0.2, ``n_steps`` 5,
``bootstrap_method`` "gae" (V-trace's own ``lamda`` default is 1.0, as in IMPALA).

Off-policy methods take ``log_rhos`` (log π − log μ), or ``logps`` (the policy
being trained) and ``old_logps`` (the behaviour policy that sampled the data),
from which ``log_rhos = logps - old_logps``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from rl2fx._typing import check_choice
from rl2fx.returns import _common as C
from rl2fx.returns.gae import discounted, gae, td_lambda
from rl2fx.returns.group import (
    dr_grpo,
    gpg,
    grpo,
    grpo_passk,
    opo,
    reinforce,
    reinforce_pp,
    reinforce_pp_baseline,
    remax,
    rloo,
)
from rl2fx.returns.multistep import multistep
from rl2fx.returns.offpolicy import clipped_is, retrace, vtrace

__all__ = ["METHODS", "advantages", "compute_advantages_unified"]

_COMMON = ("allow_nonfinite",)
_SCAN = ("backend",)
_VALUE = ("rewards", "values", "gamma", "lamda", "bootstrap_value", "mask")
_RHOS = ("log_rhos", "logps", "old_logps")

#: method -> (accepted keyword arguments, required ones, spec defaults)
METHODS: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, Any]]] = {
    "gae": (_VALUE + ("terminated", "done") + _SCAN + _COMMON, ("rewards", "values"),
            {"gamma": 0.99, "lamda": 0.95}),
    "td_lambda": (_VALUE + ("terminated", "done") + _SCAN + _COMMON, ("rewards", "values"),
                  {"gamma": 0.99, "lamda": 0.95}),
    "vtrace": (_VALUE + _RHOS + ("rho_bar", "c_bar", "pg_rho_bar", "terminated", "done") + _SCAN + _COMMON,
               ("rewards", "values", "log_rhos"), {"gamma": 0.99, "lamda": 1.0, "rho_bar": 1.0, "c_bar": 1.0}),
    "retrace": (_VALUE + _RHOS + ("q_values", "v_next") + _SCAN + _COMMON, ("rewards", "values", "log_rhos"),
                {"gamma": 0.99, "lamda": 0.95}),
    "clipped_is": (_VALUE + _RHOS + ("clip_ratio", "terminated", "done") + _SCAN + _COMMON,
                   ("rewards", "values", "log_rhos"), {"gamma": 0.99, "lamda": 0.95, "clip_ratio": 0.2}),
    "multistep": (_VALUE + ("n_steps", "bootstrap_method") + _SCAN + _COMMON, ("rewards", "values"),
                  {"gamma": 0.99, "lamda": 0.95, "n_steps": 5, "bootstrap_method": "gae"}),
    "reinforce": (("rewards", "group_size", "mask", "norm_std", "global_norm", "eps") + _COMMON,
                  ("rewards", "group_size"), {}),
    "grpo": (("rewards", "group_size", "mask", "norm_std", "eps") + _COMMON, ("rewards", "group_size"), {}),
    "dr_grpo": (("rewards", "group_size", "mask") + _COMMON, ("rewards", "group_size"), {}),
    "rloo": (("rewards", "group_size", "mask") + _COMMON, ("rewards", "group_size"), {}),
    "reinforce_pp": (("rewards", "group_size", "mask", "gamma", "group", "eps") + _SCAN + _COMMON,
                     ("rewards",), {}),
    "remax": (("rewards", "greedy_rewards", "group_size", "mask") + _COMMON, ("rewards", "greedy_rewards"), {}),
    "opo": (("rewards", "group_size", "mask", "lengths") + _COMMON, ("rewards", "group_size"), {}),
    "gpg": (("rewards", "group_size", "mask", "norm_std", "eps") + _COMMON, ("rewards", "group_size"), {}),
    "grpo_passk": (("rewards", "group_size", "mask", "norm_std", "eps") + _COMMON, ("rewards", "group_size"), {}),
    "reinforce_pp_baseline": (("rewards", "group_size", "mask", "group", "eps") + _COMMON,
                              ("rewards", "group_size"), {}),
}


def _pick(kw: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: kw[k] for k in names if k in kw}


def _log_rhos(method: str, kw: dict[str, Any]) -> None:
    """Fill ``log_rhos`` from ``logps - old_logps`` when only those were given."""
    logps, old = kw.pop("logps", None), kw.pop("old_logps", None)
    if "log_rhos" in kw:
        if logps is not None or old is not None:
            raise ValueError(f"{method}: pass either log_rhos or logps/old_logps, not both")
        return
    if logps is None or old is None:
        raise ValueError(
            f"{method} needs the importance ratios: pass log_rhos (log π − log μ), or logps (policy being "
            f"trained) and old_logps (behaviour policy that sampled the data)"
        )
    kw["log_rhos"] = logps - old


def _masked_minus(x: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
    return C.masked_out(x - y, C.as_bool("mask", mask)).to(x.dtype)


def _group_returns(kw: dict[str, Any], gamma: float = 1.0) -> Tensor:
    """Monte Carlo value targets for the critic-free methods (reward-to-go over masked-in steps)."""
    r, mask = kw["rewards"], kw.get("mask")
    if r.ndim == 2:
        return discounted(r, gamma=gamma, mask=mask, allow_nonfinite=kw.get("allow_nonfinite", False))
    if mask is None:
        return r
    m = C.as_bool("mask", mask)
    return C.masked_out(r.unsqueeze(-1).expand(m.shape), m)


def _run_gae(kw):
    adv, ret = gae(kw.pop("rewards"), kw.pop("values"), **kw)
    return {"advantages": adv, "returns": ret}


def _run_td_lambda(kw):
    r, v = kw.pop("rewards"), kw.pop("values")
    ret = td_lambda(r, v, **kw)
    return {"advantages": _masked_minus(ret, v, kw.get("mask")), "returns": ret}


def _run_vtrace(kw):
    vs, pg = vtrace(kw.pop("rewards"), kw.pop("values"), kw.pop("log_rhos"), **kw)
    return {"advantages": pg, "returns": vs, "vs": vs}


def _run_retrace(kw):
    r, v, lr = kw.pop("rewards"), kw.pop("values"), kw.pop("log_rhos")
    q = kw.pop("q_values", None)
    vn = kw.pop("v_next", None)
    if q is None:
        q = v  # a state-value critic: V(x_t) stands in for Q(x_t, a_t)
    if vn is None:
        m = C.as_bool("mask", kw.get("mask"))
        boot = kw.get("bootstrap_value")
        boot = torch.zeros(v.shape[:-1], dtype=v.dtype, device=v.device) if boot is None else boot.to(v.dtype)
        vn = C.next_along(v, boot, None if m is None else C.next_index(m))
    ret = retrace(r, q, vn, lr, **kw)
    return {"advantages": _masked_minus(ret, v, kw.get("mask")), "returns": ret}


def _run_clipped_is(kw):
    lr, clip = kw.pop("log_rhos"), kw.pop("clip_ratio")
    adv, ret = gae(kw.pop("rewards"), kw.pop("values"), **kw)
    out = clipped_is(adv, lr, clip_ratio=clip, mask=kw.get("mask"), allow_nonfinite=kw.get("allow_nonfinite", False))
    return {"advantages": out, "returns": ret}


def _run_multistep(kw):
    adv, ret = multistep(kw.pop("rewards"), kw.pop("values"), **kw)
    return {"advantages": adv, "returns": ret}


def _group_runner(fn: Callable[..., Tensor], gamma_key: bool = False) -> Callable[[dict[str, Any]], dict[str, Tensor]]:
    def run(kw):
        ret = _group_returns(kw, kw.get("gamma", 1.0) if gamma_key else 1.0)
        adv = fn(kw.pop("rewards"), **kw)
        return {"advantages": adv, "returns": ret.to(adv.dtype)}

    return run


_RUNNERS: dict[str, Callable[[dict[str, Any]], dict[str, Tensor]]] = {
    "gae": _run_gae,
    "td_lambda": _run_td_lambda,
    "vtrace": _run_vtrace,
    "retrace": _run_retrace,
    "clipped_is": _run_clipped_is,
    "multistep": _run_multistep,
    "reinforce": _group_runner(reinforce),
    "grpo": _group_runner(grpo),
    "dr_grpo": _group_runner(dr_grpo),
    "rloo": _group_runner(rloo),
    "reinforce_pp": _group_runner(reinforce_pp, gamma_key=True),
    "remax": _group_runner(remax),
    "opo": _group_runner(opo),
    "gpg": _group_runner(gpg),
    "grpo_passk": _group_runner(grpo_passk),
    "reinforce_pp_baseline": _group_runner(reinforce_pp_baseline),
}


def advantages(method: str, **kw: Any) -> dict[str, Tensor]:
    r"""Compute advantages and value targets with the named estimator.

    ``method`` is one of ``gae, td_lambda, vtrace, retrace, clipped_is, multistep,
    reinforce, grpo, dr_grpo, rloo, reinforce_pp, remax, opo, gpg, grpo_passk,
    reinforce_pp_baseline``; keyword arguments are those of the estimator
    (``rewards``, ``values``, ``mask``, ``gamma``, ``lamda``,
    ``log_rhos``/``logps``+``old_logps``, ``group_size``, ``greedy_rewards`` for
    ``remax``, ``lengths`` for ``opo``, ...). What each method returns under
    ``"returns"``:

    * ``gae``, ``td_lambda``, ``clipped_is``: the λ-returns (``clipped_is``
      re-weights only the advantages);
    * ``vtrace``: the V-trace targets ``vs`` (``"advantages"`` are the
      policy-gradient advantages);
    * ``retrace``: the Retrace targets, with ``advantages = targets - values``
      (``q_values`` defaults to ``values``, ``v_next`` to the next step's value);
    * ``multistep``: the multi-step returns;
    * group methods: the undiscounted reward-to-go (``reinforce_pp``: discounted
      with its ``gamma``), for a critic if the caller keeps one.

    >>> import torch
    >>> out = advantages("gae", rewards=torch.tensor([0.0, 1.0]), values=torch.tensor([0.5, 0.5]),
    ...                  gamma=1.0, lamda=1.0)
    >>> out["advantages"], out["returns"]
    (tensor([0.5000, 0.5000]), tensor([1., 1.]))
    >>> advantages("grpo", rewards=torch.tensor([1.0, 0.0]), group_size=2)["advantages"]
    tensor([ 0.7071, -0.7071])
    >>> advantages("remax", rewards=torch.tensor([1.0, 0.0]), greedy_rewards=torch.tensor([0.5]),
    ...            group_size=2)["advantages"]
    tensor([ 0.5000, -0.5000])
    """
    check_choice("method", method, list(METHODS))
    accepted, required, defaults = METHODS[method]
    given = {k: v for k, v in kw.items() if v is not None}
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(
            f"method {method!r} does not take argument(s) {unknown}; it accepts {sorted(accepted)}"
        )
    args = {**defaults, **given}
    if "log_rhos" in required:
        _log_rhos(method, args)
    missing = [k for k in required if k not in args]
    if missing:
        raise ValueError(f"method {method!r} needs argument(s) {missing}; it accepts {sorted(accepted)}")
    return _RUNNERS[method](args)


#: tensor keys read from RL2-style per-sequence dicts (RL2's ``action_mask`` is our ``mask``)
_DATA_KEYS = {
    "rewards": "rewards",
    "values": "values",
    "action_mask": "mask",
    "logps": "logps",
    "old_logps": "old_logps",
    "log_rhos": "log_rhos",
    "terminated": "terminated",
    "done": "done",
    "q_values": "q_values",
    "v_next": "v_next",
}


#: per-dict key of ReMax's greedy-response reward (a float or 0-d tensor, the same for every dict of a prompt)
GREEDY_KEY = "greedy_reward"


def _pad(seqs: list[Tensor], T: int) -> Tensor:
    out = seqs[0].new_zeros((len(seqs), T))
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out


def _greedy_from_dicts(data_list: list[dict[str, Any]], params: dict[str, Any], batch: dict[str, Any]) -> None:
    """ReMax's baselines from the dicts' ``greedy_reward`` (one value per prompt, repeated on its responses)."""
    has = [GREEDY_KEY in d for d in data_list]
    if not any(has):
        return
    if "greedy_rewards" in params:
        raise ValueError(f"pass greedy_rewards as a parameter or as {GREEDY_KEY!r} in the data dicts, not both")
    if not all(has):
        raise ValueError(f"data_list[{has.index(False)}] lacks {GREEDY_KEY!r}, which other sequences have")
    g = torch.as_tensor([float(d[GREEDY_KEY]) for d in data_list], dtype=batch["rewards"].dtype,
                        device=batch["rewards"].device)
    k = int(params.get("group_size", 1))
    if k < 1 or g.numel() % k:
        batch["greedy_rewards"] = g  # remax reports the bad group_size / batch size itself
        return
    grouped = g.view(-1, k)
    differs = (grouped != grouped[:, :1]).any(-1)
    if bool(differs.any()):
        p = int(differs.nonzero()[0, 0])
        raise ValueError(
            f"the {k} dicts of prompt {p} (data_list[{p * k}:{(p + 1) * k}]) carry different {GREEDY_KEY!r} "
            f"values {grouped[p].tolist()}: there is one greedy response per prompt"
        )
    batch["greedy_rewards"] = grouped[:, 0]


def compute_advantages_unified(data_list: list[dict[str, Any]], method: str = "gae", **params: Any) -> list[dict[str, Any]]:
    r"""RL2-style entry: per-sequence dicts of 1-D tensors of different lengths, one batched estimator call.

    Each dict holds ``rewards`` and, as the method needs them, ``values``,
    ``action_mask``, ``logps``/``old_logps`` (or ``log_rhos``), ``terminated``,
    ``done``. The sequences are right-padded to the longest, the padding is
    masked out (so every sequence bootstraps from 0 after its own last step),
    :func:`advantages` runs once on the batch, and ``advantages`` and
    ``returns`` (each of the sequence's own length) are written into every dict.
    The list is returned. ``params`` are the method's hyper-parameters
    (``gamma``, ``lamda``, ``rho_bar``, ``c_bar``, ``group_size``, ...). For group
    methods the dicts of one prompt must be contiguous. For ``remax`` each dict
    carries ``greedy_reward`` (the reward of its prompt's greedy response, the
    same value in every dict of the prompt), or ``greedy_rewards``
    ``[n_prompts]`` is passed as a parameter. ``opo`` takes the response lengths
    from the (action) mask.

    >>> import torch
    >>> data = [{"rewards": torch.tensor([0.0, 1.0]), "values": torch.tensor([0.5, 0.5])},
    ...         {"rewards": torch.tensor([2.0]), "values": torch.tensor([1.0])}]
    >>> out = compute_advantages_unified(data, method="gae", gamma=1.0, lamda=1.0)
    >>> out[0]["advantages"], out[1]["advantages"]
    (tensor([0.5000, 0.5000]), tensor([1.]))
    >>> data = [{"rewards": torch.tensor([0.0, 1.0]), "greedy_reward": 0.5},
    ...         {"rewards": torch.tensor([0.0]), "greedy_reward": 0.5}]
    >>> [d["advantages"] for d in compute_advantages_unified(data, method="remax", group_size=2)]
    [tensor([0.5000, 0.5000]), tensor([-0.5000])]
    """
    check_choice("method", method, list(METHODS))
    if not data_list:
        return data_list
    accepted = set(METHODS[method][0])
    clash = sorted(set(params) & (set(_DATA_KEYS) | set(_DATA_KEYS.values())))
    if clash:
        raise ValueError(f"{clash} come from the data dicts; do not pass them as parameters")
    lengths = []
    for i, d in enumerate(data_list):
        if "rewards" not in d:
            raise ValueError(f"data_list[{i}] has no 'rewards'")
        if d["rewards"].ndim != 1:
            raise ValueError(f"data_list[{i}]['rewards'] must be 1-D, got shape {tuple(d['rewards'].shape)}")
        lengths.append(d["rewards"].shape[0])
    T = max(lengths)
    batch: dict[str, Any] = {}
    for key, arg in _DATA_KEYS.items():
        if arg not in accepted:
            continue
        present = ["present" if key in d else "absent" for d in data_list]
        if all(p == "absent" for p in present):
            continue
        if any(p == "absent" for p in present):
            i = present.index("absent")
            raise ValueError(f"data_list[{i}] lacks {key!r}, which other sequences have")
        seqs = [d[key] for d in data_list]
        for i, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
            if s.shape != (n,):
                raise ValueError(f"data_list[{i}][{key!r}] has shape {tuple(s.shape)}, but its rewards have length {n}")
        if key in ("action_mask", "terminated", "done"):
            seqs = [C.as_bool(f"data_list[{i}][{key!r}]", s) for i, s in enumerate(seqs)]
        batch[arg] = _pad(seqs, T)
    valid = torch.arange(T, device=batch["rewards"].device) < torch.tensor(lengths, device=batch["rewards"].device)[:, None]
    batch["mask"] = valid if "mask" not in batch else (batch["mask"] & valid)
    if "greedy_rewards" in accepted:
        _greedy_from_dicts(data_list, params, batch)
    out = advantages(method, **batch, **params)
    adv, ret = out["advantages"], out["returns"]
    for d, n, a, r in zip(data_list, lengths, adv, ret, strict=True):
        d["advantages"] = a[:n]
        d["returns"] = r[:n]
    return data_list
