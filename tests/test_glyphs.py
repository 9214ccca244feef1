"""Held-out glyph tasks rendered from matplotlib's bundled fonts (``munet/data/glyphs.py``)."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from munet.data import glyphs
from munet.data.registry import HELD_OUT, OFFLINE_BENCHMARK, TASKS, load_task
from munet.data.task import TaskData

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def tasks() -> dict[str, TaskData]:
    return {name: load_task(name, 0) for name in HELD_OUT}


def _hashes(x: torch.Tensor) -> list[bytes]:
    arr = x.numpy().reshape(len(x), -1)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in arr]


def _flat(x: torch.Tensor) -> np.ndarray:
    return x.numpy().reshape(len(x), -1).astype(np.float32) / 255.0


def test_registered_and_disjoint_from_the_benchmark() -> None:
    assert HELD_OUT == ["glyphs_latin_upper", "glyphs_greek", "glyphs_math", "glyphs_latin_lower"]
    assert set(HELD_OUT) <= set(TASKS) and not set(HELD_OUT) & set(OFFLINE_BENCHMARK)
    assert set(HELD_OUT) == set(glyphs.GLYPH_CLASSES)


@pytest.mark.parametrize("name", HELD_OUT)
def test_shapes_sizes_and_balanced_classes(tasks: dict[str, TaskData], name: str) -> None:
    task = tasks[name]
    chars, class_names = glyphs.GLYPH_CLASSES[name]
    assert task.name == name and task.class_names == class_names and len(set(chars)) == len(chars)
    assert task.num_classes == {"glyphs_latin_upper": 26, "glyphs_greek": 24, "glyphs_math": 20,
                                "glyphs_latin_lower": 26}[name]
    assert task.sizes() == glyphs.SPLIT_SIZES == {"train": 3000, "val": 500, "test": 1000}
    assert task.description
    for split in SPLITS:
        x, y = task.split(split)
        assert x.dtype == torch.uint8 and x.shape == (len(y), 1, 28, 28) and x.is_contiguous()
        assert y.dtype == torch.int64
        counts = torch.bincount(y, minlength=task.num_classes)
        assert len(counts) == task.num_classes and counts.min() >= 1, f"{name}/{split}: a class is missing"
        assert counts.max() - counts.min() <= 1, f"{name}/{split}: unbalanced {counts.tolist()}"


@pytest.mark.parametrize("name", HELD_OUT)
def test_no_image_repeats_within_or_across_splits(tasks: dict[str, TaskData], name: str) -> None:
    all_hashes = [h for split in SPLITS for h in _hashes(tasks[name].split(split)[0])]
    assert len(set(all_hashes)) == len(all_hashes)


@pytest.mark.parametrize("name", HELD_OUT)
def test_every_image_has_a_glyph(tasks: dict[str, TaskData], name: str) -> None:
    for split in SPLITS:
        x = tasks[name].split(split)[0].numpy().reshape(-1, 28 * 28).astype(np.float64)
        # Noise alone (sigma <= 12) gives p99 - median of about 28; a glyph's ink is at least 60 levels above the
        # background before downsampling.
        contrast = np.percentile(x, 99, axis=1) - np.median(x, axis=1)
        assert contrast.min() > 40, f"{name}/{split}: an image without visible ink"


def test_deterministic_per_seed(tasks: dict[str, TaskData], tmp_path: Path) -> None:
    again = load_task("glyphs_greek", 0, str(tmp_path))  # another cache key: rendered afresh
    first = tasks["glyphs_greek"]
    assert again is not first
    for split in SPLITS:
        assert torch.equal(again.split(split)[0], first.split(split)[0])
        assert torch.equal(again.split(split)[1], first.split(split)[1])
    other = glyphs.glyphs_greek(1)
    assert not torch.equal(other.train_x, first.train_x) and not torch.equal(other.train_y, first.train_y)


def test_fonts_that_lack_a_glyph_are_dropped() -> None:
    names = {name: {Path(p).name for p in glyphs.allowed_fonts(name)} for name in HELD_OUT}
    for name in HELD_OUT:
        assert len(names[name]) >= 4 and "DejaVuSans.ttf" in names[name]
        assert "LastResortHE-Regular.ttf" not in names[name]
    # STIX italics have no integral or sum; Computer Modern text fonts map no Unicode Greek.
    assert "STIXGeneralItalic.ttf" not in names["glyphs_math"] and "STIXGeneral.ttf" in names["glyphs_math"]
    assert not any(n.startswith("cm") for n in names["glyphs_greek"])
    assert "cmr10.ttf" in names["glyphs_latin_upper"]


@pytest.mark.parametrize("name", HELD_OUT)
def test_raw_pixel_logistic_regression_is_neither_perfect_nor_chance(tasks: dict[str, TaskData], name: str) -> None:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    task = tasks[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = LogisticRegression(max_iter=100).fit(_flat(task.train_x), task.train_y.numpy())
    acc = clf.score(_flat(task.test_x), task.test_y.numpy())
    chance = 1.0 / task.num_classes
    assert 4 * chance < acc < 0.8, f"{name}: raw-pixel logistic regression test accuracy {acc:.3f}"
