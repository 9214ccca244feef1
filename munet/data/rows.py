"""Images read per batch instead of held in memory: the split of a task too large to decode whole.

An :class:`ImageRows` behaves like the uint8 ``(N, C, H, W)`` tensor a small task keeps in memory where training and
evaluation read it: ``len(rows)``, ``rows.shape`` and ``rows[idx]`` (a batch, as a tensor). Sources:

* :class:`NpyRows`: an uncompressed ``.npy`` array, standalone or a member of an uncompressed ``.npz`` (``np.savez``),
  read in place with positioned reads (``os.pread``), so neither the file nor a memory map of it becomes resident;
* :class:`FileRows`: image files decoded (and resized) when a batch asks for them;
* :class:`HFRows`: a Hugging Face ``datasets`` split (Arrow, memory-mapped by ``datasets``), decoded per batch;
* :class:`RowSubset`: selected rows of another source (a task's splits carved from one pool, a class subset).

Decoded rows are kept while they fit the process's pixel budget (:func:`set_data_cache_bytes`, the run's
``data_cache_mb``): each source is granted what is left of the budget when it is first read and caches its rows
with index below what that grant holds ("cache what fits": no eviction, so a row is either always or never cached).
A source whose rows do not all fit says so once in the log.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from munet.errors import DataError

__all__ = ["FileRows", "HFRows", "ImageRows", "NpyRows", "RowSubset", "data_cache_bytes", "image_layout",
           "npz_members", "select", "set_data_cache_bytes", "to_nchw"]

log = logging.getLogger(__name__)

#: Default pixel budget of the process (the config's ``data_cache_mb`` replaces it for a run).
DEFAULT_DATA_CACHE_BYTES = 1024 << 20


class _Budget:
    """Bytes of decoded pixels the process's sources may keep; grants return when their source is collected."""

    def __init__(self, limit: int):
        self.limit = limit
        self.granted = 0
        self._lock = threading.Lock()  # training batches may be read in a prefetch thread (training/batches.py)

    def grant(self, wanted: int) -> int:
        with self._lock:
            given = max(0, min(wanted, self.limit - self.granted))
            self.granted += given
            return given

    def release(self, given: int) -> None:
        with self._lock:
            self.granted -= given


_budget = _Budget(DEFAULT_DATA_CACHE_BYTES)


def set_data_cache_bytes(limit: int) -> None:
    """Bounds the decoded pixels all sources of this process keep (sources read before keep their grants)."""
    _budget.limit = int(limit)


def data_cache_bytes() -> int:
    """The process's pixel budget in bytes."""
    return _budget.limit


def image_layout(shape: tuple[int, ...], source: str) -> str:
    """The layout of an image array of ``shape``: ``"nhw"``, ``"nhwc"`` or ``"nchw"``, channels 1 or 3.

    Raises:
        DataError: a shape of another rank or without a channel axis of size 1 or 3.
    """
    if len(shape) == 3:
        return "nhw"
    if len(shape) != 4:
        raise DataError(f"{source}: images must have shape (N,H,W), (N,H,W,C) or (N,C,H,W); got {shape}")
    if shape[1] in (1, 3) and shape[-1] not in (1, 3):
        return "nchw"
    if shape[-1] in (1, 3):  # channels-last, also for the ambiguous (N, 3, H, 3): the usual numpy/PIL layout
        return "nhwc"
    alpha = "; drop the alpha channel of RGBA images" if 4 in (shape[1], shape[-1]) else ""
    raise DataError(f"{source}: images of shape {shape} have no channel axis of size 1 or 3 "
                    f"(expected (N,H,W), (N,H,W,C) or (N,C,H,W) with C in {{1, 3}}{alpha})")


def to_nchw(x: np.ndarray, layout: str) -> np.ndarray:
    """A view of images in ``layout`` (see :func:`image_layout`) as ``(N, C, H, W)``."""
    return x[:, None] if layout == "nhw" else x.transpose(0, 3, 1, 2) if layout == "nhwc" else x


def _row_indices(index: Any, n: int) -> np.ndarray:
    """Row numbers of an index (int, slice, bool mask, integer array or tensor), bounds-checked."""
    if isinstance(index, slice):
        return np.arange(n)[index]
    if isinstance(index, torch.Tensor):
        index = index.cpu().numpy()
    rows = np.asarray(index)
    if rows.dtype == np.bool_:
        rows = np.flatnonzero(rows)
    rows = rows.astype(np.int64).reshape(-1)
    rows = np.where(rows < 0, rows + n, rows)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise IndexError(f"row index out of range for {n} rows")
    return rows


class ImageRows(ABC):
    """uint8 images ``(N, C, H, W)`` read when asked for, the first rows cached while the pixel budget lasts.

    Args:
        shape: ``(N, C, H, W)`` of the whole source.
        name: what the source is, for the log line.
    """

    def __init__(self, shape: tuple[int, int, int, int], name: str):
        self.shape = tuple(int(s) for s in shape)
        self.name = name
        self._cache: np.ndarray | None = None
        self._cached: np.ndarray | None = None  # bool per cached row: filled yet

    @abstractmethod
    def read(self, rows: np.ndarray) -> np.ndarray:
        """Reads rows ``rows`` (in that order) as uint8 ``(B, C, H, W)``, bypassing the cache."""

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:]))

    @property
    def nbytes(self) -> int:
        """Bytes of the whole source once decoded."""
        return len(self) * self.row_bytes

    def __getitem__(self, index: Any) -> torch.Tensor:
        rows = _row_indices(index, len(self))
        if isinstance(index, (int, np.integer)):
            return self[rows][0]
        if self._cache is None:
            self._open_cache()
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        cap = len(self._cache)
        hit = rows < cap
        hit[hit] = self._cached[rows[hit]]
        out[hit] = self._cache[rows[hit]]
        if not hit.all():
            miss = np.flatnonzero(~hit)
            out[miss] = self.read(rows[miss])
            keep = miss[rows[miss] < cap]
            self._cache[rows[keep]] = out[keep]
            self._cached[rows[keep]] = True
        return torch.from_numpy(out)

    def _open_cache(self) -> None:
        given = _budget.grant(self.nbytes)
        weakref.finalize(self, _budget.release, given)
        cap = given // max(self.row_bytes, 1)
        self._cache = np.empty((cap, *self.shape[1:]), dtype=np.uint8)  # pages become resident as rows fill
        self._cached = np.zeros(cap, dtype=bool)
        if cap < len(self):
            log.warning("data cache (data_cache_mb = %d) keeps %d of the %d images of %s; the rest are read per "
                        "batch", _budget.limit >> 20, cap, len(self), self.name)

    def take(self, rows: Any) -> RowSubset:
        """The rows ``rows`` of this source, as a source of its own (nothing is read)."""
        return RowSubset(self, _row_indices(rows, len(self)))

    def __getstate__(self) -> dict[str, Any]:
        """Pickles the description of the source, never its cache (a worker process starts with its own)."""
        return {**self.__dict__, "_cache": None, "_cached": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, shape={self.shape})"


def select(x: torch.Tensor | ImageRows, rows: Any) -> torch.Tensor | ImageRows:
    """Rows ``rows`` of in-memory images (a tensor or array) or of a source read on demand (a lazy view)."""
    return x.take(rows) if isinstance(x, ImageRows) else x[rows]


class RowSubset(ImageRows):
    """Rows ``rows`` of ``base`` (each read through ``base.read``, cached here)."""

    def __init__(self, base: ImageRows, rows: np.ndarray):
        super().__init__((len(rows), *base.shape[1:]), base.name)
        self.base, self.rows = base, rows

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.base.read(self.rows[rows])

    def take(self, rows: Any) -> RowSubset:
        return RowSubset(self.base, self.rows[_row_indices(rows, len(self))])


class NpyRows(ImageRows):
    """Rows of a C-ordered uint8 array stored uncompressed at byte ``offset`` of ``path``.

    Args:
        path: the ``.npy`` or ``.npz`` file.
        offset: where the array's data starts in the file.
        stored: the array's stored shape, ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``.
        layout: ``"nhw"``, ``"nhwc"`` or ``"nchw"``.
    """

    def __init__(self, path: str | Path, offset: int, stored: tuple[int, ...], layout: str):
        n, rest = stored[0], tuple(stored[1:])
        # per layout, not a dict of all three: (H, W) has no rest[2], so building the NHWC entry failed for NHW
        chw = (1, *rest) if layout == "nhw" else (rest[2], rest[0], rest[1]) if layout == "nhwc" else rest
        super().__init__((n, *chw), str(path))
        self.path, self.offset, self.stored, self.layout = str(path), offset, tuple(stored), layout

    def read(self, rows: np.ndarray) -> np.ndarray:
        size = self.row_bytes
        out = np.empty((len(rows), size), dtype=np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for i, row in enumerate(rows.tolist()):
                out[i] = np.frombuffer(os.pread(fd, size, self.offset + row * size), dtype=np.uint8)
        finally:
            os.close(fd)
        return np.ascontiguousarray(to_nchw(out.reshape(len(rows), *self.stored[1:]), self.layout))


def npz_members(path: Path) -> dict[str, tuple[int, np.dtype, tuple[int, ...], bool]]:
    """Where each uncompressed member array of an ``.npz`` lies: name -> (data offset, dtype, shape, fortran order).

    Compressed members (``np.savez_compressed``) are left out: they cannot be read in place.
    """
    found = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                continue
            raw.seek(info.header_offset)
            local = raw.read(30)  # the local file header: its name and extra field lengths are at bytes 26-29
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
                int.from_bytes(local[28:30], "little")
            raw.seek(start)
            version = np.lib.format.read_magic(raw)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(raw)
            found[info.filename[:-4]] = (raw.tell(), dtype, shape, fortran)
    return found


class FileRows(ImageRows):
    """Image files decoded when read, at ``size`` with ``channels`` (grey files repeat to 3 when channels is 3).

    Args:
        files: one image file per row.
        size: ``(height, width)`` every image is resized to.
        channels: 1 or 3.
        decode: ``decode(path) -> (H, W) or (H, W, 3) uint8`` (munet.data.images.read_image).
        resize: ``resize(array, size)`` -> the array at ``size``.
    """

    def __init__(self, files: Sequence[Path], size: tuple[int, int], channels: int,
                 decode: Callable[[Path], np.ndarray], resize: Callable[[np.ndarray, tuple[int, int]], np.ndarray]):
        super().__init__((len(files), channels, *size), str(Path(files[0]).parent.parent) if files else "files")
        self.files, self.size, self.decode, self.resize = [str(f) for f in files], size, decode, resize

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Decodes the rows' files on the decoding threads (PIL releases the GIL), in order."""
        if not len(rows):
            return np.empty((0, *self.shape[1:]), np.uint8)
        return np.stack(list(_decoders(os.getpid()).map(self._decode_row, rows.tolist())))

    def _decode_row(self, row: int) -> np.ndarray:
        return _to_channels(self.resize(self.decode(Path(self.files[row])), self.size), self.shape[1])


class HFRows(ImageRows):
    """The images of a Hugging Face ``datasets`` split, decoded per batch.

    Args:
        split: the ``datasets.Dataset`` (its Arrow table stays memory-mapped by ``datasets``).
        column: the image column.
        size, channels, resize: as for :class:`FileRows`.
        convert: ``convert(item) -> (H, W) or (H, W, 3) uint8`` for one decoded column value.
        name: the source's name.
    """

    def __init__(self, split: Any, column: str, size: tuple[int, int], channels: int,
                 convert: Callable[[Any], np.ndarray],
                 resize: Callable[[np.ndarray, tuple[int, int]], np.ndarray], name: str):
        super().__init__((len(split), channels, *size), name)
        self.split, self.column, self.size, self.convert, self.resize = split, column, size, convert, resize

    def read(self, rows: np.ndarray) -> np.ndarray:
        if not len(rows):
            return np.empty((0, *self.shape[1:]), np.uint8)
        items = self.split[rows.tolist()][self.column]
        return np.stack([_to_channels(self.resize(self.convert(item), self.size), self.shape[1]) for item in items])


@functools.cache
def _decoders(pid: int) -> ThreadPoolExecutor:
    """The threads that decode image files in process ``pid``, one per CPU (a batch is decoded between training
    steps); per process, because a forked child inherits the pool's object but not its threads."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="munet-decode")


def _to_channels(a: np.ndarray, channels: int) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3)`` as C-ordered ``(C, H, W)``; grey repeats to 3 channels (the float inputs are the
    same). C order: a batch stacked from transposed views keeps their strides, and hashing needs its bytes in order."""
    if a.ndim == 2:
        a = a[None]
        return np.repeat(a, 3, axis=0) if channels == 3 else a
    if channels == 1:
        raise DataError(f"a colour image in a source read as grey (shape {a.shape})")
    return np.ascontiguousarray(a.transpose(2, 0, 1))
