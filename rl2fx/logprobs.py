"""Token log-probabilities and entropies from logits, chunked so no ``[*batch, time, vocab]`` float32 copy exists.

For logits :math:`z \\in \\mathbb{R}^V` at one position, temperature :math:`\\tau`
and the sampled token :math:`a`:

.. math::

    \\log \\pi(a) = z_a/\\tau - \\mathrm{LSE}(z/\\tau), \\qquad
    H = \\mathrm{LSE}(z/\\tau) - \\sum_j p_j z_j/\\tau,\\quad p = \\mathrm{softmax}(z/\\tau).

The naive ``log_softmax(logits.float()).gather(...)`` materialises a float32
tensor as large as the logits (two with the entropy, and autograd keeps them
for the backward pass): for a 150k-token vocabulary that is the largest
tensor of an RL step. Here a custom autograd function walks the time axis in
chunks, keeps only the per-token log-sum-exp (and entropy) for the backward
pass, and recomputes the softmax chunk by chunk there, using

.. math::

    \\frac{\\partial \\log\\pi(a)}{\\partial z_j} = \\frac{\\mathbb{1}[j=a] - p_j}{\\tau}, \\qquad
    \\frac{\\partial H}{\\partial z_j} = -\\frac{p_j\\,(\\log p_j + H)}{\\tau}.

The same trick underlies the fused/chunked cross-entropy kernels of Liger
Kernel (Hsu et al., 2024) and the chunked log-prob paths of verl and OpenRLHF;
this version is plain PyTorch. Extra memory is ``O(chunk_size * vocab)``
float32 in both passes instead of ``O(time * vocab)``.
"""

from __future__ import annotations

from typing import Any

import torch

from rl2fx._typing import Float, Int, Tensor, check_range, typechecked

__all__ = ["token_logprobs", "token_logprobs_and_entropy", "naive_logprobs_and_entropy", "response_logits"]


def _chunks(t: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, t)) for s in range(0, t, size)]


class _ChunkedLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, temperature: float, chunk_size: int,
                with_entropy: bool) -> tuple[Tensor, Tensor]:
        t = logits.shape[-2]
        acc = torch.promote_types(logits.dtype, torch.float32)
        lp = logits.new_empty(logits.shape[:-1], dtype=acc)
        lse = torch.empty_like(lp)
        ent = torch.empty_like(lp) if with_entropy else lp.new_empty(0)
        for s, e in _chunks(t, chunk_size):
            z = logits[..., s:e, :].to(acc)
            if temperature != 1.0:
                z = z / temperature
            lse_c = torch.logsumexp(z, dim=-1)
            lse[..., s:e] = lse_c
            lp[..., s:e] = z.gather(-1, labels[..., s:e].unsqueeze(-1)).squeeze(-1) - lse_c
            if with_entropy:
                logp = z - lse_c.unsqueeze(-1)
                ent[..., s:e] = -(logp.exp() * logp).sum(-1)
        ctx.save_for_backward(logits, labels, lse, ent)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        return lp, ent

    @staticmethod
    def backward(ctx: Any, g_lp: Tensor | None, g_ent: Tensor | None) -> tuple[Tensor | None, ...]:
        logits, labels, lse, ent = ctx.saved_tensors
        tau = ctx.temperature
        grad = torch.empty_like(logits)
        for s, e in _chunks(logits.shape[-2], ctx.chunk_size):
            z = logits[..., s:e, :].to(lse.dtype)
            if tau != 1.0:
                z = z / tau
            logp = z - lse[..., s:e].unsqueeze(-1)
            p = torch.exp(logp)
            g = torch.zeros_like(z)
            if g_lp is not None:
                gl = g_lp[..., s:e].unsqueeze(-1)
                g = g - p * gl
                g.scatter_add_(-1, labels[..., s:e].unsqueeze(-1), gl)
            if ctx.with_entropy and g_ent is not None:
                g = g - g_ent[..., s:e].unsqueeze(-1) * p * (logp + ent[..., s:e].unsqueeze(-1))
            if tau != 1.0:
                g = g / tau
            grad[..., s:e, :] = g.to(grad.dtype)
        return grad, None, None, None, None


@typechecked
def token_logprobs_and_entropy(
    logits: Float[Tensor, "*batch time vocab"],
    labels: Int[Tensor, "*batch time"],
    *,
    temperature: float = 1.0,
    chunk_size: int = 128,
    with_entropy: bool = True,
) -> tuple[Float[Tensor, "*batch time"], Float[Tensor, "*batch time"] | None]:
    """Log-probability of ``labels`` and entropy at each position (float32 at least), chunked over time.

    Differentiable in ``logits`` (custom backward, also chunked). With
    ``with_entropy=False`` the entropy is skipped and ``None`` is returned for it.

    >>> logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    >>> lp, h = token_logprobs_and_entropy(logits, torch.tensor([[0, 1]]), chunk_size=1)
    >>> [round(v, 4) for v in lp[0].tolist()], [round(v, 4) for v in h[0].tolist()]
    ([-0.6931, -2.1269], [0.6931, 0.3653])
    """
    check_range("temperature", temperature, 0.0, None, low_inclusive=False)
    check_range("chunk_size", chunk_size, 1, None)
    if labels.min() < 0 or labels.max() >= logits.shape[-1]:
        raise ValueError(f"labels must be in [0, {logits.shape[-1] - 1}] (the vocabulary), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")
    lp, ent = _ChunkedLogProbEntropy.apply(logits, labels, float(temperature), int(chunk_size), with_entropy)
    return lp, (ent if with_entropy else None)


@typechecked
def token_logprobs(
    logits: Float[Tensor, "*batch time vocab"],
    labels: Int[Tensor, "*batch time"],
    *,
    temperature: float = 1.0,
    chunk_size: int = 128,
) -> Float[Tensor, "*batch time"]:
    """Log-probability of ``labels`` under ``softmax(logits / temperature)``, chunked over time.

    >>> logits = torch.log(torch.tensor([[[0.25, 0.75]]]))
    >>> token_logprobs(logits, torch.tensor([[1]])).exp().item()
    0.75
    """
    return token_logprobs_and_entropy(logits, labels, temperature=temperature, chunk_size=chunk_size,
                                      with_entropy=False)[0]


@typechecked
def naive_logprobs_and_entropy(
    logits: Float[Tensor, "*batch time vocab"],
    labels: Int[Tensor, "*batch time"],
    *,
    temperature: float = 1.0,
) -> tuple[Float[Tensor, "*batch time"], Float[Tensor, "*batch time"]]:
    """Reference implementation: full float32 ``log_softmax`` (what the chunked version avoids).

    >>> logits = torch.randn(2, 5, 7)
    >>> labels = torch.randint(0, 7, (2, 5))
    >>> a, b = naive_logprobs_and_entropy(logits, labels), token_logprobs_and_entropy(logits, labels)
    >>> torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-6)
    True
    """
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def response_logits(
    model: torch.nn.Module,
    input_ids: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"] | None,
    response_len: int,
    **forward_kwargs: Any,
) -> Tensor:
    """Logits predicting the last ``response_len`` tokens of ``input_ids``: ``[batch, response_len, vocab]``.

    Position ``t`` of the output predicts ``input_ids[:, -response_len + t]``. Only
    ``response_len + 1`` positions of the LM head are computed when the model
    supports transformers' ``logits_to_keep`` (saving the prompt's share of the
    largest activation).

    >>> from rl2fx.tasks import build_tiny_lm
    >>> m = build_tiny_lm(16, hidden_size=32, num_layers=1, num_heads=2)
    >>> ids = torch.tensor([[1, 5, 13, 6, 7]])
    >>> out = response_logits(m, ids, None, 2)
    >>> torch.allclose(out, m(ids).logits[:, -3:-1], atol=1e-6)
    True
    """
    check_range("response_len", response_len, 1, input_ids.shape[-1] - 1)
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=response_len + 1,
                    use_cache=False, **forward_kwargs)
    except TypeError:  # models without logits_to_keep
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -response_len - 1:-1]
