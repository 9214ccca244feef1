"""Task registry and the single entry point :func:`load_task` for every data source.

Task specs:
    * ``NAME``: a registered task (the 8 offline tasks, the 4 held-out glyph tasks, plus any added with
      :func:`register_task`);
    * ``folder:PATH``: a folder of images, see :func:`munet.data.user.load_image_folder`;
    * ``npz:PATH``: arrays in a ``.npz`` file, see :func:`munet.data.user.load_npz`;
    * ``torchvision:NAME``: a ``torchvision.datasets`` class, downloaded into ``data_dir`` (e.g. ``EMNIST:digits``);
    * ``hf:NAME``: a Hugging Face hub dataset (``hf:user/name`` or ``hf:user/name:config``);
    * ``split:SPEC:CLASSES``: the classes ``CLASSES`` of another task, relabelled ``0..k-1``; ``CLASSES`` is a range
      ``a-b`` (inclusive), a list ``a,b,c`` or a mix (``0-3,7``). Handy to make many extra tasks for benchmarks.

Loaded tasks are cached in-process by ``(spec, seed, data_dir)``; the returned tensors are shared between callers,
so treat them as read-only.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import torch

from munet.data import glyphs, offline
from munet.data.rows import ImageRows, select
from munet.data.task import TaskData
from munet.errors import DataError

__all__ = ["HELD_OUT", "OFFLINE_BENCHMARK", "TASKS", "clear_cache", "load_task", "parse_class_selection",
           "register_task"]

#: The offline benchmark, in its fixed order.
OFFLINE_BENCHMARK: list[str] = ["fashion_mnist", "mnist_5k", "uci_digits", "animal_silhouettes", "faces",
                                "textures", "surfaces", "fashion_mnist_coarse"]

#: Held-out glyph tasks (:mod:`munet.data.glyphs`): defaults are chosen on the offline benchmark and only reported on
#: these afterwards, never tuned on them.
HELD_OUT: list[str] = ["glyphs_latin_upper", "glyphs_greek", "glyphs_math", "glyphs_latin_lower"]

#: Registered tasks: name -> ``loader(seed) -> TaskData``.
TASKS: dict[str, Callable[[int], TaskData]] = {name: getattr(offline, name) for name in OFFLINE_BENCHMARK}
TASKS.update({name: getattr(glyphs, name) for name in HELD_OUT})

_PREFIXES = ("folder:", "npz:", "torchvision:", "hf:", "split:")
_CACHE_SIZE = 32


def split_specs(text: str) -> list[str]:
    """The task specs of a comma-separated list. A comma may also sit inside a spec (``split:uci_digits:0,1,2``,
    ``torchvision:EMNIST:split=digits,download=False``): a piece that starts no task (neither a registered name nor a
    prefix) continues a ``split:``, ``folder:``, ``npz:`` or ``torchvision:`` spec before it; empty pieces (stray
    commas) are dropped."""
    specs: list[str] = []
    for piece in text.split(","):
        if not piece.strip():  # a stray comma ("npz:a.npz,"), once read as part of the path "a.npz,"
            continue
        starts = piece.strip() in TASKS or piece.strip().startswith(_PREFIXES)
        if specs and not starts and specs[-1].startswith(("split:", "folder:", "npz:", "torchvision:")):
            specs[-1] += "," + piece.rstrip()
        else:
            specs.append(piece.strip())
    return specs


def register_task(name: str, replace: bool = False) -> Callable[[Callable[[int], TaskData]], Callable[[int], TaskData]]:
    """Decorator that registers ``loader(seed) -> TaskData`` under ``name``.

    Args:
        name: registry name; must not contain ``":"`` (reserved for the source prefixes).
        replace: allow overwriting an existing registration.

    Example:
        >>> @register_task("my_task")
        ... def my_task(seed: int) -> TaskData: ...
    """
    if not name or ":" in name:
        raise ValueError(f"task name {name!r} must be non-empty and contain no ':'")

    def deco(fn: Callable[[int], TaskData]) -> Callable[[int], TaskData]:
        if name in TASKS and not replace and TASKS[name] is not fn:
            raise ValueError(f"task '{name}' is already registered (pass replace=True to overwrite it)")
        TASKS[name] = fn
        clear_cache()  # a cached result could belong to the replaced loader
        return fn

    return deco


def parse_class_selection(text: str, num_classes: int, spec: str) -> list[int]:
    """Parses ``"a-b"``, ``"a,b,c"`` or mixes such as ``"0-3,7"`` into sorted, unique class indices.

    Raises:
        DataError: malformed selection, index out of ``[0, num_classes)``, or fewer than 2 classes.
    """
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo_s, hi_s = part.split("-", 1)
                lo, hi = int(lo_s), int(hi_s)
                if lo > hi:
                    raise ValueError
            else:
                lo = hi = int(part)
        except ValueError:
            raise DataError(f"{spec}: bad class selection {part!r} (use a-b, a,b,c or a mix such as 0-3,7)") from None
        if not 0 <= lo <= hi < num_classes:  # before building the range: 0-1000000000 once built 10^9 ints
            raise DataError(f"{spec}: class selection {part!r} is out of range; the task has {num_classes} classes "
                            f"(0..{num_classes - 1})")
        chosen.update(range(lo, hi + 1))
    if len(chosen) < 2:
        raise DataError(f"{spec}: a class subset needs at least 2 classes, got {sorted(chosen)}")
    return sorted(chosen)


def _class_subset(base: TaskData, classes: list[int], name: str) -> TaskData:
    remap = torch.full((base.num_classes,), -1, dtype=torch.int64)
    remap[torch.tensor(classes)] = torch.arange(len(classes))

    def pick(x: torch.Tensor | ImageRows, y: torch.Tensor) -> tuple[torch.Tensor | ImageRows, torch.Tensor]:
        keep = remap[y] >= 0
        return select(x, keep), remap[y[keep]]

    (trx, try_), (vax, vay), (tex, tey) = (pick(*base.split(s)) for s in ("train", "val", "test"))
    names = [base.class_names[c] for c in classes]
    return TaskData(name=name, class_names=names, train_x=trx, train_y=try_, val_x=vax, val_y=vay, test_x=tex,
                    test_y=tey, description=f"classes {names} of {base.name}: {base.description}")


def _default_dir(data_dir: str | None, sub: str) -> str:
    root = data_dir or os.environ.get("MUNET_DATA_DIR") or str(Path("~/.cache/munet").expanduser())
    return str(Path(root).expanduser() / sub)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _load_cached(spec: str, seed: int, data_dir: str | None) -> TaskData:
    if spec in TASKS:
        return TASKS[spec](seed)
    kind, sep, rest = spec.partition(":")
    if sep and kind + ":" in _PREFIXES and not rest:
        raise DataError(f"task spec '{spec}' is missing its argument after '{kind}:'")
    if kind == "folder" and sep:
        from munet.data.user import load_image_folder
        return load_image_folder(rest, seed)
    if kind == "npz" and sep:
        from munet.data.user import load_npz
        return load_npz(rest, seed)
    if kind == "torchvision" and sep:
        from munet.data.online import load_torchvision
        return load_torchvision(rest, _default_dir(data_dir, "torchvision"), seed)
    if kind == "hf" and sep:
        from munet.data.online import load_hf
        return load_hf(rest, seed, cache_dir=_default_dir(data_dir, "hf") if data_dir else None)
    if kind == "split" and sep:
        base_spec, sep2, selection = rest.rpartition(":")
        if not sep2 or not base_spec:
            raise DataError(f"task spec '{spec}' must look like split:TASK:a-b (e.g. split:fashion_mnist:0-4)")
        base = _load_cached(base_spec, seed, data_dir)
        return _class_subset(base, parse_class_selection(selection, base.num_classes, spec), spec)
    raise DataError(f"unknown task '{spec}'. Known tasks: {', '.join(sorted(TASKS))}; or use one of the prefixes "
                    f"{', '.join(p + '...' for p in _PREFIXES)}")


def load_task(spec: str, seed: int, data_dir: str | None = None) -> TaskData:
    """Loads a task by spec (see the module docstring), cached in-process by ``(spec, seed, data_dir)``.

    Args:
        spec: registry name or ``prefix:argument`` spec.
        seed: seeds the task's splits.
        data_dir: where ``torchvision:`` downloads go (``DATA_DIR/torchvision``) and ``hf:`` caches
            (``DATA_DIR/hf``); default ``$MUNET_DATA_DIR`` or ``~/.cache/munet``.

    Returns:
        The task; shared with other callers that asked for the same key, so do not modify its tensors in place.

    Raises:
        DataError: unknown name, malformed spec, or any loading problem (``TaskUnavailable`` when a registered
            task's package or files are not installed).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"task spec must be a non-empty string, got {spec!r}")
    return _load_cached(spec.strip(), int(seed), data_dir)


def clear_cache() -> None:
    """Forgets every cached task (e.g. after the files behind a ``folder:`` spec changed)."""
    _load_cached.cache_clear()
