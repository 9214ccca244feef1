"""Decoding images: files and PIL images to uint8 arrays (grey ``(H, W)`` or RGB ``(H, W, 3)``), their sizes from the
header alone, resizing, and stacking into the ``(N, C, H, W)`` uint8 layout every task holds. The loaders of user
data (:mod:`munet.data.user`), the online sources, ``munet predict`` and the server all read images through here.
Every problem raises :class:`~munet.errors.DataError` naming the image.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from munet.data.rows import image_layout, to_nchw
from munet.errors import DataError

__all__ = ["DEFAULT_FOLDER_SIZE", "image_extensions", "image_header", "images_to_nchw_uint8", "lazy_geometry",
           "pil_to_array", "read_image", "resize_array", "size_tuple", "stack_pil_images"]

#: Stored size when the images of a folder do not all share one size.
DEFAULT_FOLDER_SIZE = 64
# Largest per-pixel channel spread still treated as grey (lossy-codec noise), in uint8 levels.
_GREY_TOLERANCE = 2


def size_tuple(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """Normalises ``image_size`` to ``(height, width)``."""
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        size = (int(image_size), int(image_size))
    else:
        size = tuple(int(s) for s in image_size)
        if len(size) != 2:
            raise DataError(f"image_size must be an int or (height, width), got {image_size!r}")
    if min(size) < 1:
        raise DataError(f"image_size must be positive, got {image_size!r}")
    return size  # type: ignore[return-value]


def pil_to_array(img: Image.Image, source: str) -> np.ndarray:
    """Converts a PIL image to a uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB array.

    Args:
        img: any PIL image; GIF/TIFF stacks contribute their first frame, alpha is dropped.
        source: file name used in error messages.

    Returns:
        ``(H, W)`` when the image carries no colour (also RGB files whose channels differ by at most 2 levels
        anywhere), else ``(H, W, 3)``.
    """
    try:
        img.seek(0)
    except (EOFError, AttributeError, ValueError):
        pass
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # High-bit-depth grey: PIL's convert("L") would clip rather than rescale, so scale by the value range.
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise DataError(f"{source}: image contains NaN or infinite values")
        peak = arr.max(initial=0)
        top = 1.0 if img.mode == "F" and peak <= 1.0 else (255.0 if peak <= 255 else 65535.0)
        return np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
    if img.mode in ("1", "L", "LA", "P;L"):
        return np.asarray(img.convert("L"), dtype=np.uint8)
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    spread = rgb.max(axis=2).astype(np.int16) - rgb.min(axis=2)
    if spread.max(initial=0) <= _GREY_TOLERANCE:
        # Grey content stored as RGB; lossy codecs (WebP, some JPEGs) leave +-1 chroma noise, hence the tolerance.
        return np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint8)
    return rgb


def resize_array(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 ``(H, W[, 3])`` array to ``size=(h, w)`` (PIL filters antialias when shrinking)."""
    if arr.shape[:2] == size:
        return arr
    img = Image.fromarray(arr)
    return np.asarray(img.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.uint8)


def stack_pil_images(arrays: Sequence[np.ndarray], image_size: int | Sequence[int] | None = None,
                     default_size: int = DEFAULT_FOLDER_SIZE) -> np.ndarray:
    """Stacks grey/RGB uint8 arrays of possibly different sizes into one ``(N, C, H, W)`` uint8 array.

    Args:
        arrays: ``(H, W)`` or ``(H, W, 3)`` uint8 arrays (see :func:`pil_to_array`).
        image_size: stored size; ``None`` keeps the common size when all images share it, else ``default_size``.
        default_size: square size used when sizes differ and ``image_size`` is ``None``.

    Returns:
        ``(N, 3, H, W)`` if any image is colour (grey images are repeated to 3 channels), else ``(N, 1, H, W)``.
    """
    if len(arrays) == 0:
        raise DataError("no images to stack")
    size = size_tuple(image_size)
    if size is None:
        shapes = Counter(a.shape[:2] for a in arrays)
        size = next(iter(shapes)) if len(shapes) == 1 else (default_size, default_size)
    colour = any(a.ndim == 3 for a in arrays)
    out = np.empty((len(arrays), 3 if colour else 1, *size), dtype=np.uint8)
    for i, a in enumerate(arrays):
        a = resize_array(a, size)
        out[i] = a.transpose(2, 0, 1) if a.ndim == 3 else a[None]
    return out


def images_to_nchw_uint8(x: np.ndarray, source: str) -> np.ndarray:
    """Validates an image array and returns it as uint8 ``(N, C, H, W)``, ``C`` in {1, 3}.

    Args:
        x: ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` with ``C`` in {1, 3}; uint8 (or another integer type
            with values in 0..255), or float in ``[0, 1]`` (scaled by 255 and rounded).
        source: where the array came from, for error messages.

    Raises:
        DataError: on a wrong rank, channel count, dtype or value range.
    """
    x = np.asarray(x)
    x = to_nchw(x, image_layout(x.shape, source))
    if x.shape[0] == 0:
        raise DataError(f"{source}: no images (array shape {x.shape})")
    if min(x.shape[2:]) == 0:
        raise DataError(f"{source}: images of shape {x.shape} have no pixels (height or width 0)")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"{source}: float images contain NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{source}: float images must lie in [0, 1], found values in [{lo:g}, {hi:g}] "
                            "(store uint8 0..255 or divide by 255)")
        return np.ascontiguousarray(np.rint(x * 255.0).astype(np.uint8))
    if np.issubdtype(x.dtype, np.integer) and not np.issubdtype(x.dtype, np.bool_):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{source}: integer images must lie in 0..255, found values in [{lo}, {hi}] (store uint8 "
                            "0..255, e.g. 16-bit images divided by 257, or float in [0, 1])")
        return np.ascontiguousarray(x.astype(np.uint8))
    raise DataError(f"{source}: unsupported image dtype {x.dtype} (use uint8, or float in [0, 1])")


def image_extensions() -> set[str]:
    """Every file extension PIL can open (png, jpg, bmp, gif, tiff, webp, ...)."""
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def read_image(source: Path | BinaryIO, name: str | None = None) -> np.ndarray:
    """A decoded image file (a path, or its bytes as a file object; ``name`` in error messages, default the path)."""
    name = name or str(source)
    try:
        with Image.open(source) as img:
            img.load()
            return pil_to_array(img, name)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _unreadable(name, exc) from exc


def _unreadable(name: str, exc: Exception) -> DataError:
    """The error for an image PIL cannot read; PIL's "cannot identify image file" names a file object's repr."""
    why = "not an image file (PIL identifies no format)" if isinstance(exc, UnidentifiedImageError) else \
        f"{type(exc).__name__}: {exc}"
    return DataError(f"cannot read image {name}: {why}")


def image_header(source: Path | BinaryIO, name: str) -> tuple[tuple[int, int], bool]:
    """``((height, width), grey)`` of an image file from its header alone (nothing decoded); grey is the file's
    mode, so an RGB file of grey content counts as colour.

    Args:
        source: the file, or its bytes as a file object.
        name: the file's name in error messages.
    """
    try:
        with Image.open(source) as img:
            return (img.height, img.width), img.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise _unreadable(name, exc) from exc


def lazy_geometry(headers: Sequence[tuple[tuple[int, int], bool]], image_size: int | Sequence[int] | None,
                  default_size: int = DEFAULT_FOLDER_SIZE) -> tuple[tuple[int, int], int]:
    """``((height, width), channels)`` of images read per batch, from their :func:`image_header`: the size the
    in-memory loaders choose (``image_size``, else the common size, else ``default_size``), grey when every image is
    stored grey, else RGB (grey images then repeat to 3 channels: the normalised inputs are the same either way)."""
    size = size_tuple(image_size)
    if size is None:
        sizes = {s for s, _ in headers}
        size = next(iter(sizes)) if len(sizes) == 1 else (default_size, default_size)
    return size, 1 if all(grey for _, grey in headers) else 3
