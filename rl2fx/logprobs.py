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

:func:`response_logprobs` goes one step further and never forms the logits:
:func:`linear_logprobs_and_entropy` applies the LM head to the last hidden states
chunk by chunk, fused with the same reductions, and recomputes each chunk's
logits in the backward pass.

Every forward pass on padded input gets ``position_ids`` derived from the
attention mask (:func:`position_ids_from_mask`), as ``generate`` does when it
samples: a model with absolute position embeddings (GPT-2) otherwise scores a
left-padded prompt at shifted positions, and its log-probs disagree with the
sampler's.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from rl2fx._typing import Float, Int, Shaped, Tensor, check_choice, check_range, typechecked

__all__ = ["eval_mode", "token_logprobs", "token_logprobs_and_entropy", "naive_logprobs_and_entropy", "response_logits",
           "position_ids_from_mask", "forward_accepts", "linear_logprobs_and_entropy", "response_logprobs"]


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


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode inside the block (no dropout: sampling and scoring passes must agree with the
    update's), its previous mode restored on exit, also after an exception.

    >>> m = torch.nn.Dropout().train()
    >>> with eval_mode(m):
    ...     m.training
    False
    >>> m.training
    True
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def forward_accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model``'s forward (through DDP/PEFT wrappers) names the argument ``name``.

    A forward that only takes ``**kwargs`` does not count: such a model may drop
    the argument silently. Answers are cached per module.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                  num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    >>> forward_accepts(m, "position_ids")
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

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                  num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
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


# --- Log-probs from hidden states: the LM head applied chunk by chunk ------------------------------------------


def _head_logits(h: Tensor, weight: Tensor, bias: Tensor | None, acc: torch.dtype) -> Tensor:
    """``h @ weight.T + bias`` in the inputs' dtype (as the model's own head computes it), then in ``acc``."""
    return torch.nn.functional.linear(h, weight, bias).to(acc)


def _scaled_shifted(z: Tensor, shift: Tensor, inv_tau: float, acc: torch.dtype) -> Tensor:
    """``z * inv_tau + shift`` in ``acc``: one pass that also upcasts a half-precision ``z`` (in place if ``z`` is ``acc``)."""
    return torch.add(shift, z, alpha=inv_tau, out=z if z.dtype == acc else None)


def _capped(z: Tensor, cap: float | None, acc: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """``(c tanh(z / c), 1 - tanh(z / c)^2)`` in ``acc`` for a soft-cap ``c``; ``(z, None)`` without one."""
    if cap is None:
        return z, None
    t = z.to(acc).div_(cap).tanh_()
    d = torch.mul(t, t).neg_().add_(1.0)
    return t.mul_(cap), d


class _FusedLinearLogProbEntropy(torch.autograd.Function):
    """``log softmax(c·tanh((hW^T + b)/c)/τ)`` at the labels (and the entropy) without the ``[n, vocab]`` logits.

    Forward keeps the hidden states and per-token LSE and entropy; backward
    recomputes each chunk's logits and turns the logit gradient straight into
    ``grad_hidden = G W`` and ``grad_W += G^T h`` (``grad_b += Σ G``). Each
    ``[chunk, vocab]`` pass over memory costs about as much as the chunk's matmul
    on a CPU, so the per-chunk arithmetic is arranged to need few of them.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                softcap: float | None, chunk_size: int, with_entropy: bool) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        acc = torch.promote_types(hidden.dtype, torch.float32)
        lp = hidden.new_empty(n, dtype=acc)
        lse = torch.empty_like(lp)
        ent = torch.empty_like(lp) if with_entropy else lp.new_empty(0)
        inv_tau = 1.0 / temperature
        for s, e in _chunks(n, chunk_size):
            z, _ = _capped(torch.nn.functional.linear(hidden[s:e], weight, bias), softcap, acc)
            m = z.amax(-1, keepdim=True).to(acc)
            # y = (z - max z) / tau in one pass (the float32 [chunk, vocab] buffer, then reused in place);
            # log pi(a) = y_a - log sum exp(y)
            y = _scaled_shifted(z, m.mul(-inv_tau), inv_tau, acc)
            del z
            y_a = y.gather(-1, labels[s:e].unsqueeze(-1)).squeeze(-1)
            if with_entropy:
                ey = torch.exp(y)
                sum_e = ey.sum(-1)
                log_s = sum_e.log()
                # H = log S - sum_j e^{y_j} y_j / S
                ent[s:e] = log_s - torch.linalg.vecdot(ey, y) / sum_e
                del ey
            else:
                log_s = y.exp_().sum(-1).log()
            lp[s:e] = y_a - log_s
            lse[s:e] = m.squeeze(-1) * inv_tau + log_s
            del y
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        ctx.temperature, ctx.softcap, ctx.chunk_size, ctx.with_entropy = temperature, softcap, chunk_size, with_entropy
        return lp, ent

    @staticmethod
    def backward(ctx: Any, g_lp: Tensor | None, g_ent: Tensor | None) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        cap, inv_tau = ctx.softcap, 1.0 / ctx.temperature
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not ctx.with_entropy:
            g_ent = None
        if g_lp is None:
            g_lp = torch.zeros_like(lse)
        g_h = torch.empty_like(hidden) if need_h else None
        # grad_W accumulates in the weight's dtype: a float32 copy of a bf16 [vocab, hidden]
        # weight would outweigh the logits this function exists to avoid.
        g_w = None
        g_b = torch.zeros(weight.shape[0], dtype=lse.dtype, device=lse.device) if need_b else None
        for s, e in _chunks(hidden.shape[0], ctx.chunk_size):
            h = hidden[s:e]
            # d(c tanh(x/c))/dx = 1 - tanh(x/c)^2, from the same tanh as the forward pass
            z, dcap = _capped(torch.nn.functional.linear(h, weight, bias), cap, lse.dtype)
            logp = _scaled_shifted(z, lse[s:e].unsqueeze(-1).neg(), inv_tau, lse.dtype)  # z / tau - LSE
            del z
            p = torch.exp(logp)
            # dz = [g_lp (onehot(a) - p) - g_ent p (log p + H)] / tau
            #    = p * (c0 + c1 * log p) + onehot(a) g_lp / tau, with c0 = -(g_lp + g_ent H) / tau, c1 = -g_ent / tau
            gl = g_lp[s:e].unsqueeze(-1)
            if g_ent is not None:
                ge = g_ent[s:e].unsqueeze(-1)
                c0 = (gl + ge * ent[s:e].unsqueeze(-1)).mul_(-inv_tau)
                g = p.mul_(torch.addcmul(c0, logp, ge, value=-inv_tau, out=logp))
            else:
                g = p.mul_(gl * -inv_tau)
            del logp
            g.scatter_add_(-1, labels[s:e].unsqueeze(-1), gl * inv_tau)
            if dcap is not None:
                g.mul_(dcap)
                del dcap
            if g_b is not None:
                g_b += g.sum(0)
            gc = g.to(hidden.dtype)
            del g, p
            if g_h is not None:
                g_h[s:e] = gc @ weight
            if need_w:
                # the first chunk writes grad_W, the others add to it: no zero-filled [vocab, hidden] pass
                g_w = gc.t() @ h if g_w is None else g_w.addmm_(gc.t(), h)
            del gc
        if need_w and g_w is None:
            g_w = torch.zeros_like(weight)
        return g_h, g_w, None if g_b is None else g_b.to(bias.dtype), None, None, None, None, None


@typechecked
def linear_logprobs_and_entropy(
    hidden: Float[Tensor, "*batch time hidden"],
    weight: Float[Tensor, "vocab hidden"],
    bias: Float[Tensor, " vocab"] | None,
    labels: Int[Tensor, "*batch time"],
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int = 256,
    with_entropy: bool = True,
) -> tuple[Float[Tensor, "*batch time"], Float[Tensor, "*batch time"] | None]:
    """Log-probs of ``labels`` (and entropies) under the LM head ``(weight, bias)`` applied to ``hidden``, chunked.

    With :math:`z = c\\,\\tanh((h W^\\top + b)/c)` (no :math:`\\tanh` when ``softcap``
    :math:`c` is ``None``; Gemma 2's final-logit soft-capping otherwise) and temperature
    :math:`\\tau`: :math:`\\log\\pi(a) = z_a/\\tau - \\mathrm{LSE}(z/\\tau)`,
    :math:`H = -\\sum_j p_j \\log p_j`. The ``[*batch, time, vocab]`` logits are
    never formed: ``chunk_size`` tokens at a time, the forward pass computes a
    chunk of logits, reduces it to the log-prob, LSE and entropy and drops it;
    the backward pass recomputes the chunk and turns its logit gradient
    :math:`G` into ``grad_hidden = G W`` and ``grad_weight += G^T h``. This is the
    scheme of Liger Kernel's fused linear cross-entropy (Hsu et al., 2024,
    arXiv:2410.10989), here for per-token outputs with arbitrary upstream
    gradients (so the gradient cannot be formed in the forward pass), in plain
    PyTorch.

    The matmuls run in the dtype of ``hidden`` and ``weight`` (cast ``hidden``
    to the weight's dtype, or both to the autocast dtype, before calling), the
    softmax in float32 at least; ``grad_weight`` accumulates chunk by chunk in
    the weight's dtype. Extra memory: two ``[chunk_size, vocab]`` float32 buffers
    (three with ``softcap``) and one in the matmul dtype.

    >>> g = torch.Generator().manual_seed(0)
    >>> h, w = torch.randn(2, 3, 4, generator=g), torch.randn(5, 4, generator=g)
    >>> y = torch.randint(0, 5, (2, 3), generator=g)
    >>> lp, ent = linear_logprobs_and_entropy(h, w, None, y, chunk_size=2)
    >>> ref_lp, ref_ent = naive_logprobs_and_entropy(h @ w.T, y)
    >>> torch.allclose(lp, ref_lp, atol=1e-6) and torch.allclose(ent, ref_ent, atol=1e-6)
    True
    """
    check_range("temperature", temperature, 0.0, None, low_inclusive=False)
    check_range("chunk_size", chunk_size, 1, None)
    if softcap is not None:
        check_range("softcap", softcap, 0.0, None, low_inclusive=False)
    v = weight.shape[0]
    if labels.numel() and (labels.min() < 0 or labels.max() >= v):
        raise ValueError(f"labels must be in [0, {v - 1}] (the vocabulary), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have one dtype "
                         f"(the dtype the LM head's matmul runs in)")
    lead = labels.shape
    lp, ent = _FusedLinearLogProbEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, None if bias is None else bias.to(weight.dtype),
        labels.reshape(-1), float(temperature), None if softcap is None else float(softcap), int(chunk_size),
        with_entropy)
    return lp.reshape(lead), (ent.reshape(lead) if with_entropy else None)


def _plain_head(model: torch.nn.Module) -> tuple[torch.nn.Linear, float | None] | str:
    """The output embedding and final-logit soft-cap, or why the fused path cannot use them."""
    inner = _inner_model(model)
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return f"its output embedding is {type(head).__name__}, not a plain torch.nn.Linear"
    cap = getattr(getattr(inner, "config", None), "final_logit_softcapping", None)
    return head, (float(cap) if cap else None)


def _hidden_into_head(model: torch.nn.Module, head: torch.nn.Module, input_ids: Tensor,
                      attention_mask: Tensor | None, keep: int, forward_kwargs: dict[str, Any]) -> Tensor | None:
    """Run ``model``'s own forward; return the hidden states its LM head receives, handing the head an empty slice.

    Going through the model's forward (not its decoder body) keeps DDP's gradient
    hooks, PEFT adapters and the model's own pre-head steps (final norm,
    projections); the pre-hook leaves the head zero positions to project, so no
    logits are formed. ``None`` if the head did not run exactly once.
    """
    seen: list[Tensor] = []

    def take(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            h, rest = args[0], args[1:]
        else:
            h, rest = kwargs.pop("input"), ()
        seen.append(h)
        return (h[..., :0, :], *rest), kwargs

    handle = head.register_forward_pre_hook(take, with_kwargs=True)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask,
              **_forward_kwargs(model, attention_mask, keep, forward_kwargs))
    finally:
        handle.remove()
    return seen[0] if len(seen) == 1 else None


# per model: None if the fused path reproduces its logits, else the reason it does not
_FUSED_CHECK: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()


def _fused_unsupported(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                       forward_kwargs: dict[str, Any]) -> str | None:
    """Why the fused path would not reproduce ``model``'s logits (``None``: it does); checked once per model.

    The check runs the model's own forward on one row and compares its last two
    logit rows with the fused head on the captured hidden states, so a head the
    config does not describe (a logit scale, another cap) falls back instead of
    giving wrong log-probs.
    """
    inner = _inner_model(model)
    if inner in _FUSED_CHECK:
        return _FUSED_CHECK[inner]
    found = _plain_head(model)
    if isinstance(found, str):
        reason: str | None = found
    else:
        head, cap = found
        ids, mask = input_ids[:1], None if attention_mask is None else attention_mask[:1]
        n = input_ids.shape[0]
        kwargs1 = {k: v[:1] if isinstance(v, Tensor) and v.dim() and v.shape[0] == n else v
                   for k, v in forward_kwargs.items()}
        with eval_mode(inner):  # dropout would make the two passes differ
            # a structural check: autocast off, so only the weights' own dtype sets the tolerance
            with torch.no_grad(), torch.autocast(input_ids.device.type, enabled=False):
                out = inner(input_ids=ids, attention_mask=mask, **_forward_kwargs(inner, mask, 2, kwargs1))
                ref = (out.logits if hasattr(out, "logits") else out[0])[:, -2:].float()
                h = _hidden_into_head(inner, head, ids, mask, 2, kwargs1)
                z = None if h is None else _head_logits(h[:, -2:], head.weight, head.bias, torch.float32)
        if z is None:
            reason = "its forward does not call the output embedding exactly once"
        else:
            if cap is not None:
                z = cap * torch.tanh(z / cap)
            tol = 2e-2 if z.shape == ref.shape and head.weight.dtype in (torch.float16, torch.bfloat16) else 1e-4
            scale = float(ref.abs().max().clamp_min(1.0))
            err = float((z - ref).abs().max()) if z.shape == ref.shape else float("inf")
            reason = None if err <= tol * scale else (
                f"the output embedding applied to the hidden states differs from its logits by {err:.3g} "
                f"(a logit scale or cap the config does not name)")
    if reason is not None:
        warnings.warn(f"response_logprobs: {type(inner).__name__} computes full logits (no fused LM head): {reason}",
                      stacklevel=3)
    _FUSED_CHECK[inner] = reason
    return reason


@typechecked
def response_logprobs(
    model: torch.nn.Module,
    input_ids: Int[Tensor, "batch seq"],
    attention_mask: Shaped[Tensor, "batch seq"] | None,
    response_ids: Int[Tensor, "batch time"],
    *,
    temperature: float = 1.0,
    chunk_size: int = 256,
    with_entropy: bool = False,
    fused: bool | str = "auto",
    **forward_kwargs: Any,
) -> tuple[Float[Tensor, "batch time"], Float[Tensor, "batch time"] | None]:
    """Log-probs (and entropies) of ``response_ids``, the last ``time`` tokens of ``input_ids``, under ``model``.

    ``fused=True`` runs the model's forward up to its LM head (through any DDP or
    PEFT wrapper, with :func:`position_ids_from_mask` positions), captures the
    hidden states the head receives, and applies the head with
    :func:`linear_logprobs_and_entropy`: no ``[batch, time, vocab]`` logits in
    either pass. It needs a plain ``torch.nn.Linear`` from
    ``get_output_embeddings()`` (tied or not); Gemma 2's
    ``final_logit_softcapping`` is applied. ``fused=False`` is
    :func:`response_logits` then :func:`token_logprobs_and_entropy`.
    ``"auto"`` (default) takes the fused path when a once-per-model check shows
    it reproduces the model's own logits and falls back otherwise;
    ``fused=True`` raises instead of falling back.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                  num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    >>> ids, mask = torch.tensor([[0, 1, 5, 13, 6], [1, 4, 5, 7, 8]]), torch.tensor([[0, 1, 1, 1, 1], [1] * 5])
    >>> a, _ = response_logprobs(m, ids, mask, ids[:, -2:], fused=True)
    >>> b, _ = response_logprobs(m, ids, mask, ids[:, -2:], fused=False)
    >>> torch.allclose(a, b, atol=1e-5)
    True
    """
    check_range("temperature", temperature, 0.0, None, low_inclusive=False)
    check_range("chunk_size", chunk_size, 1, None)
    check_choice("fused", fused, ["auto", True, False])
    r = response_ids.shape[-1]
    check_range("response_ids.shape[-1]", r, 1, input_ids.shape[-1] - 1)
    reason = None if fused is False else _fused_unsupported(model, input_ids, attention_mask, forward_kwargs)
    if fused is True and reason is not None:
        raise ValueError(f"fused=True but {type(_inner_model(model)).__name__} cannot use the fused path: {reason}")
    if fused is not False and reason is None:
        found = _plain_head(model)
        assert not isinstance(found, str)
        head, cap = found
        h = _hidden_into_head(model, head, input_ids, attention_mask, r + 1, forward_kwargs)
        if h is None:
            raise RuntimeError("the output embedding ran more or less than once in this forward pass")
        h = h[:, -r - 1:-1]
        w, b = head.weight, head.bias
        dev = h.device.type
        if torch.is_autocast_enabled(dev):
            # autocast would run the head's matmul in its dtype; the cast stays on the autograd graph
            dt = torch.get_autocast_dtype(dev)
            h, w, b = h.to(dt), w.to(dt), None if b is None else b.to(dt)
        elif h.dtype != w.dtype:
            h = h.to(w.dtype)
        with torch.autocast(dev, enabled=False):
            return linear_logprobs_and_entropy(h, w, b, response_ids, temperature=temperature, softcap=cap,
                                               chunk_size=chunk_size, with_entropy=with_entropy)
    logits = response_logits(model, input_ids, attention_mask, r, **forward_kwargs)
    return token_logprobs_and_entropy(logits, response_ids, temperature=temperature, chunk_size=chunk_size,
                                      with_entropy=with_entropy)
