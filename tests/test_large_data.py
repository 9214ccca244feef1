"""Data larger than memory: tasks read per batch (``.npz`` in place, image folders, Hugging Face ``datasets``) give
the inputs of the same tasks loaded whole, keep only what fits the pixel budget, and runs on them give the same
results; frozen features beyond the feature cache are computed per batch; peak memory does not grow with the data."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import make_run, make_task
from PIL import Image

from munet.data.augment import eval_batch
from munet.data.online import load_hf
from munet.data.registry import clear_cache, load_task
from munet.data.rows import ImageRows, data_cache_bytes, set_data_cache_bytes
from munet.data.task import TaskData
from munet.data.user import load_image_folder, load_npz
from munet.evolution.hparams import DEFAULTS
from munet.evolution.mutate import make_child
from munet.storage.snapshot import data_fingerprint
from munet.training.frozen import FeatureCache, frozen_rows

SPLITS = ("train", "val", "test")


@pytest.fixture(autouse=True)
def _budget():
    """Every test leaves the process's pixel budget as it found it."""
    before = data_cache_bytes()
    yield
    set_data_cache_bytes(before)
    clear_cache()


def _same_images(lazy: TaskData, whole: TaskData, size: int = 12) -> None:
    """Same labels; the same normalised inputs (the stored channel count may differ: grey repeats to RGB)."""
    for split in SPLITS:
        (lx, ly), (wx, wy) = lazy.split(split), whole.split(split)
        assert torch.equal(ly, wy)
        assert torch.equal(eval_batch(lx[:], size, 0.5, 0.5), eval_batch(wx, size, 0.5, 0.5))


def _save_npz(path: Path, compressed: bool = False, n: int = 90) -> None:
    rng = np.random.default_rng(0)
    save = np.savez_compressed if compressed else np.savez
    save(path, x=rng.integers(0, 256, (n, 10, 10, 3), dtype=np.uint8), y=np.arange(n) % 3,
         class_names=np.array(["p", "q", "r"]))


def test_npz_images_read_in_place_equal_the_loaded_ones(tmp_path: Path) -> None:
    _save_npz(tmp_path / "t.npz")
    lazy, whole = load_npz(tmp_path / "t.npz", seed=3, lazy=True), load_npz(tmp_path / "t.npz", seed=3, lazy=False)
    assert isinstance(lazy.train_x, ImageRows) and isinstance(whole.train_x, torch.Tensor)
    assert lazy.class_names == whole.class_names and lazy.train_x.shape == tuple(whole.train_x.shape)
    for split in SPLITS:
        assert torch.equal(lazy.split(split)[0][:], whole.split(split)[0])
    assert data_fingerprint(lazy) == data_fingerprint(whole)  # a run may resume with either
    rows = torch.tensor([5, 0, 5, len(whole.train_y) - 1])  # any order, repeats
    assert torch.equal(lazy.train_x[rows], whole.train_x[rows])
    assert torch.equal(lazy.train_x[2], whole.train_x[2])


def test_npz_read_in_place_when_the_images_exceed_the_budget_and_only_if_stored_uncompressed(tmp_path: Path,
                                                                                             caplog) -> None:
    _save_npz(tmp_path / "t.npz")
    _save_npz(tmp_path / "z.npz", compressed=True)
    assert isinstance(load_npz(tmp_path / "t.npz", seed=0).train_x, torch.Tensor)  # 27 KB fit the default budget
    set_data_cache_bytes(10_000)
    assert isinstance(load_npz(tmp_path / "t.npz", seed=0).train_x, ImageRows)
    with caplog.at_level(logging.WARNING, logger="munet.data.user"):
        compressed = load_npz(tmp_path / "z.npz", seed=0)  # cannot be read in place: loaded whole, with a hint
    assert isinstance(compressed.train_x, torch.Tensor) and "save them with np.savez as uint8" in caplog.text
    assert torch.equal(compressed.train_x, load_npz(tmp_path / "t.npz", seed=0, lazy=False).train_x)


def test_grey_npz_images_without_a_channel_axis_are_read_in_place(tmp_path: Path) -> None:
    """(N, H, W) images read per batch: their shape once failed with an IndexError (a traceback at `munet run`)."""
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "g.npz", x=rng.integers(0, 256, (40, 6, 7), dtype=np.uint8), y=np.arange(40) % 2)
    lazy, whole = load_npz(tmp_path / "g.npz", seed=0, lazy=True), load_npz(tmp_path / "g.npz", seed=0, lazy=False)
    assert isinstance(lazy.train_x, ImageRows) and lazy.train_x.shape == (28, 1, 6, 7)
    for split in SPLITS:
        assert torch.equal(lazy.split(split)[0][:], whole.split(split)[0])


def _image_folder(root: Path) -> None:
    """Three classes of PNGs of two sizes, one class grey, the others colour (one of them a grey-content RGB)."""
    rng = np.random.default_rng(1)
    for k, name in enumerate(("cat", "dog", "eel")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            size = (9, 11) if i % 2 else (12, 12)
            pixels = rng.integers(0, 256, (*size, 3) if k else size, dtype=np.uint8)
            if k == 2 and i == 0:
                pixels[:] = pixels[..., :1]  # RGB file of grey content
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_folder_decoded_per_batch_gives_the_inputs_of_the_loaded_folder(tmp_path: Path) -> None:
    _image_folder(tmp_path / "mixed")
    lazy = load_image_folder(tmp_path / "mixed", seed=2, lazy=True)
    whole = load_image_folder(tmp_path / "mixed", seed=2, lazy=False)
    assert isinstance(lazy.train_x, ImageRows) and lazy.train_x.shape[1:] == (3, 64, 64)  # sizes differ: 64 px
    _same_images(lazy, whole)
    colour = tmp_path / "colour"  # a batch of colour files only was stacked from transposed views: strided
    for name in ("a", "b"):
        (colour / name).mkdir(parents=True)
        for i in range(8):
            pixels = np.random.default_rng(i).integers(0, 256, (6, 6, 3), np.uint8)  # colour content
            Image.fromarray(pixels).save(colour / name / f"{i}.png")
    set_data_cache_bytes(0)  # read per batch, not from the cache: a run hashes the data it joins that way
    assert data_fingerprint(load_image_folder(colour, seed=0, lazy=True)) == data_fingerprint(
        load_image_folder(colour, seed=0, lazy=False))  # the digest of the same images loaded whole
    grey = tmp_path / "grey"
    for name in ("a", "b"):
        (grey / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((6, 6), 20 * i + (name == "b"), np.uint8)).save(grey / name / f"{i}.png")
    lazy = load_image_folder(grey, seed=0, lazy=True)
    assert lazy.train_x.shape[1:] == (1, 6, 6)  # every file grey: one channel, as when loaded whole
    _same_images(lazy, load_image_folder(grey, seed=0, lazy=False))


def test_hugging_face_split_decoded_per_batch_gives_the_inputs_of_the_loaded_split() -> None:
    rng = np.random.default_rng(2)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})

    def split(n: int) -> datasets.Dataset:
        images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
        return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)

    dsd = datasets.DatasetDict({"train": split(40), "test": split(10)})
    lazy, whole = load_hf(dsd, seed=0, lazy=True), load_hf(dsd, seed=0, lazy=False)
    assert isinstance(lazy.train_x, ImageRows) and lazy.class_names == ["x", "y"]
    assert lazy.sizes() == whole.sizes() == {"train": 38, "val": 2, "test": 10}
    _same_images(lazy, whole)


def test_pixel_cache_keeps_what_fits_and_says_once_that_the_rest_is_read_per_batch(tmp_path: Path, caplog) -> None:
    _save_npz(tmp_path / "t.npz")
    set_data_cache_bytes(3 * 300 + 299)  # three 10 x 10 x 3 images
    task = load_npz(tmp_path / "t.npz", seed=0, lazy=True)
    whole = load_npz(tmp_path / "t.npz", seed=0, lazy=False)
    with caplog.at_level(logging.WARNING, logger="munet.data.rows"):
        for rows in (torch.arange(10), torch.tensor([2, 1, 0, 7]), torch.arange(10)):
            assert torch.equal(task.train_x[rows], whole.train_x[rows])  # cached rows come back the same
    assert len(task.train_x._cache) == 3 and task.train_x._cached.all()  # noqa: SLF001 (the cache itself)
    assert [r.getMessage() for r in caplog.records].count(
        f"data cache (data_cache_mb = 0) keeps 3 of the {len(whole.train_y)} images of {tmp_path / 't.npz'}; the "
        "rest are read per batch") == 1
    assert len(task.val_x[:]) == len(whole.val_y)  # the budget is spent: read with an empty cache


def test_frozen_features_beyond_the_bound_are_computed_per_batch_never_allocated_whole(system, policy,
                                                                                       caplog) -> None:
    task = make_task("a")
    ds = {k: v for k, v in DEFAULTS.items() if k.startswith("ds_")} | {"ds_image_size": 8}
    probe = make_child(system, system.root_path, "a", ds, mutate=False, policy=policy)

    def images(rows: torch.Tensor) -> torch.Tensor:
        return eval_batch(task.train_x[rows], 8, 0.5, 0.5)

    idx = torch.tensor([4, 9, 1])
    kept, small = FeatureCache(1 << 30), FeatureCache(10_000)  # 96 rows x 5 tokens x 32 x 4 B = 61 KB > 10 KB
    k, expected = frozen_rows(probe, images, idx, len(task.train_y), kept, tag="t")
    with caplog.at_level(logging.WARNING, logger="munet.training.frozen"):
        for _ in range(2):
            k_small, features = frozen_rows(probe, images, idx, len(task.train_y), small, tag="t")
            assert k_small == k and torch.equal(features, expected)
    assert len(kept) == 1 and len(small) == 0 and small.bytes == 0
    assert len([r for r in caplog.records if "exceed feature_cache_mb" in r.getMessage()]) == 1


def _npz_of(task: TaskData, path: Path) -> str:
    np.savez(path, **{f"{xy}_{split}": getattr(task, f"{split}_{xy}").numpy() for split in SPLITS for xy in "xy"})
    return f"npz:{path}"


def test_a_run_on_tasks_read_per_batch_equals_the_run_on_the_tasks_loaded_whole(tmp_path: Path, one_thread) -> None:
    tasks = [_npz_of(make_task(name, classes, seed=seed), tmp_path / f"{name}.npz")
             for seed, (name, classes) in enumerate((("a", 3), ("b", 2)), start=1)]
    make_run(tmp_path / "whole", tasks=tasks)
    clear_cache()  # the registry keeps loaded tasks: load them again under the other budget
    cfg = make_run(tmp_path / "per_batch", tasks=tasks, data_cache_mb=0, feature_cache_mb=0)
    assert all(isinstance(load_task(t, cfg.seed, cfg.data_dir).train_x, ImageRows) for t in tasks)
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("whole", "per_batch")]
    assert summaries[0]["tasks"] == summaries[1]["tasks"]  # every task's path, accuracies and parameters


def test_peak_memory_of_ten_times_the_images_read_per_batch_stays_within_the_bound(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import scale_data

    result = scale_data.measure(800, 8000, tmp_path, steps=20, data_cache_mb=12, pairs=("augmented",))
    pair = result["pairs"]["augmented"]
    assert not pair["small"]["read_per_batch"] and pair["large"]["read_per_batch"]
    assert pair["memory_ratio"] <= 1.2
    # loaded whole, the 7,200 more images alone would add 88 MB; read per batch they add at most half of that
    grown = pair["large"]["peak_rss_mb"] - pair["small"]["peak_rss_mb"]
    assert grown < 0.5 * 7200 * 3 * 64 * 64 / 2**20


def test_dry_run_plan_counts_the_image_cache_bound_for_tasks_read_per_batch(tmp_path: Path) -> None:
    from munet.config import RunConfig
    from munet.plan import plan_run

    spec = _npz_of(make_task("a", 3, seed=1), tmp_path / "a.npz")
    cfg = RunConfig(tasks=[spec], root="random:munet_tiny", depth=3, image_size=8, max_image_size=12, device="cpu",
                    out=str(tmp_path / "run"), data_cache_mb=0, feature_cache_mb=0)
    memory = plan_run(cfg, io.StringIO()).memory
    assert memory["decoded images"] == 0 and memory["evaluation inputs"] == 0  # read and evaluated per batch
    clear_cache()
    loaded = plan_run(cfg.replace(data_cache_mb=1), io.StringIO()).memory  # 192 x 12 x 12 images fit 1 MB
    assert loaded["decoded images"] == 192 * 12 * 12 and loaded["image cache bound (tasks read per batch)"] == 0
    assert loaded["evaluation inputs"] == 48 * 3 * 12 * 12 * 4
