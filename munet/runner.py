"""Running a configuration end to end: one :class:`Run` is set up, stepped one generation at a time with a
checkpoint after each, and reported; a new run, a resumed one and one with added tasks are ways of opening it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path as FsPath
from typing import Any, TextIO

import torch

from munet import __version__
from munet.config import RunConfig
from munet.data.task import TaskData
from munet.errors import MunetError
from munet.evolution.loop import Evolution
from munet.evolution.system import ScoreConfig, System
from munet.model.path import TaskPath
from munet.model.root import Root
from munet.reporting.progress import Progress
from munet.reporting.table import format_table, task_rows
from munet.reporting.tensorboard import TensorBoardLog
from munet.storage.files import atomic_write
from munet.storage.snapshot import (
    Checkpoint,
    RunState,
    load_checkpoint,
    path_row,
    restore_run,
    save_checkpoint,
)
from munet.storage.store import Store
from munet.storage.stored_root import root_record, stored_posembed_resize, verify_root
from munet.training.settings import TrainSettings
from munet.wiring import Wiring, load_inputs, resolve_device, task_order, train_settings, use_threads

log = logging.getLogger("munet")


SUMMARY_NAME = "summary.json"  # the run's final table, beside its store


def prepare_output(out: FsPath) -> None:
    """Creates the output directory and checks it is writable before any compute is spent."""
    if out.exists() and not out.is_dir():
        raise MunetError(f"output directory {out} is a file; choose a directory for the run with --out")
    if out.is_symlink() and not out.exists():  # mkdir would say "File exists"
        raise MunetError(f"output directory {out} is a symbolic link to {os.readlink(out)}, which does not exist; "
                         "create that directory or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # a name of its own: a user's file of any name stays untouched
            pass
    except OSError as err:
        raise MunetError(f"output directory {out} is not writable: {err.strerror or err}") from err


# Keys that do not change results: a resumed run may set them anew (another device, a bigger cache); another thread
# count, device or dtype may change the last digits, and a resumed run warns of it (Run._compare_runtime).
OPERATIONAL_KEYS = ("device", "threads", "feature_cache_mb", "data_cache_mb", "data_dir", "out", "shared_training",
                    "executor", "ray_address", "log")

#: Keys ``add-task`` may not change: the system the new tasks join is built on them.
ADD_FIXED_KEYS = ("root", "depth", "max_depth", "tasks", "seed")


def runtime_record(threads: int, settings: TrainSettings) -> dict[str, Any]:
    """What a session computes with beyond the configuration's results-affecting keys: the CPU threads, the device
    and the dtype of the forward passes (each may change results in the last digits)."""
    device = settings.device
    record = {"threads": threads, "device": str(device),
              "dtype": "bfloat16 autocast" if settings.autocast_bf16 else "float32", "torch": torch.__version__}
    if device.type == "cuda":
        record["device_name"] = torch.cuda.get_device_name(device)
    return record


class Run:
    """One run: its configuration, its store (open for writing while the run is open), and once :meth:`setup` has
    run, its tasks and :class:`RunState` (system, evolution, plan and position).

    Open it with :meth:`create` (a new run) or :meth:`open` (an existing one: resumed, or with tasks added), then
    :meth:`train` (or :meth:`step` one generation at a time; each is saved) and :meth:`report`; use it as a context
    manager, which closes the store.

    Args:
        cfg: the configuration.
        store: the run's store, open for writing.
        stream: where progress and the report go.

    The ways of opening take ``store_class``, the :class:`Store` (sub)class to open the store with: a subclass may
    inject faults at the store's crash points (as the resume tests do) without touching the module.
    """

    def __init__(self, cfg: RunConfig, store: Store, stream: TextIO):
        self.cfg, self.store, self.stream = cfg, store, stream
        self.out = FsPath(cfg.out)
        self.tasks: dict[str, TaskData] = {}
        self.state: RunState | None = None
        self.elapsed = 0.0  # seconds spent by earlier sessions of this run
        self.runtime: dict[str, Any] = {}  # this session's runtime_record
        self._t0: float | None = time.perf_counter()  # None: this session adds no wall time (as_recorded)

    # --- ways of opening ------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: RunConfig, stream: TextIO | None = None, *, store_class: type[Store] = Store) -> Run:
        """A new run in ``cfg.out``, set up and saved (its first checkpoint); nothing is left if that fails."""
        cfg.validate()
        out = FsPath(cfg.out)
        made = [folder for folder in (out, *out.parents) if not folder.exists()]  # what prepare_output creates
        prepare_output(out)
        store = store_class.create(out)
        try:
            if (out / SUMMARY_NAME).exists():  # a new store: the user's file, not a run's summary
                raise MunetError(f"{out} holds a {SUMMARY_NAME} but no munet run, and a run would overwrite it; "
                                 "move it or choose another --out")
            # sys.stdout is looked up per call: a default bound at import would outlive a redirection
            run = cls(cfg, store, stream or sys.stdout)
            run.setup()
            run.state.plan = task_order(cfg.rounds, run.tasks)
            run.save(first=True)
        except BaseException:
            store.abandon()
            for folder in made:  # the folders this call made, left empty by abandon (rmdir removes only empty ones)
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        return run

    @classmethod
    def open(cls, run_dir: str | FsPath, overrides: dict[str, Any], stream: TextIO | None = None, *,
             expected: RunConfig | None = None, add: list[str] | None = None,
             store_class: type[Store] = Store) -> Run:
        """The run in ``run_dir``, restored from its last checkpoint.

        Args:
            run_dir: the run directory.
            overrides: configuration changes; without ``add`` only keys that do not change results
                (``OPERATIONAL_KEYS``) may differ.
            stream: where progress and the report go.
            expected: the configuration a ``munet run`` was given for this directory; results-affecting keys must
                match the stored ones.
            add: task specs to add (µ2Net's dynamic task introduction): one task iteration per new task is appended
                to the finished plan, and the configuration may change.
            store_class: the store class (see the class docstring).
        """
        out = FsPath(run_dir)
        moved = overrides.get("out")
        if moved is not None and FsPath(moved).expanduser().resolve() != out.expanduser().resolve():  # was ignored
            raise MunetError(f"{out} is trained in place: out {str(moved)!r} cannot move it; to train a copy, copy "
                             f"{out} to {moved} and name that folder in the command instead")
        with contextlib.ExitStack() as on_error:
            store = on_error.enter_context(store_class.open(out, write=True))  # closed if opening fails
            store.require_records()
            # blobs of a checkpoint killed between its commit and its clean-up (we hold the run's lock, so no
            # other writer's blobs are in flight); without this a run killed there and then complete keeps them.
            # Only from records a checkpoint wrote: a checkpoint itself collects from the records it just wrote
            if store.records_intact():
                store.collect_garbage()
            stored = RunConfig.from_stored(store.get("config")).replace(out=str(out))
            cfg = stored.replace(**overrides)
            if add is None:
                diff = _differences(expected or cfg, stored)
                if diff and expected is not None:
                    raise MunetError(f"{out} holds a run with another configuration ({'; '.join(diff)}); resume it "
                                     f"with `munet resume {out}`, or choose another --out")
                if diff:
                    raise MunetError(f"a resumed run keeps its configuration; cannot change {'; '.join(diff)}")
            else:
                if stored.schedule == "agents":
                    raise MunetError(f"{out} is an agents run (schedule = agents): adding tasks to it is not "
                                     "supported yet; start a new run with all the tasks")
                present = [t for t in dict.fromkeys(add) if t in stored.tasks]  # before anything is loaded
                if present:
                    what = "no new task to add: " if len(present) == len(set(add)) else ""
                    raise MunetError(f"{what}{', '.join(present)} already in {out} (its tasks: "
                                     f"{', '.join(stored.tasks)}); add-task adds only tasks the run does not have")
                twice = [t for t in dict.fromkeys(add) if add.count(t) > 1]
                if twice:
                    raise MunetError(f"task {', '.join(twice)} is given twice; name each new task once")
                plan = store.record("plan")
                if plan["done"] < len(plan["order"]):
                    raise MunetError(f"{out} is unfinished ({plan['done']}/{len(plan['order'])} task iterations); "
                                     f"finish it first with `munet resume {out}`")
                fixed = [k for k in ADD_FIXED_KEYS if k in overrides and getattr(cfg, k) != getattr(stored, k)]
                if fixed:
                    raise MunetError(f"add-task cannot change {', '.join(fixed)}: the earlier tasks' paths are built "
                                     "on the run's root and their data split by its seed as they are (the new tasks "
                                     "are given as arguments)")
                changed = _differences(cfg, stored)
                cfg = cfg.replace(tasks=list(cfg.tasks) + [t for t in add if t not in cfg.tasks], out=str(out))
            known = set(store.task_names())
            run = cls(cfg, store, stream or sys.stdout)
            run.setup(restore=True)
            if add is not None:
                new = [name for name in run.tasks if name not in known]
                if not new:
                    raise MunetError(f"no new task to add: {', '.join(add)} already in {run_dir} or unavailable")
                run.state.plan = run.state.plan + new
                if changed:
                    print(f"the new tasks train with {'; '.join(changed)}", file=run.stream)
            on_error.pop_all()
        return run

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self.store.__exit__(exc_type, exc, tb)

    # --- set-up, load, save ---------------------------------------------------------------------------------------
    def setup(self, restore: bool = False) -> None:
        """Builds root, tasks, system and evolution from the configuration; ``restore`` loads the system and the
        position from the store's last checkpoint."""
        cfg, stream = self.cfg, self.stream
        cfg.validate()
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        device = resolve_device(cfg.device)
        threads = use_threads(cfg.threads)
        root, tasks = load_inputs(cfg, stream, stored=self.store.task_names() if restore else ())
        self.tasks = tasks
        wiring = Wiring.of(cfg)
        if restore:
            system, checkpoint = self.load(root, wiring.score, wiring.hparams)
        else:
            system, checkpoint = wiring.system(root), None
        evolution = wiring.evolution(system, tasks, train_settings(cfg, device))
        if checkpoint is None:
            self.state = RunState(system, evolution)
        else:  # the evolution's iteration count and every random stream, as the checkpoint left them
            self.state = restore_run(self.store, evolution, checkpoint)
            self.elapsed = float(self.store.get("wall_time_s", 0.0))
        self.runtime = runtime_record(threads, evolution.settings)
        if restore:
            self._compare_runtime(self.store.get("runtime"))
        stream.write(f"root: {root.description} [{root.source}]\n"
                     f"tasks: {', '.join(f'{n} ({d.num_classes} classes)' for n, d in tasks.items())}\n"
                     f"device: {device}; {cfg.rounds} round(s) x {len(tasks)} tasks x {cfg.children_per_task} "
                     "children\n")
        stream.flush()
        self._t0 = time.perf_counter()  # the wall time counts evolution, not loading

    def _compare_runtime(self, before: dict[str, Any] | None) -> None:
        """Warns when this session computes with other threads, device or dtype than the run's last session."""
        changed = [f"{k} {before[k]} (this session: {self.runtime[k]})" for k in ("threads", "device", "dtype")
                   if before and k in before and before[k] != self.runtime[k]]
        if changed:
            threads = before.get("threads", self.runtime["threads"])
            hint = f"; resume with --threads {threads} to match" if threads != self.runtime["threads"] else ""
            log.warning("%s was computed with %s: results may differ in the last digits from an uninterrupted run%s",
                        self.out, ", ".join(changed), hint)

    def load(self, root: Root, score: ScoreConfig, extra_hparams: dict[str, Any]) -> tuple[System, Checkpoint]:
        """The system of the store's last checkpoint, rebuilt on ``root`` (which must be the run's), with the
        checkpoint's position (applied by :meth:`setup` once the evolution exists)."""
        root.posembed_resize = stored_posembed_resize(self.store)  # new image sizes resize as the run always did
        system, checkpoint = load_checkpoint(self.store, root, self.cfg.image_size, score, extra_hparams,
                                             verify_digest=self.cfg.schedule != "agents")
        verify_root(self.store, root, system)
        return system, checkpoint

    def save(self, sampled: list[dict[str, Any]] | None = None, first: bool = False) -> None:
        """Persists the system and the position in the plan (one transaction); ``first`` also records the
        configuration, the root's identity and the tasks."""
        meta: dict[str, Any] = {"wall_time_s": self.wall_time()}
        if first:
            meta.update(config=self.cfg.to_dict(), munet_version=__version__, runtime=self.runtime)
            if self.store.get("root") is None:
                meta.update(root=root_record(self.system.root, self.system), created_at=time.time())
        if self.cfg.schedule == "agents" and not self.finished and self.store.get("checkpoint") is not None:
            # the agents' components are not in the driver's system until it merges their publications at the end:
            # a checkpoint now would delete them; only the session's records are written
            with self.store.transaction():
                for key, value in meta.items():
                    self.store.put(key, value)
            return
        save_checkpoint(self.store, self.state, sampled, meta, self.tasks if first else None)

    # --- training -------------------------------------------------------------------------------------------------
    @property
    def system(self) -> System:
        return self.state.system

    @property
    def evolution(self) -> Evolution:
        return self.state.evolution

    @property
    def finished(self) -> bool:
        return self.state.done >= len(self.state.plan)

    def work(self, task_order: list[str]) -> int:
        """Work units (child training steps) of running one iteration of each task in ``task_order``."""
        return sum(self.evolution.iteration_work(t) for t in task_order)

    def wall_time(self) -> float:
        return self.elapsed + (time.perf_counter() - self._t0 if self._t0 is not None else 0.0)

    def as_recorded(self) -> None:
        """For a run complete when opened: this session computes nothing, so its summary keeps the runtime and wall
        time the run recorded, not this session's (another --threads would claim results it did not compute)."""
        self.runtime = self.store.get("runtime") or self.runtime
        self._t0 = None

    def step(self) -> TaskPath | None:
        """Runs one generation of the plan's current task iteration (starting it if needed) and saves; returns the
        retained path when the generation ended the task iteration."""
        state, evo = self.state, self.evolution
        if state.in_flight is None:
            state.in_flight = evo.begin(state.plan[state.done])
        children = evo.step(state.in_flight)
        sampled = [path_row(self.system, c) for c in children]  # before finish() relinks parents
        best = None
        if evo.finished(state.in_flight):
            best = evo.finish(state.in_flight)
            state.done, state.in_flight = state.done + 1, None
        self.save(sampled)
        return best

    def train(self) -> None:
        """Runs the plan's remaining task iterations, a checkpoint after every generation, with progress (the
        progress callbacks join the evolution's hooks for the call; callbacks already there stay and run too)."""
        state, evo = self.state, self.evolution
        missing = [t for t in state.plan[state.done:] if t not in self.tasks]
        if missing:
            raise MunetError(f"cannot go on: task(s) {', '.join(sorted(set(missing)))} of this run are unavailable")
        if self.cfg.schedule == "agents":
            from munet.distributed.agents import run_agents  # it builds on this module: imported when needed

            run_agents(self)
            return
        done = 0
        if state.in_flight is not None:  # generations finished before the interruption
            task = state.in_flight.task
            done = min(evo.work_done(task, state.in_flight.generation), self.work([task]))
        progress = Progress(self.work(state.plan[state.done:]), self.stream, done=done)

        def after_generation(task: str, gen: int, children: list[TaskPath]) -> None:
            accepted = sum(bool(c.metrics["improved"]) for c in children)
            best = self.system.best_path(task)
            best_q = f"{best.metrics['quality']:.4f}" if best else "-"
            progress.note(f"{progress.line()} | gen {gen + 1}/{evo.generations()} accepted {accepted}/"
                          f"{len(children)}, best val {best_q}")

        def count_twins(task: str, gen: int, children: list[TaskPath], *_: Any) -> None:  # children past the plan
            twins = sum("twin_of" in c.metrics for c in children)
            if twins:
                progress.extend(twins * evo.child_steps(task, gen))

        evo.on_step.append(progress.advance)
        evo.before_training.append(count_twins)
        evo.after_generation.append(after_generation)
        live_log = TensorBoardLog(self.out, evo) if self.cfg.log == "tensorboard" else None
        if live_log:
            live_log.attach()
        try:
            while not self.finished:
                task = state.plan[state.done]
                progress.label = f"[{state.done + 1}/{len(state.plan)}] {task}"
                best = self.step()
                if best is not None:
                    progress.note(f"{task}: retained path #{best.id}, val {best.metrics['quality']:.4f}, "
                                  f"test {best.metrics['test_quality']:.4f}")
        finally:  # a later train() reports progress of its own
            evo.on_step.remove(progress.advance)
            evo.before_training.remove(count_twins)
            evo.after_generation.remove(after_generation)
            if live_log:
                live_log.close()
            progress.close()

    def report(self) -> dict[str, Any]:
        """Writes ``summary.json`` and the per-task table; returns the summary."""
        rows = task_rows(self.system)
        summary = {"wall_time_s": self.wall_time(), "root": self.system.root.description,
                   "reference_params": self.system.reference_params, "runtime": self.runtime, "tasks": rows}
        atomic_write(self.out / SUMMARY_NAME, json.dumps(summary, indent=1))
        self.stream.write(format_table(rows, int(self.system.reference_params)) + "\n")
        self.stream.write(f"wall time {summary['wall_time_s']:.0f} s; results in {self.out}\n")
        return summary


def _differences(cfg: RunConfig, stored: RunConfig) -> list[str]:
    """Result-affecting keys on which ``cfg`` differs from ``stored``."""
    a, b = cfg.to_dict(), stored.to_dict()
    return [f"{k} {a[k]!r} (stored: {b[k]!r})" for k in a if k not in OPERATIONAL_KEYS and a[k] != b[k]]


def run(cfg: RunConfig, stream: TextIO | None = None, *, store_class: type[Store] = Store) -> dict[str, Any]:
    """Evolves a new system over ``cfg.tasks`` for ``cfg.rounds`` round-robin rounds; returns the summary.

    If ``cfg.out`` already holds a run made with the same configuration, that run is resumed (or, when it is
    complete, only reported). ``store_class``: see :class:`Run`.
    """
    if Store.exists(cfg.out):
        operational = {k: v for k, v in cfg.to_dict().items() if k in OPERATIONAL_KEYS}
        return _resumed(Run.open(cfg.out, operational, stream, expected=cfg, store_class=store_class))
    with Run.create(cfg, stream, store_class=store_class) as opened:
        opened.train()
        return opened.report()


def resume(run_dir: str, overrides: dict[str, Any], stream: TextIO | None = None, *,
           store_class: type[Store] = Store) -> dict[str, Any]:
    """Continues an interrupted run from its last checkpoint (a complete run is only reported).

    Args:
        run_dir: the run directory.
        overrides: configuration changes; only keys that do not change results (``OPERATIONAL_KEYS``) may differ.
        stream: where progress and the report go.
        store_class: see :class:`Run`.
    """
    return _resumed(Run.open(run_dir, overrides, stream, store_class=store_class))


def _resumed(opened: Run) -> dict[str, Any]:
    with opened:
        state = opened.state
        if opened.finished:
            opened.as_recorded()
            opened.stream.write(f"{opened.out} is complete ({len(state.plan)} task iterations)\n")
        else:
            opened.stream.write(f"resuming {opened.out}: task iteration {state.done + 1}/{len(state.plan)}"
                                + (f", generation {state.in_flight.generation + 1}" if state.in_flight else "")
                                + "\n")
            opened.save(first=True)  # records the operational keys this session runs with
            opened.train()
        return opened.report()


def add_tasks(run_dir: str, tasks: list[str], overrides: dict[str, Any], stream: TextIO | None = None
              ) -> dict[str, Any]:
    """µ2Net's dynamic task introduction: one task iteration per new task on top of an existing system.

    Earlier tasks' paths stay locked, so their predictions are unchanged. If interrupted, ``munet resume``
    finishes it.
    """
    with Run.open(run_dir, overrides, stream, add=tasks) as opened:
        opened.save(first=True)
        opened.train()
        return opened.report()
