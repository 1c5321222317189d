"""Log-probs of real transformers causal LMs (tiny, built from configs) agree with ``generate``'s own scores.

``generate`` derives ``position_ids`` from the attention mask; a scoring pass
that does not sees a left-padded prompt at shifted positions, which changes the
output of absolute-position models (GPT-2). Each architecture below is built
from its config with random weights (nothing is downloaded).
"""

from __future__ import annotations

import pytest
import torch
from _lm_helpers import ARCHS, NEW, PROMPT, VOCAB, build, left_padded_prompts

from rl2fx.logprobs import (
    forward_accepts,
    position_ids_from_mask,
    response_logits,
    token_logprobs_and_entropy,
)

pytest.importorskip("transformers")


def sample(model: torch.nn.Module, temperature: float, seed: int = 0):
    ids, mask = left_padded_prompts(seed)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                         top_p=1.0, max_new_tokens=NEW, output_logits=True, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    seqs = out.sequences
    full_mask = torch.cat([mask, torch.ones_like(seqs[:, PROMPT:])], dim=1)
    return seqs, full_mask, torch.stack(out.logits, 1), torch.stack(out.scores, 1)


def gather_logsoftmax(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_match_generate_with_left_padding(arch):
    model = build(arch)
    seqs, mask, raw_logits, _ = sample(model, temperature=1.0)
    resp = seqs[:, PROMPT:]
    sampler = gather_logsoftmax(raw_logits, resp)
    with torch.no_grad():
        lp, _ = token_logprobs_and_entropy(response_logits(model, seqs, mask, NEW), resp, chunk_size=4,
                                           with_entropy=False)
    assert (lp.double() - sampler).abs().max() <= 1e-5


def test_without_position_ids_gpt2_disagrees():
    """The failure the derived position ids fix: GPT-2 scored without them is off by ~0.1 nat."""
    model = build("gpt2")
    seqs, mask, raw_logits, _ = sample(model, temperature=1.0)
    resp = seqs[:, PROMPT:]
    with torch.no_grad():
        old = response_logits(model, seqs, mask, NEW, position_ids=None)  # an explicit None: no positions passed
        lp, _ = token_logprobs_and_entropy(old, resp, with_entropy=False)
    assert (lp.double() - gather_logsoftmax(raw_logits, resp)).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_temperature_matches_generate_scores(arch):
    """``output_logits`` are the raw logits; ``output_scores`` are after the temperature warper (z / T)."""
    tau = 0.7
    model = build(arch)
    seqs, mask, raw_logits, scores = sample(model, temperature=tau, seed=1)
    resp = seqs[:, PROMPT:]
    torch.testing.assert_close(scores, raw_logits / tau)
    with torch.no_grad():
        lp, _ = token_logprobs_and_entropy(response_logits(model, seqs, mask, NEW), resp, temperature=tau,
                                           with_entropy=False)
    assert (lp.double() - gather_logsoftmax(scores, resp)).abs().max() <= 1e-5


def test_position_ids_from_mask_matches_generate_rule():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 0, 0]]
    assert torch.equal(position_ids_from_mask(mask.bool()), position_ids_from_mask(mask.float()))
    assert position_ids_from_mask(torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)


def test_model_without_position_ids_still_works():
    """A forward that takes no ``position_ids`` (a custom module, ``**kwargs`` only) is called without them."""

    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, VOCAB)

        def forward(self, input_ids, attention_mask=None, **kwargs):
            assert "position_ids" not in kwargs
            return (self.emb(input_ids).cumsum(1),)

    m = Bag()
    assert not forward_accepts(m, "position_ids")
    ids, mask = left_padded_prompts()
    out = response_logits(m, ids, mask, 2)
    torch.testing.assert_close(out, m(ids)[0][:, -3:-1])


def test_gpt2_critic_values_ignore_left_padding():
    """The critic's values at a token do not depend on how many pad tokens precede the prompt."""
    import torch

    from rl2fx.trainer.tasks.model import build_tiny_critic

    critic = build_tiny_critic(32, arch="gpt2", hidden_size=32, num_layers=2, num_heads=2,
                               max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.nn.init.normal_(critic.value_head.weight)
    ids = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[0, 0, 5, 6, 7, 8]])
    v = critic(ids, torch.ones_like(ids))
    vp = critic(padded, torch.tensor([[0, 0, 1, 1, 1, 1]]))
    torch.testing.assert_close(vp[:, 2:], v, atol=1e-5, rtol=1e-5)
