"""reverse_scan: every backend against the loop, closed forms and a float64 reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.returns.scan import BACKENDS, reverse_scan
from rl2fx.testing.scan_strategies import scan_inputs

EAGER = ("loop", "chunked", "auto")


def _closed_form(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{s>=t} (prod_{u=t}^{s-1} c_u) x_s, by the definition (float64, O(T^2))."""
    x, c = x.double(), c.double()
    n = x.shape[-1]
    y = torch.zeros_like(x)
    for t in range(n):
        w = torch.ones_like(x[..., 0])
        for s in range(t, n):
            y[..., t] += w * x[..., s]
            w = w * c[..., s]
    return y


def _tol(dtype: torch.dtype) -> float:
    # relative to the output scale max|y|; low-precision outputs differ by one
    # rounding of nearly equal float32 accumulations
    return {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[
        dtype
    ]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.double().abs().max().clamp_min(1e-30)
    return float((y.double() - ref.double()).abs().max() / scale)


def test_loop_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, generator=g, dtype=torch.float64)
    c = torch.rand(3, 40, generator=g, dtype=torch.float64)
    c[:, 7] = 0.0
    c[:, 20:30] = 1.0
    assert _rel_err(reverse_scan(x, c, backend="loop"), _closed_form(x, c)) < 1e-12


@given(scan_inputs())
def test_backends_equal_loop(xc):
    x, c = xc
    ref = reverse_scan(x, c, backend="loop")
    for backend in EAGER:
        y = reverse_scan(x, c, backend=backend)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert _rel_err(y, ref) <= _tol(x.dtype), backend


@given(scan_inputs(max_time=2000, dtypes=(torch.float32,), max_batch_dims=1))
def test_chunked_long_against_float64(xc):
    # long T exercises the block recursion (T > 64 * L) and the padding
    x, c = xc
    c64 = c.double() if isinstance(c, torch.Tensor) else float(torch.tensor(c))
    ref = reverse_scan(x.double(), c64, backend="loop")
    assert _rel_err(reverse_scan(x, c, backend="chunked"), ref) < 1e-5


@pytest.mark.parametrize("shape", [(2, 5000), (1, 4097), (3, 1, 64 * 64 + 1), (5, 4096), (2, 2048)])
@pytest.mark.parametrize("kind", ["float", "tensor"])
def test_chunked_deep_recursion(shape, kind):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    c = 0.99 if kind == "float" else torch.rand(shape, generator=g) * 0.1 + 0.9
    c64 = float(torch.tensor(c)) if kind == "float" else c.double()
    ref = reverse_scan(x.double(), c64, backend="loop")
    assert _rel_err(reverse_scan(x, c, backend="chunked"), ref) < 1e-5


@pytest.mark.parametrize("backend", EAGER)
def test_exact_for_cuts_and_skips(backend):
    # c = 0 everywhere: y = x exactly; c = 1 with integer x: exact reverse cumsum
    x = torch.randint(-5, 6, (4, 3000)).float()
    assert torch.equal(reverse_scan(x, 0.0, backend=backend), x)
    assert torch.equal(reverse_scan(x, torch.zeros_like(x), backend=backend), x)
    rc = x.flip(-1).cumsum(-1).flip(-1)
    assert torch.equal(reverse_scan(x, 1.0, backend=backend), rc)
    assert torch.equal(reverse_scan(x, torch.ones_like(x), backend=backend), rc)


@given(scan_inputs(max_time=200, dtypes=(torch.float64,), c_kinds=("runs", "uniform")), st.data())
def test_skipped_steps_are_transparent(xc, data):
    # inserting masked steps (x = 0, c = 1) changes nothing at the kept steps:
    # the property the estimators' `mask` relies on
    x, c = xc
    keep = torch.tensor(
        data.draw(st.lists(st.booleans(), min_size=x.shape[-1], max_size=x.shape[-1]))
    )
    if not keep.any():
        keep[0] = True
    xk, ck = x[..., keep], c[..., keep]
    x_full = torch.zeros_like(x)
    c_full = torch.ones_like(c)
    x_full[..., keep] = xk
    c_full[..., keep] = ck
    for backend in EAGER:
        y = reverse_scan(x_full, c_full, backend=backend)[..., keep]
        assert _rel_err(y, reverse_scan(xk, ck, backend="loop")) < 1e-12


@pytest.mark.parametrize("backend", EAGER)
def test_inputs_not_modified(backend):
    for shape in [(1, 300), (300,), (2, 3, 100)]:
        x = torch.randn(shape)
        c = torch.rand(shape)
        x0, c0 = x.clone(), c.clone()
        reverse_scan(x, c, backend=backend)
        assert torch.equal(x, x0) and torch.equal(c, c0)


def test_accumulates_low_precision_in_float32():
    # 4096 ones in bfloat16: a bfloat16 accumulator would stall at 256
    x = torch.ones(4096, dtype=torch.bfloat16)
    for backend in EAGER:
        y = reverse_scan(x, 1.0, backend=backend)
        assert y.dtype == torch.bfloat16 and float(y[0]) == 4096.0


@pytest.mark.parametrize("backend", EAGER)
def test_growing_recurrence(backend):
    # c > 1 is allowed; moderate growth stays finite and equal to the loop
    x = torch.randn(2, 500, dtype=torch.float64)
    ref = reverse_scan(x, 1.01, backend="loop")
    assert _rel_err(reverse_scan(x, 1.01, backend=backend), ref) < 1e-10


def test_errors():
    x = torch.ones(2, 5)
    with pytest.raises(ValueError, match="backend must be one of .*'chunked'"):
        reverse_scan(x, 0.9, backend="fast")
    with pytest.raises(TypeError):
        reverse_scan(x, torch.ones(2, 4))
    with pytest.raises(TypeError):
        reverse_scan(torch.ones(2, 5, dtype=torch.int64), 0.9)
    assert set(BACKENDS) >= {"auto", "loop", "chunked", "compiled"}


def test_empty_and_single_step():
    assert reverse_scan(torch.ones(3, 0), 0.9).shape == (3, 0)
    x = torch.tensor([[2.0], [3.0]])
    for backend in EAGER:
        assert torch.equal(reverse_scan(x, 0.5, backend=backend), x)


@pytest.mark.slow
def test_accuracy_t16384():
    """float32 within 1e-5 of output scale vs float64 at T=16384, c up to 0.9999."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 16384, generator=g)
    for c in (0.9999, torch.full_like(x, 0.9999), torch.rand(x.shape, generator=g) * 0.01 + 0.99):
        # a float c is used as its float32 value (reverse_scan rounds it once)
        c64 = c.double() if isinstance(c, torch.Tensor) else float(torch.tensor(c))
        ref = reverse_scan(x.double(), c64, backend="loop")
        for backend in ("loop", "chunked"):
            assert _rel_err(reverse_scan(x, c, backend=backend), ref) < 1e-5, backend


def test_auto_uses_loop_for_growing_float_c():
    # 1.5**300 overflows float32 span products, but the exact answer here is finite
    x = torch.zeros(1, 300)
    x[0, 0] = 1.0
    y = reverse_scan(x, 1.5)
    assert torch.isfinite(y).all() and float(y[0, 0]) == 1.0


@pytest.mark.parametrize("backend", ["chunked", "auto"])
def test_gradients_match_loop(backend):
    # differentiable: with gradients on, chunked runs its out-of-place form
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 150, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.rand(3, 150, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 150, generator=g, dtype=torch.float64)
    gx_ref, gc_ref = torch.autograd.grad((reverse_scan(x, c, backend="loop") * w).sum(), (x, c))
    for _ in range(2):  # twice: a reused buffer would break the first graph
        gx, gc = torch.autograd.grad((reverse_scan(x, c, backend=backend) * w).sum(), (x, c))
        assert torch.allclose(gx, gx_ref) and torch.allclose(gc, gc_ref)
