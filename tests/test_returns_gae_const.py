"""GAE's constant-discount CPU paths: the BLAS scan without a mask, and packing with one.

With float ``gamma``/``lamda``, no ``done``/``terminated`` and the default backend, GAE
does not build per-step coefficients: unmasked rows go straight to the scan's
matrix-product path, masked rows are packed (masked-in steps left-aligned),
solved as unmasked rows, and gathered back. These tests hold both against the
paper-formula reference and against the general path (``backend="loop"``), at
lengths that cross block boundaries (16-step blocks, a second level past 256).
"""

from __future__ import annotations

import threading

import pytest
import torch
from _returns_helpers import assert_close, assert_unchanged, cast, snapshot
from hypothesis import given
from hypothesis import strategies as st

from rl2fx.returns import gae, release_workspace, td_lambda
from rl2fx.returns._backends.packed import pack, pack_plan, unpack
from rl2fx.testing import reference as ref
from rl2fx.testing.strategies import dtypes, float_tensors, masks, shapes


@st.composite
def const_trajectories(draw, max_time: int = 300):
    shp = draw(shapes(max_batch_dims=2, max_side=3, min_time=1, max_time=max_time))
    out = {
        "rewards": draw(float_tensors(shp)),
        "values": draw(float_tensors(shp)),
        "gamma": draw(st.one_of(st.sampled_from([0.0, 1.0, 0.99]), st.floats(0.0, 1.0))),
        "lamda": draw(st.one_of(st.sampled_from([0.0, 1.0, 0.95]), st.floats(0.0, 1.0))),
        "bootstrap_value": draw(st.one_of(st.none(), float_tensors(shp[:-1]))),
    }
    if draw(st.booleans()):
        out["mask"] = draw(masks(shp))
    return out


def _kw(t: dict) -> dict:
    return {k: t[k] for k in ("gamma", "lamda", "bootstrap_value", "mask") if k in t}


@given(const_trajectories(), dtypes(("float32", "float64")))
def test_constant_paths_match_reference_and_general_path(traj, dtype):
    t = cast(traj, dtype)
    before = snapshot(t)
    adv, ret = gae(t["rewards"], t["values"], **_kw(t))
    assert adv.dtype == ret.dtype == dtype and adv.shape == t["rewards"].shape
    ref_adv, ref_ret = ref.ref_gae(traj["rewards"], traj["values"], **_kw(traj))
    assert_close(adv, ref_adv)
    assert_close(ret, ref_ret)
    loop_adv, loop_ret = gae(t["rewards"], t["values"], **_kw(t), backend="loop")
    assert_close(adv, loop_adv)
    assert_close(ret, loop_ret)
    assert_unchanged(t, before)
    if "mask" in t:
        assert (adv[~t["mask"]] == 0).all() and (ret[~t["mask"]] == 0).all()


@given(const_trajectories(max_time=40))
def test_td_lambda_constant_path_is_gae_returns(traj):
    got = td_lambda(traj["rewards"], traj["values"], **_kw(traj))
    assert_close(got, ref.ref_lambda_returns(traj["rewards"], traj["values"], **_kw(traj)))


@pytest.mark.parametrize("T", [1, 15, 16, 17, 256, 257, 4097])
def test_block_edges_and_padding(T):
    g = torch.Generator().manual_seed(T)
    r, v = torch.randn(2, 3, T, generator=g), torch.randn(2, 3, T, generator=g)
    boot = torch.randn(2, 3, generator=g)
    mask = torch.rand(2, 3, T, generator=g) < 0.6
    mask[0, 0] = False  # a row with no decision at all
    mask[0, 1] = True  # a row with every step a decision
    mask[1, 2] = False
    mask[1, 2, -1] = True  # a single decision, at the end
    for m in (None, mask):
        fast = gae(r, v, gamma=0.99, lamda=0.95, bootstrap_value=boot, mask=m)
        slow = gae(r, v, gamma=0.99, lamda=0.95, bootstrap_value=boot, mask=m, backend="loop")
        for a, b in zip(fast, slow, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    adv, ret = gae(r, v, gamma=0.99, lamda=0.95, bootstrap_value=boot, mask=mask)
    assert (adv[0, 0] == 0).all() and (ret[0, 0] == 0).all()


def test_hand_example_masked():
    # decisions at t = 1 and 3; V after the last = 2: delta_1 = 1 + 0.5*3 - 1, delta_3 = 1 + 0.5*2 - 3
    r = torch.tensor([[9.0, 1.0, 9.0, 1.0, 9.0]])
    v = torch.tensor([[9.0, 1.0, 9.0, 3.0, 9.0]])
    m = torch.tensor([[False, True, False, True, False]])
    adv, ret = gae(r, v, gamma=0.5, lamda=0.5, bootstrap_value=torch.tensor([2.0]), mask=m)
    d3 = 1 + 0.5 * 2 - 3
    d1 = 1 + 0.5 * 3 - 1
    torch.testing.assert_close(adv, torch.tensor([[0.0, d1 + 0.25 * d3, 0.0, d3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, d1 + 0.25 * d3 + 1, 0.0, d3 + 3, 0.0]]))


def test_nonfinite_inputs_are_named_on_the_fast_paths():
    r, v = torch.zeros(2, 40), torch.zeros(2, 40)
    bad_v = v.clone()
    bad_v[1, 39] = float("inf")
    with pytest.raises(ValueError, match="values contains 1 non-finite"):
        gae(r, bad_v, gamma=0.9, lamda=0.9)
    with pytest.raises(ValueError, match="bootstrap_value contains 1 non-finite"):
        gae(r, v, gamma=0.9, lamda=0.9, bootstrap_value=torch.tensor([0.0, float("nan")]))
    # a NaN at a masked-out step is still an error, as on the general path
    bad_r = r.clone()
    bad_r[0, 3] = float("nan")
    m = torch.ones(2, 40, dtype=torch.bool)
    m[0, 3] = False
    with pytest.raises(ValueError, match="rewards contains 1 non-finite"):
        gae(bad_r, v, gamma=0.9, lamda=0.9, mask=m)


def test_overflowing_sum_of_finite_inputs_is_not_an_error():
    # delta's sum overflows float32 although every input is finite: no error, same
    # result as the general path
    r = torch.full((1, 64), 3e38)
    v = torch.zeros(1, 64)
    fast = gae(r, v, gamma=0.5, lamda=0.0)[0]
    slow = gae(r, v, gamma=0.5, lamda=0.0, backend="loop")[0]
    assert torch.equal(fast, slow)


def test_gradients_flow_through_the_general_path():
    r = torch.randn(2, 50, requires_grad=True)
    v = torch.randn(2, 50, requires_grad=True)
    m = torch.rand(2, 50) < 0.7
    adv, ret = gae(r, v, gamma=0.99, lamda=0.95, mask=m)
    (adv.sum() + ret.sum()).backward()
    with torch.no_grad():
        expect = gae(r, v, gamma=0.99, lamda=0.95, mask=m)
    torch.testing.assert_close(adv.detach(), expect[0])
    assert r.grad is not None and v.grad is not None


def test_pack_plan_and_round_trip():
    m = torch.tensor([[False, True, True, False, True], [False] * 5, [True] * 5])
    x = torch.arange(15.0).view(3, 5) + 1
    plan = pack_plan(m)
    assert plan.count.tolist() == [3, 0, 5]
    packed = pack(x, plan, width=5, slot="test-pack")
    assert packed.tolist() == [[2, 3, 5, 0, 0], [0] * 5, [11, 12, 13, 14, 15]]
    back = unpack(packed.clone(), plan)
    assert torch.equal(back, torch.where(m, x, 0.0))


def test_workspace_is_per_thread_and_releasable():
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(8, 300, generator=g), torch.randn(8, 300, generator=g), torch.rand(8, 300, generator=g) < 0.5)
        for _ in range(4)
    ]
    expect = [gae(r, v, gamma=0.99, lamda=0.9, mask=m, backend="loop") for r, v, m in data]
    results: dict[int, list] = {}

    def work(i: int) -> None:
        r, v, m = data[i]
        results[i] = [gae(r, v, gamma=0.99, lamda=0.9, mask=m) for _ in range(20)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i, outs in results.items():
        for adv, ret in outs:
            torch.testing.assert_close(adv, expect[i][0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ret, expect[i][1], rtol=1e-5, atol=1e-5)
    gae(*data[0][:2], gamma=0.99, lamda=0.9, mask=data[0][2])
    assert release_workspace() > 0
    assert release_workspace() == 0
