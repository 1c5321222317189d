r"""The estimator registry: the one source of advantage-estimator names.

An estimator is a function registered under a name with
:func:`register_estimator`. What it accepts is read from its signature, split
into three kinds:

* **batch inputs** (:data:`BATCH_INPUTS`): tensors and facts of the rollout batch
  that a trainer supplies (``rewards``, ``values``, ``mask``, ``log_rhos``,
  ``group_size``, ...);
* **options** (:data:`OPTIONS`): how to compute, not what (``backend``,
  ``allow_nonfinite``);
* **hyperparameters**: every other keyword (``gamma``, ``lamda``, ``rho_bar``,
  ...). These are what a config sets under ``adv.<name>.<param>``; their
  defaults are the function's own, overridden by the ``defaults`` given at
  registration (the feature spec's values).

An estimator returns the advantages (a tensor), ``(advantages, returns)``, or a
mapping with ``"advantages"`` and optionally ``"returns"`` and extras. Missing
returns are filled by :func:`~rl2fx.returns.unified.advantages`.

Everything that lists estimators derives from here: ``advantages()``,
``compute_advantages_unified()``, the config's ``adv.estimator`` choices and
``adv.<name>`` sections, whether the trainer builds a critic, the ablation arms,
the CLI help and the docs' estimator table.

>>> import torch
>>> @register_estimator("mean_baseline_demo", needs_values=False)
... def mean_baseline_demo(rewards: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
...     return scale * (rewards - rewards.mean())
>>> est = get_estimator("mean_baseline_demo")
>>> est.inputs, est.hyperparameters, dict(est.defaults)
(('rewards',), ('scale',), {'scale': 1.0})
>>> "mean_baseline_demo" in list_estimators()
True
>>> unregister_estimator("mean_baseline_demo")
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import torch

from rl2fx._registry import lookup, put

__all__ = [
    "BATCH_INPUTS",
    "OPTIONS",
    "Estimator",
    "register_estimator",
    "unregister_estimator",
    "list_estimators",
    "get_estimator",
    "check_hyperparameters",
    "estimator_table",
    "write_estimator_table",
]

#: Names an estimator may read from the rollout batch (supplied by the caller, not set in a config).
BATCH_INPUTS: frozenset[str] = frozenset({
    "rewards", "values", "mask", "log_rhos", "terminated", "done", "bootstrap_value",
    "q_values", "v_next", "greedy_rewards", "lengths", "group_size", "group",
    "reward_components", "reward_weights", "old_logprobs", "sum_pi_squared", "rollout_is_weights",
})
#: Execution options: they change how a result is computed or checked, never its definition.
OPTIONS: frozenset[str] = frozenset({"backend", "allow_nonfinite"})

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: the function and what its signature says it takes.

    ``inputs``: the batch inputs it reads; ``hyperparameters``: the other keywords
    (options excluded); ``defaults``: every hyperparameter's default (the
    function's own, overridden by the registration's ``defaults``); ``required``:
    arguments with no default anywhere (they must be passed).
    """

    name: str
    fn: Callable[..., Any]
    needs_values: bool
    defaults: Mapping[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    hyperparameters: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    required: tuple[str, ...] = ()

    @property
    def accepts(self) -> tuple[str, ...]:
        """Every keyword the function takes."""
        return self.inputs + self.hyperparameters + self.options


_REGISTRY: dict[str, Estimator] = {}


def _describe(name: str, fn: Callable[..., Any], needs_values: bool, defaults: Mapping[str, Any]) -> Estimator:
    sig = inspect.signature(fn)
    inputs, hypers, options, required = [], [], [], []
    own: dict[str, Any] = {}
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"estimator {name!r}: *args/**kwargs hide what it accepts; name every parameter "
                            f"(got {p}) in {fn.__qualname__}{sig}")
        if p.kind is p.POSITIONAL_ONLY:
            raise TypeError(f"estimator {name!r}: parameter {p.name!r} is positional-only; estimators are "
                            "called with keywords")
        kind = inputs if p.name in BATCH_INPUTS else options if p.name in OPTIONS else hypers
        kind.append(p.name)
        if p.default is not p.empty:
            if kind is hypers:
                own[p.name] = p.default
        elif p.name not in defaults:
            required.append(p.name)
    unknown = sorted(set(defaults) - set(hypers))
    if unknown:
        raise ValueError(f"register_estimator({name!r}): defaults {unknown} are not hyperparameters of "
                         f"{fn.__qualname__}; its hyperparameters are {hypers}")
    if needs_values and "values" not in inputs:
        raise ValueError(f"register_estimator({name!r}, needs_values=True): {fn.__qualname__} has no 'values' "
                         "parameter")
    merged = {**own, **dict(defaults)}
    return Estimator(name=name, fn=fn, needs_values=bool(needs_values),
                     defaults=MappingProxyType({k: merged[k] for k in hypers if k in merged}),
                     inputs=tuple(inputs), hyperparameters=tuple(hypers), options=tuple(options),
                     required=tuple(required))


def register_estimator(name: str, *, needs_values: bool, defaults: Mapping[str, Any] | None = None) -> Callable[[F], F]:
    """Decorator: register ``fn`` as the estimator ``name`` (returned unchanged).

    ``needs_values``: whether it reads a value model's ``values`` (a trainer then
    builds a critic for it). ``defaults``: hyperparameter defaults that replace
    the function's own (each must be a hyperparameter of the signature).
    Registering a name twice raises, unless it is the same function (a module
    imported again); :func:`unregister_estimator` frees a name.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"estimator name must be a Python identifier (it becomes the config key adv.<name>), "
                         f"got {name!r}")

    def deco(fn: F) -> F:
        put(_REGISTRY, "estimator", name, _describe(name, fn, needs_values, defaults or {}), fn=fn,
            unregister="unregister_estimator")
        return fn

    return deco


def unregister_estimator(name: str) -> None:
    """Remove ``name`` from the registry (for tests and interactive redefinition)."""
    get_estimator(name)
    del _REGISTRY[name]


def _ensure_builtins() -> None:
    import rl2fx.returns  # noqa: F401  (importing the package registers the built-in estimators)


def list_estimators() -> list[str]:
    """Names of the registered estimators, built-ins first in their documented order.

    >>> {"gae", "vtrace", "grpo"} <= set(list_estimators())
    True
    """
    _ensure_builtins()
    return list(_REGISTRY)


def get_estimator(name: str) -> Estimator:
    """The registered :class:`Estimator` called ``name``; ``ValueError`` with a did-you-mean otherwise.

    >>> get_estimator("vtrace").defaults["rho_bar"], get_estimator("vtrace").needs_values
    (1.0, True)
    >>> get_estimator("vtrce")
    Traceback (most recent call last):
    ...
    ValueError: unknown estimator 'vtrce'; did you mean 'vtrace'? Registered: [...]
    """
    _ensure_builtins()
    return lookup(_REGISTRY, "estimator", name)


def _probe_batch(spec: Estimator) -> dict[str, Any]:
    """Two prompts of two responses, two steps each: enough for every built-in's own checks."""
    r = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.5]])
    batch: dict[str, Any] = {"rewards": r, "values": torch.full_like(r, 0.5), "mask": torch.ones_like(r, dtype=torch.bool),
                             "log_rhos": torch.zeros_like(r), "group_size": 2,
                             "greedy_rewards": torch.tensor([0.5, 0.5])}
    return {k: v for k, v in batch.items() if k in spec.inputs}


def check_hyperparameters(name: str, params: Mapping[str, Any]) -> None:
    """Check hyperparameters for estimator ``name`` by the estimator's own rules.

    Unknown names raise ``ValueError`` naming them (with a did-you-mean). The
    values are then checked by running the estimator once on a tiny probe batch,
    so its own range and type checks speak (``rho_bar must be > 0, got -1``);
    nothing here repeats them. Non-finite floats are rejected first.

    >>> check_hyperparameters("vtrace", {"rho_bar": 2.0})
    >>> check_hyperparameters("vtrace", {"rho_barr": 2.0})
    Traceback (most recent call last):
    ...
    ValueError: estimator 'vtrace' has no hyperparameter 'rho_barr'; did you mean 'rho_bar'? It takes [...]
    >>> check_hyperparameters("vtrace", {"rho_bar": -1.0})
    Traceback (most recent call last):
    ...
    ValueError: rho_bar must be in (0.0, inf], got -1.0
    """
    spec = get_estimator(name)
    for key, value in params.items():
        if key not in spec.hyperparameters:
            best = difflib.get_close_matches(str(key), list(spec.hyperparameters), n=1, cutoff=0.5)
            hint = f"; did you mean {best[0]!r}?" if best else ";"
            raise ValueError(f"estimator {name!r} has no hyperparameter {key!r}{hint} It takes "
                             f"{list(spec.hyperparameters)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key} must be finite, got {value}")
    args = {**spec.defaults, **dict(params), **_probe_batch(spec)}
    missing = [k for k in spec.required if k not in args]
    if missing:
        return  # needs inputs a probe cannot invent; the first real call checks the values
    with torch.no_grad():
        spec.fn(**args)


# ------------------------------------------------------------------------------ the docs' table
#: The markers around the generated table in docs/returns.md.
TABLE_BEGIN = "<!-- estimator-table:begin (generated by rl2fx.returns.registry.write_estimator_table) -->"
TABLE_END = "<!-- estimator-table:end -->"


def _summary(fn: Callable[..., Any]) -> str:
    """The first paragraph of ``fn``'s docstring, on one line, as Markdown."""
    doc = inspect.getdoc(fn) or ""
    para = " ".join(doc.split("\n\n", 1)[0].split())
    para = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", para)  # Sphinx roles: :func:`x` -> `x`
    return para.replace("``", "`").replace("|", "\\|")


def _code_list(names: Iterable[str]) -> str:
    return ", ".join(f"`{n}`" for n in names) or "-"


def estimator_table(names: Iterable[str] | None = None) -> str:
    """A Markdown table of the registered estimators (``names``, default all, in
    registration order): name, whether it needs values, its required and optional
    batch inputs, its hyperparameters with defaults, and the first paragraph of its
    docstring. docs/returns.md carries it between :data:`TABLE_BEGIN` and
    :data:`TABLE_END`; :func:`write_estimator_table` refreshes it there.

    >>> print(estimator_table(["gae"]).splitlines()[2].split(" | ")[:5])
    ['| `gae`', 'yes', '`rewards`, `values`', '`bootstrap_value`, `mask`, `terminated`, `done`', '`gamma=0.99`, `lamda=0.95`']
    """
    rows = [
        "| estimator | needs values | inputs | optional inputs | hyperparameters (defaults) | summary |",
        "|---|---|---|---|---|---|",
    ]
    for name in list_estimators() if names is None else names:
        spec = get_estimator(name)
        required = [n for n in spec.inputs if n in spec.required]
        optional = [n for n in spec.inputs if n not in spec.required]
        hypers = [f"`{h}={spec.defaults[h]!r}`" if h in spec.defaults else f"`{h}`" for h in spec.hyperparameters]
        rows.append(f"| `{name}` | {'yes' if spec.needs_values else 'no'} | {_code_list(required)} | "
                    f"{_code_list(optional)} | {', '.join(hypers) or '-'} | {_summary(spec.fn)} |")
    return "\n".join(rows) + "\n"


def _builtin_names() -> list[str]:
    return [n for n in list_estimators() if get_estimator(n).fn.__module__.startswith("rl2fx.returns.")]


def write_estimator_table(path: str | Path = "docs/returns.md") -> bool:
    """Replace the table between the markers in ``path`` with :func:`estimator_table` of the
    built-in estimators; returns whether the file changed.

    Regenerate the docs with
    ``python -c "from rl2fx.returns.registry import write_estimator_table as w; w()"``
    from the repository root.
    """
    path = Path(path)
    text = path.read_text()
    pattern = re.compile(re.escape(TABLE_BEGIN) + r"\n.*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no estimator-table markers ({TABLE_BEGIN!r} ... {TABLE_END!r})")
    new = pattern.sub(lambda _: f"{TABLE_BEGIN}\n\n{estimator_table(_builtin_names())}\n{TABLE_END}", text)
    if new != text:
        path.write_text(new)
    return new != text
