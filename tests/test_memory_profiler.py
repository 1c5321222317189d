"""MemoryProfiler timeline/regions and the exact TensorMemoryTracker."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.memory.profiler import (
    MemoryBudgetExceeded,
    MemoryProfiler,
    TensorMemoryTracker,
    load_timeline,
    memory_snapshot,
    timeline_to_dataframe,
)
from rl2fx.testing.memory_models import block_stack


# --------------------------------------------------------------------------- tracker
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("alloc"), st.integers(1, 5000)),
            st.tuples(st.just("free"), st.integers(0, 50)),
            st.tuples(st.just("view"), st.integers(0, 50)),
        ),
        max_size=40,
    )
)
def test_tracker_matches_reference_running_sum(ops):
    """Reference: the bytes of the unique storages our live tensors hold, after every op."""
    live: list[torch.Tensor] = []
    peak = 0

    def reference() -> int:
        return sum({x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in live}.values())

    with TensorMemoryTracker() as t:
        for kind, n in ops:
            if kind == "alloc":
                live.append(torch.empty(n, dtype=torch.float32))
            elif kind == "free" and live:
                del live[n % len(live)]
            elif kind == "view" and live:
                live.append(live[n % len(live)][:1])  # a view: no new storage
            current = reference()
            peak = max(peak, current)
            assert t.current_bytes == current
    assert t.peak_bytes == peak


def test_tracker_ignores_pre_existing_tensors_and_their_views():
    w = torch.randn(256, 256)
    with TensorMemoryTracker() as t:
        wt = w.t()
        w2 = w.view(-1)
        w.mul_(1.0)  # in place on an outside tensor: no new memory
    assert t.peak_bytes == 0 and t.current_bytes == 0
    del wt, w2


def test_tracker_current_after_backward_equals_gradient_bytes():
    """Independent check: after backward only the new .grad tensors are left alive."""
    model = block_stack(width=32, depth=3)
    x = torch.randn(64, 32)
    model.zero_grad(set_to_none=True)
    with TensorMemoryTracker() as t:
        model(x).square().mean().backward()
    grad_bytes = sum(p.grad.untyped_storage().nbytes() for p in model.parameters())
    assert t.current_bytes == grad_bytes
    # the peak holds at least every activation saved for backward at the end of the forward
    saved: dict[int, int] = {}

    def pack(x):
        saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = model(x).square().mean()
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activation_bytes = sum(v for k, v in saved.items() if k not in param_ptrs
                           and k != x.untyped_storage().data_ptr())
    del loss
    assert t.peak_bytes >= activation_bytes > 0


def test_tracker_limit_raises_and_flags():
    with pytest.raises(MemoryBudgetExceeded, match="limit_bytes=100"):
        with TensorMemoryTracker(limit_bytes=100) as t:
            torch.zeros(100)
    assert t.exceeded
    with pytest.raises(ValueError, match="limit_bytes"):
        TensorMemoryTracker(limit_bytes=-1)


def test_tracker_budget_error_surfaces_from_backward():
    model = block_stack(width=64, depth=4)
    x = torch.randn(128, 64)
    model.zero_grad(set_to_none=True)
    loss = model(x).square().mean()
    with pytest.raises(Exception) as info:  # noqa: B017 - autograd may wrap the error type
        with TensorMemoryTracker(limit_bytes=1024) as t:
            loss.backward()
    assert t.exceeded
    from rl2fx.memory.optimizer import is_oom_error

    assert is_oom_error(info.value)


def test_tracker_by_device():
    with TensorMemoryTracker() as t:
        _ = torch.zeros(10)
    assert t.by_device == {"cpu": 40}


# --------------------------------------------------------------------------- profiler
def test_profiler_writes_valid_timeline_with_nested_region_marks(tmp_path):
    path = tmp_path / "sub" / "memory_profile.json"
    profiler = MemoryProfiler(enabled=True, profile_interval=0.02, save_path=path)
    with profiler.profile_context("training"):
        for i in range(2):
            with profiler.profile_context(f"step{i}", track_tensors=True):
                x = torch.ones(1 << 16)  # 256 KiB
                time.sleep(0.06)
                del x
    assert not profiler.running
    data = json.loads(path.read_text())
    assert data == load_timeline(path)
    assert data["version"] == 1 and data["pid"] == os.getpid()
    names = [r["name"] for r in data["regions"]]
    assert names == ["step0", "step1", "training"]
    by_name = {r["name"]: r for r in data["regions"]}
    assert by_name["training"]["depth"] == 0 and by_name["training"]["parent"] is None
    assert by_name["step1"]["depth"] == 1 and by_name["step1"]["parent"] == "training"
    assert by_name["step0"]["peak_tensor_bytes"] == 1 << 18
    for r in data["regions"]:
        assert r["start"] <= r["end"] and r["duration_s"] >= 0
        assert r["peak_rss_bytes"] >= max(r["start_rss_bytes"], r["end_rss_bytes"]) > 0
    assert by_name["training"]["start"] <= by_name["step0"]["start"]
    assert by_name["step1"]["end"] <= by_name["training"]["end"]
    ts = [s["t"] for s in data["samples"]]
    assert ts == sorted(ts) and len(ts) >= 6  # entry/exit samples plus background ones
    assert any("step0" in s["regions"] for s in data["samples"])
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]


def test_region_peak_sees_a_large_allocation(tmp_path):
    profiler = MemoryProfiler(profile_interval=0.01, save_path=tmp_path / "p.json")
    nbytes = 64 * 2**20
    with profiler.profile_context("big"):
        x = torch.ones(nbytes // 4)  # touched pages: RSS must grow
        time.sleep(0.05)
        del x
    region = profiler.timeline()["regions"][0]
    assert region["peak_rss_bytes"] - region["start_rss_bytes"] >= 0.9 * nbytes


def test_profiler_saves_and_records_error_on_exception(tmp_path):
    path = tmp_path / "memory_profile.json"
    profiler = MemoryProfiler(profile_interval=0.05, save_path=path)
    with pytest.raises(KeyError):
        with profiler.profile_context("training"):
            raise KeyError("boom")
    assert not profiler.running
    region = load_timeline(path)["regions"][0]
    assert region["name"] == "training" and region["error"].startswith("KeyError")


def test_profiler_disabled_is_a_noop(tmp_path):
    path = tmp_path / "memory_profile.json"
    profiler = MemoryProfiler(enabled=False, save_path=path)
    with profiler.profile_context("training"):
        pass
    assert profiler.stop() is None and not path.exists() and not profiler.running


def test_profiler_background_sampling_and_start_stop(tmp_path):
    profiler = MemoryProfiler(profile_interval=0.02, save_path=None)
    with profiler:
        time.sleep(0.25)
        assert profiler.running
    assert not profiler.running
    samples = profiler.timeline()["samples"]
    assert len(samples) >= 5
    for s in samples:
        assert s["rss_bytes"] > 0 and 0 <= s["system_percent"] <= 100
        assert s["system_used_bytes"] + s["system_available_bytes"] == s["system_total_bytes"]


def test_dataframe_and_plot(tmp_path):
    profiler = MemoryProfiler(profile_interval=0.02, save_path=tmp_path / "p.json")
    with profiler.profile_context("a"):
        time.sleep(0.05)
    df = profiler.to_dataframe()
    assert {"t", "rss_bytes", "system_percent", "regions"} <= set(df.columns)
    assert len(df) == len(profiler.timeline()["samples"])
    assert list(profiler.regions_dataframe()["name"]) == ["a"]
    fig = profiler.plot(path=tmp_path / "timeline.png")
    assert (tmp_path / "timeline.png").stat().st_size > 1000
    assert fig.axes[0].get_ylabel() == "MiB"
    cuda_df = timeline_to_dataframe({"samples": [{"t": 0.0, "rss_bytes": 1, "cuda": [
        {"device": 1, "allocated_bytes": 3, "reserved_bytes": 4}]}]})
    assert cuda_df.loc[0, "cuda1_reserved_bytes"] == 4


def test_bad_arguments_and_versions(tmp_path):
    with pytest.raises(ValueError, match="profile_interval"):
        MemoryProfiler(profile_interval=0.0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="timeline version"):
        load_timeline(bad)
    with pytest.raises(ValueError, match="unknown keys"):
        MemoryProfiler.from_config({"interval": 1.0})


def test_snapshot_has_no_cuda_without_cuda():
    s = memory_snapshot()
    if not torch.cuda.is_available():
        assert s["cuda"] == []


@pytest.mark.cuda
def test_cuda_region_peak_is_exact_and_nested(tmp_path):
    profiler = MemoryProfiler(profile_interval=0.05, save_path=tmp_path / "p.json")
    dev = torch.device("cuda")
    torch.zeros(1, device=dev)
    with profiler.profile_context("outer"):
        base = torch.cuda.memory_allocated(dev)
        a = torch.empty(64 * 2**20, dtype=torch.uint8, device=dev)
        del a
        with profiler.profile_context("inner"):
            b = torch.empty(16 * 2**20, dtype=torch.uint8, device=dev)
            del b
    regions = {r["name"]: r for r in profiler.timeline()["regions"]}
    outer = regions["outer"]["cuda_peak_allocated_bytes"]["0"]
    inner = regions["inner"]["cuda_peak_allocated_bytes"]["0"]
    assert outer >= base + 64 * 2**20
    assert base + 16 * 2**20 <= inner < base + 64 * 2**20
    assert profiler.timeline()["samples"][-1]["cuda"][0]["allocated_bytes"] >= 0
