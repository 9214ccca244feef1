"""Quality benchmark: muNet against fine-tuning, frozen bottom blocks, residual adapters and LoRA on the same budget.

Everything runs through munet's own code paths: muNet through ``munet.runner.run``; every baseline as a
``munet.model.path.Path`` built from the same root (``munet.baselines.build_baseline``), with the same data,
splits, augmentation defaults, standardised zero head, trainer (``train_generation``) and test evaluation
(``Evaluator.accuracy``). See ``munet/baselines.py`` for exactly what each baseline trains.

What runs:
- muNet with the pretrained root at scale factor s = 1 (pure quality) and s in {0.98, 0.95, 0.9, 0.7, 0.3}
  (the quality-versus-size trade-off curve), and with a random-init root of the same architecture at s = 1.
- Per task, from the pretrained root, with the root path's default hyperparameters (the ones muNet's children
  start from): fine-tune all, freeze the bottom X blocks for every X in 0..depth, adapters of several widths,
  LoRA of several ranks (LoRA needs ``peft``: ``pip install -e '.[bench]'``; without it the LoRA points are
  skipped with a note and everything else runs).

Budget: each baseline trains each task on the images of the longest lineage muNet can grow for that task:
``rounds x ceil(children_per_task / generation_size) x validations x K x batch_size`` training images, with
``K = min(ceil(N_train / batch_size), steps_between_validations)`` (no retained muNet path was trained on more
images of its task; the spec's "same sequential budget as one muNet lineage"). For muNet the report also gives
the realised lineage of each retained path and the images all of its children processed.

Parameters per task: muNet's accounting (spec §5: a component shared by k tasks counts 1/k to each). For a
baseline: the task's own parameters (cloned or new components; LoRA matrices only, for LoRA) plus the frozen root
parts its path reads divided by the number of tasks (every task reads the same root parts, stored once).

Compute: wall seconds, core-hours = wall seconds x cores / 3600 (cores = torch's CPU threads), and training images
processed (validation and test passes not counted). muNet's wall time includes loading the root and the data (a few
seconds per run); a baseline's covers building, training and testing its paths.

Modes (times measured on the 2-core development CPU):
- ``--smoke``: 2 small tasks (uci_digits, faces), 1 block at 28 px, 2 children, 3 steps; s in {1, 0.3}, the random
  root, fine-tune, freeze 0 and 1, adapters 8, LoRA 2. Checks the pipeline in about a minute; numbers mean nothing.
- ``--quick`` (3 min 40 s): 4 tasks (uci_digits, mnist_5k, animal_silhouettes, textures), 3 blocks at 28 px,
  4 children in generations of 2, 2 validations of at most 10 steps (muNet lineage budget 2,560 images per task);
  all 7 muNet runs; fine-tune, freeze 0..3, adapters {8, 64}, LoRA {4, 16}.
- full (default, under 2 h with two workers): the offline default configuration (8 tasks, 6 blocks at 42 px,
  8 children in generations of 4, 3 validations of at most 20 steps: 7,680 images per task for the large tasks);
  7 muNet runs (871-1,026 s each with one thread, 433 s for the random root), fine-tune, freeze 0..6, adapters
  {8, 64} and LoRA {4, 16} (3,795 s together with one thread). Split between two single-threaded workers
  (``--only munet`` / ``--only baselines``; a worker that runs out of its own units can take the other's
  remaining muNet units), the whole benchmark fits in about 2 hours on 2 cores. Widen the grids with
  ``--adapters`` / ``--lora-ranks`` where time allows.

Resumable: each finished unit (one muNet run, or one baseline on one task) writes its result JSON under
``benchmarks/results/quality/<mode>/units/``; a rerun skips units whose JSON matches the current settings. An
interrupted muNet run is restarted from scratch (its partial run directory is removed).

Outputs: ``benchmarks/results/quality.json`` and ``quality.png`` (``quality_quick.*`` for ``--quick``; smoke
results stay under ``benchmarks/results/quality/smoke/``), and a printed table.

Commands::

    pip install -e '.[bench]'                 # peft for the LoRA baselines
    python benchmarks/quality.py --smoke      # about a minute
    python benchmarks/quality.py --quick      # about 15 minutes
    python benchmarks/quality.py              # full, at most 2 hours
    # or on 2 cores, the two halves side by side (one thread each), then the report from the finished units:
    OMP_NUM_THREADS=1 python benchmarks/quality.py --only munet & OMP_NUM_THREADS=1 python benchmarks/quality.py \
        --only baselines; wait; python benchmarks/quality.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any

import torch

from munet.baselines import (
    PEFT_HINT,
    BaselineSpec,
    baseline_settings,
    build_baseline,
    count_params,
    lineage_budget,
    munet_images,
    peft_available,
    steps_between_validations,
    train_baseline,
)
from munet.config import RunConfig
from munet.data.task import TaskData
from munet.evolution.system import ScoreConfig, System
from munet.model.roots import load_root
from munet.runner import load_tasks, resolve_device, run
from munet.storage.store import DB_NAME, atomic_write
from munet.training.frozen import FeatureCache
from munet.training.trainer import Evaluator

RESULTS = FsPath(__file__).resolve().parent / "results"
RANDOM_ROOT = "random:vit_small_patch14_dinov2"  # the DINOv2 ViT-S/14 architecture, random init
SCALES = (1.0, 0.98, 0.95, 0.9, 0.7, 0.3)


@dataclass(frozen=True)
class Mode:
    """One benchmark size.

    Args:
        name: ``full``, ``quick`` or ``smoke``.
        cfg: the muNet configuration (tasks, root, depth, image size, budget) every unit shares.
        scales: muNet scale factors with the pretrained root.
        adapters: adapter widths.
        lora_ranks: LoRA ranks.
        output: stem of the result files (JSON and PNG), relative to the results directory.
    """

    name: str
    cfg: RunConfig
    scales: tuple[float, ...]
    adapters: tuple[int, ...]
    lora_ranks: tuple[int, ...]
    output: str

    def baselines(self) -> list[BaselineSpec]:
        """Fine-tune, freeze every X in 0..depth, then the adapter and LoRA grids."""
        specs = [BaselineSpec("finetune")] + [BaselineSpec("freeze", x) for x in range(self.cfg.depth + 1)]
        specs += [BaselineSpec("adapters", a) for a in self.adapters]
        return specs + [BaselineSpec("lora", r) for r in self.lora_ranks]


def make_mode(name: str) -> Mode:
    if name == "smoke":
        cfg = RunConfig(tasks=["uci_digits", "faces"], depth=1, image_size=28, max_image_size=28,
                        children_per_task=2, generation_size=2, steps_between_validations=3, validations=1,
                        max_val_examples=100)
        return Mode("smoke", cfg, (1.0, 0.3), (8,), (2,), "quality/smoke/quality")
    if name == "quick":
        cfg = RunConfig(tasks=["uci_digits", "mnist_5k", "animal_silhouettes", "textures"], depth=3, image_size=28,
                        max_image_size=42, children_per_task=4, generation_size=2, steps_between_validations=10,
                        validations=2, max_val_examples=500)
        return Mode("quick", cfg, SCALES, (8, 64), (4, 16), "quality_quick")
    return Mode("full", RunConfig(), SCALES, (8, 64), (4, 16), "quality")


# --- units --------------------------------------------------------------------------------------------------------
class Units:
    """Finished units' result JSONs in ``folder``; a unit counts as done only if its stored settings match."""

    def __init__(self, folder: FsPath):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def file(self, unit: str) -> FsPath:
        return self.folder / (unit.replace(":", "-").replace("/", "-") + ".json")

    def get(self, unit: str, settings: dict[str, Any]) -> dict[str, Any] | None:
        try:
            result = json.loads(self.file(unit).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return result if _same_settings(result.get("settings"), settings) else None

    def put(self, unit: str, result: dict[str, Any]) -> None:
        atomic_write(self.file(unit), json.dumps(result, indent=1, default=str))
        self.file(unit).with_suffix(".claim").unlink(missing_ok=True)

    def claim(self, unit: str) -> bool:
        """Marks ``unit`` as run by this process; ``False`` if another live process has claimed it (so several
        ``--only`` workers can share the units)."""
        mark = self.file(unit).with_suffix(".claim")
        try:
            pid = int(mark.read_text())
            os.kill(pid, 0)  # raises if no such process
            if pid != os.getpid():
                return False
        except (OSError, ValueError):
            pass
        atomic_write(mark, str(os.getpid()))
        return True


DEFAULTS = RunConfig().to_dict()


def _same_settings(stored: Any, current: Any) -> bool:
    """Equal settings, where a configuration key that is missing from ``stored`` (recorded before the key existed)
    matches the key's default value."""
    if isinstance(stored, dict) and isinstance(current, dict):
        return set(stored) <= set(current) and all(
            _same_settings(stored[k], v) if k in stored else k in DEFAULTS and v == DEFAULTS[k]
            for k, v in current.items())
    return stored == current


def cores() -> int:
    return torch.get_num_threads()


def realised_lineages(run_dir: FsPath, cfg: RunConfig, train_sizes: dict[str, int]) -> dict[str, int]:
    """Training images along each retained path's ancestors within its task (from the run store's ``paths`` and
    ``live`` tables); empty if the store cannot be read."""
    try:
        db = sqlite3.connect(f"file:{run_dir / DB_NAME}?mode=ro", uri=True)
        try:
            records = {pid: {"task": task, "parent": parent}
                       for pid, task, parent in db.execute("SELECT id, task, parent FROM paths")}
            retained = [{"id": pid, "task": task} for pid, task in db.execute(
                "SELECT id, task FROM paths WHERE id IN (SELECT path_id FROM live WHERE rank IS NOT NULL)")]
        finally:
            db.close()
    except sqlite3.Error:
        return {}
    out: dict[str, int] = {}
    for path in retained:
        task, pid, chain = path["task"], path["id"], 0
        while pid in records and records[pid]["task"] == task:
            chain, pid = chain + 1, records[pid]["parent"]
        if task in train_sizes:
            k = steps_between_validations(cfg, train_sizes[task])
            out[task] = chain * cfg.validations * k * cfg.batch_size
    return out


def run_munet(name: str, cfg: RunConfig, work: FsPath, units: Units, train_sizes: dict[str, int]
              ) -> dict[str, Any] | None:
    """One muNet run (resumable as a whole); returns its unit result (``None`` if another process runs it)."""
    settings = cfg.to_dict()
    done = units.get(name, settings)
    if done:
        return done
    if not units.claim(name):
        return None
    out = FsPath(cfg.out)
    if out.exists():  # an interrupted run of this unit: start it again
        shutil.rmtree(out)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(logs / f"{name}.log", "w") as log:
        summary = run(cfg, stream=log)
    wall = time.perf_counter() - t0
    lineage = realised_lineages(out, cfg, train_sizes)
    tasks = {r["task"]: {"test_acc": r["test_acc"], "val_acc": r["val_acc"], "params": r["params"],
                         "accounted": r["accounted"], "layers": r["layers"], "image_size": r["image_size"],
                         "reuse": r["reuse"], "lineage_images": lineage.get(r["task"])} for r in summary["tasks"]}
    result = {"unit": name, "settings": settings, "kind": "munet", "root": summary["root"], "wall_s": wall,
              "cores": cores(), "device": str(resolve_device(cfg.device)), "tasks": tasks,
              "images": sum(munet_images(cfg, train_sizes[t]) for t in tasks if t in train_sizes)}
    units.put(name, result)
    return result


class BaselineRunner:
    """Trains baseline units on one pretrained root, loaded on first use."""

    def __init__(self, cfg: RunConfig, tasks: dict[str, TaskData]):
        self.cfg, self.tasks = cfg, tasks
        self.device = resolve_device(cfg.device)
        self.system: System | None = None

    def _system(self) -> System:
        if self.system is None:
            root = load_root(self.cfg.root, self.cfg.depth or None)
            self.system = System(root, self.cfg.image_size, ScoreConfig(), {"opt_lr": self.cfg.lr})
            for name, data in self.tasks.items():
                self.system.add_task(name, data.num_classes)
        return self.system

    def run(self, spec: BaselineSpec, task: str, units: Units) -> dict[str, Any] | None:
        """Trains and tests one baseline on one task (or returns its finished result); ``None`` if another process
        is running it."""
        unit = f"{spec.name}__{task}"
        settings = {"baseline": spec.name, "task": task, "config": self.cfg.to_dict()}
        done = units.get(unit, settings)
        if done:
            return done
        if not units.claim(unit):
            return None
        system = self._system()
        t0 = time.perf_counter()
        path = build_baseline(system, task, spec, seed=self.cfg.seed)
        train = baseline_settings(self.cfg, self.device)
        # a fresh cache per unit, as each muNet run has, so no unit reuses another's frozen features
        evaluator = Evaluator(train, FeatureCache(self.cfg.feature_cache_mb << 20), system.root.mean, system.root.std)
        result = train_baseline(path, self.tasks[task], train, evaluator, seed=self.cfg.seed)
        n = count_params(path)
        result.update(unit=unit, settings=settings, kind="baseline", baseline=spec.name, task=task,
                      wall_s=time.perf_counter() - t0, cores=cores(), device=str(self.device),
                      params={"total": n.total, "own": n.own, "trainable": n.trainable, "shared": n.shared})
        units.put(unit, result)
        return result


# --- aggregation --------------------------------------------------------------------------------------------------
def _average(values: list[float | None]) -> float | None:
    """Mean test accuracy; ``None`` unless every task has one (a failed task makes the average meaningless)."""
    return sum(values) / len(values) if values and all(v is not None for v in values) else None


def munet_method(label: str, family: str, unit: dict[str, Any], task_names: list[str]) -> dict[str, Any]:
    tasks = unit["tasks"]
    per_task = sum(t["accounted"] for t in tasks.values()) / max(len(tasks), 1)
    return {"method": label, "family": family, "scale_factor": unit["settings"]["scale_factor"],
            "root": unit["root"], "test_acc": {t: tasks.get(t, {}).get("test_acc") for t in task_names},
            "average": _average([tasks.get(t, {}).get("test_acc") for t in task_names]),
            "params_per_task": per_task, "images": unit["images"], "wall_s": unit["wall_s"],
            "core_hours": unit["wall_s"] * unit["cores"] / 3600, "device": unit["device"],
            "lineage_images": {t: tasks[t]["lineage_images"] for t in tasks}, "tasks": tasks}


def baseline_method(spec: BaselineSpec, results: dict[str, dict[str, Any]], task_names: list[str]
                    ) -> dict[str, Any]:
    count = len(task_names)
    per_task = sum(r["params"]["own"] + r["params"]["shared"] / count for r in results.values()) / count
    wall = sum(r["wall_s"] for r in results.values())
    return {"method": spec.name, "family": spec.kind, "value": spec.value,
            "test_acc": {t: results[t]["test_acc"] for t in task_names},
            "average": _average([results[t]["test_acc"] for t in task_names]), "params_per_task": per_task,
            "images": sum(r["images"] for r in results.values()), "wall_s": wall,
            "core_hours": sum(r["wall_s"] * r["cores"] for r in results.values()) / 3600,
            "device": next(iter(results.values()))["device"], "tasks": results}


def _short(task: str) -> str:
    """``fashion_mnist_coarse`` -> ``fas_mni_coa``: distinct column headers that fit the table."""
    return "_".join(part[:3] for part in task.split("_"))


def format_table(methods: list[dict[str, Any]], task_names: list[str]) -> str:
    cols = [_short(t) for t in task_names]
    header = f"{'method':<18}" + "".join(f" {c:>11}" for c in cols) + \
        f" {'average':>8} {'params/task':>12} {'train imgs':>11} {'wall s':>8} {'core-h':>7}"
    lines = [header, "-" * len(header)]
    for m in methods:
        accs = "".join(f" {a:>11.4f}" if a is not None else f" {'-':>11}" for a in m["test_acc"].values())
        avg = f"{m['average']:.4f}" if m["average"] is not None else "-"
        lines.append(f"{m['method']:<18}{accs} {avg:>8} {m['params_per_task']:>12,.0f} {m['images']:>11,} "
                     f"{m['wall_s']:>8.0f} {m['core_hours']:>7.3f}")
    return "\n".join(lines)


CLEAR_MARGIN = 0.05  # "beats the random root by a clear margin": our reading, 5 points of average accuracy


def check_targets(methods: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's three targets, checked on the results: muNet s = 1 vs fine-tune (>= +2.4 points with <= 53 % of
    its parameters per task), no freeze/adapters/LoRA point dominating a muNet point (higher average accuracy and
    fewer parameters), and the pretrained root clearly above the random root."""
    by_name = {m["method"]: m for m in methods if m["average"] is not None}
    s1, ft, rnd = by_name.get("muNet s=1.0"), by_name.get("finetune"), by_name.get("muNet random root")
    out: dict[str, Any] = {}
    if s1 and ft:
        gain, share = s1["average"] - ft["average"], s1["params_per_task"] / ft["params_per_task"]
        out["vs_finetune"] = {"gain": gain, "param_share": share, "met": gain >= 0.024 and share <= 0.53}
    curve = [m for m in by_name.values() if m["family"] == "munet"]
    dominating = [{"baseline": b["method"], "munet": m["method"]} for b in by_name.values()
                  if b["family"] in ("freeze", "adapters", "lora") for m in curve
                  if b["average"] > m["average"] and b["params_per_task"] < m["params_per_task"]]
    out["curve_dominates"] = {"dominated_points": dominating, "met": bool(curve) and not dominating}
    if s1 and rnd:
        margin = s1["average"] - rnd["average"]
        out["pretrained_vs_random"] = {"margin": margin, "met": margin >= CLEAR_MARGIN}
    return out


def format_targets(targets: dict[str, Any]) -> str:
    lines = []
    if "vs_finetune" in targets:
        t = targets["vs_finetune"]
        lines.append(f"muNet s=1 vs fine-tune: {t['gain'] * 100:+.2f} points with {t['param_share']:.0%} of its "
                     f"parameters per task (target >= +2.4 with <= 53%): {'met' if t['met'] else 'NOT met'}")
    d = targets["curve_dominates"]
    pairs = ", ".join(f"{p['baseline']} over {p['munet']}" for p in d["dominated_points"]) or "none"
    lines.append(f"baseline points with higher accuracy and fewer parameters than a muNet point: {pairs}: "
                 f"{'met' if d['met'] else 'NOT met'}")
    if "pretrained_vs_random" in targets:
        t = targets["pretrained_vs_random"]
        lines.append(f"pretrained vs random root: {t['margin'] * 100:+.2f} points (clear margin: >= "
                     f"{CLEAR_MARGIN * 100:.0f}): {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def plot(methods: list[dict[str, Any]], title: str, target: FsPath) -> None:
    """Average test accuracy against parameters per task: muNet's curve against every baseline point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"munet": ("C3", "o", "-"), "munet-random": ("C7", "*", ""), "finetune": ("C0", "s", ""),
              "freeze": ("C1", "v", "--"), "adapters": ("C2", "^", "--"), "lora": ("C4", "D", "--")}
    labels = {"munet": "muNet (scale factor s)", "munet-random": "muNet, random-init root", "finetune": "fine-tune all",
              "freeze": "freeze bottom X blocks", "adapters": "adapters (width X)", "lora": "LoRA (rank r)"}
    for family, (color, marker, line) in styles.items():
        points = sorted(((m["params_per_task"], m["average"], m) for m in methods
                         if m["family"] == family and m["average"] is not None), key=lambda p: p[:2])
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, color=color, marker=marker, linestyle=line or "none", label=labels[family])
        for x, y, m in points:
            note = f"s={m['scale_factor']}" if family == "munet" else "" if m.get("value") is None else str(m["value"])
            if note:
                ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("parameters per task (shared parts split between tasks)")
    ax.set_ylabel("average test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


# --- main ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="4 tasks, 3 blocks at 28 px, small budget (~15 min)")
    size.add_argument("--smoke", action="store_true", help="2 tiny tasks, 1 block, a few steps (~1 min)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--adapters", help="comma-separated adapter widths (overrides the mode's)")
    parser.add_argument("--lora-ranks", help="comma-separated LoRA ranks (overrides the mode's)")
    parser.add_argument("--results", default=str(RESULTS), help="results directory (default: benchmarks/results)")
    parser.add_argument("--plan", action="store_true", help="print the units and exit")
    parser.add_argument("--only", choices=("munet", "baselines"),
                        help="run only these units and write no report (to split the units between two processes; "
                             "a final run without --only reuses every finished unit and writes the report)")
    args = parser.parse_args(argv)

    mode = make_mode("smoke" if args.smoke else "quick" if args.quick else "full")
    ints = lambda text: tuple(int(v) for v in text.split(",") if v.strip())  # noqa: E731
    mode = Mode(mode.name, mode.cfg.replace(device=args.device), mode.scales,
                ints(args.adapters) if args.adapters else mode.adapters,
                ints(args.lora_ranks) if args.lora_ranks else mode.lora_ranks, mode.output)
    results = FsPath(args.results)
    work = results / "quality" / mode.name
    cfg = mode.cfg
    munet_runs = [(f"munet_s{s}", "munet", f"muNet s={s}", cfg.replace(scale_factor=s)) for s in mode.scales]
    munet_runs.append(("munet_random_s1.0", "munet-random", "muNet random root", cfg.replace(root=RANDOM_ROOT)))
    munet_runs = [(n, f, lbl, c.replace(out=str(work / "munet" / n))) for n, f, lbl, c in munet_runs]
    specs = mode.baselines()
    print(f"quality benchmark, {mode.name} mode: {len(munet_runs)} muNet runs, {len(specs)} baselines x "
          f"{len(cfg.tasks)} tasks; results in {work}")
    if args.plan:
        for name, _, _, c in munet_runs:
            print(f"  {name}: root {c.root}, s = {c.scale_factor}")
        print("  baselines: " + ", ".join(s.name for s in specs))
        return 0

    units = Units(work / "units")
    tasks = load_tasks(cfg.tasks, cfg.seed, cfg.data_dir, sys.stderr)
    task_names = list(tasks)
    sizes = {t: len(d.train_y) for t, d in tasks.items()}
    budget = {t: lineage_budget(cfg, n) for t, n in sizes.items()}
    print("budget per task (training images): " + ", ".join(f"{t} {b:,}" for t, b in budget.items()))
    t_start = time.perf_counter()
    methods: list[dict[str, Any]] = []
    # s = 1 and the random root first (the headline comparisons), then the sweep from the smallest s, which moves
    # furthest from s = 1: the most informative runs are done first if the benchmark is cut short
    order = sorted(munet_runs, key=lambda r: (r[1] != "munet" or r[3].scale_factor != 1.0, r[1] != "munet-random",
                                              r[3].scale_factor))
    finished: dict[str, dict[str, Any]] = {}
    busy: list[str] = []  # units another live process is running
    for i, (name, family, label, run_cfg) in enumerate(order if args.only != "baselines" else []):
        t0 = time.perf_counter()
        unit = run_munet(name, run_cfg, work, units, sizes)
        if unit is None:
            busy.append(name)
            continue
        finished[name] = munet_method(label, family, unit, task_names)
        print(f"[muNet {i + 1}/{len(order)}] {name}: average test {finished[name]['average'] or float('nan'):.4f} "
              f"({time.perf_counter() - t0:.0f} s; total {time.perf_counter() - t_start:.0f} s)", flush=True)
    methods += [finished[name] for name, *_ in munet_runs if name in finished]
    runner = BaselineRunner(cfg, tasks)
    skipped = []
    for i, spec in enumerate(specs if args.only != "munet" else []):
        if spec.kind == "lora" and not peft_available():
            skipped.append(spec.name)
            print(f"[baseline {i + 1}/{len(specs)}] {spec.name}: skipped. {PEFT_HINT}", flush=True)
            continue
        t0 = time.perf_counter()
        per_task = {t: runner.run(spec, t, units) for t in task_names}
        if None in per_task.values():
            busy += [f"{spec.name}__{t}" for t, r in per_task.items() if r is None]
            continue
        methods.append(baseline_method(spec, per_task, task_names))
        print(f"[baseline {i + 1}/{len(specs)}] {spec.name}: average test "
              f"{methods[-1]['average'] or float('nan'):.4f} ({time.perf_counter() - t0:.0f} s; total "
              f"{time.perf_counter() - t_start:.0f} s)", flush=True)
    if busy:
        print(f"{len(busy)} unit(s) are being run by other processes: {', '.join(busy)}", flush=True)
        if not args.only:
            print("no report until they finish; run again then")
            return 1
    if args.only:
        print(f"finished the {args.only} units in {time.perf_counter() - t_start:.0f} s; run without --only for the "
              "report")
        return 0

    table = format_table(methods, task_names)
    targets = check_targets(methods)
    print("\n" + table + "\n\n" + format_targets(targets))
    report = {"mode": mode.name, "config": cfg.to_dict(), "random_root": RANDOM_ROOT, "tasks": task_names,
              "train_sizes": sizes, "budget_images_per_task": budget, "skipped": skipped,
              "definitions": {
                  "budget": "rounds x ceil(children_per_task / generation_size) x validations x K x batch_size "
                            "training images per task, K = min(ceil(N_train / batch_size), steps_between_validations)",
                  "params_per_task": "muNet: mean accounted params (spec §5); baselines: own params + shared "
                                     "frozen root params / number of tasks",
                  "core_hours": "wall seconds x torch CPU threads / 3600",
                  "images": "training images processed (muNet: all children; baselines: the budget)"},
              "methods": methods, "table": table, "targets": targets}
    target = results / mode.output
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target.with_suffix(".json"), json.dumps(report, indent=1, default=str))
    plot(methods, f"muNet vs baselines, {mode.name} mode: {len(task_names)} tasks, {cfg.root} depth {cfg.depth} "
         f"@ {cfg.image_size} px", target.with_suffix(".png"))
    print(f"wrote {target.with_suffix('.json')} and {target.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
