"""Config and CLI edges (issue 24, item 8): each ends in one stderr line naming the file or key, exit status 2.

The CLI cases run ``python -m rl2fx.cli`` in a subprocess, as a user meets them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rl2fx import HyperparameterConfig, Study

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["experiment_tracking.enabled=false", "trainer.progress_bar=false", "trainer.total_steps=1"]


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "rl2fx.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2 and a single ``rl2fx: error: ...`` line on stderr holding every needle (no traceback)."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("rl2fx: error: "), res.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


BAD_YAML = {
    "unclosed": ("actor:\n  lr: [1, 2\n", 3),
    "tab": ("actor:\n\tlr: 0.1\n", 2),
    "duplicate_key": ("actor:\n  lr: 0.1\n  lr: 0.2\n", 3),
    "python_tag": ("actor: !!python/object/apply:os.system ['true']\n", 1),
}


@pytest.mark.parametrize("name", list(BAD_YAML))
def test_bad_yaml_is_one_line_naming_file_and_line(tmp_path, name):
    text, line = BAD_YAML[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    _one_line_error(_run("config", "show", "--config", str(path)), str(path), f"line {line}", "invalid YAML")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_yaml_is_an_error_not_the_defaults(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    _one_line_error(_run("config", "show", "--config", str(path)), str(path), "empty")


def test_cuda_index_that_does_not_exist_is_rejected_at_validation():
    msg = _one_line_error(_run("config", "show", "trainer.device=cuda:99"), "'trainer.device'", "cuda:99",
                          "available")
    assert "'cpu'" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda_is_rejected_at_validation():
    _one_line_error(_run("config", "show", "trainer.device=cuda"), "'trainer.device'", "'cuda'", "available")


def test_missing_interpolation_names_the_key_holding_it(tmp_path):
    path = tmp_path / "interp.yaml"
    path.write_text("actor:\n  model_name: ${nope}\n")
    _one_line_error(_run("config", "show", "--config", str(path)), "'actor.model_name'", "'nope'")


def test_missing_interpolation_in_an_override_names_the_key():
    _one_line_error(_run("config", "show", "trainer.output_dir=out/${trainer.nope}"), "'trainer.output_dir'",
                    "nope")


def test_corrupt_study_json_names_the_file(tmp_path):
    save = tmp_path / "study"
    save.mkdir()
    (save / "study.json").write_text('{"format": 1, "param_con')
    res = _run("tune", "--config", "demo", f"hyperopt.save_dir={save}", "hyperopt.n_trials=1", *QUIET,
               f"trainer.output_dir={tmp_path / 'out'}")
    _one_line_error(res, str(save / "study.json"), "corrupt")


def test_torn_trials_jsonl_line_names_file_and_line(tmp_path):
    space = [HyperparameterConfig("x", "float", low=0.0, high=1.0)]
    study = Study(space, "random", maximize=False, storage=tmp_path, seed=0)
    study.tell(study.ask(), 0.5)
    good = (tmp_path / "trials.jsonl").read_text()
    (tmp_path / "trials.jsonl").write_text(good + good[: len(good) // 2] + "\n")  # a write torn mid-line
    with pytest.raises(ValueError) as e:
        Study(space, "random", maximize=False, storage=tmp_path, seed=0)
    msg = str(e.value)
    assert str(tmp_path / "trials.jsonl") in msg and "line 2" in msg and "\n" not in msg


def test_study_json_that_is_not_an_object_names_the_file(tmp_path):
    (tmp_path / "study.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="study.json"):
        Study([HyperparameterConfig("x", "float", low=0.0, high=1.0)], "random", storage=tmp_path)


# the first is read by the unpickler as a truncated stream, the second as an unknown opcode
# (torch words that "Weights only load failed", which is no crafted object)
@pytest.mark.parametrize("garbage", [b"this is not a checkpoint\x00\x01", b"garbage\x00\x01"])
def test_corrupt_state_pt_is_one_line_naming_it(tmp_path, garbage):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "state.pt").write_bytes(garbage)
    res = _run("train", "--config", "demo", f"trainer.resume_from={ckpt}", *QUIET,
               f"trainer.output_dir={tmp_path / 'out'}")
    msg = _one_line_error(res, str(ckpt / "state.pt"), "corrupt")
    assert "UnpicklingError" not in msg and "objects other than tensors" not in msg


@pytest.mark.parametrize("name", ["{tmp}/no_such_model", "rl2fx-test-absent/no-such-model"])
def test_missing_model_name_is_one_line_with_how_to_supply_it(tmp_path, name):
    name = name.format(tmp=tmp_path)
    _one_line_error(_run("config", "show", f"actor.model_name={name}"), "'actor.model_name'", name,
                    "huggingface-cli download")


def test_model_directory_without_a_model_is_one_line(tmp_path):
    (tmp_path / "m").mkdir()  # exists, so validation passes; loading it finds no config.json
    res = _run("train", "--config", "demo", f"actor.model_name={tmp_path / 'm'}", *QUIET,
               f"trainer.output_dir={tmp_path / 'out'}")
    _one_line_error(res, "'actor.model_name'", str(tmp_path / "m"))


def test_hydra_entry_reports_a_validation_error_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "rl2fx.train", "--config-name", "demo", "trainer.device=cuda:99"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert "'trainer.device'" in lines[0] and "cuda:99" in lines[0] and "available" in lines[0]


@pytest.mark.parametrize("flags", [["--config-path", "{d}", "--config-name", "bad"], ["--config-path={d}", "-cn", "bad"]])
def test_hydra_entry_reports_invalid_yaml_in_one_line(tmp_path, flags):
    (tmp_path / "bad.yaml").write_text("trainer:\n\ttotal_steps: 3\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [f.format(d=tmp_path) for f in flags]
    res = subprocess.run([sys.executable, "-m", "rl2fx.train", *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert "bad.yaml" in lines[0] and "line 2" in lines[0] and "invalid YAML" in lines[0]
