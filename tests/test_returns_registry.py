"""The estimator registry: a user's estimator works by name everywhere the built-ins do."""

import pytest
import torch

from rl2fx.returns import (
    advantages,
    check_hyperparameters,
    compute_advantages_unified,
    get_estimator,
    list_estimators,
    register_estimator,
    unregister_estimator,
)


@pytest.fixture
def user_estimator():
    @register_estimator("scaled_baseline", needs_values=False, defaults={"scale": 2.0})
    def scaled_baseline(rewards: torch.Tensor, *, mask: torch.Tensor | None = None, scale: float = 1.0,
                        shift: float = 0.0) -> torch.Tensor:
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        adv = scale * (rewards - rewards.mean()) + shift
        return adv if mask is None else torch.where(mask.bool(), adv, 0.0)

    yield scaled_baseline
    unregister_estimator("scaled_baseline")


def test_signature_is_split_into_inputs_hyperparameters_and_defaults(user_estimator):
    spec = get_estimator("scaled_baseline")
    assert spec.inputs == ("rewards", "mask")
    assert spec.hyperparameters == ("scale", "shift")
    assert dict(spec.defaults) == {"scale": 2.0, "shift": 0.0}  # registration defaults win
    assert spec.required == ("rewards",)
    assert not spec.needs_values
    assert "scaled_baseline" in list_estimators()


def test_user_estimator_runs_by_name(user_estimator):
    r = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    out = advantages("scaled_baseline", rewards=r, values=torch.ones_like(r), group_size=2)  # unread inputs ignored
    assert torch.equal(out["advantages"], 2.0 * (r - r.mean()))
    # no returns given and no values read: the reward-to-go
    assert torch.equal(out["returns"], torch.tensor([[1.0, 1.0], [3.0, 3.0]]))
    with pytest.raises(ValueError, match=r"does not take argument\(s\) \['scael'\]"):
        advantages("scaled_baseline", rewards=r, scael=1.0)


def test_user_estimator_in_compute_advantages_unified(user_estimator):
    data = [{"rewards": torch.tensor([0.0, 1.0])}, {"rewards": torch.tensor([3.0])}]
    out = compute_advantages_unified(data, method="scaled_baseline", scale=1.0)
    assert out[1]["advantages"].shape == (1,)


def test_check_hyperparameters_uses_the_estimators_own_checks(user_estimator):
    check_hyperparameters("scaled_baseline", {"scale": 3.0})
    with pytest.raises(ValueError, match="did you mean 'scale'"):
        check_hyperparameters("scaled_baseline", {"scael": 3.0})
    with pytest.raises(ValueError, match="scale must be > 0, got -1.0"):
        check_hyperparameters("scaled_baseline", {"scale": -1.0})
    with pytest.raises(ValueError, match="scale must be finite"):
        check_hyperparameters("scaled_baseline", {"scale": float("nan")})


@pytest.mark.parametrize("name", ["gae", "vtrace", "retrace", "clipped_is", "multistep", "grpo", "rloo", "remax",
                                  "opo", "reinforce_pp"])
def test_builtin_defaults_pass_their_own_checks(name):
    check_hyperparameters(name, {})


def test_registration_errors():
    with pytest.raises(ValueError, match="must be a Python identifier"):
        register_estimator("my-est", needs_values=False)
    with pytest.raises(TypeError, match=r"\*args/\*\*kwargs hide"):
        register_estimator("bad_kwargs", needs_values=False)(lambda rewards, **kw: rewards)
    with pytest.raises(ValueError, match="has no 'values' parameter"):
        register_estimator("no_values", needs_values=True)(lambda rewards: rewards)
    with pytest.raises(ValueError, match=r"defaults \['gama'\] are not hyperparameters"):
        register_estimator("typo_default", needs_values=False, defaults={"gama": 1.0})(
            lambda rewards, gamma=1.0: rewards)
    with pytest.raises(ValueError, match="'gae' is already registered"):
        register_estimator("gae", needs_values=False)(lambda rewards: rewards)
    with pytest.raises(ValueError, match="unknown estimator 'gea'; did you mean 'gae'"):
        get_estimator("gea")


def test_docs_estimator_table_is_generated_from_the_registry(tmp_path):
    import difflib
    import shutil
    from pathlib import Path

    from rl2fx.returns.registry import write_estimator_table

    docs = Path(__file__).resolve().parents[1] / "docs" / "returns.md"
    copy = tmp_path / "returns.md"
    shutil.copy(docs, copy)
    if write_estimator_table(copy):
        diff = "".join(difflib.unified_diff(docs.read_text().splitlines(True), copy.read_text().splitlines(True),
                                            "docs/returns.md", "generated"))
        pytest.fail("docs/returns.md's estimator table differs from the registry's; regenerate it from the "
                    "repository root with\n  python -c \"from rl2fx.returns.registry import write_estimator_table "
                    f"as w; w()\"\n{diff}")


def test_estimator_table_lists_a_user_estimator(user_estimator):
    from rl2fx.returns.registry import estimator_table

    row = estimator_table(["scaled_baseline"]).splitlines()[2]
    assert row.startswith("| `scaled_baseline` | no | `rewards` | `mask` | `scale=2.0`, `shift=0.0` |")
