"""Rollouts: sample responses with ``model.generate`` and lay them out as ``[batch, time]`` tensors.

A rollout turns ``N`` prompts into ``N * G`` sequences (``G = responses_per_prompt``,
the responses of one prompt contiguous, as the group estimators expect) and
returns what the losses need: ``input_ids`` (prompt + response), ``attention_mask``,
``response_ids`` and ``response_mask`` (1 on the response tokens up to and
including the first ``<eos>``, 0 on the padding after it). :func:`scatter_last`
turns a per-sequence score into token-level rewards on the last response token,
the usual outcome-reward layout (RL2, OpenRLHF, TRL).

``generate`` numbers the tokens of a left-padded row from its first real token
(``cumsum(attention_mask) - 1``). Any later forward pass over these rows (old,
reference and current log-probs, critic values) must do the same, or a model
with absolute position embeddings (GPT-2) scores them at other positions:
:func:`rl2fx.logprobs.response_logits` and :func:`rl2fx.logprobs.response_logprobs`
pass :func:`rl2fx.logprobs.position_ids_from_mask` of the returned ``attention_mask``.
Nothing in this module runs a forward pass other than sampling itself.

The sampling loop: for a decoder-only model whose forward takes ``position_ids``
and a KV cache, and whose own ``generation_config`` sets nothing beyond token
ids and the settings this function passes anyway, :func:`rollout` runs the
loop of ``generate``'s ``_sample`` itself (:func:`sample_tokens`): one prefill,
then one cached forward per new token, the same logits warpers in the same
order, the same ``torch.multinomial`` draws, the same stopping rule. It makes
the same tokens from the same RNG state (``tests/test_rollout.py`` checks this
against ``generate``) without ``generate``'s per-call set-up and per-token
bookkeeping (about a third of its time for a small model). Any other model
goes through ``model.generate``.
"""

from __future__ import annotations

from typing import Any

import torch

from rl2fx._typing import Float, Int, Tensor, check_range, typechecked
from rl2fx.logprobs import eval_mode, forward_accepts

__all__ = ["rollout", "response_mask", "scatter_last", "concat_rollouts", "select_rows", "sample_tokens",
           "can_sample_directly"]

#: ``generation_config`` entries that leave sampling as :func:`sample_tokens` does it: token ids,
#: bookkeeping, and the settings :func:`rollout` passes explicitly (which override the model's).
_PLAIN_GENERATION_KEYS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
    "_from_model_config", "use_cache", "max_length", "max_new_tokens", "do_sample", "temperature", "top_k",
    "top_p", "num_beams", "num_return_sequences",
})
#: entries that are harmless while false (extra outputs nobody asked for)
_OFF_GENERATION_KEYS = frozenset({"output_attentions", "output_hidden_states", "output_scores", "output_logits",
                                  "return_dict_in_generate"})


def _cache_arg(model: torch.nn.Module) -> str | None:
    """The forward's KV-cache argument (and output field): ``cache`` (transformers >= 5.x), else ``past_key_values``."""
    for name in ("cache", "past_key_values"):
        if forward_accepts(model, name):
            return name
    return None


@typechecked
def response_mask(response_ids: Int[Tensor, "batch time"], eos_token_id: int) -> Float[Tensor, "batch time"]:
    """1.0 on tokens up to and including the first ``eos_token_id``, 0.0 after it.

    >>> response_mask(torch.tensor([[5, 2, 0], [5, 6, 7]]), eos_token_id=2).tolist()
    [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    """
    is_eos = (response_ids == eos_token_id).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_eos).float()


@typechecked
def scatter_last(scores: Float[Tensor, " batch"], mask: Float[Tensor, "batch time"]) -> Float[Tensor, "batch time"]:
    """Token-level rewards: ``scores[i]`` on the last masked-in token of row ``i``, 0 elsewhere.

    >>> scatter_last(torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])).tolist()
    [[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
    """
    t = mask.shape[-1]
    idx = torch.arange(t, device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, idx, -1).max(-1).values.clamp_min(0)
    out = torch.zeros_like(mask)
    return out.scatter(-1, last.unsqueeze(-1), scores.to(out.dtype).unsqueeze(-1))


def can_sample_directly(model: torch.nn.Module) -> bool:
    """Whether :func:`sample_tokens` samples exactly as ``model.generate`` would (see the module docstring).

    A decoder-only model whose forward takes ``attention_mask``, ``position_ids``,
    a KV cache (``cache`` or ``past_key_values``) and ``use_cache``, and whose ``generation_config`` sets no
    logits processor, stopping rule or cache of its own (a repetition penalty, a
    minimum length, extra stop tokens, a static cache...).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                  num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    >>> can_sample_directly(m)
    True
    >>> m.generation_config.repetition_penalty = 1.2
    >>> can_sample_directly(m)
    False
    """
    config = getattr(model, "config", None)
    gen = getattr(model, "generation_config", None)
    if config is None or gen is None or getattr(config, "is_encoder_decoder", False):
        return False
    if _cache_arg(model) is None or not all(forward_accepts(model, k)
                                            for k in ("attention_mask", "position_ids", "use_cache")):
        return False
    try:
        own = gen.to_diff_dict()
    except Exception:  # an unusual generation config: leave it to generate
        return False
    return all(k in _PLAIN_GENERATION_KEYS or (k in _OFF_GENERATION_KEYS and not v) for k, v in own.items())


@torch.no_grad()
def sample_tokens(
    model: torch.nn.Module,
    input_ids: Int[Tensor, "batch prompt"],
    attention_mask: Int[Tensor, "batch prompt"],
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
) -> Int[Tensor, "batch total"]:
    r"""``generate``'s sampling loop without ``generate``: prompt + new tokens, ``[batch, prompt + steps]``.

    Ancestral sampling :math:`y_t \sim \mathrm{softmax}(\mathrm{warp}(z_t))` with
    transformers' own warpers in ``generate``'s order (temperature, top-k, top-p;
    each only when it changes something), or the argmax with ``do_sample=False``.
    A row is finished after its ``eos_token_id`` and then gets ``pad_token_id``; the
    loop stops when every row is finished or after ``max_new_tokens`` tokens.
    Positions are ``cumsum(attention_mask) - 1`` (1 on padding), as ``generate``
    numbers a left-padded row. Use it for a model :func:`can_sample_directly` accepts.

    >>> from transformers import LlamaConfig, LlamaForCausalLM, GenerationConfig
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                  num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)).eval()
    >>> ids, mask = torch.tensor([[0, 1, 5], [1, 6, 7]]), torch.tensor([[0, 1, 1], [1, 1, 1]])
    >>> _ = torch.manual_seed(0); a = sample_tokens(m, ids, mask, max_new_tokens=4, eos_token_id=2, pad_token_id=0)
    >>> cfg = GenerationConfig(do_sample=True, max_new_tokens=4, eos_token_id=2, pad_token_id=0, top_k=0)
    >>> _ = torch.manual_seed(0); b = m.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    >>> torch.equal(a, b)
    True
    """
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers: list[Any] = []
    if do_sample:
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    mask = attention_mask.long()
    position_ids = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
    keep = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}
    cache = _cache_arg(model) or "past_key_values"
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True, **keep)
    seqs = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    for step in range(max_new_tokens):
        scores = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        for w in warpers:
            scores = w(seqs, scores)
        if do_sample:
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            nxt = torch.argmax(scores, dim=-1)
        nxt = nxt * unfinished + pad_token_id * (1 - unfinished)
        seqs = torch.cat([seqs, nxt[:, None]], dim=-1)
        unfinished = unfinished & (nxt != eos_token_id).long()
        if step == max_new_tokens - 1 or int(unfinished.max()) == 0:
            break
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                    use_cache=True, **{cache: getattr(out, cache)}, **keep)
    return seqs


@torch.no_grad()
def rollout(
    model: torch.nn.Module,
    prompt_ids: Int[Tensor, "n prompt"],
    *,
    responses_per_prompt: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    prompt_mask: Int[Tensor, "n prompt"] | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    generate_kwargs: dict[str, Any] | None = None,
    return_logprobs: bool = False,
) -> dict[str, Tensor]:
    """Sample ``responses_per_prompt`` responses per prompt with ``model.generate`` (ancestral sampling).

    ``return_logprobs``: also return ``behavior_logprobs`` ``[N*G, response]``, the
    sampler's log-probs of the sampled tokens from the logits ``generate`` computed
    (``log_softmax(logits / temperature)``, before top-k/top-p filtering: the policy's
    own distribution, which a trainer compares with its recomputed log-probs; 0 after
    the response ends). A rollout engine such as vLLM supplies the same field.

    ``generate_kwargs``: extra ``generate`` arguments a parallel strategy needs
    (:func:`rl2fx.distributed.generate_kwargs`: ``synced_gpus=True`` for FSDP2 on several ranks).

    ``do_sample=False`` decodes greedily instead (argmax at every step; the
    temperature and top-k/top-p settings are then unused and no RNG is drawn),
    which is how ReMax's baseline response is made.

    Prompts must be left-padded (``prompt_mask`` 0 on the padding) or all of one
    length. Sampling draws from torch's global RNG, so seeding it makes rollouts
    reproducible. The model is put in eval mode for generation and its previous
    mode restored.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> m = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                                  num_attention_heads=2, num_key_value_heads=2, pad_token_id=0))
    >>> out = rollout(m, torch.tensor([[1, 5, 13]]), responses_per_prompt=4, max_new_tokens=3,
    ...               eos_token_id=2, pad_token_id=0)
    >>> out["input_ids"].shape[0], out["response_ids"].shape[1] <= 3, sorted(out)
    (4, True, ['attention_mask', 'input_ids', 'response_ids', 'response_mask'])
    """
    check_range("responses_per_prompt", responses_per_prompt, 1, None)
    check_range("max_new_tokens", max_new_tokens, 1, None)
    check_range("temperature", temperature, 0.0, None, low_inclusive=False)
    from transformers import GenerationConfig

    unwrapped: Any = getattr(model, "module", model)  # DDP wraps; generate lives on the inner model
    ids = prompt_ids.repeat_interleave(responses_per_prompt, dim=0)
    pmask = torch.ones_like(ids) if prompt_mask is None else prompt_mask.repeat_interleave(responses_per_prompt, 0)
    # the sampler's log-probs and a parallel strategy's generate arguments (synced_gpus) need generate itself
    if not return_logprobs and not generate_kwargs and can_sample_directly(unwrapped):
        with eval_mode(unwrapped):
            seqs = sample_tokens(unwrapped, ids, pmask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                 pad_token_id=pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p,
                                 do_sample=do_sample)
        return _layout(ids, pmask, seqs, eos_token_id, pad_token_id)
    if do_sample:
        gen_cfg = GenerationConfig(
            do_sample=True, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )
    else:
        gen_cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    with eval_mode(unwrapped):
        extra = {"output_logits": True, "return_dict_in_generate": True} if return_logprobs else {}
        out = unwrapped.generate(input_ids=ids, attention_mask=pmask, generation_config=gen_cfg,
                                 **extra, **dict(generate_kwargs or {}))
    seqs = out.sequences if return_logprobs else out
    batch = _layout(ids, pmask, seqs, eos_token_id, pad_token_id)
    if return_logprobs:
        logits = torch.stack(out.logits, dim=1).float() / (temperature if do_sample else 1.0)
        lp = torch.log_softmax(logits, -1).gather(-1, batch["response_ids"].unsqueeze(-1)).squeeze(-1)
        batch["behavior_logprobs"] = torch.where(batch["response_mask"] > 0, lp, 0.0)
    return batch


def _layout(ids: Tensor, pmask: Tensor, seqs: Tensor, eos_token_id: int, pad_token_id: int) -> dict[str, Tensor]:
    resp = seqs[:, ids.shape[1]:]
    rmask = response_mask(resp, eos_token_id)
    resp = torch.where(rmask > 0, resp, torch.full_like(resp, pad_token_id))
    return {
        "input_ids": torch.cat([ids, resp], dim=1),
        "attention_mask": torch.cat([pmask, rmask.long()], dim=1),
        "response_ids": resp,
        "response_mask": rmask,
    }


#: per-token tensors laid out like ``response_ids`` (``[rows, response]``), padded with 0 on concatenation
TIME_ALIGNED = ("behavior_logprobs", "old_logprobs", "ref_logprobs", "kl", "entropy", "advantages", "returns",
                "rewards", "token_rewards", "is_weights", "old_values")


def select_rows(batch: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """The rollout's sequences ``rows`` (an index tensor), every tensor cut alike.

    >>> b = {"input_ids": torch.arange(6).view(3, 2), "response_mask": torch.ones(3, 1)}
    >>> select_rows(b, torch.tensor([2, 0]))["input_ids"].tolist()
    [[4, 5], [0, 1]]
    """
    return {k: v[rows] for k, v in batch.items()}


def concat_rollouts(batches: list[dict[str, Tensor]], *, pad_token_id: int) -> dict[str, Tensor]:
    """Stack rollouts whose prompt or response widths differ into one batch, rows in order.

    A rollout's ``input_ids`` is its left-padded prompt block followed by its
    right-padded response block (``response_ids``). The prompt blocks are
    left-padded to the widest (``attention_mask`` 0 there) and the response
    blocks right-padded (``response_mask`` and ``attention_mask`` 0), so every
    real token keeps its position counted from the row's first real token, as
    ``generate`` numbered it (:func:`rl2fx.logprobs.position_ids_from_mask`).
    The per-token tensors named in :data:`TIME_ALIGNED` are right-padded with 0 like
    ``response_mask``; per-sequence tensors of other names (``[rows, ...]``) are
    concatenated as they are.

    >>> a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]]),
    ...      "response_ids": torch.tensor([[7]]), "response_mask": torch.tensor([[1.0]])}
    >>> b = {"input_ids": torch.tensor([[5, 8, 9]]), "attention_mask": torch.tensor([[1, 1, 1]]),
    ...      "response_ids": torch.tensor([[8, 9]]), "response_mask": torch.tensor([[1.0, 1.0]])}
    >>> c = concat_rollouts([a, b], pad_token_id=0)
    >>> c["input_ids"].tolist(), c["attention_mask"].tolist(), c["response_mask"].tolist()
    ([[5, 6, 7, 0], [0, 5, 8, 9]], [[1, 1, 1, 0], [0, 1, 1, 1]], [[1.0, 0.0], [1.0, 1.0]])
    """
    if not batches:
        raise ValueError("batches is empty: nothing to concatenate")
    if len(batches) == 1:
        return dict(batches[0])
    keys = set(batches[0])
    for i, b in enumerate(batches[1:], 1):
        if set(b) != keys:
            raise ValueError(f"batches[{i}] has keys {sorted(b)}, batches[0] has {sorted(keys)}")
    widths = [(b["input_ids"].shape[1] - b["response_ids"].shape[1], b["response_ids"].shape[1]) for b in batches]
    P, R = max(w[0] for w in widths), max(w[1] for w in widths)
    out: dict[str, list[Tensor]] = {k: [] for k in keys}
    for b, (p, r) in zip(batches, widths, strict=True):
        for k, v in b.items():
            if k in ("input_ids", "attention_mask"):
                fill = pad_token_id if k == "input_ids" else 0
                prompt = torch.nn.functional.pad(v[:, :p], (P - p, 0), value=fill)
                resp = torch.nn.functional.pad(v[:, p:], (0, R - r), value=fill)
                out[k].append(torch.cat([prompt, resp], dim=1))
            elif k == "response_ids":
                out[k].append(torch.nn.functional.pad(v, (0, R - r), value=pad_token_id))
            elif k.startswith("response") or k in TIME_ALIGNED:
                out[k].append(torch.nn.functional.pad(v, (0, R - r), value=0))
            else:
                out[k].append(v)
    return {k: torch.cat(v, dim=0) for k, v in out.items()}
