"""The masked recurrence: ``reverse_scan(x, c, mask=...)`` and its constant-coefficient path.

The contract (DESIGN.md): a masked-out step is not a decision, so the result equals
packing each row's masked-in steps, scanning them and scattering back, with zeros
at masked-out steps. With a float ``c`` on CPU the engine never packs: every
coefficient is ``c**m_t`` and each 16-step block is solved by weighted suffix sums
(``_backends.masked.masked_const_scan_``), the block carries in float64 on log-coefficients
(``_backends.masked.scan_logc_``). These tests hold both against the packed loop reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rl2fx._typing import ShapeError
from rl2fx.returns import discounted, gae
from rl2fx.returns._backends.masked import (
    masked_const_ok,
    masked_const_scan_,
    scan_logc_,
    scan_masked_const,
)
from rl2fx.returns.scan import reverse_scan
from rl2fx.testing.scan_strategies import scan_inputs


def _packed_reference(x, c, mask, tail=None):
    """Pack each row's masked-in steps, run the loop in float64, scatter back."""
    T = x.shape[-1]
    x2 = x.reshape(-1, T).double()
    m2 = mask.reshape(-1, T).bool()
    c2 = c.reshape(-1, T).double() if isinstance(c, torch.Tensor) else None
    out = torch.zeros_like(x2)
    for i in range(x2.shape[0]):
        idx = m2[i].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        xs = x2[i, idx].clone()
        cs = c2[i, idx] if c2 is not None else torch.full_like(xs, float(c))
        acc = 0.0 if tail is None else float(tail.reshape(-1)[i])
        for j in range(len(idx) - 1, -1, -1):
            acc = float(xs[j]) + float(cs[j]) * acc
            xs[j] = acc
        out[i, idx] = xs
    return out.view(x.shape)


def _rel_err(y, ref) -> float:
    scale = ref.double().abs().max().clamp_min(1e-30)
    return float((y.double() - ref.double()).abs().max() / scale)


TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@given(scan_inputs(max_time=300), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_masked_scan_equals_pack_run_scatter(xc, p_on, seed):
    x, c = xc
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(x.shape, generator=g) < p_on
    ref = _packed_reference(x, c, mask)
    for backend in ("auto", "loop", "chunked"):
        y = reverse_scan(x, c, mask=mask, backend=backend)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert _rel_err(y, ref) <= TOL[x.dtype], backend
        assert (y[~mask] == 0).all()


@given(
    st.integers(1, 3),
    st.integers(1, 700),
    st.sampled_from([1.0, 0.9999, 0.99, 0.9405, 0.5, 0.1, 0.0135]),
    st.floats(0.0, 1.0),
    st.booleans(),
    st.sampled_from([torch.float32, torch.float64]),
    st.integers(0, 2**31 - 1),
)
def test_constant_path_with_tail(n, T, c, p_on, with_tail, dtype, seed):
    """The engine GAE and discounted call: constant c, an end value, rows without decisions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, generator=g, dtype=torch.float64)
    mask = torch.rand(n, T, generator=g) < p_on
    mask[0] = mask[0] if n == 1 else False  # a row with no decision when there are several
    tail = torch.randn(n, generator=g, dtype=torch.float64) if with_tail else None
    c = float(torch.tensor(c, dtype=dtype))
    assert masked_const_ok(c)
    y = scan_masked_const(x.to(dtype), mask.to(dtype), c=c, tail=None if tail is None else tail.to(dtype))
    ref = _packed_reference(x.to(dtype), c, mask, tail)
    assert _rel_err(y, ref) <= TOL[dtype]
    assert (y[~mask] == 0).all()


def test_hand_example():
    # decisions at t = 0, 2, 3: y3 = 4 + 0.5 * 10 (the end value), y2 = 3 + 0.5 y3, y0 = 1 + 0.5 y2
    x = torch.tensor([[1.0, 100.0, 3.0, 4.0, 100.0]])
    m = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0]])
    y = scan_masked_const(x, m, c=0.5, tail=torch.tensor([10.0]))
    y3 = 4 + 0.5 * 10
    y2 = 3 + 0.5 * y3
    torch.testing.assert_close(y, torch.tensor([[1 + 0.5 * y2, 0.0, y2, y3, 0.0]]))


def test_small_coefficients_fall_back():
    # c**16 below 1e-30 would leave float32 weights subnormal: the path refuses it,
    # and reverse_scan still returns the packed result through the general engine
    assert not masked_const_ok(0.01) and not masked_const_ok(0.0) and not masked_const_ok(1.5)
    assert masked_const_ok(0.0135) and masked_const_ok(1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 100, generator=g)
    mask = torch.rand(2, 100, generator=g) < 0.5
    for c in (0.01, 0.0):
        assert _rel_err(reverse_scan(x, c, mask=mask), _packed_reference(x, c, mask)) < 1e-5


@given(st.integers(1, 5000), st.floats(0.0, 60.0), st.integers(0, 2**31 - 1))
def test_log_coefficient_carries(K, depth, seed):
    """The float64 carry levels: any log-coefficients <= 0, the floor at -40 included."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, K, generator=g, dtype=torch.float64)
    logc = -torch.rand(2, K, generator=g, dtype=torch.float64) * depth
    y = scan_logc_(x.clone(), logc)
    ref = reverse_scan(x, logc.clamp(min=-40.0).exp(), backend="loop")
    assert float((y - ref).abs().max()) <= 1e-12 * float(ref.abs().max().clamp_min(1.0))


def test_floor_changes_results_by_less_than_float64_resolution():
    # a coefficient of exp(-100) raised to exp(-40) moves the answer by < 1e-17 of a carry
    x = torch.ones(1, 40, dtype=torch.float64)
    logc = torch.full((1, 40), -100.0, dtype=torch.float64)
    y = scan_logc_(x.clone(), logc)
    assert float((y - 1.0).abs().max()) < 1e-17


def test_finiteness_flag_sees_masked_out_steps():
    x = torch.zeros(2, 64)
    m = torch.ones(2, 64)
    m[1, 10] = 0.0
    x[1, 10] = float("nan")  # masked out, but it still reaches its block's sum
    _, finite = masked_const_scan_(x.clone(), m, c=0.9)
    assert not finite
    _, finite = masked_const_scan_(torch.zeros(2, 64), m, c=0.9)
    assert finite


def test_allow_nonfinite_at_a_masked_out_step_gives_the_packed_result():
    r, v = torch.randn(2, 50), torch.randn(2, 50)
    m = torch.rand(2, 50) < 0.6
    m[0, 5] = False
    r_bad = r.clone()
    r_bad[0, 5] = float("inf")  # never a decision: the packed definition ignores it
    got = gae(r_bad, v, gamma=0.99, lamda=0.95, mask=m, allow_nonfinite=True)
    expect = gae(r, v, gamma=0.99, lamda=0.95, mask=m)
    for a, b in zip(got, expect, strict=True):
        torch.testing.assert_close(a, b)


def test_reverse_scan_mask_errors():
    x = torch.randn(2, 5)
    with pytest.raises(ShapeError, match="mask"):
        reverse_scan(x, 0.9, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor or hold only 0/1 values, got the value 2"):
        reverse_scan(x, 0.9, mask=torch.full((2, 5), 2))


def test_reverse_scan_mask_accepts_01_and_keeps_inputs():
    x = torch.randn(3, 40)
    m = (torch.rand(3, 40) < 0.5).to(torch.int64)
    before = x.clone()
    y = reverse_scan(x, 0.9, mask=m)
    assert torch.equal(x, before)
    torch.testing.assert_close(y, reverse_scan(x, 0.9, mask=m.bool(), backend="loop"))


def test_discounted_masked_fast_path_matches_general_path():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(4, 3000, generator=g)
    m = torch.rand(4, 3000, generator=g) < 0.5
    boot = torch.randn(4, generator=g)
    for gamma in (0.99, 1.0, 0.5):
        fast = discounted(r, gamma=gamma, mask=m, bootstrap_value=boot)
        slow = discounted(r, gamma=gamma, mask=m, bootstrap_value=boot, backend="loop")
        assert _rel_err(fast, slow) < 1e-5


@pytest.mark.slow
def test_masked_accuracy_t16384():
    """float32 within 1e-5 of the output scale vs float64 at T = 16384, c = 0.9999."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 16384, generator=g)
    mask = torch.rand(x.shape, generator=g) < 0.65
    c = float(torch.tensor(0.9999))
    ref = reverse_scan(x.double(), c, mask=mask, backend="loop")
    assert _rel_err(reverse_scan(x, c, mask=mask), ref) < 1e-5
    # GAE through the K = G + a V form, against float64
    r, v = torch.randn(16, 16384, generator=g), torch.randn(16, 16384, generator=g)
    g32 = float(torch.tensor(0.99995))
    c32 = float(torch.tensor(g32 * g32))
    adv = gae(r, v, gamma=0.99995, lamda=0.99995, mask=mask)[0]
    ref_adv = gae(r.double(), v.double(), gamma=g32, lamda=c32 / g32, mask=mask, backend="loop")[0]
    assert _rel_err(adv, ref_adv) < 1e-5
    assert math.isfinite(_rel_err(adv, ref_adv))


def test_masked_scan_is_differentiable():
    # with gradients the general (out-of-place) path runs; the gradient of sum(y)
    # w.r.t. x_s is the sum of the products from every earlier decision to s
    x = torch.randn(2, 40, requires_grad=True)
    m = torch.rand(2, 40) < 0.6
    y = reverse_scan(x, 0.9, mask=m)
    y.sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(y, reverse_scan(x, 0.9, mask=m))
    expect = torch.zeros(2, 40, dtype=torch.float64)
    for i in range(2):
        idx = m[i].nonzero().squeeze(1)
        for j, s in enumerate(idx.tolist()):
            expect[i, s] = sum(0.9 ** (j - k) for k in range(j + 1))
    torch.testing.assert_close(x.grad.double(), expect, rtol=1e-5, atol=1e-5)


def test_masked_scan_bfloat16_accumulates_in_float32():
    x = torch.ones(1, 4096, dtype=torch.bfloat16)
    m = torch.ones(1, 4096, dtype=torch.bool)
    m[0, ::2] = False
    y = reverse_scan(x, 1.0, mask=m)
    assert y.dtype == torch.bfloat16
    assert float(y[0, 1]) == 2048.0  # a bfloat16 accumulator would stall at 256


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "chunked", "loop"])
def test_masked_scan_on_cuda_equals_cpu(backend):
    # on CUDA a mask goes through the per-step encoding (x = 0, c = 1 at skipped steps)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 5000, generator=g)
    m = torch.rand(8, 5000, generator=g) < 0.6
    ref = _packed_reference(x, 0.99, m)
    y = reverse_scan(x.cuda(), 0.99, mask=m.cuda(), backend=backend)
    assert y.device.type == "cuda"
    assert _rel_err(y.cpu(), ref) < 1e-5
    adv = gae(x.cuda(), x.flip(-1).cuda(), gamma=0.99, lamda=0.95, mask=m.cuda())[0]
    adv_cpu = gae(x, x.flip(-1), gamma=0.99, lamda=0.95, mask=m)[0]
    assert _rel_err(adv.cpu(), adv_cpu) < 1e-5


def test_nonfinite_at_skipped_steps_is_ignored_like_the_definition():
    x = torch.randn(2, 70)
    m = torch.rand(2, 70) < 0.6
    m[1, 3] = False
    bad = x.clone()
    bad[1, 3] = float("inf")  # skipped: packing never sees it
    torch.testing.assert_close(reverse_scan(bad, 0.9, mask=m), reverse_scan(x, 0.9, mask=m))
    got = discounted(bad, gamma=0.9, mask=m, allow_nonfinite=True)
    torch.testing.assert_close(got, discounted(x, gamma=0.9, mask=m))
    # a NaN at a decision still spreads to the earlier decisions of its row, as in the loop
    bad[0, m[0].nonzero()[-1, 0]] = float("nan")
    y = reverse_scan(bad, 0.9, mask=m)
    assert torch.isnan(y[0][m[0]]).all() and torch.isfinite(y[1]).all()
