"""The large-image benchmark's cases (benchmarks/scale_images.py): a run per image size, resumable."""

from __future__ import annotations

import pytest
from conftest import TINY_ROOT, benchmark_module


@pytest.fixture(scope="module")
def scale_images():
    return benchmark_module("scale_images.py")


def test_each_size_runs_once_and_a_rerun_runs_only_what_is_missing_or_changed(scale_images, tmp_path, one_thread):
    settings = {"task": "a", "root": TINY_ROOT, "depth": 0, "batch": 8, "steps": 2, "val_examples": 16}
    out, ran = tmp_path / "images.json", []

    def run(spec: dict) -> dict:
        ran.append(spec["image_size"])
        return scale_images.run_case(spec)

    result = scale_images.measure([16, 32], out, settings, run)
    assert ran == [16, 32]
    for size, patches in (("16", 4), ("32", 8)):  # the tiny root's patches are 4 px
        case = result["cases"][size]
        assert case["patches"] == patches and case["generations"] == 2  # the seed probe's, then the child's
        assert case["train_images"] == 2 * 2 * 8 and case["train_images_per_s"] > 0
        assert 0 <= case["test_accuracy"] <= 1 and 0 <= case["val_accuracy"] <= 1
    assert "| 32 px | 8 x 8 |" in scale_images.table(result)
    scale_images.measure([16, 32, 48], out, settings, run)
    assert ran == [16, 32, 48]
    scale_images.measure([16], out, settings | {"steps": 3}, run)
    assert ran == [16, 32, 48, 16]
