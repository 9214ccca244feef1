"""Quality benchmark: muNet against fine-tuning, frozen bottom blocks, residual adapters and LoRA on the same budget.

Everything runs through munet's own code paths: muNet through ``munet.runner.run``; every baseline as a
``munet.model.path.TaskPath`` built from the same root (``build_baseline`` of ``benchmarks/baselines.py``), with the
same data, splits, augmentation defaults, standardised zero head, trainer (``train_generation``) and test evaluation
(``Evaluator.accuracy``). See ``benchmarks/baselines.py`` for exactly what each baseline trains.

What runs:
- muNet with the pretrained root at scale factor s = 1 (pure quality) and s in {0.98, 0.95, 0.9, 0.7, 0.3}
  (the quality-versus-size trade-off curve), and with a random-init root of the same architecture at s = 1.
- Per task, from the pretrained root, with the root path's default hyperparameters (the ones muNet's children
  start from): fine-tune all, freeze the bottom X blocks for every X in 0..depth, adapters of several widths,
  LoRA of several ranks (LoRA needs ``peft``: ``pip install -e '.[bench]'``; without it the LoRA points are
  skipped with a note and everything else runs).

Budget (equal compute, in training images): budget 1 is the mode's muNet configuration; each baseline trains each
task on as many training images as muNet s = 1 processed for it at the same budget (every child and probe, read
from the run's store), in whole validation periods of muNet's K. Budget b (``--curve``) gives each of muNet's
children b times the validation periods, and the curve baselines as many images as muNet then processed.
Core-hours are reported beside images.

Parameters per task: muNet's accounting (spec §5: a component shared by k tasks counts 1/k to each). For a
baseline: the task's own parameters (cloned or new components; LoRA matrices only, for LoRA) plus the frozen root
parts its path reads divided by the number of tasks (every task reads the same root parts, stored once).

Compute: wall seconds, core-hours = wall seconds x cores / 3600 (cores = torch's CPU threads), and training images
processed (validation and test passes not counted).

Modes are files in ``benchmarks/quality_modes/`` (``--mode NAME``; ``--quick`` and ``--smoke`` for short), each
with a docstring stating what it runs, the expected result and the command. ``--tasks SPEC,...`` replaces the
mode's tasks and ``--held-out`` uses the held-out glyph tasks (results kept apart); ``--baselines`` picks
baselines.

Resumable: each finished unit (one muNet run, or one baseline on one task) writes its result JSON under
``benchmarks/results/quality/<mode>/units/``; a rerun skips units whose JSON matches the current settings. An
interrupted muNet run resumes from its run's last checkpoint (the same result as an uninterrupted run).

Outputs: ``benchmarks/results/quality.json`` and ``quality.png`` (``quality_quick.*`` for ``--quick``; smoke
results stay under ``benchmarks/results/quality/smoke/``), and a printed table.

Commands: see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path as FsPath
from typing import Any, TypeVar

sys.path.insert(0, str(FsPath(__file__).resolve().parent))  # baselines, quality_modes, also when imported by path
from baselines import PEFT_HINT, BaselineSpec, lineage_budget, peft_available  # noqa: E402
from quality_modes import Mode, load_mode  # noqa: E402
from quality_modes import names as mode_names  # noqa: E402
from quality_report import (  # noqa: E402
    DEFINITIONS,
    baseline_method,
    check_targets,
    core_hours,
    format_table,
    format_targets,
    munet_method,
    plot,
    plot_curve,
    task_average,
)
from quality_units import BaselineRunner, Units, result_settings, run_munet  # noqa: E402

from munet.config import RunConfig  # noqa: E402
from munet.errors import MunetError  # noqa: E402
from munet.reporting.progress import Progress  # noqa: E402
from munet.storage.files import atomic_write  # noqa: E402
from munet.wiring import load_tasks  # noqa: E402

RESULTS = FsPath(__file__).resolve().parent / "results"
RANDOM_ROOT = "random:vit_small_patch14_dinov2"  # the DINOv2 ViT-S/14 architecture, random init
T = TypeVar("T")
WAIT_S = 30.0  # how often a baselines worker looks whether the muNet unit it waits for has finished


# --- scheduling ---------------------------------------------------------------------------------------------------
def drain(pending: list[T], attempt: Callable[[T, bool], bool], wait: bool, say: Callable[[str], None] = print,
          sleep: Callable[[float], None] = time.sleep) -> list[T]:
    """Works off ``pending`` baseline runs: first those whose muNet unit is finished (``attempt(p, False)``), then
    starting the muNet units nobody runs (``attempt(p, True)``, ``False`` while another process runs it); with
    ``wait`` (a baselines worker), then waits for those. Returns the runs left undone."""
    pending = [p for p in pending if not attempt(p, False)]
    pending = [p for p in pending if not attempt(p, True)]
    while pending and wait:
        say(f"waiting for the muNet units of {len(pending)} baseline run(s), which another process is running")
        sleep(WAIT_S)
        pending = [p for p in pending if not attempt(p, True)]
    return pending


def slug(text: str) -> str:
    """A file-name-safe ASCII form of a label (µ becomes mu)."""
    text = text.lower().replace("µ", "mu")
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in text).strip("_")


# --- plan ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MunetUnit:
    """One muNet run of the benchmark: its unit name (as ``--plan`` and the units folder name it), the report family
    and row label it belongs to, its configuration, and the budget and seed it stands for."""

    name: str
    family: str
    label: str
    cfg: RunConfig
    budget: int = 1
    seed: int = 0


def munet_units(mode: Mode, cfg: RunConfig, work: FsPath, curve: bool) -> list[MunetUnit]:
    """The muNet runs of ``mode`` on ``cfg``, in the order they run: s = 1, with ``curve`` its larger budgets and
    seeds (then the seeds of the larger budgets, largest first: where muNet came level with the baselines, the seeds
    say more), the random root, the s-sweep (with ``curve`` over its seeds) and, with ``curve``, the ablations."""

    def unit(name: str, family: str, label: str, run_cfg: RunConfig, budget: int = 1, seed: int = 0) -> MunetUnit:
        return MunetUnit(name, family, label, run_cfg.replace(out=str(work / "munet" / name)), budget, seed)

    plan = [unit("munet_s1.0", "munet", "muNet s=1.0", cfg)]
    if curve:
        plan += [unit(f"munet_s1.0_b{b}", "munet", f"muNet s=1.0 x{b}", mode.at_budget(cfg, b), budget=b)
                 for b in mode.budgets if b != 1]
        plan += [unit(f"munet_s1.0_seed{k}", "munet", "muNet s=1.0", cfg.replace(seed=k), seed=k)
                 for k in mode.seeds if k != 0]
        plan += [unit(f"munet_s1.0_b{b}_seed{k}", "munet", f"muNet s=1.0 x{b}", mode.at_budget(cfg, b).replace(seed=k),
                      budget=b, seed=k)
                 for b in sorted(mode.budgets, reverse=True) if b != 1 for k in mode.budget_seeds if k != 0]
    plan.append(unit("munet_random_s1.0", "munet-random", "muNet random root", cfg.replace(root=RANDOM_ROOT)))
    plan += [unit(f"munet_s{s}", "munet", f"muNet s={s}", cfg.replace(scale_factor=s))
             for s in sorted(mode.scales) if s != 1.0]
    if curve:
        plan += [unit(f"munet_s{s}_seed{k}", "munet", f"muNet s={s}", cfg.replace(scale_factor=s, seed=k), seed=k)
                 for s in sorted(mode.scales) if s != 1.0 for k in mode.sweep_seeds if k != 0]
        plan += [unit(f"ablation_{slug(label)}", "munet-ablation", f"ablation: {label}", cfg.replace(**changes))
                 for label, changes in mode.ablations]
    return plan


def report_methods(runs: list[MunetUnit], finished: dict[str, dict[str, Any]], specs: list[BaselineSpec],
                   baseline_runs: dict[tuple[str, int, int], dict[str, dict[str, Any]]], task_names: list[str]
                   ) -> list[dict[str, Any]]:
    """The report's rows: one per muNet label and budget (its finished seeds together), then one per baseline of
    ``specs`` and budget (its finished seeds, from ``baseline_runs`` keyed by (baseline, budget, seed))."""
    labelled: dict[tuple[str, int], list[dict[str, Any]]] = {}
    families: dict[tuple[str, int], str] = {}
    for r in runs:
        if r.name in finished:
            labelled.setdefault((r.label, r.budget), []).append(finished[r.name])
            families[(r.label, r.budget)] = r.family
    methods = [munet_method(label, families[(label, budget)], group, task_names, budget)
               for (label, budget), group in labelled.items()]
    for spec in specs:
        for budget in sorted({k[1] for k in baseline_runs if k[0] == spec.name}):
            seeds = [baseline_runs[k] for k in sorted(baseline_runs) if k[0] == spec.name and k[1] == budget]
            methods.append(baseline_method(spec, seeds, task_names, budget))
    return methods


# --- benchmark ----------------------------------------------------------------------------------------------------
class Benchmark:
    """One sitting of the benchmark: runs the muNet units, then the baselines (budget 1; with the curve the seeds of
    the best, the larger budgets and their seeds), sharing the units with other workers, and reports what finished.

    Args:
        mode: the mode (``quality_modes``), with the command line's overrides.
        cfg: the muNet configuration of budget 1 (the mode's, with the command line's tasks and device).
        work: the mode's results folder (units, muNet runs, logs).
        runs: the muNet units, in the order they run.
        specs: the budget-1 baselines; ``curve_specs`` those of the larger budgets.
        curve: with the curve (seeds, larger budgets, ablations).
        only: ``"munet"`` or ``"baselines"`` to run only those units, else ``None``.
        read_only: collect finished units only (``--report``): nothing is claimed or trained.
        chosen: the muNet units to run (``None``: all).
        quiet: no progress bar (the result lines stay).
    """

    def __init__(self, mode: Mode, cfg: RunConfig, work: FsPath, runs: list[MunetUnit], specs: list[BaselineSpec],
                 curve_specs: list[BaselineSpec], *, curve: bool, only: str | None, read_only: bool,
                 chosen: set[str] | None, quiet: bool):
        self.mode, self.cfg, self.work, self.runs = mode, cfg, work, runs
        self.specs, self.curve_specs, self.curve, self.only, self.chosen = specs, curve_specs, curve, only, chosen
        self.units = Units(work / "units", read_only=read_only)
        self.tasks = load_tasks(cfg.tasks, cfg.seed, cfg.data_dir, sys.stderr)
        self.task_names = list(self.tasks)
        self.sizes = {t: len(d.train_y) for t, d in self.tasks.items()}
        print("muNet's longest lineage per task (training images, the paper's baseline budget): "
              + ", ".join(f"{t} {lineage_budget(cfg, n):,}" for t, n in self.sizes.items()))
        self.t_start = time.perf_counter()
        self.lora_ok = peft_available()
        self.progress = Progress(self.planned(), sys.stderr, unit="unit", quiet=quiet or read_only)
        self.runner = BaselineRunner(cfg, self.tasks)
        self.finished: dict[str, dict[str, Any]] = {}  # unit name -> unit result
        self.busy: list[str] = []  # units another live process is running
        self.skipped: list[str] = []  # baselines that cannot run here (LoRA without PEFT)
        self.baseline_runs: dict[tuple[str, int, int], dict[str, dict[str, Any]]] = {}  # (spec, budget, seed) -> tasks

    def planned(self) -> int:
        """The units this sitting may run, for the progress bar."""
        mode, n_tasks = self.mode, len(self.task_names)
        runnable = [s for s in self.specs if s.kind != "lora" or self.lora_ok]
        chosen = [r for r in self.runs if self.chosen is None or r.name in self.chosen]
        planned = 0 if self.only == "baselines" else len(chosen)
        if self.only != "munet":
            planned += len(runnable) * n_tasks
            if self.curve:
                curve_runnable = [s for s in self.curve_specs if s.kind != "lora" or self.lora_ok]
                planned += n_tasks * (min(mode.top_baselines, len(runnable)) * (len(mode.seeds) - 1)
                                      + len(curve_runnable) * (len(mode.budgets) - 1)
                                      + min(mode.budget_top_baselines, len(curve_runnable))
                                      * (len(mode.budgets) - 1) * (len(mode.budget_seeds) - 1))
        return planned

    def tick(self, stored_before: int) -> None:
        """One unit finished: trained here (counts towards the ETA's rate) or found done."""
        (self.progress.advance if self.units.stored > stored_before else self.progress.skip)()

    def say(self, text: str) -> None:
        """A result line: above the bar on a terminal, on stdout otherwise."""
        if self.progress.live:
            self.progress.note(text)
        else:
            print(text, flush=True)

    def elapsed(self, t0: float) -> str:
        return f"{time.perf_counter() - t0:.0f} s; total {time.perf_counter() - self.t_start:.0f} s"

    # --- muNet ----------------------------------------------------------------------------------------------------
    def munet_result(self, munet: MunetUnit) -> dict[str, Any] | None:
        """The result of a muNet unit, run here if nobody has (``None`` while another process runs it)."""
        if munet.name not in self.finished:
            t0 = time.perf_counter()
            result = run_munet(munet.name, munet.cfg, self.work, self.units, self.sizes)
            if result is None:
                return None
            self.finished[munet.name] = result
            avg = task_average([result["tasks"].get(t, {}).get("test_acc") for t in self.task_names])
            self.say(f"[muNet] {munet.name}: average test {avg or float('nan'):.4f} ({self.elapsed(t0)})")
        return self.finished[munet.name]

    def run_munet_units(self) -> None:
        for munet in self.runs:
            if self.chosen is None or munet.name in self.chosen:
                before = self.units.stored
                if self.munet_result(munet) is not None:
                    self.tick(before)
                else:
                    self.busy.append(munet.name)

    # --- baselines ------------------------------------------------------------------------------------------------
    def reference_of(self, budget: int) -> MunetUnit:
        """The muNet s = 1 run (seed 0) whose images per task a baseline at ``budget`` trains on."""
        return next(r for r in self.runs if r.budget == budget and r.seed == 0 and r.family == "munet"
                    and r.cfg.scale_factor == 1.0)

    def baseline(self, spec: BaselineSpec, budget: int, seed: int, start: bool = True, train: bool = True) -> bool:
        """Trains one baseline at one budget and seed (without ``train``, only collects it if finished); ``False``
        when its muNet reference unit is not finished (and ``start`` is off, or another process is running it)."""
        if spec.kind == "lora" and not self.lora_ok:
            if spec.name not in self.skipped:
                self.skipped.append(spec.name)
                print(f"[baseline] {spec.name}: skipped. {PEFT_HINT}", flush=True)
            return True
        reference = self.reference_of(budget)
        # the images muNet s=1 processed per task at this budget
        budget_unit = (self.munet_result(reference) if start else self.finished.get(reference.name)
                       or self.units.get(reference.name, result_settings(reference.cfg)))
        if budget_unit is None:
            return False
        tag = (f"__b{budget}" if budget != 1 else "") + (f"__seed{seed}" if seed else "")
        t0 = time.perf_counter()
        per_task = {}
        for t in self.task_names:
            before = self.units.stored
            per_task[t] = self.runner.run(spec, t, self.units, budget_unit["tasks"][t]["images"], seed, tag, train)
            if per_task[t] is not None:
                self.tick(before)
        if None in per_task.values():
            if train:  # another process trains the rest of this baseline
                self.busy.extend(f"{spec.name}__{t}{tag}" for t, r in per_task.items() if r is None)
            return True
        self.baseline_runs[(spec.name, budget, seed)] = per_task
        avg = task_average([r["test_acc"] for r in per_task.values()])
        self.say(f"[baseline] {spec.name} x{budget} seed {seed}: average test {avg or float('nan'):.4f} "
                 f"({self.elapsed(t0)})")
        return True

    def best(self, budget: int, n: int) -> list[str]:
        """The ``n`` most accurate baselines at ``budget``, by their mean over the seeds finished so far (the
        report's mean)."""
        averages: dict[str, list[float]] = {}
        for (name, at, _), tasks in self.baseline_runs.items():
            if at == budget:
                averages.setdefault(name, []).append(task_average([r["test_acc"] for r in tasks.values()]) or 0.0)
        return sorted(averages, key=lambda name: -sum(averages[name]) / len(averages[name]))[:n]

    def repeat_best(self, budget: int, n: int, seeds: tuple[int, ...], kinds: list[BaselineSpec]) -> None:
        """Runs ``seeds`` of the ``n`` best baselines at ``budget``, again after each round: a baseline whose seeds
        bring its mean down can leave a one-seed baseline on top, whose seeds then run too, so that the verdict
        compares means of as many seeds on both sides."""
        repeated: set[str] = set()
        while True:
            self.collect(budget, seeds, kinds)
            top = [name for name in self.best(budget, n) if name not in repeated]
            if not top:
                return
            self.work_off([(BaselineSpec.parse(name), budget, seed) for name in top for seed in seeds if seed != 0])
            repeated.update(top)

    def collect(self, budget: int, seeds: tuple[int, ...], kinds: list[BaselineSpec]) -> None:
        """Reads the finished runs of ``kinds`` at ``budget`` and ``seeds`` (every finished seed counts, also of a
        baseline that is no longer among the best)."""
        for spec in kinds:
            for seed in seeds:
                if (spec.name, budget, seed) not in self.baseline_runs:
                    self.baseline(spec, budget, seed, start=False, train=False)

    def work_off(self, pending: list[tuple[BaselineSpec, int, int]]) -> None:
        left = drain(pending, lambda p, start: self.baseline(*p, start=start), wait=self.only == "baselines",
                     say=self.say)
        self.busy.extend(f"{spec.name} x{budget} (waits for {self.reference_of(budget).name})"
                         for spec, budget, _ in left)

    def run_baselines(self) -> None:
        """Budget 1; with the curve, the seeds of the best at budget 1 and the curve baselines at the larger budgets,
        then (once every curve baseline of a budget has its seed 0) the seeds of that budget's best (by mean)."""
        mode = self.mode
        self.work_off([(spec, 1, 0) for spec in self.specs])
        if not self.curve:
            return
        self.repeat_best(1, mode.top_baselines, mode.seeds, self.specs)
        self.work_off([(spec, budget, 0) for budget in mode.budgets if budget != 1 for spec in self.curve_specs])
        for budget in sorted((b for b in mode.budgets if b != 1), reverse=True):
            if all((c.name, budget, 0) in self.baseline_runs or c.name in self.skipped for c in self.curve_specs):
                self.repeat_best(budget, mode.budget_top_baselines, mode.budget_seeds, self.curve_specs)
            else:  # the best is known once all have run; what has run is reported
                self.collect(budget, mode.budget_seeds, self.curve_specs)

    # --- report ---------------------------------------------------------------------------------------------------
    def write_report(self, target: FsPath, name: str, default_target: float | None) -> None:
        """Prints the table and the targets, and writes ``target``.json, .png (and _curve.png with the curve)."""
        cfg, task_names = self.cfg, self.task_names
        methods = report_methods(self.runs, self.finished,
                                 [*self.specs, *[c for c in self.curve_specs if c not in self.specs]],
                                 self.baseline_runs, task_names)
        table = format_table(methods, task_names)
        curve_names = [c.name for c in self.curve_specs if c.name not in self.skipped]
        expected = {1: [s.name for s in self.specs]} | ({b: curve_names for b in self.mode.budgets if b != 1}
                                                        if self.curve else {})
        targets = check_targets(methods, default_target, expected)
        compute = {"munet": core_hours(self.finished.values()),
                   "baselines": core_hours(r for run in self.baseline_runs.values() for r in run.values())}
        print("\n" + table + "\n\n" + format_targets(targets) + f"\ncompute of the units reported: "
              f"{sum(compute.values()):.1f} core-hours (muNet {compute['munet']:.1f}, "
              f"baselines {compute['baselines']:.1f})")
        report = {"mode": name, "curve": self.curve, "left_out": self.busy if self.units.read_only else [],
                  "config": cfg.to_dict(), "random_root": RANDOM_ROOT, "core_hours": compute,
                  "tasks": task_names, "train_sizes": self.sizes, "skipped": self.skipped,
                  "definitions": DEFINITIONS,
                  "methods": methods, "table": table, "targets": targets}
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target.with_suffix(".json"), json.dumps(report, indent=1, default=str))
        title = f"{len(task_names)} tasks, {cfg.root} depth {cfg.depth} @ {cfg.image_size} px"
        plot(methods, f"muNet vs baselines, {name} mode: {title}", target.with_suffix(".png"))
        written = [target.with_suffix(".json"), target.with_suffix(".png")]
        if self.curve:
            curve_png = target.parent / f"{target.name}_curve.png"
            plot_curve(methods, f"accuracy against compute, {name} mode: {title}", curve_png)
            written.append(curve_png)
        print("wrote " + ", ".join(map(str, written)))


# --- main ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """The command line; a user's mistake (a bad task spec, a device this machine lacks...) exits 2 with one line
    naming it, as ``munet`` does."""
    try:
        return run_benchmark(argv)
    except MunetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run_benchmark(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--mode", default="full", help="a module of benchmarks/quality_modes (full, quick, smoke)")
    size.add_argument("--quick", action="store_const", const="quick", dest="mode", help="--mode quick")
    size.add_argument("--smoke", action="store_const", const="smoke", dest="mode", help="--mode smoke")
    parser.add_argument("--curve", action="store_true",
                        help="also the budget curve: muNet s=1 and the curve baselines at every budget of the mode, "
                             "the mode's seeds for muNet s=1 and the best baselines, and the ablations")
    parser.add_argument("--tasks", help="comma-separated task specs replacing the mode's tasks (any spec munet takes)")
    parser.add_argument("--held-out", action="store_true", help="the held-out glyph tasks instead of the mode's")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--adapters", help="comma-separated adapter widths (overrides the mode's)")
    parser.add_argument("--lora-ranks", help="comma-separated LoRA ranks (overrides the mode's)")
    parser.add_argument("--results", default=str(RESULTS), help="results directory (default: benchmarks/results)")
    parser.add_argument("--baselines", help="comma-separated baselines (e.g. freeze:0,adapters:64) replacing the "
                                            "mode's budget-1 grid, in that order; with --curve the seeds go to the "
                                            "best of these, so name the whole grid to run the mode's best")
    parser.add_argument("--curve-baselines", help="with --curve: comma-separated baselines of the curve's larger "
                                                  "budgets, replacing the mode's (e.g. to run the best one's seeds "
                                                  "first); the report then covers only these at those budgets")
    parser.add_argument("--plan", action="store_true", help="print the units and exit")
    parser.add_argument("--report", action="store_true",
                        help="write the report from the finished units only, running nothing (missing ones are listed)")
    parser.add_argument("--only", choices=("munet", "baselines"),
                        help="run only these units and write no report (to split the units between two processes; "
                             "a final run without --only reuses every finished unit and writes the report)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (the result lines stay)")
    parser.add_argument("--budgets", help="comma-separated budgets of the curve to run (a subset of the mode's, "
                                          "e.g. 2 to leave 4 for a later sitting)")
    parser.add_argument("--units", help="comma-separated muNet units to run (as --plan names them), skipping the "
                                        "other unfinished muNet units (e.g. the seeds before the longer budgets)")
    args = parser.parse_args(argv)

    if args.mode not in mode_names():
        parser.error(f"unknown mode {args.mode!r}; known modes: {', '.join(mode_names())}")
    mode = load_mode(args.mode)

    def ints(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            parser.error(f"expected comma-separated integers, got {text!r}")
    cfg, suffix = mode.cfg.replace(device=args.device), ""
    if args.held_out:
        from munet.data.registry import HELD_OUT

        cfg, suffix = cfg.replace(tasks=list(HELD_OUT)), "held_out"
    elif args.tasks:
        cfg, suffix = cfg.replace(tasks=[t for t in args.tasks.split(",") if t]), "tasks_" + slug(args.tasks)[:60]
    budgets = ints(args.budgets) if args.budgets else mode.budgets
    if args.curve_baselines and not args.curve:
        parser.error("--curve-baselines names the baselines of the curve's larger budgets: add --curve")
    if not set(budgets) <= set(mode.budgets):
        parser.error(f"--budgets {args.budgets}: the {mode.name} mode's budgets are {list(mode.budgets)}")
    mode = dataclasses.replace(mode, cfg=cfg, adapters=ints(args.adapters) if args.adapters else mode.adapters,
                               lora_ranks=ints(args.lora_ranks) if args.lora_ranks else mode.lora_ranks,
                               budgets=tuple(sorted({1, *budgets})))
    name = mode.name + (f"_{suffix}" if suffix else "")
    output = mode.output + (f"_{suffix}" if suffix else "")
    results = FsPath(args.results)
    work = results / "quality" / name

    runs = munet_units(mode, cfg, work, args.curve)
    specs = [BaselineSpec("finetune")] + [BaselineSpec("freeze", x) for x in range(cfg.depth + 1)]
    specs += [BaselineSpec("adapters", a) for a in mode.adapters] + [BaselineSpec("lora", r) for r in mode.lora_ranks]
    if args.baselines:
        specs = [BaselineSpec.parse(t) for t in args.baselines.split(",") if t]
    curve_specs = [BaselineSpec.parse(t) for t in (args.curve_baselines.split(",") if args.curve_baselines
                                                   else mode.curve_baselines) if t]
    print(f"quality benchmark, {name} mode{' with the curve' if args.curve else ''}: {len(runs)} muNet runs, "
          f"{len(specs)} baselines x {len(cfg.tasks)} tasks" + (f", {len(curve_specs)} baselines at budgets "
          f"{[b for b in mode.budgets if b != 1]}, seeds {list(mode.seeds)}" if args.curve else "")
          + f"; results in {work}")
    if args.plan:
        for r in runs:
            c = r.cfg
            print(f"  {r.name}: {r.label}, root {c.root}, s = {c.scale_factor}, budget x{r.budget}, seed {r.seed}, "
                  f"{c.children_per_task} children per task of {c.validations} validations")
        print("  baselines: " + ", ".join(s.name for s in specs) + ", each on the images muNet s=1 processed")
        return 0

    bench = Benchmark(mode, cfg, work, runs, specs, curve_specs, curve=args.curve, only=args.only,
                      read_only=args.report, chosen=set(args.units.split(",")) if args.units else None,
                      quiet=args.quiet)
    if args.only != "baselines":
        bench.run_munet_units()
    if args.only != "munet":
        bench.run_baselines()
    bench.progress.close()
    if bench.busy and args.report:
        print(f"left out of the report, not finished: {', '.join(bench.busy)}", flush=True)
    elif bench.busy:
        print(f"{len(bench.busy)} unit(s) are being run by other processes: {', '.join(bench.busy)}", flush=True)
        if not args.only:
            print("no report until they finish; run again then")
            return 1
    if args.only:
        print(f"finished the {args.only} units in {time.perf_counter() - bench.t_start:.0f} s; run without --only "
              "for the report")
        return 0
    bench.write_report(results / output, name, mode.default_target if not suffix else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
