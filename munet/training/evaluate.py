"""Evaluating paths on fixed inputs (validation and test splits), sharing frozen-prefix features through a cache."""

from __future__ import annotations

from typing import Any

import torch

from munet.data.augment import eval_batch
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
            x = x[:limit] if limit else x
            self._inputs = {key: to_device(eval_batch(x, image_size, self.mean, self.std), self.settings.device)}
        return self._inputs[key]

    @torch.no_grad()
    def accuracy(self, path: TaskPath, task: TaskData, split: str, image_size: int, limit: int = 0) -> float:
        """Exact accuracy over the split (or its first ``limit`` examples), including the last partial batch."""
        x = self.inputs(task, split, image_size, limit)
        y = to_device(task.split(split)[1][: len(x)], self.settings.device)
        with self.autocast():
            start, h = frozen_forward(path, x, self.cache, (task.name, split, image_size, limit),
                                      chunk=self.settings.eval_batch_size)
            correct = sum(int((path.forward(hb, start=start).argmax(-1) == yb).sum())
                          for hb, yb in zip(h.split(self.settings.eval_batch_size),
                                            y.split(self.settings.eval_batch_size)))
        return correct / len(y)

    def autocast(self) -> Any:
        """bfloat16 autocast on CUDA when the settings ask for it; a no-op context otherwise."""
        dev = self.settings.device
        enabled = self.settings.autocast_bf16 and dev.type == "cuda"
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=enabled)
