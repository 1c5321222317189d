"""``rl2fx.trainer.ablate``: arms, outputs (table, JSON, plot), determinism, the process pool."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from rl2fx.returns import get_estimator, list_estimators
from rl2fx.trainer.ablate import (
    ABLATIONS,
    DEFAULT_STEPS,
    _command,
    _holm,
    _run_overrides,
    _welch,
    ablation_arms,
    run_ablation,
    run_one,
)
from rl2fx.trainer.config import ConfigError, load_config, trainer_supports

TINY = ["trainer.total_steps=2", "data.prompts_per_rollout=2", "data.responses_per_prompt=4"]


def test_every_arm_of_every_ablation_is_a_valid_config():
    for name in ABLATIONS:
        arms = ablation_arms(name, total_steps=DEFAULT_STEPS[name])
        names = [a for a, _ in arms]
        assert len(set(names)) == len(names)
        for _arm, over in arms:
            cfg = load_config("demo", overrides=_run_overrides(over, {}, 0, DEFAULT_STEPS[name], "x"))
            assert cfg.trainer.total_steps == DEFAULT_STEPS[name]
            assert not cfg.experiment_tracking.enabled and not cfg.memory_optimization.profiling.enabled
            assert cfg.trainer.num_threads == 1 and not cfg.trainer.progress_bar


def test_estimator_arms_cover_every_estimator_the_trainer_accepts():
    arms = dict(ablation_arms("estimators", total_steps=10))
    assert list(arms) == [e for e in list_estimators() if trainer_supports(e)]
    # an estimator needing an input the trainer cannot give is no arm, and the config names why
    assert "optimal_token_baseline" in list_estimators() and "optimal_token_baseline" not in arms
    with pytest.raises(ConfigError, match=r"adv.estimator.*sum_pi_squared"):
        load_config("demo", overrides={"adv.estimator": "optimal_token_baseline"})
    # the critic follows the registry: value-reading estimators (clipped_is included) get one by default
    for name in ("gae", "clipped_is"):
        cfg = load_config("demo", overrides=arms[name])
        assert cfg.critic.enabled is None and get_estimator(name).needs_values


def test_kl_arms_vary_the_controller():
    arms = dict(ablation_arms("kl", total_steps=123))
    ctl = {a: o.get("actor.kl.adaptive_kl.controller_type") for a, o in arms.items()}
    assert {"fixed", "exponential", "linear", "pid", "schedule", "proportional"} <= set(ctl.values())
    assert arms["no_kl"]["actor.kl.adaptive_kl.enabled"] is False and arms["no_kl"]["actor.kl.coef"] == 0.0
    assert arms["schedule"]["actor.kl.adaptive_kl.schedule_steps"] == 123
    assert arms["lagrangian"]["actor.kl.constraint_optimization.enabled"] is True


def test_bad_input_is_rejected_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="ablation name must be one of"):
        run_ablation("nope", out_dir=tmp_path)
    with pytest.raises(ValueError, match="seeds must be"):
        run_ablation("kl", seeds=0, out_dir=tmp_path)
    with pytest.raises(ValueError, match="arms must be a non-empty subset"):
        run_ablation("kl", arms=["exponentiall"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="actor.lrr"):
        run_ablation("kl", overrides=["actor.lrr=1"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="'trainer.seed' is set by rl2fx ablate"):
        run_ablation("kl", overrides=["trainer.seed=3"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="trainer.total_steps"):
        run_ablation("kl", overrides=["trainer.total_steps=0"], out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def _table_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("arm",) and not cells[0].startswith("-"):
            rows[cells[0]] = cells[1:]
    return rows


def test_outputs_and_table_match_json(tmp_path):
    out = run_ablation("pareto", seeds=2, out_dir=tmp_path, overrides=TINY,
                       arms=["ppo_loss", "tchebycheff"], workers=1, show_progress_bar=False)
    md = (tmp_path / "pareto.md").read_text()
    js = json.loads((tmp_path / "pareto.json").read_text())
    png = (tmp_path / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert js["summary"] == json.loads(json.dumps(out["summary"]))
    assert len(js["runs"]) == 4 and {r["seed"] for r in js["runs"]} == {0, 1}
    assert "rl2fx ablate pareto --seeds 2 --arms ppo_loss,tchebycheff --workers 1" in md
    assert f"--out {tmp_path}" in md and "trainer.total_steps=2" in md
    assert f"**{js['chance_reward']:.3f}**" in md
    rows = _table_rows(md)
    assert list(rows) == ["ppo_loss", "tchebycheff"]
    for s in js["summary"]:
        runs = [r for r in js["runs"] if r["arm"] == s["arm"]]
        rewards = [r["reward_end"] for r in runs]
        # the summary is the mean and sample std of the per-run numbers ...
        assert s["reward_mean"] == pytest.approx(sum(rewards) / 2)
        assert s["reward_std"] == pytest.approx(abs(rewards[0] - rewards[1]) / math.sqrt(2))
        for r in runs:  # final reward = mean of the curve over the last min(window, steps) steps
            w = min(js["summary_window"], js["total_steps"])
            assert r["reward_end"] == pytest.approx(sum(r["reward_curve"][-w:]) / w)
            assert len(r["reward_curve"]) == 2 and r["overrides"]["trainer.seed"] == r["seed"]
        # ... and the table shows exactly those numbers
        reward, kl, wall = rows[s["arm"]]
        assert reward == f"{s['reward_mean']:.3f} ± {s['reward_std']:.3f}"
        assert kl == f"{s['kl_mean']:.3f} ± {s['kl_std']:.3f}"
        assert wall == f"{s['wall_time_mean_s']:.1f} ± {s['wall_time_std_s']:.1f}"
        m = re.match(r"([-\d.]+) ± ([\d.]+)", reward)
        assert float(m.group(1)) == pytest.approx(s["reward_mean"], abs=5e-4)
    assert js["runs"][0]["overrides"]["multi_objective.enabled"] is False
    assert js["runs"][-1]["overrides"]["multi_objective.pareto_method"] == "tchebycheff"


def test_default_folder_is_outputs_ablations_and_nothing_else_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = run_ablation("kl", seeds=1, arms=["exponential"], overrides=TINY, workers=1, show_progress_bar=False)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "outputs/ablations/kl.json", "outputs/ablations/kl.md", "outputs/ablations/kl.png"]
    assert "--out" not in out["command"]  # the default folder needs no flag to reproduce


def test_the_reproducing_command_names_a_non_default_folder():
    assert _command("kl", 3, "outputs/ablations", [], None, None, 2) == "rl2fx ablate kl"
    assert _command("kl", 3, "docs/ablations", [], None, None, 2) == "rl2fx ablate kl --out docs/ablations"


@pytest.mark.parametrize("name", ABLATIONS)
def test_shipped_pages_regenerate_only_with_an_explicit_out(name):
    """The command on each shipped page writes it back in place: it must name docs/ablations."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "ablations"
    command = json.loads((docs / f"{name}.json").read_text())["command"]
    assert command.startswith(f"rl2fx ablate {name}") and "--out docs/ablations" in command
    assert f"\n{command}\n" in (docs / f"{name}.md").read_text()


def test_same_seed_same_numbers_other_seed_other_numbers():
    over = _run_overrides({"adv.estimator": "grpo"}, dict(o.split("=") for o in TINY[1:]), 0, 3, "x")
    over.pop("trainer.output_dir")
    a, b = run_one("demo", over), run_one("demo", over)
    c = run_one("demo", {**over, "trainer.seed": 1, "model.seed": 1})
    for k in ("reward_curve", "kl_curve", "reward_end", "kl"):
        assert a[k] == b[k]
    assert a["kl_curve"] != c["kl_curve"]


@pytest.mark.slow  # two spawned interpreters import torch: ~15-30 s
def test_process_pool_matches_inline_run(tmp_path):
    kw = dict(seeds=1, overrides=TINY, arms=["no_kl", "pid"], show_progress_bar=False)
    pooled = run_ablation("kl", out_dir=tmp_path / "pool", workers=2, **kw)
    inline = run_ablation("kl", out_dir=tmp_path / "inline", workers=1, **kw)
    for p, i in zip(pooled["runs"], inline["runs"], strict=True):
        assert (p["arm"], p["seed"]) == (i["arm"], i["seed"])
        assert p["reward_curve"] == i["reward_curve"] and p["kl_curve"] == i["kl_curve"]
        assert p["torch_threads"] == 1


def test_a_failing_run_names_its_arm_and_seed(tmp_path):
    # passes the config validation (the directory exists), fails inside PPOTrainer (it holds no model)
    (tmp_path / "no_model").mkdir()
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"arm 'no_kl', seed 0 failed"):
        run_ablation("kl", seeds=1, arms=["no_kl"], out_dir=out, workers=1, show_progress_bar=False,
                     overrides=[f"actor.model_name={tmp_path / 'no_model'}"])
    assert not out.exists() or not list(out.iterdir())


def test_multi_turn_ablation_trains_on_the_shipped_task_with_one_model_per_seed(tmp_path):
    from transformers import AutoModelForCausalLM

    from rl2fx.envs_examples import higher_lower
    from rl2fx.trainer.ablate import _task_overrides

    over = [_task_overrides("multi_turn", s, tmp_path) for s in (0, 1)]
    assert over[0]["rollout.env_path"] == higher_lower.__file__
    assert over[0]["data.train_data_path"] == str(higher_lower.DATA) and over[0]["rollout.max_turns"] == 3
    a, b = (AutoModelForCausalLM.from_pretrained(o["actor.model_name"]) for o in over)
    assert not torch.equal(a.transformer.wte.weight, b.transformer.wte.weight)  # seed s's model is build_model(seed=s)
    assert torch.equal(a.transformer.wte.weight, higher_lower.build_model(higher_lower.build_tokenizer()).transformer.wte.weight)
    assert _task_overrides("kl", 0, tmp_path) == {}

    out = run_ablation("multi_turn", seeds=2, arms=["gae_critic", "grpo"], overrides=TINY, workers=1,
                       out_dir=tmp_path / "out", show_progress_bar=False)
    assert [(r["arm"], r["seed"]) for r in out["runs"]] == [("gae_critic", 0), ("gae_critic", 1), ("grpo", 0),
                                                            ("grpo", 1)]
    for r in out["runs"]:
        assert r["overrides"]["rollout.env_path"] == higher_lower.__file__ and len(r["reward_curve"]) == 2
        assert all(0.0 <= x <= 1.0 for x in r["reward_curve"])  # games won: the environment's rewards
    assert not Path(out["runs"][0]["overrides"]["actor.model_name"]).exists()  # the models' folder is removed
    assert "0.75" in (tmp_path / "out" / "multi_turn.md").read_text()


def test_welch_and_holm_match_their_definitions():
    from scipy import stats

    a, b = [0.30, 0.35, 0.41, 0.38], [0.20, 0.22, 0.31]
    d, half, p = _welch(a, b)
    # Welch (1947): t = d / sqrt(s_a^2/n_a + s_b^2/n_b), Welch-Satterthwaite degrees of freedom
    va = sum((x - sum(a) / 4) ** 2 for x in a) / 3 / 4
    vb = sum((x - sum(b) / 3) ** 2 for x in b) / 2 / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    se = math.sqrt(va + vb)
    assert d == pytest.approx(sum(a) / 4 - sum(b) / 3)
    assert p == pytest.approx(2 * stats.t.sf(abs(d) / se, df), rel=1e-9)
    assert half == pytest.approx(stats.t.ppf(0.975, df) * se, rel=1e-9)
    assert math.isnan(_welch([0.1], b)[2]) and math.isnan(_welch([0.2, 0.2], [0.2, 0.2])[2])
    # Holm: sorted p times (m - rank), running maximum, capped at 1; NaN (untested) kept out of m
    assert _holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adj = _holm([0.5, math.nan, 0.01])
    assert adj[0] == pytest.approx(0.5) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)


def test_estimator_page_tests_every_arm_against_the_configs_estimator(tmp_path):
    out = run_ablation("estimators", seeds=2, out_dir=tmp_path, overrides=TINY, arms=["rloo", "grpo", "gpg"],
                       workers=1, show_progress_bar=False)
    assert out["reference_arm"] == "grpo" and [c["arm"] for c in out["comparisons"]] == ["rloo", "gpg"]
    by_arm = {a: [r["reward_end"] for r in out["runs"] if r["arm"] == a] for a in ("rloo", "grpo", "gpg")}
    for c in out["comparisons"]:
        assert c["diff"] == pytest.approx(sum(by_arm[c["arm"]]) / 2 - sum(by_arm["grpo"]) / 2)
    md = (tmp_path / "estimators.md").read_text()
    assert "| arm | Δ reward vs grpo | 95% CI | p | p (Holm) |" in md and "Holm" in md


def test_estimator_planned_tests_pair_by_seed_and_isolate_the_corrections():
    from scipy import stats

    from rl2fx.trainer.ablate import _estimator_tests

    rewards = {"gae": [0.5, 0.6, 0.7], "td_lambda": [0.4, 0.5, 0.65], "retrace": [0.6, 0.7, 0.8],
               "clipped_is": [0.5, 0.6, 0.7], "grpo": [0.3, 0.45, 0.5], "rloo": [0.35, 0.4, 0.5],
               "grpo_passk": [0.0, 0.0, 0.0]}
    out = {"seeds": [0, 1, 2], "runs": [{"arm": a, "seed": s, "reward_end": x}
                                        for a, xs in rewards.items() for s, x in enumerate(xs)]}
    res = _estimator_tests(out)
    fam = res["family"]
    assert fam["value_arms"] == ["gae", "td_lambda", "retrace", "clipped_is"] and fam["free_arms"] == ["grpo", "rloo"]
    per_seed = [(rewards["gae"][s] + rewards["td_lambda"][s] + rewards["retrace"][s] + rewards["clipped_is"][s]) / 4
                - (rewards["grpo"][s] + rewards["rloo"][s]) / 2 for s in range(3)]
    assert fam["per_seed"] == pytest.approx(per_seed)
    assert fam["p"] == pytest.approx(stats.ttest_rel([sum(x) for x in zip(*[rewards[a] for a in fam["value_arms"]],
                                                                        strict=True)],
                                                     [2 * sum(x) for x in zip(rewards["grpo"], rewards["rloo"],
                                                                              strict=True)]).pvalue)
    assert [(c["arm"], c["base"]) for c in res["corrections"]] == [("retrace", "td_lambda"), ("clipped_is", "gae")]
    assert res["corrections"][1]["diff"] == 0.0 and res["corrections"][0]["diff"] == pytest.approx(0.55 / 3)
