"""GPU check: training images per second, the share of training time the device waits for data, and bfloat16
against float32 accuracy, on one CUDA device in a few minutes. UNMEASURED: our machines have no GPU; a session with
one runs this script and fills in benchmarks/README.md ("GPU path").

Two parts, each through the run's own training path (:func:`munet.training.trainer.train_generation`, one
generation of two children: a probe of the frozen root and a child with the top half of the blocks cloned, trained
in lock-step):

* **throughput**: a synthetic task of ``--images`` images at 64 px (:func:`scale_data.write_task`, the data
  benchmark's task) written as an uncompressed ``.npz`` and read per batch (``data_cache_mb`` = 8), augmented with
  the spec's crops and flips at ``--image-size``, bfloat16 autocast; once with batches prepared when each step needs
  them and once with :data:`munet.wiring.PREFETCH_BATCHES` prepared ahead in a background thread (what a CUDA run
  does). Reported: training images/s and ``data_wait / train_time`` (the trainer's own count of the seconds the
  generation waited for a batch; each step synchronises on its loss, so the device is idle meanwhile).
* **bf16 vs fp32**: the same generation on ``--task`` (default ``uci_digits``, offline), without augmentation,
  with autocast on and off from the same weights and seed; reported: each child's best validation accuracy and the
  test accuracy of its final weights, and the largest difference.

Usage (< 5 minutes on one H100/H200-class GPU)::

    python benchmarks/gpu_check.py [--steps 60] [--out benchmarks/results/gpu/check.json]

``--device cpu`` runs the same code on the CPU (autocast is CUDA-only, so both precisions are float32 there): a
correctness check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_data import write_task  # noqa: E402  (a benchmark module beside this one)

from munet.data.registry import load_task  # noqa: E402
from munet.data.rows import set_data_cache_bytes  # noqa: E402
from munet.data.task import TaskData  # noqa: E402
from munet.data.user import load_npz  # noqa: E402
from munet.evolution.hparams import DEFAULTS, MutationPolicy  # noqa: E402
from munet.evolution.mutate import make_child  # noqa: E402
from munet.evolution.system import System  # noqa: E402
from munet.model.path import TaskPath  # noqa: E402
from munet.model.root import Root  # noqa: E402
from munet.model.roots import load_root  # noqa: E402
from munet.training.evaluate import Evaluator  # noqa: E402
from munet.training.frozen import FeatureCache  # noqa: E402
from munet.training.settings import TrainSettings  # noqa: E402
from munet.training.trainer import ChildOutcome, train_generation  # noqa: E402
from munet.wiring import PREFETCH_BATCHES  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gpu" / "check.json"
AUGMENTED = {"ds_area_range_min": 0.05, "ds_flip_left_right": True}


def generation(root: Root, task: TaskData, image_size: int, settings: TrainSettings, augment: dict[str, Any],
               seed: int = 0) -> tuple[list[ChildOutcome], list[TaskPath], Evaluator, float]:
    """Trains the check's generation on ``task``: a probe of the frozen root and a child cloning the top half of the
    root's blocks; returns the outcomes, the children, the evaluator and the wall seconds (device synchronised)."""
    system = System(root, image_size=image_size)
    system.add_task(task.name, task.num_classes)
    ds = {k: v for k, v in DEFAULTS.items() if k.startswith("ds_")} | {"ds_image_size": image_size} | augment
    policy = MutationPolicy("fixed", 0.1, random.Random(seed))
    children = [make_child(system, system.root_path, task.name, ds, mutate=False, policy=policy) for _ in range(2)]
    blocks = [name for name in children[1].components if name.startswith("block_")]
    for name in blocks[len(blocks) // 2:]:
        children[1].components[name] = system.clone_component(children[1].components[name], task.name)
    for comp in (comp for child in children for comp in child.components.values()):
        comp.module.to(settings.device)  # as the evolution loop does
    evaluator = Evaluator(settings, FeatureCache(256 << 20), root.mean, root.std)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    outcomes = train_generation(children, [float("-inf")] * 2, task, ds, settings, evaluator, lambda p, q: q,
                                torch.Generator().manual_seed(seed))
    if settings.device.type == "cuda":
        torch.cuda.synchronize()
    return outcomes, children, evaluator, time.perf_counter() - t0


def throughput(root: Root, task: TaskData, image_size: int, settings: TrainSettings) -> dict[str, Any]:
    """Training images/s and the share of training time spent waiting for batches, without and with prefetch."""
    result = {}
    for depth in (0, PREFETCH_BATCHES):
        outcomes, _, _, seconds = generation(root, task, image_size, dataclasses.replace(settings,
                                                                                        prefetch_batches=depth),
                                             AUGMENTED)
        first = outcomes[0]
        result[f"prefetch {depth}"] = {"images_per_s": first.images / seconds, "train_s": first.train_time,
                                       "data_wait_share": first.data_wait / first.train_time}
    return result


def precision(root: Root, task: TaskData, image_size: int, settings: TrainSettings) -> dict[str, Any]:
    """Validation and test accuracy of each child trained in bfloat16 autocast and in float32."""
    result: dict[str, Any] = {}
    for name, bf16 in (("bf16", True), ("fp32", False)):
        outcomes, children, evaluator, seconds = generation(root, task, image_size,
                                                            dataclasses.replace(settings, autocast_bf16=bf16), {})
        result[name] = {"seconds": seconds, "autocast_active": bf16 and settings.device.type == "cuda",
                        "val": [o.quality for o in outcomes],
                        "test": [evaluator.accuracy(child, task, "test", image_size) for child in children]}
    result["largest_difference"] = max(abs(a - b) for split in ("val", "test")
                                       for a, b in zip(result["bf16"][split], result["fp32"][split]))
    return result


def check(root_spec: str, depth: int, task_spec: str, image_size: int, images: int, steps: int, batch: int,
          device: torch.device, folder: Path) -> dict[str, Any]:
    """Both parts of the check; ``folder`` receives the synthetic task's file."""
    root = load_root(root_spec, depth or None)
    settings = TrainSettings(batch_size=batch, max_steps_between_validations=steps, validations=1,
                             max_val_examples=512, device=device)
    set_data_cache_bytes(8 << 20)  # the synthetic task is read per batch, as a large one would be
    synthetic = load_npz(write_task(folder / "synthetic", images, 64), seed=0, name="synthetic")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU: not a measurement)"
    return {"device": gpu, "torch": torch.__version__, "root": root.description, "image_size": image_size,
            "batch": batch, "steps": steps, "throughput": throughput(root, synthetic, image_size, settings),
            "precision": precision(root, load_task(task_spec, 0), image_size, settings)}


def table(result: dict[str, Any]) -> str:
    """The check as Markdown lines."""
    lines = [f"{result['device']}, torch {result['torch']}; {result['root']} at {result['image_size']} px, batch "
             f"{result['batch']}, {result['steps']} steps", "", "| batches | training images/s | waiting for data |",
             "|---|---|---|"]
    lines += [f"| {name} | {r['images_per_s']:,.0f} | {r['data_wait_share']:.1%} |"
              for name, r in result["throughput"].items()]
    p = result["precision"]
    lines += ["", "| precision | val (probe, cloned) | test (probe, cloned) |", "|---|---|---|"]
    lines += [f"| {name} | {' / '.join(f'{v:.4f}' for v in p[name]['val'])} | "
              f"{' / '.join(f'{v:.4f}' for v in p[name]['test'])} |" for name in ("bf16", "fp32")]
    return "\n".join(lines + ["", f"largest bf16-fp32 difference: {p['largest_difference']:.4f}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="dinov2-imgfocus")
    parser.add_argument("--depth", type=int, default=0, help="root blocks kept (0: all)")
    parser.add_argument("--task", default="uci_digits", help="the task of the bf16 vs fp32 part")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=20000, help="images of the synthetic throughput task")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; this check needs one (--device cpu only checks the script)")
    with tempfile.TemporaryDirectory() as tmp:
        result = check(args.root, args.depth, args.task, args.image_size, args.images, args.steps, args.batch,
                       torch.device(args.device), Path(tmp))
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
