"""Group baselines (REINFORCE, GRPO, Dr. GRPO, RLOO, REINFORCE++) and masked whitening."""

from __future__ import annotations

import pytest
import torch
from _returns_helpers import assert_close
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.returns import (
    dr_grpo,
    grpo,
    masked_mean,
    masked_std,
    reinforce,
    reinforce_pp,
    rloo,
    whiten,
)
from rl2fx.testing import reference as ref
from rl2fx.testing.strategies import float_tensors, group_rewards, masks

GROUP_FNS = {
    "reinforce": (reinforce, ref.ref_reinforce, {}),
    "reinforce_std": (reinforce, ref.ref_reinforce, {"norm_std": True}),
    "reinforce_global": (reinforce, ref.ref_reinforce, {"norm_std": True, "global_norm": True}),
    "grpo": (grpo, ref.ref_grpo, {}),
    "grpo_nostd": (grpo, ref.ref_grpo, {"norm_std": False}),
    "dr_grpo": (dr_grpo, ref.ref_dr_grpo, {}),
    "rloo": (rloo, ref.ref_rloo, {}),
    "reinforce_pp": (reinforce_pp, ref.ref_reinforce_pp, {}),
    "reinforce_pp_gamma": (reinforce_pp, ref.ref_reinforce_pp, {"gamma": 0.9}),
}


@pytest.mark.parametrize("name", list(GROUP_FNS))
@given(data=group_rewards(min_group_size=2))
def test_group_estimators_match_reference(name, data):
    fn, ref_fn, kw = GROUP_FNS[name]
    rewards = data["rewards"].clone()
    got = fn(data["rewards"], data["group_size"], mask=data.get("mask"), **kw)
    expected = ref_fn(data["rewards"], data["group_size"], mask=data.get("mask"), **kw)
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    # whitened/normalised outputs divide by a std that can be tiny: compare at a scale-aware tolerance
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(rewards, data["rewards"])


@pytest.mark.parametrize("fn", [reinforce, grpo, dr_grpo, rloo])
@given(st.integers(1, 4), st.integers(2, 5), st.sampled_from([0.0, 1.0, 0.3]))
def test_identical_rewards_give_zero_not_nan(fn, n_groups, group_size, value):
    r = torch.full((n_groups * group_size,), value)
    adv = fn(r, group_size)
    assert torch.equal(adv, torch.zeros_like(adv))


@given(group_rewards(min_group_size=2, token_level=False, with_mask=False))
def test_rloo_is_scaled_dr_grpo(data):
    k = data["group_size"]
    assert_close(rloo(data["rewards"], k), dr_grpo(data["rewards"], k) * k / (k - 1))


@given(group_rewards(token_level=False, with_mask=False, ties=False))
def test_group_advantages_sum_to_zero_per_group(data):
    k = data["group_size"]
    for fn in (dr_grpo, grpo):
        adv = fn(data["rewards"], k).view(-1, k)
        torch.testing.assert_close(adv.sum(-1), torch.zeros(adv.shape[0], dtype=adv.dtype), atol=1e-6, rtol=0)


@given(group_rewards(min_group_size=2, token_level=True, with_mask=True))
def test_token_level_advantages_are_constant_on_masked_in_tokens(data):
    adv = grpo(data["rewards"], data["group_size"], mask=data["mask"])
    m = data["mask"]
    assert torch.all(adv[~m] == 0)
    for row, mrow in zip(adv, m, strict=True):
        if mrow.any():
            assert torch.all(row[mrow] == row[mrow][0])


def test_bfloat16_group_inputs():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.bfloat16)
    adv = grpo(r, 3)
    assert adv.dtype == torch.bfloat16
    assert_close(adv, ref.ref_grpo(r, 3))


# ----------------------------------------------------------------- hand-checked examples


def test_grpo_hand_example():
    # group 1: [1, 0, 0] mean 1/3, sample std sqrt(((2/3)^2 + 2*(1/3)^2)/2) = sqrt(1/3) = 0.57735
    #   -> [(2/3)/0.57735, (-1/3)/0.57735, ...] = [1.1547, -0.57735, -0.57735]
    # group 2: [1, 1, 1] -> all zero (no NaN)
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(grpo(r, 3), torch.tensor([1.1547, -0.57735, -0.57735, 0.0, 0.0, 0.0]), atol=1e-4, rtol=0)
    # Dr. GRPO: [2/3, -1/3, -1/3, 0, 0, 0]; RLOO: 3/2 of that = [1, -0.5, -0.5, 0, 0, 0]
    torch.testing.assert_close(dr_grpo(r, 3), torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(rloo(r, 3), torch.tensor([1.0, -0.5, -0.5, 0.0, 0.0, 0.0]))


def test_reinforce_global_hand_example():
    # global mean of [1, 0, 0, 1, 1, 1] is 4/6: advantages [1/3, -2/3, -2/3, 1/3, 1/3, 1/3]
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(reinforce(r, 3, global_norm=True), r - 4 / 6)


def test_token_rewards_and_mask_layout():
    # two prompts x two responses, token-level rewards; the score is the sum over masked-in tokens
    r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 5.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 1, 1], [1, 1, 1]])
    # scores: [1, 0 (the 5 is masked out), 2, 2]; Dr. GRPO: [0.5, -0.5, 0, 0] on masked-in tokens
    expected = torch.tensor([[0.5, 0.5, 0.5], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(dr_grpo(r, 2, mask=m), expected)
    # sequence-level rewards with a mask broadcast over the masked-in tokens
    out = dr_grpo(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2, mask=m)
    torch.testing.assert_close(out, expected)


def test_reinforce_pp_hand_example():
    # one response per prompt, rewards at the last token, γ = 1: returns = [1, 1] and [0]
    # over the 3 masked-in tokens: mean 2/3, sample var ((1/3)^2*2 + (2/3)^2)/2 = 1/3
    # -> (1 - 2/3)/sqrt(1/3) = 0.57735, (0 - 2/3)/sqrt(1/3) = -1.1547
    r = torch.tensor([1.0, 0.0])
    m = torch.tensor([[1, 1], [0, 1]])
    got = reinforce_pp(r, mask=m)
    torch.testing.assert_close(got, torch.tensor([[0.57735, 0.57735], [0.0, -1.1547]]), atol=1e-4, rtol=0)


def test_group_errors():
    with pytest.raises(ValueError, match="batch size 5 is not a multiple of group_size 2"):
        grpo(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size must be in"):
        grpo(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="group_size must be >= 2 for rloo"):
        rloo(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="mask must have shape"):
        grpo(torch.zeros(4, 3), 2, mask=torch.ones(4, 2))
    with pytest.raises(ValueError, match="rewards contains"):
        grpo(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="rewards must be"):
        grpo(torch.zeros(2, 2, 2), 2)


# ----------------------------------------------------------------- whitening


@given(st.tuples(st.integers(1, 4), st.integers(1, 6)).flatmap(
    lambda s: st.tuples(float_tensors(s), masks(s, min_on_per_row=1), st.booleans())
))
def test_whiten_matches_reference(args):
    x, m, shift = args
    assert_close(whiten(x, m, shift_mean=shift), ref.ref_whiten(x, m, shift_mean=shift))
    kept = x[m]
    torch.testing.assert_close(masked_mean(x, m), kept.mean())
    if kept.numel() > 1:
        torch.testing.assert_close(masked_std(x, m), kept.std())


def test_whiten_errors():
    with pytest.raises(ValueError, match="mask selects no element"):
        masked_mean(torch.zeros(3), torch.zeros(3, dtype=torch.bool))
    assert torch.equal(whiten(torch.ones(3), torch.zeros(3, dtype=torch.bool)), torch.zeros(3))
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        whiten(torch.zeros(3), group=object())


def _dist_worker(rank: int, world: int, init_file: str, q) -> None:  # pragma: no cover - runs in a subprocess
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    x = torch.randn(world, 5)
    m = torch.rand(world, 5) > 0.3
    local = whiten(x[rank], m[rank], group=dist.group.WORLD)
    q.put((rank, local))
    dist.destroy_process_group()


@pytest.mark.slow
def test_whiten_across_processes_equals_global_whiten(tmp_path):
    """Two gloo ranks whitening their shards with group=WORLD equal whitening the concatenation."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = str(tmp_path / "init")
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, init, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    torch.manual_seed(0)
    x = torch.randn(2, 5)
    m = torch.rand(2, 5) > 0.3
    expected = whiten(x, m)
    torch.testing.assert_close(torch.stack([got[0], got[1]]), expected)
