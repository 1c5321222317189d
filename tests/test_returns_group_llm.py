"""The LLM trainers' group estimators: ReMax, OPO, GPG, GRPO pass@k, REINFORCE++-baseline."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rl2fx
from rl2fx.returns import (
    advantages,
    compute_advantages_unified,
    gpg,
    grpo,
    grpo_passk,
    list_estimators,
    opo,
    reinforce_pp_baseline,
    remax,
    rloo,
)
from rl2fx.testing import reference as ref
from rl2fx.testing.strategies import float_tensors, group_rewards

NEW = ["remax", "opo", "gpg", "grpo_passk", "reinforce_pp_baseline"]


def _greedy(data, seed: int = 0) -> torch.Tensor:
    n = data["rewards"].shape[0] // data["group_size"]
    g = torch.Generator().manual_seed(seed)
    # a mix of values tied with the samples' rewards and arbitrary ones
    return torch.where(torch.rand(n, generator=g) < 0.5, torch.randint(0, 2, (n,), generator=g).double(),
                       torch.randn(n, generator=g, dtype=torch.float64))


def _lengths(data) -> torch.Tensor | None:
    """OPO needs lengths for [batch] rewards without a mask: derive some from the rewards' values."""
    r = data["rewards"]
    if r.ndim == 1 and data.get("mask") is None:
        return torch.arange(r.shape[0]) % 4  # includes 0-length responses and all-zero groups of size <= 1
    return None


CASES = {
    "remax": (lambda d: remax(d["rewards"], _greedy(d), d["group_size"], mask=d.get("mask")),
              lambda d: ref.ref_remax(d["rewards"], _greedy(d), d["group_size"], mask=d.get("mask"))),
    "opo": (lambda d: opo(d["rewards"], d["group_size"], mask=d.get("mask"), lengths=_lengths(d)),
            lambda d: ref.ref_opo(d["rewards"], d["group_size"], mask=d.get("mask"), lengths=_lengths(d))),
    "gpg": (lambda d: gpg(d["rewards"], d["group_size"], mask=d.get("mask")),
            lambda d: ref.ref_gpg(d["rewards"], d["group_size"], mask=d.get("mask"))),
    "gpg_std": (lambda d: gpg(d["rewards"], d["group_size"], mask=d.get("mask"), norm_std=True),
                lambda d: ref.ref_gpg(d["rewards"], d["group_size"], mask=d.get("mask"), norm_std=True)),
    "grpo_passk": (lambda d: grpo_passk(d["rewards"], d["group_size"], mask=d.get("mask")),
                   lambda d: ref.ref_grpo_passk(d["rewards"], d["group_size"], mask=d.get("mask"))),
    "grpo_passk_nostd": (lambda d: grpo_passk(d["rewards"], d["group_size"], mask=d.get("mask"), norm_std=False),
                         lambda d: ref.ref_grpo_passk(d["rewards"], d["group_size"], mask=d.get("mask"),
                                                      norm_std=False)),
    "reinforce_pp_baseline": (
        lambda d: reinforce_pp_baseline(d["rewards"], d["group_size"], mask=d.get("mask")),
        lambda d: ref.ref_reinforce_pp_baseline(d["rewards"], d["group_size"], mask=d.get("mask"))),
}


@pytest.mark.parametrize("name", list(CASES))
@given(data=group_rewards(min_group_size=2))
def test_matches_reference(name, data):
    fast, slow = CASES[name]
    before = data["rewards"].clone()
    got, expected = fast(data), slow(data)
    assert got.shape == expected.shape
    assert got.dtype == data["rewards"].dtype
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(before, data["rewards"])
    if data.get("mask") is not None:
        assert torch.all(got[~data["mask"]] == 0)


@pytest.mark.parametrize("name", ["remax", "opo", "gpg", "reinforce_pp_baseline"])
@given(data=group_rewards(min_group_size=1, max_group_size=1))
def test_single_response_groups_match_reference(name, data):
    fast, slow = CASES[name]
    torch.testing.assert_close(fast(data), slow(data), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------- invariances


def _dyadic(data):
    """The rewards rounded to multiples of 1/1024, so that adding an integer is exact and cannot
    merge two nearly equal rewards into a tie (which would rightly change a zero-variance test)."""
    return {**data, "rewards": torch.round(data["rewards"] * 1024) / 1024}


def _shift(data, seed: int = 1):
    """Every reward of a group plus the same integer per-group constant (sequence-level rewards)."""
    k = data["group_size"]
    n = data["rewards"].shape[0] // k
    c = torch.randint(-5, 6, (n,), generator=torch.Generator().manual_seed(seed)).double()
    return data["rewards"] + c.repeat_interleave(k), c


SHIFT_INVARIANT = {
    "grpo": lambda r, d: grpo(r, d["group_size"], mask=d.get("mask")),
    "rloo": lambda r, d: rloo(r, d["group_size"], mask=d.get("mask")),
    "opo": lambda r, d: opo(r, d["group_size"], mask=d.get("mask"), lengths=_lengths(d)),
    "gpg": lambda r, d: gpg(r, d["group_size"], mask=d.get("mask")),
    "grpo_passk": lambda r, d: grpo_passk(r, d["group_size"], mask=d.get("mask")),
    "reinforce_pp_baseline": lambda r, d: reinforce_pp_baseline(r, d["group_size"], mask=d.get("mask")),
}


@pytest.mark.parametrize("name", list(SHIFT_INVARIANT))
@given(data=group_rewards(min_group_size=2, token_level=False, ties=False))
def test_adding_a_constant_to_a_group_leaves_advantages_unchanged(name, data):
    fn = SHIFT_INVARIANT[name]
    data = _dyadic(data)
    shifted, _ = _shift(data)
    # the tolerance covers the rounding of mean(s + c) against mean(s) + c
    torch.testing.assert_close(fn(shifted, data), fn(data["rewards"], data), rtol=1e-6, atol=1e-6)


@given(data=group_rewards(min_group_size=1, token_level=False, ties=False))
def test_remax_invariant_to_a_shift_of_samples_and_greedy_reward(data):
    data = _dyadic(data)
    shifted, c = _shift(data)
    g = _greedy(data)
    torch.testing.assert_close(remax(shifted, g + c, data["group_size"], mask=data.get("mask")),
                               remax(data["rewards"], g, data["group_size"], mask=data.get("mask")),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fn", [opo, gpg, grpo_passk])
@given(st.integers(1, 4), st.integers(2, 5), st.sampled_from([0.0, 1.0, 0.3, -7.1]))
def test_identical_rewards_give_exact_zero_not_nan(fn, n_groups, group_size, value):
    r = torch.full((n_groups * group_size,), value)
    kw = {"lengths": torch.arange(r.shape[0]) % 3} if fn is opo else {}
    adv = fn(r, group_size, **kw)
    assert torch.equal(adv, torch.zeros_like(adv))
    if fn is grpo_passk:
        assert torch.equal(fn(r, group_size, eps=0.0), torch.zeros_like(adv))  # no 0/0 either


@given(st.integers(1, 4), st.integers(2, 5), st.sampled_from([0.0, 1.0, 0.3]), st.booleans())
def test_reinforce_pp_baseline_all_degenerate_is_exact_zero(n_groups, group_size, value, with_mask):
    B = n_groups * group_size
    r = torch.full((B,), value)
    mask = (torch.arange(4) < (torch.arange(B) % 4 + 1)[:, None]) if with_mask else None
    adv = reinforce_pp_baseline(r, group_size, mask=mask)
    assert torch.equal(adv, torch.zeros_like(adv))


@given(group_rewards(min_group_size=2, token_level=False, with_mask=False))
def test_reinforce_pp_baseline_degenerate_groups_near_zero_without_mask(data):
    # without a mask the centred scores sum to 0 over the batch, so whitening barely shifts them
    adv = reinforce_pp_baseline(data["rewards"], data["group_size"]).view(-1, data["group_size"])
    g = data["rewards"].view(-1, data["group_size"])
    same = (g == g[:, :1]).all(-1)
    assert torch.all(adv[same].abs() < 1e-6)


@given(group_rewards(min_group_size=2, token_level=False, with_mask=False, ties=False))
def test_grpo_passk_gives_exactly_one_nonnegative_advantage_per_group(data):
    k = data["group_size"]
    adv = grpo_passk(data["rewards"], k).view(-1, k)
    r = data["rewards"].view(-1, k)
    assert torch.all(adv >= 0)
    assert torch.all((adv != 0).sum(-1) <= 1)
    nz = adv.abs().sum(-1) > 0
    assert torch.equal(adv.argmax(-1)[nz], r.argmax(-1)[nz])


def test_grpo_passk_ties_for_the_max():
    # two tied maxima: the margin is 0, so the whole group is 0 whichever index "wins"
    assert torch.equal(grpo_passk(torch.tensor([1.0, 1.0, 0.0]), 3), torch.zeros(3))
    # a tie below the max does not matter: [0, 2, 0] -> 2 / (std + eps) on index 1
    out = grpo_passk(torch.tensor([0.0, 2.0, 0.0]), 3)
    std = torch.tensor([0.0, 2.0, 0.0]).std()
    torch.testing.assert_close(out, torch.tensor([0.0, 2.0 / (std.item() + 1e-6), 0.0]))


@given(group_rewards(min_group_size=2, token_level=False, with_mask=False, ties=False))
def test_gpg_scales_dr_grpo_by_alpha(data):
    k = data["group_size"]
    r = data["rewards"]
    g = r.view(-1, k)
    same = (g == g[:, :1]).all(-1)
    B, M = r.shape[0], int(same.sum()) * k
    dr = rl2fx.dr_grpo(r, k)
    expected = dr * (B / (B - M)) if B > M else torch.zeros_like(dr)
    torch.testing.assert_close(gpg(r, k), expected)


def test_gpg_hand_example_and_verl_difference():
    # groups [1, 0] (valid) and [1, 1] (degenerate): B = 4, M = 2 -> alpha = 2: [1, -1, 0, 0].
    # verl's count_nonzero(scores) = 3 would give alpha = 4/3: [2/3, -2/3, 0, 0].
    torch.testing.assert_close(gpg(torch.tensor([1.0, 0.0, 1.0, 1.0]), 2), torch.tensor([1.0, -1.0, 0.0, 0.0]))
    # all degenerate: B == M, no division, all zero
    assert torch.equal(gpg(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2), torch.zeros(4))


def test_opo_hand_example_with_mask():
    # group [1, 0] with response lengths 3 and 1 from the mask: b = (3*1 + 1*0) / 4 = 0.75
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = opo(torch.tensor([1.0, 0.0]), 2, mask=m)
    torch.testing.assert_close(out, torch.tensor([[0.25, 0.25, 0.25], [-0.75, 0.0, 0.0]]))
    # equal lengths: OPO is Dr. GRPO
    r = torch.tensor([3.0, 1.0, 0.0, 2.0])
    torch.testing.assert_close(opo(r, 2, lengths=torch.ones(4)), rl2fx.dr_grpo(r, 2))
    # a group of zero-length responses falls back to the plain mean (no 0/0)
    torch.testing.assert_close(opo(r, 2, lengths=torch.tensor([0, 0, 1, 1])), rl2fx.dr_grpo(r, 2))


def test_remax_token_level_rewards_and_mask():
    r = torch.tensor([[0.0, 1.0], [0.0, 0.5], [2.0, 0.0]])
    m = torch.tensor([[1, 1], [1, 1], [1, 0]])
    out = remax(r, torch.tensor([0.5, 1.0, 3.0]), 1, mask=m)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5], [-0.5, -0.5], [-1.0, 0.0]]))


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [opo, gpg, grpo_passk, reinforce_pp_baseline])
def test_non_multiple_batch_names_both_numbers(fn):
    with pytest.raises(ValueError, match="batch size 5 is not a multiple of group_size 2"):
        fn(torch.zeros(5), 2, mask=torch.ones(5, 3))


def test_errors():
    with pytest.raises(ValueError, match="batch size 5 is not a multiple of group_size 2"):
        remax(torch.zeros(5), torch.zeros(2), 2)
    with pytest.raises(ValueError, match=r"greedy_rewards must have shape \(2,\).*batch size 4 / group_size 2.*\(4,\)"):
        remax(torch.zeros(4), torch.zeros(4), 2)
    with pytest.raises(ValueError, match=r"greedy_rewards must have shape \(2,\)"):
        remax(torch.zeros(4), torch.zeros(2, 1), 2)
    with pytest.raises(ValueError, match="greedy_rewards contains"):
        remax(torch.zeros(2), torch.tensor([float("nan")]), 2)
    with pytest.raises(ValueError, match="group_size must be >= 2 for grpo_passk"):
        grpo_passk(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="opo needs the response lengths"):
        opo(torch.zeros(4), 2)
    with pytest.raises(ValueError, match=r"lengths must have shape \(4,\)"):
        opo(torch.zeros(4), 2, lengths=torch.ones(3))
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        opo(torch.zeros(4), 2, lengths=torch.tensor([1, -1, 1, 1]))
    with pytest.raises(ValueError, match="eps must be in"):
        gpg(torch.zeros(4), 2, eps=-1.0)


# ----------------------------------------------------------------- unified entry


def _kw(name: str, B: int = 6, T: int = 5, k: int = 3) -> dict:
    g = torch.Generator().manual_seed(3)
    kw = {"rewards": torch.randint(0, 2, (B, T), generator=g).float(), "mask": torch.rand(B, T, generator=g) > 0.3,
          "group_size": k}
    if name == "remax":
        kw["greedy_rewards"] = torch.tensor([1.0, 0.0])
    return kw


@pytest.mark.parametrize("name", NEW)
def test_unified_entry_by_name_equals_direct_call(name):
    assert name in list_estimators() and callable(getattr(rl2fx, name))
    kw = _kw(name)
    out = advantages(name, **kw)
    fn = getattr(rl2fx, name)
    r = kw.pop("rewards")
    assert torch.equal(out["advantages"], fn(r, **kw))
    assert out["returns"].shape == r.shape and torch.isfinite(out["returns"]).all()


def _ragged(k: int = 2, n_prompts: int = 3, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n_prompts * k):
        L = int(torch.randint(1, 6, (1,), generator=g))
        data.append({"rewards": torch.randint(0, 3, (L,), generator=g).double()})
    return data


@pytest.mark.parametrize("name", NEW)
def test_compute_advantages_unified_by_name_matches_padded_batch(name):
    data = _ragged()
    T = max(d["rewards"].shape[0] for d in data)
    r = torch.zeros(len(data), T, dtype=torch.float64)
    m = torch.zeros(len(data), T, dtype=torch.bool)
    for i, d in enumerate(data):
        r[i, : d["rewards"].shape[0]] = d["rewards"]
        m[i, : d["rewards"].shape[0]] = True
    extra = {}
    if name == "remax":
        greedy = torch.tensor([1.0, 0.0, 2.5], dtype=torch.float64)
        for i, d in enumerate(data):
            d["greedy_reward"] = greedy[i // 2]
        extra = {"greedy_rewards": greedy}
    expected = advantages(name, rewards=r, mask=m, group_size=2, **extra)["advantages"]
    out = compute_advantages_unified(data, method=name, group_size=2)
    for i, d in enumerate(out):
        L = d["rewards"].shape[0]
        torch.testing.assert_close(d["advantages"], expected[i, :L])
    if name == "remax":  # the parameter form gives the same
        data2 = [{"rewards": d["rewards"]} for d in data]
        out2 = compute_advantages_unified(data2, method="remax", group_size=2, greedy_rewards=greedy)
        for a, b in zip(out, out2, strict=True):
            torch.testing.assert_close(a["advantages"], b["advantages"])


def test_compute_advantages_unified_remax_errors():
    data = _ragged()
    for i, d in enumerate(data):
        d["greedy_reward"] = float(i)  # differs inside a prompt's group
    with pytest.raises(ValueError, match="carry different 'greedy_reward'"):
        compute_advantages_unified(data, method="remax", group_size=2)
    with pytest.raises(ValueError, match="not both"):
        compute_advantages_unified(data, method="remax", group_size=2, greedy_rewards=torch.zeros(3))
    del data[1]["greedy_reward"]
    with pytest.raises(ValueError, match=r"data_list\[1\] lacks 'greedy_reward'"):
        compute_advantages_unified(data, method="remax", group_size=2)
    with pytest.raises(ValueError, match="needs argument"):
        compute_advantages_unified(_ragged(), method="remax", group_size=2)


@given(float_tensors((6,)))
def test_bfloat16_inputs_keep_dtype(r):
    rb = r.to(torch.bfloat16)
    for name in NEW:
        kw = {"group_size": 3}
        if name == "remax":
            kw["greedy_rewards"] = torch.zeros(2, dtype=torch.bfloat16)
        if name == "opo":
            kw["lengths"] = torch.ones(6)
        out = getattr(rl2fx, name)(rb, **kw)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
