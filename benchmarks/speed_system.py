"""System rows of the speed benchmark (benchmarks/speed.py): every task answered together, a task iteration with
many tasks in the system against few, and the default `munet run` with sharing off against on."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path as FsPath
from typing import Any

import torch
from speed_common import CACHE_BYTES, Sizes, interleaved, new_evolution, ratio, sharing_ceiling, shrink
from torch import nn

from munet.config import RunConfig
from munet.data.augment import eval_batch
from munet.data.registry import load_task
from munet.evolution.loop import Evolution
from munet.evolution.system import System
from munet.model.path import TaskPath
from munet.model.root import Root
from munet.reporting.status import run_status
from munet.training.frozen import FeatureCache, shared_forward

# Extra tasks for the scaling row: class subsets of the offline tasks (split:TASK:a-b).
EXTRA_TASKS = [f"split:{base}:{r}" for base in ("fashion_mnist", "animal_silhouettes", "uci_digits")
               for r in ("0-4", "5-9", "0-2", "3-5", "6-9", "0-1", "2-3", "4-5")]
SCALING_TASK = "split:mnist_5k:0-4"  # the task whose iteration is timed; in neither system


# --- 3. multi-task inference ----------------------------------------------------------------------------------------
def bench_inference(paths: list[TaskPath], images_u8: torch.Tensor, root: Root, sizes: Sizes) -> dict[str, Any]:
    """All retained paths answer one batch: shared prefixes once vs each path on its own."""
    outcome: dict[str, list[torch.Tensor]] = {}

    def images(size: int) -> torch.Tensor:
        return eval_batch(images_u8, size, root.mean, root.std)

    def standalone() -> None:
        with torch.no_grad():
            outcome["standalone"] = [p.forward(images(p.hparams["ds_image_size"])) for p in paths]

    def together() -> None:
        outcome["together"] = shared_forward(paths, images, FeatureCache(CACHE_BYTES), "batch")

    t_alone, t_together = interleaved(standalone, together, 2 * sizes.reps)  # cheap: more repetitions
    diff = max((x - y).abs().max().item() for x, y in zip(outcome["standalone"], outcome["together"]))
    return {"ratio": ratio(t_alone, t_together), "standalone_s": t_alone, "together_s": t_together,
            "paths": len(paths), "batch": len(images_u8), "max_output_diff": diff,
            "ceiling": sharing_ceiling(paths, training=False),
            "composition": describe_retained(paths)}


def bench_saved_run(run_dir: FsPath, sizes: Sizes) -> dict[str, Any]:
    """The multi-task inference row on the retained paths of a saved run, on test images of its first task."""
    from munet.api import load  # the store is only needed for this option

    run = load(run_dir)
    cfg = run.meta["config"]
    x = load_task(cfg["tasks"][0], cfg["seed"], cfg.get("data_dir")).test_x[: sizes.infer_batch]
    result = bench_inference([run.path(t) for t in run.tasks], x, run.system.root, sizes)
    return dict(result, source=str(run_dir))


def describe_retained(paths: list[TaskPath]) -> list[dict[str, Any]]:
    """Task, image size and component ids of each path: which prefixes they can share."""
    return [{"task": p.task, "image_size": p.hparams["ds_image_size"],
             "components": [c.id for c in p.components.values()]} for p in paths]


# --- 4. a task iteration with few vs many tasks ---------------------------------------------------------------------
def populate(root: Root, cfg: RunConfig, names: list[str], sizes: Sizes, evo: Evolution | None = None) -> Evolution:
    """Fills a system with one retained path per task by real task iterations at a tiny budget (cheap
    evaluation), each probing the most recent other task and the root, then mutating."""
    tasks = {n: shrink(load_task(n, cfg.seed), sizes.populate.val) for n in names}
    if evo is None:
        evo = new_evolution(root, cfg, tasks, sizes.populate, children=4, generation_size=4, max_seeds=1)
    else:
        for name, data in tasks.items():
            evo.system.add_task(name, data.num_classes)
        evo.tasks.update(tasks)
    for name in names:
        evo.task_iteration(name)
    return evo


def bench_scaling(root: Root, cfg: RunConfig, few: System, many: System, sizes: Sizes) -> dict[str, Any]:
    """Times one task iteration of a new task on copies of a system with few and with many tasks; repetition
    ``r`` uses policy seed ``r`` on both sides, so both sample children with the same random stream."""
    task = load_task(SCALING_TASK, cfg.seed)
    max_seeds = cfg.max_seeds or 3  # the bound must be active
    totals: dict[str, float] = {}
    runs: dict[str, int] = {}

    def iteration(system: System, label: str) -> Callable[[], None]:
        def run() -> None:
            seed = runs.get(label, 0)
            runs[label] = seed + 1
            evo = new_evolution(root, cfg, {task.name: task}, sizes.iteration, cfg.children_per_task,
                                cfg.generation_size, max_seeds, seed=seed, system=copy.deepcopy(system))
            trained = [0.0]
            evo.after_generation.append(lambda _task, _gen, children: trained.__setitem__(
                0, trained[0] + children[0].metrics["train_time"]))
            macs = [0]

            def count(module: nn.Module, _args: Any, output: Any) -> None:
                if isinstance(module, nn.Linear):
                    macs[0] += output.numel() * module.in_features
                elif isinstance(module, nn.Conv2d):
                    macs[0] += output.numel() * module.weight[0].numel()

            hook = nn.modules.module.register_module_forward_hook(count)
            t0 = time.perf_counter()
            try:
                evo.task_iteration(task.name)
            finally:
                hook.remove()
            elapsed = time.perf_counter() - t0
            totals[f"{label}_s"] = totals.get(f"{label}_s", 0.0) + elapsed
            totals[f"{label}_forward_gmacs"] = totals.get(f"{label}_forward_gmacs", 0.0) + macs[0] / 1e9
            totals[f"{label}_overhead_s"] = totals.get(f"{label}_overhead_s", 0.0) + elapsed - trained[0]
        return run

    # the deep copy of the system is outside the timed iteration; the children differ between the two sides
    # (their seeds are other tasks' paths), so the forward work each side did is counted too
    interleaved(iteration(few, "few"), iteration(many, "many"), sizes.reps)
    ratio_ = totals["many_s"] / totals["few_s"]
    work = totals["many_forward_gmacs"] / totals["few_forward_gmacs"]
    return {"ratio": ratio_, "overhead_ratio": totals["many_overhead_s"] / totals["few_overhead_s"],
            "work_ratio": work, "ratio_per_work": ratio_ / work,
            "few_tasks": len(few.paths), "many_tasks": len(many.paths),
            "max_seeds": max_seeds, "task": SCALING_TASK, **{k: v / sizes.reps for k, v in totals.items()}}


# --- 6. the default run, before and after ---------------------------------------------------------------------------
def bench_default_run(quick: bool, threads: int) -> dict[str, Any]:
    """``munet run`` (the default configuration; the smoke preset with ``quick``) with sharing against the same run
    with all of it off (``shared_training=false``, ``feature_cache_mb=0``: each child trained alone and every frozen
    prefix recomputed, as in the official code): two processes side by side with ``threads`` threads each."""
    with tempfile.TemporaryDirectory() as tmp:
        base = [sys.executable, "-m", "munet", "run"] + (["--preset", "smoke"] if quick else [])
        commands = {"shared": base + ["--out", f"{tmp}/shared"],
                    "unshared": base + ["--out", f"{tmp}/unshared", "--shared-training", "false",
                                        "--feature-cache-mb", "0"]}
        env = dict(os.environ, OMP_NUM_THREADS=str(threads or 1), PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        procs = {k: subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for k, c in commands.items()}
        wall: dict[str, float] = {}
        while len(wall) < len(procs):
            for k, proc in procs.items():
                if k not in wall and proc.poll() is not None:
                    wall[k] = time.perf_counter() - t0
            time.sleep(0.2)
        for k, proc in procs.items():
            if proc.returncode:
                raise RuntimeError(f"{' '.join(commands[k])} failed: {proc.stderr.read()[-2000:]}")
        tables = {k: [(t["task"], t["path"], t["test_acc"]) for t in run_status(f"{tmp}/{k}")["tasks"]]
                  for k in commands}
    accs = [acc for _, _, acc in tables["shared"]]
    return {"ratio": wall["unshared"] / wall["shared"], "shared_s": wall["shared"], "unshared_s": wall["unshared"],
            "identical_results": tables["shared"] == tables["unshared"], "average_test": sum(accs) / len(accs),
            "threads": threads or 1, "preset": "smoke" if quick else "default"}

