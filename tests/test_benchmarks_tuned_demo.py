"""Smoke test of ``benchmarks/tuned_demo.py``: a one-trial study re-run on fresh seeds, 2 steps per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_best_trial_against_shipped_and_equal_wall_time(tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    trials = [{"number": 0, "state": "complete", "value": 0.2, "params": {"actor.clip": 0.1}},
              {"number": 1, "state": "complete", "value": 0.3, "params": {"actor.clip": 0.3}},
              {"number": 2, "state": "failed", "value": None, "params": {"actor.clip": 0.2}}]
    (study / "trials.jsonl").write_text("".join(json.dumps(t) + "\n" for t in trials))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tuned_demo.py"), "--study", str(study), "--seeds",
                    "3,4", "--steps", "2", "--out", str(tmp_path / "out")], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=600)
    out = json.loads((tmp_path / "out" / "tuned_demo.json").read_text())
    assert out["best_trial"]["number"] == 1 and (tmp_path / "out" / "tuned_demo.png").exists()
    names = [s["arm"] for s in out["summary"]]
    assert names[:2] == ["shipped demo", "tuned (trial 1)"] and names[2].startswith("shipped demo, equal wall time")
    runs = {a: [r for r in out["runs"] if r["arm"] == a] for a in names}
    assert all(sorted(r["seed"] for r in rs) == [3, 4] for rs in runs.values())
    assert all(r["params"] == {"actor.clip": 0.3} for r in runs[names[1]])
    eq = out["tuned_minus_shipped_equal_time"]["steps"]
    walls = [sum(r["wall_time_s"] for r in runs[a]) for a in names[:2]]
    assert eq == round(2 * walls[1] / walls[0]) and all(r["steps"] == eq for r in runs[names[2]])
    mean = [sum(r["reward_end"] for r in runs[a]) / 2 for a in names]
    assert out["tuned_minus_shipped"]["diff"] == pytest.approx(mean[1] - mean[0])
    assert out["tuned_minus_shipped_equal_time"]["diff"] == pytest.approx(mean[1] - mean[2])
