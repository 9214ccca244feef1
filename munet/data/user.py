"""User-provided data: a folder of images (one sub-folder per class) or a ``.npz`` file of arrays.

Both loaders return a :class:`~munet.data.task.TaskData` with uint8 ``(N, C, H, W)`` images, ``C`` in {1, 3}. Every
problem with the input raises :class:`~munet.errors.DataError` naming the file or folder and what is wrong, because
these messages are what a user sees when their data does not load.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from munet.data.images import (
    DEFAULT_FOLDER_SIZE,
    image_extensions,
    image_header,
    images_to_nchw_uint8,
    lazy_geometry,
    read_image,
    resize_array,
    size_tuple,
    stack_pil_images,
)
from munet.data.rows import FileRows, ImageRows, NpyRows, data_cache_bytes, image_layout, npz_members, select
from munet.data.splits import stratified_split
from munet.data.task import TaskData
from munet.errors import DataError

__all__ = ["absolute_spec", "load_image_folder", "load_npz", "task_from_arrays"]

log = logging.getLogger(__name__)

_SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# Fractions used when a folder or file has no explicit splits: 70 / 10 / 20 % of each class.
_AUTO_FRACTIONS = (0.7, 0.1, 0.2)


def absolute_spec(spec: str) -> str:
    """``spec`` with the path of a ``folder:`` or ``npz:`` source made absolute (inside ``split:`` too), so that it
    names the same data from any working directory: a run stores its specs and is resumed from anywhere."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("folder", "npz") and rest:
        return f"{kind}:{Path(rest).expanduser().absolute()}"
    base, sep, selection = rest.rpartition(":")
    if kind == "split" and sep and base:
        return f"split:{absolute_spec(base)}:{selection}"
    return spec


def _labels_to_int64(y: np.ndarray, source: str) -> np.ndarray:
    """Validates labels: 1-D (or ``(N, 1)``), integer-valued, non-negative."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{source}: labels must be a 1-D array of class indices, got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
        # Integral floats (1.0) are a common accident of numpy pipelines; anything else is not a class index.
        if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
            raise DataError(f"{source}: labels must be integers, found non-integer values such as "
                            f"{y[~np.isfinite(y) | (y != np.round(y))][:3].tolist()}")
    elif not (np.issubdtype(y.dtype, np.integer) and not np.issubdtype(y.dtype, np.bool_)):
        raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.unsignedinteger) and len(y) and int(y.max()) > np.iinfo(np.int64).max:
        raise DataError(f"{source}: label {int(y.max())} is out of range: labels are class indices 0..K-1")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, found {int(y.min())}")
    return y


def task_from_arrays(
    name: str,
    splits: Mapping[str, tuple[np.ndarray | ImageRows, np.ndarray]],
    seed: int,
    class_names: Sequence[str] | None = None,
    description: str = "",
    source: str = "",
    val_fraction: float = _AUTO_FRACTIONS[1] / (1 - _AUTO_FRACTIONS[2]),
) -> TaskData:
    """Builds a :class:`TaskData` from validated uint8 NCHW arrays, carving missing splits.

    Args:
        name: task name.
        splits: ``{"train": (x, y), "val": (x, y), "test": (x, y)}``; ``"all"`` alone means "split 70/10/20";
            a missing ``"val"`` is carved from train with ``val_fraction``; a missing ``"test"`` takes 20 % of train.
        seed: seeds the stratified carving.
        class_names: names per class; default ``"0", "1", ...``.
        description: one-line provenance.
        source: path or id used in error messages.
        val_fraction: share of the train split moved to validation when no validation split is given.

    Raises:
        DataError: labels out of range, fewer than 2 classes, inconsistent image shapes, empty splits.
    """
    parts = dict(splits)
    # Validate labels before carving splits: a bad label is the more useful message than "split is empty".
    top = max((int(y.max()) for _, y in parts.values() if len(y)), default=-1) + 1
    if class_names is None:
        # the classes are then 0..top-1: bound top before naming them (a label of 2**40 once built 2**40 names)
        examples = sum(len(y) for _, y in parts.values())
        if top > examples:
            raise DataError(f"{source}: label {top - 1} is out of range: labels are class indices 0..K-1, and "
                            f"{examples} examples cannot hold more than {examples} classes (relabel the classes "
                            "0..K-1, or give class_names)")
        class_names = [str(i) for i in range(top)]
    class_names = [str(c) for c in class_names]
    if top > len(class_names):
        raise DataError(f"{source}: label {top - 1} is out of range for {len(class_names)} class names "
                        f"{class_names[:10]}")
    if len(class_names) < 2:
        raise DataError(f"{source}: a classification task needs at least 2 classes, found {len(class_names)}")
    if "all" in parts:
        x, y = parts.pop("all")
        tr, va, te = stratified_split(y, _AUTO_FRACTIONS, seed)
        parts = {"train": (select(x, tr), y[tr]), "val": (select(x, va), y[va]), "test": (select(x, te), y[te])}
    if "train" not in parts:
        raise DataError(f"{source}: no training split")
    if "test" not in parts:
        x, y = parts["train"]
        tr, te = stratified_split(y, (1 - _AUTO_FRACTIONS[2], _AUTO_FRACTIONS[2]), seed)
        parts["train"], parts["test"] = (select(x, tr), y[tr]), (select(x, te), y[te])
    if "val" not in parts:
        x, y = parts["train"]
        # A different seed stream than the test carve, so the two carves are independent draws.
        tr, va = stratified_split(y, (1 - val_fraction, val_fraction), seed + 1)
        parts["train"], parts["val"] = (select(x, tr), y[tr]), (select(x, va), y[va])
    shapes = {k: tuple(v[0].shape[1:]) for k, v in parts.items()}
    if len(set(shapes.values())) != 1:
        raise DataError(f"{source}: splits have different image shapes (C, H, W): {shapes}")
    for k in ("train", "val", "test"):
        if len(parts[k][1]) == 0:
            raise DataError(f"{source}: the {k} split is empty (too few examples to split)")

    def t(a: np.ndarray | ImageRows, dtype: torch.dtype) -> torch.Tensor | ImageRows:
        return a if isinstance(a, ImageRows) else torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    return TaskData(name=name, class_names=list(class_names),
                    train_x=t(parts["train"][0], torch.uint8), train_y=t(parts["train"][1], torch.int64),
                    val_x=t(parts["val"][0], torch.uint8), val_y=t(parts["val"][1], torch.int64),
                    test_x=t(parts["test"][0], torch.uint8), test_y=t(parts["test"][1], torch.int64),
                    description=description)


# --------------------------------------------------------------------------------------------------- image folder

def _list_images(folder: Path, exts: set[str]) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden files skipped), sorted for a deterministic order."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in exts and not any(part.startswith(".") for part in
                                                                         p.relative_to(folder).parts))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _list_class_tree(folder: Path, class_names: list[str] | None, exts: set[str]
                     ) -> tuple[list[str], list[Path], np.ndarray]:
    """The image files of ``folder/<class>/*`` and their labels; with ``class_names`` given, the folder's classes
    must be among them."""
    dirs = _class_dirs(folder)
    if not dirs:
        raise DataError(f"{folder}: no class sub-folders (expected one sub-folder of images per class)")
    names = [d.name for d in dirs]
    if class_names is None:
        if len(names) < 2:
            raise DataError(f"{folder}: found {len(names)} class folder ({names}); a task needs at least 2 classes")
        class_names = names
    else:
        unknown = sorted(set(names) - set(class_names))
        if unknown:
            raise DataError(f"{folder}: class folders {unknown} do not exist in the train split ({class_names})")
    found: list[Path] = []
    labels: list[int] = []
    for d in dirs:
        try:  # rglob passes over a folder it cannot read: without this, "empty" would be the message
            os.scandir(d).close()
        except OSError as err:
            raise DataError(f"{d}: cannot read the class folder ({err.strerror or err}); give munet read access to "
                            "it, or move it out of the task folder") from None
        files = _list_images(d, exts)
        if not files:
            raise DataError(f"{d}: class folder is empty (no readable image files with extensions like .png, .jpg)")
        found += files
        labels += [class_names.index(d.name)] * len(files)
    return class_names, found, np.asarray(labels, dtype=np.int64)


def _check_no_split_folders(root: Path, top: list[Path]) -> None:
    """Raises when a folder that is not a split layout has folders named like splits that hold class folders
    (``train/`` beside other folders, ``val/`` and ``test/`` without ``train/``, ``val/`` beside ``validation/``):
    read as one folder per class, they would become classes named ``train``, ``val`` or ``test``."""
    named = [d for d in top if d.name.lower() in _SPLIT_DIRS]
    splits = sorted(d.name for d in named if _class_dirs(d))
    if not splits:
        return
    others = sorted(d.name for d in top if d not in named)
    why = ("there is no train/ folder" if not any(_SPLIT_DIRS[d.name.lower()] == "train" for d in named) else
           f"{others} beside them are not split folders" if others else "two of them name the same split")
    raise DataError(f"{root}: {splits} look like split folders (they hold class sub-folders), but {why}, so they "
                    "would be read as classes; put the class folders under train/ (and val/, test/), with nothing "
                    "else beside them, or give one sub-folder of images per class")


def load_image_folder(path: str | Path, seed: int, name: str | None = None,
                      image_size: int | Sequence[int] | None = None,
                      default_size: int = DEFAULT_FOLDER_SIZE, lazy: bool | None = None) -> TaskData:
    """Loads a classification task from a folder of images.

    Layouts:
        * ``PATH/<class>/<image>``: split automatically, stratified 70 / 10 / 20 % with ``seed``.
        * ``PATH/train/<class>/...``, ``PATH/val/<class>/...`` (or ``validation/``, ``valid/``),
          ``PATH/test/<class>/...``: the given splits are used; a missing ``val`` is carved from train (1/8, so
          70/10 of the whole when test is 20 %), a missing ``test`` takes 20 % of train.

    Class names are the sorted class-folder names. Images may be any format PIL reads (png, jpg, bmp, gif, tiff,
    webp, ...), in nested folders too; hidden files and files with other extensions are ignored. All images are
    stored as grey, or as RGB when any image has colour, at one common size. A folder whose decoded images would
    not fit the pixel budget (``data_cache_mb``, estimated from the first image) is decoded per batch
    (:class:`~munet.data.rows.FileRows`); its images are then RGB unless every file is stored grey.

    Args:
        path: the folder.
        seed: seeds the automatic splits.
        name: task name; default the folder name.
        image_size: stored size (int or ``(h, w)``); default the common size if all images share it, else
            ``default_size`` square.
        default_size: square size used when sizes differ and ``image_size`` is None.
        lazy: decode per batch (True), all at once (False); None: per batch when the images would not fit the
            pixel budget.

    Raises:
        DataError: missing folder, fewer than 2 classes, an empty class folder, an unreadable or corrupt image.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder (expected one sub-folder of images per class)")
    exts = image_extensions()
    top = _class_dirs(root)
    split_dirs = {_SPLIT_DIRS[d.name.lower()]: d for d in top if d.name.lower() in _SPLIT_DIRS}
    files: dict[str, list[Path]] = {}
    labels: dict[str, np.ndarray] = {}
    if "train" in split_dirs and len(split_dirs) == len(top):
        class_names, files["train"], labels["train"] = _list_class_tree(split_dirs["train"], None, exts)
        for k in ("val", "test"):
            if k in split_dirs:
                _, files[k], labels[k] = _list_class_tree(split_dirs[k], class_names, exts)
    else:
        _check_no_split_folders(root, top)
        class_names, files["all"], labels["all"] = _list_class_tree(root, None, exts)
    # All splits together, so they share one channel count and one stored size.
    order = list(files)
    every = [f for k in order for f in files[k]]
    if lazy is None:
        first = size_tuple(image_size) or image_header(every[0], str(every[0]))[0]
        lazy = len(every) * 3 * first[0] * first[1] > data_cache_bytes()
    if lazy:
        size, channels = lazy_geometry([image_header(f, str(f)) for f in every], image_size, default_size)
        stacked: np.ndarray | FileRows = FileRows(every, size, channels, read_image, resize_array)
    else:
        stacked = stack_pil_images([read_image(f) for f in every], image_size, default_size)
    splits: dict[str, tuple[np.ndarray | ImageRows, np.ndarray]] = {}
    start = 0
    for k in order:
        n = len(files[k])
        splits[k] = (select(stacked, slice(start, start + n)), labels[k])
        start += n
    return task_from_arrays(name or root.resolve().name, splits, seed, class_names,
                            description=f"image folder {root}", source=str(root),
                            val_fraction=_AUTO_FRACTIONS[1] / (1 - _AUTO_FRACTIONS[2]))


# ----------------------------------------------------------------------------------------------------------- npz

_X_KEYS = ("x", "images")
_SPLIT_X_KEYS = ("x_train", "x_val", "x_test")
_Y_KEYS = ("y", "labels")


def _images_in_place(path: Path, lazy: bool | None) -> dict[str, NpyRows]:
    """The image arrays of an ``.npz`` to read per batch, by key: uncompressed, C-ordered, uint8 members with
    ``lazy``, or (``lazy`` None) when together they would not fit the pixel budget; none with ``lazy`` False."""
    if lazy is False:
        return {}
    keys = _X_KEYS + _SPLIT_X_KEYS
    with zipfile.ZipFile(path) as archive:  # the arrays' sizes as stored, compressed members included
        stored = {info.filename[:-4]: info.file_size for info in archive.infolist() if info.filename[:-4] in keys}
    if lazy is None and sum(stored.values()) <= data_cache_bytes():
        return {}
    readable = {k: (offset, shape) for k, (offset, dtype, shape, fortran) in npz_members(path).items()
                if k in keys and dtype == np.uint8 and not fortran and len(shape) in (3, 4) and shape[0] and
                min(shape[1:])}
    if len(readable) < len(stored):
        log.warning("%s: images stored compressed or not as uint8 are loaded whole; save them with np.savez as "
                    "uint8 to read them per batch", path)
    return {k: NpyRows(path, offset, shape, image_layout(shape, f"{path} [{k}]"))
            for k, (offset, shape) in readable.items()}


def _member(data: Mapping[str, np.ndarray | NpyRows | bytes], key: str, source: str) -> np.ndarray | NpyRows:
    """The array ``key`` of an ``.npz``; numpy hands back a member without the ``.npy`` header as its raw bytes."""
    value = data[key]
    if not isinstance(value, (np.ndarray, NpyRows)):
        raise DataError(f"{source}: member {key!r} is not a numpy array (it has no .npy header); write the file "
                        "with numpy.savez")
    return value


def load_npz(path: str | Path, seed: int, name: str | None = None, lazy: bool | None = None) -> TaskData:
    """Loads a classification task from a ``.npz`` file.

    Keys:
        * ``x`` (or ``images``) and ``y`` (or ``labels``): one pool, split stratified 70 / 10 / 20 % with ``seed``;
        * or ``x_train, y_train, x_test, y_test`` and optionally ``x_val, y_val`` (else 1/8 of train becomes val);
        * optional ``class_names``: a string array, one per class.

    Images are ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` with ``C`` in {1, 3}, uint8 or float in [0, 1].
    Labels are integer class indices ``0 .. K-1``. The file is read with ``allow_pickle=False``. Images that would
    not fit the pixel budget (``data_cache_mb``) are read per batch, in place, when the file stores them
    uncompressed as uint8 (``np.savez``, not ``np.savez_compressed``); see :class:`~munet.data.rows.NpyRows`.

    Args:
        path: the ``.npz`` file.
        seed: seeds the automatic splits.
        name: task name; default the file stem.
        lazy: read the images per batch where the file allows (True), all at once (False); None: per batch when
            they would not fit the pixel budget.

    Raises:
        DataError: missing or corrupt file, missing keys, image/label count mismatch, non-integer, negative or
            out-of-range labels, bad image shapes or value ranges.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"npz file {p} is a folder, not a file; give the .npz file (a folder of images is "
                        f"folder:{p})")
    if not p.is_file():
        raise DataError(f"npz file {p} does not exist")
    try:
        in_place = _images_in_place(p, lazy)
        with np.load(p, allow_pickle=False) as f:
            data: dict[str, np.ndarray | NpyRows | bytes] = {k: in_place[k] if k in in_place else f[k]
                                                              for k in f.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        if isinstance(exc, ValueError) and "allow_pickle" in str(exc):
            raise DataError(f"npz file {p} holds an object array, which munet does not read (it would run "
                            "pickled code); store images and labels as numeric arrays and class_names as a string "
                            "array") from exc
        raise DataError(f"cannot read npz file {p}: it is not a readable .npz archive ({type(exc).__name__}: {exc}); "
                        "write it with numpy.savez") from exc
    src = str(p)
    pairs: dict[str, tuple[np.ndarray | NpyRows, np.ndarray]] = {}
    if "x_train" in data or "y_train" in data:
        for split in ("train", "val", "test"):
            xk, yk = f"x_{split}", f"y_{split}"
            if split == "val" and xk not in data and yk not in data:
                continue
            missing = [k for k in (xk, yk) if k not in data]
            if missing:
                raise DataError(f"{src}: missing key(s) {missing}; found {sorted(data)}")
            pairs[split] = (_member(data, xk, src), _member(data, yk, src))
    else:
        xk = next((k for k in _X_KEYS if k in data), None)
        yk = next((k for k in _Y_KEYS if k in data), None)
        if xk is None or yk is None:
            raise DataError(f"{src}: missing keys: need 'x' (or 'images') and 'y' (or 'labels'), or "
                            f"x_train/y_train/x_test/y_test; found {sorted(data)}")
        pairs["all"] = (_member(data, xk, src), _member(data, yk, src))
    splits: dict[str, tuple[np.ndarray | ImageRows, np.ndarray]] = {}
    for split, (x, y) in pairs.items():
        where = f"{src} [{split}]"
        xs = x if isinstance(x, NpyRows) else images_to_nchw_uint8(x, where)
        ys = _labels_to_int64(y, where)
        if len(xs) != len(ys):
            raise DataError(f"{where}: {len(xs)} images but {len(ys)} labels (shape mismatch)")
        splits[split] = (xs, ys)
    class_names = None
    if "class_names" in data:
        cn = _member(data, "class_names", src)
        if cn.ndim != 1 or not (np.issubdtype(cn.dtype, np.str_) or np.issubdtype(cn.dtype, np.bytes_)):
            raise DataError(f"{src}: class_names must be a 1-D string array, got dtype {cn.dtype} shape {cn.shape}")
        class_names = [c.decode() if isinstance(c, bytes) else str(c) for c in cn.tolist()]
    return task_from_arrays(name or p.stem, splits, seed, class_names, description=f"npz file {p}", source=src)
