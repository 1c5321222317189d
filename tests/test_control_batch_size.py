"""Adaptive batch sizing: each rule, bounds for any input sequence, a simulated device, resume, errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import rl2fx
from rl2fx import control as C


def test_spec_snippet():
    sizer = rl2fx.AdaptiveBatchSizer(initial_batch_size=8, min_batch_size=1, max_batch_size=64,
                                     adaptation_factor=0.1)
    new = sizer.update_batch_size(0.5, 1.2, True)
    assert isinstance(new, int) and new == 9 == sizer.batch_size
    assert C.AdaptiveBatchSizer is rl2fx.AdaptiveBatchSizer


def test_rules():
    s = C.batch_size_init(initial_batch_size=20, max_batch_size=64)
    assert C.batch_size_update(s, 0.5, 1.0, True).batch_size == 22          # grow: ceil(20 * 1.1)
    assert C.batch_size_update(s, 0.8, 1.0, True).batch_size == 20          # between thresholds: hold
    assert C.batch_size_update(s, 0.95, 1.0, True).batch_size == 18         # high memory: floor(20 * 0.9)
    assert C.batch_size_update(s, 0.1, 1.0, False).batch_size == 10         # failure: halve at once
    one = C.batch_size_init(initial_batch_size=1)
    assert C.batch_size_update(one, 0.1, 1.0, False).batch_size == 1        # floor at min_batch_size
    top = C.batch_size_init(initial_batch_size=64)
    nxt = C.batch_size_update(top, 0.1, 1.0, True)
    assert nxt.batch_size == 64 and nxt.last_action == "hold_max"
    small = C.batch_size_init(initial_batch_size=2, adaptation_factor=0.01)
    assert C.batch_size_update(small, 0.1, 1.0, True).batch_size == 3       # always at least +1


def test_no_growth_right_after_failures():
    sizer = rl2fx.AdaptiveBatchSizer(initial_batch_size=16)
    assert sizer.update_batch_size(0.99, 1.0, False) == 8
    sizes = [sizer.update_batch_size(0.3, 1.0, True) for _ in range(12)]
    # 1 failure in the 10-step window: success rate < 0.9 until it holds 9 successes
    assert sizes[:8] == [8] * 8 and sizer.history[1]["action"] == "hold_success_rate"
    assert sizes[-1] > 8


def test_throughput_fall_blocks_growth():
    sizer = rl2fx.AdaptiveBatchSizer(initial_batch_size=10)
    assert sizer.update_batch_size(0.3, 1.0, True) == 11      # 10 samples/s at b=10
    # b=11 took 2 s: 5.5 samples/s < 10: bigger batches stopped paying
    assert sizer.update_batch_size(0.3, 2.0, True) == 11
    assert sizer.state.last_action == "hold_throughput"
    assert sizer.update_batch_size(0.3, 1.0, True) == 13      # 11 samples/s: growth pays again, ceil(12.1)


def test_simulated_device_converges_without_repeated_oom():
    # memory fraction = 0.1 + 0.02 * b; OOM above 1.0 (b > 45); time ~ overhead + per-sample cost
    sizer = rl2fx.AdaptiveBatchSizer(initial_batch_size=8, max_batch_size=64)
    ooms = 0
    for _ in range(300):
        b = sizer.batch_size
        mem = 0.1 + 0.02 * b
        ok = mem <= 1.0
        ooms += not ok
        sizer.update_batch_size(min(mem, 1.0), 0.5 + 0.01 * b, ok)
    final = sizer.batch_size
    assert 0.7 <= 0.1 + 0.02 * final <= 0.9 + 0.02  # settles in the band between the thresholds
    assert ooms == 0


@given(st.lists(st.tuples(st.floats(0, 1), st.floats(1e-6, 1e6), st.booleans()), max_size=60),
       st.integers(1, 16), st.integers(0, 48), st.floats(0.01, 0.99))
def test_always_within_bounds(obs, lo, span, factor):
    hi = lo + span
    sizer = rl2fx.AdaptiveBatchSizer(initial_batch_size=lo, min_batch_size=lo, max_batch_size=hi,
                                      adaptation_factor=factor)
    for mem, t, ok in obs:
        b = sizer.update_batch_size(mem, t, ok)
        assert isinstance(b, int) and lo <= b <= hi
        if not ok:
            assert b < sizer.history[-1]["batch_size"] or b == lo


@given(st.lists(st.tuples(st.floats(0, 1), st.floats(1e-3, 10), st.booleans()), min_size=1, max_size=40),
       st.data())
def test_resume_continues_identically(obs, data):
    cut = data.draw(st.integers(0, len(obs)))
    a, b = rl2fx.AdaptiveBatchSizer(), rl2fx.AdaptiveBatchSizer()
    for o in obs[:cut]:
        a.update_batch_size(*o)
        b.update_batch_size(*o)
    c = rl2fx.AdaptiveBatchSizer(initial_batch_size=3)
    c.load_state_dict(b.state_dict())
    assert c.state == b.state
    assert [c.update_batch_size(*o) for o in obs[cut:]] == [a.update_batch_size(*o) for o in obs[cut:]]


@pytest.mark.parametrize("kwargs,name", [
    (dict(min_batch_size=0), "min_batch_size"), (dict(min_batch_size=10, max_batch_size=5), "min_batch_size"),
    (dict(initial_batch_size=100), "initial_batch_size"), (dict(initial_batch_size=2.5), "initial_batch_size"),
    (dict(adaptation_factor=0.0), "adaptation_factor"), (dict(adaptation_factor=1.0), "adaptation_factor"),
    (dict(low_memory=0.95), "low_memory"), (dict(window=0), "window"),
])
def test_bad_settings_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        rl2fx.AdaptiveBatchSizer(**kwargs)


@pytest.mark.parametrize("args,name", [
    ((1.2, 1.0, True), "memory_usage"), ((-0.1, 1.0, True), "memory_usage"),
    ((float("nan"), 1.0, True), "memory_usage"), ((0.5, 0.0, True), "training_time"),
    ((0.5, float("inf"), True), "training_time"), ((0.5, 1.0, 1), "success"), ((0.5, 1.0, "yes"), "success"),
])
def test_bad_inputs_raise(args, name):
    with pytest.raises(ValueError, match=name):
        rl2fx.AdaptiveBatchSizer().update_batch_size(*args)


def test_numpy_bools_are_bools():
    import numpy as np

    from rl2fx.control.batch_size import batch_size_init, batch_size_update

    s = batch_size_init()
    a = batch_size_update(s, 0.5, 1.0, np.True_)
    b = batch_size_update(s, 0.5, 1.0, True)
    assert a == b
    with pytest.raises(ValueError, match="success must be a bool"):
        batch_size_update(s, 0.5, 1.0, 1)
