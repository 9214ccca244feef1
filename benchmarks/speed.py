"""Speed benchmark: what munet's shared computation buys, measured side by side in one run.

Every row is a ratio of two timings (or memory peaks) taken in the same process, with the two sides interleaved
(A B B A ...) so that load from other work on the machine hits both alike. Absolute times are recorded in the
JSON for reference only.

Rows (targets from issue 5):
    1. one child's training in munet vs a plain hand-written PyTorch loop training the same model (>= 0.95x);
    2. a real generation of children (sampled by the actual policy in a real run) trained together, sharing frozen
       prefixes, vs each child trained alone with a fresh cache (>= 2x, identical results);
    3. every task answered together on one batch (:func:`munet.training.frozen.shared_forward`) vs the retained
       paths run one after another (>= 3x, identical outputs);
    4. a task iteration with many tasks in the system vs few, seed phase bounded by ``max_seeds`` (<= 1.3x);
    5. peak memory (resident set, measured in fresh subprocesses) of training the generation vs its largest child
       alone (<= 1.5x);
    6. the default ``munet run`` with all sharing off vs on, two processes side by side (faster, same results).

The "ceiling" column is what sharing could give at best for those very paths: the work of running them one by one
over the work with every prefix shared by component ids computed once (forward FLOPs of each op; a training op
on or after a path's first trainable op counts 3x if it trains, 2x if it only passes gradients).

Usage::

    python benchmarks/speed.py            # full, < 15 min on 2 CPU cores
    python benchmarks/speed.py --quick    # small sizes, < 3 min: checks that everything runs
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path as FsPath
from typing import Any

import torch
from speed_common import full_sizes, quick_sizes
from speed_system import EXTRA_TASKS, bench_default_run, bench_inference, bench_saved_run, bench_scaling, populate
from speed_training import (
    CAPTURE_TASKS,
    bench_generation,
    bench_memory,
    bench_single_child,
    capture_generations,
    memory_worker,
)

from munet.configs.default import get_config
from munet.data.registry import load_task
from munet.model.roots import load_root

RESULTS = FsPath(__file__).resolve().parent / "results" / "speed.json"


# --- driver ---------------------------------------------------------------------------------------------------------
TARGETS = {
    "single_child": (">=", 0.95), "generation_sharing": (">=", 2.0), "seed_phase_sharing": (">=", 2.0),
    "multitask_inference": (">=", 3.0), "task_scaling": ("<=", 1.3), "task_scaling_overhead": ("<=", 1.3),
    "task_scaling_per_work": ("<=", 1.3),
    "generation_memory": ("<=", 1.5), "generation_memory_total": ("<=", 1.5), "default_run": (">", 1.0),
}


def table(results: dict[str, Any]) -> str:
    labels = {
        "single_child": "one child: munet vs plain PyTorch loop (speed-up)",
        "generation_sharing": "generation of {children} after the seed phase: together vs each child alone (speed-up)",
        "seed_phase_sharing": "seed-phase generation of {children}: together vs each child alone (speed-up)",
        "multitask_inference": "{paths} tasks answered together vs paths one by one (speed-up)",
        "task_scaling": "task iteration: {many_tasks} vs {few_tasks} tasks in the system (time ratio)",
        "task_scaling_overhead": "task iteration outside training: {many_tasks} vs {few_tasks} tasks (time ratio)",
        "task_scaling_per_work": "task iteration per unit of model work: {many_tasks} vs {few_tasks} tasks "
                                 "(time ratio / forward-MAC ratio {work_ratio:.2f})",
        "generation_memory": "peak memory growth while training: generation vs its largest child alone",
        "generation_memory_total": "peak resident memory of the process: generation vs its largest child alone",
        "default_run": "`munet run` ({preset}): sharing off vs on, side by side (speed-up; same results: "
                       "{identical_results})",
    }
    lines = ["| measurement | measured | target | met | ceiling |", "|---|---|---|---|---|"]
    for key, (op, target) in TARGETS.items():
        if key not in results:
            continue
        r = results[key]
        met = r["ratio"] >= target if op == ">=" else r["ratio"] > target if op == ">" else r["ratio"] <= target
        ceiling = f"{r['ceiling']:.2f}x" if "ceiling" in r else ""
        lines.append(f"| {labels[key].format(**r)} | {r['ratio']:.2f}x | {op} {target}x | {'yes' if met else 'NO'} "
                     f"| {ceiling} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast check (< 3 min)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=str(RESULTS), help="where to write the JSON results")
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(TARGETS))
    parser.add_argument("--run-dir", help="answer the tasks of this saved run (its retained paths) in the multi-task "
                        "inference row, instead of the paths of the system the benchmark fills itself")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(filter(None, args.only.split(","))) or set(TARGETS)
    t_start = time.perf_counter()
    cfg = get_config()
    sizes = quick_sizes() if args.quick else full_sizes(cfg)
    torch.manual_seed(cfg.seed)
    root = load_root(cfg.root, cfg.depth)
    tasks = {n: load_task(n, cfg.seed) for n in CAPTURE_TASKS}
    results: dict[str, Any] = {}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    if "single_child" in only:
        results["single_child"] = bench_single_child(root, cfg, tasks[CAPTURE_TASKS[-1]], sizes)
        log(f"single child: {results['single_child']['ratio']:.2f}x")
    if only & {"generation_sharing", "seed_phase_sharing", "generation_memory"}:
        gens = capture_generations(root, cfg, tasks, sizes)
        gen = gens["after_seed_phase"]
        log(f"captured two generations of {len(gen.children)} children for {gen.task}")
        for key, phase in (("generation_sharing", "after_seed_phase"), ("seed_phase_sharing", "seed_phase")):
            if key in only:
                results[key] = bench_generation(gens[phase], tasks[gen.task], root, cfg, sizes)
                log(f"{key}: {results[key]['ratio']:.2f}x")
        if "generation_memory" in only:
            results["generation_memory"] = bench_memory(gen, root, cfg, sizes, torch.get_num_threads())
            results["generation_memory_total"] = dict(results["generation_memory"],
                                                      ratio=results["generation_memory"]["ratio_total_peak"])
            log(f"generation memory: {results['generation_memory']['ratio']:.2f}x")
    if args.run_dir and "multitask_inference" in only:
        only.discard("multitask_inference")
        results["multitask_inference"] = bench_saved_run(FsPath(args.run_dir), sizes)
        log(f"multi-task inference ({args.run_dir}): {results['multitask_inference']['ratio']:.2f}x")
    if only & {"multitask_inference", "task_scaling"}:
        names = (list(cfg.tasks) + EXTRA_TASKS)[: sizes.many_tasks]
        evo = populate(root, cfg, names[: sizes.few_tasks], sizes)
        few = copy.deepcopy(evo.system)
        log(f"filled a system with {sizes.few_tasks} tasks")
        if "multitask_inference" in only:
            paths = [p for p in few.retained_paths()]
            x = load_task(names[0], cfg.seed).test_x[: sizes.infer_batch]
            results["multitask_inference"] = bench_inference(paths, x, root, sizes)
            log(f"multi-task inference: {results['multitask_inference']['ratio']:.2f}x")
        if "task_scaling" in only:
            populate(root, cfg, names[sizes.few_tasks:], sizes, evo)
            log(f"filled a system with {sizes.many_tasks} tasks")
            results["task_scaling"] = bench_scaling(root, cfg, few, evo.system, sizes)
            scaling = results["task_scaling"]
            for key, value in (("task_scaling_overhead", "overhead_ratio"),
                               ("task_scaling_per_work", "ratio_per_work")):
                results[key] = dict(scaling, ratio=scaling[value])
            log(f"task scaling: {results['task_scaling']['ratio']:.2f}x")
    if "default_run" in only:
        results["default_run"] = bench_default_run(args.quick, args.threads)
        log(f"default run: {results['default_run']['ratio']:.2f}x")
    out = FsPath(args.out)
    if args.only and out.exists():  # a subset of rows updates the earlier results
        results = {**json.loads(out.read_text()), **results}
    meta_key = f"meta:{args.only}" if args.only else "meta"  # a subset's run is described beside the full one's
    results[meta_key] = {
        "mode": "quick" if args.quick else "full", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "root": root.description, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
        "sizes": dataclasses.asdict(sizes), "wall_s": time.perf_counter() - t_start,
        "command": "python benchmarks/speed.py" + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else "") + (f" --only {args.only}" if args.only else "")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    print(f"results in {out}; wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
