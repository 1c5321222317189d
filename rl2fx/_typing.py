"""Shape-annotated tensor aliases and the one runtime checker used by every public function.

Every public function in rl2fx is decorated with :func:`typechecked`, which applies
jaxtyping's shape binding with beartype as the type checker. A wrong rank, a
mismatched dimension or a wrong dtype raises :class:`ShapeError` (a ``TypeError``)
whose message names the offending argument.

Dimension names are shared across the package: ``batch``, ``time``, ``n``, ``m``,
``vocab``. ``*batch`` means any number of leading dimensions (including none).

Set the environment variable ``RL2FX_TYPECHECK=0`` to skip the runtime checks
(for example inside a hot loop that has already been validated).

>>> import torch
>>> from rl2fx._typing import typechecked, Float, Tensor
>>> @typechecked
... def add(x: Float[Tensor, "*batch time"], y: Float[Tensor, "*batch time"]) -> Float[Tensor, "*batch time"]:
...     return x + y
>>> add(torch.zeros(2, 3), torch.ones(2, 3)).shape
torch.Size([2, 3])
>>> try:
...     add(torch.zeros(2, 3), torch.ones(2, 4))
... except TypeError as e:
...     print("parameter 'y'" in str(e))
True
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from beartype import beartype
from jaxtyping import Bool, Float, Int, Integer, Num, Shaped, TypeCheckError, jaxtyped
from torch import Tensor

__all__ = [
    "Bool",
    "Float",
    "Int",
    "Integer",
    "Num",
    "Shaped",
    "Tensor",
    "ShapeError",
    "Scalar",
    "typechecked",
    "check_finite",
    "check_range",
    "check_choice",
    "check_mask",
    "TYPECHECK",
]

#: Whether runtime shape/type checks are on (``RL2FX_TYPECHECK=0`` turns them off).
TYPECHECK: bool = os.environ.get("RL2FX_TYPECHECK", "1") not in {"0", "false", "False", "no"}

#: The error raised for a wrong shape, rank or dtype. It is jaxtyping's
#: ``TypeCheckError``, a subclass of ``TypeError``; its message names the argument.
ShapeError = TypeCheckError

#: A Python number or a 0-d tensor.
Scalar = float | int | Float[Tensor, ""]

F = TypeVar("F", bound=Callable[..., Any])


class _Uncacheable(Exception):
    pass


def _arg_key(a: Any) -> Any:
    # everything the checks look at: a tensor's type, dtype and shape; a scalar's
    # type; a string's value (it may be checked against a Literal)
    if isinstance(a, Tensor):
        return (type(a), a.dtype, a.shape)
    if a is None or type(a) in (bool, int, float):
        return type(a)
    if type(a) is str:
        return a
    raise _Uncacheable  # containers, objects: beartype may look inside; always check


def _call_key(args: tuple, kwargs: dict) -> tuple | None:
    try:
        return (
            tuple(_arg_key(a) for a in args),
            tuple((k, _arg_key(v)) for k, v in kwargs.items()),
        )
    except _Uncacheable:
        return None


#: Signatures remembered per function before the memory is cleared.
_SEEN_MAX = 256


def typechecked(fn: F) -> F:
    """Decorate ``fn`` with jaxtyping shape binding checked by beartype.

    The check covers every annotated argument and the return value. Dimensions
    with the same name must agree across arguments within one call.

    A call whose arguments are all tensors, scalars, strings or ``None`` is
    checked once per signature (tensor types, dtypes and shapes; scalar types;
    string values): repeats of a signature that passed skip the check, which
    costs 0.1-0.3 ms per call, as much as GAE on a 4096-step row. Any other new
    signature, and every failing one, is checked in full.
    """
    if not TYPECHECK:
        return fn
    checked = jaxtyped(typechecker=beartype)(fn)
    seen: dict[tuple, None] = {}

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        key = _call_key(args, kwargs)
        if key is not None and key in seen:
            return fn(*args, **kwargs)
        out = checked(*args, **kwargs)
        if key is not None:
            if len(seen) >= _SEEN_MAX:
                seen.clear()
            seen[key] = None
        return out

    return wrapper  # type: ignore[return-value]


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``low <= value <= high``.

    ``value`` may be a Python number or a tensor (every element is checked).
    Bounds are inclusive unless told otherwise. NaN is always out of range.

    >>> check_range("gamma", 0.99, 0.0, 1.0)
    >>> check_range("gamma", 1.5, 0.0, 1.0)
    Traceback (most recent call last):
    ...
    ValueError: gamma must be in [0.0, 1.0], got 1.5
    """
    if isinstance(value, Tensor):
        if value.numel() == 0:
            return
        v = value.detach()
        lo_v = v.min().item()
        hi_v = v.max().item()
        bad_nan = bool(torch.isnan(v).any())
        shown: Any = f"a tensor with values in [{lo_v}, {hi_v}]" + (" containing NaN" if bad_nan else "")
    else:
        lo_v = hi_v = float(value)
        bad_nan = math.isnan(lo_v)
        shown = value
    lo_ok = low is None or (lo_v >= low if low_inclusive else lo_v > low)
    hi_ok = high is None or (hi_v <= high if high_inclusive else hi_v < high)
    if bad_nan or not (lo_ok and hi_ok):
        lb = "(" if not low_inclusive else "["
        rb = ")" if not high_inclusive else "]"
        lo_s = "-inf" if low is None else low
        hi_s = "inf" if high is None else high
        raise ValueError(f"{name} must be in {lb}{lo_s}, {hi_s}{rb}, got {shown}")


def check_choice(name: str, value: Any, allowed: Any) -> None:
    """Raise ``ValueError`` naming ``name`` and listing ``allowed`` unless ``value in allowed``.

    >>> check_choice("method", "gae", ["gae", "vtrace"])
    >>> check_choice("method", "gea", ["gae", "vtrace"])
    Traceback (most recent call last):
    ...
    ValueError: method must be one of ['gae', 'vtrace'], got 'gea'
    """
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_finite(name: str, x: Tensor | None, *, allow_nonfinite: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds NaN or ±inf.

    Estimators call this on their inputs unless the caller opts out with
    ``allow_nonfinite=True``.

    >>> import torch
    >>> check_finite("rewards", torch.tensor([1.0, float("nan")]))
    Traceback (most recent call last):
    ...
    ValueError: rewards contains 1 non-finite value(s) (NaN or inf), first at index (1,); pass allow_nonfinite=True to skip this check
    """
    if allow_nonfinite or x is None or not x.is_floating_point():
        return
    # One reduction, no boolean temporary: a finite sum proves every element
    # finite (NaN and inf propagate). An overflowing sum of finite values falls
    # through to the exact check.
    if bool(torch.isfinite(x.sum())):
        return
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        first = tuple(int(i) for i in bad[0].tolist())
        raise ValueError(
            f"{name} contains {bad.shape[0]} non-finite value(s) (NaN or inf), first at index "
            f"{first}; pass allow_nonfinite=True to skip this check"
        )


def check_mask(name: str, mask: Tensor | None) -> Tensor | None:
    """The one mask rule: ``mask`` is a bool tensor or holds only 0 and 1 (any dtype); returns a bool view.

    Estimators, whitening and losses all accept masks through here, so a mask that
    one accepts every other accepts, and a value such as 2 or -1 (a weight, or a
    sign error) raises ``ValueError`` naming the argument instead of being cast.

    >>> import torch
    >>> check_mask("mask", torch.tensor([1.0, 0.0]))
    tensor([ True, False])
    >>> check_mask("mask", torch.tensor([1, 2]))
    Traceback (most recent call last):
    ...
    ValueError: mask must be a bool tensor or hold only 0/1 values, got the value 2
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch tensor (bool or 0/1), got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise ValueError(
            f"{name} must be a bool tensor or hold only 0/1 values, got the value "
            f"{mask[bad].flatten()[0].item()!r}"
        )
    return mask != 0
