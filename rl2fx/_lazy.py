"""One lazy-export mechanism for ``rl2fx`` and its sub-packages (PEP 562 ``__getattr__``).

Heavy back ends (BoTorch, MLflow, W&B, transformers) load only when a name that needs
them is first used, so ``import rl2fx`` stays fast.

>>> getattr_, dir_ = lazy_exports("demo_pkg", {"sqrt": "math"}, {})
>>> getattr_("sqrt")(4.0)
2.0
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, names: Mapping[str, str], namespace: dict[str, Any], submodules: frozenset[str] | set[str] = frozenset()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps a public name to its module.

    A resolved name is cached in ``namespace`` (the package's ``globals()``), so the
    lookup runs once. ``submodules`` are imported as ``package.<name>`` on first access.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names) | set(submodules))

    return __getattr__, __dir__
