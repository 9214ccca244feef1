"""Offline tasks, splitting helpers and the registry."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from munet.data import offline
from munet.data.registry import OFFLINE_BENCHMARK, TASKS, load_task, register_task
from munet.data.splits import dedupe, patches_from_regions, resolve_sizes, stratified_split
from munet.data.task import TaskData
from munet.errors import DataError, TaskUnavailable

EXPECTED = {
    "fashion_mnist": (10, (1, 28, 28)),
    "mnist_5k": (10, (1, 28, 28)),
    "uci_digits": (10, (1, 8, 8)),
    "animal_silhouettes": (10, (1, 28, 28)),
    "faces": (2, (1, 25, 25)),
    "textures": (3, (1, 32, 32)),
    "surfaces": (3, (1, 32, 32)),
    "fashion_mnist_coarse": (4, (1, 28, 28)),
}


def _load(name: str, seed: int) -> TaskData:
    try:
        return TASKS[name](seed)
    except TaskUnavailable as exc:
        pytest.skip(str(exc))


def _hashes(x: torch.Tensor) -> set[bytes]:
    arr = x.numpy().reshape(len(x), -1)
    return {hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in arr}


def test_benchmark_lists_the_eight_tasks_in_order() -> None:
    assert OFFLINE_BENCHMARK == ["fashion_mnist", "mnist_5k", "uci_digits", "animal_silhouettes", "faces", "textures",
                                 "surfaces", "fashion_mnist_coarse"]
    assert set(OFFLINE_BENCHMARK) <= set(TASKS)
    assert set(offline.SPLIT_SIZES_DOC) == set(OFFLINE_BENCHMARK)


@pytest.mark.parametrize("name", OFFLINE_BENCHMARK)
def test_offline_task(name: str) -> None:
    task = _load(name, 0)
    num_classes, shape = EXPECTED[name]
    assert task.name == name
    assert task.num_classes == num_classes == len(set(task.class_names))
    assert task.sizes() == offline.SPLIT_SIZES_DOC[name]
    for split in ("train", "val", "test"):
        x, y = task.split(split)
        assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == shape
        assert y.dtype == torch.int64 and y.shape == (len(x),)
        assert int(y.min()) >= 0 and int(y.max()) < num_classes
        # Every class is present in every split (all splits are stratified).
        assert set(y.tolist()) == set(range(num_classes)), split
    # No pixel-identical image in two splits, and no exact duplicates at all within a split.
    hashes = {s: _hashes(task.split(s)[0]) for s in ("train", "val", "test")}
    for s in hashes:
        assert len(hashes[s]) == task.sizes()[s], f"duplicate images inside {s}"
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]
    # Deterministic for a seed, different for another seed.
    again = _load(name, 0)
    for s in ("train", "val", "test"):
        assert torch.equal(task.split(s)[0], again.split(s)[0]) and torch.equal(task.split(s)[1], again.split(s)[1])
    other = _load(name, 1)
    assert not torch.equal(task.train_x, other.train_x)


def test_fashion_tasks_use_disjoint_images() -> None:
    fine = _load("fashion_mnist", 0)
    coarse = _load("fashion_mnist_coarse", 3)  # different seeds on purpose: the halves are seed-independent
    fine_h = set().union(*(_hashes(fine.split(s)[0]) for s in ("train", "val", "test")))
    coarse_h = set().union(*(_hashes(coarse.split(s)[0]) for s in ("train", "val", "test")))
    assert not fine_h & coarse_h
    # Natural shares of the coarse groups: 4, 2, 3 and 1 fine classes out of 10.
    assert torch.bincount(coarse.train_y).tolist() == [2400, 1200, 1800, 600]


def test_animals_are_deduplicated() -> None:
    try:
        counts = offline.dedupe_counts()
    except TaskUnavailable as exc:
        pytest.skip(str(exc))
    assert counts["animal_silhouettes"] == 284


def test_hash_mismatch_is_a_data_error(tmp_path, monkeypatch) -> None:
    path = tmp_path / "file.gz"
    path.write_bytes(b"not the real file")
    with pytest.raises(DataError, match="sha256"):
        offline._verify(path, "0" * 64, "some_task")


def test_missing_package_and_file_are_task_unavailable(tmp_path, monkeypatch) -> None:
    with pytest.raises(TaskUnavailable, match="pip install"):
        offline._package_dir("surely_not_an_installed_package_xyz", "t")
    monkeypatch.setenv("MUNET_FASHION_MNIST_DIR", str(tmp_path))
    offline._fashion_pool.cache_clear()
    try:
        with pytest.raises(TaskUnavailable, match="apt-get install dataset-fashion-mnist"):
            offline.fashion_mnist(0)
    finally:
        offline._fashion_pool.cache_clear()


def test_numpy_only_unpickler_rejects_other_globals(tmp_path) -> None:
    import gzip
    import pickle

    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump({"a": print}, f)
    with pytest.raises(DataError, match="not allowed"):
        offline._load_numpy_pickle_gz(path, "t")
    ok = tmp_path / "ok.gz"
    with gzip.open(ok, "wb") as f:
        pickle.dump(np.arange(6, dtype=np.uint8).reshape(2, 3), f)
    assert offline._load_numpy_pickle_gz(ok, "t").tolist() == [[0, 1, 2], [3, 4, 5]]


# ----------------------------------------------------------------------------------------------------- splits

def test_resolve_sizes() -> None:
    assert resolve_sizes((0.6, 0.2, 0.2), 1797) == [1078, 359, 360]
    assert resolve_sizes((10, 5), 20) == [10, 5]
    assert resolve_sizes((0.5,), 11) == [6]
    with pytest.raises(DataError):
        resolve_sizes((15, 10), 20)
    with pytest.raises(DataError):
        resolve_sizes((0.8, 0.4), 20)


def test_stratified_split_is_disjoint_stratified_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    parts = stratified_split(labels, (0.7, 0.1, 0.2), seed=3)
    assert [len(p) for p in parts] == [70, 10, 20]
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == 100
    # Per-class counts within one example of the exact proportion.
    for p, frac in zip(parts, (0.7, 0.1, 0.2), strict=True):
        counts = np.bincount(labels[p], minlength=4)
        assert np.all(np.abs(counts - frac * np.array([50, 30, 15, 5])) <= 1.0)
    again = stratified_split(labels, (0.7, 0.1, 0.2), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not np.array_equal(parts[0], stratified_split(labels, (0.7, 0.1, 0.2), seed=4)[0])
    counts = stratified_split(labels, (40, 10), seed=0)
    assert [len(p) for p in counts] == [40, 10] and not set(counts[0]) & set(counts[1])


def test_dedupe_keeps_first_copy_and_drops_conflicts() -> None:
    imgs = np.zeros((6, 2, 2), np.uint8)
    imgs[1, 0, 0] = 1          # unique
    imgs[2] = imgs[1]          # duplicate of 1, same label
    imgs[3, 0, 0] = 7          # conflicting pair 3/4
    imgs[4] = imgs[3]
    imgs[5, 1, 1] = 9          # unique
    labels = np.array([0, 1, 1, 2, 3, 0])
    res = dedupe(imgs, labels)
    assert res.keep.tolist() == [0, 1, 5]
    assert res.removed == 3 and res.conflicting == 1


def test_patches_from_regions_bands_share_no_pixels() -> None:
    h, w = 96, 320
    # Each pixel's value encodes its own column, so a patch reveals which columns it came from.
    image = np.tile(np.arange(w, dtype=np.int32), (h, 1))
    for stride in (None, (16, 32, 32)):
        parts = patches_from_regions(image, patch=32, fractions=(0.6, 0.2, 0.2), seed=5, stride=stride)
        cols = [set(np.unique(p).tolist()) for p in parts]
        assert not cols[0] & cols[1] and not cols[0] & cols[2] and not cols[1] & cols[2]
        assert all(p.shape[1:] == (32, 32) for p in parts)
    parts = patches_from_regions(image, patch=32, fractions=(0.6, 0.2, 0.2), seed=5)
    assert [len(p) for p in parts] == [6 * 3, 2 * 3, 2 * 3]
    with pytest.raises(DataError):
        patches_from_regions(np.zeros((20, 20)), patch=32)


# --------------------------------------------------------------------------------------------------- registry

def test_load_task_cache_unknown_and_class_subset() -> None:
    try:
        a = load_task("uci_digits", 0)
    except TaskUnavailable as exc:
        pytest.skip(str(exc))
    assert load_task("uci_digits", 0) is a  # cached
    with pytest.raises(DataError, match="uci_digits"):
        load_task("no_such_task", 0)
    sub = load_task("split:uci_digits:3-5", 0)
    assert sub.class_names == ["3", "4", "5"] and sub.num_classes == 3
    assert set(sub.train_y.tolist()) == {0, 1, 2}
    assert len(sub.train_y) == int(((a.train_y >= 3) & (a.train_y <= 5)).sum())
    mixed = load_task("split:uci_digits:0-1,9", 0)
    assert mixed.class_names == ["0", "1", "9"]
    for bad in ("split:uci_digits:5-3", "split:uci_digits:8-12", "split:uci_digits:4", "split:uci_digits"):
        with pytest.raises(DataError):
            load_task(bad, 0)


def test_register_task_decorator() -> None:
    def tiny(seed: int) -> TaskData:
        x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
        y = torch.tensor([0, 1, 0, 1])
        return TaskData("tiny_test_task", ["a", "b"], x, y, x, y, x, y)

    register_task("tiny_test_task")(tiny)
    try:
        assert load_task("tiny_test_task", 0).class_names == ["a", "b"]
        with pytest.raises(ValueError):
            register_task("tiny_test_task")(lambda seed: tiny(seed))
    finally:
        TASKS.pop("tiny_test_task")
