"""User data: image folders and npz files, including every error case."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from munet.data.registry import load_task
from munet.data.user import load_image_folder, load_npz
from munet.errors import DataError


def _img(rng: np.random.Generator, size: tuple[int, int] = (12, 10), colour: bool = False) -> Image.Image:
    shape = (*size, 3) if colour else size
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def _write_classes(root: Path, counts: dict[str, int], rng: np.random.Generator, colour_first: bool = False,
                   size: tuple[int, int] = (12, 10)) -> None:
    for i, (name, n) in enumerate(counts.items()):
        d = root / name
        d.mkdir(parents=True)
        for j in range(n):
            ext = ("png", "jpg", "bmp", "gif", "tiff", "webp")[j % 6]
            colour = colour_first and i == 0 and j == 0
            img = _img(rng, size, colour)
            img.save(d / f"{j}.{ext}", **({"quality": 95} if ext == "jpg" else {}))


def test_folder_auto_split_grey(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _write_classes(tmp_path / "ds", {"cat": 20, "dog": 10, "emu": 10}, rng)
    (tmp_path / "ds" / "cat" / "notes.txt").write_text("ignored: not an image extension")
    task = load_image_folder(tmp_path / "ds", seed=0)
    assert task.name == "ds" and task.class_names == ["cat", "dog", "emu"]
    assert sum(task.sizes().values()) == 40
    assert task.sizes() == {"train": 28, "val": 4, "test": 8}
    assert task.train_x.dtype == torch.uint8 and task.train_x.shape[1:] == (1, 12, 10)
    assert task.train_y.dtype == torch.int64
    again = load_image_folder(tmp_path / "ds", seed=0)
    assert torch.equal(task.train_x, again.train_x) and torch.equal(task.test_y, again.test_y)
    resized = load_image_folder(tmp_path / "ds", seed=0, name="custom", image_size=16)
    assert resized.name == "custom" and resized.train_x.shape[1:] == (1, 16, 16)


def test_folder_png_pixels_are_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
    arrays = {}
    for cls in ("a", "b"):
        for j in range(5):
            arr = rng.integers(0, 256, (6, 7), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{j}.png")
            arrays[arr.tobytes()] = cls
    task = load_image_folder(tmp_path, seed=0)
    for s in ("train", "val", "test"):
        x, y = task.split(s)
        for img, label in zip(x, y, strict=True):
            assert arrays[img[0].numpy().tobytes()] == task.class_names[int(label)]


def test_folder_colour_and_mixed_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    _write_classes(tmp_path, {"x": 5, "y": 5}, rng, colour_first=True)
    _img(rng, (30, 20)).save(tmp_path / "y" / "big.png")
    task = load_image_folder(tmp_path, seed=1)
    assert task.train_x.shape[1:] == (3, 64, 64)  # RGB because one image has colour; 64x64 because sizes differ
    task = load_image_folder(tmp_path, seed=1, default_size=20)
    assert task.train_x.shape[1:] == (3, 20, 20)


def test_folder_explicit_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    _write_classes(tmp_path / "train", {"a": 8, "b": 8}, rng)
    _write_classes(tmp_path / "validation", {"a": 2, "b": 3}, rng)
    _write_classes(tmp_path / "test", {"a": 4, "b": 1}, rng)
    task = load_image_folder(tmp_path, seed=0)
    assert task.sizes() == {"train": 16, "val": 5, "test": 5}
    assert task.test_y.tolist().count(0) == 4
    # Without a val folder, validation is carved from train.
    rng = np.random.default_rng(4)
    _write_classes(tmp_path / "two" / "train", {"a": 16, "b": 16}, rng)
    _write_classes(tmp_path / "two" / "test", {"a": 3, "b": 3}, rng)
    task = load_image_folder(tmp_path / "two", seed=0)
    assert task.sizes() == {"train": 28, "val": 4, "test": 6}


def test_folder_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing", seed=0)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        load_image_folder(tmp_path / "file.png", seed=0)
    _write_classes(tmp_path / "one", {"only": 3}, rng)
    with pytest.raises(DataError, match="at least 2 classes"):
        load_image_folder(tmp_path / "one", seed=0)
    _write_classes(tmp_path / "empty", {"a": 3}, rng)
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(DataError, match=r"empty.*b|b.*empty"):
        load_image_folder(tmp_path / "empty", seed=0)
    _write_classes(tmp_path / "corrupt", {"a": 3, "b": 3}, rng)
    (tmp_path / "corrupt" / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(DataError, match="broken.jpg"):
        load_image_folder(tmp_path / "corrupt", seed=0)
    _write_classes(tmp_path / "trunc", {"a": 3, "b": 3}, rng)
    good = tmp_path / "trunc" / "a" / "0.png"
    good.write_bytes(good.read_bytes()[:40])  # truncated PNG
    with pytest.raises(DataError, match="0.png"):
        load_image_folder(tmp_path / "trunc", seed=0)
    (tmp_path / "noclass").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path / "noclass", seed=0)


def test_an_unreadable_class_folder_is_named_as_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A class folder munet may not read (chmod 000 for a user; the tests run as root, who reads anything, so the
    refusal is injected where the folder is opened) says so, where it read as "class folder is empty"."""
    import os

    _write_classes(tmp_path / "ds", {"a": 3, "b": 3}, np.random.default_rng(0))
    locked, scandir = tmp_path / "ds" / "b", os.scandir

    def refusing(path):  # what the kernel answers a user without read permission
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(DataError, match=f"{locked}: cannot read the class folder \\(Permission denied\\)"):
        load_image_folder(tmp_path / "ds", seed=0)


def test_folders_named_like_splits_beside_class_folders_are_an_error(tmp_path: Path) -> None:
    """A split layout with a stray folder beside train/, or val/ and test/ without train/, was read as one folder
    per class: a task of the classes "other" and "train", or "test" and "val"."""
    rng = np.random.default_rng(9)
    layouts = {"stray": ("train", "other"), "no_train": ("val", "test"), "two_vals": ("train", "val", "validation")}
    for name, folders in layouts.items():
        for folder in folders:
            _write_classes(tmp_path / name / folder, {"a": 4, "b": 4}, rng)
    with pytest.raises(DataError, match=r"\['train'\] look like split folders .* but \['other'\] beside them"):
        load_image_folder(tmp_path / "stray", seed=0)
    with pytest.raises(DataError, match=r"\['test', 'val'\] look like split folders .* there is no train/ folder"):
        load_image_folder(tmp_path / "no_train", seed=0)
    with pytest.raises(DataError, match="two of them name the same split"):
        load_image_folder(tmp_path / "two_vals", seed=0)
    # a class that happens to be called "test", its images directly inside, is still a class
    _write_classes(tmp_path / "classes", {"test": 10, "exam": 10}, rng)
    assert load_image_folder(tmp_path / "classes", seed=0).class_names == ["exam", "test"]


def test_folder_via_registry(tmp_path: Path) -> None:
    _write_classes(tmp_path / "reg", {"a": 10, "b": 10}, np.random.default_rng(6))
    task = load_task(f"folder:{tmp_path / 'reg'}", 0)
    assert task.class_names == ["a", "b"]


# ------------------------------------------------------------------------------------------------------- npz

def test_npz_layouts_and_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (50, 9, 9), dtype=np.uint8)
    y = np.arange(50) % 5
    np.savez(tmp_path / "a.npz", x=x, y=y, class_names=np.array(list("abcde")))
    task = load_npz(tmp_path / "a.npz", seed=0)
    assert task.name == "a" and task.class_names == list("abcde")
    assert task.sizes() == {"train": 35, "val": 5, "test": 10}
    assert task.train_x.shape[1:] == (1, 9, 9)
    # NHWC and NCHW colour, float in [0, 1], keys images/labels.
    xc = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    yc = np.arange(20) % 2
    np.savez(tmp_path / "nhwc.npz", images=xc, labels=yc)
    np.savez(tmp_path / "nchw.npz", images=xc.transpose(0, 3, 1, 2), labels=yc)
    np.savez(tmp_path / "float.npz", x=xc.astype(np.float32) / 255.0, y=yc.astype(np.float64))
    a, b, c = (load_npz(tmp_path / f"{n}.npz", seed=2) for n in ("nhwc", "nchw", "float"))
    assert a.train_x.shape[1:] == (3, 8, 8)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_x, c.train_x)
    assert a.class_names == ["0", "1"]


def test_npz_split_keys(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    def xy(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (n, 5, 5), dtype=np.uint8), np.arange(n) % 3
    (xtr, ytr), (xva, yva), (xte, yte) = xy(24), xy(6), xy(9)
    np.savez(tmp_path / "s.npz", x_train=xtr, y_train=ytr, x_val=xva, y_val=yva, x_test=xte, y_test=yte)
    task = load_npz(tmp_path / "s.npz", seed=0)
    assert task.sizes() == {"train": 24, "val": 6, "test": 9}
    assert np.array_equal(task.val_x[:, 0].numpy(), xva)
    np.savez(tmp_path / "noval.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    task = load_npz(tmp_path / "noval.npz", seed=0)
    assert task.sizes() == {"train": 21, "val": 3, "test": 9}
    assert load_task(f"npz:{tmp_path / 'noval.npz'}", 0).sizes() == task.sizes()


@pytest.mark.parametrize("case, match", [
    ("missing_keys", "missing key"),
    ("missing_test", "x_test"),
    ("count_mismatch", "mismatch"),
    ("negative", ">= 0"),
    ("non_integer", "integers"),
    ("string_labels", "integers"),
    ("out_of_range", "out of range"),
    ("bad_channels", "channel"),
    ("bad_float_range", r"\[0, 1\]"),
    ("one_class", "at least 2 classes"),
    ("shape_between_splits", "different image shapes"),
    ("object_array", "holds an object array"),
    ("corrupt", "not a readable .npz archive"),
    ("not_npz", "not a readable .npz archive"),
    ("missing_file", "does not exist"),
    ("folder", "is a folder, not a file"),  # once "does not exist"
    ("member_not_array", "member 'x' is not a numpy array"),  # once "images must have shape ...; got ()"
    ("rgba", r"with C in \{1, 3\}; drop the alpha channel"),  # once "{{1, 3}}"
    ("sixteen_bit", "16-bit images divided by 257"),
    ("huge_unsigned_label", "label 9223372036854775808 is out of range"),  # once "must be >= 0, found -9.2e18"
])
def test_npz_errors(tmp_path: Path, case: str, match: str) -> None:
    x = np.zeros((10, 4, 4), np.uint8)
    x[:, 0, 0] = np.arange(10)
    y = np.arange(10) % 2
    path = tmp_path / f"{case}.npz"
    if case == "missing_keys":
        np.savez(path, pixels=x, y=y)
    elif case == "missing_test":
        np.savez(path, x_train=x, y_train=y)
    elif case == "count_mismatch":
        np.savez(path, x=x, y=y[:7])
    elif case == "negative":
        np.savez(path, x=x, y=y - 1)
    elif case == "non_integer":
        np.savez(path, x=x, y=y + 0.5)
    elif case == "string_labels":
        np.savez(path, x=x, y=np.array(["a", "b"] * 5))
    elif case == "out_of_range":
        np.savez(path, x=x, y=y * 3, class_names=np.array(["a", "b"]))
    elif case == "bad_channels":
        np.savez(path, x=np.zeros((10, 5, 4, 4), np.uint8), y=y)
    elif case == "bad_float_range":
        np.savez(path, x=x.astype(np.float32), y=y)
    elif case == "one_class":
        np.savez(path, x=x, y=np.zeros(10, np.int64))
    elif case == "shape_between_splits":
        np.savez(path, x_train=x, y_train=y, x_test=np.zeros((4, 5, 5), np.uint8), y_test=y[:4])
    elif case == "object_array":
        np.savez(path, x=x, y=y, class_names=np.array(["a", None], dtype=object))
    elif case == "corrupt":
        path.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    elif case == "not_npz":  # a .npy saved under an .npz name
        np.save(tmp_path / "array.npy", x)
        (tmp_path / "array.npy").rename(path)
    elif case == "missing_file":
        path = tmp_path / "nope.npz"
    elif case == "folder":
        path.mkdir()
    elif case == "member_not_array":  # a zip whose x.npy is not what numpy.save writes
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", b"not an array")
            archive.writestr("y.npy", b"nor this")
    elif case == "rgba":
        np.savez(path, x=np.zeros((10, 4, 4, 4), np.uint8), y=y)
    elif case == "sixteen_bit":
        np.savez(path, x=x.astype(np.uint16) * 257, y=y)
    elif case == "huge_unsigned_label":
        np.savez(path, x=x, y=np.where(y == 1, np.uint64(2**63), np.uint64(0)))
    with pytest.raises(DataError, match=match):
        load_npz(path, seed=0)
