"""Chunked log-probs/entropy equal the naive full log-softmax, in value and gradient."""

from __future__ import annotations

import pytest
import torch

from rl2fx.logprobs import (
    naive_logprobs_and_entropy,
    response_logits,
    token_logprobs,
    token_logprobs_and_entropy,
)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", [(2, 7, 11), (3, 2, 5, 13)])
def test_chunked_matches_naive_values_and_grads(chunk, temperature, shape):
    g = torch.Generator().manual_seed(chunk)
    logits = (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    w1 = torch.randn(shape[:-1], generator=g, dtype=torch.float64)
    w2 = torch.randn(shape[:-1], generator=g, dtype=torch.float64)

    lp, ent = token_logprobs_and_entropy(logits, labels, temperature=temperature, chunk_size=chunk)
    (lp * w1 + ent * w2).sum().backward()
    g_chunked = logits.grad.clone()
    logits.grad = None

    lp_n, ent_n = naive_logprobs_and_entropy(logits, labels, temperature=temperature)
    (lp_n * w1 + ent_n * w2).sum().backward()
    torch.testing.assert_close(lp.double(), lp_n.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent.double(), ent_n.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_chunked, logits.grad, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3), generator=g)

    def f(x):
        lp, ent = token_logprobs_and_entropy(x, labels, chunk_size=2, temperature=1.3)
        return lp, ent

    assert torch.autograd.gradcheck(f, (logits,))


def test_bfloat16_logits_give_float32_results_close_to_naive():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 50, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 9), generator=g)
    lp = token_logprobs(logits, labels, chunk_size=4)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, naive_logprobs_and_entropy(logits, labels)[0])


def test_label_out_of_vocab_raises():
    with pytest.raises(ValueError, match="labels must be in"):
        token_logprobs(torch.zeros(1, 2, 3), torch.tensor([[0, 3]]))


def test_response_logits_match_full_forward():
    from rl2fx.trainer.tasks import build_tiny_lm

    m = build_tiny_lm(16, hidden_size=32, num_layers=1, num_heads=2, arch="gpt2")
    ids = torch.tensor([[1, 4, 5, 13, 6, 7, 2]])
    full = m(ids).logits
    torch.testing.assert_close(response_logits(m, ids, None, 3), full[:, -4:-1], atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunked_matches_naive_on_cuda():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 33, 1000, generator=g).cuda().requires_grad_(True)
    labels = torch.randint(0, 1000, (2, 33), generator=g).cuda()
    lp, ent = token_logprobs_and_entropy(logits, labels, chunk_size=16)
    (lp.sum() + ent.sum()).backward()
    g1 = logits.grad.clone()
    logits.grad = None
    lp_n, ent_n = naive_logprobs_and_entropy(logits, labels)
    (lp_n.sum() + ent_n.sum()).backward()
    torch.testing.assert_close(lp, lp_n)
    torch.testing.assert_close(ent, ent_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1, logits.grad, atol=1e-5, rtol=1e-5)
