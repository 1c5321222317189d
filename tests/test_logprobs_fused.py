"""The fused LM-head log-probs equal the naive full-logits path, in value and in every gradient."""

from __future__ import annotations

import pytest
import torch
from _lm_helpers import ARCHS, VOCAB, build, left_padded_prompts

from rl2fx.logprobs import (
    linear_logprobs_and_entropy,
    naive_logprobs_and_entropy,
    response_logprobs,
)


def _naive(h, w, b, y, tau, cap):
    z = torch.nn.functional.linear(h, w, b)
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return naive_logprobs_and_entropy(z, y, temperature=tau)


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize(("tau", "cap", "bias"), [(1.0, None, False), (0.7, None, True), (1.3, 2.0, True)])
def test_linear_matches_naive_values_and_grads(chunk, tau, cap, bias):
    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(2, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = (2 * torch.randn(13, 8, generator=g, dtype=torch.float64)).requires_grad_(True)
    b = torch.randn(13, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, 13, (2, 7), generator=g)
    c1, c2 = torch.randn(2, 7, generator=g, dtype=torch.float64), torch.randn(2, 7, generator=g, dtype=torch.float64)
    params = [h, w] + ([b] if bias else [])

    lp, ent = linear_logprobs_and_entropy(h, w, b, y, temperature=tau, softcap=cap, chunk_size=chunk)
    grads = torch.autograd.grad((lp * c1 + ent * c2).sum(), params)
    lp_n, ent_n = _naive(h, w, b, y, tau, cap)
    grads_n = torch.autograd.grad((lp_n * c1 + ent_n * c2).sum(), params)
    torch.testing.assert_close(lp, lp_n, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, ent_n, rtol=1e-10, atol=1e-10)
    for a, n in zip(grads, grads_n, strict=True):
        torch.testing.assert_close(a, n, rtol=1e-9, atol=1e-10)


def test_linear_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (3,), generator=g)

    def f(h, w, b):
        return linear_logprobs_and_entropy(h, w, b, y, temperature=0.8, softcap=1.5, chunk_size=2)

    assert torch.autograd.gradcheck(f, (h, w, b))


def test_linear_logprobs_only_and_empty():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(4, 6, generator=g, requires_grad=True), torch.randn(9, 6, generator=g)
    y = torch.randint(0, 9, (4,), generator=g)
    lp, ent = linear_logprobs_and_entropy(h, w, None, y, with_entropy=False)
    assert ent is None
    lp.sum().backward()
    torch.testing.assert_close(lp, naive_logprobs_and_entropy(h @ w.T, y)[0])
    e_lp, e_ent = linear_logprobs_and_entropy(torch.zeros(2, 0, 6), w, None, torch.zeros(2, 0, dtype=torch.long))
    assert e_lp.shape == (2, 0) and e_ent.shape == (2, 0)


def test_linear_rejects_bad_arguments():
    h, w = torch.zeros(2, 3), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="labels must be in"):
        linear_logprobs_and_entropy(h, w, None, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="softcap must be in"):
        linear_logprobs_and_entropy(h, w, None, torch.tensor([0, 1]), softcap=0.0)
    with pytest.raises(ValueError, match="one dtype"):
        linear_logprobs_and_entropy(h.double(), w, None, torch.tensor([0, 1]))


def _batch(seed=0):
    ids, mask = left_padded_prompts(seed)
    g = torch.Generator().manual_seed(seed + 1)
    resp = torch.randint(3, VOCAB, (3, 4), generator=g)
    return torch.cat([ids, resp], 1), torch.cat([mask, torch.ones_like(resp)], 1), resp


def _logprobs_and_grads(model, fused, tau):
    ids, mask, resp = _batch()
    model.zero_grad(set_to_none=True)
    lp, ent = response_logprobs(model, ids, mask, resp, temperature=tau, chunk_size=5, with_entropy=True, fused=fused)
    c = torch.linspace(-1.0, 1.0, lp.numel()).reshape(lp.shape)
    (lp * c + 0.3 * ent).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), ent.detach(), grads


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_response_logprobs_match_full_logits(arch):
    """Every architecture: same log-probs, entropies and parameter gradients as the full-logits path."""
    model = build(arch)
    if arch == "gemma2":
        model.config.final_logit_softcapping = 0.5  # small enough that tanh is far from linear
    tau = 0.8 if arch in ("gpt2", "gemma2") else 1.0
    lp_f, ent_f, g_f = _logprobs_and_grads(model, True, tau)
    lp_n, ent_n, g_n = _logprobs_and_grads(model, False, tau)
    torch.testing.assert_close(lp_f, lp_n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_f, ent_n, rtol=1e-5, atol=1e-5)
    assert g_f.keys() == g_n.keys() and len(g_f) > 0
    for name in g_n:
        torch.testing.assert_close(g_f[name], g_n[name], rtol=1e-5, atol=1e-5, msg=name)


def test_fused_under_no_grad_and_bfloat16_autocast():
    model = build("llama")
    ids, mask, resp = _batch()
    with torch.no_grad():
        lp_f, _ = response_logprobs(model, ids, mask, resp, fused=True)
        lp_n, _ = response_logprobs(model, ids, mask, resp, fused=False)
    torch.testing.assert_close(lp_f, lp_n, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp_a, _ = response_logprobs(model, ids, mask, resp, fused=True)
    assert lp_a.dtype == torch.float32
    lp_a.sum().backward()
    assert model.get_output_embeddings().weight.grad.dtype == torch.float32
    assert (lp_a - lp_n).abs().max() < 0.1  # bf16 matmuls: close, not equal


class _ScaledHead(torch.nn.Module):
    """A causal LM whose logits are scaled after the head (as Cohere's ``logit_scale``), which no config names here."""

    def __init__(self, scale=0.5, plain=True):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, VOCAB, bias=False) if plain else torch.nn.Sequential(torch.nn.Linear(16, VOCAB))
        self.scale = scale

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return (self.head(self.emb(input_ids).cumsum(1)) * self.scale,)


def test_auto_falls_back_where_fused_would_be_wrong():
    ids, mask, resp = _batch()
    for model, why in [(_ScaledHead(0.5), "differs from its logits"), (_ScaledHead(plain=False), "not a plain")]:
        with pytest.warns(UserWarning, match=why):
            lp, _ = response_logprobs(model, ids, mask, resp)
        torch.testing.assert_close(lp, response_logprobs(model, ids, mask, resp, fused=False)[0])
        with pytest.raises(ValueError, match="fused=True but _ScaledHead"):
            response_logprobs(model, ids, mask, resp, fused=True)
    lp, _ = response_logprobs(_ScaledHead(1.0), ids, mask, resp, fused=True)  # no scale: fused is exact
    assert lp.shape == resp.shape


def test_response_logprobs_rejects_bad_arguments():
    model = build("gpt2")
    ids, mask, resp = _batch()
    with pytest.raises(ValueError, match="fused must be one of"):
        response_logprobs(model, ids, mask, resp, fused="yes")
    with pytest.raises(ValueError, match=r"response_ids.shape\[-1\] must be in"):
        response_logprobs(model, ids[:, :3], mask[:, :3], resp)


class _Wrapper(torch.nn.Module):
    """Stands in for DDP: the model under ``.module``, a forward that passes everything through."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_fused_through_a_wrapper_runs_the_wrapper_forward():
    model = build("gpt2")
    wrapped = _Wrapper(model)
    calls = []
    wrapped.register_forward_pre_hook(lambda mod, args: calls.append(1))
    ids, mask, resp = _batch()
    lp_w, _ = response_logprobs(wrapped, ids, mask, resp, fused=True)
    assert calls == [1]  # the verification pass uses the inner model; the scoring pass goes through the wrapper
    torch.testing.assert_close(lp_w, response_logprobs(model, ids, mask, resp, fused=False)[0], rtol=1e-5,
                               atol=1e-5)


def test_fused_never_holds_the_response_logits():
    """Peak tensor memory of forward + backward: the fused path saves at least one copy of the logits."""
    import transformers as t

    from rl2fx.memory.profiler import TensorMemoryTracker

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = t.LlamaForCausalLM(t.LlamaConfig(vocab_size=8192, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                 max_position_embeddings=64, tie_word_embeddings=True))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 8192, (2, 40), generator=g)
    resp = ids[:, -32:]
    logits_bytes = 2 * 32 * 8192 * 4
    response_logprobs(model, ids, None, resp, fused=True)  # the once-per-model check, outside the tracker
    peaks = {}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        with TensorMemoryTracker() as tracker:
            lp, ent = response_logprobs(model, ids, None, resp, chunk_size=8, with_entropy=True, fused=fused)
            (lp.sum() + ent.sum()).backward()
        peaks[fused] = tracker.peak_bytes
    # both paths write the same weight gradients; the full-logits path also holds the logits and their gradient
    assert peaks[False] - peaks[True] > logits_bytes
