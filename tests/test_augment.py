"""Batched augmentation and evaluation preprocessing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from munet.data.augment import eval_batch, sample_crop_boxes, to_float_rgb, train_batch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NONE = {"ds_area_range_min": 1.0, "ds_aspect_ratio_range_min": 0.75, "ds_flip_left_right": False,
        "ds_brightness_delta": 0.0, "ds_contrast_delta": 0.0, "ds_saturation_delta": 0.0, "ds_hue_delta": 0.0}
ALL = {"ds_area_range_min": 0.05, "ds_aspect_ratio_range_min": 0.5, "ds_flip_left_right": True,
       "ds_brightness_delta": 0.1, "ds_contrast_delta": 0.2, "ds_saturation_delta": 0.2, "ds_hue_delta": 0.1}


def _images(b: int = 16, c: int = 1, h: int = 28, w: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_to_float_rgb() -> None:
    x = _images(c=1)
    out = to_float_rgb(x)
    assert out.shape == (16, 3, 28, 28) and out.dtype == torch.float32
    assert torch.equal(out[:, 0], out[:, 2]) and float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.allclose(out[:, 1] * 255, x[:, 0].float())
    assert to_float_rgb(_images(c=3)).shape == (16, 3, 28, 28)
    with pytest.raises(ValueError):
        to_float_rgb(x.float())


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("size", [16, 28, 42])
def test_shapes_and_normalisation(c: int, size: int) -> None:
    x = _images(c=c)
    for out in (train_batch(x, ALL, size, MEAN, STD, _gen()), eval_batch(x, size, MEAN, STD)):
        assert out.shape == (16, 3, size, size) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        # Values are normalised pixels in [0, 1]: bounds follow from mean and std.
        m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        assert (out >= -m / s - 1e-5).all() and (out <= (1 - m) / s + 1e-5).all()
        pix = out * s + m
        assert float(pix.min()) >= -1e-6 and float(pix.max()) <= 1 + 1e-6


def test_eval_values_match_plain_resize() -> None:
    x = _images(c=3, h=20, w=20)
    out = eval_batch(x, 20, 0.0, 1.0)
    assert torch.allclose(out, x.float() / 255)
    up = eval_batch(x, 40, 0.5, 0.5)
    ref = (F.interpolate(x.float() / 255, size=(40, 40), mode="bilinear", align_corners=False) - 0.5) / 0.5
    assert torch.allclose(up, ref, atol=1e-6)


def test_determinism_with_the_same_generator() -> None:
    x = _images(c=3)
    a = train_batch(x, ALL, 32, MEAN, STD, _gen(5))
    b = train_batch(x, ALL, 32, MEAN, STD, _gen(5))
    c = train_batch(x, ALL, 32, MEAN, STD, _gen(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Consecutive batches from one generator differ (the generator advances).
    g = _gen(5)
    assert not torch.equal(train_batch(x, ALL, 32, MEAN, STD, g), train_batch(x, ALL, 32, MEAN, STD, g))


@pytest.mark.parametrize("size", [14, 28, 56])
def test_identity_settings_equal_eval(size: int) -> None:
    x = _images(c=1)
    assert torch.equal(train_batch(x, NONE, size, MEAN, STD, _gen()), eval_batch(x, size, MEAN, STD))


def test_full_box_crop_path_matches_eval_when_upscaling() -> None:
    # A crop covering (almost) the whole image through grid_sample must agree with the plain bilinear resize.
    x = _images(c=3)
    ds = dict(NONE, ds_area_range_min=0.999999, ds_aspect_ratio_range_min=1.0)
    out = train_batch(x, ds, 32, MEAN, STD, _gen())
    assert torch.allclose(out, eval_batch(x, 32, MEAN, STD), atol=1e-3)


def test_flip_really_flips() -> None:
    x = _images(b=64, c=3)
    ds = dict(NONE, ds_flip_left_right=True)
    out = train_batch(x, ds, 28, 0.0, 1.0, _gen(1))
    plain = eval_batch(x, 28, 0.0, 1.0)
    flipped = torch.tensor([torch.equal(o, p.flip(-1)) for o, p in zip(out, plain, strict=True)])
    same = torch.tensor([torch.equal(o, p) for o, p in zip(out, plain, strict=True)])
    assert (flipped | same).all()
    assert 16 < int(flipped.sum()) < 48  # about half are mirrored
    # The crop path mirrors too: a crop of the full width with flip is the mirrored resize.
    ds_crop = dict(ds, ds_area_range_min=0.999999, ds_aspect_ratio_range_min=1.0)
    out_c = train_batch(x, ds_crop, 28, 0.0, 1.0, _gen(1))
    mirrored = torch.tensor([torch.allclose(o, p.flip(-1), atol=1e-3) for o, p in zip(out_c, plain, strict=True)])
    kept = torch.tensor([torch.allclose(o, p, atol=1e-3) for o, p in zip(out_c, plain, strict=True)])
    assert (mirrored | kept).all() and 16 < int(mirrored.sum()) < 48


def test_crop_boxes_follow_the_ranges() -> None:
    boxes = sample_crop_boxes(4000, 30, 20, 0.1, 0.5, _gen(2))
    x0, y0, w, h = boxes.unbind(1)
    area = w * h / 600
    assert float(area.min()) >= 0.1 - 1e-4 and float(area.max()) <= 1 + 1e-4
    ratio = w / h
    assert float(ratio.min()) >= 0.5 - 1e-4 and float(ratio.max()) <= 2 + 1e-4
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 20 + 1e-4).all() and (y0 + h <= 30 + 1e-4).all()
    assert float(area.std()) > 0.1  # really random


def test_crop_zooms_in() -> None:
    # A smooth horizontal ramp: a crop covers a narrower value range than the whole image.
    ramp = torch.linspace(0, 255, 64).round().to(torch.uint8).view(1, 1, 1, 64).expand(8, 1, 64, 64).contiguous()
    out = train_batch(ramp, dict(NONE, ds_area_range_min=0.1, ds_aspect_ratio_range_min=1.0), 32, 0.0, 1.0, _gen())
    span = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert (span < 0.99).all()


@pytest.mark.parametrize("key", ["ds_brightness_delta", "ds_contrast_delta", "ds_saturation_delta", "ds_hue_delta"])
def test_each_colour_jitter_changes_colour_images(key: str) -> None:
    x = _images(c=3)
    base = eval_batch(x, 28, 0.0, 1.0)
    out = train_batch(x, dict(NONE, **{key: 0.2}), 28, 0.0, 1.0, _gen(3))
    assert not torch.allclose(out, base, atol=1e-3)
    if key in ("ds_saturation_delta", "ds_hue_delta"):
        # Saturation and hue leave grey images grey and unchanged.
        g = _images(c=1)
        assert torch.allclose(train_batch(g, dict(NONE, **{key: 0.2}), 28, 0.0, 1.0, _gen(3)),
                              eval_batch(g, 28, 0.0, 1.0), atol=1e-5)


def test_hue_keeps_luma() -> None:
    x = _images(c=3)
    out = train_batch(x, dict(NONE, ds_hue_delta=0.05), 28, 0.0, 1.0, _gen(4))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    base = eval_batch(x, 28, 0.0, 1.0)
    # Away from clipping, a YIQ rotation leaves luma unchanged.
    inside = ((out > 0.01) & (out < 0.99)).all(dim=1, keepdim=True)
    diff = ((out * luma).sum(1, keepdim=True) - (base * luma).sum(1, keepdim=True)).abs()
    assert float(diff[inside].max()) < 1e-4
