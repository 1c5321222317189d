"""The environment protocol (RL2's ``env_step``): loading, sync/async stepping, validation, and the calculator tool."""

from __future__ import annotations

import asyncio
import builtins
import textwrap

import pytest

from rl2fx.envs import EnvError, EnvSample, check_env_response, load_env, step_env
from rl2fx.tools import calculator
from rl2fx.tools.calculator import CalculatorError, safe_eval

# An RL2 environment (RL2's envs/countdown.py shape: async env_step reading sample.sample and
# sample.action_text), with its import naming rl2fx instead of RL2.
RL2_STYLE_ENV = textwrap.dedent('''
    from typing import Dict, Any
    import re
    from rl2fx.envs import Sample

    async def env_step(sample: Sample) -> Dict[str, Any]:
        env_response = {"next_state": None, "done": True, "reward": 0.0}
        match = re.search(r"<answer>(.*?)</answer>", sample.action_text)
        if match is None:
            env_response["done"] = False
            env_response["next_state"] = sample.state_text + sample.action_text + "\\nanswer in tags:"
            return env_response
        numbers = [int(n) for n in re.findall(r"\\d+", match.group(1))]
        env_response["reward"] = float(sum(numbers) == sample.sample["target"])
        return env_response
''')


def _sample(action: str, *, index: int = 0, row: dict | None = None, state: str = "q:") -> EnvSample:
    return EnvSample(sample=row or {"target": 5}, state_text=state, action_text=action, turn=1, index=index)


def test_rl2_style_env_file_runs_unchanged(tmp_path):
    path = tmp_path / "countdown_like.py"
    path.write_text(RL2_STYLE_ENV)
    env = load_env(str(path))
    assert env.is_async and env.name == str(path)
    out = step_env(env, [_sample("<answer>2 3</answer>"), _sample("<answer>4</answer>", index=1), _sample("5")])
    assert out[0] == {"next_state": None, "done": True, "reward": 1.0}
    assert out[1] == {"next_state": None, "done": True, "reward": 0.0}
    assert out[2] == {"next_state": "q:5\nanswer in tags:", "done": False, "reward": 0.0}
    import sys
    assert not any(str(tmp_path) in p for p in sys.path)  # loaded without touching sys.path


def test_async_env_steps_run_concurrently():
    # each step waits until all have started: sequential stepping would time out
    started, n = [], 4

    async def env_step(sample):
        started.append(sample.index)
        await asyncio.wait_for(_until(lambda: len(started) == n), timeout=5.0)
        return {"next_state": None, "done": True, "reward": float(sample.index)}

    out = step_env(env_step, [_sample("a", index=i) for i in range(n)])
    assert [o["reward"] for o in out] == [0.0, 1.0, 2.0, 3.0]


async def _until(cond):
    while not cond():
        await asyncio.sleep(0)


def test_async_env_inside_a_running_event_loop():
    async def env_step(sample):
        return {"next_state": None, "done": True, "reward": 2.0}

    async def caller():  # as in a notebook, where a loop is already running
        return step_env(env_step, [_sample("a")])

    assert asyncio.run(caller())[0]["reward"] == 2.0


def test_object_and_module_envs():
    class Env:
        def env_step(self, sample):
            return {"next_state": None, "done": True, "reward": 3}

    assert step_env(Env(), [_sample("a")]) == [{"next_state": None, "done": True, "reward": 3.0}]
    assert load_env(calculator).name == "rl2fx.tools.calculator"


def test_raising_env_fails_only_its_sample():
    def env_step(sample):
        if sample.index == 1:
            raise RuntimeError("tool crashed")
        return {"next_state": None, "done": True, "reward": 1.0}

    out = step_env(env_step, [_sample("a", index=i) for i in range(3)])
    assert isinstance(out[1], RuntimeError) and out[0]["reward"] == out[2]["reward"] == 1.0


@pytest.mark.parametrize("bad, match", [
    ([1, 2], "must return a dict"),
    ({"done": True, "reward": 1.0}, r"missing \['next_state'\]"),
    ({"next_state": None, "done": True, "reward": 1.0, "score": 1.0}, r"unexpected \['score'\]"),
    ({"next_state": None, "done": 1, "reward": 1.0}, "done must be a bool"),
    ({"next_state": None, "done": True, "reward": "1"}, "reward must be a real number"),
    ({"next_state": None, "done": True, "reward": True}, "reward must be a real number"),
    ({"next_state": None, "done": True, "reward": float("inf")}, "finite"),
    ({"next_state": None, "done": True, "reward": float("nan")}, "finite"),
    ({"next_state": 3, "done": False, "reward": 0.0}, "next_state must be str or None"),
    ({"next_state": ["a"], "done": False, "reward": 0.0}, "next_state must be str or None"),
    ({"next_state": None, "done": False, "reward": 0.0}, "next_state is None but done is False"),
])
def test_malformed_responses_name_env_and_sample(bad, match):
    with pytest.raises(EnvError, match=match) as e:
        step_env(lambda s: bad, [_sample("a"), _sample("b", index=7)])
    assert "sample 0" in str(e.value) and "<lambda>" in str(e.value)
    with pytest.raises(EnvError, match="environment 'my_env', sample 7"):
        check_env_response(bad, env="my_env", index=7)


def test_load_errors(tmp_path):
    with pytest.raises(EnvError, match="does not exist"):
        load_env(str(tmp_path / "missing.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(EnvError, match="has no env_step"):
        load_env(tmp_path / "empty.py")
    (tmp_path / "notfn.py").write_text("env_step = 3\n")
    with pytest.raises(EnvError, match="env_step is int"):
        load_env(tmp_path / "notfn.py")
    (tmp_path / "env.txt").write_text("def env_step(s): pass\n")
    with pytest.raises(EnvError, match="not a .py file"):
        load_env(tmp_path / "env.txt")


# --- the calculator tool --------------------------------------------------------------------------------------


@pytest.mark.parametrize("expr, value", [
    ("2*(3+4)", 14), ("-3+2", -1), ("7/2", 3.5), ("2**10", 1024), ("-(2)**2", -4), ("1.5*2", 3.0),
    ("((1))", 1), ("+5", 5), ("2**-1", 0.5),
])
def test_calculator_evaluates_arithmetic(expr, value):
    assert safe_eval(expr) == value


@pytest.mark.parametrize("expr, match", [
    ("__import__('os')", "Call"),
    ("__import__('os').system('true')", "not allowed"),
    ("os.system('true')", "not allowed"),
    ("(1).__class__", "Attribute"),
    ("x", "Name"),
    ("x + 1", "Name"),
    ("'a' * 3", "only numbers"),
    ("[1, 2]", "List"),
    ("lambda: 1", "Lambda"),
    ("1 if 1 else 2", "IfExp"),
    ("1 < 2", "Compare"),
    ("True + 1", "only numbers"),
    ("1j * 1j", "only numbers"),
    ("2 ** 100000", "max_exponent"),
    ("9 ** 9 ** 9", "max_exponent"),
    ("10 ** 60", "out of range"),
    ("10**15 * 10**15", "out of range"),
    ("1e308 * 10", "out of range"),
    ("(-8) ** 0.5", "out of range"),
    ("1 / 0", "division by zero"),
    ("1 +", "not an arithmetic expression"),
    ("1" * 201, "max_length"),
    ("(" * 150 + "1" + ")" * 150, "max_length"),
    ("1; import os", "not an arithmetic expression"),
])
def test_calculator_rejects_everything_else(expr, match):
    with pytest.raises(CalculatorError, match=match):
        safe_eval(expr)


def test_calculator_never_calls_eval(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("eval was called")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    assert safe_eval("2*(3+4)") == 14


def test_calculator_env_step():
    s = _sample("let me compute <calc>2*(3+4)</calc>", state="q: 2*(3+4)?", row={"answer": "14"})
    assert calculator.env_step(s) == {"next_state": "q: 2*(3+4)?let me compute <calc>2*(3+4)</calc><result>14</result>",
                                      "done": False, "reward": 0.0}
    bad = calculator.env_step(_sample("<calc>__import__('os')</calc>"))
    assert "<result>error: not allowed" in bad["next_state"] and not bad["done"]
    assert calculator.env_step(_sample("it is 14", row={"answer": "14"}))["reward"] == 1.0
    assert calculator.env_step(_sample("it is 15", row={"answer": 14}))["reward"] == 0.0
    assert calculator.env_step(_sample("no idea", row={"answer": 14})) == {"next_state": None, "done": True,
                                                                           "reward": 0.0}
    # it satisfies the protocol through the checker
    assert step_env(calculator, [s])[0]["done"] is False


def _expressions():
    from hypothesis import strategies as st

    leaf = st.integers(0, 20).map(str)

    def extend(inner):
        binary = st.tuples(inner, st.sampled_from(["+", "-", "*", "/"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})")
        power = st.tuples(inner, st.integers(0, 3)).map(lambda t: f"({t[0]}) ** {t[1]}")
        return binary | power | inner.map(lambda e: f"-{e}")

    return st.recursive(leaf, extend, max_leaves=8)


def test_calculator_agrees_with_python_arithmetic():
    from hypothesis import given

    @given(_expressions())
    def check(expr):
        try:
            want = eval(expr, {"__builtins__": {}}, {})  # noqa: S307 - trusted, generated by the test itself
        except ZeroDivisionError:
            with pytest.raises(CalculatorError, match="division by zero"):
                safe_eval(expr)
            return
        except OverflowError:
            with pytest.raises(CalculatorError):
                safe_eval(expr)
            return
        if isinstance(want, complex) or abs(want) > 1e15:
            with pytest.raises(CalculatorError):
                safe_eval(expr)
            return
        if len(expr) > 200:
            with pytest.raises(CalculatorError, match="max_length"):
                safe_eval(expr)
            return
        try:
            got = safe_eval(expr)
        except CalculatorError as e:  # an intermediate value may pass max_abs although the result does not
            assert "out of range" in str(e) and "**" in expr
            return
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12) and type(got) is type(want)

    check()
