"""The spec's memory snippets, run as written (``RL2.memory_optimizer`` -> ``rl2fx``)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import yaml

from rl2fx.testing.memory_models import tiny_llama


def test_spec_advanced_memory_optimization_usage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # --- spec: "Advanced Memory Optimization" / Usage in Code
    from rl2fx import MemoryOptimizer, MemoryProfiler, memory_efficient_context

    # Create optimizer
    optimizer = MemoryOptimizer(
        enable_gradient_checkpointing=True,
        enable_cpu_offload=True,
        memory_threshold=0.8
    )

    # Create profiler
    profiler = MemoryProfiler(
        enabled=True,
        profile_interval=1.0,
        save_path="memory_profile.json"
    )

    # Use memory-efficient context
    with memory_efficient_context(optimizer):
        with profiler.profile_context("training"):
            # Training code here
            pass
    # --- end of spec snippet
    timeline = json.loads((tmp_path / "memory_profile.json").read_text())
    assert [r["name"] for r in timeline["regions"]] == ["training"]
    assert len(timeline["samples"]) >= 2


def test_spec_advanced_usage_with_real_training_code(tmp_path):
    from rl2fx import MemoryOptimizer, MemoryProfiler, memory_efficient_context

    optimizer = MemoryOptimizer(enable_gradient_checkpointing=True, enable_cpu_offload=True,
                                memory_threshold=0.8)
    profiler = MemoryProfiler(enabled=True, profile_interval=0.05,
                              save_path=tmp_path / "memory_profile.json")
    model = optimizer.optimize_model_memory(tiny_llama(hidden_size=64, num_layers=2, vocab_size=64,
                                                       max_positions=16))
    adam = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    with memory_efficient_context(optimizer):
        with profiler.profile_context("training"):
            for step in range(3):
                with profiler.profile_context(f"step{step}"):
                    out = optimizer.memory_efficient_forward(model, {"input_ids": ids, "labels": ids})
                    out.loss.backward()
                    adam.step()
                    adam.zero_grad()
                    losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    regions = [r["name"] for r in json.loads((tmp_path / "memory_profile.json").read_text())["regions"]]
    assert regions == ["step0", "step1", "step2", "training"]


def test_spec_memory_optimization_usage_example():
    model = tiny_llama(hidden_size=64, num_layers=1, vocab_size=32, max_positions=8)
    sample_input = torch.randint(0, 32, (1, 8))
    input_tensor = torch.randint(0, 32, (4, 8))
    # --- spec: "Usage Examples" / Memory Optimization
    from rl2fx import MemoryOptimizer, MemoryProfiler

    # Create optimizer and profiler
    optimizer = MemoryOptimizer(memory_threshold=0.8)
    profiler = MemoryProfiler(enabled=True)

    # Optimize model
    model = optimizer.optimize_model_memory(model)

    # Find optimal batch size
    optimal_batch_size = optimizer.optimize_batch_size(model, sample_input)

    # Memory-efficient forward pass
    output = optimizer.memory_efficient_forward(model, input_tensor)
    # --- end of spec snippet
    assert profiler.enabled and not profiler.running
    assert model.is_activation_checkpointing
    # a tiny model against 80% of free RAM: the search reaches its upper bound
    assert optimal_batch_size == 1024
    assert output.logits.shape == (4, 8, 32) and output.logits.dtype == torch.bfloat16


SPEC_CONFIG = """
memory_optimization:
  enabled: true
  enable_gradient_checkpointing: true
  enable_activation_checkpointing: true
  enable_cpu_offload: true
  memory_threshold: 0.8
  gc_threshold: 0.9

  profiling:
    enabled: true
    profile_interval: 1.0
    save_path: "memory_profile.json"
"""


def test_spec_memory_optimization_config_section():
    from rl2fx import MemoryOptimizer, MemoryProfiler

    section = yaml.safe_load(SPEC_CONFIG)["memory_optimization"]
    optimizer = MemoryOptimizer.from_config(section)
    profiler = MemoryProfiler.from_config(section["profiling"])
    assert optimizer.memory_threshold == 0.8 and optimizer.gc_threshold == 0.9
    assert optimizer.config.checkpointing and optimizer.enable_cpu_offload
    assert profiler.enabled and profiler.profile_interval == 1.0
    assert profiler.save_path == "memory_profile.json"
    from omegaconf import OmegaConf

    node = OmegaConf.create(SPEC_CONFIG).memory_optimization
    assert MemoryOptimizer.from_config(node).config == optimizer.config


_HAS_SIZER = importlib.util.find_spec("rl2fx.control.batch_size") is not None


@pytest.mark.skipif(not _HAS_SIZER, reason="rl2fx.control.batch_size lands with the control branch")
def test_spec_adaptive_batch_sizer_reexported_from_memory():
    import rl2fx
    import rl2fx.control.batch_size as control_batch_size

    # --- spec: "Adaptive Batch Sizing" / Usage in Code
    from rl2fx.memory import AdaptiveBatchSizer

    sizer = AdaptiveBatchSizer(
        initial_batch_size=8,
        min_batch_size=1,
        max_batch_size=64,
        adaptation_factor=0.1
    )
    # --- end of spec snippet
    assert AdaptiveBatchSizer is control_batch_size.AdaptiveBatchSizer is rl2fx.AdaptiveBatchSizer
    new_batch_size = sizer.update_batch_size(0.3, 1.0, True)
    assert 1 <= new_batch_size <= 64


def test_memory_package_lazy_names():
    import rl2fx.memory as mem

    assert set(mem.__all__) >= {"MemoryOptimizer", "MemoryProfiler", "memory_efficient_context",
                                "AdaptiveBatchSizer", "TensorMemoryTracker"}
    with pytest.raises(AttributeError, match="nope"):
        _ = mem.nope
