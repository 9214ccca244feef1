"""The quality benchmark's units: one muNet run, or one baseline on one task, whose result JSON is stored once it
finishes, so the benchmark resumes and several worker processes share the work.

``Units`` holds the finished results and the claims of live workers; ``run_munet`` runs (or resumes) one muNet unit
and ``BaselineRunner`` trains one baseline unit. A stored unit counts as done only while its results-affecting
settings match the current ones (``result_settings``). Imported by ``quality.py``, which puts the benchmarks folder
(``baselines``, ``quality_modes``) on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path as FsPath
from typing import Any

import torch
from baselines import BaselineSpec, baseline_settings, build_baseline, count_params, train_baseline
from quality_modes import baseline_validations

from munet.config import RunConfig
from munet.data.task import TaskData
from munet.evolution.system import System
from munet.model.roots import load_root
from munet.reporting.history import run_history
from munet.runner import OPERATIONAL_KEYS, run
from munet.storage.files import atomic_write
from munet.storage.store import Store, StoreError
from munet.training.evaluate import Evaluator
from munet.training.frozen import FeatureCache
from munet.wiring import Wiring, resolve_device


# --- units --------------------------------------------------------------------------------------------------------
class Units:
    """Finished units' result JSONs in ``folder``; a unit counts as done only if its stored settings match."""

    def __init__(self, folder: FsPath, read_only: bool = False):
        self.folder, self.read_only = folder, read_only  # read-only: finished units only, nothing is claimed or run
        self.stored = 0  # units this process finished and stored (not found already done)
        if not read_only:
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
        self.release(unit)
        self.stored += 1

    def release(self, unit: str) -> None:
        """Drops this process's claim on ``unit``."""
        self.file(unit).with_suffix(".claim").unlink(missing_ok=True)

    def busy(self, unit: str) -> bool:
        """Whether another live process has claimed ``unit``."""
        try:
            pid = int(self.file(unit).with_suffix(".claim").read_text())
            os.kill(pid, 0)  # raises if no such process
        except (OSError, ValueError):
            return False
        return pid != os.getpid()

    def finished_or_claim(self, unit: str, settings: dict[str, Any]) -> tuple[dict[str, Any] | None, bool]:
        """``(result, False)`` if ``unit`` is finished; else ``(None, True)`` once this process has claimed it to run,
        or ``(None, False)`` while another live process runs it (or the units are read-only). A result another worker
        stores between the look and the claim counts as finished."""
        done = self.get(unit, settings)
        if done:
            return done, False
        if not self.claim(unit):
            return None, False
        done = self.get(unit, settings)
        if done:
            self.release(unit)
            return done, False
        return None, True

    def claim(self, unit: str) -> bool:
        """Marks ``unit`` as run by this process; ``False`` if another live process has claimed it (so several
        ``--only`` workers can share the units). The look and the claim hold the folder's lock file, so of two
        workers that find a unit free at once, one claims it and the other finds it claimed."""
        if self.read_only:
            return False
        with open(self.folder / ".claims.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            if self.busy(unit):
                return False
            atomic_write(self.file(unit).with_suffix(".claim"), str(os.getpid()))
        return True


CONFIG_KEYS = set(RunConfig().to_dict())
#: The configuration keys a baseline's training reads (evolution's keys reach it only through the images muNet
#: processed, recorded as its ``validations``), so a change of evolution settings keeps baseline units valid.
BASELINE_KEYS = ("root", "depth", "image_size", "batch_size", "steps_between_validations", "max_val_examples", "lr",
                 "crop_area_min", "flip", "seed")


def result_settings(cfg: RunConfig) -> dict[str, Any]:
    """The configuration keys that change a unit's results (not where it runs or writes), so finished units stay
    valid in another checkout or on another machine."""
    return {k: v for k, v in cfg.to_dict().items() if k not in OPERATIONAL_KEYS}


def _same_settings(stored: Any, current: Any) -> bool:
    """Equal settings, where a configuration key that is missing from a stored configuration (recorded before the key
    existed) takes the value that reproduces munet's behaviour then (``RunConfig.from_stored``), and operational keys
    (output directory, device...) do not count."""
    if isinstance(stored, dict) and isinstance(current, dict):
        if set(current) <= CONFIG_KEYS and set(stored) <= CONFIG_KEYS:
            stored = {**RunConfig.from_stored(stored).to_dict(), **stored}
        stored, current = ({k: v for k, v in d.items() if k not in OPERATIONAL_KEYS} for d in (stored, current))
        # a key only ``stored`` has is one the current unit does not depend on (a baseline's evolution settings)
        return all(k in stored and _same_settings(stored[k], v) for k, v in current.items())
    return stored == current


def cores() -> int:
    return torch.get_num_threads()


def run_records(run_dir: FsPath, train_sizes: dict[str, int]) -> dict[str, dict[str, int]]:
    """Per task, from the run's store: ``images``, the training images all its children and probes processed, and
    ``lineage_images``, those along its best path's lineage within the task (``munet history``'s split); empty if
    the store is unreadable."""
    try:
        tasks = run_history(run_dir)["tasks"]
    except StoreError:
        return {}
    return {t["task"]: {"images": sum(t["images"].values()), "lineage_images": t["images"]["lineage"]}
            for t in tasks if t["task"] in train_sizes}


def interrupted_run(out: FsPath, cfg: RunConfig) -> bool:
    """Whether ``out`` holds a checkpointed run of ``cfg``'s results-affecting settings (an interrupted sitting of
    this unit, resumed exactly rather than started again)."""
    try:
        with Store.open(out) as store:
            stored = RunConfig.from_stored(store.get("config"))
    except StoreError:
        return False
    return result_settings(stored) == result_settings(cfg)


@contextlib.contextmanager
def unit_clock(file: FsPath, every: float = 30.0) -> Iterator[Callable[[], float]]:
    """Yields a function giving the wall seconds a unit has run over all its sittings: ``file`` holds those of the
    earlier ones and is rewritten every ``every`` seconds, so a unit killed and resumed reports nearly its whole
    time (up to ``every`` seconds per interruption are lost)."""
    try:
        before = float(file.read_text())
    except (OSError, ValueError):
        before = 0.0
    t0 = time.perf_counter()

    def total() -> float:
        return before + time.perf_counter() - t0

    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(every):
            atomic_write(file, str(total()))

    thread = threading.Thread(target=keep, daemon=True)
    thread.start()
    try:
        yield total
    finally:
        stop.set()
        thread.join()
        atomic_write(file, str(total()))


def run_munet(name: str, cfg: RunConfig, work: FsPath, units: Units, train_sizes: dict[str, int], *,
              store_class: type[Store] = Store) -> dict[str, Any] | None:
    """One muNet run; returns its unit result (``None`` if another process runs it). An interrupted run of the same
    settings is resumed from its last checkpoint (bit-exact, as ``munet resume``), so a long unit spans sittings;
    one of other settings is started again. ``store_class``: see :class:`munet.runner.Run`."""
    settings = result_settings(cfg)
    done, claimed = units.finished_or_claim(name, settings)
    if not claimed:
        return done
    out = FsPath(cfg.out)
    clock = out.with_name(out.name + ".wall_s")
    resumed = interrupted_run(out, cfg)
    if not resumed:
        shutil.rmtree(out, ignore_errors=True)
        clock.unlink(missing_ok=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "a" if resumed else "w") as log, unit_clock(clock) as wall:
        summary = run(cfg, stream=log, store_class=store_class)
    records = run_records(out, train_sizes)
    tasks = {r["task"]: {"test_acc": r["test_acc"], "val_acc": r["val_acc"], "params": r["params"],
                         "accounted": r["accounted"], "layers": r["layers"], "image_size": r["image_size"],
                         "reuse": r["reuse"], **records.get(r["task"], {})} for r in summary["tasks"]}
    result = {"unit": name, "settings": settings, "kind": "munet", "root": summary["root"], "wall_s": wall(),
              "cores": cores(), "device": str(resolve_device(cfg.device)), "tasks": tasks,
              "images": sum(t.get("images", 0) for t in tasks.values())}
    units.put(name, result)
    clock.unlink(missing_ok=True)
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
            self.system = Wiring.of(self.cfg).system(root)  # the root path's hyperparameters of a muNet run
            for name, data in self.tasks.items():
                self.system.add_task(name, data.num_classes)
        return self.system

    def run(self, spec: BaselineSpec, task: str, units: Units, images: int, seed: int = 0, tag: str = "",
            train: bool = True) -> dict[str, Any] | None:
        """Trains and tests one baseline on one task on about ``images`` training images (or returns its finished
        result); ``None`` if another process is running it, or if it is not finished and ``train`` is off."""
        unit = f"{spec.name}__{task}{tag}"
        validations = baseline_validations(self.cfg, images, len(self.tasks[task].train_y))
        config = result_settings(self.cfg.replace(seed=seed))
        settings = {"baseline": spec.name, "task": task, "config": {k: config[k] for k in BASELINE_KEYS},
                    "validations": validations}
        if not train:
            return units.get(unit, settings)
        done, claimed = units.finished_or_claim(unit, settings)
        if not claimed:
            return done
        system = self._system()
        t0 = time.perf_counter()
        path = build_baseline(system, task, spec, seed=seed)
        training = baseline_settings(self.cfg, self.device, validations)
        # a fresh cache per unit, as each muNet run has, so no unit reuses another's frozen features
        evaluator = Evaluator(training, FeatureCache(self.cfg.feature_cache_mb << 20), system.root.mean,
                              system.root.std)
        result = train_baseline(path, self.tasks[task], training, evaluator, seed=seed)
        n = count_params(path)
        result.update(unit=unit, settings=settings, kind="baseline", baseline=spec.name, task=task,
                      wall_s=time.perf_counter() - t0, cores=cores(), device=str(self.device),
                      params={"total": n.total, "own": n.own, "trainable": n.trainable, "shared": n.shared})
        units.put(unit, result)
        return result
