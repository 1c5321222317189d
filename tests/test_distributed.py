"""Data parallelism: 2 gloo processes (torchrun) give the single-process update on the same global batch."""

from __future__ import annotations

import pytest
import torch
from _dist_helpers import torchrun as _torchrun


def test_two_process_update_equals_single_process(tmp_path):
    from rl2fx.testing.ddp_equivalence import single_process_update

    out = tmp_path / "ddp_params.pt"
    proc = _torchrun("-m", "rl2fx.testing.ddp_equivalence", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp_params = torch.load(out)
    ref = single_process_update()
    init = __import__("rl2fx.testing.ddp_equivalence", fromlist=["global_batch"]).global_batch()[0]
    moved = max((p - q).abs().max().item() for p, q in zip(ref, init.parameters(), strict=True))
    assert moved > 1e-3  # the update did something
    worst = max((p - q).abs().max().item() for p, q in zip(ddp_params, ref, strict=True))
    assert worst < 1e-5, f"max |DDP - single| = {worst}"


@pytest.mark.slow
def test_torchrun_trainer_two_processes(tmp_path):
    proc = _torchrun("-m", "rl2fx.train", "--config-name", "demo", "trainer.total_steps=2",
                     "trainer.progress_bar=false", f"trainer.output_dir={tmp_path}",
                     "data.prompts_per_rollout=2", "experiment_tracking.enabled=false",
                     "memory_optimization.profiling.enabled=false", "adv.estimator=gae", timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rl2fx training summary" in proc.stdout
    assert (tmp_path / "checkpoints" / "step-000002" / "rng_rank1.pt").exists()
