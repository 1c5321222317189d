"""Schedule shapes against PyTorch's and transformers' learning-rate schedulers, plus properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.control import schedules as S


def _torch_lrs(make_sched, base_lr, n):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    sched = make_sched(opt)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_matches_torch_cosine_annealing():
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50, eta_min=0.01), 0.2, 51)
    ours = [S.cosine(t, start=0.2, end=0.01, steps=50) for t in range(51)]
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_linear_matches_torch_linear_lr():
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.05,
                                                                 total_iters=40), 0.2, 60)
    ours = [S.linear(t, start=0.2, end=0.01, steps=40) for t in range(60)]
    assert ours == pytest.approx(ref, rel=1e-9)


def test_exponential_matches_torch_exponential_lr():
    gamma = (0.01 / 0.2) ** (1 / 30)
    ref = _torch_lrs(lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=gamma), 0.2, 31)
    ours = [S.exponential(t, start=0.2, end=0.01, steps=30) for t in range(31)]
    assert ours == pytest.approx(ref, rel=1e-9)
    assert S.exponential(1000, start=0.2, end=0.01, steps=30) == pytest.approx(0.01)


def test_warmup_cosine_matches_transformers():
    from transformers import get_cosine_schedule_with_warmup

    ref = _torch_lrs(lambda o: get_cosine_schedule_with_warmup(o, num_warmup_steps=10, num_training_steps=100),
                     1e-3, 101)
    ours = [S.warmup_cosine(t, start=1e-3, end=0.0, steps=100, warmup_steps=10) for t in range(101)]
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-15)


def test_schedule_value_dispatch_and_errors():
    assert S.schedule_value("cosine", 0, start=1.0, end=0.0, steps=5) == 1.0
    with pytest.raises(ValueError, match="schedule_type"):
        S.schedule_value("poly", 0, start=1.0, end=0.0, steps=5)
    with pytest.raises(ValueError, match="step"):
        S.linear(-1, start=1.0, end=0.0, steps=5)
    with pytest.raises(ValueError, match="steps"):
        S.cosine(0, start=1.0, end=0.0, steps=0)
    with pytest.raises(ValueError, match="end"):
        S.exponential(0, start=1.0, end=0.0, steps=5)
    with pytest.raises(ValueError, match="start"):
        S.linear(0, start=float("nan"), end=0.0, steps=5)
    with pytest.raises(ValueError, match="warmup_steps"):
        S.warmup_cosine(0, start=1.0, end=0.0, steps=5, warmup_steps=5)


ends = st.floats(min_value=1e-6, max_value=1e6)


@given(st.sampled_from(["cosine", "linear", "exponential"]), ends, ends, st.integers(1, 10_000),
       st.lists(st.integers(0, 20_000), min_size=2, max_size=30))
def test_monotone_between_ends_and_held_after(name, start, end, steps, ts):
    fn = S.SCHEDULES[name]
    ts = sorted(ts)
    vals = [fn(t, start=start, end=end, steps=steps) for t in ts]
    lo, hi = min(start, end), max(start, end)
    assert all(lo <= v <= hi and math.isfinite(v) for v in vals)
    sign = 1 if end >= start else -1
    assert all(sign * (b - a) >= 0 for a, b in zip(vals, vals[1:], strict=False))
    assert fn(0, start=start, end=end, steps=steps) == pytest.approx(start)
    assert fn(steps + 5, start=start, end=end, steps=steps) == pytest.approx(end)


@given(ends, ends, st.integers(2, 5000), st.data())
def test_warmup_cosine_monotone_per_phase(start, end, steps, data):
    warm = data.draw(st.integers(0, steps - 1))
    vals = [S.warmup_cosine(t, start=start, end=end, steps=steps, warmup_steps=warm)
            for t in range(0, steps + 2, max(1, steps // 50))]
    ts = list(range(0, steps + 2, max(1, steps // 50)))
    up = [v for t, v in zip(ts, vals, strict=True) if t <= warm]
    down = [v for t, v in zip(ts, vals, strict=True) if t >= warm]
    s_up = 1 if start >= end else -1
    assert all(s_up * (b - a) >= 0 for a, b in zip(up, up[1:], strict=False))
    assert all(s_up * (a - b) >= 0 for a, b in zip(down, down[1:], strict=False))
    assert S.warmup_cosine(warm, start=start, end=end, steps=steps, warmup_steps=warm) == pytest.approx(start)


@pytest.mark.parametrize("name", ["cosine", "linear", "exponential"])
def test_ends_are_exact_when_the_ends_differ_by_many_orders(name):
    # e + (s - e) * 1 cancels: 1e-6 came back as 1.0000076e-6 (found by hypothesis)
    fn = S.SCHEDULES[name]
    assert fn(0, start=1e-6, end=131073.0, steps=1) == 1e-6
    assert fn(1, start=1e-6, end=131073.0, steps=1) == 131073.0
    assert fn(0, start=131073.0, end=1e-6, steps=7) == 131073.0
