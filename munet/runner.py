"""Running a configuration end to end: load root and tasks, evolve, save, report."""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any, TextIO

import torch

from munet.config import RunConfig
from munet.data.registry import load_task
from munet.data.task import TaskData
from munet.errors import ConfigError, MunetError, TaskUnavailable
from munet.evolution.hparams import MutationPolicy
from munet.evolution.loop import Evolution
from munet.evolution.system import ScoreConfig, System
from munet.model.path import Path
from munet.model.roots import load_root
from munet.reporting.progress import Progress
from munet.reporting.table import format_table, task_rows
from munet.storage.state import atomic_write, load_state, path_record, read_state, save_state
from munet.training.frozen import FeatureCache
from munet.training.trainer import Evaluator, TrainSettings

log = logging.getLogger("munet")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but no CUDA device is available")
    return torch.device(name)


def prepare_output(out: FsPath) -> None:
    """Creates the output directory and checks it is writable before any compute is spent."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise MunetError(f"output directory {out} is not writable: {err.strerror or err}") from err


def load_tasks(specs: list[str], seed: int, data_dir: str, stream: TextIO) -> dict[str, TaskData]:
    """Loads every task; a task whose source is not installed is reported and left out, not fatal."""
    tasks: dict[str, TaskData] = {}
    for spec in specs:
        try:
            data = load_task(spec, seed, data_dir)
        except TaskUnavailable as err:
            stream.write(f"warning: task {spec} is unavailable and is left out: {err}\n")
            continue
        tasks[data.name] = data
    if not tasks:
        raise MunetError("none of the configured tasks could be loaded")
    return tasks


@dataclass
class Session:
    """Everything a run needs, built from a configuration."""

    cfg: RunConfig
    out: FsPath
    system: System
    evolution: Evolution
    tasks: dict[str, TaskData]
    stream: TextIO

    def plan(self, task_order: list[str]) -> int:
        """Work units (child training steps) of running one iteration of each task in ``task_order``."""
        return sum(self.cfg.children_per_task * self.evolution.steps_per_child(t) for t in task_order)

    def run_iterations(self, task_order: list[str]) -> None:
        """Runs one task iteration per entry of ``task_order``, saving after each, with progress and ETA."""
        progress = Progress(self.plan(task_order), self.stream)
        evo = self.evolution
        evo.on_step = progress.advance
        records = open(self.out / "paths.jsonl", "a")
        try:
            def on_generation(task: str, gen: int, children: list[Path]) -> None:
                for child in children:
                    records.write(json.dumps(path_record(child), default=str) + "\n")
                records.flush()
                accepted = sum(bool(c.metrics["improved"]) for c in children)
                best = self.system.best_path(task)
                best_q = f"{best.metrics['quality']:.4f}" if best else "-"
                progress.note(f"{progress.line()} | gen {gen + 1}/{evo.generations()} accepted {accepted}/"
                              f"{len(children)}, best val {best_q}")

            evo.on_generation = on_generation
            for i, task in enumerate(task_order):
                progress.label = f"[{i + 1}/{len(task_order)}] {task}"
                best = evo.task_iteration(task)
                self.save()
                if best is not None:
                    progress.note(f"{task}: retained path #{best.id}, val {best.metrics['quality']:.4f}, "
                                  f"test {best.metrics['test_quality']:.4f}")
        finally:
            records.close()

    def save(self) -> None:
        save_state(self.system, self.out, {"iteration": self.evolution.iteration, "config": self.cfg.to_dict()})

    def report(self, wall_time: float) -> dict[str, Any]:
        rows = task_rows(self.system)
        summary = {"wall_time_s": wall_time, "root": self.system.root.description,
                   "reference_params": self.system.reference_params, "tasks": rows}
        atomic_write(self.out / "summary.json", json.dumps(summary, indent=1))
        self.stream.write(format_table(rows, int(self.system.reference_params)) + "\n")
        self.stream.write(f"wall time {wall_time:.0f} s; results in {self.out}\n")
        return summary


def build_session(cfg: RunConfig, stream: TextIO = sys.stdout, state: dict[str, Any] | None = None) -> Session:
    """Builds root, tasks, system and evolution for ``cfg`` (restoring ``state`` when given)."""
    cfg.validate()
    out = FsPath(cfg.out)
    prepare_output(out)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    root = load_root(cfg.root, cfg.depth or None)
    if cfg.image_size % root.patch_size or cfg.max_image_size < root.patch_size:
        raise ConfigError(f"image_size {cfg.image_size} must be a multiple of the root's patch size "
                          f"{root.patch_size}")
    tasks = load_tasks(cfg.tasks, cfg.seed, cfg.data_dir, stream)
    policy = MutationPolicy(cfg.mu_policy, cfg.mutation_prob, random.Random(cfg.seed))
    extra: dict[str, Any] = {"opt_lr": cfg.lr}
    policy.init_hparams(extra)
    score = ScoreConfig(cfg.scale_factor, cfg.compute_scale)
    if state is None:
        system = System(root, cfg.image_size, score, extra)
    else:
        system = load_state(state, out, root, cfg.image_size, score, extra)
    for name, data in tasks.items():
        if system.num_classes.get(name, data.num_classes) != data.num_classes:
            raise MunetError(f"task {name} has {data.num_classes} classes but the stored system has "
                             f"{system.num_classes[name]}")
        system.add_task(name, data.num_classes)
    settings = TrainSettings(batch_size=cfg.batch_size, max_steps_between_validations=cfg.steps_between_validations,
                             validations=cfg.validations, max_val_examples=cfg.max_val_examples, device=device,
                             autocast_bf16=device.type == "cuda")
    evaluator = Evaluator(settings, FeatureCache(cfg.feature_cache_mb << 20), root.mean, root.std)
    evolution = Evolution(system, tasks, policy, settings, evaluator, cfg.children_per_task, cfg.generation_size,
                          cfg.max_image_size, cfg.mutate_adapters, cfg.max_task_population, cfg.max_seeds, cfg.seed)
    if state is not None:
        evolution.iteration = state["iteration"]
        policy.rng.seed(cfg.seed * 7919 + evolution.iteration)  # a new, reproducible stream for the new work
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    stream.write(f"root: {root.description} [{root.source}]\n"
                 f"tasks: {', '.join(f'{n} ({d.num_classes} classes)' for n, d in tasks.items())}\n"
                 f"device: {device}; {cfg.rounds} round(s) x {len(tasks)} tasks x {cfg.children_per_task} children\n")
    stream.flush()
    return Session(cfg, out, system, evolution, tasks, stream)


def run(cfg: RunConfig, stream: TextIO = sys.stdout) -> dict[str, Any]:
    """Evolves a new system over ``cfg.tasks`` for ``cfg.rounds`` round-robin rounds; returns the summary."""
    if (FsPath(cfg.out) / "state.json").exists():
        raise MunetError(f"{cfg.out} already holds a run; choose another --out, or extend it with "
                         f"`munet add-task {cfg.out} TASK...`")
    t0 = time.perf_counter()
    session = build_session(cfg, stream)
    order = [t for _ in range(cfg.rounds) for t in session.tasks]
    session.run_iterations(order)
    return session.report(time.perf_counter() - t0)


def add_tasks(run_dir: str, tasks: list[str], overrides: dict[str, Any], stream: TextIO = sys.stdout
              ) -> dict[str, Any]:
    """µ2Net's dynamic task introduction: one task iteration per new task on top of an existing system.

    Earlier tasks' paths stay locked, so their predictions are unchanged.
    """
    out = FsPath(run_dir)
    state = read_state(out)
    cfg = RunConfig().replace(**state["config"]).replace(**overrides)
    known = set(state["num_classes"])
    cfg = cfg.replace(tasks=list(cfg.tasks) + [t for t in tasks if t not in cfg.tasks], out=str(out))
    t0 = time.perf_counter()
    session = build_session(cfg, stream, state)
    new = [name for name in session.tasks if name not in known]
    if not new:
        raise MunetError(f"no new task to add: {', '.join(tasks)} already in {run_dir} or unavailable")
    session.run_iterations(new)
    return session.report(time.perf_counter() - t0)
