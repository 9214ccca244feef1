"""Running a configuration end to end: load root and tasks, evolve with a checkpoint after every generation,
resume, add tasks, report."""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any, TextIO

import torch

from munet import __version__
from munet.config import RunConfig
from munet.data.registry import load_task
from munet.data.task import TaskData
from munet.errors import ConfigError, MunetError, TaskUnavailable
from munet.evolution.hparams import MutationPolicy
from munet.evolution.loop import Evolution, IterationState
from munet.evolution.system import ScoreConfig, System
from munet.model.path import TaskPath
from munet.model.roots import load_root
from munet.reporting.progress import Progress
from munet.reporting.table import format_table, task_rows
from munet.storage.snapshot import (
    load_checkpoint,
    path_row,
    resume_evolution,
    root_record,
    save_checkpoint,
    verify_root,
)
from munet.storage.store import Store, atomic_write
from munet.training.evaluate import Evaluator
from munet.training.frozen import FeatureCache
from munet.training.settings import TrainSettings

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
        for doubt in data.doubts():
            stream.write(f"warning: task {data.name}: {doubt}\n")
        tasks[data.name] = data
    if not tasks:
        raise MunetError("none of the configured tasks could be loaded")
    return tasks


# Keys that do not change results: a resumed run may set them anew (another device, a bigger cache).
OPERATIONAL_KEYS = ("device", "feature_cache_mb", "data_dir", "out", "shared_training")


@dataclass
class Session:
    """Everything a run needs, built from a configuration, with the store it checkpoints into.

    Args:
        cfg: the configuration.
        out: the run directory.
        system: the multitask system.
        evolution: the evolutionary loop.
        tasks: the loaded tasks.
        stream: where progress and the report go.
        store: the run's store, open for writing.
        plan: the run's task iterations, in order (one task name each).
        done: how many of ``plan`` are finished.
        state: the in-flight task iteration, if a resumed run stopped inside one.
        elapsed: seconds spent by earlier sessions of this run.
    """

    cfg: RunConfig
    out: FsPath
    system: System
    evolution: Evolution
    tasks: dict[str, TaskData]
    stream: TextIO
    store: Store
    plan: list[str] = field(default_factory=list)
    done: int = 0
    state: IterationState | None = None
    elapsed: float = 0.0

    def __post_init__(self) -> None:
        self._t0 = time.perf_counter()

    def work(self, task_order: list[str]) -> int:
        """Work units (child training steps) of running one iteration of each task in ``task_order``."""
        return sum(self.evolution.iteration_work(t) for t in task_order)

    def wall_time(self) -> float:
        return self.elapsed + time.perf_counter() - self._t0

    def checkpoint(self, sampled: list[dict[str, Any]] | None = None, first: bool = False) -> None:
        """Persists the system and the position in the plan (one transaction); ``first`` also records the
        configuration, the root's identity and the tasks."""
        meta: dict[str, Any] = {"wall_time_s": self.wall_time()}
        if first:
            meta.update(config=self.cfg.to_dict(), munet_version=__version__)
            if self.store.get("root") is None:
                meta.update(root=root_record(self.system.root, self.system), created_at=time.time())
        save_checkpoint(self.store, self.system, self.evolution, self.state, self.plan, self.done, sampled or [],
                        meta, self.tasks if first else None)

    def run_plan(self) -> None:
        """Runs the plan's remaining task iterations, checkpointing after every generation, with progress."""
        evo = self.evolution
        missing = [t for t in self.plan[self.done:] if t not in self.tasks]
        if missing:
            raise MunetError(f"cannot go on: task(s) {', '.join(sorted(set(missing)))} of this run are unavailable")
        progress = Progress(self.work(self.plan[self.done:]), self.stream)
        if self.state is not None:  # generations finished before the interruption
            per_generation = self.cfg.generation_size * evo.steps_per_child(self.state.task)
            progress.done = min(self.state.generation * per_generation, self.work([self.state.task]))
        evo.on_step = progress.advance

        def on_generation(task: str, gen: int, children: list[TaskPath]) -> None:
            accepted = sum(bool(c.metrics["improved"]) for c in children)
            best = self.system.best_path(task)
            best_q = f"{best.metrics['quality']:.4f}" if best else "-"
            progress.note(f"{progress.line()} | gen {gen + 1}/{evo.generations()} accepted {accepted}/"
                          f"{len(children)}, best val {best_q}")

        evo.on_generation = on_generation
        while self.done < len(self.plan):
            task = self.plan[self.done]
            progress.label = f"[{self.done + 1}/{len(self.plan)}] {task}"
            if self.state is None:
                self.state = evo.begin(task)
            children = evo.step(self.state)
            sampled = [path_row(self.system, c) for c in children]  # before finish() relinks parents
            best = None
            if evo.finished(self.state):
                best = evo.finish(self.state)
                self.done, self.state = self.done + 1, None
            self.checkpoint(sampled)
            if best is not None:
                progress.note(f"{task}: retained path #{best.id}, val {best.metrics['quality']:.4f}, "
                              f"test {best.metrics['test_quality']:.4f}")

    def report(self) -> dict[str, Any]:
        rows = task_rows(self.system)
        summary = {"wall_time_s": self.wall_time(), "root": self.system.root.description,
                   "reference_params": self.system.reference_params, "tasks": rows}
        atomic_write(self.out / "summary.json", json.dumps(summary, indent=1))
        self.stream.write(format_table(rows, int(self.system.reference_params)) + "\n")
        self.stream.write(f"wall time {summary['wall_time_s']:.0f} s; results in {self.out}\n")
        return summary


def build_session(cfg: RunConfig, store: Store, stream: TextIO | None = None, resume: bool = False) -> Session:
    """Builds root, tasks, system and evolution for ``cfg``; ``resume`` restores them from ``store``."""
    stream = stream or sys.stdout  # looked up per call: a default bound at import would outlive a redirection
    cfg.validate()
    out = FsPath(cfg.out)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    root = load_root(cfg.root, cfg.depth or None)
    if cfg.image_size % root.patch_size or cfg.max_image_size < root.patch_size:
        raise ConfigError(f"image_size {cfg.image_size} must be a multiple of the root's patch size "
                          f"{root.patch_size}")
    tasks = load_tasks(cfg.tasks, cfg.seed, cfg.data_dir, stream)
    policy = MutationPolicy(cfg.mu_policy, cfg.mutation_prob, random.Random(cfg.seed), cfg.clone_prob)
    extra: dict[str, Any] = {"opt_lr": cfg.lr}
    policy.init_hparams(extra)
    score = ScoreConfig(cfg.scale_factor, cfg.compute_scale)
    ck = None
    if resume:
        system, ck = load_checkpoint(store, root, cfg.image_size, score, extra)
        verify_root(store, root, system)
    else:
        system = System(root, cfg.image_size, score, extra)
    for name, data in tasks.items():
        if system.num_classes.get(name, data.num_classes) != data.num_classes:
            raise MunetError(f"task {name} has {data.num_classes} classes but the stored system has "
                             f"{system.num_classes[name]}")
        system.add_task(name, data.num_classes)
    settings = TrainSettings(batch_size=cfg.batch_size, max_steps_between_validations=cfg.steps_between_validations,
                             validations=cfg.validations, max_val_examples=cfg.max_val_examples, device=device,
                             autocast_bf16=device.type == "cuda", inherit_momentum=cfg.inherit_momentum,
                             shared_training=cfg.shared_training, accept_ties=cfg.accept_ties,
                             stop_margin=cfg.stop_margin, keep_diverged=cfg.keep_diverged)
    evaluator = Evaluator(settings, FeatureCache(cfg.feature_cache_mb << 20), root.mean, root.std)
    evolution = Evolution(system, tasks, policy, settings, evaluator, children_per_task=cfg.children_per_task,
                          generation_size=cfg.generation_size, max_image_size=cfg.max_image_size,
                          mutate_adapters=cfg.mutate_adapters, max_task_population=cfg.max_task_population,
                          max_seeds=cfg.max_seeds, seed=cfg.seed, separate_probes=cfg.separate_probes,
                          probe_validations=cfg.probe_validations)
    session = Session(cfg, out, system, evolution, tasks, stream, store)
    if ck is not None:
        session.state = resume_evolution(store, evolution, ck)
        session.plan, session.done = ck.plan, ck.done
        session.elapsed = float(store.get("wall_time_s", 0.0))
    stream.write(f"root: {root.description} [{root.source}]\n"
                 f"tasks: {', '.join(f'{n} ({d.num_classes} classes)' for n, d in tasks.items())}\n"
                 f"device: {device}; {cfg.rounds} round(s) x {len(tasks)} tasks x {cfg.children_per_task} children\n")
    stream.flush()
    return session


def _differences(cfg: RunConfig, stored: RunConfig) -> list[str]:
    """Result-affecting keys on which ``cfg`` differs from ``stored``."""
    a, b = cfg.to_dict(), stored.to_dict()
    return [f"{k} {a[k]!r} (stored: {b[k]!r})" for k in a if k not in OPERATIONAL_KEYS and a[k] != b[k]]


def _stored_config(store: Store, run_dir: FsPath) -> RunConfig:
    return RunConfig.from_stored(store.get("config")).replace(out=str(run_dir))


def run(cfg: RunConfig, stream: TextIO | None = None) -> dict[str, Any]:
    """Evolves a new system over ``cfg.tasks`` for ``cfg.rounds`` round-robin rounds; returns the summary.

    If ``cfg.out`` already holds a run made with the same configuration, that run is resumed (or, when it is
    complete, only reported).
    """
    out = FsPath(cfg.out)
    if Store.exists(out):
        with Store.open(out) as store:
            stored = _stored_config(store, out)
        diff = _differences(cfg, stored)
        if diff:
            raise MunetError(f"{out} holds a run with another configuration ({'; '.join(diff)}); resume it with "
                             f"`munet resume {out}`, or choose another --out")
        return resume(str(out), {k: v for k, v in cfg.to_dict().items() if k in OPERATIONAL_KEYS}, stream)
    cfg.validate()
    prepare_output(out)
    store = Store.create(out)
    try:
        session = build_session(cfg, store, stream)
        session.plan = [t for _ in range(cfg.rounds) for t in session.tasks]
        session.checkpoint(first=True)
    except BaseException:
        store.abandon()
        raise
    try:
        session.run_plan()
        return session.report()
    finally:
        store.close()


def resume(run_dir: str, overrides: dict[str, Any], stream: TextIO | None = None) -> dict[str, Any]:
    """Continues an interrupted run from its last checkpoint (a complete run is only reported).

    Args:
        run_dir: the run directory.
        overrides: configuration changes; only keys that do not change results (``OPERATIONAL_KEYS``) may differ.
        stream: where progress and the report go.
    """
    out, stream = FsPath(run_dir), stream or sys.stdout
    with Store.open(out, write=True) as store:
        stored = _stored_config(store, out)
        cfg = stored.replace(**overrides)
        diff = _differences(cfg, stored)
        if diff:
            raise MunetError(f"a resumed run keeps its configuration; cannot change {'; '.join(diff)}")
        session = build_session(cfg, store, stream, resume=True)
        if session.done < len(session.plan):
            stream.write(f"resuming {out}: task iteration {session.done + 1}/{len(session.plan)}"
                         + (f", generation {session.state.generation + 1}" if session.state else "") + "\n")
            session.checkpoint(first=True)  # records the operational keys this session runs with
            session.run_plan()
        else:
            stream.write(f"{out} is complete ({len(session.plan)} task iterations)\n")
        return session.report()


def add_tasks(run_dir: str, tasks: list[str], overrides: dict[str, Any], stream: TextIO | None = None
              ) -> dict[str, Any]:
    """µ2Net's dynamic task introduction: one task iteration per new task on top of an existing system.

    Earlier tasks' paths stay locked, so their predictions are unchanged. If interrupted, ``munet resume``
    finishes it.
    """
    out = FsPath(run_dir)
    with Store.open(out, write=True) as store:
        stored = _stored_config(store, out)
        plan = store.get("plan")
        if plan["done"] < len(plan["order"]):
            raise MunetError(f"{out} is unfinished ({plan['done']}/{len(plan['order'])} task iterations); finish it "
                             f"first with `munet resume {out}`")
        known = set(store.task_names())
        cfg = stored.replace(**overrides)
        cfg = cfg.replace(tasks=list(cfg.tasks) + [t for t in tasks if t not in cfg.tasks], out=str(out))
        session = build_session(cfg, store, stream, resume=True)
        new = [name for name in session.tasks if name not in known]
        if not new:
            raise MunetError(f"no new task to add: {', '.join(tasks)} already in {run_dir} or unavailable")
        session.plan = session.plan + new
        session.checkpoint(first=True)
        session.run_plan()
        return session.report()
