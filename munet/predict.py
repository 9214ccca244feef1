"""Predictions of retained paths on new images: reading image files, preprocessing them as evaluation does, and
answering one task or all of them, with every component shared between tasks run once."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from munet.data.augment import eval_batch
from munet.data.images import images_to_nchw_uint8, pil_to_array, read_image
from munet.errors import DataError
from munet.model.path import TaskPath
from munet.training.frozen import FeatureCache, shared_forward

ImageLike = str | FsPath | bytes | bytearray | memoryview | Image.Image | np.ndarray | torch.Tensor
ENCODED = (bytes, bytearray, memoryview)  # an encoded image file's bytes
CHUNK = 256  # images per forward batch; bounds activation and cache memory


@dataclass
class Prediction:
    """One task's answer for one image.

    Args:
        label: the predicted class name.
        index: the predicted class index.
        probability: its softmax probability.
        probabilities: every class's probability, in class order.
    """

    label: str
    index: int
    probability: float
    probabilities: list[float]

    def top(self, k: int, class_names: list[str]) -> list[tuple[str, float]]:
        """The ``k`` most probable classes with their probabilities."""
        order = sorted(range(len(self.probabilities)), key=lambda i: -self.probabilities[i])[:k]
        return [(class_names[i], self.probabilities[i]) for i in order]


def to_uint8_images(images: ImageLike | Sequence[ImageLike]) -> list[torch.Tensor]:
    """Images as a list of uint8 ``(1, C, H, W)`` tensors (C in {1, 3}), at their own sizes.

    Accepts image files, encoded image files' bytes (PNG, JPEG, ...), PIL images, ``(H, W)``/``(H, W, 3)`` uint8
    arrays, or one batch (array or tensor) ``(N, C, H, W)`` / ``(N, H, W, C)`` / ``(N, H, W)``, uint8 or float in
    [0, 1]. An ``(H, W, 4)`` or ``(H, W, 2)`` array is refused: an image with alpha and a batch of narrow grey images
    look the same.

    Raises:
        DataError: an unreadable file or bytes, an array that is not an image, or an ambiguous one.
    """
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3 and images.shape[-1] in (2, 4):
        raise DataError(f"an array of shape {tuple(images.shape)} is ambiguous: one image with {images.shape[-1]} "
                        "channels (an alpha channel: keep the colours, image[..., :3] or [..., :1]) or a batch of "
                        f"grey images {images.shape[-1]} pixels wide; pass (H, W, 3) or (H, W) images")
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim in (3, 4) and not _single(images):
        return list(torch.from_numpy(images_to_nchw_uint8(_array(images), "images").copy()).split(1))
    single = (str, FsPath, *ENCODED, Image.Image, np.ndarray, torch.Tensor)
    try:
        items = [images] if isinstance(images, single) else list(images)
    except TypeError:
        raise DataError(f"cannot read images from a {type(images).__name__}: pass image files, their bytes, PIL "
                        "images or arrays") from None
    if not items:
        raise DataError("no images to predict")
    out = []
    for number, item in enumerate(items):
        if isinstance(item, ENCODED):
            arr = read_image(io.BytesIO(bytes(item)), f"number {number}")
        elif isinstance(item, (str, FsPath)):
            path = FsPath(item)
            if path.is_dir():
                raise DataError(f"{path} is a directory, not an image file; pass the image files it holds (e.g. "
                                f"{path / '*.png'})")
            if not path.exists():
                raise DataError(f"image file {path} does not exist")
            if not path.is_file():
                raise DataError(f"{path} is not a regular file (a device or a pipe); pass an image file")
            arr = read_image(path)
        elif isinstance(item, Image.Image):
            arr = pil_to_array(item, "image")
        elif isinstance(item, (list, tuple)) or hasattr(item, "__array__"):  # arrays, tensors, nested lists
            arr = _array(item)
        else:
            raise DataError(f"image number {number} is of type {type(item).__name__}: pass image files, their bytes, "
                            "PIL images or arrays")
        out.append(torch.from_numpy(images_to_nchw_uint8(arr[None], "image").copy()))  # PIL arrays are read-only
    return out


def _array(item: object) -> np.ndarray:
    """``item`` as a numpy array: a tensor of a type numpy lacks (bfloat16) as float32, nested lists as they stack.

    Raises:
        DataError: nested lists of uneven lengths, or values that are no array at all.
    """
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu()
        return (item.float() if item.dtype == torch.bfloat16 else item).numpy()
    try:
        return np.asarray(item)
    except (ValueError, TypeError) as err:
        raise DataError(f"cannot read an image from a {type(item).__name__}: {err}") from None


def _single(x: np.ndarray | torch.Tensor) -> bool:
    """An ``(H, W, 3)`` array is one colour image, not a batch of 3-pixel-wide images."""
    return x.ndim == 3 and x.shape[-1] == 3


def predict(paths: dict[str, TaskPath], class_names: dict[str, list[str]], images: list[torch.Tensor],
            mean: tuple, std: tuple, device: torch.device | None = None,
            wanted: dict[str, list[int]] | None = None) -> dict[str, list[Prediction]]:
    """Every given task's prediction for every image (or for the images ``wanted`` names).

    All paths run on the same images through :func:`~munet.training.frozen.shared_forward`, so a component
    sequence that several tasks start with is computed once per batch.

    Args:
        paths: task -> the path answering it.
        class_names: task -> class names.
        images: uint8 ``(1, C, H, W)`` images (see :func:`to_uint8_images`).
        mean, std: the root's input normalisation.
        device: where to compute (default: CPU).
        wanted: task -> ascending indices of the images it answers (default: all); the components a task shares
            with others still run on every image, its own ones only on these.

    Returns:
        task -> one prediction per image (per wanted image, in that order).
    """
    device = device or torch.device("cpu")
    answers: dict[str, list[Prediction]] = {t: [] for t in paths}
    for start in range(0, len(images), CHUNK):
        chunk = images[start: start + CHUNK]
        rows = {t: None if wanted is None else torch.tensor([i - start for i in wanted[t]
                                                              if start <= i < start + len(chunk)], dtype=torch.long)
                for t in paths}
        tasks = [t for t in paths if rows[t] is None or len(rows[t])]

        def batch(size: int, chunk: list[torch.Tensor] = chunk) -> torch.Tensor:
            # one image at a time: files differ in size, and this is exactly evaluation's preprocessing
            return torch.cat([eval_batch(x, size, mean, std) for x in chunk]).to(device)

        logits = shared_forward([paths[t] for t in tasks], batch, FeatureCache(1 << 34), ("predict", start),
                                rows=[rows[t] for t in tasks])
        for task, out in zip(tasks, logits):
            probs = torch.softmax(out.float(), dim=-1).cpu()
            for row in probs:
                i = int(row.argmax())
                answers[task].append(Prediction(class_names[task][i], i, float(row[i]), row.tolist()))
    return answers


def format_predictions(files: list[str], answers: dict[str, list[Prediction]], class_names: dict[str, list[str]],
                       top: int = 1) -> str:
    """One line per image and task: ``FILE  TASK  LABEL (PROBABILITY)[, ...]``."""
    width = max(len(f) for f in files)
    task_width = max(len(t) for t in answers)
    lines = []
    for i, name in enumerate(files):
        for task, preds in answers.items():
            best = ", ".join(f"{label} ({p:.4f})" for label, p in preds[i].top(top, class_names[task]))
            lines.append(f"{name:<{width}}  {task:<{task_width}}  {best}")
    return "\n".join(lines)


def as_records(files: list[str], answers: dict[str, list[Prediction]]) -> list[dict[str, Any]]:
    """JSON-able predictions, one record per image and task."""
    return [{"file": name, "task": task, "label": preds[i].label, "probability": preds[i].probability,
             "probabilities": preds[i].probabilities}
            for i, name in enumerate(files) for task, preds in answers.items()]
