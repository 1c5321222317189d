"""Search-space definitions: one :class:`HyperparameterConfig` per tuned parameter.

A search space is a list of configs. Every sampler works in one shared encoding of
that space (see :func:`encode` / :func:`decode`): each numeric parameter becomes
one coordinate of the unit cube, after a log transform when ``log=True``,

$$u = \\frac{t(x) - t(\\text{low})}{t(\\text{high}) - t(\\text{low})},\\qquad
t = \\log \\text{ if log else identity},$$

integers are rounded back on decoding (the continuous relaxation used by
BoTorch's and Ax's defaults; Garrido-Merchán & Hernández-Lobato, 2020), and a
categorical or bool parameter with ``k`` values becomes ``k`` one-hot
coordinates.

A parameter may be *conditional*: ``condition={"estimator": "svm"}`` (or a list of
values) makes it present only when the categorical or bool parameter ``estimator``
takes one of those values, like a hyperparameter that only one estimator has. An
inactive parameter is absent from the trial's params; in the encoding it sits at its
default, so a model sees one fixed value there and learns its effect through the
parent's one-hot coordinates (the imputation of Lévesque et al., 2017, "Bayesian
optimization for conditional hyperparameter spaces", IJCNN).

>>> from rl2fx import HyperparameterConfig
>>> lr = HyperparameterConfig("lr", "float", low=1e-5, high=1e-3, log=True)
>>> round(lr.to_unit(1e-4), 6)
0.5
>>> lr.from_unit(0.5)
0.0001
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from rl2fx._typing import check_choice

__all__ = [
    "HyperparameterConfig",
    "create_ppo_hyperparameter_configs",
    "as_configs",
    "validate_params",
    "default_params",
    "encoded_dim",
    "encode",
    "decode",
    "is_active",
    "active_params",
]

PARAM_TYPES = ("float", "int", "categorical", "bool")


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclass(frozen=True)
class HyperparameterConfig:
    """One tuned hyperparameter: its name, type and range (the spec's ``HyperparameterConfig``).

    ``type`` is ``"float"``, ``"int"`` (both need ``low < high``; ``log=True`` samples
    uniformly in $\\log x$ and needs ``low > 0``), ``"categorical"`` (needs a non-empty
    ``choices`` list of distinct JSON-serialisable values) or ``"bool"`` (choices are
    ``[False, True]``). ``default`` is the value used when the parameter is not tuned
    (see :func:`default_params`); it must lie in the range or among the choices. When
    omitted it is the midpoint in the sampling scale (geometric mean for log scale),
    the first choice for a categorical and ``False`` for a bool.

    Invalid settings raise ``ValueError`` naming the parameter and the problem.

    >>> HyperparameterConfig("clip", "float", low=0.1, high=0.3).default
    0.2
    >>> HyperparameterConfig("epochs", "int", low=1, high=8).default
    4
    >>> HyperparameterConfig("lr", "float", low=0.0, high=1.0, log=True)
    Traceback (most recent call last):
    ...
    ValueError: HyperparameterConfig 'lr': log=True needs low > 0, got low=0.0
    """

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    default: Any = None
    choices: Sequence[Any] | None = None
    log: bool = False
    condition: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        where = f"HyperparameterConfig {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"HyperparameterConfig name must be a non-empty string, got {self.name!r}")
        if self.condition is not None:
            cond = self.condition
            if not isinstance(cond, Mapping) or len(cond) != 1:
                raise ValueError(
                    f"{where}: condition must be a one-entry dict {{parent_name: value or list of values}}, got {cond!r}"
                )
            (parent, vals), = cond.items()
            if not isinstance(parent, str) or parent == self.name:
                raise ValueError(f"{where}: condition must name another parameter, got {parent!r}")
            vals = tuple(vals) if isinstance(vals, list | tuple) else (vals,)
            if not vals:
                raise ValueError(f"{where}: condition on {parent!r} needs at least one value, got []")
            # stored as a tuple pair so the config stays hashable and immutable
            object.__setattr__(self, "condition", (parent, vals))
        check_choice(f"{where}: type", self.type, PARAM_TYPES)
        if self.type in ("float", "int"):
            if self.choices is not None:
                raise ValueError(f"{where}: choices are only for categorical parameters, got {self.choices!r}")
            if not _is_number(self.low) or not _is_number(self.high):
                raise ValueError(f"{where}: type {self.type!r} needs numeric low and high, got low={self.low!r}, high={self.high!r}")
            if not (math.isfinite(self.low) and math.isfinite(self.high)):
                raise ValueError(f"{where}: low and high must be finite, got low={self.low!r}, high={self.high!r}")
            if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
                raise ValueError(f"{where}: int parameters need integer low and high, got low={self.low!r}, high={self.high!r}")
            if not self.low < self.high:
                raise ValueError(f"{where}: low must be < high, got low={self.low!r}, high={self.high!r}")
            if self.log and self.low <= 0:
                raise ValueError(f"{where}: log=True needs low > 0, got low={self.low!r}")
            if self.type == "int":
                object.__setattr__(self, "low", int(self.low))
                object.__setattr__(self, "high", int(self.high))
            if self.default is None:
                object.__setattr__(self, "default", self.from_unit(0.5))
            else:
                if not _is_number(self.default) or not (self.low <= self.default <= self.high):
                    raise ValueError(f"{where}: default must be a number in [{self.low}, {self.high}], got {self.default!r}")
                if self.type == "int" and self.default != int(self.default):
                    raise ValueError(f"{where}: default of an int parameter must be an integer, got {self.default!r}")
                if self.type == "int":
                    object.__setattr__(self, "default", int(self.default))
        else:
            if self.low is not None or self.high is not None:
                raise ValueError(f"{where}: low/high are only for float and int parameters, got low={self.low!r}, high={self.high!r}")
            if self.log:
                raise ValueError(f"{where}: log=True is only for float and int parameters")
            if self.type == "bool":
                if self.choices is not None and list(self.choices) != [False, True]:
                    raise ValueError(f"{where}: a bool parameter's choices are [False, True], got {self.choices!r}")
                object.__setattr__(self, "choices", (False, True))
            else:
                if self.choices is None or isinstance(self.choices, str | bytes) or len(self.choices) == 0:
                    raise ValueError(f"{where}: categorical parameters need a non-empty list of choices, got {self.choices!r}")
                choices = tuple(self.choices)
                if len({repr(c) for c in choices}) != len(choices):
                    raise ValueError(f"{where}: choices must be distinct, got {list(choices)!r}")
                for c in choices:
                    if not (c is None or isinstance(c, bool | int | float | str)):
                        raise ValueError(f"{where}: choices must be None, bool, int, float or str (JSON values), got {c!r}")
                object.__setattr__(self, "choices", choices)
            if self.default is None:
                object.__setattr__(self, "default", self.choices[0])
            elif not any(_same(self.default, c) for c in self.choices):
                raise ValueError(f"{where}: default must be one of {list(self.choices)!r}, got {self.default!r}")

    # -- unit-cube transform for numeric parameters -------------------------------------------
    @property
    def is_numeric(self) -> bool:
        return self.type in ("float", "int")

    def _t(self, x: float) -> float:
        return math.log(x) if self.log else float(x)

    def to_unit(self, x: float) -> float:
        """Map a numeric value to [0, 1] (log scale when ``log=True``)."""
        lo, hi = self._t(self.low), self._t(self.high)
        return (self._t(x) - lo) / (hi - lo)

    def from_unit(self, u: float) -> float | int:
        """Map ``u`` in [0, 1] back to a value (rounded for ints, clamped to [low, high])."""
        u = min(max(float(u), 0.0), 1.0)
        lo, hi = self._t(self.low), self._t(self.high)
        t = lo + u * (hi - lo)
        x = math.exp(t) if self.log else t
        if self.type == "int":
            return int(min(max(round(x), self.low), self.high))
        # rounding error of exp(log(x)) can step just outside the bounds
        return float(min(max(x, self.low), self.high))

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a legal value of this parameter."""
        if self.type == "float":
            return _is_number(value) and self.low <= value <= self.high
        if self.type == "int":
            return _is_number(value) and value == int(value) and self.low <= value <= self.high
        return any(_same(value, c) for c in self.choices)

    def index_of(self, value: Any) -> int:
        for i, c in enumerate(self.choices):
            if _same(value, c):
                return i
        raise ValueError(f"parameter {self.name!r}: {value!r} is not one of {list(self.choices)!r}")

    @property
    def parent(self) -> str | None:
        """Name of the parameter this one is conditional on (``None``: always present)."""
        return None if self.condition is None else self.condition[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["choices"] is not None:
            d["choices"] = list(d["choices"])
        # omitted when unset, so studies stored before conditions existed still resume
        if self.condition is None:
            d.pop("condition")
        else:
            d["condition"] = {self.condition[0]: list(self.condition[1])}
        return d


def _same(a: Any, b: Any) -> bool:
    # True == 1 in Python; a categorical with choices [1, True] must keep them apart
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def as_configs(param_configs: Sequence[HyperparameterConfig | Mapping[str, Any]]) -> list[HyperparameterConfig]:
    """Normalise a list of configs or plain dicts (as in YAML) into configs; names must be unique.

    >>> [c.name for c in as_configs([{"name": "x", "type": "float", "low": 0, "high": 1}])]
    ['x']
    """
    if isinstance(param_configs, HyperparameterConfig | Mapping) or not isinstance(param_configs, Sequence):
        raise ValueError(f"param_configs must be a list of HyperparameterConfig, got {type(param_configs).__name__}")
    out = [c if isinstance(c, HyperparameterConfig) else HyperparameterConfig(**dict(c)) for c in param_configs]
    if not out:
        raise ValueError("param_configs must contain at least one HyperparameterConfig, got an empty list")
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"param_configs has duplicate names {dup}")
    by_name = {c.name: c for c in out}
    for c in out:
        if c.condition is None:
            continue
        parent, vals = c.condition
        where = f"param_configs: {c.name!r} has condition={{{parent!r}: {list(vals)!r}}}"
        if parent not in by_name:
            raise ValueError(f"{where}, but there is no parameter {parent!r}; names are {names}")
        p = by_name[parent]
        if p.is_numeric:
            raise ValueError(f"{where}, but {parent!r} is {p.type!r}; a condition's parent must be categorical or bool")
        if p.condition is not None:
            raise ValueError(f"{where}, but {parent!r} is itself conditional; conditions are one level deep")
        bad = [v for v in vals if not p.contains(v)]
        if bad:
            raise ValueError(f"{where}, but {bad!r} are not choices of {parent!r}, which are {list(p.choices)!r}")
    return out


def is_active(c: HyperparameterConfig, params: Mapping[str, Any]) -> bool:
    """Whether ``c`` is present given the parent values in ``params`` (always, without a condition)."""
    if c.condition is None:
        return True
    parent, vals = c.condition
    return parent in params and any(_same(params[parent], v) for v in vals)


def active_params(configs: Sequence[HyperparameterConfig], params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without the conditional parameters whose condition does not hold.

    >>> cs = as_configs([{"name": "est", "type": "categorical", "choices": ["svm", "tree"]},
    ...                  {"name": "C", "type": "float", "low": 0.1, "high": 10.0, "condition": {"est": "svm"}}])
    >>> active_params(cs, {"est": "tree", "C": 1.0})
    {'est': 'tree'}
    """
    return {c.name: params[c.name] for c in configs if c.name in params and is_active(c, params)}


def validate_params(configs: Sequence[HyperparameterConfig], params: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``params`` has exactly the active configs' names with legal values."""
    names = [c.name for c in configs if is_active(c, params)]
    if set(params) != set(names):
        raise ValueError(f"params must have exactly the keys {names}, got {sorted(params)}")
    for c in configs:
        if c.name in params and not c.contains(params[c.name]):
            rng = list(c.choices) if c.choices is not None else f"[{c.low}, {c.high}]"
            raise ValueError(f"parameter {c.name!r} must be in {rng}, got {params[c.name]!r}")


def default_params(configs: Sequence[HyperparameterConfig]) -> dict[str, Any]:
    """The ``default`` of every config active at the defaults, as a params dict."""
    return active_params(configs, {c.name: c.default for c in configs})


def encoded_dim(configs: Sequence[HyperparameterConfig]) -> int:
    """Width of the unit-cube encoding: 1 per numeric parameter, k per k-way categorical."""
    return sum(1 if c.is_numeric else len(c.choices) for c in configs)


def encode(configs: Sequence[HyperparameterConfig], params: Mapping[str, Any]) -> list[float]:
    """Encode a params dict as a point of $[0,1]^D$ (numeric: unit scale, categorical: one-hot;
    an absent conditional parameter at its default).

    >>> cs = [HyperparameterConfig("x", "float", low=0, high=10), HyperparameterConfig("c", "categorical", choices=["a", "b"])]
    >>> encode(cs, {"x": 2.5, "c": "b"})
    [0.25, 0.0, 1.0]
    """
    out: list[float] = []
    for c in configs:
        v = params[c.name] if c.name in params else c.default
        if c.is_numeric:
            out.append(c.to_unit(v))
        else:
            hot = [0.0] * len(c.choices)
            hot[c.index_of(v)] = 1.0
            out.extend(hot)
    return out


def decode(configs: Sequence[HyperparameterConfig], u: Sequence[float]) -> dict[str, Any]:
    """Inverse of :func:`encode`; a relaxed one-hot block decodes to its arg-max, and
    conditional parameters whose condition fails are dropped.

    >>> cs = [HyperparameterConfig("x", "float", low=0, high=10), HyperparameterConfig("c", "categorical", choices=["a", "b"])]
    >>> decode(cs, [0.25, 0.3, 0.6])
    {'x': 2.5, 'c': 'b'}
    """
    u = [float(x) for x in u]
    if len(u) != encoded_dim(configs):
        raise ValueError(f"encoded point must have length {encoded_dim(configs)}, got {len(u)}")
    out: dict[str, Any] = {}
    i = 0
    for c in configs:
        if c.is_numeric:
            out[c.name] = c.from_unit(u[i])
            i += 1
        else:
            k = len(c.choices)
            block = u[i : i + k]
            out[c.name] = c.choices[max(range(k), key=block.__getitem__)]
            i += k
    return active_params(configs, out)


def create_ppo_hyperparameter_configs() -> list[HyperparameterConfig]:
    """A PPO search space for LLM post-training, named by the config keys it sets.

    Names are dotted keys of rl2fx's YAML schema, so a trial's params apply with
    ``OmegaConf.update(cfg, name, value)``. Ranges and why:

    - ``actor.lr`` float, log [1e-7, 1e-4], default 1e-6: fine-tuning a pretrained LM
      with RL uses learning rates around 1e-6 (RL2's and OpenRLHF's default; InstructGPT,
      Ouyang et al. 2022, used 9.65e-6 for 1.3B); the range spans three decades because
      the best rate shrinks with model size; log scale because its effect is multiplicative.
    - ``actor.clip`` float [0.1, 0.3], default 0.2: the values Schulman et al. (2017)
      compared; 0.2 was best on average.
    - ``adv.gamma`` float [0.95, 1.0], default 1.0: token-level rewards in LLM RL are
      sparse and terminal, so discounting mostly adds bias; 1.0 is standard.
    - ``adv.lamda`` float [0.9, 1.0], default 0.95: GAE's λ (Schulman et al., 2016,
      found 0.92-0.98 best); 1.0 is the unbiased Monte Carlo end.
    - ``actor.kl.adaptive_kl.target_kl`` float, log [1e-3, 1e-1], default 0.01: the
      adaptive controller's target (Ziegler et al., 2019, used 6 nats per sequence,
      token-level targets are about 0.01); log because it is a scale.
    - ``actor.kl.adaptive_kl.initial_coef`` float, log [1e-3, 1.0], default 0.2: the
      KL penalty's starting β (Ziegler et al. 2019 started at 0.1-0.2); the controller
      adapts it, so only its scale matters.
    - ``trainer.entropy_coef`` float, log [1e-5, 1e-2], default 1e-3: an entropy bonus
      above ~1e-2 makes LM policies drift into gibberish, below 1e-5 it does nothing.
    - ``data.prompts_per_rollout`` (batch size) categorical [8, 16, 32, 64, 128],
      default 32: powers of two keep tensor shapes efficient; categorical because only
      these values are used in practice.
    - ``trainer.update_epochs`` (PPO epochs) int [1, 4], default 1: more than a few
      epochs over one rollout drives the policy outside the trust region (clip fraction
      and KL blow up), which is why LLM PPO uses 1-4.

    >>> cfgs = create_ppo_hyperparameter_configs()
    >>> [c.name for c in cfgs][:3]
    ['actor.lr', 'actor.clip', 'adv.gamma']
    >>> len(cfgs)
    9
    """
    return [
        HyperparameterConfig("actor.lr", "float", low=1e-7, high=1e-4, default=1e-6, log=True),
        HyperparameterConfig("actor.clip", "float", low=0.1, high=0.3, default=0.2),
        HyperparameterConfig("adv.gamma", "float", low=0.95, high=1.0, default=1.0),
        HyperparameterConfig("adv.lamda", "float", low=0.9, high=1.0, default=0.95),
        HyperparameterConfig("actor.kl.adaptive_kl.target_kl", "float", low=1e-3, high=1e-1, default=0.01, log=True),
        HyperparameterConfig("actor.kl.adaptive_kl.initial_coef", "float", low=1e-3, high=1.0, default=0.2, log=True),
        HyperparameterConfig("trainer.entropy_coef", "float", low=1e-5, high=1e-2, default=1e-3, log=True),
        HyperparameterConfig("data.prompts_per_rollout", "categorical", choices=[8, 16, 32, 64, 128], default=32),
        HyperparameterConfig("trainer.update_epochs", "int", low=1, high=4, default=1),
    ]
