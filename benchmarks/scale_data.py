"""Data larger than memory, measured side by side: peak resident memory and training throughput of a synthetic task
of ``--large`` images read per batch against one of ``--small`` images held in memory.

Both tasks are generated on the fly into a temporary folder (never committed) as uncompressed ``.npz`` files of
uint8 images ``(N, 3, S, S)`` (S = ``--image-size``, 64 px by default) in 10 classes, written in chunks so the large
one never exists in memory (``--source folder``: as folders of JPEG files, one sub-folder per class). Each case runs
in a child process of its own (``ru_maxrss`` is per process): it loads the task through munet's loader with
``data_cache_mb`` = ``--data-cache-mb`` (the small task fits and loads whole, the large one does not and is read per
batch, keeping what fits), then trains one child of a random-init ViT-Ti root
(``--depth`` blocks at 32 px, a head on the frozen blocks) for ``--steps`` steps of 64 images with
:func:`munet.training.trainer.train_generation`, the run's own training path, and reports its peak resident memory
and training images per second. Two pairs:

* ``augmented``: the spec's crops (to 5 % of the area) and flips: every step reads a fresh batch and runs the frozen
  blocks on it;
* ``fixed inputs``: no augmentation, so the frozen blocks' features of each example could be kept; with
  ``feature_cache_mb`` = ``--feature-cache-mb`` below what either training set's features need, they are computed
  per batch instead of allocated whole.

Ratios: peak memory large / small (the bound: at most 1.2) and throughput large / small (at least 0.8). Each case runs
``--repeats`` times, A B B A ...; the median peak memory and the fastest run's throughput count (the run least
disturbed by other work on the machine, as in ``scale.py``).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/scale_data.py [--small 20000 --large 200000] [--out DIR]`` (the paper
scale; about 4 minutes on 2 cores, 2.7 GB of temporary files); ``--small 5000 --large 50000`` is a quicker pair.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CLASSES = 10
BATCH = 64
PAIRS = {"augmented": {"ds_area_range_min": 0.05, "ds_flip_left_right": True}, "fixed inputs": {}}


def synthetic_chunks(n: int, size: int, seed: int = 0, chunk: int = 5000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``n`` learnable uint8 images ``(B, 3, size, size)`` with their labels, ``chunk`` at a time: each class a
    coloured square in its own place on noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % CLASSES
    rng.shuffle(labels)
    side = size // 4
    colours = rng.integers(60, 256, (CLASSES, 3, 1, 1), dtype=np.uint8)
    for start in range(0, n, chunk):
        y = labels[start:start + chunk]
        x = rng.integers(0, 60, (len(y), 3, size, size), dtype=np.uint8)
        for k in range(CLASSES):
            r, c = divmod(k, 4)
            x[y == k, :, r * side:(r + 1) * side, c * side:(c + 1) * side] = colours[k]
        yield x, y


def write_task(path: Path, n: int, size: int, source: str = "npz") -> Path:
    """The synthetic task of ``n`` images as an uncompressed ``.npz`` (``x``, ``y``) at ``path.npz``, or with
    ``source = "folder"`` as a folder of JPEG files (quality 90) per class at ``path``; returns where."""
    if source == "folder":
        for k in range(CLASSES):
            (path / f"class_{k}").mkdir(parents=True)
        done = 0
        for x, y in synthetic_chunks(n, size):
            for i, (image, label) in enumerate(zip(x, y.tolist())):
                Image.fromarray(image.transpose(1, 2, 0)).save(path / f"class_{label}" / f"{done + i}.jpg", quality=90)
            done += len(y)
        return path
    with zipfile.ZipFile(path.with_suffix(".npz"), "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as out:
            np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False,
                                                       "shape": (n, 3, size, size)})
            labels = []
            for x, y in synthetic_chunks(n, size):
                out.write(x.tobytes())
                labels.append(y)
        with archive.open("y.npy", "w") as out:
            np.lib.format.write_array(out, np.concatenate(labels))
    return path.with_suffix(".npz")


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One case, in this (child) process: load the task, train one child, measure."""
    import torch

    from munet.data.rows import ImageRows, set_data_cache_bytes
    from munet.data.user import load_image_folder, load_npz
    from munet.evolution.hparams import DEFAULTS, MutationPolicy
    from munet.evolution.mutate import make_child
    from munet.evolution.system import System
    from munet.model.roots import load_root
    from munet.training.evaluate import Evaluator
    from munet.training.frozen import FeatureCache
    from munet.training.settings import TrainSettings
    from munet.training.trainer import train_generation

    torch.set_num_threads(1)
    root = load_root("random:vit_tiny_patch16_224", spec["depth"])
    rss_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    set_data_cache_bytes(spec["data_cache_mb"] << 20)
    load = load_image_folder if spec["source"] == "folder" else load_npz
    task = load(spec["path"], seed=0, name="synthetic")
    load_seconds = time.perf_counter() - t0
    system = System(root, image_size=32)
    system.add_task(task.name, task.num_classes)
    ds = {k: v for k, v in DEFAULTS.items() if k.startswith("ds_")} | {"ds_image_size": 32} | spec["ds"]
    child = make_child(system, system.root_path, task.name, ds, mutate=False,
                       policy=MutationPolicy("fixed", 0.1, random.Random(0)))
    settings = TrainSettings(batch_size=BATCH, max_steps_between_validations=spec["steps"], validations=1,
                             max_val_examples=256, calibration_examples=0, prefetch_batches=spec["prefetch"])
    evaluator = Evaluator(settings, FeatureCache(spec["feature_cache_mb"] << 20), root.mean, root.std)
    t0 = time.perf_counter()
    outcome, = train_generation([child], [float("-inf")], task, ds, settings, evaluator, lambda p, q: q,
                                torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - t0
    return {"images": len(task.train_y) + len(task.val_y) + len(task.test_y),
            "read_per_batch": isinstance(task.train_x, ImageRows), "load_s": load_seconds,
            "train_images_per_s": outcome.images / seconds, "steps": outcome.steps, "val_accuracy": outcome.quality,
            "rss_ready_mb": rss_ready / 1024, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_case` in a fresh Python process (its own ``ru_maxrss``)."""
    done = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(small: int, large: int, folder: Path, *, image_size: int = 64, steps: int = 300, depth: int = 2,
            data_cache_mb: int = 256, feature_cache_mb: int = 16, repeats: int = 1,
            pairs: tuple[str, ...] = tuple(PAIRS), source: str = "npz", prefetch: int = 0) -> dict[str, Any]:
    """Both tasks written into ``folder``, every pair's cases run ``repeats`` times (A B B A ...); the median peak
    resident memory and the fastest training throughput of each case, and their ratios large / small."""
    paths = {n: write_task(folder / f"synthetic_{n}", n, image_size, source) for n in (small, large)}
    results: dict[str, Any] = {}
    for pair in pairs:
        runs: dict[int, list[dict[str, Any]]] = {small: [], large: []}
        for r in range(repeats):
            for n in ((small, large) if r % 2 == 0 else (large, small)):
                runs[n].append(child({"path": str(paths[n]), "source": source, "ds": PAIRS[pair], "steps": steps,
                                      "depth": depth, "data_cache_mb": data_cache_mb,
                                      "feature_cache_mb": feature_cache_mb, "prefetch": prefetch}))
        med = {n: {k: statistics.median(run[k] for run in runs[n]) for k in ("peak_rss_mb", "load_s", "rss_ready_mb")}
               | {"train_images_per_s": max(run["train_images_per_s"] for run in runs[n]),
                  "read_per_batch": runs[n][0]["read_per_batch"], "runs": runs[n]} for n in runs}
        results[pair] = {"small": med[small], "large": med[large],
                         "memory_ratio": med[large]["peak_rss_mb"] / med[small]["peak_rss_mb"],
                         "throughput_ratio": med[large]["train_images_per_s"] / med[small]["train_images_per_s"]}
    return {"source": source, "small": small, "large": large, "image_size": image_size, "steps": steps, "depth": depth,
            "data_cache_mb": data_cache_mb, "feature_cache_mb": feature_cache_mb, "repeats": repeats,
            "prefetch": prefetch, "pairs": results}


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table."""
    small, large = result["small"], result["large"]
    lines = [f"| pair | peak RSS {small:,} in memory | peak RSS {large:,} per batch | ratio | images/s {small:,} | "
             f"images/s {large:,} | ratio |", "|---|---|---|---|---|---|---|"]
    for pair, r in result["pairs"].items():
        lines.append(f"| {pair} | {r['small']['peak_rss_mb']:,.0f} MB | {r['large']['peak_rss_mb']:,.0f} MB | "
                     f"{r['memory_ratio']:.2f}x | {r['small']['train_images_per_s']:,.0f} | "
                     f"{r['large']['train_images_per_s']:,.0f} | {r['throughput_ratio']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=20000, help="images of the task held in memory")
    parser.add_argument("--large", type=int, default=200000, help="images of the task read per batch")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300, help="training steps of 64 images per case")
    parser.add_argument("--depth", type=int, default=2, help="blocks of the random-init ViT-Ti root")
    parser.add_argument("--data-cache-mb", type=int, default=256)
    parser.add_argument("--feature-cache-mb", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--source", choices=("npz", "folder"), default="npz",
                        help="the tasks as uncompressed .npz files, or as folders of JPEG files")
    parser.add_argument("--prefetch", type=int, default=0,
                        help="training batches prepared ahead in a thread (a CUDA run's is 2; the CPU's 0)")
    parser.add_argument("--out", default="", help="write result.json and table.md here")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child-process side
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.small, args.large, Path(tmp), image_size=args.image_size, steps=args.steps,
                         depth=args.depth, data_cache_mb=args.data_cache_mb, feature_cache_mb=args.feature_cache_mb,
                         repeats=args.repeats, source=args.source, prefetch=args.prefetch)
    print(table(result))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "table.md").write_text(table(result) + "\n")


if __name__ == "__main__":
    main()
