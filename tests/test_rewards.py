"""rl2fx.rewards: calling user reward functions, checking their output, combining the scores."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.pareto import tchebycheff
from rl2fx.returns import gdpo
from rl2fx.rewards import (
    COMBINE_METHODS,
    RewardFunctionError,
    Scores,
    load_reward_func,
    reward_names,
    score,
)

NAN = float("nan")
PROMPTS = ["1+1=", "2+2=", "3+3="]
COMPLETIONS = ["2", "5", "66"]
COLUMNS = {"answer": ["2", "4", "6"]}


def correct(prompts, completions, answer, **kw):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def short(prompts, completions, **kw):
    return [-float(len(c)) for c in completions]


def test_two_weighted_functions_follow_trl_rule():
    s = score([correct, short], PROMPTS, COMPLETIONS, COLUMNS, weights=[2.0, 0.5])
    assert s.names == ("correct", "short")
    assert s.values.dtype == torch.float32 and s.values.shape == (3, 2)
    assert s.values.tolist() == [[1.0, -1.0], [0.0, -1.0], [0.0, -2.0]]
    # TRL: (rewards_per_func * weights).nansum(dim=1)
    assert s.combined().tolist() == [2.0 - 0.5, -0.5, -1.0]
    # explicit weights override the ones given to score; default without any is all ones
    assert s.combined(weights=[1.0, 1.0]).tolist() == [0.0, -1.0, -2.0]
    assert score([correct, short], PROMPTS, COMPLETIONS, COLUMNS).combined().tolist() == [0.0, -1.0, -2.0]
    assert s.means() == pytest.approx({"correct": 1 / 3, "short": -4 / 3})


def test_functions_get_keyword_arguments_and_every_column():
    seen = {}

    def spy(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return [0.0] * len(kwargs["completions"])

    score([spy], PROMPTS, COMPLETIONS, {"answer": ["a", "b", "c"], "level": [1, 2, 3]})
    assert seen["args"] == ()
    assert seen["kwargs"] == {"prompts": PROMPTS, "completions": COMPLETIONS,
                              "answer": ["a", "b", "c"], "level": [1, 2, 3]}


def test_none_is_skipped_and_counted():
    def math_only(prompts, completions, **kw):
        return [1.0, None, 0.5]

    def never(prompts, completions, **kw):
        return [None, None, None]

    s = score([math_only, never, short], PROMPTS, COMPLETIONS)
    assert s.valid.tolist() == [[True, False, True], [False, False, True], [True, False, True]]
    assert s.skipped() == {"math_only": 1, "never": 3, "short": 0}
    # a function that skipped everything has no mean (no NaN in the log), but is counted
    assert s.means() == pytest.approx({"math_only": 0.75, "short": -4 / 3})
    assert s.combined().tolist() == [1.0 - 1.0, -1.0, 0.5 - 2.0]
    m = s.metrics()
    assert m["rewards/never/skipped"] == 3.0 and "rewards/never/mean" not in m
    assert m["rewards/math_only/mean"] == pytest.approx(0.75)


@pytest.mark.parametrize("out", [
    np.array([1.0, 2.0, 3.0]), torch.tensor([1, 2, 3]), (1, 2, 3), [np.float32(1), np.int64(2), torch.tensor(3.0)],
    [True, 2, 3.0],
])
def test_accepted_return_types(out):
    s = score([lambda prompts, completions: out], PROMPTS, COMPLETIONS)
    assert s.values[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_names_are_unique_and_log_safe():
    def acc(prompts, completions, **kw):
        return [0.0] * len(completions)

    class Judge:
        def __call__(self, prompts, completions, **kw):
            return [0.0] * len(completions)

    names = reward_names([acc, acc, functools.partial(acc), Judge(), lambda prompts, completions: []])
    assert names == ("acc", "acc_1", "acc_2", "Judge", "reward_4")
    assert reward_names([acc, acc, type("acc_1", (), {"__call__": acc})()]) == ("acc", "acc_2", "acc_1")


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(RewardFunctionError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_wrong_length_names_function_and_lengths():
    def too_short(prompts, completions, **kw):
        return [1.0]

    msg = _error(score, [correct, too_short], PROMPTS, COMPLETIONS, COLUMNS)
    assert "reward_funcs[1] (too_short)" in msg and "returned 1 scores" in msg and "(3)" in msg


def test_wrong_return_type_and_2d_tensor():
    msg = _error(score, [lambda prompts, completions: 1.0], PROMPTS, COMPLETIONS)
    assert "reward_funcs[0] (a lambda)" in msg and "float" in msg
    msg = _error(score, [lambda prompts, completions: torch.zeros(3, 1)], PROMPTS, COMPLETIONS)
    assert "shape (3, 1)" in msg


@pytest.mark.parametrize("bad", [NAN, math.inf, -math.inf, np.float64("nan"), torch.tensor(float("inf"))])
def test_nonfinite_score_names_function_index_and_value(bad):
    def judge(prompts, completions, **kw):
        return [0.0, bad, 1.0]

    msg = _error(score, [judge], PROMPTS, COMPLETIONS)
    assert "reward_funcs[0] (judge)" in msg and "index 1" in msg
    assert ("nan" in msg) or ("inf" in msg)
    assert "None to skip" in msg


@pytest.mark.parametrize("bad", ["1.0", [1.0], 1 + 2j])
def test_non_number_element(bad):
    def judge(prompts, completions, **kw):
        return [0.0, 1.0, bad]

    msg = _error(score, [judge], PROMPTS, COMPLETIONS)
    assert "reward_funcs[0] (judge)" in msg and "index 2" in msg


def test_beyond_float32_range():
    msg = _error(score, [lambda prompts, completions: [1e39, 0, 0]], PROMPTS, COMPLETIONS)
    assert "float32" in msg and "index 0" in msg


def test_raised_exception_is_chained_and_named():
    def broken(prompts, completions, **kw):
        raise KeyError("answer")

    with pytest.raises(RewardFunctionError, match=r"reward_funcs\[0\] \(broken\) raised KeyError") as info:
        score([broken], PROMPTS, COMPLETIONS)
    assert isinstance(info.value.__cause__, KeyError)


def test_missing_column_in_signature_is_named():
    # a function that needs a column the dataset lacks: the TypeError is chained and named
    msg = _error(score, [correct], PROMPTS, COMPLETIONS)
    assert "reward_funcs[0] (correct) raised TypeError" in msg and "answer" in msg


@pytest.mark.parametrize("funcs", [[], None, "correct", [correct, "short"], [correct, 3], correct])
def test_reward_funcs_must_be_callables(funcs):
    msg = _error(score, funcs, PROMPTS, COMPLETIONS)
    assert "reward_funcs" in msg
    if funcs is correct:
        assert "wrap one function in a list: [correct]" in msg


def test_a_function_editing_its_arguments_does_not_affect_the_next():
    def greedy(prompts, completions, answer, **kw):
        answer[:] = completions  # mutates its own copy only
        completions.clear()
        return [0.0, 0.0, 0.0]

    columns = {"answer": list(COLUMNS["answer"])}
    s = score([greedy, correct], PROMPTS, COMPLETIONS, columns)
    assert s.values[:, 1].tolist() == [1.0, 0.0, 0.0]
    assert columns == COLUMNS and COMPLETIONS == ["2", "5", "66"]


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0], [1.0, NAN], [1.0, math.inf], "12", 2.0, [True, 1.0],
                                     torch.ones(2, 2)])
def test_bad_weights_name_reward_weights(weights):
    msg = _error(score, [correct, short], PROMPTS, COMPLETIONS, COLUMNS, weights=weights)
    assert msg.startswith("reward_weights")


def test_column_lengths_and_reserved_names():
    with pytest.raises(ValueError, match="column 'answer' has 2 values"):
        score([correct], PROMPTS, COMPLETIONS, {"answer": ["2", "4"]})
    with pytest.raises(ValueError, match="'completions'"):
        score([correct], PROMPTS, COMPLETIONS, {"completions": COMPLETIONS})
    with pytest.raises(ValueError, match="same length"):
        score([correct], PROMPTS[:2], COMPLETIONS, COLUMNS)


def test_tchebycheff_against_hand_computation():
    v = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, NAN], [0.0, 0.5, 1.0], [0.25, NAN, 0.0]])
    s = Scores(v, ("a", "b", "c"))
    w = [1.0, 2.0, 0.5]
    # ideal = column max over scored entries = (1, 1, 2); None -> column min: b -> 0, c -> 0
    # row 0: max(1*0, 2*1, .5*0)       = 2
    # row 1: max(1*.5, 2*0, .5*(2-0))  = 1
    # row 2: max(1*1, 2*.5, .5*1)      = 1
    # row 3: max(1*.75, 2*(1-0), .5*2) = 2
    assert s.combined(weights=w, method="tchebycheff").tolist() == [-2.0, -1.0, -1.0, -2.0]
    # a given ideal replaces the batch max: ideal (2, 2, 2)
    # row 0: max(1, 4, 0) = 4; row 1: max(1.5, 2, 1) = 2; row 2: max(2, 3, .5) = 3; row 3: max(1.75, 4, 1) = 4
    assert s.combined(weights=w, method="tchebycheff", ideal=[2, 2, 2]).tolist() == [-4.0, -2.0, -3.0, -4.0]
    # same as the pareto scalarizer on the imputed table
    filled = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 0.0], [0.0, 0.5, 1.0], [0.25, 0.0, 0.0]])
    ref = -tchebycheff(filled, torch.tensor(w), torch.tensor([1.0, 1.0, 2.0]))
    torch.testing.assert_close(s.combined(weights=w, method="tchebycheff"), ref)


def test_tchebycheff_skipping_never_helps():
    # the same completion, once scored 0.0 by "b" and once skipped: skipping must not score higher
    base = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.5, 0.0]])
    skip = base.clone()
    skip[2, 1] = NAN
    r_base = Scores(base, ("a", "b")).combined(method="tchebycheff")
    r_skip = Scores(skip, ("a", "b")).combined(method="tchebycheff")
    assert r_skip[2] <= r_base[2]


def test_tchebycheff_columns_all_skipped():
    s = Scores(torch.tensor([[1.0, NAN], [0.0, NAN]]), ("a", "b"))
    assert s.combined(method="tchebycheff").tolist() == [0.0, -1.0]  # b left out of the max
    s = Scores(torch.full((2, 2), NAN), ("a", "b"))
    assert s.combined(method="tchebycheff").tolist() == [0.0, 0.0]


def test_combined_method_and_weight_errors():
    s = Scores(torch.tensor([[1.0, 0.0]]), ("a", "b"))
    with pytest.raises(ValueError, match=r"method must be one of \['weighted_sum', 'tchebycheff'\]"):
        s.combined(method="hypervolume")
    with pytest.raises(RewardFunctionError, match="reward_weights must be >= 0"):
        s.combined(weights=[1.0, -1.0], method="tchebycheff")
    assert s.combined(weights=[1.0, -1.0]).tolist() == [1.0]  # a negative weight is fine for a sum
    with pytest.raises(ValueError, match="ideal"):
        s.combined(method="tchebycheff", ideal=[1.0])
    with pytest.raises(ValueError, match="ideal is only used"):
        s.combined(ideal=[1.0, 1.0])
    assert COMBINE_METHODS == ("weighted_sum", "tchebycheff")


def test_scores_checks_its_fields():
    with pytest.raises(ValueError, match="float32"):
        Scores(torch.zeros(2, 1, dtype=torch.float64), ("a",))
    with pytest.raises(ValueError, match="unique"):
        Scores(torch.zeros(2, 2), ("a", "a"))
    with pytest.raises(ValueError, match="inf"):
        Scores(torch.tensor([[math.inf]]), ("a",))


def test_reward_components_for_gdpo():
    v = torch.tensor([[1.0, 1.0], [NAN, 0.0], [3.0, NAN], [NAN, NAN]])
    s = Scores(v, ("a", "b"))
    assert s.reward_components(group_size=2).tolist() == [[1.0, 1.0], [1.0, 0.0], [3.0, 0.0], [3.0, 0.0]]
    assert s.reward_components().tolist() == [[1.0, 1.0], [0.0, 0.0], [3.0, 0.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="group_size"):
        s.reward_components(group_size=3)
    # the filled sample's GDPO component is exactly zero: its advantage comes from "b" alone
    adv = gdpo(s.reward_components(group_size=2), 2, batch_norm=False, eps=0.0)
    only_b = gdpo(torch.tensor([[1.0], [0.0], [0.0], [0.0]]), 2, batch_norm=False, eps=0.0)
    torch.testing.assert_close(adv[:2], only_b[:2])


@given(st.lists(st.one_of(st.none(), st.floats(-1e6, 1e6)), min_size=1, max_size=12),
       st.floats(-3, 3))
def test_weighted_sum_is_nansum(vals, w):
    s = score([lambda prompts, completions: vals], ["p"] * len(vals), ["c"] * len(vals), weights=[w])
    expect = [0.0 if v is None else w * float(np.float32(v)) for v in vals]
    torch.testing.assert_close(s.combined(), torch.tensor(expect, dtype=torch.float32))
    assert s.skipped() == {"reward_0": sum(v is None for v in vals)}


# load_reward_func ------------------------------------------------------------------------------

def test_load_from_file_and_module(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("from dataclasses import dataclass\n"
                 "@dataclass\nclass Cfg:\n    bonus: float = 1.0\n"
                 "def length(prompts, completions, **kw):\n    return [len(c) + Cfg().bonus for c in completions]\n"
                 "class Judges:\n    @staticmethod\n    def strict(prompts, completions, **kw):\n"
                 "        return [0.0 for c in completions]\n")
    fn = load_reward_func(f"{f}:length")
    assert fn(prompts=["p"], completions=["abc"]) == [4.0]
    assert load_reward_func(f"{f}:Judges.strict")(prompts=["p"], completions=["x"]) == [0.0]
    assert load_reward_func("rl2fx.rewards:score") is score


def test_load_errors_name_the_spec(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("import math\nVALUE = 3\ndef good(prompts, completions):\n    return []\n")
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('no GPU here\\nsecond line')\n")
    cases = {
        "rewards.py": "no ':' found",
        f"{tmp_path}/missing.py:fn": "does not exist",
        f"{bad}:fn": "raised RuntimeError: no GPU here",
        f"{f}:nope": "has no attribute 'nope'; its public callables: ['good']",
        f"{f}:VALUE": "'VALUE' is a int, not a callable",
        "no_such_module_xyz:fn": "importing module 'no_such_module_xyz' raised ModuleNotFoundError",
        f"{f}:": "function part is empty",
    }
    for spec, expect in cases.items():
        msg = _error(load_reward_func, spec)
        assert f"{spec!r}" in msg and expect in msg, (spec, msg)
    assert "second line" not in _error(load_reward_func, f"{bad}:fn")
