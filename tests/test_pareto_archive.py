"""The bounded archive: invariants after many random updates, pruning rules, purity."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rl2fx.pareto import (
    archive_init,
    archive_update,
    crowding_distance,
    hypervolume_contributions,
    nadir_reference_point,
)


def _mutually_nondominated_and_distinct(points):
    for i in range(len(points)):
        for j in range(len(points)):
            if i != j and (points[i] >= points[j]).all():
                return False
    return True


@given(
    st.integers(2, 4).flatmap(
        lambda m: st.tuples(
            st.just(m),
            st.integers(1, 6),
            st.lists(arrays(np.float64, m, elements=st.integers(-4, 4).map(float)), min_size=1, max_size=40),
        )
    )
)
def test_invariants_after_random_updates(data):
    m, cap, stream = data
    state = archive_init(m, capacity=cap)
    for step, p in enumerate(stream):
        new = archive_update(state, p, step=step, metadata={"i": step})
        assert len(new) <= cap
        assert _mutually_nondominated_and_distinct(new.points)
        # a point weakly dominated by the archive never gets in; a kept point is stored as given
        if len(state) and (state.points >= p).all(axis=1).any():
            assert new is state
        if step in new.steps:
            np.testing.assert_array_equal(new.points[new.steps.index(step)], p)
            assert new.metadata[new.steps.index(step)] == {"i": step}
        assert len(new.steps) == len(new.metadata) == len(new)
        state = new
    # every streamed point is weakly dominated by some archived point or was pruned for room
    if cap >= len(stream):
        for p in stream:
            assert (state.points >= p).all(axis=1).any()


def test_many_random_updates_stay_bounded_and_nondominated():
    rng = np.random.default_rng(0)
    state = archive_init(3, capacity=100)
    for step in range(2000):
        p = rng.normal(size=3)
        state = archive_update(state, p / np.linalg.norm(p), step=step)  # points on a sphere
    assert len(state) == 100
    assert _mutually_nondominated_and_distinct(state.points)


def _prune_reference(points, steps):
    """Which index a full archive must drop (m <= 3: least HV contribution, oldest on ties)."""
    if points.shape[1] <= 3:
        score = hypervolume_contributions(points, nadir_reference_point(points), method="exact")
    else:
        score = crowding_distance(points)
    best = min(range(len(points)), key=lambda i: (score[i], steps[i]))
    return best


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_pruning_drops_the_least_contributor(m):
    rng = np.random.default_rng(m)
    x = rng.random((12, m))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    state = archive_init(m, capacity=11)
    for step, p in enumerate(x[:11]):
        state = archive_update(state, p, step=step)
    assert len(state) == 11
    full = np.vstack([state.points, x[11]])
    steps = state.steps + (11,)
    drop = _prune_reference(full, steps)
    new = archive_update(state, x[11], step=11)
    np.testing.assert_array_equal(new.points, np.delete(full, drop, axis=0))


def test_dominating_point_removes_dominated_ones_and_state_is_immutable():
    s0 = archive_init(2, capacity=5)
    s1 = archive_update(s0, [1.0, 0.0], step=0)
    s2 = archive_update(s1, [0.0, 1.0], step=1)
    s3 = archive_update(s2, [1.0, 1.0], step=2)
    assert s3.points.tolist() == [[1.0, 1.0]] and s3.steps == (2,)
    assert s2.points.tolist() == [[1.0, 0.0], [0.0, 1.0]]  # untouched
    assert len(s0) == 0
    with pytest.raises(ValueError):
        s3.points[0, 0] = 5.0  # read-only
    # duplicates are not added twice
    assert archive_update(s3, [1.0, 1.0], step=3) is s3


def test_errors():
    with pytest.raises(ValueError, match="capacity"):
        archive_init(2, capacity=0)
    s = archive_init(2)
    with pytest.raises(ValueError, match=r"point must have shape \(2,\)"):
        archive_update(s, [1.0, 2.0, 3.0], step=0)
    with pytest.raises(ValueError, match="finite"):
        archive_update(s, [1.0, np.nan], step=0)


@pytest.mark.parametrize("bad", [2.5, True, "2"])
def test_archive_init_rejects_non_integer_sizes_by_name(bad):
    from rl2fx.pareto.archive import archive_init

    with pytest.raises(ValueError, match=r"num_objectives must be an int >= 1"):
        archive_init(bad)
    with pytest.raises(ValueError, match=r"capacity must be an int >= 1"):
        archive_init(2, capacity=bad)
