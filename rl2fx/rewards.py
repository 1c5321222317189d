r"""User reward functions: call them, check what they return, combine their scores.

A reward function follows TRL's ``GRPOTrainer`` convention (TRL docs, "Using a
custom reward function": ``reward_funcs`` / ``reward_weights``)::

    def f(prompts: list[str], completions: list[str], **dataset_columns) -> list[float | None]: ...

It gets the batch's prompts, the sampled completions and every other dataset
column (one list of ``batch`` values per column, aligned with the completions)
and returns one score per completion, or ``None`` for a completion it does not
apply to (a math checker on a code prompt). :func:`score` calls ``k`` such
functions and returns a :class:`Scores` table ``[batch, k]`` with NaN where a
function returned ``None``; every other value must be a finite real number
(NaN returned by the function is an error, not a skip: return ``None`` to skip).

Three ways to turn the table into one reward per completion:

- ``Scores.combined(method="weighted_sum")``, TRL's rule:
  :math:`r_i = \sum_j w_j s_{ij}` over the functions that scored sample
  :math:`i` (a ``None`` adds 0, as TRL's ``nansum``);
- ``Scores.combined(method="tchebycheff")``, the weighted Tchebycheff distance to
  the batch's ideal point, negated so that higher is better
  (:func:`rl2fx.pareto.scalarize.tchebycheff`);
- GDPO (Liu et al. 2026, arXiv:2601.05242; :func:`rl2fx.returns.gdpo`), which
  normalises each function within the prompt's group *before* weighting:
  ``gdpo(scores.reward_components(group_size), group_size, reward_weights=...)``.

>>> def length(prompts, completions, **kw):
...     return [float(len(c)) for c in completions]
>>> def exact(prompts, completions, answer, **kw):
...     return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]
>>> s = score([length, exact], ["2+2=", "1+1="], ["4", "11"], {"answer": ["4", "2"]}, weights=[0.5, 1.0])
>>> s.names, s.combined().tolist()
(('length', 'exact'), [1.5, 1.0])
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rl2fx._typing import Bool, Float, Tensor, check_choice, typechecked
from rl2fx.pareto.scalarize import tchebycheff, weighted_sum

__all__ = [
    "RewardFunc",
    "RewardFunctionError",
    "Scores",
    "COMBINE_METHODS",
    "score",
    "reward_names",
    "check_reward_weights",
    "load_reward_func",
]

#: ``f(prompts, completions, **dataset_columns) -> [score or None per completion]``.
RewardFunc = Callable[..., Sequence[float | None]]

#: The ways :meth:`Scores.combined` turns ``k`` scores into one reward: the one list of
#: names that config validation, the trainer and the docs use. (The Pareto optimizer's
#: ``pareto_dominance`` and ``hypervolume`` rank a whole population, so they are not
#: per-sample scalarizations and are not offered here.)
COMBINE_METHODS: tuple[str, ...] = ("weighted_sum", "tchebycheff")


_F32_MAX = float(np.finfo(np.float32).max)


class RewardFunctionError(ValueError):
    """A reward function (or its spec, or the weights) is unusable; the message names it."""


def _label(f: Any, i: int) -> str:
    # the index always, the name when there is a real one: "reward_funcs[1] (exact_match)"
    name = getattr(f, "__name__", None)
    if isinstance(f, functools.partial):
        name = f"partial of {getattr(f.func, '__name__', type(f.func).__name__)}"
    elif name == "<lambda>":
        name = "a lambda"
    elif name is None:
        name = f"a {type(f).__name__} object"
    return f"reward_funcs[{i}] ({name})"


def reward_names(reward_funcs: Sequence[Any]) -> tuple[str, ...]:
    """Unique, log-safe names for ``reward_funcs``, in order.

    A function's ``__name__``; a ``functools.partial``, the wrapped function's name;
    a callable object, its class name; a lambda, ``reward_<i>``. Repeats get
    ``_1``, ``_2``, ... so every column of :class:`Scores` has its own metric.

    >>> def acc(prompts, completions, **kw): ...
    >>> reward_names([acc, acc, lambda prompts, completions, **kw: []])
    ('acc', 'acc_1', 'reward_2')
    """
    base = []
    for i, f in enumerate(reward_funcs):
        if isinstance(f, functools.partial):
            f = f.func
        name = getattr(f, "__name__", None)
        if name is None:
            name = type(f).__name__
        if not name.isidentifier():  # "<lambda>" and friends
            name = f"reward_{i}"
        base.append(name)
    out: list[str] = []
    for name in base:
        cand, j = name, 0
        while cand in out or (cand != name and cand in base):
            j += 1
            cand = f"{name}_{j}"
        out.append(cand)
    return tuple(out)


def _real_vector(name: str, value: Any, k: int, what: str, error: type[ValueError]) -> Tensor:
    # one finite real number per reward function, as float32 [k]; the error names `name`
    if isinstance(value, torch.Tensor):
        vals = value.detach().cpu().flatten().tolist() if value.ndim <= 1 else None
    elif isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        vals = None
    else:
        vals = list(value)
    if vals is None:
        raise error(f"{name} must be a list of {k} numbers ({what}), got {value!r}")
    if len(vals) != k:
        raise error(f"{name} must have {what} ({k}), got {len(vals)}: {vals}")
    for j, v in enumerate(vals):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise error(f"{name}[{j}] must be a finite real number, got {v!r} ({name}={vals})")
    return torch.tensor([float(v) for v in vals], dtype=torch.float32)


@typechecked
def check_reward_weights(weights: Any, k: int) -> Float[Tensor, " k"]:
    """``weights`` as a float32 tensor ``[k]``; raise :class:`RewardFunctionError` naming
    ``reward_weights`` unless there is one finite real number per reward function.

    >>> check_reward_weights([1, 0.5], 2)
    tensor([1.0000, 0.5000])
    >>> check_reward_weights([1.0], 2)
    Traceback (most recent call last):
    ...
    rl2fx.rewards.RewardFunctionError: reward_weights must have one weight per reward function (2), got 1: [1.0]
    """
    return _real_vector("reward_weights", weights, k, "one weight per reward function", RewardFunctionError)


@dataclass(frozen=True, eq=False)
class Scores:
    """The scores of ``k`` reward functions on ``batch`` completions.

    Attributes:
        values: ``[batch, k]`` float32, column ``j`` from ``names[j]``; NaN where that
            function returned ``None`` (and only there: :func:`score` rejects NaN).
        names: one unique name per function (:func:`reward_names`).
        weights: ``[k]`` the ``reward_weights`` given to :func:`score`, or ``None``
            (all ones); the default of :meth:`combined`.

    >>> s = Scores(torch.tensor([[1.0, float("nan")], [0.0, 2.0]]), ("a", "b"))
    >>> s.skipped(), s.means()
    ({'a': 0, 'b': 1}, {'a': 0.5, 'b': 2.0})
    """

    values: Float[Tensor, "batch k"]
    names: tuple[str, ...]
    weights: Float[Tensor, " k"] | None = None

    def __post_init__(self) -> None:
        v = self.values
        if not isinstance(v, torch.Tensor) or v.ndim != 2 or v.dtype != torch.float32:
            raise ValueError(f"Scores.values must be a float32 tensor [batch, k], got "
                             f"{getattr(v, 'dtype', type(v))} {tuple(getattr(v, 'shape', ()))}")
        if len(self.names) != v.shape[1] or len(set(self.names)) != len(self.names):
            raise ValueError(f"Scores.names must be {v.shape[1]} unique names, got {self.names}")
        if bool(torch.isinf(v).any()):
            raise ValueError("Scores.values must be finite or NaN (a skipped sample), got inf")
        if self.weights is not None:
            object.__setattr__(self, "weights", check_reward_weights(self.weights, v.shape[1]))

    @property
    def valid(self) -> Bool[Tensor, "batch k"]:
        """True where the function scored the completion (returned a number, not ``None``)."""
        return ~torch.isnan(self.values)

    def skipped(self) -> dict[str, int]:
        """Per function, how many completions it skipped (returned ``None`` for)."""
        counts = (~self.valid).sum(0).tolist()
        return dict(zip(self.names, counts, strict=True))

    def means(self) -> dict[str, float]:
        """Per function, the mean over the completions it scored; a function that skipped
        every completion is left out (see :meth:`skipped`), so no value is NaN."""
        ok = self.valid
        n = ok.sum(0)
        total = torch.where(ok, self.values.double(), 0.0).sum(0)
        return {name: float(total[j] / n[j]) for j, name in enumerate(self.names) if int(n[j]) > 0}

    def metrics(self, prefix: str = "rewards/") -> dict[str, float]:
        """Flat metrics for logging: ``{prefix}{name}/mean`` (scored functions only) and
        ``{prefix}{name}/skipped`` (every function).

        >>> Scores(torch.tensor([[1.0], [float("nan")]]), ("acc",)).metrics()
        {'rewards/acc/mean': 1.0, 'rewards/acc/skipped': 1.0}
        """
        out: dict[str, float] = {}
        means, skipped = self.means(), self.skipped()
        for name in self.names:
            if name in means:
                out[f"{prefix}{name}/mean"] = means[name]
            out[f"{prefix}{name}/skipped"] = float(skipped[name])
        return out

    def _weights(self, weights: Any) -> Tensor:
        k = self.values.shape[1]
        if weights is not None:
            return check_reward_weights(weights, k)
        if self.weights is not None:
            return self.weights
        return torch.ones(k, dtype=torch.float32)

    @typechecked
    def combined(
        self,
        weights: Any = None,
        method: str = "weighted_sum",
        ideal: Any = None,
    ) -> Float[Tensor, " batch"]:
        r"""One reward per completion; higher is better.

        ``weighted_sum`` (TRL's rule, :func:`rl2fx.pareto.weighted_sum`):

        .. math::  r_i = \sum_{j:\ s_{ij} \ne \text{None}} w_j \, s_{ij}

        A ``None`` adds nothing, exactly as TRL's ``nansum``; a completion every
        function skipped gets 0.

        ``tchebycheff`` (Bowman 1976; :func:`rl2fx.pareto.tchebycheff`), negated:

        .. math::  r_i = -\max_j \; w_j \, (z^*_j - \tilde s_{ij}),
                   \qquad z^*_j = \max_i s_{ij} \text{ (default ideal)}

        where :math:`\tilde s_{ij}` is :math:`s_{ij}`, or the column's batch minimum
        where function :math:`j` returned ``None``: a skipped score counts as the
        worst one observed, so making a function skip can never improve a completion's
        reward (imputing the ideal would hide the term and reward skipping). A
        function that skipped the whole batch is left out of the max; if every
        function did, every reward is 0. ``weights`` must be ``>= 0`` here.

        ``weights`` default to the ones given to :func:`score` (else all 1); ``ideal``
        (``[k]``, only for ``tchebycheff``) defaults to the per-column batch maximum.

        >>> s = Scores(torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, float("nan")]]), ("a", "b"))
        >>> s.combined().tolist()
        [1.0, 1.0, 0.0]
        >>> s.combined(method="tchebycheff").tolist()  # ideal (1, 0.5); row 2's b counts as 0
        [-0.5, -0.5, -1.0]
        """
        check_choice("method", method, COMBINE_METHODS)
        w = self._weights(weights).to(self.values.device)
        ok = self.valid
        if method == "weighted_sum":
            if ideal is not None:
                raise ValueError("ideal is only used by method='tchebycheff', got it with 'weighted_sum'")
            return weighted_sum(torch.where(ok, self.values, 0.0), w)
        if bool((w < 0).any()):
            raise RewardFunctionError(
                f"reward_weights must be >= 0 for method='tchebycheff' (preference magnitudes), "
                f"got {w.tolist()}; negate a reward function to minimize it")
        if ideal is not None:
            z = _real_vector("ideal", ideal, self.values.shape[1], "one ideal score per reward function",
                             ValueError).to(self.values.device)
        scored = ok.any(0)
        if not bool(scored.any()):
            return torch.zeros(self.values.shape[0], device=self.values.device)
        v = self.values[:, scored]
        okv = ok[:, scored]
        worst = torch.where(okv, v, math.inf).amin(0)
        filled = torch.where(okv, v, worst)
        z = filled.amax(0) if ideal is None else z[scored]
        return -tchebycheff(filled, w[scored], z)

    @typechecked
    def reward_components(self, group_size: int | None = None) -> Float[Tensor, "batch k"]:
        r"""``values`` with every ``None`` filled in, for :func:`rl2fx.returns.gdpo`'s
        ``reward_components`` (which needs finite numbers).

        With ``group_size`` (the ``G`` contiguous responses of one prompt), a ``None``
        becomes the mean of that function's scores in the same group: the group's
        mean is unchanged and the filled sample's normalised component
        :math:`(s - \bar s_g)/\sigma_g` is exactly 0, so a skipped sample neither
        gains nor loses from that function, the spirit of TRL's ``nansum``. A group in
        which the function skipped everything gets 0 (a constant group adds 0 in
        GDPO). Without ``group_size``, a ``None`` becomes 0, TRL's convention.

        >>> s = Scores(torch.tensor([[1.0], [float("nan")], [3.0], [float("nan")]]), ("a",))
        >>> s.reward_components(group_size=2).flatten().tolist()
        [1.0, 1.0, 3.0, 3.0]
        >>> s.reward_components().flatten().tolist()
        [1.0, 0.0, 3.0, 0.0]
        """
        ok = self.valid
        if group_size is None:
            return torch.where(ok, self.values, 0.0)
        b, k = self.values.shape
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or b % group_size:
            raise ValueError(f"group_size must be a positive int dividing the batch size {b}, got {group_size!r}")
        g = self.values.view(-1, group_size, k)
        okg = ok.view(-1, group_size, k)
        n = okg.sum(1, keepdim=True)
        mean = torch.where(okg, g, 0.0).sum(1, keepdim=True) / n.clamp_min(1)
        return torch.where(okg, g, mean).reshape(b, k)


def _as_list(out: Any, label: str, n: int) -> list[Any]:
    if isinstance(out, torch.Tensor):
        if out.ndim != 1:
            raise RewardFunctionError(
                f"{label} must return one score per completion (a list of length {n}), "
                f"got a tensor of shape {tuple(out.shape)}")
        if out.is_complex():
            raise RewardFunctionError(f"{label} returned a complex tensor; scores must be real numbers")
        return out.detach().cpu().tolist()
    if isinstance(out, np.ndarray):
        if out.ndim != 1:
            raise RewardFunctionError(
                f"{label} must return one score per completion (a list of length {n}), "
                f"got an array of shape {out.shape}")
        return out.tolist()
    if isinstance(out, (list, tuple)):
        return list(out)
    raise RewardFunctionError(
        f"{label} must return a list of {n} numbers or None (one per completion), got {type(out).__name__}")


def _as_float(v: Any, label: str, i: int) -> float | None:
    if v is None:
        return None
    if isinstance(v, torch.Tensor) and v.ndim == 0 and not v.is_complex():
        v = v.item()
    if isinstance(v, np.generic) and not isinstance(v, np.complexfloating):
        v = v.item()
    if not isinstance(v, numbers.Real):  # bool and int are Real; str, complex, lists are not
        raise RewardFunctionError(
            f"{label} returned {v!r} ({type(v).__name__}) at index {i}; each score must be a real "
            f"number, or None to skip the completion")
    f = float(v)
    if not math.isfinite(f):
        raise RewardFunctionError(
            f"{label} returned {f} at index {i}; scores must be finite (return None to skip a completion)")
    if abs(f) > _F32_MAX:
        raise RewardFunctionError(f"{label} returned {f} at index {i}, beyond the float32 range used for scores")
    return f


def score(
    reward_funcs: Sequence[RewardFunc],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Sequence[Any]] | None = None,
    *,
    weights: Any = None,
) -> Scores:
    """Call every reward function on one batch and collect a checked :class:`Scores` table.

    Each function is called as ``f(prompts=prompts, completions=completions, **columns)``
    (TRL's ``GRPOTrainer`` convention; ``columns`` maps a dataset column to its
    ``batch`` values, e.g. each prompt's reference answer, repeated for each of
    its responses). It must return a list, tuple, 1-D numpy array or 1-D tensor of
    ``len(completions)`` real numbers or ``None``. Anything else (a wrong length,
    NaN, inf, a string, an exception) raises :class:`RewardFunctionError` naming the
    function (``reward_funcs[i] (name)``); a raised exception is chained.
    ``weights`` (TRL's ``reward_weights``, one per function) are checked here and
    kept on the result as :meth:`Scores.combined`'s default.

    >>> s = score([lambda prompts, completions, **kw: [None, 2]], ["p", "q"], ["a", "b"])
    >>> s.names, s.skipped(), s.means()
    (('reward_0',), {'reward_0': 1}, {'reward_0': 2.0})
    """
    if isinstance(reward_funcs, (str, bytes)) or not isinstance(reward_funcs, Sequence) or not reward_funcs:
        hint = f"; wrap one function in a list: [{getattr(reward_funcs, '__name__', 'f')}]" if callable(
            reward_funcs) else ""
        raise RewardFunctionError(
            f"reward_funcs must be a non-empty list of callables f(prompts, completions, **columns), "
            f"got {reward_funcs!r}{hint}")
    for i, f in enumerate(reward_funcs):
        if not callable(f):
            raise RewardFunctionError(
                f"reward_funcs[{i}] must be callable as f(prompts, completions, **columns), got "
                f"{f!r} ({type(f).__name__})")
    k = len(reward_funcs)
    w = None if weights is None else check_reward_weights(weights, k)
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"prompts and completions must have the same length, got {len(prompts)} and {n}")
    cols = dict(columns or {})
    for name in ("prompts", "completions"):
        if name in cols:
            raise ValueError(f"columns must not contain {name!r}: it is passed to reward functions already")
    for name, vals in cols.items():
        if len(vals) != n:
            raise ValueError(f"column {name!r} has {len(vals)} values, expected one per completion ({n})")
    table = torch.empty(n, k, dtype=torch.float64)
    for j, f in enumerate(reward_funcs):
        label = _label(f, j)
        try:  # fresh lists per call: a function editing its arguments cannot change the next one's
            out = f(prompts=list(prompts), completions=list(completions), **{c: list(v) for c, v in cols.items()})
        except Exception as e:
            first = (str(e).splitlines() or [""])[0]
            raise RewardFunctionError(f"{label} raised {type(e).__name__}: {first}") from e
        vals = _as_list(out, label, n)
        if len(vals) != n:
            raise RewardFunctionError(
                f"{label} returned {len(vals)} scores, expected one per completion ({n})")
        table[:, j] = torch.tensor(
            [math.nan if (x := _as_float(v, label, i)) is None else x for i, v in enumerate(vals)],
            dtype=torch.float64)
    return Scores(table.to(torch.float32), reward_names(reward_funcs), w)


def load_reward_func(spec: str) -> RewardFunc:
    """Import a reward function from ``"package.module:function"`` or ``"path/to/file.py:function"``.

    A spec whose module part ends in ``.py`` is a file, imported under a private
    module name (nothing is added to ``sys.path``); anything else is imported as a
    module from ``sys.path``. ``function`` may be dotted (``Class.method``). Every
    failure raises :class:`RewardFunctionError` naming the spec and what is wrong.

    >>> load_reward_func("math:fabs")(-2.0)
    2.0
    >>> load_reward_func("math")
    Traceback (most recent call last):
    ...
    rl2fx.rewards.RewardFunctionError: reward spec 'math' must be 'module:function' or 'path/to/file.py:function' (no ':' found)
    """
    if not isinstance(spec, str):
        raise RewardFunctionError(f"reward spec must be a string 'module:function', got {spec!r}")
    where, colon, attr = spec.rpartition(":")
    if not colon:
        raise RewardFunctionError(
            f"reward spec {spec!r} must be 'module:function' or 'path/to/file.py:function' (no ':' found)")
    if not where or not attr:
        raise RewardFunctionError(
            f"reward spec {spec!r} must be 'module:function' or 'path/to/file.py:function' "
            f"(the {'module' if not where else 'function'} part is empty)")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise RewardFunctionError(f"reward spec {spec!r}: file {str(path)!r} does not exist "
                                      f"(relative to {os.getcwd()!r})")
        path = path.resolve()
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        mod_name = f"_rl2fx_reward_{path.stem}_{digest}"
        mspec = importlib.util.spec_from_file_location(mod_name, path)
        if mspec is None or mspec.loader is None:
            raise RewardFunctionError(f"reward spec {spec!r}: cannot import {str(path)!r} as a Python file")
        module = importlib.util.module_from_spec(mspec)
        # registered before running, as `import` does: dataclasses and pickling look it up
        sys.modules[mod_name] = module
        try:
            mspec.loader.exec_module(module)
        except BaseException as e:
            sys.modules.pop(mod_name, None)
            if not isinstance(e, Exception):
                raise
            first = (str(e).splitlines() or [""])[0]
            raise RewardFunctionError(
                f"reward spec {spec!r}: importing {str(path)!r} raised {type(e).__name__}: {first}") from e
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            first = (str(e).splitlines() or [""])[0]
            raise RewardFunctionError(
                f"reward spec {spec!r}: importing module {where!r} raised {type(e).__name__}: {first}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise RewardFunctionError(
                f"reward spec {spec!r}: {where!r} has no attribute {attr!r}; its public callables: {names}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardFunctionError(
            f"reward spec {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj
