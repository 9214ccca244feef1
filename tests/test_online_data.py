"""Online loaders on local fixtures only: nothing is downloaded."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image
from torchvision.datasets.utils import verify_str_arg

from munet.data.online import load_hf, load_torchvision, parse_torchvision_name
from munet.data.registry import load_task
from munet.errors import DataError


def _write_idx(path: Path, arr: np.ndarray) -> None:
    """Writes an uncompressed unsigned-byte IDX file (the MNIST raw format)."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def _mnist_like(raw: Path, prefix: str, n_train: int, n_test: int, classes: list[int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k" if not prefix else "test", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = np.array([classes[i % len(classes)] for i in range(n)], dtype=np.uint8)
        _write_idx(raw / f"{prefix}{split}-images-idx3-ubyte", x)
        _write_idx(raw / f"{prefix}{split}-labels-idx1-ubyte", y)
        out[split] = x
    return out


def test_mnist_idx_fixture_without_download(tmp_path: Path) -> None:
    arrays = _mnist_like(tmp_path / "MNIST" / "raw", "", 200, 50, list(range(10)))
    task = load_torchvision("MNIST", tmp_path, seed=0, download=False)
    assert task.sizes() == {"train": 190, "val": 10, "test": 50}  # 5 % of train carved for validation
    assert task.num_classes == 10 and task.class_names[0].startswith("0")
    assert task.train_x.dtype == torch.uint8 and task.train_x.shape[1:] == (1, 28, 28)
    assert np.array_equal(task.test_x[:, 0].numpy(), arrays["t10k"])
    again = load_torchvision("MNIST", tmp_path, seed=0, download=False)
    assert torch.equal(task.val_x, again.val_x)
    # Through the registry: data_dir/torchvision is the root, and existing files are not downloaded again.
    _mnist_like(tmp_path / "dd" / "torchvision" / "MNIST" / "raw", "", 100, 20, list(range(10)))
    reg = load_task("torchvision:MNIST", 0, data_dir=str(tmp_path / "dd"))
    assert reg.sizes() == {"train": 95, "val": 5, "test": 20}


def test_emnist_variant_and_unused_class_removed(tmp_path: Path) -> None:
    # EMNIST letters labels are 1..26 with an unused "N/A" class 0; the task keeps only the 26 letters.
    _mnist_like(tmp_path / "EMNIST" / "raw", "emnist-letters-", 260, 52, list(range(1, 27)))
    task = load_torchvision("EMNIST:letters", tmp_path, seed=1, download=False)
    assert task.num_classes == 26 and task.class_names[0] == "a" and task.class_names[-1] == "z"
    assert int(task.train_y.min()) == 0 and int(task.train_y.max()) == 25
    assert task.sizes()["test"] == 52


def test_missing_files_without_download_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="download=False"):
        load_torchvision("KMNIST", tmp_path, seed=0, download=False)
    with pytest.raises(DataError, match="no dataset class"):
        load_torchvision("NotADataset", tmp_path, seed=0, download=False)
    with pytest.raises(DataError, match="Valid values"):
        load_torchvision("EMNIST:nonsense", tmp_path, seed=0, download=False)
    with pytest.raises(DataError, match="KEY=VALUE"):
        load_torchvision("MNIST:weird", tmp_path, seed=0, download=False)


def test_a_loader_error_of_several_lines_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A download failure's message spans lines (a URL, then the reason); the CLI prints one line."""
    class Unreachable:
        def __init__(self, root: str, train: bool = True, transform: Any = None, download: bool = False) -> None:
            raise RuntimeError("Error downloading train-images.gz:\nTried https://example.org/a, got:\n<urlopen error>")

    monkeypatch.setattr(tvd, "FakeUnreachable", Unreachable, raising=False)
    with pytest.raises(DataError, match="Error downloading train-images.gz: Tried https://example.org/a, got:"):
        load_torchvision("FakeUnreachable", tmp_path, seed=0)


def test_parse_torchvision_name() -> None:
    assert parse_torchvision_name("EMNIST:digits") == ("EMNIST", {"split": "digits"})
    assert parse_torchvision_name("Omniglot:background=False") == ("Omniglot", {"background": False})
    assert parse_torchvision_name("FakeData:size=12,num_classes=3") == ("FakeData", {"size": 12, "num_classes": 3})


def test_fakedata_single_set_is_carved(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    task = load_torchvision("FakeData:size=60,num_classes=3,random_offset=7", tmp_path, seed=0)
    assert sum(task.sizes().values()) == 60
    assert task.sizes()["test"] == 12  # 20 % test carve for single-set datasets
    assert task.train_x.shape[1] == 3 and task.train_x.dtype == torch.uint8


class _SplitDataset:
    """Stands in for SVHN / Flowers102-style classes: ``split=`` selects train / val / test."""

    def __init__(self, root: str, split: str = "train", transform: Any = None, download: bool = False) -> None:
        verify_str_arg(split, "split", ("train", "val", "test"))
        n = {"train": 40, "val": 10, "test": 20}[split]
        rng = np.random.default_rng(len(split))
        self.items = [(Image.fromarray(rng.integers(0, 256, (9 + i % 3, 9, 3), dtype=np.uint8)), i % 4)
                      for i in range(n)]
        self.classes = ["w", "x", "y", "z"]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.items[i]


class _BackgroundDataset(_SplitDataset):
    """Stands in for Omniglot: ``background=`` picks a set with different classes."""

    def __init__(self, root: str, background: bool = True, transform: Any = None, download: bool = False) -> None:
        super().__init__(root, "train")


def test_split_and_background_constructors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tvd, "FakeSplitSet", _SplitDataset, raising=False)
    monkeypatch.setattr(tvd, "FakeBackgroundSet", _BackgroundDataset, raising=False)
    task = load_torchvision("FakeSplitSet", tmp_path, seed=0, image_size=8)
    assert task.sizes() == {"train": 40, "val": 10, "test": 20}  # the dataset's own val split is used
    assert task.class_names == ["w", "x", "y", "z"] and task.train_x.shape[1:] == (3, 8, 8)
    bg = load_torchvision("FakeBackgroundSet", tmp_path, seed=0, image_size=8)
    assert bg.sizes() == {"train": 30, "val": 2, "test": 8}


# ------------------------------------------------------------------------------------------------ Hugging Face

class ClassLabel:  # same type name as datasets.ClassLabel, which is how columns are detected
    def __init__(self, names: list[str]) -> None:
        self.names = names


class Image_:  # noqa: N801
    pass


Image_.__name__ = "Image"  # datasets.Image


class _FakeSplit:
    def __init__(self, columns: dict[str, list[Any]], features: dict[str, Any]) -> None:
        self.columns, self.features = columns, features
        self.column_names = list(columns)

    def __getitem__(self, key: str) -> list[Any]:
        return self.columns[key]

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))


def _fake_hf(n: dict[str, int], image_col: str = "img", label_col: str = "fine_label",
             unlabelled_test: bool = False) -> dict[str, _FakeSplit]:
    rng = np.random.default_rng(0)
    features = {image_col: Image_(), label_col: ClassLabel(["ant", "bee", "cow"]), "id": object()}
    out = {}
    for split, count in n.items():
        imgs = [Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)) for _ in range(count)]
        labels = [-1] * count if (unlabelled_test and split == "test") else [i % 3 for i in range(count)]
        out[split] = _FakeSplit({image_col: imgs, label_col: labels, "id": list(range(count))}, features)
    return out


def test_hf_fake_dataset_dict() -> None:
    task = load_hf(_fake_hf({"train": 60, "validation": 9, "test": 15}), seed=0)
    assert task.class_names == ["ant", "bee", "cow"]
    assert task.sizes() == {"train": 60, "val": 9, "test": 15}
    assert task.train_x.shape[1:] == (1, 10, 10) and task.train_x.dtype == torch.uint8
    carved = load_hf(_fake_hf({"train": 60, "test": 15}), seed=0)
    assert carved.sizes() == {"train": 57, "val": 3, "test": 15}
    hidden = load_hf(_fake_hf({"train": 60, "test": 15}, unlabelled_test=True), seed=0)
    assert hidden.sizes()["test"] == 12  # unlabelled test split ignored, 20 % of train carved instead
    again = load_hf(_fake_hf({"train": 60, "test": 15}), seed=0)
    assert torch.equal(carved.val_x, again.val_x)


def test_hf_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="no split 'train'"):
        load_hf({"test": _fake_hf({"test": 5})["test"]}, seed=0)
    with pytest.raises(DataError, match="image column"):
        load_hf(_fake_hf({"train": 10}), seed=0, image_column="pixels")
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail, installed or not
    with pytest.raises(DataError, match="pip install datasets"):
        load_hf("user/some-dataset", seed=0)
    with pytest.raises(DataError, match="pip install datasets"):
        load_task("hf:user/some-dataset", 0)
