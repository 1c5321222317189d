"""The torch.compile backend against the loop backend.

CPU compiles take tens of seconds, so the default profile compiles one small
graph (one block level, T <= 16); the multi-level shapes and the float-c path run
under ``-m slow``. CUDA tests run on a GPU only.
"""

from __future__ import annotations

import pytest
import torch

from rl2fx.returns.scan import reverse_scan


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float(
        (y.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)
    )


def _inputs(shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    c = torch.rand(shape, generator=g)
    c[c < 0.2] = 0.0  # cuts
    skip = c > 0.7
    c[skip] = 1.0  # masked-out steps
    x[skip] = 0.0
    return x.to(device), c.to(device)


def test_compiled_small_cpu():
    # one block level (T <= 16): the smallest graph, still the real compiled path
    x, c = _inputs((2, 3, 13))
    ref = reverse_scan(x.double(), c.double(), backend="loop")
    y = reverse_scan(x, c, backend="compiled")
    assert y.dtype == x.dtype and _rel_err(y, ref) < 1e-5


@pytest.mark.slow
def test_compiled_reuses_graph_across_shapes():
    # dynamic shapes: new batch sizes and T of the same recursion depth reuse the graph
    x, c = _inputs((3, 100))
    reverse_scan(x, c, backend="compiled")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for shape in [(5, 70), (7, 230), (2, 3, 200)]:  # K = ceil(T/16) < 16: same depth
            x, c = _inputs(shape)
            ref = reverse_scan(x.double(), c.double(), backend="loop")
            assert _rel_err(reverse_scan(x, c, backend="compiled"), ref) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(3, 100), (2, 3, 300), (4, 5000)])
@pytest.mark.parametrize("kind", ["tensor", "float"])
def test_compiled_multilevel_cpu(shape, kind):
    x, c = _inputs(shape, seed=1)
    cc = c if kind == "tensor" else 0.97
    c64 = c.double() if kind == "tensor" else float(torch.tensor(0.97))
    ref = reverse_scan(x.double(), c64, backend="loop")
    assert _rel_err(reverse_scan(x, cc, backend="compiled"), ref) < 1e-5


@pytest.mark.slow
def test_compiled_bfloat16_cpu():
    x, c = _inputs((2, 40))
    ref = reverse_scan(x, c, backend="loop")
    y = reverse_scan(x.bfloat16(), c.bfloat16(), backend="compiled")
    assert y.dtype == torch.bfloat16
    ref = reverse_scan(x.bfloat16(), c.bfloat16(), backend="loop")
    assert _rel_err(y, ref) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["loop", "chunked", "compiled", "auto"])
@pytest.mark.parametrize("shape", [(4, 7), (8, 300), (16, 4096), (2, 16385)])
def test_cuda_backends_equal_cpu_loop(backend, shape):
    x, c = _inputs(shape, seed=2)
    ref = reverse_scan(x.double(), c.double(), backend="loop")
    y = reverse_scan(x.cuda(), c.cuda(), backend=backend)
    assert y.device.type == "cuda"
    assert _rel_err(y.cpu(), ref) < 1e-5
    yf = reverse_scan(x.cuda(), 0.99, backend=backend)
    assert (
        _rel_err(yf.cpu(), reverse_scan(x.double(), float(torch.tensor(0.99)), backend="loop"))
        < 1e-5
    )


@pytest.mark.cuda
def test_cuda_bfloat16_accumulates_in_float32():
    x = torch.ones(2, 4096, dtype=torch.bfloat16, device="cuda")
    for backend in ("chunked", "compiled"):
        y = reverse_scan(x, 1.0, backend=backend)
        assert y.dtype == torch.bfloat16 and float(y[0, 0]) == 4096.0
