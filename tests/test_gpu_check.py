"""The GPU check script (benchmarks/gpu_check.py) on the CPU: its parts run and report what they claim."""

from __future__ import annotations

import gpu_check
import torch
from conftest import TINY_ROOT


def test_the_check_reports_throughput_data_wait_and_both_precisions(tmp_path, one_thread):
    result = gpu_check.check(TINY_ROOT, 0, "a", 16, images=400, steps=4, batch=16, device=torch.device("cpu"),
                             folder=tmp_path)
    assert set(result["throughput"]) == {"prefetch 0", f"prefetch {gpu_check.PREFETCH_BATCHES}"}
    for r in result["throughput"].values():
        assert r["images_per_s"] > 0 and 0 < r["data_wait_share"] < 1
    p = result["precision"]
    assert not p["bf16"]["autocast_active"]  # CUDA only: on the CPU both runs are float32 ...
    assert p["bf16"]["val"] == p["fp32"]["val"] and p["largest_difference"] == 0  # ... and agree exactly
    assert all(0 <= a <= 1 for a in p["fp32"]["val"] + p["fp32"]["test"]) and len(p["fp32"]["test"]) == 2
    assert "| prefetch 0 |" in gpu_check.table(result)
