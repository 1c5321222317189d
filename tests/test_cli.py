"""The ``rl2fx`` command: help, one-line errors with exit status 2, and each sub-command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rl2fx.cli import BENCH_AREAS, main

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["experiment_tracking.enabled=false", "memory_optimization.profiling.enabled=false",
         "trainer.progress_bar=false", "data.prompts_per_rollout=2", "data.responses_per_prompt=4"]


def _run(args, cwd=ROOT, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rl2fx.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


HELP = {
    (): ["train", "tune", "ablate", "bench", "config"],
    ("train",): ["--config", "overrides"],
    ("tune",): ["--config", "overrides", "hyperopt"],
    ("ablate",): ["--seeds", "--out", "outputs/ablations", "--arms", "--workers", "--config", "estimators", "kl",
                  "pareto"],
    ("bench",): ["--quick", "--out", "outputs/benchmarks", *BENCH_AREAS],
    ("config",): ["show"],
    ("config", "show"): ["--config", "overrides", "--resolve"],
}


@pytest.mark.parametrize("cmd", list(HELP), ids=lambda c: " ".join(c) or "root")
def test_help_lists_options(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rl2fx")
    for word in HELP[cmd]:
        assert word in out, (cmd, word)


@pytest.mark.parametrize("argv, needle", [
    (["ablate", "estimatorz"], "estimatorz"),
    (["trian"], "trian"),
    (["config", "show", "actor.lrr=1e-5"], "actor.lrr"),
    (["config", "show", "actor.lr=abc"], "actor.lr"),
    (["config", "show", "adv.estimator=vtrce"], "vtrce"),
    (["config", "show", "adv.gamma=2"], "adv.gamma"),
    (["config", "show", "actor.lr"], "actor.lr"),
    (["config", "show", "--config", "nope.yaml"], "nope.yaml"),
    (["train", "--config", "does_not_exist"], "does_not_exist"),
    (["ablate", "kl", "--seeds", "0"], "seeds"),
    (["ablate", "kl", "--arms", "pdi"], "pdi"),
    (["ablate", "kl", "trainer.total_steps=0"], "trainer.total_steps"),
    (["ablate", "kl", "--seeds", "x"], "'x'"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys, tmp_path):
    if argv[0] == "ablate":
        argv = [*argv, "--out", str(tmp_path / "abl")]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rl2fx") and "error:" in lines[0] and needle in lines[0]
    assert not (tmp_path / "abl").exists()


def test_config_show_reflects_overrides(capsys):
    assert main(["config", "show", "--config", "demo", "adv.estimator=rloo", "actor.kl.adaptive_kl.target_kl=0.25",
                 "multi_objective.objectives=[reward,entropy]",
                 "multi_objective.objective_weights={reward: 1.0, entropy: 0.1}"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["adv"]["estimator"] == "rloo"
    assert cfg["actor"]["kl"]["adaptive_kl"]["target_kl"] == 0.25
    assert cfg["multi_objective"]["objectives"] == ["reward", "entropy"]
    assert cfg["multi_objective"]["objective_weights"] == {"reward": 1.0, "entropy": 0.1}
    assert cfg["task"]["mode"] == "reverse" and cfg["actor"]["lr"] == 1e-3  # the demo file's values
    assert main(["config", "show"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["actor"]["lr"] == 1e-6  # the spec's default


def test_train_runs_and_prints_the_summary(tmp_path, capsys):
    assert main(["train", "--config", "demo", "trainer.total_steps=2", f"trainer.output_dir={tmp_path}", *QUIET]) == 0
    out = capsys.readouterr().out
    assert "rl2fx training summary" in out and "steps: 2" in out
    assert (tmp_path / "checkpoints" / "step-000002" / "state.pt").exists()


def test_tune_runs_and_resumes(tmp_path, capsys):
    save = tmp_path / "study"
    args = ["tune", "--config", "demo", "trainer.total_steps=2", "hyperopt.n_trials=2", f"hyperopt.save_dir={save}",
            f"trainer.output_dir={tmp_path / 'out'}", *QUIET]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "best 2 of 2 trials (0 failed, 0 pruned)" in out and "best parameters:" in out
    assert "trainer.update_epochs" in out and "actor.kl.adaptive_kl.initial_coef" in out
    lines = (save / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(t)["state"] == "complete" for t in lines)
    summary = json.loads((save / "best_params.json").read_text())
    assert summary["n_complete"] == 2 and summary["objective_name"] == "reward"
    # rerunning with a larger budget continues the same study
    assert main([a.replace("n_trials=2", "n_trials=3") for a in args]) == 0
    capsys.readouterr()
    trials = [json.loads(t) for t in (save / "trials.jsonl").read_text().splitlines()]
    assert [t["number"] for t in trials] == [0, 1, 2]
    assert trials[:2] == [json.loads(t) for t in lines]


def test_console_module_entry_point(tmp_path):
    """``python -m rl2fx.cli`` (what the ``rl2fx`` console script calls) in a fresh interpreter."""
    r = _run(["config", "show", "--config", "demo", "trainer.total_steps=7"])
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["trainer"]["total_steps"] == 7
    r = _run(["config", "show", "trainer.totl_steps=7"])
    assert r.returncode == 2
    assert r.stderr.strip() == ("rl2fx: error: unknown config key 'trainer.totl_steps'; "
                                "did you mean 'trainer.total_steps'?")
    r = _run(["ablate", "nope"])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "'nope'" in r.stderr


def test_bench_quick_runs_one_area_and_writes_under_outputs(tmp_path):
    # from a copy of the scripts, so that a regression writing to benchmarks/results touches no tracked file
    (tmp_path / "benchmarks").mkdir()
    for name in ("control.py", "_results.py"):
        shutil.copy(ROOT / "benchmarks" / name, tmp_path / "benchmarks" / name)
    r = _run(["bench", "control", "--quick"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "== control" in r.stdout and "--out outputs/benchmarks" in r.stdout
    assert json.loads((tmp_path / "outputs" / "benchmarks" / "control.json").read_text())
    assert not (tmp_path / "benchmarks" / "results").exists()
    # the committed results are rewritten only when asked for, by the same flag
    r = _run(["bench", "control", "--quick", "--out", "benchmarks/results"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "benchmarks" / "results" / "control.json").read_text())


def test_default_output_folders_are_under_outputs():
    from rl2fx.cli import BENCH_OUT, build_parser
    from rl2fx.trainer.ablate_names import DEFAULT_OUT

    parser = build_parser()
    assert parser.parse_args(["ablate", "kl"]).out == DEFAULT_OUT == "outputs/ablations"
    assert parser.parse_args(["bench"]).out == BENCH_OUT == "outputs/benchmarks"
    assert parser.parse_args(["ablate", "kl", "--out", "docs/ablations"]).out == "docs/ablations"


def test_benchmark_out_must_be_a_folder(tmp_path):
    """The old ``--out file.json`` is refused at parse time (exit 2, one line), before any benchmark runs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "control.py"), "--out", "x.json"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--out takes a folder" in r.stderr and "'x.json'" in r.stderr
    assert list(tmp_path.iterdir()) == []


BENCH_SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", BENCH_SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_script_takes_out_dir_and_writes_through_the_helper(script):
    """Each script's JSON goes through benchmarks/_results.py (``--out DIR``, default outputs/benchmarks):
    no script opens its own path, so none can write to benchmarks/results by default."""
    text = script.read_text()
    assert "add_out_argument(" in text and "write_json(" in text, script.name
    assert "json.dumps(" not in text and "/ \"results\"" not in text and "benchmarks/results/" not in \
        text.split('"""', 2)[-1], script.name


def test_bench_outside_the_repository_is_a_one_line_error(tmp_path):
    r = _run(["bench", "control"], cwd=tmp_path)
    assert r.returncode == 2 and "no benchmark script" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_ablate_writes_the_table(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", "kl", "--seeds", "1", "--arms", "no_kl,exponential", "--workers", "1", "--out", str(out),
                 "trainer.total_steps=2", "data.prompts_per_rollout=2"]) == 0
    text = capsys.readouterr().out
    assert "| no_kl |" in text and "| exponential |" in text
    assert {p.name for p in out.iterdir()} == {"kl.md", "kl.json", "kl.png"}
