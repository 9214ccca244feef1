"""One classification task: uint8 images (in memory or read per batch) and int64 labels per split."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from munet.data.rows import ImageRows


@dataclass
class TaskData:
    """One image-classification task: its labels in memory, its images in memory or read per batch.

    Images are uint8 tensors ``(N, C, H, W)`` with ``C`` in {1, 3} at their stored resolution, or for data larger
    than memory an :class:`~munet.data.rows.ImageRows` that reads them per batch (indexing either gives a uint8
    tensor); the augmentation / resizing code turns them into normalised float batches at the evolved image size.

    Args:
        name: registry name of the task, e.g. ``"uci_digits"``.
        class_names: one name per class; label ``k`` means ``class_names[k]``.
        train_x, val_x, test_x: uint8 images ``(N, C, H, W)``, in memory or read per batch.
        train_y, val_y, test_y: int64 labels ``(N,)`` in ``[0, num_classes)``.
        description: one line saying where the data comes from.
    """

    name: str
    class_names: list[str]
    train_x: torch.Tensor | ImageRows
    train_y: torch.Tensor
    val_x: torch.Tensor | ImageRows
    val_y: torch.Tensor
    test_x: torch.Tensor | ImageRows
    test_y: torch.Tensor
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, which: str) -> tuple[torch.Tensor | ImageRows, torch.Tensor]:
        """Returns ``(images, labels)`` of ``"train"``, ``"val"`` or ``"test"``."""
        return {"train": (self.train_x, self.train_y), "val": (self.val_x, self.val_y),
                "test": (self.test_x, self.test_y)}[which]

    def sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)[1]) for s in ("train", "val", "test")}

    def doubts(self) -> list[str]:
        """What looks wrong in the data without making it unusable: repeated or empty class names, and classes
        without a training example (the model can never learn them)."""
        found = []
        repeated = sorted(n for n, count in Counter(self.class_names).items() if count > 1)
        if repeated:
            found.append(f"class names used more than once: {', '.join(map(repr, repeated))}")
        empty = [k for k, name in enumerate(self.class_names) if not name.strip()]
        if empty:  # predictions would print a blank label
            found.append(f"empty class names at {empty[:5]}")
        present = set(self.train_y.tolist())
        missing = [self.class_names[k] for k in range(self.num_classes) if k not in present]
        if missing:
            shown = ", ".join(map(repr, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            found.append(f"{len(missing)} class(es) without a training example: {shown}")
        return found

