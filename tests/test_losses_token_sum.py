"""verl's token-sum aggregation: the masked sum, additive over micro-batches, blind to masked-out NaN."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.losses import AGG_MODES, aggregate


@st.composite
def loss_and_mask(draw):
    B, T = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return torch.randn(B, T, generator=g, dtype=torch.float64), torch.rand(B, T, generator=g) < 0.6


def test_token_sum_is_a_mode():
    assert "token-sum" in AGG_MODES


@given(loss_and_mask())
def test_token_sum_is_the_masked_sum_loop(lm):
    loss, mask = lm
    want = sum(loss[i, t].item() for i in range(loss.shape[0]) for t in range(loss.shape[1]) if mask[i, t])
    torch.testing.assert_close(aggregate(loss, mask.double(), "token-sum"), torch.tensor(want, dtype=torch.float64))
    # the same as seq-mean-token-sum times the number of sequences
    torch.testing.assert_close(aggregate(loss, mask.double(), "token-sum"),
                               aggregate(loss, mask.double(), "seq-mean-token-sum") * loss.shape[0])


@given(loss_and_mask(), st.integers(1, 4))
def test_token_sum_micro_batches_add_up_and_ignore_masked_nan(lm, k):
    loss, mask = lm
    full = aggregate(loss, mask.double(), "token-sum")
    parts = sum(aggregate(x, m.double(), "token-sum") for x, m in zip(loss.split(k), mask.split(k), strict=True))
    torch.testing.assert_close(parts, full)
    poisoned = torch.where(mask, loss, float("nan"))
    assert torch.equal(aggregate(poisoned, mask.double(), "token-sum"), full)
