"""Smoke test of ``benchmarks/scale.py``'s measuring function: one process, a tiny Llama."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
# the script imports its folder's _results helper; appended, so the folder's modules
# (memory.py, returns.py, ...) never shadow an installed package of the same name
sys.path.append(str(BENCH))
_spec = importlib.util.spec_from_file_location("rl2fx_benchmarks_scale", BENCH / "scale.py")
scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale)


def test_measure_counts_params_grads_and_adamw_state_exactly():
    model = scale.build_model("tiny")
    n = sum(p.numel() for p in model.parameters())
    assert n == scale.parameter_count("tiny") > 0
    row = scale.measure("single", "tiny")
    assert row["strategy"] == "single" and row["rank"] == 0 and row["grads_missing"] == 0
    # float32: 4 bytes per parameter, one gradient each, AdamW's exp_avg and exp_avg_sq plus a
    # float32 step counter per parameter tensor
    tensors = len(list(model.parameters()))
    assert row["params_bytes"] == 4 * n
    assert row["grads_bytes"] == 4 * n
    assert row["optim_bytes"] == 2 * 4 * n + 4 * tensors
    assert row["total_bytes"] == row["params_bytes"] + row["grads_bytes"] + row["optim_bytes"]
    assert row["rss_peak_mib"] >= row["rss_after_mib"] > 0
    assert torch.isfinite(torch.tensor(row["loss"])) and row["grad_norm"] > 0


def test_ratios_and_table():
    rows = [{"strategy": s, "world": w, "rank": 0, "params_bytes": b, "grads_bytes": b, "optim_bytes": 2 * b,
             "total_bytes": 4 * b, "rss_start_mib": 1.0, "rss_after_mib": 2.0, "rss_peak_mib": 3.0}
            for s, w, b in (("single", 1, 2**20), ("ddp", 2, 2**20), ("fsdp", 2, 2**19))]
    scale.add_ratios(rows)
    assert [r["ratio"] for r in rows] == [1.0, 1.0, 0.5]
    text = scale.table(rows)
    assert "fsdp" in text.splitlines()[-1] and "0.500x" in text and "2.0" in text.splitlines()[-1]


def test_unknown_size_names_the_choices():
    with pytest.raises(ValueError, match=r"size must be one of \['full', 'quick', 'tiny'\], got 'huge'"):
        scale.build_model("huge")
