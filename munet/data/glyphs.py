"""Held-out glyph tasks: characters rendered from the TrueType fonts that matplotlib ships in its own package.

These tasks exist so that defaults are chosen on :data:`munet.data.registry.OFFLINE_BENCHMARK` and only *reported*
afterwards on the glyph tasks (:data:`munet.data.registry.HELD_OUT`); nothing is ever tuned on them. They need no
download: the fonts come from ``matplotlib.get_data_path()/fonts/ttf`` (DejaVu Sans/Serif/Sans Mono in four
styles, STIXGeneral in four styles, Computer Modern ``cm*10``) and are rendered with Pillow's FreeType binding (basic
layout, no font fallback), in memory, nothing cached on disk.

Every image is grey 28x28 uint8. A glyph is drawn white on a black 56x56 canvas in a random allowed font, at a size
that makes its ink's longer side span 24-42 canvas pixels (size normalisation as in MNIST, so that small symbols stay
legible), with a random stroke width (0 or 1 px), centred on its ink box, rotated by up to +-15 degrees, shifted by up
to +-3 output pixels, box-downsampled 2x, mapped to a random background (0-90) / foreground (150-255) intensity pair
and given Gaussian noise (sigma 2-12). Splits are train 3000 / val 500 / test 1000 with equal counts per class
(classes ``0..r-1`` get one more image when the split size is not a multiple of the class count, ``r`` the remainder).

All splits draw from the *same* fonts and parameter distributions (no font is held out between splits); each split
has its own random stream (``numpy.random.SeedSequence([seed, crc32(task)]).spawn(3)``), and an image whose pixels
equal an earlier image of any split is redrawn, so no image is shared between or within splits. A font is allowed
for a task only if every class renders in it with ink, differs from the font's missing-glyph (``.notdef``) rendering
and differs from every other class; fonts failing this are dropped. With matplotlib 3.x this leaves 22 fonts for the
Latin tasks (12 DejaVu, 4 STIXGeneral, cmr10/cmb10/cmss10/cmti10/cmtt10/cmmi10), 16 for Greek (no Computer Modern
font maps Unicode Greek) and 14 for the math symbols (the STIX italics lack most of them).
Renderings depend on the FreeType and font versions, so a seed gives identical tensors on one installation.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from munet.data.task import TaskData
from munet.errors import TaskUnavailable

__all__ = ["GLYPH_CLASSES", "SPLIT_SIZES", "allowed_fonts", "glyphs_greek", "glyphs_latin_lower",
           "glyphs_latin_upper", "glyphs_math", "render_task"]

#: Images per split, for every glyph task and seed.
SPLIT_SIZES: dict[str, int] = {"train": 3000, "val": 500, "test": 1000}

_GREEK = "αβγδεζηθικλμνξοπρστυφχψω"
_GREEK_NAMES = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
                "upsilon phi chi psi omega").split()
_MATH = (("+", "plus"), ("−", "minus"), ("×", "times"), ("÷", "divide"), ("=", "equals"), ("≠", "not_equal"),
         ("<", "less"), (">", "greater"), ("≤", "less_equal"), ("≥", "greater_equal"), ("∑", "sum"),
         ("∏", "product"), ("∫", "integral"), ("√", "square_root"), ("∞", "infinity"), ("∂", "partial"),
         ("∇", "nabla"), ("∈", "element_of"), ("∩", "intersection"), ("∪", "union"))

#: Per task: ``(characters, class names)``; label ``k`` is ``characters[k]``.
GLYPH_CLASSES: dict[str, tuple[str, list[str]]] = {
    "glyphs_latin_upper": ("ABCDEFGHIJKLMNOPQRSTUVWXYZ", list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")),
    "glyphs_greek": (_GREEK, _GREEK_NAMES),
    "glyphs_math": ("".join(c for c, _ in _MATH), [n for _, n in _MATH]),
    "glyphs_latin_lower": ("abcdefghijklmnopqrstuvwxyz", list("abcdefghijklmnopqrstuvwxyz")),
}

_DEJAVU = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
           "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
           "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
           "DejaVuSansMono-BoldOblique.ttf"]
_STIX = ["STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf"]
# Computer Modern text fonts only: cmsy10 / cmex10 map letter code points to symbols, so they are never candidates.
_CM_TEXT = ["cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf", "cmmi10.ttf"]
_CANDIDATES = _DEJAVU + _STIX + _CM_TEXT
_MIN_FONTS = 4
_CANVAS, _CHECK_SIZE = 56, 40
_MISSING = "\U0010fffd"  # a private-use code point no bundled font maps: renders as the font's .notdef glyph


def _font_dir() -> Path:
    try:
        import matplotlib
    except ImportError:
        raise TaskUnavailable("the glyph tasks need matplotlib's bundled fonts; install it with: "
                              "pip install matplotlib") from None
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@functools.lru_cache(maxsize=4096)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


@functools.lru_cache(maxsize=4096)
def _ink_extent(path: str, ch: str) -> int:
    """Longer side of the ink box of ``ch`` at the check size."""
    left, top, right, bottom = _font(path, _CHECK_SIZE).getbbox(ch)
    return max(1, right - left, bottom - top)


def _mask(path: str, ch: str) -> tuple[bytes, tuple[int, int]]:
    m = _font(path, _CHECK_SIZE).getmask(ch)
    return bytes(m), m.size


@functools.cache
def allowed_fonts(task: str) -> tuple[str, ...]:
    """Paths of the candidate fonts in which every class of ``task`` renders: inked, not ``.notdef``, distinct.

    Args:
        task: a key of :data:`GLYPH_CLASSES`.

    Returns:
        Font paths, in the fixed candidate order (DejaVu, STIXGeneral, Computer Modern).

    Raises:
        TaskUnavailable: matplotlib is missing, or fewer than 4 fonts qualify.
    """
    chars = GLYPH_CLASSES[task][0]
    folder = _font_dir()
    good = []
    for name in _CANDIDATES:
        path = folder / name
        if not path.is_file():
            continue
        missing = _mask(str(path), _MISSING)
        masks = [_mask(str(path), ch) for ch in chars]
        if all(m != missing and any(m[0]) for m in masks) and len(set(masks)) == len(masks):
            good.append(str(path))
    if len(good) < _MIN_FONTS:
        raise TaskUnavailable(f"task '{task}': only {len(good)} of matplotlib's fonts in {folder} render all its "
                              f"classes (need {_MIN_FONTS}); reinstall matplotlib")
    return tuple(good)


def _render(ch: str, fonts: tuple[str, ...], rng: np.random.Generator) -> np.ndarray:
    """One 28x28 uint8 image of ``ch`` with random font, size, stroke, rotation, shift, intensities and noise."""
    path = fonts[int(rng.integers(len(fonts)))]
    extent, stroke = rng.uniform(24.0, 42.0), int(rng.integers(0, 2))
    angle, dx, dy = rng.uniform(-15.0, 15.0), *rng.uniform(-6.0, 6.0, size=2)
    bg, fg, sigma = rng.uniform(0.0, 90.0), rng.uniform(150.0, 255.0), rng.uniform(2.0, 12.0)
    noise = rng.standard_normal((_CANVAS // 2, _CANVAS // 2))
    # Size normalisation (as MNIST's): the font size is set so the ink's longer side spans ``extent`` canvas pixels,
    # which keeps small symbols (divide, not-equal) legible instead of merging their parts.
    size = int(np.clip(round(_CHECK_SIZE * extent / _ink_extent(path, ch)), 6, 160))
    img = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), ch, font=_font(path, size), stroke_width=stroke)
    origin = (_CANVAS / 2 - (left + right) / 2, _CANVAS / 2 - (top + bottom) / 2)
    draw.text(origin, ch, fill=255, font=_font(path, size), stroke_width=stroke, stroke_fill=255)
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, translate=(dx, dy)).reduce(2)
    ink = np.asarray(img, dtype=np.float64) / 255.0
    out = bg + (fg - bg) * ink + sigma * noise
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _balanced_labels(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    counts = np.full(k, n // k)
    counts[: n % k] += 1
    return rng.permutation(np.repeat(np.arange(k), counts))


def render_task(task: str, seed: int) -> TaskData:
    """Renders the glyph task ``task`` (a key of :data:`GLYPH_CLASSES`) for ``seed``; see the module docstring.

    Args:
        task: task name, e.g. ``"glyphs_greek"``.
        seed: seeds every random choice (labels order, fonts, sizes, geometry, intensities, noise).

    Returns:
        The task, with uint8 images ``(N, 1, 28, 28)`` and sizes :data:`SPLIT_SIZES`.

    Raises:
        TaskUnavailable: matplotlib or its fonts are missing.
    """
    chars, class_names = GLYPH_CLASSES[task]
    fonts = allowed_fonts(task)
    streams = np.random.SeedSequence([int(seed), zlib.crc32(task.encode())]).spawn(len(SPLIT_SIZES))
    seen: set[bytes] = set()
    splits = {}
    for (split, n), stream in zip(SPLIT_SIZES.items(), streams):
        rng = np.random.default_rng(stream)
        labels = _balanced_labels(n, len(chars), rng)
        images = np.empty((n, 1, _CANVAS // 2, _CANVAS // 2), np.uint8)
        for i, label in enumerate(labels):
            while True:  # redraw the (practically impossible) exact repeat of an earlier image
                img = _render(chars[label], fonts, rng)
                digest = hashlib.blake2b(img.tobytes(), digest_size=16).digest()
                if digest not in seen:
                    break
            seen.add(digest)
            images[i, 0] = img
        splits[split] = (torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)))
    description = (f"{len(chars)} glyphs ({chars[0]}..{chars[-1]}) rendered from {len(fonts)} of matplotlib's bundled "
                   "fonts with random size, stroke, rotation, shift, intensities and noise (held-out task)")
    return TaskData(name=task, class_names=list(class_names), train_x=splits["train"][0], train_y=splits["train"][1],
                    val_x=splits["val"][0], val_y=splits["val"][1], test_x=splits["test"][0],
                    test_y=splits["test"][1], description=description)


def glyphs_latin_upper(seed: int) -> TaskData:
    """Capital Latin letters A-Z (26 classes)."""
    return render_task("glyphs_latin_upper", seed)


def glyphs_greek(seed: int) -> TaskData:
    """Lower-case Greek letters alpha..omega without final sigma (24 classes)."""
    return render_task("glyphs_greek", seed)


def glyphs_math(seed: int) -> TaskData:
    """Twenty mathematical symbols, listed with their names in :data:`GLYPH_CLASSES` (20 classes)."""
    return render_task("glyphs_math", seed)


def glyphs_latin_lower(seed: int) -> TaskData:
    """Lower-case Latin letters a-z (26 classes)."""
    return render_task("glyphs_latin_lower", seed)
