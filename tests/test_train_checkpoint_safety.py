"""Checkpoint loading never runs code from the files (weights_only=True), and bad files give one line naming them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rl2fx.trainer.config import load_config
from rl2fx.trainer.ppo import CheckpointError, PPOTrainer


def _cfg(out, *extra):
    return load_config("demo", overrides=(f"trainer.output_dir={out}", "trainer.total_steps=2", "trainer.save_interval=0",
                                          "trainer.progress_bar=false", "data.prompts_per_rollout=2",
                                          "data.responses_per_prompt=2", "experiment_tracking.enabled=false",
                                          "memory_optimization.profiling.enabled=false", *extra))


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    PPOTrainer(_cfg(out)).train()
    return out


def _copy_ckpt(saved: Path, dest: Path) -> Path:
    import shutil

    src = sorted((saved / "checkpoints").glob("step-*"))[-1]
    shutil.copytree(src, dest)
    return dest


@pytest.mark.parametrize("which", ["state.pt", "rng_rank0.pt"])
def test_crafted_pickle_is_refused_and_never_runs(saved, tmp_path, which):
    ckpt = _copy_ckpt(saved, tmp_path / "ckpt")
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "evil": _Payload(str(marker))}, ckpt / which)
    with pytest.raises(CheckpointError) as e:
        PPOTrainer(_cfg(tmp_path / "b", f"trainer.resume_from={ckpt}"))
    assert not marker.exists()
    msg = str(e.value)
    assert str(ckpt / which) in msg and "\n" not in msg and "weights_only" in msg


def test_corrupt_state_file_gives_one_line_naming_it(saved, tmp_path):
    ckpt = _copy_ckpt(saved, tmp_path / "ckpt")
    (ckpt / "state.pt").write_bytes(b"this is not a checkpoint\x00\x01")
    with pytest.raises(CheckpointError) as e:
        PPOTrainer(_cfg(tmp_path / "b", f"trainer.resume_from={ckpt}"))
    assert str(ckpt / "state.pt") in str(e.value) and "\n" not in str(e.value)


def test_rng_file_holds_only_plain_data(saved):
    ckpt = sorted((saved / "checkpoints").glob("step-*"))[-1]
    state = torch.load(ckpt / "rng_rank0.pt", weights_only=True)
    assert isinstance(state["numpy"]["keys"], torch.Tensor) and isinstance(state["python"][1], list)
    torch.load(ckpt / "state.pt", weights_only=True)


def test_resume_restores_every_rng_exactly(saved, tmp_path):
    import random

    import numpy as np

    ckpt = sorted((saved / "checkpoints").glob("step-*"))[-1]
    t = PPOTrainer(_cfg(tmp_path / "b", f"trainer.resume_from={ckpt}"))
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)],
                torch.rand(3, generator=t.prompt_generator))
    t.load_checkpoint(ckpt)
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)],
           torch.rand(3, generator=t.prompt_generator))
    assert torch.equal(expected[0], got[0]) and (expected[1] == got[1]).all() and expected[2] == got[2]
    assert torch.equal(expected[3], got[3])


# ---------------------------------------------------------------- output paths checked at start
from rl2fx.trainer.config import ConfigError  # noqa: E402


@pytest.mark.parametrize("key,extra", [
    ("trainer.output_dir", lambda f, tmp: [f"trainer.output_dir={f}/sub"]),
    ("memory_optimization.profiling.save_path",
     lambda f, tmp: ["memory_optimization.profiling.enabled=true",
                     f"memory_optimization.profiling.save_path={f}/sub/profile.json"]),
    ("experiment_tracking.tracking_uri",
     lambda f, tmp: ["experiment_tracking.enabled=true", f"experiment_tracking.tracking_uri=sqlite:///{f}/db/x.db"]),
])
def test_unwritable_path_under_a_file_fails_at_start(tmp_path, key, extra):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ConfigError) as e:
        PPOTrainer(_cfg(tmp_path / "out", *extra(f, tmp_path)))
    msg = str(e.value)
    assert key in msg and str(f) in msg and "ENOTDIR" in msg and "\n" not in msg


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_dir_fails_at_start(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("chmod has no effect here")
        with pytest.raises(ConfigError, match=r"trainer\.output_dir.*EACCES"):
            PPOTrainer(_cfg(ro / "out"))
    finally:
        ro.chmod(0o700)


def test_checkpoint_write_failure_names_file_keeps_last_and_removes_tmp(tmp_path, monkeypatch):
    import errno

    out = tmp_path / "out"
    t = PPOTrainer(_cfg(out, "trainer.total_steps=1"))
    t.train()
    good = t.latest_checkpoint()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if str(f).endswith("state.pt.tmp"):
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    t.step = 5
    with pytest.raises(CheckpointError) as e:
        t.save_checkpoint()
    msg = str(e.value)
    target = t.checkpoint_dir(5) / "state.pt"
    assert str(target) in msg and "ENOSPC" in msg and str(good) in msg
    assert not (t.checkpoint_dir(5) / "state.pt.tmp").exists() and not target.exists()
    assert t.latest_checkpoint() == good


def test_resume_with_every_controller_loads_weights_only(tmp_path):
    extra = ("multi_objective.enabled=true", "actor.kl.constraint_optimization.enabled=true",
             "actor.kl.adaptive_kl.enabled=true")
    first = PPOTrainer(_cfg(tmp_path / "a", *extra))
    first.train()
    resumed = PPOTrainer(_cfg(tmp_path / "a", *extra, "trainer.total_steps=3", "trainer.resume_from=auto"))
    assert resumed.step == 2 and resumed.kl_state == first.kl_state
    assert resumed.lagrangian_state == first.lagrangian_state
    assert resumed.multi_objective.state_dict() == first.multi_objective.state_dict()
