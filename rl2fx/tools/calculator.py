"""A calculator tool as an environment: ``<calc>2*(3+4)</calc>`` in a response is answered with ``<result>14</result>``.

The expression is parsed with :mod:`ast` and evaluated by walking the tree;
only numbers, ``+ - * / **``, unary ``-``/``+`` and parentheses are allowed, and
nothing from the model's text is ever passed to ``eval``. Limits keep a hostile
or runaway expression cheap: its length (``max_length`` characters), the
exponent of ``**`` (``|exponent| <= max_exponent``) and the magnitude of every
intermediate value (``<= max_abs``). Names, attribute access, calls,
subscripts, comparisons, strings, lambdas... are rejected with
:class:`CalculatorError` before anything is evaluated.

:func:`env_step` follows :mod:`rl2fx.envs`' protocol: the first ``<calc>...</calc>``
in ``sample.action_text`` is evaluated and the next state is
``state_text + action_text + "<result>VALUE</result>"`` (or
``"<result>error: WHY</result>"``), reward 0, not done. A response without a
tool call ends the episode; its reward is 1.0 when the last number in it equals
the row's ``answer`` column (within 1e-6), else 0.0.

>>> safe_eval("2*(3+4)")
14
>>> safe_eval("__import__('os')")
Traceback (most recent call last):
...
rl2fx.tools.calculator.CalculatorError: not allowed in a calculator expression: Call
"""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Any

__all__ = ["CalculatorError", "safe_eval", "format_number", "CALL", "env_step"]

#: The tool-call syntax: the expression between ``<calc>`` and ``</calc>``.
CALL = re.compile(r"<calc>(.*?)</calc>", re.S)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class CalculatorError(ValueError):
    """An expression the calculator refuses (syntax, a disallowed construct, a limit) or cannot evaluate."""


def safe_eval(expr: str, *, max_length: int = 200, max_exponent: int = 64, max_abs: float = 1e15) -> int | float:
    """Evaluate an arithmetic expression without ``eval``: numbers, ``+ - * / **``, unary signs, parentheses.

    Integers stay exact; ``/`` gives a float. Raises :class:`CalculatorError` for
    anything else, for an expression longer than ``max_length`` characters, an
    exponent with ``|e| > max_exponent``, any intermediate value with
    ``|x| > max_abs``, division by zero, or a complex result.

    >>> safe_eval("-2 ** 2"), safe_eval("7 / 2"), safe_eval("(1+2)*3")
    (-4, 3.5, 9)
    >>> safe_eval("9 ** 9 ** 9")
    Traceback (most recent call last):
    ...
    rl2fx.tools.calculator.CalculatorError: exponent 387420489 is larger than max_exponent=64
    """
    if not isinstance(expr, str):
        raise CalculatorError(f"expression must be a string, got {type(expr).__name__}")
    if len(expr) > max_length:
        raise CalculatorError(f"expression has {len(expr)} characters, more than max_length={max_length}")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError) as e:
        raise CalculatorError(f"not an arithmetic expression: {expr!r}") from e
    # check the whole tree before evaluating anything
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant)) or type(node) in _BINARY \
            or type(node) in _UNARY
        if not ok:
            raise CalculatorError(f"not allowed in a calculator expression: {type(node).__name__}")
        if isinstance(node, ast.Constant) and (isinstance(node.value, bool)
                                               or not isinstance(node.value, (int, float))):
            raise CalculatorError(f"only numbers are allowed, got {node.value!r}")

    def check(x: int | float) -> int | float:
        if isinstance(x, complex) or not math.isfinite(float(x)) or abs(x) > max_abs:
            raise CalculatorError(f"intermediate value out of range (|x| <= max_abs={max_abs:g} allowed)")
        return x

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return check(node.value)
        if isinstance(node, ast.UnaryOp):
            return check(_UNARY[type(node.op)](ev(node.operand)))
        assert isinstance(node, ast.BinOp)
        a, b = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.Pow) and abs(b) > max_exponent:
            raise CalculatorError(f"exponent {b} is larger than max_exponent={max_exponent}")
        try:
            return check(_BINARY[type(node.op)](a, b))
        except ZeroDivisionError as e:
            raise CalculatorError("division by zero") from e
        except OverflowError as e:
            raise CalculatorError(f"value out of range (|x| <= max_abs={max_abs:g} allowed)") from e

    try:
        return ev(tree)
    except RecursionError as e:
        raise CalculatorError("expression nested too deeply") from e


def format_number(x: int | float) -> str:
    """An integral value without a decimal point, anything else with up to 10 significant digits.

    >>> format_number(14), format_number(14.0), format_number(1 / 3)
    ('14', '14', '0.3333333333')
    """
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x) if isinstance(x, int) else f"{x:.10g}"


def env_step(sample: Any) -> dict[str, Any]:
    """One turn: answer the first ``<calc>`` call, or end the episode and score the final answer."""
    text = sample.action_text
    call = CALL.search(text)
    if call is not None:
        try:
            result = format_number(safe_eval(call.group(1)))
        except CalculatorError as e:
            result = f"error: {e}"
        return {"next_state": sample.state_text + text + f"<result>{result}</result>", "done": False, "reward": 0.0}
    answer = sample.sample.get("answer") if isinstance(sample.sample, dict) else None
    numbers = _NUMBER.findall(text)
    reward = 0.0
    if answer is not None and numbers:
        try:
            reward = float(abs(float(numbers[-1]) - float(answer)) <= 1e-6)
        except (TypeError, ValueError):
            reward = 0.0
    return {"next_state": None, "done": True, "reward": reward}
