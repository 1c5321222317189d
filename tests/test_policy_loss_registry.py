"""The policy-loss registry: `vanilla` is the clipped surrogate unchanged; a user's sequence-level loss
plugs into make_ppo_loss / train_step by name, and micro-batches still add up to the batch loss."""

from __future__ import annotations

import pytest
import torch

from rl2fx.losses import (
    compute_policy_loss,
    get_policy_loss,
    list_policy_losses,
    policy_loss,
    register_policy_loss,
    unregister_policy_loss,
)
from rl2fx.step import compute_logprobs, make_ppo_loss, train_step
from rl2fx.trainer.tasks import build_tiny_lm


def _tensors(seed=0, shape=(4, 5)):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(shape, generator=g)
    old = lp + 0.3 * torch.randn(shape, generator=g)
    behavior = old + 0.1 * torch.randn(shape, generator=g)
    adv = torch.randn(shape, generator=g)
    mask = (torch.rand(shape, generator=g) > 0.3).float()
    return lp, old, behavior, adv, mask


def test_vanilla_is_policy_loss_exactly():
    lp, old, behavior, adv, mask = _tensors()
    params = {"clip": 0.2, "clip_high": 0.28, "dual_clip": 3.0, "tis_cap": 2.0}
    for agg in ("token-mean", "seq-mean-token-sum"):
        got, got_m = compute_policy_loss("vanilla", lp, old, adv, mask, behavior_logprobs=behavior, agg_mode=agg,
                                         global_tokens=7.0, global_seqs=3.0, params=params)
        want, want_m = policy_loss(lp, old, adv, mask, behavior_logprobs=behavior, agg_mode=agg, global_tokens=7.0,
                                   global_seqs=3.0, **params)
        assert torch.equal(got, want) and got_m.keys() == want_m.keys()
        assert all(torch.equal(got_m[k], want_m[k]) for k in want_m)


def test_unknown_names_and_bad_values_are_named():
    with pytest.raises(ValueError, match="did you mean 'dual_clip'"):
        make_ppo_loss(loss_params={"dual_clp": 2.0})
    with pytest.raises(ValueError, match="unknown policy loss 'vanila'; did you mean 'vanilla'"):
        make_ppo_loss(loss_type="vanila")
    with pytest.raises(ValueError, match=r"clip must be in \[0.0, 1.0\], got 1.5"):
        make_ppo_loss(clip=1.5)


@pytest.fixture
def seq_loss():
    """A GSPO-style sequence-level loss: one clipped ratio per sequence (geometric mean of token ratios)."""

    @register_policy_loss("seq_ratio_demo")
    def seq_ratio_demo(logprobs, old_logprobs, advantages, mask, *, global_seqs=None, clip=0.2):
        m = mask.to(logprobs.dtype)
        n = m.sum(-1).clamp_min(1.0)
        log_ratio = ((logprobs - old_logprobs) * m).sum(-1) / n
        ratio = torch.exp(log_ratio)
        seq_adv = (advantages * m).sum(-1) / n
        per_seq = -torch.minimum(ratio * seq_adv, ratio.clamp(1 - clip, 1 + clip) * seq_adv)
        denom = float(per_seq.numel()) if global_seqs is None else global_seqs
        return per_seq.sum() / denom, {"seq_ratio_mean": ratio.mean().detach()}

    yield "seq_ratio_demo"
    unregister_policy_loss("seq_ratio_demo")


def _batch(seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(3, 16, (6, 7))
    resp = ids[:, -3:]
    mask = torch.ones(6, 3)
    mask[0, 2] = 0
    model = build_tiny_lm(16, hidden_size=32, num_layers=1, num_heads=2, seed=seed)
    with torch.no_grad():
        old, _ = compute_logprobs(model, {"input_ids": ids, "response_ids": resp})
    adv = torch.randn(6, 1).expand(6, 3) * mask
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_ids": resp,
                   "response_mask": mask, "old_logprobs": old, "ref_logprobs": old.clone(), "advantages": adv}


def test_a_registered_sequence_level_loss_trains_and_accumulates_exactly(seq_loss):
    assert seq_loss in list_policy_losses() and get_policy_loss(seq_loss).hyperparameters == ("clip",)
    model, batch = _batch()
    other = build_tiny_lm(16, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    other.load_state_dict(model.state_dict())
    loss_fn = make_ppo_loss(loss_type=seq_loss, clip=0.1)
    r1 = train_step(model, torch.optim.SGD(model.parameters(), lr=0.5), batch, loss_fn=loss_fn, max_grad_norm=None)
    r2 = train_step(other, torch.optim.SGD(other.parameters(), lr=0.5), batch, loss_fn=loss_fn, micro_batch_size=4,
                    max_grad_norm=None)
    assert "seq_ratio_mean" in r1 and r1["loss"] == pytest.approx(r2["loss"], rel=1e-5, abs=1e-7)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
