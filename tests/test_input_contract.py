"""The input contract (docs/contract.md): one mask rule, finite hyperparameters, empty inputs give
empty outputs, lists/NumPy by a stated rule, and errors that name the argument.

The first part pins each case of issue 24 (item 2) that once failed; the second drives the
public functions with hypothesis-generated bad and edge inputs and accepts exactly two
outcomes per call: a correct result in which masked-out positions have no influence, or an
exception naming the argument. Outcomes are counted and written to
``outputs/input_contract_counts.json`` at the end of the session.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl2fx import control as Ctl
from rl2fx import losses as L
from rl2fx import pareto as P
from rl2fx import returns as R
from rl2fx.kl_estimators import KL_ESTIMATORS
from rl2fx.returns.registry import get_estimator, list_estimators
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
    assert R.retrace(e, e, e, e, gamma=0.9, bootstrap_value=torch.ones(2)).shape == (2, 0)  # was IndexError
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
    (lambda: P.tchebycheff(torch.zeros(2, 0), torch.zeros(0), torch.zeros(0)), "objectives"),  # was IndexError
])
def test_pareto_errors_name_the_argument(call, name):
    with pytest.raises((TypeError, ValueError), match=name):
        call()



# found by the property suite below

@pytest.mark.parametrize("name", ["gae", "td_lambda", "clipped_is"])
def test_masked_out_nonfinite_does_not_change_a_result_even_by_rounding(name):
    # the constant-discount fast path fell back to another path (other rounding) when a
    # masked-out value was NaN and allow_nonfinite=True
    gen = torch.Generator().manual_seed(0)
    r, v = torch.randn(1, 3, generator=gen), torch.randn(1, 3, generator=gen)
    m = torch.tensor([[True, False, True]])
    kw = dict(mask=m, allow_nonfinite=True, log_rhos=torch.zeros(1, 3))
    clean = R.advantages(name, rewards=r, values=v, **kw)
    rp, vp = r.clone(), v.clone()
    rp[0, 1] = vp[0, 1] = float("nan")
    poisoned = R.advantages(name, rewards=rp, values=vp, **kw)
    for k in clean:
        assert torch.equal(clean[k], poisoned[k]), k


def test_masked_out_nonfinite_still_raises_without_allow_nonfinite():
    r = torch.tensor([[0.0, float("nan"), 1.0]])
    with pytest.raises(ValueError, match="rewards contains"):
        R.gae(r, torch.zeros(1, 3), gamma=0.9, lamda=0.95, mask=torch.tensor([[True, False, True]]))


@pytest.mark.parametrize("agg", L.AGG_MODES)
@pytest.mark.parametrize("name", ["vanilla", "gspo", "dppo_tv", "dro"])
def test_an_empty_batch_has_loss_zero(name, agg):
    # seq-mean modes divided by the number of sequences, 0 for an empty batch: NaN
    e = torch.zeros(0, 3)
    loss, _ = L.compute_policy_loss(name, e, e, e, None, agg_mode=agg)
    assert loss.item() == 0.0


def test_group_variants_take_an_empty_batch():
    from rl2fx.returns.variants import gdpo, optimal_token_baseline

    assert gdpo(torch.zeros(0, 2), group_size=2).shape == (0,)
    e = torch.zeros(0, 0)
    adv, ret = optimal_token_baseline(e, e, e, group_size=1)
    assert adv.shape == ret.shape == (0, 0)


def test_compute_policy_loss_names_a_non_tensor_input():
    lp = torch.zeros(1, 2)
    with pytest.raises(TypeError, match="logprobs must be a torch tensor"):
        L.compute_policy_loss("dppo_tv", lp.numpy(), lp, lp)


# ------------------------------------------------------------------ the property suite
#
# Every call ends in one of two accepted outcomes:
#   "correct"      it returned, and the result equals the same call with every masked-out
#                  value replaced by 0 (masked-out positions have no influence); with finite
#                  float32/float64 inputs and finite hyperparameters the result is finite too;
#   "named_error"  ValueError/TypeError (the project's errors subclass them) whose message
#                  names one of the arguments of the call.
# Anything else fails the test: "silent_wrong" (a result that depends on masked-out values,
# a non-finite result from finite inputs, a NaN hyperparameter accepted), "unnamed_error", or
# another exception type (IndexError, RuntimeError, ...).

#: outcome -> number of calls, over the whole session (written at the end of the module)
OUTCOMES: Counter = Counter()
_COUNTS_PATH = Path(__file__).resolve().parents[1] / "outputs" / "input_contract_counts.json"


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    total = sum(OUTCOMES.values())
    report = {"inputs_tried": total, **{k: OUTCOMES.get(k, 0) for k in ("correct", "named_error", "silent_wrong",
                                                                          "unnamed_error", "crash")}}
    _COUNTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    _COUNTS_PATH.write_text(json.dumps(report, indent=1) + "\n")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print(f"\ninput contract: {total} inputs tried: {report['correct']} correct, {report['named_error']} named "
              f"errors, {report['silent_wrong']} silent wrong ({_COUNTS_PATH})")


_NAN, _INF = float("nan"), float("inf")
_POISON = (_NAN, _INF, -_INF, 1e30)
_BAD_NUMBERS = (_NAN, _INF, -_INF, -1.0, 0.0, 1.5, 1e9)
_DTYPES = (torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool)
_MASKS = ("none", "bool", "float", "int", "bad_two", "bad_neg", "bad_half")


class Case:
    """One generated batch: shape, dtype, mask, which positions are kept and how inputs are poisoned."""

    def __init__(self, data, *, groups: bool = False, rows: int | None = None):
        d = data.draw
        self.seed = d(st.integers(0, 2**16), label="seed")
        self.group_size = d(st.sampled_from([1, 2]), label="group_size") if groups else 1
        n = d(st.integers(0, 2), label="n_groups") if rows is None else rows
        self.B = self.group_size * n
        self.T = d(st.integers(0, 4), label="T")
        self.dtype = d(st.sampled_from(_DTYPES), label="dtype")
        self.mask_kind = d(st.sampled_from(_MASKS), label="mask")
        self.poison_where = d(st.sampled_from(["none", "masked_out", "masked_out", "masked_in"]), label="poison")
        self.poison = d(st.sampled_from(_POISON), label="poison_value")
        self.container = d(st.sampled_from(["tensor"] * 6 + ["numpy", "list"]), label="container")
        self.extra = d(st.sampled_from([None, None, "bootstrap_value", "terminated", "done", "behavior_logprobs"]),
                       label="extra")
        self.gen = torch.Generator().manual_seed(self.seed)
        keep = torch.rand(self.B, self.T, generator=self.gen) < 0.6
        self.keep = keep
        self.mask = self._mask(keep)

    def _mask(self, keep: torch.Tensor) -> torch.Tensor | None:
        k = self.mask_kind
        if k == "none":
            self.keep = torch.ones_like(keep)
            return None
        if k == "bool":
            return keep
        if k == "float":
            return keep.float()
        if k == "int":
            return keep.long()
        bad = {"bad_two": 2.0, "bad_neg": -1.0, "bad_half": 0.5}[k]
        return torch.where(keep, torch.tensor(bad), torch.tensor(0.0)) if keep.any() else keep.float()

    @property
    def finite(self) -> bool:
        """Whether the masked-in inputs are finite floats whose results must be finite too."""
        return self.dtype in (torch.float32, torch.float64) and self.poison_where != "masked_in"

    def tensor(self, shape=None, *, low: float = -2.0, high: float = 2.0, poison: bool = True) -> torch.Tensor:
        """A float64 tensor of ``shape`` (default ``[B, T]``), poisoned as drawn, in the drawn dtype."""
        shape = (self.B, self.T) if shape is None else shape
        x = low + (high - low) * torch.rand(*shape, generator=self.gen, dtype=torch.float64)
        if self.dtype == torch.bool:
            return x > 0
        if not self.dtype.is_floating_point:
            return x.round().to(self.dtype)
        if poison and tuple(shape) == (self.B, self.T) and x.numel():
            pos = torch.rand(shape, generator=self.gen) < 0.5
            if self.poison_where == "masked_out":
                x = torch.where(pos & ~self.keep, self.poison, x)
            elif self.poison_where == "masked_in":
                x = torch.where(pos & self.keep, self.poison, x)
        return x.to(self.dtype)

    def clean(self, x: Any) -> Any:
        """``x`` with every masked-out entry of a ``[B, T]`` float tensor replaced by 0."""
        if isinstance(x, torch.Tensor) and x.shape == (self.B, self.T) and x.is_floating_point():
            return torch.where(self.keep, x, torch.zeros((), dtype=x.dtype))
        return x

    def convert(self, x: torch.Tensor) -> Any:
        """The drawn container for one argument (a list or NumPy array instead of a tensor)."""
        if self.container == "numpy" and x.dtype != torch.bfloat16:
            return x.numpy()
        if self.container == "list":
            return x.tolist()
        return x


def _leaves(out: Any) -> list:
    if isinstance(out, dict):
        return [v for k in sorted(out) for v in _leaves(out[k])]
    if isinstance(out, tuple | list):
        return [v for o in out for v in _leaves(o)]
    if isinstance(out, np.ndarray):
        return [torch.from_numpy(np.asarray(out, dtype=np.float64) if out.dtype != np.bool_ else out)]
    if isinstance(out, torch.Tensor):
        return [out.detach()]
    if isinstance(out, bool | int | float | np.floating | np.integer):
        return [torch.tensor(float(out))]
    return []


def _same(a: Any, b: Any) -> bool:
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb, strict=True):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            if not bool(((x == y) | (torch.isnan(x) & torch.isnan(y))).all()):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def _all_finite(out: Any) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in _leaves(out) if x.is_floating_point())


def _names_one_of(msg: str, names) -> bool:
    return any(re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg) for n in names)


def check_call(label: str, call, clean_call=None, *, names, must_be_finite: bool = False,
               must_raise: bool = False, check=None) -> str:
    """Run ``call`` and classify it; fail the test on anything but the two accepted outcomes."""
    try:
        out = call()
    except (ValueError, TypeError) as e:
        if not _names_one_of(str(e), names):
            OUTCOMES["unnamed_error"] += 1
            pytest.fail(f"{label}: the error names none of the arguments {sorted(names)}: "
                        f"{type(e).__name__}: {str(e)[:400]}")
        OUTCOMES["named_error"] += 1
        return "named_error"
    except Exception as e:  # noqa: BLE001  (any other type is a crash, reported with the input)
        OUTCOMES["crash"] += 1
        pytest.fail(f"{label}: crashed with {type(e).__name__}: {e}")
    problem = None
    if must_raise:
        problem = "accepted an invalid argument"
    elif clean_call is not None:
        try:
            ref = clean_call()
        except (ValueError, TypeError) as e:
            problem = f"succeeded, but raised once masked-out values were zeroed ({e})"
        else:
            if not _same(out, ref):
                problem = "the result depends on masked-out values"
    if problem is None and must_be_finite and not _all_finite(out):
        problem = "non-finite result from finite masked-in inputs"
    if problem is None and check is not None:
        problem = check(out)
    if problem is not None:
        OUTCOMES["silent_wrong"] += 1
        pytest.fail(f"{label}: silent wrong result: {problem}")
    OUTCOMES["correct"] += 1
    return "correct"


def record_error(label: str, e: Exception, names) -> None:
    """Classify an exception caught by the caller (a set-up step whose result the test goes on to use)."""
    def reraise():
        raise e

    check_call(label, reraise, names=names)


def _bad_hyper(data, defaults: dict[str, Any]) -> tuple[str | None, Any]:
    """Maybe one hyperparameter replaced by an out-of-range or ill-typed value."""
    numeric = [k for k, v in defaults.items() if isinstance(v, float | int) and not isinstance(v, bool)]
    if not numeric or not data.draw(st.booleans(), label="bad_hyper"):
        return None, None
    key = data.draw(st.sampled_from(sorted(numeric)), label="hyper")
    value = data.draw(st.sampled_from(_BAD_NUMBERS + ("x",)), label="hyper_value")
    return key, value


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


# ------------------------------------------------------------------ estimators, via the registry

_SEQ_SHAPED = {"greedy_rewards", "reward_components", "bootstrap_value"}
_TOKEN_INPUTS = ("rewards", "values", "log_rhos", "q_values", "v_next", "old_logprobs", "sum_pi_squared",
                 "rollout_is_weights")


def _estimator_args(case: Case, spec) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for name in spec.inputs:
        if name in _TOKEN_INPUTS:
            lo, hi = (0.05, 1.0) if name in ("sum_pi_squared", "rollout_is_weights") else (-2.0, 2.0)
            if name in spec.required or name in ("values", "log_rhos"):
                args[name] = case.tensor(low=lo, high=hi)
        elif name == "mask" and case.mask is not None:
            args["mask"] = case.mask
        elif name == "group_size":
            args["group_size"] = case.group_size
        elif name == "greedy_rewards" and "greedy_rewards" in spec.required:
            args[name] = case.tensor((case.B // case.group_size,), poison=False)
        elif name == "reward_components" and name in spec.required:
            # K != T, or clean() would take it for a [B, T] tensor and zero it
            args[name] = case.tensor((case.B, case.T + 1), poison=False)
        elif name == "bootstrap_value" and case.extra == "bootstrap_value":
            args[name] = case.tensor((case.B,), poison=False)
        elif name in ("terminated", "done") and case.extra == name:
            args[name] = torch.rand(case.B, case.T, generator=case.gen) < 0.3
    return args


def _estimator_call(name, case, data):
    spec = get_estimator(name)
    args = _estimator_args(case, spec)
    key, value = _bad_hyper(data, dict(spec.defaults))
    hp = {} if key is None else {key: value}
    allow = data.draw(st.booleans(), label="allow_nonfinite") if "allow_nonfinite" in spec.options else False
    if allow:
        hp["allow_nonfinite"] = True
    odd = data.draw(st.sampled_from(sorted(args)), label="odd_arg") if args else None
    if odd is not None and isinstance(args[odd], torch.Tensor) and case.container != "tensor":
        args[odd] = case.convert(args[odd])

    def call():
        return R.advantages(name, **args, **hp)

    def clean():
        return R.advantages(name, **{k: case.clean(v) for k, v in args.items()}, **hp)

    names = set(args) | set(spec.accepts) | {"method"}
    finite = case.finite and key is None and case.container == "tensor"
    return call, clean, names, finite, _is_nan(value)


@pytest.mark.parametrize("name", list_estimators())
@given(data=st.data())
def test_estimators_keep_the_contract(name, data):
    spec = get_estimator(name)
    case = Case(data, groups="group_size" in spec.inputs)
    call, clean, names, finite, nan_hyper = _estimator_call(name, case, data)
    check_call(f"advantages({name!r})", call, clean, names=names, must_be_finite=finite, must_raise=nan_hyper)


# ------------------------------------------------------------------ losses (rl2fx.losses, the registry)

def _loss_tensors(case: Case) -> dict[str, torch.Tensor]:
    return {"logprobs": case.tensor(low=-3.0, high=-0.05), "old_logprobs": case.tensor(low=-3.0, high=-0.05),
            "advantages": case.tensor()}


@pytest.mark.parametrize("name", L.list_policy_losses())
@given(data=st.data())
def test_policy_losses_keep_the_contract(name, data):
    spec = L.get_policy_loss(name)
    case = Case(data)
    t = _loss_tensors(case)
    key, value = _bad_hyper(data, {k: v for k, v in spec.defaults.items() if v is not None})
    params = {} if key is None else {key: value}
    agg = data.draw(st.sampled_from(L.AGG_MODES), label="agg_mode")
    gt = data.draw(st.sampled_from([None, None, 4.0, 0.0, -1.0, _NAN, _INF]), label="global_tokens")
    odd = data.draw(st.sampled_from(sorted(t)), label="odd_arg")
    if case.container != "tensor":
        t[odd] = case.convert(t[odd])
    mask = case.mask

    if case.extra == "behavior_logprobs" and "behavior_logprobs" in spec.inputs:
        t["behavior_logprobs"] = case.tensor(low=-3.0, high=-0.05)
        if "tis_cap" in spec.hyperparameters and "tis_cap" not in params:
            params["tis_cap"] = 2.0

    def run(tt):
        return L.compute_policy_loss(name, tt["logprobs"], tt["old_logprobs"], tt["advantages"], mask,
                                     behavior_logprobs=tt.get("behavior_logprobs"), agg_mode=agg, global_tokens=gt,
                                     params=params)

    # a relation between two hyperparameters may name the one not passed
    names = set(t) | set(spec.hyperparameters) | {"mask", "agg_mode", "global_tokens", "params"}
    finite = case.finite and key is None and case.container == "tensor" and gt in (None, 4.0)
    check_call(f"policy loss {name!r}", lambda: run(t), lambda: run({k: case.clean(v) for k, v in t.items()}),
               names=names, must_be_finite=finite, must_raise=_is_nan(value) or _is_nan(gt))


def _masked_in_only(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return out if mask is None else torch.where(mask != 0, out, torch.zeros((), dtype=out.dtype))


_LOSS_FNS = {
    "policy_loss": (lambda t, m, c, **kw: L.policy_loss(t["logprobs"], t["old_logprobs"], t["advantages"], m,
                                                        clip=c, **kw), 0.2),
    "value_loss": (lambda t, m, c, **kw: L.value_loss(t["logprobs"], t["old_logprobs"], t["advantages"], m,
                                                      clip=c, **kw), 0.2),
    "entropy_bonus": (lambda t, m, c, **kw: L.entropy_bonus(t["advantages"], m, coef=c, **kw), 0.01),
    "kl_loss": (lambda t, m, c, **kw: L.kl_loss(t["logprobs"], t["old_logprobs"], c, mask=m, **kw), 0.1),
    # masked-out rewards pass through unchanged (they are data), so only masked-in outputs are compared
    "kl_penalized_rewards": (lambda t, m, c, **kw: _masked_in_only(L.kl_penalized_rewards(
        t["advantages"], t["logprobs"], t["old_logprobs"], c, mask=m), m), 0.1),
    "aggregate": (lambda t, m, c, **kw: L.aggregate(t["advantages"], m, normalizer=c, **kw), 3.0),
}
_LOSS_NAMES = {"policy_loss": "clip", "value_loss": "clip", "entropy_bonus": "coef", "kl_loss": "coef",
               "kl_penalized_rewards": "coef", "aggregate": "normalizer"}


@pytest.mark.parametrize("fn", list(_LOSS_FNS))
@given(data=st.data())
def test_losses_keep_the_contract(fn, data):
    case = Case(data)
    t = _loss_tensors(case)
    call, good = _LOSS_FNS[fn]
    bad = data.draw(st.booleans(), label="bad_coef")
    coef = data.draw(st.sampled_from(_BAD_NUMBERS), label="coef") if bad else good
    kw: dict[str, Any] = {}
    if fn != "kl_penalized_rewards":
        kw["global_seqs"] = data.draw(st.sampled_from([None, None, 2.0, 0.0, -1.0, _NAN]), label="global_seqs")
        key = "mode" if fn == "aggregate" else "agg_mode"
        kw[key] = data.draw(st.sampled_from(L.AGG_MODES + ("token_mean",)), label="agg_mode")
    if case.container != "tensor":
        odd = data.draw(st.sampled_from(sorted(t)), label="odd_arg")
        t[odd] = case.convert(t[odd])
    names = {"logprobs", "old_logprobs", "advantages", "values", "returns", "entropy", "loss", "rewards",
             "ref_logprobs", "mask", "mode", "agg_mode", "global_seqs", _LOSS_NAMES[fn]}
    gs = kw.get("global_seqs")
    finite = (case.finite and not bad and case.container == "tensor" and gs in (None, 2.0)
              and kw.get("mode", kw.get("agg_mode")) != "token_mean")
    check_call(f"{fn}", lambda: call(t, case.mask, coef, **kw),
               lambda: call({k: case.clean(v) for k, v in t.items()}, case.mask, coef, **kw),
               names=names, must_be_finite=finite, must_raise=_is_nan(coef) or _is_nan(gs))


@given(data=st.data())
def test_kl_estimators_are_local(data):
    # no mask: each output element depends only on the same element of the inputs, so the
    # poisoned positions ("masked out" here) must leave every other element unchanged
    case = Case(data)
    est = data.draw(st.sampled_from(KL_ESTIMATORS + ("k4",)), label="estimator")
    clamp = data.draw(st.sampled_from([None, None, 20.0, 1e9, 0.0, -1.0, _NAN, _INF]), label="log_ratio_clamp")
    lp, ref = case.tensor(low=-3.0, high=-0.05), case.tensor(low=-3.0, high=-0.05)

    def call(a, b):
        out = L.kl_estimate(a, b, est, log_ratio_clamp=clamp)
        return torch.where(case.keep, out, torch.zeros((), dtype=out.dtype))

    check_call(f"kl_estimate({est!r})", lambda: call(lp, ref), lambda: call(case.clean(lp), case.clean(ref)),
               names={"logprobs", "ref_logprobs", "estimator", "log_ratio_clamp"},
               must_be_finite=case.finite and clamp in (None, 20.0, 1e9, _INF), must_raise=_is_nan(clamp))


# ------------------------------------------------------------------ masked statistics and whitening

_STATS = {"masked_sum": R.masked_sum, "masked_mean": R.masked_mean, "masked_var": R.masked_var,
          "masked_std": R.masked_std}


@pytest.mark.parametrize("fn", [*_STATS, "whiten"])
@given(data=st.data())
def test_masked_statistics_keep_the_contract(fn, data):
    case = Case(data)
    x = case.tensor()
    allow = data.draw(st.booleans(), label="allow_nonfinite")
    eps = data.draw(st.sampled_from([1e-8, 1e-8, 0.0, -1.0, _NAN]), label="eps")
    if case.container != "tensor":
        x = case.convert(x)

    def call(v):
        if fn == "whiten":
            return R.whiten(v, case.mask, eps=eps, allow_nonfinite=allow)
        return _STATS[fn](v, case.mask)

    bad_eps = fn == "whiten" and (eps < 0 or _is_nan(eps))
    check_call(fn, lambda: call(x), lambda: call(case.clean(x)), names={"x", "mask", "eps", "allow_nonfinite"},
               must_be_finite=case.finite and case.container == "tensor" and fn != "whiten" or
               (fn == "whiten" and case.finite and eps == 1e-8 and case.container == "tensor"),
               must_raise=bad_eps)


# ------------------------------------------------------------------ compute_advantages_unified (lists, NumPy)

@given(data=st.data())
def test_compute_advantages_unified_keeps_the_contract(data):
    seed = data.draw(st.integers(0, 2**16), label="seed")
    gen = torch.Generator().manual_seed(seed)
    n = data.draw(st.integers(1, 3), label="n_seqs")
    poison = data.draw(st.sampled_from([None, _NAN, _INF]), label="poison")
    allow = data.draw(st.booleans(), label="allow_nonfinite")
    containers = [data.draw(st.sampled_from(["tensor", "numpy", "list", "int_numpy", "str"]), label="container")
                  for _ in range(n)]
    dicts, keeps = [], []
    for i in range(n):
        T = data.draw(st.integers(0, 3), label="T")
        keep = torch.rand(T, generator=gen) < 0.7
        r, v = torch.randn(T, generator=gen), torch.randn(T, generator=gen)
        if poison is not None and T:
            r, v = torch.where(keep, r, poison), torch.where(keep, v, poison)
        conv = {"tensor": lambda x: x, "numpy": lambda x: x.numpy(), "list": lambda x: x.tolist(),
                "int_numpy": lambda x: torch.nan_to_num(x).numpy().astype(np.int64) if x.is_floating_point() else x.numpy(),
                "str": lambda x: "abc"}[containers[i]]
        dicts.append({"rewards": conv(r), "values": conv(v), "action_mask": conv(keep)})
        keeps.append(keep)

    def zeroed(d, keep):
        out = dict(d)
        for k in ("rewards", "values"):
            x = d[k]
            if isinstance(x, torch.Tensor):
                out[k] = torch.where(keep, x, torch.zeros(()))
            elif isinstance(x, np.ndarray) and x.dtype.kind == "f":
                out[k] = np.where(keep.numpy(), x, 0.0)
            elif isinstance(x, list):
                out[k] = [a if kk else 0.0 for a, kk in zip(x, keep.tolist(), strict=True)]
        return out

    def run(ds):
        res = compute_advantages_unified([dict(d) for d in ds], method="gae", gamma=0.9, lamda=0.95,
                                         allow_nonfinite=allow)
        return [{"advantages": d["advantages"], "returns": d["returns"]} for d in res]

    check_call("compute_advantages_unified", lambda: run(dicts),
               lambda: run([zeroed(d, k) for d, k in zip(dicts, keeps, strict=True)]),
               names={"data_list", "rewards", "values", "action_mask", "mask"},
               must_be_finite=poison is None)


# ------------------------------------------------------------------ pareto

_PARETO = {
    "dominance_ranks": lambda p, ref: P.dominance_ranks(p),
    "pareto_front_mask": lambda p, ref: P.pareto_front_mask(p),
    "crowding_distance": lambda p, ref: P.crowding_distance(p),
    "hypervolume": lambda p, ref: P.hypervolume(p, ref),
    "hypervolume_contributions": lambda p, ref: P.hypervolume_contributions(p, ref),
    "nadir_reference_point": lambda p, ref: P.nadir_reference_point(p),
    "weighted_sum": lambda p, ref: P.weighted_sum(p, torch.as_tensor(ref, dtype=torch.float32)),
    "tchebycheff": lambda p, ref: P.tchebycheff(p, torch.ones(len(ref)), torch.as_tensor(ref, dtype=torch.float32)),
}
_PARETO_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.bool)


def _no_nan(out: Any) -> str | None:
    return None if all(not bool(torch.isnan(x).any()) for x in _leaves(out) if x.is_floating_point()) else \
        "NaN in the result of finite points"


@pytest.mark.parametrize("fn", list(_PARETO))
@given(data=st.data())
def test_pareto_functions_keep_the_contract(fn, data):
    seed = data.draw(st.integers(0, 2**16), label="seed")
    gen = torch.Generator().manual_seed(seed)
    n, m = data.draw(st.integers(0, 5), label="n"), data.draw(st.integers(0, 3), label="m")
    dtype = data.draw(st.sampled_from(_PARETO_DTYPES), label="dtype")
    one_d = data.draw(st.booleans(), label="one_d") and data.draw(st.booleans())
    poison = data.draw(st.sampled_from([None, None, _NAN, _INF]), label="poison")
    container = data.draw(st.sampled_from(["tensor", "tensor", "numpy", "list"]), label="container")
    ref_kind = data.draw(st.sampled_from(["ok", "ok", "nan", "short"]), label="ref")
    x = torch.randn((m,) if one_d else (n, m), generator=gen, dtype=torch.float64) * 3
    if poison is not None and x.numel():
        x.view(-1)[0] = poison
    if dtype == torch.bool:
        pts = x > 0
    elif not dtype.is_floating_point:
        pts = x.round().to(dtype)
    else:
        pts = x.to(dtype)
    given_pts: Any = {"tensor": pts, "numpy": pts.numpy(), "list": pts.tolist()}[container]
    ref = {"ok": [-20.0] * m, "nan": [_NAN] * m, "short": [-20.0] * max(m - 1, 0)}[ref_kind]

    def agrees(out):
        # the same points as float64 NumPy (or a float64 tensor for the torch-only scalarizers)
        if not (pts.is_floating_point() and bool(torch.isfinite(pts).all())):
            return None
        other = pts.double() if fn in ("weighted_sum", "tchebycheff") else pts.double().numpy()
        ref_out = _PARETO[fn](other, ref)
        a, b = _leaves(out), _leaves(ref_out)
        if len(a) != len(b) or any(u.shape != w.shape for u, w in zip(a, b, strict=True)):
            return "the result's shape depends on the container"
        for u, w in zip(a, b, strict=True):
            if not np.allclose(u.double().numpy(), w.double().numpy(), rtol=1e-2, equal_nan=False):
                return f"the result depends on the container or dtype: {u} vs {w}"
        return _no_nan(out)

    check_call(fn, lambda: _PARETO[fn](given_pts, ref), names={"points", "objectives", "ref_point", "weights",
                                                                 "ideal", "n", "m"}, check=agrees)


@given(data=st.data())
def test_archive_keeps_the_contract(data):
    m = data.draw(st.sampled_from([2, 2, 3, 0, -1, 2.5, _NAN, "2", np.int64(2), True]), label="num_objectives")
    cap = data.draw(st.sampled_from([2, 3, 0, 1.5, np.int32(2)]), label="capacity")
    names = {"num_objectives", "capacity", "point", "step"}
    try:
        state = P.archive_init(m, cap)
    except (TypeError, ValueError) as e:
        record_error("archive_init", e, names)
        return
    OUTCOMES["correct"] += 1
    for step in range(data.draw(st.integers(1, 4), label="n_points")):
        kind = data.draw(st.sampled_from(["list", "numpy", "tensor", "nan", "short", "bool"]), label="point")
        k = state.num_objectives
        vals = [data.draw(st.floats(-5, 5), label="v") for _ in range(k)]
        point: Any = {"list": vals, "numpy": np.array(vals), "tensor": torch.tensor(vals),
                      "nan": [_NAN] * k, "short": vals[:-1], "bool": np.array(vals) > 0}[kind]

        def update(state=state, point=point, step=step):
            return P.archive_update(state, point, step=step)

        def valid(new, k=k):
            pts = new.points
            if len(new) > new.capacity or not np.isfinite(pts).all() or pts.shape[1:] != (k,):
                return f"invalid archive {pts}"
            return None

        if check_call("archive_update", update, names=names, check=valid, must_raise=kind == "nan") == "correct":
            state = update()


_KL_BAD = (0.02, 0.0, _NAN, _INF, -1.0, np.float32(0.02), torch.tensor(0.02), torch.tensor([0.02]),
           torch.tensor([0.1, 0.2]), "x")


@given(data=st.data())
def test_kl_controllers_keep_the_contract(data):
    ctype = data.draw(st.sampled_from(list(Ctl.CONTROLLER_TYPES) + ["bogus"]), label="controller_type")
    from rl2fx.control.kl import DEFAULTS

    key, value = _bad_hyper(data, {k: v for k, v in DEFAULTS.items() if v is not None})
    params = {} if key is None else {key: value}
    names = {"controller_type", "kl", "step", *DEFAULTS}
    try:
        state = Ctl.kl_init(ctype, **params)
    except (TypeError, ValueError) as e:
        record_error("kl_init", e, names)
        return
    check_call("kl_init", lambda: state, names=names, must_raise=_is_nan(value))
    kl = data.draw(st.sampled_from(_KL_BAD), label="kl")
    step = data.draw(st.sampled_from([0, 5, -1, 2.5, np.int64(3)]), label="step")

    def valid(s):
        ok = math.isfinite(s.coef) and s.min_coef - 1e-12 <= s.coef <= s.max_coef + 1e-12
        return None if ok else f"coef {s.coef} outside [{s.min_coef}, {s.max_coef}]"

    nan_kl = isinstance(kl, float) and not math.isfinite(kl)
    check_call(f"kl_update({ctype})", lambda: Ctl.kl_update(state, kl, step), names=names, check=valid,
               must_raise=nan_kl)


@given(data=st.data())
def test_lagrangian_and_batch_size_keep_the_contract(data):
    import inspect

    lag_defaults = {k: p.default for k, p in inspect.signature(Ctl.lagrangian_init).parameters.items()}
    key, value = _bad_hyper(data, lag_defaults)
    names = {"kl", "entropy", *lag_defaults}
    try:
        lag = Ctl.lagrangian_init(**({} if key is None else {key: value}))
    except (TypeError, ValueError) as e:
        record_error("lagrangian_init", e, names)
    else:
        check_call("lagrangian_init", lambda: lag, names=names, must_raise=_is_nan(value))
        kl, ent = data.draw(st.sampled_from(_KL_BAD + (None,)), label="kl"), data.draw(
            st.sampled_from(_KL_BAD + (None,)), label="entropy")

        def valid(s):
            ms = (s.kl_multiplier, s.entropy_multiplier)
            return None if all(math.isfinite(x) and x >= 0 for x in ms) else f"multipliers {ms}"

        nonfinite = any(isinstance(x, float) and not math.isfinite(x) for x in (kl, ent))
        check_call("lagrangian_update", lambda: Ctl.lagrangian_update(lag, kl=kl, entropy=ent), names=names,
                   check=valid, must_raise=nonfinite)

    bs_defaults = {k: p.default for k, p in inspect.signature(Ctl.batch_size_init).parameters.items()}
    key, value = _bad_hyper(data, bs_defaults)
    names = {"memory_usage", "training_time", "success", *bs_defaults}
    try:
        bs = Ctl.batch_size_init(**({} if key is None else {key: value}))
    except (TypeError, ValueError) as e:
        record_error("batch_size_init", e, names)
        return
    check_call("batch_size_init", lambda: bs, names=names, must_raise=_is_nan(value))
    mem = data.draw(st.sampled_from([0.5, 0.95, 0.0, 1.5, -0.1, _NAN, np.float32(0.5), torch.tensor(0.5)]),
                    label="memory_usage")
    t = data.draw(st.sampled_from([1.0, 0.0, -1.0, _INF, _NAN, np.float64(2.0)]), label="training_time")
    ok = data.draw(st.sampled_from([True, False, np.True_, np.False_, 1, "yes", None]), label="success")

    def valid(s):
        good = isinstance(s.batch_size, int) and s.min_batch_size <= s.batch_size <= s.max_batch_size
        return None if good else f"batch size {s.batch_size!r} outside [{s.min_batch_size}, {s.max_batch_size}]"

    check_call("batch_size_update", lambda: Ctl.batch_size_update(bs, mem, t, ok), names=names, check=valid,
               must_raise=_is_nan(mem) or _is_nan(t))


# ------------------------------------------------------------------ exhaustive runs

@pytest.mark.slow
@settings(max_examples=1000)
@given(data=st.data())
def test_every_estimator_and_loss_keeps_the_contract_exhaustively(data):
    # one property over every registered estimator and policy loss, many more examples
    kind = data.draw(st.sampled_from(["estimator", "policy_loss"]), label="kind")
    if kind == "estimator":
        name = data.draw(st.sampled_from(list_estimators()), label="name")
        test_estimators_keep_the_contract.hypothesis.inner_test(name=name, data=data)
    else:
        name = data.draw(st.sampled_from(L.list_policy_losses()), label="name")
        test_policy_losses_keep_the_contract.hypothesis.inner_test(name=name, data=data)


def test_advantages_names_a_numpy_input():
    # the retrace wrapper read values.dtype before any check: an error about a numpy dtype
    e = torch.zeros(1, 2)
    with pytest.raises(TypeError, match="values must be a torch tensor"):
        R.advantages("retrace", rewards=e, values=e.numpy(), log_rhos=e)


def test_retrace_estimator_names_the_callers_argument():
    # the error named q_values, an argument the caller of advantages("retrace") never passed
    v = torch.tensor([[0.0, float("nan")]])
    with pytest.raises(ValueError, match="^values contains"):
        R.advantages("retrace", rewards=torch.zeros(1, 2), values=v, log_rhos=torch.zeros(1, 2))


@pytest.mark.parametrize("mode", L.AGG_MODES)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_aggregate_checks_normalizer_in_every_mode(mode, value):
    # normalizer was checked only in seq-mean-token-sum-norm, and inf passed there (a loss of 0)
    with pytest.raises(ValueError, match="normalizer"):
        L.aggregate(torch.ones(2, 3), None, mode, normalizer=value)


def test_half_precision_losses_take_large_clip_values():
    # the clamp bound 1e9 does not fit in float16: RuntimeError from inside value_loss
    x = torch.zeros(1, 2, dtype=torch.float16)
    assert torch.isfinite(L.value_loss(x, x, x, clip=1e9)[0])
    assert torch.isfinite(L.policy_loss(x, x, x, clip_high=1e9)[0])


def test_clip_cov_names_both_bounds():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"cov_high must be in \[cov_low, inf\] = \[1000000000.0, inf\], got 5.0"):
        L.compute_policy_loss("clip_cov", x, x, x, params={"cov_low": 1e9})


@pytest.mark.parametrize("kw", [{"log_ratio_clamp": 1e9}, {"value_clamp": 1e9}])
def test_kl_estimate_in_half_precision_takes_large_clamps(kw):
    # RuntimeError "value cannot be converted to type c10::Half without overflow"
    x = torch.zeros(1, 2, dtype=torch.float16)
    out = L.kl_estimate(x, x, "k3", **kw)
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())
