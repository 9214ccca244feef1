"""Deterministic splitting helpers: stratified index splits, exact-duplicate removal and disjoint-region patches.

Every function here is pure numpy and seeded through a ``numpy.random.Generator`` so that a task's splits depend only
on its files and the seed, never on global random state or on the order in which tasks are loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from munet.errors import DataError

__all__ = ["DedupeResult", "dedupe", "patches_from_regions", "resolve_sizes", "stratified_split"]


def resolve_sizes(sizes: Sequence[float | int], n: int) -> list[int]:
    """Turns split sizes given as fractions or as counts into counts.

    Args:
        sizes: either all ``float`` fractions in ``[0, 1]`` whose sum is at most 1, or all ``int`` counts whose sum is
            at most ``n``. When fractions sum to 1 the last split takes the rounding remainder, so every example is
            used exactly once.
        n: number of examples available.

    Returns:
        One count per split.

    Raises:
        DataError: if the sizes are negative, mixed, or ask for more than ``n`` examples.
    """
    if len(sizes) == 0:
        raise DataError("split sizes are empty: give at least one fraction or count")
    if any(s < 0 for s in sizes):
        raise DataError(f"split sizes must be non-negative, got {list(sizes)}")
    all_int = all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in sizes)
    if all_int:
        counts = [int(s) for s in sizes]
    else:
        fracs = [float(s) for s in sizes]
        total = sum(fracs)
        if total > 1.0 + 1e-9:
            raise DataError(f"split fractions {fracs} sum to {total:.4f} > 1")
        counts = [int(round(f * n)) for f in fracs]
        if abs(total - 1.0) <= 1e-9:
            # Fractions that cover everything: the last split absorbs the rounding so no example is dropped.
            counts[-1] = n - sum(counts[:-1])
    if sum(counts) > n:
        raise DataError(f"split sizes {counts} need {sum(counts)} examples but only {n} are available")
    if any(c < 0 for c in counts):
        raise DataError(f"split sizes {list(sizes)} are not achievable with {n} examples")
    return counts


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer allocation of ``total`` proportional to ``weights`` (Hamilton's method, ties broken by index)."""
    wsum = int(weights.sum())
    if total == 0 or wsum == 0:
        return np.zeros_like(weights)
    exact = weights * (total / wsum)
    alloc = np.floor(exact).astype(np.int64)
    missing = total - int(alloc.sum())
    if missing > 0:
        # Stable sort on the negated remainder: deterministic, lowest class index wins ties.
        order = np.argsort(-(exact - alloc), kind="stable")
        alloc[order[:missing]] += 1
    return np.minimum(alloc, weights)


def stratified_split(labels: Sequence[int] | np.ndarray, sizes: Sequence[float | int], seed: int) -> list[np.ndarray]:
    """Splits example indices into disjoint, class-stratified parts.

    Each split receives every class in (as nearly as integers allow) the same proportion as the whole set. Splits
    are filled in order from the examples the previous splits left, so exact totals are always met.

    Args:
        labels: integer class label per example, shape ``(N,)``.
        sizes: fractions or counts per split (see :func:`resolve_sizes`), e.g. ``(0.7, 0.1, 0.2)`` or
            ``(6000, 1000)``.
        seed: seeds the ``numpy.random.Generator`` that draws the examples; same seed, same split.

    Returns:
        One ``int64`` index array per split, disjoint, each in random order.

    Raises:
        DataError: if the sizes cannot be met.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {labels.shape}")
    n = len(labels)
    counts = resolve_sizes(sizes, n)
    rng = np.random.default_rng(seed)
    _, inverse = np.unique(labels, return_inverse=True)
    # One shuffled queue of indices per class; splits take from the front of each queue.
    queues = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(int(inverse.max()) + 1 if n else 0)]
    taken = np.zeros(len(queues), dtype=np.int64)
    out: list[np.ndarray] = []
    for count in counts:
        remaining = np.array([len(q) for q in queues], dtype=np.int64) - taken
        alloc = _largest_remainder(count, remaining)
        parts = [queues[c][taken[c]:taken[c] + alloc[c]] for c in range(len(queues))]
        taken += alloc
        idx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        out.append(rng.permutation(idx).astype(np.int64))
    return out


class DedupeResult(NamedTuple):
    """Outcome of :func:`dedupe`.

    Attributes:
        keep: sorted indices of the examples to keep (first copy of each distinct image).
        removed: number of examples dropped in total.
        conflicting: number of distinct images whose copies carried different labels (all their copies are dropped).
    """

    keep: np.ndarray
    removed: int
    conflicting: int


def dedupe(images: np.ndarray, labels: Sequence[int] | np.ndarray) -> DedupeResult:
    """Finds exact (pixel-identical) duplicates by hashing each image's bytes.

    The first copy of an image is kept when all copies agree on the label. When copies disagree, the label is
    ambiguous, so every copy is dropped.

    Args:
        images: array ``(N, ...)``; images are compared on their raw bytes (same dtype and shape assumed).
        labels: label per image, shape ``(N,)``.

    Returns:
        A :class:`DedupeResult` whose ``keep`` indexes ``images`` and ``labels``.
    """
    images = np.ascontiguousarray(images)
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise DataError(f"dedupe: {len(images)} images but {len(labels)} labels")
    flat = images.reshape(len(images), -1)
    first: dict[bytes, int] = {}
    label_sets: dict[bytes, set[int]] = {}
    keys: list[bytes] = []
    for i, row in enumerate(flat):
        # 128-bit BLAKE2 digests: collisions are astronomically unlikely and hashing beats sorting 70k byte rows.
        key = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
        keys.append(key)
        first.setdefault(key, i)
        label_sets.setdefault(key, set()).add(int(labels[i]))
    conflicting = {k for k, s in label_sets.items() if len(s) > 1}
    keep = np.array(sorted(i for k, i in first.items() if k not in conflicting), dtype=np.int64)
    return DedupeResult(keep=keep, removed=len(images) - len(keep), conflicting=len(conflicting))


def _band_edges(n_units: int, fractions: Sequence[float]) -> list[int]:
    """Cumulative unit boundaries for contiguous bands with the given fractions (each band gets at least one unit)."""
    counts = [max(1, int(round(f * n_units))) for f in fractions]
    # Give the rounding difference to the largest band so the bands tile the whole width.
    counts[int(np.argmax(fractions))] += n_units - sum(counts)
    if min(counts) < 1:
        raise DataError(f"cannot cut {n_units} patch columns into {len(fractions)} non-empty bands")
    return list(np.cumsum([0, *counts]))


def patches_from_regions(
    image: np.ndarray,
    patch: int = 32,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    stride: int | Sequence[int] | None = None,
    shuffle_bands: bool = True,
) -> list[np.ndarray]:
    """Cuts one large image into patch sets taken from disjoint column bands, one band per split.

    The image width is divided into ``W // patch`` patch columns, which are grouped into contiguous bands with the
    given fractions (e.g. 60/20/20 %). Patches are cut only inside their band, so no pixel is shared between the
    sets; within a band the stride may be smaller than the patch (overlapping patches inside one split only).

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array.
        patch: side of the square patches in pixels.
        fractions: share of the patch columns per band, in split order (train, val, test).
        seed: picks the left-to-right order of the bands (when ``shuffle_bands``) and shuffles each patch set.
        stride: step between patches inside a band; one value, or one per band. Default: ``patch`` (disjoint).
        shuffle_bands: if True the seed permutes which band sits where, so different seeds see different regions.

    Returns:
        One array of patches ``(n_k, patch, patch[, C])`` per band, in the order of ``fractions``.

    Raises:
        DataError: if the image is too small for one patch per band or a stride is invalid.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise DataError(f"patches_from_regions needs an (H, W) or (H, W, C) image, got shape {image.shape}")
    h, w = image.shape[:2]
    n_cols, n_rows = w // patch, h // patch
    if n_rows < 1 or n_cols < len(fractions):
        raise DataError(f"image {h}x{w} is too small for {len(fractions)} bands of {patch}px patches")
    strides = [patch] * len(fractions) if stride is None else (
        [int(stride)] * len(fractions) if isinstance(stride, (int, np.integer)) else [int(s) for s in stride])
    if len(strides) != len(fractions) or any(s < 1 for s in strides):
        raise DataError(f"stride must be a positive int or one per band, got {stride!r}")
    rng = np.random.default_rng(seed)
    edges = _band_edges(n_cols, fractions)
    widths = [edges[i + 1] - edges[i] for i in range(len(fractions))]
    order = rng.permutation(len(fractions)) if shuffle_bands else np.arange(len(fractions))
    # Lay the bands out left to right in the drawn order; band k keeps its own width.
    starts = {}
    x = 0
    for k in order:
        starts[int(k)] = x
        x += widths[int(k)]
    # Centre the used area: the leftover columns (W % patch) and rows are split evenly between both borders.
    x_off, y_off = (w - n_cols * patch) // 2, (h - n_rows * patch) // 2
    out: list[np.ndarray] = []
    for k in range(len(fractions)):
        x0 = x_off + starts[k] * patch
        x1 = x0 + widths[k] * patch
        s = strides[k]
        xs = range(x0, x1 - patch + 1, s)
        ys = range(y_off, y_off + n_rows * patch - patch + 1, s)
        patches = np.stack([image[y:y + patch, xx:xx + patch] for y in ys for xx in xs])
        out.append(patches[rng.permutation(len(patches))])
    return out
