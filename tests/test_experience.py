"""rl2fx.experience: only the forward passes a configuration needs, and the same update without them."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rl2fx.experience import experience_needs, make_experience, reference_logprobs
from rl2fx.rollout import rollout
from rl2fx.step import compute_logprobs, make_ppo_loss, train_step


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=24, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                                      eos_token_id=2, bos_token_id=1))


def left_padded_batch(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[0, 0, 1, 5, 6], [1, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.manual_seed(seed)
    return rollout(model, ids, prompt_mask=mask, responses_per_prompt=4, max_new_tokens=5, eos_token_id=2,
                   pad_token_id=0)


@pytest.mark.parametrize(("kw", "expected"), [
    ({}, (False, False, False)),
    ({"update_epochs": 2}, (True, False, False)),
    ({"kl_in_loss": True}, (True, True, False)),
    ({"kl_in_reward": True}, (True, True, False)),
    ({"log_kl": True}, (True, True, False)),
    ({"with_entropy": True}, (True, False, False)),
    ({"off_policy": True}, (True, False, False)),
])
def test_needs_per_setting(kw, expected):
    n = experience_needs(estimator="grpo", **kw)
    assert (n.old, n.ref, n.values) == expected


def test_needs_values_from_the_registry():
    assert experience_needs(estimator="gae").values
    assert not experience_needs(estimator="rloo").values


def test_one_epoch_update_without_old_logprobs_equals_the_update_with_them():
    """The skipped old-log-prob pass changes nothing: same loss, same gradient, same parameters."""
    model = tiny_gpt2()
    batch = left_padded_batch(model)
    scores = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25])
    skip = make_experience(model, batch, scores, group_size=4)
    assert "old_logprobs" not in skip and "ref_logprobs" not in skip
    full = make_experience(model, batch, scores, group_size=4, needs=experience_needs(estimator="grpo",
                                                                                        update_epochs=2))
    assert "old_logprobs" in full
    torch.testing.assert_close(skip["advantages"], full["advantages"], rtol=0, atol=0)
    keys = ("input_ids", "attention_mask", "response_ids", "response_mask", "advantages")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    oa = torch.optim.SGD(a.parameters(), lr=0.5)
    ob = torch.optim.SGD(b.parameters(), lr=0.5)
    loss = make_ppo_loss()
    ma = train_step(a, oa, {k: skip[k] for k in keys}, loss_fn=loss, micro_batch_size=3)
    mb = train_step(b, ob, {**{k: full[k] for k in keys}, "old_logprobs": full["old_logprobs"]}, loss_fn=loss,
                    micro_batch_size=3)
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    assert ma["grad_norm"] > 0
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_kl_is_zero_at_masked_out_positions_and_matches_the_formula():
    model, ref = tiny_gpt2(0), tiny_gpt2(1)
    batch = left_padded_batch(model)
    exp = make_experience(model, batch, torch.zeros(8), group_size=4, ref_model=ref)
    mask = batch["response_mask"]
    assert (exp["kl"][mask == 0] == 0).all()
    d = exp["ref_logprobs"] - exp["old_logprobs"]
    k3 = d.exp() - 1 - d
    torch.testing.assert_close(exp["kl"], torch.where(mask != 0, k3, 0.0))
    assert exp["kl"][mask != 0].gt(0).any()


def test_kl_in_reward_needs_both_passes():
    model = tiny_gpt2()
    batch = left_padded_batch(model)
    with pytest.raises(ValueError, match="kl_in_reward needs the old and reference"):
        make_experience(model, batch, torch.zeros(8), group_size=4, kl_in_reward=True,
                        needs=experience_needs(estimator="grpo"))


def test_peft_reference_is_the_adapter_free_base_without_a_copy():
    peft = pytest.importorskip("peft")
    model = tiny_gpt2()
    batch = left_padded_batch(model)
    base_lp, _ = compute_logprobs(model, batch)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    with torch.no_grad():
        policy_lp, _ = compute_logprobs(pm, batch)
    m = batch["response_mask"] != 0
    assert (policy_lp - base_lp)[m].abs().max() > 1e-3  # the adapters change the policy
    ref_lp = reference_logprobs(pm, batch)
    torch.testing.assert_close(ref_lp[m], base_lp.detach()[m], rtol=0, atol=1e-6)
    pm.train()
    reference_logprobs(pm, batch)
    assert pm.training  # the policy's mode is restored after the eval-mode reference pass


def test_reference_without_adapters_or_model_is_an_error():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="ref_model is None and the policy has no adapters"):
        reference_logprobs(model, left_padded_batch(model))


def test_critic_estimator_without_critic_is_an_error():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="reads values: pass a critic"):
        make_experience(model, left_padded_batch(model), torch.zeros(8), group_size=4, estimator="gae")


def test_scores_of_the_wrong_length_are_an_error():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="scores has 3 entries but the batch has 8"):
        make_experience(model, left_padded_batch(model), torch.zeros(3), group_size=4)


def test_rollout_returns_the_samplers_logprobs():
    model = tiny_gpt2()
    ids = torch.tensor([[0, 0, 1, 5, 6], [1, 7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    torch.manual_seed(0)
    b = rollout(model, ids, prompt_mask=mask, responses_per_prompt=3, max_new_tokens=5, eos_token_id=2,
                pad_token_id=0, temperature=0.7, return_logprobs=True)
    with torch.no_grad():
        lp, _ = compute_logprobs(model, b, temperature=0.7)
    m = b["response_mask"] != 0
    assert (b["behavior_logprobs"] - lp)[m].abs().max() <= 1e-5
    assert (b["behavior_logprobs"][~m] == 0).all()


def test_rollout_correction_masks_and_weights_from_the_behavior_logprobs():
    from rl2fx.rollout_correction import truncated_is_weights

    model = tiny_gpt2()
    batch = left_padded_batch(model)
    with torch.no_grad():
        old, _ = compute_logprobs(model, batch)
    mask = batch["response_mask"]
    behavior = old.clone()
    behavior[0] -= 1.5  # row 0: the sampler gave its tokens lower probability, ratio e^1.5 > 2
    behavior[1] += 0.3  # row 1: ratio e^-0.3 = 0.74, inside [0.5, 2]: kept, weighted 0.74
    batch = {**batch, "behavior_logprobs": torch.where(mask != 0, behavior, 0.0)}
    scores = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25])
    needs = experience_needs(estimator="grpo", off_policy=True)
    rs_only = make_experience(model, batch, scores, group_size=4, needs=needs, rollout_rs="token")
    stats: dict = {}
    exp = make_experience(model, batch, scores, group_size=4, needs=needs, rollout_is="token", rollout_rs="token",
                          stats=stats)
    assert (exp["response_mask"][0] == 0).all() and stats["rollout_rs/masked_tokens"] == float(mask[0].sum())
    assert torch.equal(exp["response_mask"][1:], mask[1:])
    w = truncated_is_weights(old, batch["behavior_logprobs"], mask, cap=2.0)
    # the masked sequence counts nowhere (its group's baseline changes, as rs_only shows); the kept ones are weighted
    torch.testing.assert_close(exp["advantages"][1], rs_only["advantages"][1] * w[1] * mask[1])
    assert (w[1][mask[1] != 0] < 1).all()
    assert stats["rollout_mismatch/ratio_max"] > 2.0
    with pytest.raises(ValueError, match="need the sampler's behavior_logprobs"):
        make_experience(model, left_padded_batch(model), scores, group_size=4, needs=needs, rollout_is="token")
