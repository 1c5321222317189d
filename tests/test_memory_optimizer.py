"""MemoryOptimizer: checkpointing equivalence, mixed precision, offload decisions, batch search."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from rl2fx.memory.optimizer import (
    BatchTrial,
    MemoryConfig,
    MemoryOptimizer,
    disable_checkpointing,
    enable_checkpointing,
    find_blocks,
    find_executable_batch_size,
    is_oom_error,
    make_batch,
    offload_optimizer_state,
    search_batch_size,
)
from rl2fx.memory.profiler import TensorMemoryTracker
from rl2fx.testing.memory_models import block_stack, tiny_llama


def _loss_and_grads(model, step):
    model.zero_grad(set_to_none=True)
    loss = step(model)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def _llama_step(ids):
    return lambda m: m(input_ids=ids, labels=ids).loss


def _stack_step(x, y):
    return lambda m: (m(x) - y).square().mean()


# --------------------------------------------------------------------------- checkpointing
def test_transformers_checkpointing_same_loss_and_grads():
    model = tiny_llama(hidden_size=64, num_layers=3, vocab_size=128, max_positions=32)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    loss0, grads0 = _loss_and_grads(model, _llama_step(ids))
    assert enable_checkpointing(model) == "transformers"
    assert model.is_activation_checkpointing
    loss1, grads1 = _loss_and_grads(model, _llama_step(ids))
    torch.testing.assert_close(loss1, loss0)
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)
    disable_checkpointing(model)
    assert not model.is_activation_checkpointing


def test_transformers_checkpointing_cuts_tensor_peak():
    model = tiny_llama(hidden_size=64, num_layers=4, vocab_size=64, max_positions=64)
    ids = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(1))
    peaks = []
    for on in (False, True):
        if on:
            enable_checkpointing(model)
        model.zero_grad(set_to_none=True)
        with TensorMemoryTracker() as t:
            model(input_ids=ids, labels=ids).loss.backward()
        peaks.append(t.peak_bytes)
    assert peaks[1] < 0.75 * peaks[0], peaks


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_generic_checkpointing_same_loss_and_grads(dropout):
    model = block_stack(width=16, depth=4, dropout=dropout)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    keys = list(model.state_dict())
    torch.manual_seed(123)
    loss0, grads0 = _loss_and_grads(model, _stack_step(x, y))
    assert enable_checkpointing(model) == "torch"
    assert enable_checkpointing(model) == "torch"  # idempotent
    assert list(model.state_dict()) == keys
    torch.manual_seed(123)  # dropout must replay the same mask in the recomputation
    loss1, grads1 = _loss_and_grads(model, _stack_step(x, y))
    torch.testing.assert_close(loss1, loss0)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-6, msg=name)
    disable_checkpointing(model)
    assert all(not hasattr(b, "_rl2fx_checkpointed") for b in model.blocks)
    assert "forward" not in vars(model.blocks[0])


def test_generic_checkpointing_cuts_tensor_peak_and_skips_under_no_grad():
    model = block_stack(width=64, depth=6)
    x, y = torch.randn(256, 64), torch.randn(256)
    peaks = []
    for on in (False, True):
        if on:
            enable_checkpointing(model)
        model.zero_grad(set_to_none=True)
        with TensorMemoryTracker() as t:
            _stack_step(x, y)(model).backward()
        peaks.append(t.peak_bytes)
    assert peaks[1] < 0.6 * peaks[0], peaks
    with torch.no_grad():
        out = model(x)
    assert out.grad_fn is None and out.shape == (256,)


def test_find_blocks_picks_the_repeated_layers_and_errors_without_any():
    model = tiny_llama(hidden_size=64, num_layers=3, vocab_size=32, max_positions=8)
    blocks = find_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 3
    with pytest.raises(ValueError, match="no repeated blocks"):
        enable_checkpointing(nn.Linear(3, 3))
    # The generic path works on a transformers model too when asked for.
    assert enable_checkpointing(model, prefer_transformers=False) == "torch"
    disable_checkpointing(model)


# --------------------------------------------------------------------------- forward / precision
def test_memory_efficient_forward_mixed_precision_close_to_fp32():
    model = block_stack(width=32, depth=3)
    x = torch.randn(16, 32)
    with torch.no_grad():
        ref = model(x)
    opt = MemoryOptimizer()
    out = opt.memory_efficient_forward(model, x)
    assert opt.checkpoint_method == "torch"
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    opt32 = MemoryOptimizer(enable_mixed_precision=False)
    torch.testing.assert_close(opt32.memory_efficient_forward(model, x), ref)


def test_memory_efficient_forward_accepts_mapping_and_sequence():
    model = tiny_llama(hidden_size=64, num_layers=1, vocab_size=32, max_positions=8)
    ids = torch.randint(0, 32, (2, 8))
    opt = MemoryOptimizer(enable_mixed_precision=False)
    a = opt.memory_efficient_forward(model, {"input_ids": ids}).logits
    b = opt.memory_efficient_forward(model, ids).logits
    torch.testing.assert_close(a, b)
    assert a.shape == (2, 8, 32)


def test_cpu_offload_is_a_logged_noop_on_cpu(caplog):
    model = block_stack(width=8, depth=2)
    opt = MemoryOptimizer(enable_cpu_offload=True)
    with caplog.at_level(logging.INFO, logger="rl2fx.memory"):
        opt.optimize_model_memory(model)
        assert opt.offload_optimizer_state(torch.optim.Adam(model.parameters())) is None
    assert any("not on a CUDA device" in m for m in opt.notes)
    assert "cpu offload skipped" in caplog.text
    assert offload_optimizer_state(torch.optim.SGD(model.parameters(), lr=0.1)) is None


# --------------------------------------------------------------------------- thresholds
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"memory_threshold": 0.0}, "memory_threshold"),
        ({"memory_threshold": -0.1}, "memory_threshold"),
        ({"memory_threshold": 0.95, "gc_threshold": 0.9}, "may not exceed gc_threshold"),
        ({"memory_threshold": math.nan}, "memory_threshold"),
        ({"gc_threshold": 1.5}, "gc_threshold"),
        ({"gc_threshold": 0.0, "memory_threshold": 0.0}, "gc_threshold"),
        ({"memory_budget_bytes": 0}, "memory_budget_bytes"),
        ({"mixed_precision_dtype": "float8"}, "mixed_precision_dtype"),
    ],
)
def test_bad_settings_raise_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemoryOptimizer(**kwargs)


def test_thresholds_boundaries_accepted_and_exposed():
    opt = MemoryOptimizer(memory_threshold=1.0, gc_threshold=1.0)
    assert opt.memory_threshold == 1.0 and opt.gc_threshold == 1.0
    with pytest.raises(AttributeError):
        _ = opt.no_such_setting


def test_state_dict_round_trip_and_from_config():
    opt = MemoryOptimizer(memory_threshold=0.5, gc_threshold=0.7, enable_cpu_offload=False)
    opt.last_batch_size = 12
    other = MemoryOptimizer()
    other.load_state_dict(opt.state_dict())
    assert other.config == opt.config and other.last_batch_size == 12
    off = MemoryOptimizer.from_config({"enabled": False, "memory_threshold": 0.6})
    assert not off.config.checkpointing and not off.config.enable_mixed_precision
    with pytest.raises(ValueError, match="unknown keys"):
        MemoryOptimizer.from_config({"memory_treshold": 0.6})


# --------------------------------------------------------------------------- batch search
@given(
    limit=st.integers(1, 300),
    lo=st.integers(1, 20),
    span=st.integers(0, 300),
)
def test_search_batch_size_matches_linear_scan(limit, lo, span):
    hi = lo + span
    calls = []

    def fits(b):
        calls.append(b)
        return BatchTrial(b, b <= limit, b, "simulated")

    reference = max((b for b in range(lo, hi + 1) if b <= limit), default=None)
    if reference is None:
        with pytest.raises(RuntimeError, match="min_batch_size"):
            search_batch_size(fits, min_batch_size=lo, max_batch_size=hi)
        return
    best, trials = search_batch_size(fits, min_batch_size=lo, max_batch_size=hi)
    assert best == reference
    assert all(lo <= b <= hi for b in calls)
    # doubling then bisection: logarithmic in the range, not linear
    assert len(calls) <= 2 * math.ceil(math.log2(hi + 1)) + 2


def test_make_batch_tiles_rows():
    x = torch.arange(6).reshape(3, 2)
    assert make_batch(x, 5).tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [2, 3]]
    out = make_batch((x, torch.ones(3), 7), 2)
    assert isinstance(out, tuple) and out[0].shape == (2, 2) and out[2] == 7
    with pytest.raises(ValueError, match="batch_size"):
        make_batch(x, 0)


def _step_peak(model, x, batch_size):
    """Independent reference: the tracked peak of one plain step at ``batch_size``."""
    model.zero_grad(set_to_none=True)
    with TensorMemoryTracker() as t:
        model(make_batch(x, batch_size)).float().mean().backward()
    model.zero_grad(set_to_none=True)
    return t.peak_bytes


@pytest.mark.parametrize("target", [3, 6, 13])
def test_optimize_batch_size_returns_largest_fitting_under_simulated_budget(target):
    model = block_stack(width=32, depth=3)
    x = torch.randn(4, 32)
    peaks = {b: _step_peak(model, x, b) for b in (target, target + 1)}
    assert peaks[target] < peaks[target + 1]
    budget = (peaks[target] + peaks[target + 1]) // 2
    opt = MemoryOptimizer(enable_gradient_checkpointing=False, enable_activation_checkpointing=False,
                          enable_mixed_precision=False, memory_budget_bytes=budget)
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), sentinel, strict=True):
        p.grad = g
    assert opt.optimize_batch_size(model, x, max_batch_size=64) == target
    assert opt.last_batch_size == target
    assert any(not t.fits for t in opt.last_trials)
    # the search leaves the model's gradients as it found them
    assert all(p.grad is g for p, g in zip(model.parameters(), sentinel, strict=True))


def test_optimize_batch_size_on_transformer_with_checkpointing_fits_more():
    model = tiny_llama(hidden_size=64, num_layers=3, vocab_size=64, max_positions=32)
    ids = torch.randint(0, 64, (1, 32))
    plain = MemoryOptimizer(enable_gradient_checkpointing=False, enable_activation_checkpointing=False,
                            enable_mixed_precision=False, memory_budget_bytes=6 * 2**20)
    b_plain = plain.optimize_batch_size(model, ids, max_batch_size=64)
    ckpt = MemoryOptimizer(enable_mixed_precision=False, memory_budget_bytes=6 * 2**20)
    b_ckpt = ckpt.optimize_batch_size(model, ids, max_batch_size=64)
    assert 1 <= b_plain < b_ckpt


def test_optimize_batch_size_raises_when_nothing_fits():
    model = block_stack(width=32, depth=2)
    opt = MemoryOptimizer(enable_mixed_precision=False, memory_budget_bytes=16)
    with pytest.raises(RuntimeError, match="min_batch_size=1 does not fit"):
        opt.optimize_batch_size(model, torch.randn(2, 32))


def test_find_executable_batch_size_halves_until_it_fits():
    seen = []

    @find_executable_batch_size(starting_batch_size=100, memory_budget_bytes=10 * 4 * 64 + 1)
    def step(batch_size, width):
        seen.append(batch_size)
        return torch.zeros(batch_size, width).sum()

    step(64)
    assert seen == [100, 50, 25, 12, 6] or seen[-1] <= 10
    assert step.batch_size == seen[-1] and step.batch_size * 4 * 64 <= 10 * 4 * 64 + 1
    assert seen[-2] * 4 * 64 > 10 * 4 * 64


def test_find_executable_batch_size_reraises_other_errors_and_gives_up_at_zero():
    @find_executable_batch_size(starting_batch_size=8)
    def bad(batch_size):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        bad()

    @find_executable_batch_size(starting_batch_size=4)
    def never(batch_size):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(RuntimeError, match="no executable batch size"):
        never()


def test_is_oom_error_sees_wrapped_budget_errors():
    from rl2fx.memory.profiler import MemoryBudgetExceeded

    try:
        try:
            raise MemoryBudgetExceeded("over")
        except MemoryBudgetExceeded as inner:
            raise RuntimeError("autograd wrapper") from inner
    except RuntimeError as outer:
        assert is_oom_error(outer)


def test_memory_config_defaults_match_spec():
    c = MemoryConfig()
    assert (c.enable_gradient_checkpointing, c.enable_activation_checkpointing, c.enable_cpu_offload,
            c.enable_mixed_precision, c.memory_threshold, c.gc_threshold) == (True, True, True, True, 0.8, 0.9)


# --------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_cuda_activation_offload_cuts_device_peak_and_keeps_grads():
    device = torch.device("cuda")
    model = block_stack(width=256, depth=6).to(device)
    x, y = torch.randn(2048, 256, device=device), torch.randn(2048, device=device)
    results = []
    for offload in (False, True):
        opt = MemoryOptimizer(enable_gradient_checkpointing=False, enable_activation_checkpointing=False,
                              enable_mixed_precision=False, enable_cpu_offload=offload)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = (opt.memory_efficient_forward(model, x) - y).square().mean()
        loss.backward()
        torch.cuda.synchronize()
        results.append((torch.cuda.max_memory_allocated() - base,
                        [p.grad.clone() for p in model.parameters()]))
    assert results[1][0] < results[0][0]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
def test_cuda_optimizer_state_offload_matches_plain_adam():
    device = torch.device("cuda")
    models = [block_stack(width=32, depth=2).to(device) for _ in range(2)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in models]
    handle = offload_optimizer_state(opts[1])
    assert handle is not None
    x = torch.randn(16, 32, device=device)
    for _ in range(3):
        for m, o in zip(models, opts, strict=True):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for state in opts[1].state.values():
        assert state["exp_avg"].device.type == "cpu"
    for p0, p1 in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p0, p1)
    handle.remove()


@pytest.mark.cuda
def test_cuda_optimize_batch_size_with_budget():
    device = torch.device("cuda")
    model = block_stack(width=256, depth=4).to(device)
    opt = MemoryOptimizer(enable_mixed_precision=False, memory_budget_bytes=64 * 2**20)
    best = opt.optimize_batch_size(model, torch.randn(1, 256, device=device), max_batch_size=1 << 16)
    assert 1 <= best < 1 << 16
    assert all((t.peak_bytes or 0) <= 64 * 2**20 for t in opt.last_trials if t.fits)


def test_optimize_model_memory_without_blocks_reports_and_continues(caplog):
    model = nn.Linear(4, 4)
    opt = MemoryOptimizer(enable_mixed_precision=False)
    with caplog.at_level(logging.WARNING, logger="rl2fx.memory"):
        assert opt.optimize_model_memory(model) is model
    assert opt.checkpoint_method == "none"
    assert "checkpointing skipped" in caplog.text
    assert opt.memory_efficient_forward(model, torch.randn(2, 4)).shape == (2, 4)


def test_memory_efficient_forward_checkpoints_each_model():
    from rl2fx.memory.optimizer import is_checkpointed

    opt = MemoryOptimizer(enable_mixed_precision=False)
    a, b = block_stack(width=8, depth=2), block_stack(width=8, depth=2, seed=1)
    opt.memory_efficient_forward(a, torch.randn(2, 8))
    opt.memory_efficient_forward(b, torch.randn(2, 8))
    assert is_checkpointed(a) and is_checkpointed(b)
