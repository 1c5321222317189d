"""The two operations every rl2fx registry shares (estimators, policy losses): add a name, look one up.

>>> table = {}
>>> put(table, "widget", "gear", 1, fn=len, unregister="unregister_widget")
>>> lookup(table, "widget", "geer")
Traceback (most recent call last):
...
ValueError: unknown widget 'geer'; did you mean 'gear'? Registered: ['gear']
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def put(table: dict[str, Any], kind: str, name: str, spec: Any, *, fn: Callable[..., Any], unregister: str) -> None:
    """Store ``spec`` under ``name``; a different function under a taken name raises (the same one, from a
    module imported again, replaces it)."""
    old = table.get(name)
    old_fn = getattr(old, "fn", None)
    if old is not None and getattr(old_fn, "__qualname__", None) != getattr(fn, "__qualname__", None):
        raise ValueError(f"{kind} {name!r} is already registered ({old_fn.__module__}.{old_fn.__qualname__}); "
                         f"{unregister}({name!r}) first")
    table[name] = spec


def lookup(table: dict[str, T], kind: str, name: Any) -> T:
    """``table[name]``, or a ``ValueError`` naming the registered names with a did-you-mean."""
    spec = table.get(name) if isinstance(name, str) else None
    if spec is None:
        known = list(table)
        best = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
        hint = f"; did you mean {best[0]!r}?" if best else ";"
        raise ValueError(f"unknown {kind} {name!r}{hint} Registered: {known}")
    return spec
