"""Frozen-prefix computation: the leading ops of a path whose components are all frozen run once, without
autograd, and their outputs are shared between children (same inputs, same component ids) and cached."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch

from munet.model.path import Path


class FeatureCache:
    """A least-recently-used map from (input tag, prefix key) to a frozen prefix's output, bounded in bytes.

    Args:
        max_bytes: evict the least recently used entries beyond this total size (0 disables caching).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def get(self, key: Hashable) -> torch.Tensor | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._items)


def frozen_forward(path: Path, x: torch.Tensor, cache: FeatureCache, tag: Hashable,
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
