"""The Python API of a finished (or checkpointed) run: ``munet.load(RUN)`` -> a multitask system that predicts
and exports, read from the run's store alone (no data; the root's source only for a root whose architecture the
store cannot describe)."""

from __future__ import annotations

import os
from pathlib import Path as FsPath
from typing import Any

import torch

from munet.config import RunConfig
from munet.errors import ExportError, MunetError, StoreError
from munet.evolution.system import System
from munet.export import FORMATS, export_path, path_config
from munet.model.path import TaskPath
from munet.model.roots import load_root
from munet.multitask_export import export_multitask, multitask_config
from munet.predict import ImageLike, Prediction, predict, to_uint8_images
from munet.storage.records import class_name_misfits
from munet.storage.snapshot import load_checkpoint
from munet.storage.store import BLOB_DIR, Store, read_run
from munet.storage.stored_root import root_from_store, verify_root
from munet.wiring import Wiring


class MultitaskSystem:
    """A run's multitask system: one retained path per task.

    Args:
        run_dir: the run directory it was read from.
        system: the rebuilt system.
        class_names: task -> class names.
        meta: the run's root record and configuration.
        plan: the run's task iterations, one task name each, in order.
        done: how many of them had finished (the last path of an unfinished one is provisional).
    """

    def __init__(self, run_dir: FsPath, system: System, class_names: dict[str, list[str]], meta: dict[str, Any],
                 plan: list[str], done: int):
        self.run_dir = run_dir
        self.system = system
        self.class_names = class_names
        self.meta = meta
        self.plan, self.done = plan, done

    @property
    def complete(self) -> bool:
        """Whether the run had finished all its task iterations."""
        return self.done >= len(self.plan)

    @property
    def planned(self) -> list[str]:
        """Every task of the run's plan, those still without a path included."""
        return list(dict.fromkeys(self.plan))

    @property
    def tried(self) -> list[str]:
        """The tasks of the plan's finished task iterations."""
        return list(dict.fromkeys(self.plan[:self.done]))

    @property
    def tasks(self) -> list[str]:
        """Tasks with a retained path, in the run's order."""
        return [t for t in self.class_names if self.system.best_path(t) is not None]

    def path(self, task: str) -> TaskPath:
        """The path answering ``task``."""
        if not isinstance(task, str):
            raise MunetError(f"a task is named by a string, got a {type(task).__name__}: {task!r}")
        best = self.system.best_path(task) if task in self.class_names else None
        if best is None:
            known = ", ".join(self.tasks) or "none"
            if task in self.tried:  # its iterations ran, and every child failed (diverged)
                raise MunetError(f"task {task!r} of {self.run_dir} kept no path: every child of its task iterations "
                                 f"so far failed (`munet history {self.run_dir}` shows why); its tasks with one: "
                                 f"{known}")
            if task in self.planned:
                raise MunetError(f"task {task!r} of {self.run_dir} has no retained path yet (the run is still "
                                 f"training, or was stopped, before its first iteration of {task!r} ended); its tasks "
                                 f"with one: {known}; let the run go on (`munet resume {self.run_dir}`) and ask again")
            raise MunetError(f"no task {task!r} in {self.run_dir}; its tasks: {known}")
        return best

    def tasks_of(self, task: str) -> list[str]:
        """The tasks ``task`` names: ``[task]``, or for ``"all"`` every task with a retained path.

        Raises:
            MunetError: an unknown task, or ``"all"`` while no task has a retained path yet.
        """
        if task != "all":
            self.path(task)
            return [task]
        if not self.tasks:
            raise MunetError(f"{self.run_dir} has no task with a retained path yet: nothing to answer; let the run "
                             "finish its first task iteration (`munet status` shows where it is)")
        return self.tasks

    def predict(self, images: ImageLike | list[ImageLike], task: str = "all"
                ) -> list[Prediction] | dict[str, list[Prediction]]:
        """Predictions for ``images`` (files, PIL images, arrays or a batch; see
        :func:`munet.predict.to_uint8_images`).

        Args:
            images: the images.
            task: a task name, or ``"all"`` for every task (components shared between tasks run once).

        Returns:
            One :class:`~munet.predict.Prediction` per image, or for ``"all"`` a dict task -> predictions.
        """
        tasks = self.tasks_of(task)  # an unknown task, or not a name, before any image is read
        answers = self.predict_tasks(to_uint8_images(images), tasks)
        return answers if task == "all" else answers[task]

    def predict_tasks(self, images: list[torch.Tensor], tasks: list[str], wanted: dict[str, list[int]] | None = None
                      ) -> dict[str, list[Prediction]]:
        """Each of ``tasks``' predictions for every image (components their paths share run once per batch).

        Args:
            images: uint8 ``(1, C, H, W)`` images (see :func:`munet.predict.to_uint8_images`).
            tasks: task names.
            wanted: task -> ascending indices of the images it answers (default: all; see
                :func:`munet.predict.predict`).
        """
        paths = {t: self.path(t) for t in tasks}
        root = self.system.root
        return predict(paths, {t: self.class_names[t] for t in tasks}, images, root.mean, root.std, wanted=wanted)

    def export(self, task: str, out: str | FsPath, format: str = "safetensors") -> FsPath:  # noqa: A002
        """Writes ``task``'s path as a self-contained model (see :mod:`munet.export`); returns the model file."""
        path = self.path(task)
        self._check_outside(out)
        root = self.system.root
        provenance = {**self._provenance(format), "path_id": path.id, "val_accuracy": path.metrics.get("quality"),
                      "test_accuracy": path.metrics.get("test_quality")}
        config = path_config(path, self.meta["root"]["arch"], self.class_names[task], root.mean, root.std,
                             provenance)
        return export_path(path, config, out, format)

    def export_all(self, out: str | FsPath, format: str = "safetensors") -> FsPath:  # noqa: A002
        """Writes every task's path as one model, each shared component once and one output per task (see
        :mod:`munet.multitask_export`); returns the model file."""
        paths = [self.path(t) for t in self.tasks_of("all")]
        self._check_outside(out)
        root = self.system.root
        config = multitask_config(paths, self.meta["root"]["arch"], self.class_names, root.mean, root.std,
                                  self._provenance(format))
        return export_multitask(paths, config, out, format)

    def _check_outside(self, out: str | FsPath) -> None:
        """Refuses the run directory itself and its blob folder as an export directory: the store owns their files
        (a checkpoint deletes the model files it does not reference in blobs/). ``RUN/exports`` is fine."""
        if not isinstance(out, (str, os.PathLike)):
            raise ExportError(f"an export directory is a path, got a {type(out).__name__}: {out!r}")
        target, run = FsPath(out).resolve(), self.run_dir.resolve()
        if str(out).strip() and (target == run or target.is_relative_to(run / BLOB_DIR)):
            raise ExportError(f"cannot export into {out}: the run directory {self.run_dir} and its {BLOB_DIR}/ "
                              "folder hold the run's own files; choose another directory (RUN/exports is fine)")

    def _provenance(self, format: str) -> dict[str, Any]:  # noqa: A002
        """The source of an export; checks first that one can be written in ``format``."""
        if format not in FORMATS:
            raise MunetError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
        root = self.system.root
        if self.meta["root"]["arch"] is None:
            raise ExportError(f"the root of {self.run_dir} ({root.description}) uses parts an export cannot describe")
        return {"run": str(self.run_dir), "root": root.description, "root_source": root.source,
                "root_sha256": root.sha256}


def load(run_dir: str | FsPath) -> MultitaskSystem:
    """Reads the last checkpoint of the run in ``run_dir`` (read-only; a run in progress may keep writing).

    Raises:
        StoreError: not a run directory (or not a path at all), an incompatible or corrupt store.
    """
    if not isinstance(run_dir, (str, os.PathLike)):
        raise StoreError(f"a run directory is a path, got a {type(run_dir).__name__}: {run_dir!r}")
    return read_run(FsPath(run_dir), _system_of)


def _system_of(store: Store) -> MultitaskSystem:
    """The multitask system of the last checkpoint ``store`` holds."""
    run_dir = store.dir
    store.require_records()
    cfg = store.get("config")
    wiring = Wiring.of(RunConfig.from_stored(cfg))
    rebuildable = store.root_record()["arch"] is not None
    # a root whose architecture has no description is loaded from its source and checked against the store
    root = root_from_store(store) if rebuildable else load_root(cfg["root"], wiring.cfg.root_depth())
    with torch.random.fork_rng(devices=[]):  # rebuilding modules draws inits; keep the caller's stream
        system, ck = load_checkpoint(store, root, wiring.cfg.image_size, wiring.score, wiring.hparams)
    if not rebuildable:
        verify_root(store, root, system)
    class_names = store.task_class_names()
    misfits = class_name_misfits(class_names, system.num_classes)
    if misfits:
        raise StoreError(f"the task records of {run_dir} do not fit the run: {'; '.join(misfits)}; the database "
                         f"was damaged or edited; run `munet check {run_dir}`")
    meta = {"root": store.root_record(), "config": cfg}
    return MultitaskSystem(run_dir, system, class_names, meta, ck.plan, ck.done)
