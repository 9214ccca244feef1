"""Evaluating paths on fixed inputs (validation and test splits), sharing frozen-prefix features through a cache.

A split read per batch (:class:`~munet.data.rows.ImageRows`) whose preprocessed inputs would exceed the feature
cache's bound is evaluated batch by batch: read, preprocessed and run through the whole path per batch, nothing kept.
The batches are the ones the kept path computes with (``eval_batch_size``), so the accuracy is the same either way."""

from __future__ import annotations

from typing import Any

import torch

from munet.data.augment import eval_batch
from munet.data.rows import ImageRows
from munet.data.task import TaskData
from munet.model.path import TaskPath
from munet.training.frozen import FeatureCache, frozen_forward
from munet.training.settings import TrainSettings, to_device


class Evaluator:
    """Evaluates paths on fixed (deterministic) inputs, sharing frozen-prefix features through a cache."""

    def __init__(self, settings: TrainSettings, cache: FeatureCache, mean: tuple, std: tuple):
        self.settings = settings
        self.cache = cache
        self.mean, self.std = mean, std
        self._inputs: dict[tuple, torch.Tensor] = {}

    def inputs(self, task: TaskData, split: str, image_size: int, limit: int = 0) -> torch.Tensor:
        """Normalised, resized images of a split (the first ``limit``), kept for the last key asked."""
        key = (task.name, split, image_size, limit)
        if key not in self._inputs:
            x, _ = task.split(split)
            x = x[: limit or len(x)]  # a tensor, also from a split read per batch
            self._inputs = {key: to_device(eval_batch(x, image_size, self.mean, self.std), self.settings.device)}
        return self._inputs[key]

    def streams(self, task: TaskData, split: str, image_size: int, limit: int = 0) -> bool:
        """Whether the split is read per batch and its preprocessed inputs (its first ``limit``) exceed the feature
        cache's bound."""
        x, y = task.split(split)
        n = min(len(y), limit) if limit else len(y)
        return isinstance(x, ImageRows) and n * 3 * image_size * image_size * 4 > self.cache.max_bytes

    @torch.no_grad()
    def accuracy(self, path: TaskPath, task: TaskData, split: str, image_size: int, limit: int = 0) -> float:
        """Exact accuracy over the split (or its first ``limit`` examples), including the last partial batch."""
        if self.streams(task, split, image_size, limit):
            return self._streamed_accuracy(path, task, split, image_size, limit)
        x = self.inputs(task, split, image_size, limit)
        y = to_device(task.split(split)[1][: len(x)], self.settings.device)
        with self.autocast():
            start, h = frozen_forward(path, x, self.cache, (task.name, split, image_size, limit),
                                      chunk=self.settings.eval_batch_size)
            correct = sum(int((path.forward(hb, start=start).argmax(-1) == yb).sum())
                          for hb, yb in zip(h.split(self.settings.eval_batch_size),
                                            y.split(self.settings.eval_batch_size)))
        return correct / len(y)

    def _streamed_accuracy(self, path: TaskPath, task: TaskData, split: str, image_size: int, limit: int) -> float:
        """:meth:`accuracy` batch by batch, nothing kept (the inputs do not fit the cache)."""
        x, y = task.split(split)
        n = min(len(y), limit) if limit else len(y)
        step, correct = self.settings.eval_batch_size, 0
        with self.autocast():
            for start in range(0, n, step):
                xb = to_device(eval_batch(x[start:min(start + step, n)], image_size, self.mean, self.std),
                               self.settings.device)
                yb = to_device(y[start:min(start + step, n)], self.settings.device)
                correct += int((path.forward(xb).argmax(-1) == yb).sum())
        return correct / n

    def autocast(self) -> Any:
        """bfloat16 autocast on CUDA when the settings ask for it; a no-op context otherwise."""
        dev = self.settings.device
        enabled = self.settings.autocast_bf16 and dev.type == "cuda"
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=enabled)
