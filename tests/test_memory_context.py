"""memory_efficient_context: collects on pressure, restores on exit, CUDA cap/offload."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from rl2fx.memory import context as ctx_mod
from rl2fx.memory.context import MemoryGuard, memory_efficient_context, memory_usage_fraction
from rl2fx.memory.optimizer import MemoryOptimizer


def _count_gc_runs():
    runs = []

    def callback(phase, info):
        if phase == "stop" and info["generation"] == 2:
            runs.append(1)

    gc.callbacks.append(callback)
    return runs, lambda: gc.callbacks.remove(callback)


def _watchdogs():
    return [t for t in threading.enumerate() if t.name == "rl2fx-memory-watchdog"]


def test_collects_when_usage_crosses_gc_threshold(monkeypatch):
    usage = {"value": 0.5}
    monkeypatch.setattr(ctx_mod, "memory_usage_fraction", lambda device=None: usage["value"])
    runs, undo = _count_gc_runs()
    try:
        opt = MemoryOptimizer(memory_threshold=0.6, gc_threshold=0.7)
        with memory_efficient_context(opt, poll_interval=0.01) as guard:
            assert guard.collections == 0 and len(runs) == 0  # below threshold: nothing
            usage["value"] = 0.95
            deadline = time.time() + 5
            while guard.collections == 0 and time.time() < deadline:
                time.sleep(0.01)  # the watchdog thread must notice on its own
            assert guard.collections >= 1
            usage["value"] = 0.1
            n = guard.collections
            assert guard.maybe_collect() is False and guard.collections == n
        assert len(runs) >= 1  # real full collections happened
        assert guard.last_usage == 0.1
    finally:
        undo()


def test_restores_state_and_stops_watchdog_even_on_exception():
    before = len(_watchdogs())
    with pytest.raises(RuntimeError, match="inside"):
        with memory_efficient_context(MemoryOptimizer(), poll_interval=0.01):
            assert len(_watchdogs()) == before + 1
            raise RuntimeError("inside")
    assert len(_watchdogs()) == before
    # no saved-tensor hooks left behind: a graph built now saves tensors unchanged
    x = torch.randn(3, requires_grad=True)
    (x * x).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())


def test_default_optimizer_and_no_watchdog_on_cpu():
    with memory_efficient_context(poll_interval=None) as guard:
        assert isinstance(guard, MemoryGuard)
        assert guard.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
        assert not _watchdogs() or all(not t.is_alive() for t in _watchdogs())
    assert guard.checks == 2  # entry and exit
    if not torch.cuda.is_available():
        assert guard.changes == []
    with pytest.raises(ValueError, match="poll_interval"):
        with memory_efficient_context(poll_interval=0):
            pass


def test_offload_note_on_cpu():
    opt = MemoryOptimizer(enable_cpu_offload=True)
    with memory_efficient_context(opt, device="cpu", poll_interval=None):
        pass
    assert any("no CUDA device" in n for n in opt.notes)
    assert 0.0 <= memory_usage_fraction("cpu") <= 1.0


@pytest.mark.cuda
def test_cuda_caps_allocator_and_restores():
    dev = torch.device("cuda")
    torch.zeros(1, device=dev)
    before = torch.cuda.get_per_process_memory_fraction(dev)
    opt = MemoryOptimizer(memory_threshold=0.5, gc_threshold=0.9, enable_cpu_offload=True)
    with memory_efficient_context(opt, poll_interval=None) as guard:
        assert torch.cuda.get_per_process_memory_fraction(dev) == pytest.approx(0.5)
        x = torch.randn(1024, 1024, device=dev, requires_grad=True)
        y = (x * x).sum()  # saved x goes to host memory
        assert len(guard.changes) == 2
    y.backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())
    assert torch.cuda.get_per_process_memory_fraction(dev) == pytest.approx(before)
