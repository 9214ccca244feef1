"""Scaling out on Ray, measured side by side on one machine: the Ray executor's overhead against training in
process, the throughput of 1 against 2 Ray workers, and the object-store traffic per generation.

Arms, all on the same configuration (the smoke preset's real root and two real tasks, one torch thread per child,
``generation_size`` children per generation so two workers have two children at a time), run one after another in
this process, every arm's results checked equal to the first's:

* ``local``: the default executor (children of a generation in lock-step on shared batches, frozen features shared).
* ``local, one by one``: ``shared_training = false``, the semantics each Ray task runs (one child alone).
* ``ray, 1 worker`` / ``ray, 2 workers``: ``executor = "ray"`` on a local Ray instance of 1 or 2 CPUs (one child per
  CPU); Ray's start-up is timed apart; worker start-up (a Python process importing torch) is inside the run's time,
  as a user sees it.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/scale.py [--children 8] [--repeats 3] [--out benchmarks/results/scale]``
(about 5 minutes on 2 cores). Each arm's fastest run counts (the least disturbed by other work on the machine).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path as FsPath
from typing import Any

import ray
import torch

from munet.config import RunConfig
from munet.configs.smoke import get_config
from munet.distributed.ray_executor import RayExecutor
from munet.runner import Run
from munet.storage.files import atomic_write

ARMS = {"local": {}, "local, one by one": {"shared_training": False}, "ray, 1 worker": {"executor": "ray"},
        "ray, 2 workers": {"executor": "ray"}}
WORKERS = {"ray, 1 worker": 1, "ray, 2 workers": 2}


def config(out: FsPath, children: int) -> RunConfig:
    """The smoke preset with ``children`` children per task, all of a task's mutated children in one generation."""
    return get_config().replace(children_per_task=children, generation_size=children, threads=1, device="cpu",
                                out=str(out))


def run_arm(cfg: RunConfig) -> dict[str, Any]:
    """Trains a new run of ``cfg``; its wall time, children, test accuracies, each generation's training seconds (the
    rest of the wall time is the driver's serial work: sampling, selection, checkpoints) and (Ray) traffic."""
    with Run.create(cfg, io.StringIO()) as opened:
        spans: list[float] = []
        opened.evolution.before_training.append(lambda *_: spans.append(time.perf_counter()))
        opened.evolution.after_training.append(lambda *_: spans.append(time.perf_counter() - spans.pop()))
        t0 = time.perf_counter()
        opened.train()
        seconds = time.perf_counter() - t0
        summary = opened.report()
        executor = opened.evolution.executor
        children = len(opened.store.sampled_paths())
    traffic = [vars(t) for t in executor.traffic] if isinstance(executor, RayExecutor) else []
    return {"seconds": seconds, "training_s": spans, "serial_s": seconds - sum(spans), "children": children,
            "children_per_s": children / seconds,
            "test": {row["task"]: row["test_acc"] for row in summary["tasks"]}, "traffic": traffic}


def table(results: dict[str, Any]) -> str:
    """The arms as a markdown table, ratios against the local and the one-by-one arms."""
    arms = results["arms"]
    local, alone = arms["local"]["seconds"], arms["local, one by one"]["seconds"]
    lines = ["| arm | wall s | last generation s | serial s | children/s | vs local | vs one by one | Ray driver s "
             "| MB put (frozen) | MB to / from workers |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, arm in arms.items():
        total = {key: sum(g[key] for g in arm["traffic"]) for key in ("frozen_put", "to_workers", "from_workers",
                                                                       "driver_s")}
        ray_arm = bool(arm["traffic"])
        moved = f"{total['frozen_put'] / 2**20:.2f}" if ray_arm else "-"
        both = f"{total['to_workers'] / 2**20:.2f} / {total['from_workers'] / 2**20:.2f}" if ray_arm else "-"
        driver = f"{total['driver_s']:.2f}" if ray_arm else "-"
        lines.append(f"| {name} | {arm['seconds']:.1f} | {arm['training_s'][-1]:.1f} | {arm['serial_s']:.1f} | "
                     f"{arm['children_per_s']:.2f} | {arm['seconds'] / local:.2f} | "
                     f"{arm['seconds'] / alone:.2f} | {driver} | {moved} | {both} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--children", type=int, default=8, help="children per task iteration, all in one generation")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the arms; each arm's fastest run counts")
    parser.add_argument("--out", default="benchmarks/results/scale", help="where scale.json goes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in ARMS}
    ray_start: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # rounds over the arms, so a change of the machine's load hits them all
            for name, changes in ARMS.items():
                if name in WORKERS:
                    t0 = time.perf_counter()
                    ray.init(address="local", num_cpus=WORKERS[name], include_dashboard=False,
                             logging_level="WARNING")
                    ray_start.append(time.perf_counter() - t0)
                out = FsPath(tmp) / f"{name.replace(' ', '_').replace(',', '')}_{repeat}"
                try:
                    arm = run_arm(config(out, args.children).replace(**changes))
                finally:
                    if name in WORKERS:
                        ray.shutdown()
                runs[name].append(arm)
                print(f"{name}: {arm['seconds']:.1f} s, test {arm['test']}", file=sys.stderr)
    first = runs["local"][0]["test"]
    results: dict[str, Any] = {
        "children_per_task": args.children, "repeats": args.repeats, "ray_start_s": ray_start,
        "arms": {name: min(arms, key=lambda a: a["seconds"]) for name, arms in runs.items()},
        "all_seconds": {name: [a["seconds"] for a in arms] for name, arms in runs.items()},
        "equal_results": all(a["test"] == first for arms in runs.values() for a in arms)}
    out = FsPath(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "scale.json", json.dumps(results, indent=1))
    print(table(results))
    print(f"fastest of {args.repeats} runs per arm; Ray start-up {min(ray_start):.1f}-{max(ray_start):.1f} s (not in "
          f"the wall times); results equal across all runs: {results['equal_results']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
