"""rl2fx.rollout's own sampling loop makes exactly the tokens ``model.generate`` makes from the same RNG state."""

from __future__ import annotations

import pytest
import torch
from _lm_helpers import ARCHS, build, left_padded_prompts
from transformers import GenerationConfig

from rl2fx.rollout import can_sample_directly, rollout, sample_tokens

SETTINGS = [
    dict(),
    dict(temperature=0.7),
    dict(top_k=5),
    dict(top_p=0.9),
    dict(temperature=1.3, top_k=7, top_p=0.8),
    dict(do_sample=False),
]


def _generate(model, ids, mask, *, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, do_sample=True):
    if do_sample:
        cfg = GenerationConfig(do_sample=True, max_new_tokens=max_new_tokens, eos_token_id=2, pad_token_id=0,
                               temperature=temperature, top_k=top_k, top_p=top_p)
    else:
        cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=2,
                               pad_token_id=0)
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)


@pytest.mark.parametrize("arch", ARCHS)
def test_sample_tokens_equals_generate(arch):
    model = build(arch)
    assert can_sample_directly(model)
    ids, mask = left_padded_prompts()
    ids, mask = ids.repeat(3, 1), mask.repeat(3, 1)
    for kw in SETTINGS:
        for seed in range(2):
            torch.manual_seed(seed)
            ours = sample_tokens(model, ids, mask, max_new_tokens=6, eos_token_id=2, pad_token_id=0, **kw)
            after_ours = torch.rand(3)
            torch.manual_seed(seed)
            theirs = _generate(model, ids, mask, max_new_tokens=6, **kw)
            after_theirs = torch.rand(3)
            assert torch.equal(ours, theirs), (arch, kw, seed)
            assert torch.equal(after_ours, after_theirs)  # the same draws from the global RNG


def test_sample_tokens_stops_when_every_row_has_ended():
    model = build("llama")
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.full((model.config.vocab_size,), -1e4))
        model.lm_head.bias[2] = 1e4  # always <eos>
    ids, mask = left_padded_prompts()
    out = sample_tokens(model, ids, mask, max_new_tokens=5, eos_token_id=2, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 1 and (out[:, -1] == 2).all()


def test_rollout_uses_generate_for_models_with_their_own_generation_settings():
    model = build("llama")
    model.generation_config.repetition_penalty = 1.3
    assert not can_sample_directly(model)
    ids, mask = left_padded_prompts()
    torch.manual_seed(0)
    out = rollout(model, ids, prompt_mask=mask, responses_per_prompt=2, max_new_tokens=4, eos_token_id=2,
                  pad_token_id=0)
    torch.manual_seed(0)
    ref = _generate(model, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), max_new_tokens=4)
    resp = ref[:, ids.shape[1]:]
    assert torch.equal(out["response_ids"][out["response_mask"] > 0], resp[out["response_mask"] > 0])


def test_rollout_restores_training_mode_and_matches_generate():
    model = build("gpt2").train()
    ids, mask = left_padded_prompts()
    torch.manual_seed(1)
    out = rollout(model, ids, prompt_mask=mask, responses_per_prompt=2, max_new_tokens=4, eos_token_id=2,
                  pad_token_id=0, temperature=0.8)
    assert model.training
    model.eval()
    torch.manual_seed(1)
    ref = _generate(model, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), max_new_tokens=4,
                    temperature=0.8)
    keep = out["response_mask"] > 0
    assert torch.equal(out["response_ids"][keep], ref[:, ids.shape[1]:][keep])


def test_peft_model_samples_directly_and_matches_generate():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False))
    model.eval()
    assert can_sample_directly(model)
    ids, mask = left_padded_prompts()
    torch.manual_seed(3)
    ours = sample_tokens(model, ids, mask, max_new_tokens=5, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(3)
    theirs = _generate(model, ids, mask, max_new_tokens=5)
    assert torch.equal(ours, theirs)
