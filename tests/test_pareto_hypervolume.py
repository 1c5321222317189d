"""Hypervolume, contributions and gradient against moocore, BoTorch and the definitions."""

import itertools

import moocore
import numpy as np
import pytest
import torch
from botorch.utils.multi_objective.hypervolume import Hypervolume as BoTorchHV
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rl2fx.pareto import (
    hypervolume,
    hypervolume_contributions,
    hypervolume_gradient,
    nadir_reference_point,
    pareto_front_mask,
)


@st.composite
def fronts(draw, min_m=2, max_m=4, max_n=12, grid=None):
    """Points in (0, 10]^m (maximized) with reference point 0; optionally on a grid for ties."""
    m = draw(st.integers(min_m, max_m))
    n = draw(st.integers(1, max_n))
    on_grid = draw(st.booleans()) if grid is None else grid
    elements = st.integers(1, 6).map(float) if on_grid else st.floats(0.01, 10, allow_nan=False, width=64)
    return draw(arrays(np.float64, (n, m), elements=elements)), np.zeros(m)


def inclusion_exclusion_hv(points, ref):
    """HV by inclusion-exclusion over all subsets (Wu & Azarm 2001): exact, exponential."""
    pts = [p for p in points if (p > ref).all()]
    total = 0.0
    for k in range(1, len(pts) + 1):
        for subset in itertools.combinations(pts, k):
            total += (-1) ** (k + 1) * np.prod(np.min(subset, axis=0) - ref)
    return total


@given(fronts(max_n=8))
def test_hv_matches_moocore_botorch_and_inclusion_exclusion(data):
    points, ref = data
    hv = hypervolume(points, ref)
    assert hv == pytest.approx(moocore.hypervolume(points, ref=ref, maximise=True), rel=1e-9, abs=0)
    assert hv == pytest.approx(inclusion_exclusion_hv(points, ref), rel=1e-9, abs=1e-12)
    front = torch.from_numpy(points)[torch.from_numpy(pareto_front_mask(points))]
    bt = BoTorchHV(ref_point=torch.from_numpy(ref)).compute(front)
    assert hv == pytest.approx(bt, rel=1e-9)
    # tensors in, same float out
    assert hypervolume(torch.from_numpy(points), torch.from_numpy(ref)) == hv


@given(fronts(), st.data())
def test_adding_a_dominated_point_never_changes_hv(data, draws):
    points, ref = data
    i = draws.draw(st.integers(0, len(points) - 1))
    shrink = draws.draw(arrays(np.float64, points.shape[1], elements=st.floats(0, 1)))
    dominated = ref + (points[i] - ref) * shrink  # weakly below an existing point
    assert hypervolume(np.vstack([points, dominated]), ref) == pytest.approx(hypervolume(points, ref), rel=1e-12)


@given(fronts(), st.randoms(use_true_random=False), st.lists(st.sampled_from([0.5, 2.0, 3.0]), min_size=4, max_size=4))
def test_hv_permutation_and_scaling(data, rnd, scales):
    points, ref = data
    hv = hypervolume(points, ref)
    rows = np.array(rnd.sample(range(len(points)), len(points)))
    cols = np.array(rnd.sample(range(points.shape[1]), points.shape[1]))
    assert hypervolume(points[rows][:, cols], ref[cols]) == pytest.approx(hv, rel=1e-12)
    s = np.array(scales[: points.shape[1]])
    assert hypervolume(points * s, ref * s) == pytest.approx(hv * np.prod(s), rel=1e-9)


@given(fronts(max_m=4, max_n=10))
def test_exact_contributions_match_the_definition(data):
    points, ref = data
    contrib = hypervolume_contributions(points, ref, method="exact")
    front = pareto_front_mask(points)
    # distinct non-dominated points: HV(X) - HV(X \ {x}); dominated and duplicates: 0
    _, first = np.unique(points, axis=0, return_index=True)
    counts = {tuple(p): 0 for p in points}
    for p in points:
        counts[tuple(p)] += 1
    nd = points[front]
    for i, p in enumerate(points):
        if not front[i] or counts[tuple(p)] > 1:
            assert contrib[i] == 0.0
        else:
            rest = nd[~(nd == p).all(axis=1)]
            want = hypervolume(nd, ref) - (hypervolume(rest, ref) if len(rest) else 0.0)
            assert contrib[i] == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_monte_carlo_contributions_are_close_seeded_and_device_free():
    rng = np.random.default_rng(3)
    m, n = 5, 40
    x = rng.random((n, m))
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # points on a sphere: all non-dominated
    ref = np.zeros(m)
    exact = hypervolume_contributions(x, ref, method="exact")
    n_samples = 1 << 17
    mc = hypervolume_contributions(x, ref, method="monte_carlo", n_samples=n_samples, seed=7)
    volume = np.prod(x.max(axis=0) - ref)
    q = exact / volume
    stderr = volume * np.sqrt(q * (1 - q) / n_samples)
    assert np.all(np.abs(mc - exact) <= 5 * stderr + 1e-12)
    again = hypervolume_contributions(torch.from_numpy(x), torch.from_numpy(ref), method="monte_carlo",
                                      n_samples=n_samples, seed=7)
    np.testing.assert_array_equal(again.numpy(), mc)
    # auto picks exact at this size and Monte Carlo for large high-dimensional fronts
    np.testing.assert_array_equal(hypervolume_contributions(x, ref), exact)


def test_monte_carlo_ignores_dominated_points_like_moocore():
    pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [1.5, 1.5], [2.0, 2.0]])
    mc = hypervolume_contributions(pts, [0.0, 0.0], method="monte_carlo", n_samples=1 << 16)
    exact = hypervolume_contributions(pts, [0.0, 0.0], method="exact")
    np.testing.assert_array_equal(exact, [1.0, 0.0, 1.0, 0.0, 0.0])
    assert mc[3] == 0.0 and mc[1] == 0.0 and mc[4] == 0.0
    np.testing.assert_allclose(mc[[0, 2]], 1.0, atol=0.05)


@given(fronts(max_m=4, max_n=8, grid=False), st.data())
def test_gradient_matches_finite_differences(data, draws):
    front, ref = data
    m = front.shape[1]
    p = draws.draw(arrays(np.float64, m, elements=st.floats(0.5, 10, width=64)))
    g = hypervolume_gradient(torch.from_numpy(p), front, ref).numpy()
    base = moocore.hypervolume(np.vstack([front, p]), ref=ref, maximise=True)
    h = 1e-7
    for k in range(m):
        q = p.copy()
        q[k] += h
        fd = (moocore.hypervolume(np.vstack([front, q]), ref=ref, maximise=True) - base) / h
        assert g[k] == pytest.approx(fd, rel=1e-4, abs=1e-4)


def test_gradient_hand_example_and_dominated_point():
    g = hypervolume_gradient(torch.tensor([2.0, 2.0]), torch.tensor([[3.0, 1.0]]), [0.0, 0.0])
    torch.testing.assert_close(g, torch.tensor([1.0, 2.0]))
    g = hypervolume_gradient(torch.tensor([1.0, 1.0]), np.array([[3.0, 3.0]]), [0.0, 0.0])
    torch.testing.assert_close(g, torch.zeros(2))


def test_nadir_reference_point():
    pts = np.array([[0.0, 2.0], [1.0, 2.0]])
    np.testing.assert_allclose(nadir_reference_point(pts), [-0.1, 1.8])
    assert (nadir_reference_point(pts, margin=0.5) < pts.min(axis=0)).all()
    with pytest.raises(ValueError, match="margin"):
        nadir_reference_point(pts, margin=0.0)


def test_errors():
    with pytest.raises(ValueError, match="ref_point must have shape"):
        hypervolume(np.ones((2, 3)), [0.0, 0.0])
    with pytest.raises(ValueError, match="method must be one of"):
        hypervolume_contributions(np.ones((2, 2)), [0.0, 0.0], method="fast")
    with pytest.raises(ValueError, match="NaN or inf"):
        hypervolume(np.array([[np.inf, 1.0]]), [0.0, 0.0])
    assert hypervolume(np.zeros((0, 2)), [0.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="at least 2 objectives"):
        hypervolume_gradient(torch.tensor([1.0]), np.ones((1, 1)), [0.0])


def test_exact_contributions_keep_a_small_exclusive_box_in_4d():
    # moocore 0.3's hv_contributions returned 0 here (found by hypothesis); the
    # exclusive box of the first point is 0.01171875**3 * (4.3203125 - 4.3125)
    p = np.array([[0.01171875, 4.3203125, 0.01171875, 0.01171875], [1.0, 4.3125, 0.01171875, 0.01171875]])
    contrib = hypervolume_contributions(p, np.zeros(4), method="exact")
    assert contrib[0] == pytest.approx(0.01171875**3 * 0.0078125, rel=1e-9)
    assert contrib[1] == pytest.approx(hypervolume(p, np.zeros(4)) - hypervolume(p[:1], np.zeros(4)), rel=1e-12)


def test_contributions_reject_bool_and_1d_points_by_name():
    from rl2fx.pareto import hypervolume_contributions

    with pytest.raises(TypeError, match="points must hold real objective values"):
        hypervolume_contributions(torch.tensor([[True, False], [False, True]]), [0.0, 0.0])
    with pytest.raises(ValueError, match=r"points must have shape \[n, m\]"):
        hypervolume_contributions(np.array([1.0, 2.0]), [0.0])
