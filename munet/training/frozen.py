"""Frozen-prefix computation: the leading ops of a path whose components are all frozen run once, without
autograd, and their outputs are shared between children (same inputs, same component ids) and cached."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from munet.model.path import TaskPath

MIN_ROWS = 16  # see frozen_rows
log = logging.getLogger(__name__)


class FeatureCache:
    """A least-recently-used map from (input tag, prefix key) to a frozen prefix's output, bounded in bytes.

    Args:
        max_bytes: evict the least recently used entries beyond this total size (0 disables caching).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.refused: set[Hashable] = set()  # tags of data sets whose features were found not to fit
        self._items: OrderedDict[Hashable, torch.Tensor | RowStore] = OrderedDict()

    def get(self, key: Hashable) -> torch.Tensor | RowStore | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: torch.Tensor | RowStore) -> None:
        size = _nbytes(value)
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= _nbytes(old)

    def __len__(self) -> int:
        return len(self._items)


class RowStore:
    """Frozen-prefix outputs for the rows of a fixed data set, filled lazily as rows are first needed."""

    def __init__(self, values: torch.Tensor):
        self.values = values  # (N, ...) prefix output per example
        self.filled = torch.zeros(len(values), dtype=torch.bool, device=values.device)


def _nbytes(value: torch.Tensor | RowStore) -> int:
    t = value.values if isinstance(value, RowStore) else value
    return t.numel() * t.element_size()


def frozen_rows(path: TaskPath, images: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor, num_rows: int,
                cache: FeatureCache, tag: Hashable) -> tuple[int, torch.Tensor]:
    """Like :func:`frozen_forward` for rows ``idx`` of a fixed data set whose inputs are deterministic (training
    without augmentation): each example goes through each distinct frozen prefix once per run, however many
    children and steps read it. When the data set's features would exceed the cache's bound they are computed for
    the batch alone (recomputed at every step), never allocated for the whole set; the log says so once per set.

    Args:
        path: the path.
        images: ``images(idx)`` -> the preprocessed input images of those rows, on the compute device.
        idx: row indices of the batch (on the CPU).
        num_rows: number of rows in the data set.
        cache: holds one :class:`RowStore` per (tag, prefix).
        tag: identity of the data set and its preprocessing, e.g. ``(task, "train", image_size)``.
    """
    ops = path.ops()
    k = path.first_trainable_op(ops)
    if k == 0:
        return 0, images(idx)
    key = (tag, path.prefix_key(k, ops))
    store = cache.get(key)
    missing = idx if store is None else idx[~store.filled[idx].cpu()]
    if len(missing):
        # CPU matrix products pick other kernels for very few rows, so a row's features would depend on how many
        # rows it was computed with; padding to MIN_ROWS keeps them a function of the row alone, which makes a
        # resumed run (whose cache starts empty) compute bit-identical features.
        rows = missing.repeat(-(-MIN_ROWS // len(missing)))[: max(MIN_ROWS, len(missing))]
        with torch.no_grad():
            out = path.forward(images(rows), stop=k)[: len(missing)]
        if store is None:
            whole = num_rows * out[0].numel() * out.element_size()
            if whole > cache.max_bytes:  # the batch's features are the answer; the next step computes its own
                if tag not in cache.refused:
                    cache.refused.add(tag)
                    log.warning("frozen features of %s (%d MB) exceed feature_cache_mb (%d): computed per batch",
                                tag, whole >> 20, cache.max_bytes >> 20)
                return k, out
            store = RowStore(torch.empty(num_rows, *out.shape[1:], dtype=out.dtype, device=out.device))
            cache.put(key, store)
        store.values[missing] = out
        store.filled[missing] = True
    return k, store.values[idx]


def frozen_forward(path: TaskPath, x: torch.Tensor, cache: FeatureCache, tag: Hashable,
                   chunk: int = 0) -> tuple[int, torch.Tensor]:
    """Runs the path's frozen prefix on ``x``, reusing the longest cached prefix with the same components.

    Args:
        path: the path.
        x: input images ``(B, 3, S, S)``; ``tag`` must identify them (same tag means same tensor).
        cache: where prefix outputs are looked up and stored.
        tag: identity of the input, e.g. ``("train", step)`` or ``("val", task, image_size)``.
        chunk: process at most this many images at a time (0: all at once), to bound activation memory.

    Returns:
        ``(k, h)``: the index of the first op that must still run, and the prefix output (``x`` if ``k == 0``).
    """
    ops = path.ops()
    k = path.first_trainable_op(ops)
    start, out = 0, x
    for i in range(k, 0, -1):
        hit = cache.get((tag, path.prefix_key(i, ops)))
        if hit is not None:
            start, out = i, hit
            break
    if start < k:
        with torch.no_grad():
            pieces = out.split(chunk) if chunk else [out]
            out = torch.cat([path.forward(p, start=start, stop=k) for p in pieces])
        cache.put((tag, path.prefix_key(k, ops)), out)
    return k, out


def shared_forward(paths: list[TaskPath], images: Callable[[int], torch.Tensor], cache: FeatureCache, tag: Hashable,
                   chunk: int = 0, rows: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    """Every path's output on the same inputs (multi-task inference), computing each shared prefix once.

    Paths that start with the same components (same ids, same image size) form a prefix tree. The output at each
    branch point of that tree (the end of a prefix that two or more paths share) is kept in ``cache``, so every
    shared segment runs once however many paths read it; the rest of each path runs on its own. No gradients.

    Args:
        paths: the paths to run, e.g. every task's retained path.
        images: ``images(image_size)`` -> the preprocessed inputs at that size ``(B, 3, S, S)``, the same
            examples for every size.
        cache: holds branch-point outputs; a bounded cache that evicts them only costs recomputation.
        tag: identity of the inputs (same tag means same examples).
        chunk: process at most this many examples at a time (0: all at once), to bound activation memory.
        rows: per path, the indices of the examples whose output it needs (``None``: all). Segments shared with
            other paths run on every example; a path's own last segment runs on its rows alone (a server answering
            requests for different tasks in one batch).

    Returns:
        One output per path, in the order of ``paths`` (with ``rows``: one row per index, in that order).
    """
    ops_of = [p.ops() for p in paths]
    keys = [[(p.hparams["ds_image_size"], p.prefix_key(i, ops)) for i in range(len(ops) + 1)]
            for p, ops in zip(paths, ops_of)]
    readers: dict[Hashable, int] = {}  # prefix -> number of paths that start with it
    for ks in keys:
        for key in ks[1:]:
            readers[key] = readers.get(key, 0) + 1
    inputs: dict[int, torch.Tensor] = {}
    outputs = []
    with torch.no_grad():
        for j, (path, ops, ks) in enumerate(zip(paths, ops_of, keys)):
            n = len(ops)
            # branch points: prefixes read by several paths whose one-op extension is read by fewer of them
            stops = [i for i in range(1, n) if readers[ks[i]] > 1 and readers[ks[i + 1]] < readers[ks[i]]]
            start, h = 0, None
            for i in reversed(stops):
                hit = cache.get((tag, ks[i]))
                if hit is not None:
                    start, h = i, hit
                    break
            if h is None:
                size = path.hparams["ds_image_size"]
                if size not in inputs:
                    inputs[size] = images(size)
                h = inputs[size]
            for stop in [i for i in stops if i > start] + [n]:
                if stop == n and rows is not None and rows[j] is not None:
                    h = h[rows[j]]  # the path's own segment: read by this path alone
                pieces = h.split(chunk) if chunk else [h]
                h = torch.cat([path.forward(p, start=start, stop=stop) for p in pieces])
                if stop < n:
                    cache.put((tag, ks[stop]), h)
                start = stop
            outputs.append(h)
    return outputs
