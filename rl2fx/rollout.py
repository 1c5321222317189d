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
Nothing in this module runs a forward pass other than ``generate`` itself.
"""

from __future__ import annotations

from typing import Any

import torch

from rl2fx._typing import Float, Int, Tensor, check_range, typechecked

__all__ = ["rollout", "response_mask", "scatter_last", "concat_rollouts", "select_rows"]


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
    if do_sample:
        gen_cfg = GenerationConfig(
            do_sample=True, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )
    else:
        gen_cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    was_training = unwrapped.training
    unwrapped.eval()
    try:
        extra = {"output_logits": True, "return_dict_in_generate": True} if return_logprobs else {}
        out = unwrapped.generate(input_ids=ids, attention_mask=pmask, generation_config=gen_cfg,
                                 **extra, **dict(generate_kwargs or {}))
    finally:
        unwrapped.train(was_training)
    seqs = out.sequences if return_logprobs else out
    resp = seqs[:, ids.shape[1]:]
    rmask = response_mask(resp, eos_token_id)
    resp = torch.where(rmask > 0, resp, torch.full_like(resp, pad_token_id))
    batch = {
        "input_ids": torch.cat([ids, resp], dim=1),
        "attention_mask": torch.cat([pmask, rmask.long()], dim=1),
        "response_ids": resp,
        "response_mask": rmask,
    }
    if return_logprobs:
        logits = torch.stack(out.logits, dim=1).float() / (temperature if do_sample else 1.0)
        lp = torch.log_softmax(logits, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
        batch["behavior_logprobs"] = torch.where(rmask > 0, lp, 0.0)
    return batch


#: per-token tensors laid out like ``response_ids`` (``[rows, response]``), padded with 0 on concatenation
TIME_ALIGNED = ("behavior_logprobs", "old_logprobs", "ref_logprobs", "kl", "entropy", "advantages", "returns",
                "rewards", "old_values")


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
