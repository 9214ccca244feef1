"""Root probes: how good are the root's frozen features at each depth and image size?

For each (depth, image size) and task, a linear probe plus final norm (the ``freeze:depth`` baseline of
``benchmarks/baselines.py``: the root's blocks frozen, a standardised zero head and the final norm trained) is trained
with munet's own trainer and evaluated on the task's validation and test splits. This is how the default root
depth and image size (6 blocks at 42 px) were chosen: the deepest, largest root whose default run fits the
15-minute CPU budget, since the probes rise with depth and size.

Measured figures and the command are in benchmarks/README.md "Root depth and image size"; results go to
``benchmarks/results/probes.json``.

Usage::

    python benchmarks/probes.py                      # 3 settings x 3 tasks, 100 steps x 64, lr 0.1 (a few minutes)
    python benchmarks/probes.py --settings 6@42,6@56 --tasks uci_digits --steps 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path as FsPath

from baselines import BaselineSpec, build_baseline, train_baseline

from munet.config import RunConfig
from munet.model.roots import load_root
from munet.training.evaluate import Evaluator
from munet.training.frozen import FeatureCache
from munet.training.settings import TrainSettings
from munet.wiring import Wiring, load_tasks, resolve_device

RESULTS = FsPath(__file__).resolve().parent / "results" / "probes.json"
SETTINGS = "3@28,4@42,6@42"  # depth@image_size
TASKS = "fashion_mnist,animal_silhouettes,mnist_5k"


def probe(root_spec: str, depth: int, size: int, tasks: dict, steps: int, lr: float, device: str) -> dict:
    """Per-task validation and test accuracy of a trained linear probe (plus final norm) on ``depth`` blocks."""
    root = load_root(root_spec, depth)
    system = Wiring.of(RunConfig().replace(root=root_spec, depth=depth, image_size=size, lr=lr)).system(root)
    dev = resolve_device(device)
    validations = 5
    settings = TrainSettings(max_steps_between_validations=max(1, steps // validations), validations=validations,
                             device=dev, autocast_bf16=dev.type == "cuda")
    out = {}
    for name, data in tasks.items():
        system.add_task(name, data.num_classes)
        path = build_baseline(system, name, BaselineSpec("freeze", depth))
        evaluator = Evaluator(settings, FeatureCache(2048 << 20), root.mean, root.std)
        result = train_baseline(path, data, settings, evaluator)
        out[name] = {"val_acc": result["val_acc"], "test_acc": result["test_acc"], "steps": result["steps"],
                     "wall_s": result["wall_s"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=RunConfig().root, help="root spec (default: the offline default root)")
    parser.add_argument("--settings", default=SETTINGS, help=f"comma-separated depth@image_size (default {SETTINGS})")
    parser.add_argument("--tasks", default=TASKS, help=f"comma-separated tasks (default {TASKS})")
    parser.add_argument("--steps", type=int, default=100, help="training steps of batch 64 per probe")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate of the probes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    grid = [tuple(int(v) for v in item.split("@")) for item in args.settings.split(",") if item.strip()]
    tasks = load_tasks([t for t in args.tasks.split(",") if t.strip()], 0, "data", sys.stderr)
    t0 = time.perf_counter()
    rows = []
    for depth, size in grid:
        accs = probe(args.root, depth, size, tasks, args.steps, args.lr, args.device)
        rows.append({"depth": depth, "image_size": size, "tasks": accs})
        print(f"{depth} blocks @ {size} px: " + ", ".join(f"{t} {a['test_acc']:.3f}" for t, a in accs.items())
              + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    header = f"{'depth':>5} {'px':>4} " + " ".join(f"{t[:18]:>18}" for t in tasks) + f" {'average':>8}"
    print("\ntest accuracy of a linear probe + final norm\n" + header)
    for r in rows:
        accs = [r["tasks"][t]["test_acc"] or 0.0 for t in tasks]
        print(f"{r['depth']:>5} {r['image_size']:>4} " + " ".join(f"{a:>18.3f}" for a in accs)
              + f" {sum(accs) / len(accs):>8.3f}")
    out = FsPath(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"root": args.root, "steps": args.steps, "lr": args.lr, "batch_size": 64,
                               "rows": rows, "wall_s": time.perf_counter() - t0}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
