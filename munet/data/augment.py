"""Batched image preprocessing: uint8 ``(B, C, H, W)`` in, normalised float ``(B, 3, S, S)`` out.

``train_batch`` implements the muNet data augmentation (spec section 3): a random crop like TensorFlow's
``sample_distorted_bounding_box(min_object_covered=0)``, a left-right flip, random brightness / contrast /
saturation / hue, a resize to ``S x S`` and a clip. Crop, flip and resize are one ``affine_grid`` + ``grid_sample``
call for the whole batch; the only loop-like work is drawing a few numbers per image from the caller's
``torch.Generator``, so the same generator state always yields the same batch.

Differences from the TensorFlow original, kept deliberately small:
    * crop boxes are continuous (sub-pixel) instead of integer pixel boxes; the sampling scheme is the same
      (aspect ratio uniform in ``[r, 1/r]``, height uniform between the smallest allowed and the largest fitting
      one, up to 100 attempts, whole image if none fits);
    * the colour jitters run after the resize (at ``S x S``, cheaper). Brightness, saturation and hue are per-pixel
      linear maps, so they commute with bilinear resizing; contrast uses the per-image mean at the output size;
    * saturation blends with the luma grey image instead of scaling S in HSV, and the hue shift is a rotation of
      the chroma plane in YIQ space (a standard approximation of an HSV hue rotation);
    * eval resizing uses antialiasing when it shrinks the image (TF's default resize does not); train crops are
      resampled by ``grid_sample`` without antialiasing, like the original.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F  # noqa: N812  (conventional alias)

__all__ = ["DS_KEYS", "eval_batch", "sample_crop_boxes", "to_float_rgb", "train_batch"]

#: The data-augmentation hyperparameters read by :func:`train_batch` (``ds_image_size`` is passed separately).
DS_KEYS = ("ds_area_range_min", "ds_aspect_ratio_range_min", "ds_flip_left_right", "ds_brightness_delta",
           "ds_contrast_delta", "ds_saturation_delta", "ds_hue_delta")
_MAX_ATTEMPTS = 100  # tf.image.sample_distorted_bounding_box default
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, also the Y row of YIQ
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.595716, -0.274453, -0.321263), (0.211456, -0.522591, 0.311135))


def _check_uint8(x: torch.Tensor) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 images (B, C, H, W) with C in {{1, 3}}, got {x.dtype} {tuple(x.shape)}")


def _normalise(x: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x - m).div_(s)  # in-place on the fresh difference: one allocation


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize to ``size x size``; antialiased when shrinking so small evaluation sizes do not alias."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < h or size < w)


def to_float_rgb(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` to float ``(B, 3, H, W)`` in ``[0, 1]``; grey images are expanded to 3 channels.

    The grey case returns an ``expand`` view (no copy): treat the result as read-only.
    """
    _check_uint8(x)
    xf = x.to(torch.float32) / 255.0
    return xf.expand(-1, 3, -1, -1) if xf.shape[1] == 1 else xf


def eval_batch(x: torch.Tensor, image_size: int, mean: float | Sequence[float], std: float | Sequence[float]
               ) -> torch.Tensor:
    """Evaluation preprocessing: resize to ``image_size`` (bilinear, antialias when shrinking), clip, normalise.

    Args:
        x: uint8 images ``(B, C, H, W)``, ``C`` in {1, 3}.
        image_size: output side ``S``.
        mean, std: per-channel (or scalar) normalisation applied to ``[0, 1]`` pixels.

    Returns:
        float32 ``(B, 3, S, S)``.
    """
    _check_uint8(x)
    # Resize before expanding grey to RGB: one channel instead of three.
    out = _resize(x.to(torch.float32) / 255.0, image_size).clamp_(0.0, 1.0)
    return _normalise(out.expand(-1, 3, -1, -1), mean, std)


def _rand(n: int | tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Uniform [0, 1) draws on the generator's device (CPU generators work for CUDA batches too)."""
    shape = (n,) if isinstance(n, int) else n
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)


def sample_crop_boxes(batch: int, height: int, width: int, area_min: float, ratio_min: float,
                      generator: torch.Generator) -> torch.Tensor:
    """Samples crop boxes like ``tf.image.sample_distorted_bounding_box`` with ``min_object_covered=0``.

    For each image, up to 100 attempts draw an aspect ratio (width / height) uniformly in ``[r, 1/r]`` and a height
    uniformly between the smallest one giving ``area >= area_min`` and the largest one that fits the image with
    ``area <= 1``; the first feasible attempt is used, the whole image if none is. The offset is uniform.

    Args:
        batch, height, width: batch size and image size in pixels.
        area_min: smallest crop area as a fraction of the image (``ds_area_range_min``).
        ratio_min: ``r`` of the aspect-ratio range ``[r, 1/r]`` (``ds_aspect_ratio_range_min``).
        generator: source of randomness.

    Returns:
        float ``(B, 4)`` boxes ``(x0, y0, w, h)`` in pixels (continuous).
    """
    r = min(ratio_min, 1.0 / ratio_min)
    ar = r + (1.0 / r - r) * _rand((batch, _MAX_ATTEMPTS), generator)
    image_area = float(height * width)
    h_min = torch.sqrt(area_min * image_area / ar)
    h_max = torch.minimum(torch.sqrt(image_area / ar), torch.clamp(width / ar, max=float(height)))
    feasible = h_min <= h_max
    h = h_min + (h_max - h_min).clamp(min=0.0) * _rand((batch, _MAX_ATTEMPTS), generator)
    first = feasible.to(torch.int8).argmax(dim=1, keepdim=True)  # argmax returns the first maximal index
    any_ok = feasible.any(dim=1)
    h_sel = torch.where(any_ok, h.gather(1, first)[:, 0], torch.full_like(any_ok, height, dtype=torch.float32))
    w_sel = torch.where(any_ok, (h * ar).gather(1, first)[:, 0], torch.full_like(any_ok, width, dtype=torch.float32))
    h_sel, w_sel = h_sel.clamp(max=float(height)), w_sel.clamp(max=float(width))
    x0 = (width - w_sel) * _rand(batch, generator)
    y0 = (height - h_sel) * _rand(batch, generator)
    return torch.stack([x0, y0, w_sel, h_sel], dim=1)


def _colour_jitter(x: torch.Tensor, ds: Mapping[str, object], generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter on ``(B, 3, S, S)`` floats, each only if its delta > 0.

    All four are affine maps of the RGB vector of a pixel (contrast uses the image mean, which an affine map moves
    affinely too), so their composition is one per-image ``A @ rgb + b``: the pixels are touched once.
    """
    b = x.shape[0]
    dev = generator.device  # draw and compose the tiny (B, 3, 3) maps where the generator lives

    def draw(delta: float) -> torch.Tensor:
        # Uniform in [-delta, delta], one value per image.
        return (2.0 * _rand(b, generator) - 1.0) * delta

    deltas = [float(ds.get(k, 0.0) or 0.0) for k in DS_KEYS[3:]]  # type: ignore[arg-type]
    if max(deltas) <= 0:
        return x
    eye = torch.eye(3, device=dev)
    mat = eye.expand(b, 3, 3).clone()
    off = torch.zeros(b, 3, device=dev)
    brightness, contrast, saturation, hue = deltas
    if brightness > 0:
        off = off + draw(brightness)[:, None]
    if contrast > 0:
        # Per image and channel mean, like tf.image.adjust_contrast; after the maps so far it is mat @ m0 + off.
        mean0 = x.mean(dim=(2, 3)).to(dev)
        mean = torch.einsum("bij,bj->bi", mat, mean0) + off
        f = (1.0 + draw(contrast))[:, None]
        mat, off = f[:, :, None] * mat, f * off + (1.0 - f) * mean
    if saturation > 0:
        # x -> grey + f (x - grey), grey = luma . x, as a matrix: f I + (1 - f) 1 luma^T.
        f = (1.0 + draw(saturation))[:, None, None]
        grey = torch.tensor(_LUMA, device=dev).expand(3, 3)
        sat = f * eye + (1.0 - f) * grey
        mat, off = sat @ mat, torch.einsum("bij,bj->bi", sat, off)
    if hue > 0:
        # Hue shift of delta turns = rotation of the (I, Q) chroma plane by 2*pi*delta, luma unchanged.
        angle = draw(hue) * (2.0 * math.pi)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rot = torch.zeros(b, 3, 3, device=dev)
        rot[:, 0, 0] = 1.0
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        t = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
        hue_mat = torch.linalg.inv(t).to(torch.float32).to(dev) @ rot @ t.to(torch.float32).to(dev)
        mat, off = hue_mat @ mat, torch.einsum("bij,bj->bi", hue_mat, off)
    mat, off = mat.to(x.device, x.dtype), off.to(x.device, x.dtype)
    return torch.einsum("bij,bjhw->bihw", mat, x) + off[:, :, None, None]


def train_batch(x: torch.Tensor, ds: Mapping[str, object], image_size: int, mean: float | Sequence[float],
                std: float | Sequence[float], generator: torch.Generator) -> torch.Tensor:
    """Training preprocessing with the muNet augmentation, fully batched and seeded by ``generator``.

    Steps: random crop (if ``ds_area_range_min < 1``), flip with p=0.5 (if ``ds_flip_left_right``), resize to
    ``image_size`` (crop + flip + resize are one ``grid_sample``), brightness / contrast / saturation / hue jitter
    (each if its delta > 0), clip to ``[0, 1]``, normalise. With no crop, no flip and no jitter the result equals
    :func:`eval_batch`.

    Args:
        x: uint8 images ``(B, C, H, W)``, ``C`` in {1, 3}.
        ds: the data hyperparameters, keys :data:`DS_KEYS`.
        image_size: output side ``S`` (``ds_image_size``).
        mean, std: per-channel (or scalar) normalisation applied to ``[0, 1]`` pixels.
        generator: the only source of randomness; the draw sequence depends only on ``ds`` and ``B``.

    Returns:
        float32 ``(B, 3, S, S)``.
    """
    _check_uint8(x)
    b, c, h, w = x.shape
    xf = x.to(torch.float32) / 255.0
    area_min = float(ds["ds_area_range_min"])  # type: ignore[arg-type]
    ratio_min = float(ds["ds_aspect_ratio_range_min"])  # type: ignore[arg-type]
    if bool(ds["ds_flip_left_right"]):
        flips = (_rand(b, generator) < 0.5).to(x.device)
    else:
        flips = torch.zeros(b, dtype=torch.bool, device=x.device)
    if area_min < 1.0:
        boxes = sample_crop_boxes(b, h, w, area_min, ratio_min, generator).to(x.device)
        x0, y0, bw, bh = boxes.unbind(1)
        # Map output coordinates in [-1, 1] to the box in input coordinates (align_corners=False: -1/+1 are the
        # outer pixel edges); a negative x scale mirrors the crop, which is the flip.
        sign = 1.0 - 2.0 * flips.to(torch.float32)
        theta = torch.zeros(b, 2, 3, dtype=torch.float32, device=x.device)
        theta[:, 0, 0] = bw / w * sign
        theta[:, 0, 2] = (2.0 * x0 + bw) / w - 1.0
        theta[:, 1, 1] = bh / h
        theta[:, 1, 2] = (2.0 * y0 + bh) / h - 1.0
        grid = F.affine_grid(theta, [b, c, image_size, image_size], align_corners=False)
        out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="border", align_corners=False)
    else:
        # No crop: the same resize as eval_batch (so this path reproduces it exactly), then mirror the drawn images.
        out = _resize(xf, image_size)
        out = torch.where(flips.reshape(b, 1, 1, 1), out.flip(-1), out)
    out = out.expand(-1, 3, -1, -1)
    out = _colour_jitter(out, ds, generator)
    return _normalise(out.clamp(0.0, 1.0), mean, std)
