"""MultiObjectiveOptimizer: the spec's two examples as written, gradients, sign rules, errors, checkpoints."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rl2fx import MultiObjectiveOptimizer
from rl2fx.pareto import hypervolume, hypervolume_gradient, nadir_reference_point, pareto_front_mask

# Copied verbatim from spec/enhanced-rl2-features.md ("Multi-Objective Optimization" >
# "Usage in Code"), with `from RL2.algs import` replaced by `from rl2fx import`.
SPEC_USAGE = '''
from rl2fx import MultiObjectiveOptimizer

optimizer = MultiObjectiveOptimizer(
    objectives=["reward", "kl_penalty", "entropy"],
    objective_weights={"reward": 1.0, "kl_penalty": -0.1, "entropy": 0.01},
    pareto_method="weighted_sum"
)

# During training
objectives_dict = {
    "reward": reward_value,
    "kl_penalty": -kl_div,
    "entropy": entropy_value
}

loss = optimizer.compute_pareto_loss(objectives_dict)
optimizer.update_pareto_archive(objectives_dict)
'''

# Copied verbatim from the spec's "Advanced Multi-Objective Training" example.
SPEC_ADVANCED = '''
from rl2fx import MultiObjectiveOptimizer

# Create multi-objective optimizer
mo_optimizer = MultiObjectiveOptimizer(
    objectives=["reward", "kl_penalty", "entropy", "diversity"],
    objective_weights={
        "reward": 1.0,
        "kl_penalty": -0.1,
        "entropy": 0.05,
        "diversity": 0.02
    },
    pareto_method="tchebycheff"
)

# During training
objectives = {
    "reward": reward_value,
    "kl_penalty": -kl_div,
    "entropy": entropy_value,
    "diversity": diversity_metric
}

loss = mo_optimizer.compute_pareto_loss(objectives)
mo_optimizer.update_pareto_archive(objectives)

# Get Pareto front
pareto_front = mo_optimizer.get_pareto_front()
'''


def _policy_stats(theta):
    """Differentiable reward / KL / entropy / diversity of a tiny softmax policy."""
    probs = torch.softmax(theta, dim=-1)
    ref = torch.full_like(probs, 1.0 / probs.numel())
    reward = (probs * torch.arange(probs.numel(), dtype=probs.dtype)).sum()
    kl = (probs * (probs.log() - ref.log())).sum()
    entropy = -(probs * probs.log()).sum()
    diversity = 1.0 - (probs**2).sum()
    return reward, kl, entropy, diversity


def test_spec_usage_example_runs_as_written():
    theta = torch.zeros(4, requires_grad=True)
    reward_value, kl_div, entropy_value, _ = _policy_stats(theta)
    ns = {"reward_value": reward_value, "kl_div": kl_div, "entropy_value": entropy_value}
    exec(SPEC_USAGE, ns)
    loss = ns["loss"]
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    # loss = -(sum_i w_i f_i), signs literal
    want = -(1.0 * reward_value + (-0.1) * (-kl_div) + 0.01 * entropy_value)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert theta.grad is not None and torch.isfinite(theta.grad).all() and theta.grad.abs().sum() > 0
    assert ns["optimizer"].get_pareto_front() == [
        {"reward": reward_value.item(), "kl_penalty": -kl_div.item(), "entropy": entropy_value.item()}
    ]


def test_spec_advanced_example_runs_as_written_over_training_steps():
    theta = torch.zeros(5, requires_grad=True)
    sgd = torch.optim.SGD([theta], lr=0.5)
    ns = {}
    for _ in range(15):
        reward_value, kl_div, entropy_value, diversity_metric = _policy_stats(theta)
        ns.update(reward_value=reward_value, kl_div=kl_div, entropy_value=entropy_value,
                  diversity_metric=diversity_metric)
        exec(SPEC_ADVANCED, ns)
        sgd.zero_grad()
        ns["loss"].backward()
        assert torch.isfinite(theta.grad).all()
        sgd.step()
    front = ns["pareto_front"]
    assert front and all(set(d) == {"reward", "kl_penalty", "entropy", "diversity"} for d in front)
    pts = np.array([[d[k] for k in ("reward", "kl_penalty", "entropy", "diversity")] for d in front])
    assert pareto_front_mask(pts).all()


def _archive_opt(method, m=3, n=12, seed=0, **kw):
    rng = np.random.default_rng(seed)
    names = [f"o{i}" for i in range(m)]
    weights = {n_: float(w) for n_, w in zip(names, rng.uniform(-2, 2, m), strict=True)}
    opt = MultiObjectiveOptimizer(names, weights, pareto_method=method, **kw)
    for _ in range(n):
        x = rng.normal(size=m)
        opt.update_pareto_archive(dict(zip(names, (x / np.linalg.norm(x)).tolist(), strict=True)))
    return opt, names, weights, rng


@pytest.mark.parametrize("method", ["weighted_sum", "tchebycheff", "pareto_dominance", "hypervolume"])
@pytest.mark.parametrize("diversity_weight", [0.0, 0.1])
def test_gradients_flow_for_every_method(method, diversity_weight):
    opt, names, _, rng = _archive_opt(method, diversity_weight=diversity_weight)
    vals = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in zip(names, rng.normal(size=3) * 0.3, strict=True)}
    loss = opt.compute_pareto_loss(vals)
    assert loss.dim() == 0 and loss.dtype == torch.float64
    loss.backward()
    grads = torch.stack([vals[n].grad for n in names])
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0


def test_mixed_floats_and_tensors_and_float_only():
    opt = MultiObjectiveOptimizer(["a", "b"], {"a": 1.0, "b": -0.5})
    a = torch.tensor(2.0, requires_grad=True)
    loss = opt.compute_pareto_loss({"a": a, "b": 3})
    torch.testing.assert_close(loss, torch.tensor(-(2.0 - 1.5)))
    loss.backward()
    assert a.grad.item() == -1.0
    plain = opt.compute_pareto_loss({"a": 2.0, "b": 3.0})
    assert isinstance(plain, torch.Tensor) and not plain.requires_grad and plain.item() == pytest.approx(-0.5)


def _grad(opt, names, values):
    vals = {n: torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for n, v in zip(names, values, strict=True)}
    opt.compute_pareto_loss(vals).backward()
    return np.array([vals[n].grad.item() for n in names])


def test_pareto_dominance_weights_follow_dominance_counts():
    opt = MultiObjectiveOptimizer(["a", "b", "c"], {"a": 1.0, "b": -2.0, "c": 0.5},
                                  pareto_method="pareto_dominance", diversity_weight=0.0)
    for p in ([3.0, 1.0, 1.0], [1.0, 3.0, 1.0], [2.0, 2.0, 0.0]):
        opt.update_pareto_archive(dict(zip("abc", p, strict=True)))
    # (1, 1, 0.5) is dominated by the first two archived points (the third has c = 0).
    # Dominators beating it in a: one (3 > 1); in b: one; in c: both (1 > 0.5).
    g = _grad(opt, "abc", [1.0, 1.0, 0.5])
    np.testing.assert_allclose(g, -np.array([1.0 * 2, 2.0 * 2, 0.5 * 3]))
    # a non-dominated point gets the plain |w|
    np.testing.assert_allclose(_grad(opt, "abc", [4.0, 4.0, 4.0]), -np.array([1.0, 2.0, 0.5]))


def test_hypervolume_weights_are_the_normalized_hv_gradient():
    opt, names, weights, _ = _archive_opt("hypervolume", m=3, n=20, diversity_weight=0.0)
    archive = opt.archive.points
    p = np.array([0.3, 0.2, 0.4])
    layer = archive[~(archive >= p).all(axis=1)]
    ref = nadir_reference_point(np.vstack([archive, p]))
    g = hypervolume_gradient(torch.from_numpy(p), layer, ref).numpy()
    w = np.abs([weights[n] for n in names])
    np.testing.assert_allclose(_grad(opt, names, p), -w * 3 * g / g.sum(), rtol=1e-12)


@given(st.integers(0, 2**16))
def test_hypervolume_step_increases_hypervolume(seed):
    rng = np.random.default_rng(seed)
    names = ["a", "b", "c"]
    opt = MultiObjectiveOptimizer(names, dict.fromkeys(names, 1.0), pareto_method="hypervolume", diversity_weight=0.0)
    for _ in range(10):
        x = np.abs(rng.normal(size=3))
        opt.update_pareto_archive(dict(zip(names, (x / np.linalg.norm(x)).tolist(), strict=True)))
    x = np.abs(rng.normal(size=3))
    p = x / np.linalg.norm(x) * rng.uniform(0.7, 1.1)
    archive = opt.archive.points
    if (archive >= p).all(axis=1).any():
        return  # dominated: its own layer's gradient, the archive's HV does not move
    step = -_grad(opt, names, p) * 1e-4
    ref = nadir_reference_point(np.vstack([archive, p]))
    before = hypervolume(np.vstack([archive, p]), ref)
    after = hypervolume(np.vstack([archive, p + step]), ref)
    assert after > before


def test_tchebycheff_loss_formula_and_sign_rule():
    names = ["reward", "kl_penalty"]
    opt = MultiObjectiveOptimizer(names, {"reward": 1.0, "kl_penalty": -0.5}, pareto_method="tchebycheff",
                                  diversity_weight=0.0)
    opt.update_pareto_archive({"reward": 2.0, "kl_penalty": -1.0})
    opt.update_pareto_archive({"reward": 1.0, "kl_penalty": -0.1})
    kl = torch.tensor(0.8, requires_grad=True)
    loss = opt.compute_pareto_loss({"reward": torch.tensor(1.5), "kl_penalty": -kl})
    # ideal (2.0, -0.1); |w| = (1, 0.5): max(1 * 0.5, 0.5 * 0.7) = 0.5
    assert loss.item() == pytest.approx(0.5)
    # with the KL term the larger one: the loss grows with KL (|w| and maximized -kl)
    kl2 = torch.tensor(2.0, requires_grad=True)
    opt.compute_pareto_loss({"reward": torch.tensor(1.5), "kl_penalty": -kl2}).backward()
    assert kl2.grad.item() == pytest.approx(0.5)


def test_weighted_sum_ignores_diversity_and_archive():
    opt, names, weights, _ = _archive_opt("weighted_sum", diversity_weight=0.5)
    g = _grad(opt, names, [0.1, 0.2, 0.3])
    np.testing.assert_allclose(g, -np.array([weights[n] for n in names]))


def test_diversity_term_rewards_distance_from_the_archive():
    names = ["a", "b"]
    base = MultiObjectiveOptimizer(names, {"a": 1.0, "b": 1.0}, pareto_method="pareto_dominance", diversity_weight=0.0)
    div = MultiObjectiveOptimizer(names, {"a": 1.0, "b": 1.0}, pareto_method="pareto_dominance", diversity_weight=1.0)
    for o in (base, div):
        o.update_pareto_archive({"a": 0.0, "b": 1.0})
        o.update_pareto_archive({"a": 1.0, "b": 0.0})
    near, far = {"a": 0.9, "b": 0.05}, {"a": 0.5, "b": 0.5}
    gap_near = (div.compute_pareto_loss(near) - base.compute_pareto_loss(near)).item()
    gap_far = (div.compute_pareto_loss(far) - base.compute_pareto_loss(far)).item()
    assert gap_far < gap_near < 0
    # at an archived point the bonus is zero and its gradient is finite
    a = torch.tensor(0.0, requires_grad=True)
    div.compute_pareto_loss({"a": a, "b": 1.0}).backward()
    assert math.isfinite(a.grad.item())


@pytest.mark.parametrize("method", ["tchebycheff", "hypervolume", "pareto_dominance"])
def test_diversity_bonus_cannot_outweigh_the_objectives_on_a_narrow_archive(method):
    # The cause of the demo's Tchebycheff arm at chance: the novelty distance was divided by the
    # archive's range, so its gradient was kappa / range; with rewards archived within 1e-3 of each
    # other it was ~100x the reward's own weight and pushed the reward *down* (away from the nearest,
    # better archived point). In preference-weighted units it is bounded by kappa * |w_i|.
    opt = MultiObjectiveOptimizer(["reward", "kl_penalty"], {"reward": 1.0, "kl_penalty": 0.1},
                                  pareto_method=method, diversity_weight=0.1)
    opt.update_pareto_archive({"reward": 0.0610, "kl_penalty": -0.30})
    opt.update_pareto_archive({"reward": 0.0605, "kl_penalty": -0.10})
    at = {"reward": 0.0500, "kl_penalty": -0.11}
    lam = opt.gradient_weights(at)
    if method == "tchebycheff":  # the reward term is active (0.011 > 0.1 * 0.01): the loss pushes it up
        assert lam["reward"] < -0.8
    base = MultiObjectiveOptimizer(["reward", "kl_penalty"], {"reward": 1.0, "kl_penalty": 0.1},
                                   pareto_method=method, diversity_weight=0.0)
    base.update_pareto_archive({"reward": 0.0610, "kl_penalty": -0.30})
    base.update_pareto_archive({"reward": 0.0605, "kl_penalty": -0.10})
    lam0 = base.gradient_weights(at)
    for o, w in (("reward", 1.0), ("kl_penalty", 0.1)):
        assert abs(lam[o] - lam0[o]) <= 0.1 * w + 1e-9  # the bonus's share: at most kappa |w_o|


def test_loss_at_the_measured_point_has_its_value_and_the_surrogates_gradient():
    # The PG surrogate of the reward is ~0 on-policy whatever the reward is: placing it in the archive
    # puts the point in the wrong place. With at=..., value = L(at), gradient wrt f = dL/df at `at`.
    opt = MultiObjectiveOptimizer(["reward", "kl_penalty"], {"reward": 1.0, "kl_penalty": 0.5},
                                  pareto_method="tchebycheff", diversity_weight=0.0)
    opt.update_pareto_archive({"reward": 2.0, "kl_penalty": -1.0})
    opt.update_pareto_archive({"reward": 1.0, "kl_penalty": -0.1})
    at = {"reward": 1.5, "kl_penalty": -2.0}  # KL term active: 0.5 * 1.9 > 1 * 0.5
    r = torch.tensor(0.0, requires_grad=True)
    k = torch.tensor(0.0, requires_grad=True)
    loss = opt.compute_pareto_loss({"reward": r, "kl_penalty": k}, at=at)
    assert loss.item() == pytest.approx(opt.compute_pareto_loss(at).item()) == pytest.approx(0.95)
    loss.backward()
    lam = opt.gradient_weights(at)
    assert (r.grad.item(), k.grad.item()) == pytest.approx((lam["reward"], lam["kl_penalty"]))
    assert lam == pytest.approx({"reward": 0.0, "kl_penalty": -0.5})
    # without `at` the surrogate values (0, 0) decide the active term: the reward's
    assert opt.gradient_weights({"reward": 0.0, "kl_penalty": 0.0})["reward"] == pytest.approx(-1.0)


def test_archive_is_bounded_and_front_nondominated():
    opt, names, _, _ = _archive_opt("weighted_sum", m=2, n=300, archive_size=10)
    front = opt.get_pareto_front()
    assert len(front) == len(opt) == 10
    pts = np.array([[d[n] for n in names] for d in front])
    assert pareto_front_mask(pts).all()
    assert [e["step"] for e in opt.pareto_archive] == sorted(e["step"] for e in opt.pareto_archive)


@pytest.mark.parametrize("method", ["weighted_sum", "tchebycheff", "pareto_dominance", "hypervolume"])
def test_state_dict_round_trip(method):
    opt, names, weights, rng = _archive_opt(method, n=30, archive_size=8)
    sd = json.loads(json.dumps(opt.state_dict()))
    fresh = MultiObjectiveOptimizer(["x"], {"x": 1.0})
    fresh.load_state_dict(sd)
    assert fresh.get_pareto_front() == opt.get_pareto_front()
    assert fresh.state_dict() == opt.state_dict()
    vals = dict(zip(names, rng.normal(size=3).tolist(), strict=True))
    assert fresh.compute_pareto_loss(vals).item() == opt.compute_pareto_loss(vals).item()
    v2 = dict(zip(names, rng.normal(size=3).tolist(), strict=True))
    assert fresh.update_pareto_archive(v2) == opt.update_pareto_archive(v2)
    assert fresh.state_dict() == opt.state_dict()


def test_failed_load_leaves_the_optimizer_unchanged():
    opt, *_ = _archive_opt("hypervolume", n=10)
    before = opt.state_dict()
    bad = json.loads(json.dumps(before))
    bad["objectives"] = ["a", "b"]
    bad["objective_weights"] = {"a": 1.0, "b": 1.0}  # archive points have 3 objectives
    with pytest.raises(ValueError):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match="missing keys"):
        opt.load_state_dict({"objectives": ["a"]})
    assert opt.state_dict() == before


def test_errors_name_what_is_wrong():
    ok = {"objectives": ["r", "k"], "objective_weights": {"r": 1.0, "k": -0.1}}
    with pytest.raises(ValueError, match=r"pareto_method must be one of \['weighted_sum', 'tchebycheff', 'pareto_dominance', 'hypervolume'\], got 'nsga'"):
        MultiObjectiveOptimizer(**ok, pareto_method="nsga")
    with pytest.raises(ValueError, match=r"objective_weights is missing objective\(s\) \['k'\]"):
        MultiObjectiveOptimizer(["r", "k"], {"r": 1.0})
    with pytest.raises(ValueError, match=r"objective_weights has unknown objective\(s\) \['z'\]; allowed objectives: \['r', 'k'\]"):
        MultiObjectiveOptimizer(["r", "k"], {"r": 1.0, "k": 1.0, "z": 1.0})
    with pytest.raises(ValueError, match="all zero"):
        MultiObjectiveOptimizer(["r", "k"], {"r": 0.0, "k": 0.0})
    with pytest.raises(ValueError, match="finite"):
        MultiObjectiveOptimizer(["r", "k"], {"r": float("nan"), "k": 0.0})
    with pytest.raises(ValueError, match="unique"):
        MultiObjectiveOptimizer(["r", "r"], {"r": 1.0})
    with pytest.raises(ValueError, match="diversity_weight"):
        MultiObjectiveOptimizer(**ok, diversity_weight=-0.1)
    with pytest.raises(ValueError, match="archive_size"):
        MultiObjectiveOptimizer(**ok, archive_size=0)
    with pytest.raises(ValueError, match="at least 2 objectives"):
        MultiObjectiveOptimizer(["r"], {"r": 1.0}, pareto_method="hypervolume")
    opt = MultiObjectiveOptimizer(**ok)
    with pytest.raises(ValueError, match=r"objectives_dict has unknown objective\(s\) \['kl'\]; allowed objectives: \['r', 'k'\]"):
        opt.compute_pareto_loss({"r": 1.0, "k": 0.0, "kl": 2.0})
    with pytest.raises(ValueError, match=r"objectives_dict is missing objective\(s\) \['k'\]"):
        opt.update_pareto_archive({"r": 1.0})
    with pytest.raises(ValueError, match="0-d"):
        opt.compute_pareto_loss({"r": torch.ones(2), "k": 0.0})
    with pytest.raises(ValueError, match="finite"):
        opt.compute_pareto_loss({"r": float("inf"), "k": 0.0})
    with pytest.raises(ValueError, match="Python number"):
        opt.compute_pareto_loss({"r": "1.0", "k": 0.0})
