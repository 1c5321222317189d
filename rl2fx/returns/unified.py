r"""One entry point for every registered estimator: ``advantages(method, **kw)`` and RL2's
``compute_advantages_unified``.

``advantages`` looks ``method`` up in the registry (:mod:`rl2fx.returns.registry`)
and returns a dict with at least ``"advantages"`` and ``"returns"`` (value
targets); V-trace adds ``"vs"``. Keyword arguments are handled in three ways:

* batch inputs the method reads (``rewards``, ``values``, ``mask``, ...) and its
  hyperparameters and options are passed to it;
* known batch inputs it does not read are ignored, so a trainer can pass one
  superset of tensors to any estimator (an argument passed as ``None`` counts as
  not given);
* any other name raises a ``ValueError`` naming it and listing what the method takes.

Hyperparameter defaults are the registry's (the feature spec's): ``gamma`` 0.99,
``lamda`` 0.95, ``rho_bar`` 1.0, ``c_bar`` 1.0, ``clip_ratio`` 0.2, ``n_steps`` 5,
``bootstrap_method`` "gae" (V-trace's own ``lamda`` default is 1.0, as in IMPALA).

Off-policy methods take ``log_rhos`` (log π − log μ), or ``logps`` (the policy
being trained) and ``old_logps`` (the behaviour policy that sampled the data),
from which ``log_rhos = logps - old_logps``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rl2fx.returns import _common as C
from rl2fx.returns.gae import discounted
from rl2fx.returns.registry import BATCH_INPUTS, Estimator, get_estimator

__all__ = ["advantages", "compute_advantages_unified"]

#: the two ways to give importance ratios besides ``log_rhos``
_RATIO_INPUTS = ("logps", "old_logps")


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


def _reward_to_go(args: Mapping[str, Any], gamma: float) -> Tensor:
    """Monte Carlo value targets for an estimator that returns advantages only (reward-to-go over
    masked-in steps; a sequence-level reward is broadcast over the mask)."""
    r, mask = args["rewards"], args.get("mask")
    if r.ndim == 2:
        return discounted(r, gamma=gamma, mask=mask, allow_nonfinite=args.get("allow_nonfinite", False))
    if mask is None:
        return r
    m = C.as_bool("mask", mask)
    return C.masked_out(r.unsqueeze(-1).expand(m.shape), m)


def _as_dict(spec: Estimator, out: Any, args: Mapping[str, Any]) -> dict[str, Tensor]:
    if isinstance(out, Tensor):
        out = {"advantages": out}
    elif isinstance(out, tuple) and len(out) == 2:
        out = {"advantages": out[0], "returns": out[1]}
    elif not (isinstance(out, Mapping) and "advantages" in out):
        raise TypeError(f"estimator {spec.name!r} ({spec.fn.__qualname__}) must return a tensor of advantages, "
                        f"(advantages, returns) or a mapping with 'advantages'; got {type(out).__name__}")
    out = dict(out)
    if "returns" not in out:
        adv = out["advantages"]
        if "values" in args:
            out["returns"] = C.masked_out(adv + args["values"], C.as_bool("mask", args.get("mask")))
        else:
            gamma = args.get("gamma", 1.0)
            out["returns"] = _reward_to_go(args, gamma if isinstance(gamma, float | int) else 1.0).to(adv.dtype)
    return out


def advantages(method: str, **kw: Any) -> dict[str, Tensor]:
    r"""Compute advantages and value targets with the registered estimator ``method``.

    ``method`` is any name of :func:`~rl2fx.returns.registry.list_estimators`
    (built-ins: ``gae, td_lambda, vtrace, retrace, clipped_is, multistep,
    reinforce, grpo, dr_grpo, rloo, reinforce_pp, remax, opo, gpg, grpo_passk,
    reinforce_pp_baseline``); keyword arguments are the estimator's
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
    * an estimator that returns advantages only: ``advantages + values`` when it
      reads values, else the reward-to-go (discounted with its ``gamma`` if it
      has one, e.g. ``reinforce_pp``), for a critic if the caller keeps one.

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
    >>> advantages("grpo", rewards=torch.tensor([1.0, 0.0]), group_size=2, gama=0.9)
    Traceback (most recent call last):
    ...
    ValueError: method 'grpo' does not take argument(s) ['gama']; it accepts [...] ...
    """
    spec = get_estimator(method)
    given = {k: v for k, v in kw.items() if v is not None}
    reads_rhos = "log_rhos" in spec.inputs
    unknown = sorted(k for k in given if k not in spec.accepts and k not in BATCH_INPUTS
                     and not (k in _RATIO_INPUTS and reads_rhos))
    if unknown:
        ignorable = sorted(BATCH_INPUTS | set(_RATIO_INPUTS))
        raise ValueError(f"method {method!r} does not take argument(s) {unknown}; it accepts "
                         f"{sorted(spec.accepts)} (batch inputs it does not read are ignored: {ignorable})")
    args = {**spec.defaults, **{k: v for k, v in given.items() if k in spec.accepts or k in _RATIO_INPUTS}}
    if reads_rhos and ("log_rhos" in args or any(k in args for k in _RATIO_INPUTS) or "log_rhos" in spec.required):
        _log_rhos(method, args)
    missing = [k for k in spec.required if k not in args]
    if missing:
        raise ValueError(f"method {method!r} needs argument(s) {missing}; it accepts {sorted(spec.accepts)}")
    return _as_dict(spec, spec.fn(**args), args)


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
    spec = get_estimator(method)
    if not data_list:
        return data_list
    accepted = set(spec.inputs) | ({"logps", "old_logps"} if "log_rhos" in spec.inputs else set())
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
