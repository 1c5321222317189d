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
this version is plain PyTorch. Extra memory is two ``[chunk_size, vocab]``
float32 buffers in either pass instead of several ``[batch * time, vocab]`` ones.

Every forward pass on padded input gets ``position_ids`` derived from the
attention mask (:func:`position_ids_from_mask`), as ``generate`` does when it
samples: a model with absolute position embeddings (GPT-2) otherwise scores a
left-padded prompt at shifted positions, and its log-probs disagree with the
sampler's.
"""

from __future__ import annotations

from typing import Any

import inspect
import weakref

import torch

from rl2fx._typing import Float, Int, Shaped, Tensor, check_range, typechecked

__all__ = ["token_logprobs", "token_logprobs_and_entropy", "naive_logprobs_and_entropy", "response_logits",
           "position_ids_from_mask", "forward_accepts"]


def _chunks(t: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, t)) for s in range(0, t, size)]


def _time_chunk(shape: torch.Size, tokens: int) -> int:
    # chunk_size counts tokens; a chunk spans all batch rows, so it covers tokens // rows time steps
    rows = 1
    for d in shape[:-2]:
        rows *= int(d)
    return max(1, tokens // max(rows, 1))


class _ChunkedLogProbEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, temperature: float, chunk_size: int,
                with_entropy: bool) -> tuple[Tensor, Tensor]:
        t = logits.shape[-2]
        acc = torch.promote_types(logits.dtype, torch.float32)
        lp = logits.new_empty(logits.shape[:-1], dtype=acc)
        lse = torch.empty_like(lp)
        ent = torch.empty_like(lp) if with_entropy else lp.new_empty(0)
        step = _time_chunk(logits.shape, chunk_size)
        for s, e in _chunks(t, step):
            z = logits[..., s:e, :].to(acc, copy=True)  # the one [rows, chunk, vocab] temporary, reused in place
            if temperature != 1.0:
                z.div_(temperature)
            lse_c = torch.logsumexp(z, dim=-1)
            lse[..., s:e] = lse_c
            logp = z.sub_(lse_c.unsqueeze(-1))
            lp[..., s:e] = logp.gather(-1, labels[..., s:e].unsqueeze(-1)).squeeze(-1)
            if with_entropy:
                ent[..., s:e] = -(logp.exp().mul_(logp)).sum(-1)
            del z, logp
        ctx.save_for_backward(logits, labels, lse, ent)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, step, with_entropy
        return lp, ent

    @staticmethod
    def backward(ctx: Any, g_lp: Tensor | None, g_ent: Tensor | None) -> tuple[Tensor | None, ...]:
        logits, labels, lse, ent = ctx.saved_tensors
        tau = ctx.temperature
        grad = torch.empty_like(logits)
        for s, e in _chunks(logits.shape[-2], ctx.chunk_size):
            logp = logits[..., s:e, :].to(lse.dtype, copy=True)
            if tau != 1.0:
                logp.div_(tau)
            logp.sub_(lse[..., s:e].unsqueeze(-1))
            p = logp.exp()
            # dH/dz = -p (log p + H) / tau, built in the log-prob buffer
            if ctx.with_entropy and g_ent is not None:
                term = logp.add_(ent[..., s:e].unsqueeze(-1)).mul_(p).mul_(g_ent[..., s:e].unsqueeze(-1))
            else:
                term = None
            # d log pi(a)/dz = (onehot(a) - p) / tau, built in the probability buffer
            if g_lp is not None:
                gl = g_lp[..., s:e].unsqueeze(-1)
                g = p.mul_(-gl)
                g.scatter_add_(-1, labels[..., s:e].unsqueeze(-1), gl)
            else:
                g = p.zero_()
            if term is not None:
                g.sub_(term)
            if tau != 1.0:
                g.div_(tau)
            grad[..., s:e, :] = g
            del logp, p, g, term
        return grad, None, None, None, None


@typechecked
def token_logprobs_and_entropy(
    logits: Float[Tensor, "*batch time vocab"],
    labels: Int[Tensor, "*batch time"],
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    with_entropy: bool = True,
) -> tuple[Float[Tensor, "*batch time"], Float[Tensor, "*batch time"] | None]:
    """Log-probability of ``labels`` and entropy at each position (float32 at least), chunked over time.

    ``chunk_size`` is the number of tokens (batch rows x time steps) per chunk.
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
    chunk_size: int = 256,
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


@typechecked
def position_ids_from_mask(attention_mask: Shaped[Tensor, "*batch seq"]) -> Int[Tensor, "*batch seq"]:
    """Position of each token among the unmasked tokens of its row; 0 on masked-out tokens.

    :math:`\\mathrm{pos}_t = \\sum_{s \\le t} m_s - 1` where :math:`m_t = 1`, else 0: the rule of
    transformers' ``GenerationMixin._prepare_position_ids_for_generation``, so a forward
    pass over a left-padded batch sees each token at the position it had while
    ``generate`` sampled it. ``attention_mask`` may be bool, integer or 0/1 float.

    >>> position_ids_from_mask(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])).tolist()
    [[0, 0, 0, 1, 2], [0, 1, 2, 3, 0]]
    """
    on = attention_mask != 0
    pos = on.long().cumsum(-1) - 1
    return torch.where(on, pos, torch.zeros_like(pos))


def _inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``forward`` defines the arguments: through DDP/FSDP1 (``.module``) and PEFT."""
    m: Any = model
    for _ in range(4):  # wrappers nest (DDP around a PEFT model) but never deeply
        if isinstance(getattr(m, "module", None), torch.nn.Module):
            m = m.module
        elif callable(getattr(m, "get_base_model", None)):
            m = m.get_base_model()
        else:
            break
    return m


_ACCEPTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, bool]]" = weakref.WeakKeyDictionary()


def forward_accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model``'s forward (through DDP/PEFT wrappers) names the argument ``name``.

    A forward that only takes ``**kwargs`` does not count: such a model may drop
    the argument silently. Answers are cached per module.

    >>> from rl2fx.tasks import build_tiny_lm
    >>> forward_accepts(build_tiny_lm(16, hidden_size=32, num_layers=1, num_heads=2), "position_ids")
    True
    """
    inner = _inner_model(model)
    cache = _ACCEPTS.setdefault(inner, {})
    if name not in cache:
        try:
            params = inspect.signature(inner.forward).parameters
        except (TypeError, ValueError):  # builtins or C-implemented forwards have no signature
            params = {}  # type: ignore[assignment]
        p = params.get(name)
        cache[name] = p is not None and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    return cache[name]


def _forward_kwargs(model: torch.nn.Module, attention_mask: Tensor | None, keep: int | None,
                    forward_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``use_cache=False``, ``position_ids`` from the mask and ``logits_to_keep`` where the model takes them."""
    kw: dict[str, Any] = {"use_cache": False}
    if attention_mask is not None and "position_ids" not in forward_kwargs and forward_accepts(model, "position_ids"):
        kw["position_ids"] = position_ids_from_mask(attention_mask)
    if keep is not None:
        for name in ("logits_to_keep", "num_logits_to_keep"):  # the older transformers spelling second
            if forward_accepts(model, name):
                kw[name] = keep
                break
    kw.update(forward_kwargs)
    return kw


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
    largest activation). With an ``attention_mask``, ``position_ids`` derived from
    it (:func:`position_ids_from_mask`) are passed when the model's forward takes
    them and ``forward_kwargs`` does not set them, so left-padded rows are scored
    at the positions ``generate`` sampled them at.

    >>> from rl2fx.tasks import build_tiny_lm
    >>> m = build_tiny_lm(16, hidden_size=32, num_layers=1, num_heads=2)
    >>> ids = torch.tensor([[1, 5, 13, 6, 7]])
    >>> out = response_logits(m, ids, None, 2)
    >>> torch.allclose(out, m(ids).logits[:, -3:-1], atol=1e-6)
    True
    """
    check_range("response_len", response_len, 1, input_ids.shape[-1] - 1)
    kw = _forward_kwargs(model, attention_mask, response_len + 1, forward_kwargs)
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kw)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -response_len - 1:-1]
