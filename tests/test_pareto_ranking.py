"""Ranks, front mask and crowding: moocore, pymoo, BoTorch, a slow loop and the torch path agree."""

import moocore
import numpy as np
import pytest
import torch
from botorch.utils.multi_objective.pareto import is_non_dominated
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pymoo.operators.survival.rank_and_crowding.metrics import calc_crowding_distance
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from rl2fx.pareto import crowding_distance, dominance_ranks, pareto_front_mask, to_minimization


def _dominates(a, b):
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def slow_ranks(points):
    """Front peeling straight from the definition (Goldberg 1989), O(n^3)."""
    pts = [tuple(p) for p in points]
    ranks = [-1] * len(pts)
    left = set(range(len(pts)))
    r = 0
    while left:
        front = {i for i in left if not any(_dominates(pts[j], pts[i]) for j in left)}
        for i in front:
            ranks[i] = r
        left -= front
        r += 1
    return np.array(ranks)


def point_sets(min_m=2, max_m=5, max_n=40, tie_heavy=None):
    """Maximized point sets; tie-heavy ones sit on a coarse grid (duplicates, equal coordinates)."""

    @st.composite
    def build(draw):
        m = draw(st.integers(min_m, max_m))
        n = draw(st.integers(1, max_n))
        ties = draw(st.booleans()) if tie_heavy is None else tie_heavy
        elements = st.integers(-3, 3).map(float) if ties else st.floats(-1e3, 1e3, allow_nan=False, width=64)
        return draw(arrays(np.float64, (n, m), elements=elements))

    return build()


@given(point_sets())
def test_ranks_match_slow_reference_moocore_and_pymoo(points):
    ranks = dominance_ranks(points)
    assert ranks.dtype == np.int64
    np.testing.assert_array_equal(ranks, slow_ranks(points))
    np.testing.assert_array_equal(ranks, moocore.pareto_rank(points, maximise=True))
    fronts = NonDominatedSorting().do(-points)
    pymoo_ranks = np.empty(len(points), dtype=np.int64)
    for r, front in enumerate(fronts):
        pymoo_ranks[front] = r
    np.testing.assert_array_equal(ranks, pymoo_ranks)


@given(point_sets(), st.integers(1, 17))
def test_torch_path_is_identical_on_cpu(points, chunk):
    t = torch.from_numpy(points)
    want = dominance_ranks(points, backend="moocore")
    got = dominance_ranks(t, backend="torch", chunk_size=chunk)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(
        pareto_front_mask(t, backend="torch", chunk_size=chunk).numpy(),
        pareto_front_mask(points, backend="moocore"),
    )
    # numpy in, numpy out on the torch path too
    np.testing.assert_array_equal(dominance_ranks(points, backend="torch"), want)


@given(point_sets())
def test_front_mask_is_rank_zero_and_matches_botorch(points):
    mask = pareto_front_mask(points)
    np.testing.assert_array_equal(mask, dominance_ranks(points) == 0)
    bt = is_non_dominated(torch.from_numpy(points), maximize=True, deduplicate=False).numpy()
    np.testing.assert_array_equal(mask, bt)


@given(point_sets(), st.randoms(use_true_random=False))
def test_ranks_are_permutation_equivariant(points, rnd):
    perm = np.array(rnd.sample(range(len(points)), len(points)))
    np.testing.assert_array_equal(dominance_ranks(points[perm]), dominance_ranks(points)[perm])


@given(point_sets(tie_heavy=True), st.sampled_from([0.25, 2.0, 8.0]), st.integers(-50, 50))
def test_ranks_invariant_under_positive_affine_maps(points, scale, shift):
    # Powers of two and integer shifts keep the grid exact, so no tie is created or broken.
    np.testing.assert_array_equal(dominance_ranks(points * scale + shift), dominance_ranks(points))


@given(point_sets(min_m=1, max_m=5, max_n=30))
def test_crowding_matches_pymoo_and_torch_path(points):
    want = calc_crowding_distance(-points) if len(points) > 2 else np.full(len(points), np.inf)
    got = crowding_distance(points)
    np.testing.assert_array_equal(got, want)
    got_t = crowding_distance(torch.from_numpy(points), backend="torch")
    np.testing.assert_allclose(got_t.numpy(), want, rtol=1e-12, atol=0)
    if points.shape[1] < 8:  # same summation order: bit-identical
        np.testing.assert_array_equal(got_t.numpy(), want)


def test_crowding_hand_example():
    pts = np.array([[0.0, 4.0], [1.0, 2.0], [2.0, 1.0], [4.0, 0.0]])
    # point (1,2): ((2-0)/4 + (4-1)/4) / 2
    np.testing.assert_allclose(crowding_distance(pts), [np.inf, 0.625, 0.625, np.inf])


def test_float32_tensors_keep_kind_dtype_and_device():
    x = torch.rand(50, 3)
    assert dominance_ranks(x).device == x.device
    assert crowding_distance(x).dtype == torch.float32
    assert pareto_front_mask(x).dtype == torch.bool


def test_one_place_conversion():
    x = torch.tensor([[1.0, -2.0]])
    np.testing.assert_array_equal(to_minimization(x), [[-1.0, 2.0]])
    assert torch.equal(to_minimization(x, keep_device=True), -x.double())


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="backend must be one of"):
        dominance_ranks(np.zeros((2, 2)), backend="cuda")
    with pytest.raises(ValueError, match="NaN or inf"):
        pareto_front_mask(np.array([[0.0, np.nan]]))
    with pytest.raises(TypeError, match="points"):
        dominance_ranks(np.zeros(3))
    with pytest.raises(ValueError, match="chunk_size"):
        dominance_ranks(torch.zeros(3, 2), backend="torch", chunk_size=0)


def test_empty_input():
    assert dominance_ranks(np.zeros((0, 2))).shape == (0,)
    assert pareto_front_mask(torch.zeros(0, 3)).shape == (0,)


@pytest.mark.slow
def test_torch_path_at_n_1e4_matches_moocore():
    rng = np.random.default_rng(0)
    x = rng.random((10_000, 3))
    np.testing.assert_array_equal(dominance_ranks(torch.from_numpy(x), backend="torch").numpy(),
                                  dominance_ranks(x, backend="moocore"))


@pytest.mark.cuda
def test_cuda_path_matches_cpu():
    rng = np.random.default_rng(1)
    x = np.round(rng.random((3000, 4)) * 8) / 8
    t = torch.from_numpy(x).cuda()
    np.testing.assert_array_equal(dominance_ranks(t).cpu().numpy(), dominance_ranks(x))
    np.testing.assert_array_equal(pareto_front_mask(t).cpu().numpy(), pareto_front_mask(x))
    np.testing.assert_array_equal(crowding_distance(t).cpu().numpy(), crowding_distance(x))


@pytest.mark.parametrize("fn", ["dominance_ranks", "pareto_front_mask", "crowding_distance"])
def test_points_contract_names_the_argument(fn):
    import rl2fx.pareto as P

    f = getattr(P, fn)
    for bad in (np.array([[True, False], [False, True]]), torch.tensor([[True, False], [False, True]])):
        with pytest.raises(TypeError, match=r"(?s)parameter 'points'.*bool"):
            f(bad)
    with pytest.raises(TypeError, match="parameter 'points'"):
        f(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"m >= 1 objectives, got shape \(3, 0\)"):
        f(np.zeros((3, 0)))
