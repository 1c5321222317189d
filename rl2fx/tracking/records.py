"""Records: what one tracking call turns into, and the checks that make it valid.

Every call of :class:`~rl2fx.tracking.tracker.ExperimentTracker` becomes a plain
``dict`` *record* (``{"op": "metrics", "time_ms": ..., "metrics": {...}, "step": 3}``)
that a backend applies and the outage buffer stores as one JSON line. Validation
happens here, at the caller, against MLflow's limits: an invalid call raises
``ValueError`` immediately instead of sitting in the buffer forever.

>>> flatten_params({"actor": {"lr": 1e-6}, "objectives": ["reward", "kl"]})
{'actor.lr': '1e-06', 'objectives': '["reward", "kl"]'}
>>> metric_value("kl", True), check_step(3)
(1.0, 3)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import numbers
import re
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MAX_KEY",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_PER_BATCH",
    "MAX_PARAM_VALUE",
    "Record",
    "check_key",
    "check_step",
    "flatten_params",
    "flatten_typed",
    "metric_value",
    "now_ms",
    "safe_name",
    "to_container",
]

#: One tracking call: ``op`` (start, metrics, params, tags, artifact, table, model, finish),
#: ``time_ms`` and the op's fields; buffered records also carry ``backend``.
Record = dict[str, Any]

# MLflow's limits (mlflow.utils.validation): checked here so that an invalid call
# raises at the caller instead of sitting in the buffer forever.
MAX_PARAM_VALUE = 6000
MAX_KEY = 250
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
_KEY_RE = re.compile(r"^[/\w.\- :]+$")


def to_container(params: Any) -> Any:
    """Plain Python containers from OmegaConf nodes, dataclasses and namespaces.

    >>> import argparse
    >>> to_container(argparse.Namespace(lr=0.1))
    {'lr': 0.1}
    """
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(params, DictConfig | ListConfig):
            return OmegaConf.to_container(params, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    if isinstance(params, argparse.Namespace):
        return vars(params)
    return params


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | bool | numbers.Number)


def flatten_params(params: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into ``{"dotted.key": "value"}`` strings.

    Accepts mappings, OmegaConf ``DictConfig`` (interpolations resolved),
    dataclass instances and ``argparse.Namespace``, nested in any combination.
    A list of scalars becomes one JSON value; a list holding mappings is indexed
    (``key.0.sub``). Values are ``str(value)`` (``None`` -> ``"None"``), as MLflow
    stores them; W&B receives the typed values (:func:`flatten_typed`).

    >>> flatten_params({"actor": {"lr": 1e-6, "kl": {"coef": 0.0}}, "objectives": ["reward", "kl"]})
    {'actor.lr': '1e-06', 'actor.kl.coef': '0.0', 'objectives': '["reward", "kl"]'}
    """
    return {k: str(v) for k, v in flatten_typed(params, prefix).items()}


def flatten_typed(params: Any, prefix: str = "") -> dict[str, Any]:
    """:func:`flatten_params` keeping scalar leaves typed (numbers stay numbers for W&B).

    >>> flatten_typed({"a": {"b": 1, "c": None}})
    {'a.b': 1, 'a.c': None}
    """
    out: dict[str, Any] = {}
    params = to_container(params)
    if not isinstance(params, Mapping):
        raise ValueError(
            f"params={params!r} is invalid; expected a mapping, an OmegaConf DictConfig, "
            "a dataclass instance or an argparse.Namespace"
        )
    for k, v in params.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        v = to_container(v)
        if isinstance(v, Mapping):
            if not v:
                out[key] = "{}"
            out.update(flatten_typed(v, key))
        elif isinstance(v, list | tuple) and not all(_is_scalar(x) for x in v):
            for i, item in enumerate(v):
                out.update(flatten_typed({str(i): item}, key))
        elif isinstance(v, list | tuple):
            out[key] = json.dumps(list(v), default=str)
        elif v is None or isinstance(v, str | bool | int | float):
            out[key] = v
        else:  # numpy scalars, paths, enums...: their string form, as MLflow would store it
            out[key] = str(v)
    return out


def metric_value(key: str, value: Any) -> float:
    """``value`` as a float: a number, a bool, or a one-element tensor/array; else ``ValueError``.

    >>> metric_value("loss", 2)
    2.0
    """
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Number):
        return float(value)  # type: ignore[arg-type]
    item = getattr(value, "item", None)  # torch / numpy scalars
    numel = getattr(value, "numel", None) or getattr(value, "size", None)
    if callable(item):
        try:
            n = numel() if callable(numel) else numel
            if n is None or n == 1:
                return float(item())
        except (TypeError, ValueError):
            pass
    raise ValueError(
        f"metric {key!r} has value {value!r}; expected a number or a one-element tensor/array"
    )


def check_key(kind: str, key: Any) -> str:
    """``key`` if MLflow accepts it as a ``kind`` (metric, param, tag, model) name, else ``ValueError``.

    >>> check_key("metric", "system/cpu")
    'system/cpu'
    """
    if not isinstance(key, str) or not _KEY_RE.match(key) or len(key) > MAX_KEY:
        raise ValueError(
            f"{kind} name {key!r} is invalid; expected 1-{MAX_KEY} characters of letters, digits, "
            "'_', '-', '.', ' ', ':' or '/'"
        )
    return key


def check_step(step: Any, name: str = "step") -> int:
    """``step`` as an ``int`` if it is a non-negative integer (not a bool), else ``ValueError``.

    >>> check_step(0)
    0
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"{name}={step!r} is invalid; expected a non-negative integer")
    return int(step)


def now_ms() -> int:
    """Wall-clock time in milliseconds, the timestamp MLflow stores with a metric."""
    return int(time.time() * 1000)


def safe_name(name: str) -> str:
    """A W&B artifact name (letters, digits, '-', '_' and '.').

    >>> safe_name("ppo actor")
    'ppo-actor'
    """
    return re.sub(r"[^\w.\-]", "-", name).strip("-") or "artifact"
