"""``munet check``: verifies a run store without changing it: every blob against its hash and its record, and every
reference between records (paths, population, components, root, checkpoint) and blobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from safetensors import safe_open

from munet.config import RunConfig
from munet.errors import MunetError, StoreError
from munet.model.path import SlotContent
from munet.storage.records import class_name_misfits
from munet.storage.snapshot import record_problems
from munet.storage.store import BLOB_DIR, DAMAGE_ERRORS, READ_ATTEMPTS, Store


@dataclass
class CheckReport:
    """What ``munet check`` found.

    Args:
        problems: everything wrong, one sentence each (empty: the store is sound).
        notes: harmless findings, e.g. blobs left by an interrupted write (deleted by the next checkpoint).
        counts: what was verified.
    """

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def check_store(run_dir: str | FsPath, data: bool = False) -> CheckReport:
    """Verifies the store in ``run_dir``, read-only; a store that cannot be opened at all raises StoreError instead.

    A database without a checkpoint record is opened anyway, so that its damage is reported as a problem.

    Args:
        run_dir: the run directory.
        data: also load every task's data and compare it with the fingerprint stored when it joined the run.
    """
    for _attempt in range(READ_ATTEMPTS):
        report = CheckReport()
        with Store.open(run_dir, require_checkpoint=False) as store:
            try:
                _check(store, report, data)
            except (*DAMAGE_ERRORS, KeyError, StoreError) as err:  # the finding; what was read before is reported too
                what = f"a record lacks its field {err}" if isinstance(err, KeyError) else str(err)
                report.problems.append(f"the database is damaged, checking stopped there: {what}")
            # a run in progress committed meanwhile: a blob its newer checkpoint dropped may be gone; check that one
            if not report.problems or not store.end_snapshot():
                return report
    report.notes.append(f"the run kept committing while it was checked ({READ_ATTEMPTS} times); run the check "
                        "again, or when it stops, to tell damage from its progress")
    return report


def _check(store: Store, report: CheckReport, data: bool) -> None:
    """Every check of :func:`check_store`, findings into ``report``."""
    problems = report.problems
    verdict = store.integrity()
    if verdict != "ok":
        problems.append(f"the database fails SQLite's integrity check: {verdict}")
    damaged = store.meta_problems()
    absent = [key for key in ("config", "root", "plan", "checkpoint") if store.get(key) is None and key not in damaged]
    if len(absent) == 4 and not store.components():  # what an interrupted `munet run` leaves, nothing more
        problems.append("the run's creation was interrupted before its first checkpoint: nothing of it is kept; run "
                        "the same `munet run` again to start it afresh")
        return
    problems += [f"the database has no {key!r} record" for key in absent]
    problems += damaged.values()
    components: dict[int, SlotContent] = {}  # id -> name and shape
    referenced: set[str] = set()
    for r in store.components():
        components[r.id] = (r.name, r.shape)
        what = f"component {r.name}#{r.id}"
        _check_blob(store, r.blob, what, r.tensors, exact=True, problems=problems)
        referenced.add(r.blob)
        if r.momentum:
            _check_blob(store, r.momentum, f"momentum of {what}", r.tensors, exact=False, problems=problems)
            referenced.add(r.momentum)
    _check_references(store, components, problems)
    if data:
        _check_data(store, report)
    files = list((store.dir / BLOB_DIR).iterdir()) if (store.dir / BLOB_DIR).is_dir() else []
    orphans = [p for p in files if p.suffix == ".safetensors" and p.stem not in referenced]
    partial = [p for p in files if p.name.endswith(".tmp")]
    if orphans or partial:
        report.notes.append(f"{len(orphans)} unreferenced blob(s) and {len(partial)} partial write(s), left by an "
                            "interrupted checkpoint; the next checkpoint deletes them")
    counts = store.path_counts()
    report.counts = {"blobs": len(referenced), "components": len(components), "paths": counts["sampled"],
                     "live paths": counts["live"]}


def _check_blob(store: Store, digest: str, what: str, shapes: dict[str, list[int]], exact: bool,
                problems: list[str]) -> None:
    """Hash, format and tensor shapes of one blob (``exact``: the same tensor names, else a subset)."""
    path = store.blobs.path(digest)
    problem = store.blobs.problem(digest, what)
    if problem:
        problems.append(problem)
        return
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - any parse failure is a finding, not a crash
        problems.append(f"blob {path.name} of {what} is not a readable safetensors file: {err}")
        return
    expected = shapes if exact else {k: v for k, v in shapes.items() if k in found}
    if found != expected:
        problems.append(f"blob {path.name} of {what} holds tensors {found}, but its record says {expected}")


def _check_references(store: Store, components: dict[int, SlotContent], problems: list[str]) -> None:
    """Root, checkpoint, population and lineage records must point at records and components that exist."""
    try:
        root = store.root_record() or {}
    except StoreError as err:
        problems.append(str(err))
        root = {}
    for name, cid in (root.get("components") or {}).items():
        if cid not in components:
            problems.append(f"the root's {name} (component #{cid}) has no component record")
    ck = _meta_record(store, "checkpoint", problems)
    if not store.components_match(ck):
        problems.append("the component records are not those the checkpoint was written with: a record points at "
                        "another blob than when it was stored")
    for grid, cid in (ck.get("posembeds") or {}).items():
        if cid not in components:
            problems.append(f"the root position embedding for a {grid}x{grid} grid (component #{cid}) has no record")
    root_id = root.get("path_id")
    try:
        store.retained_paths()
    except StoreError as err:  # a population's path without a score, text in a number column
        problems.append(str(err))
    try:
        sampled = store.sampled_paths()
    except StoreError as err:  # text in a number column, parents that loop
        sampled = []
        if str(err) not in problems:  # a retained path's edit is found by both
            problems.append(str(err))
    ids = {row["id"] for row in sampled}
    problems += [f"path #{row['id']} names parent #{row['parent']}, which has no path record" for row in sampled
                 if row["parent"] is not None and row["parent"] not in ids and row["parent"] != root_id]
    live = store.live_links()
    rows = {r.id: r for r in store.live_paths()}
    num_classes = ck.get("num_classes") or {}
    problems += class_name_misfits(store.task_class_names(), num_classes)
    for pid, link in live.items():
        if pid not in rows:
            problems.append(f"live path #{pid} has no path record")
            continue
        task, comps = rows[pid].task, rows[pid].components
        if ck and task not in num_classes:  # a missing checkpoint record is reported once, above
            problems.append(f"path #{pid} belongs to task {task!r}, which the checkpoint does not know")
        if link is not None and link != root_id and link not in live:
            problems.append(f"path #{pid} links to parent #{link}, which is not held")
        for name, cid in comps.items():
            if cid not in components:
                problems.append(f"path #{pid} ({task}) uses {name} component #{cid}, which has no record")
        problems += record_problems(rows[pid], components, root.get("patch_size"), num_classes.get(task))
    in_flight = ck.get("in_flight")
    if in_flight:
        for pid in in_flight["seeds"]:
            if pid != root_id and pid not in live:
                problems.append(f"the in-flight iteration's seed path #{pid} is not held")
    cfg = store.get("config")
    if isinstance(cfg, dict):  # a missing or damaged record is reported once, above
        try:
            RunConfig.from_stored(cfg)
        except MunetError as err:
            problems.append(str(err))
    plan = _meta_record(store, "plan", problems)
    tasks = set(store.task_names())
    order = plan.get("order")
    for task in set(order if isinstance(order, list) else []) - tasks:  # another type: a meta problem already
        problems.append(f"planned task {task!r} has no task record")


def _meta_record(store: Store, key: str, problems: list[str]) -> dict[str, Any]:
    """The meta record ``key`` (empty when absent, or when damaged: then a problem says so)."""
    try:
        return store.record(key) or {}
    except StoreError as err:
        if str(err) not in problems:  # found with the other records' types already
            problems.append(str(err))
        return {}


def _check_data(store: Store, report: CheckReport) -> None:
    """Each task's data, loaded from its source, against the fingerprint stored when it joined the run."""
    from munet.data.registry import load_task
    from munet.errors import TaskUnavailable
    from munet.storage.snapshot import data_fingerprint

    cfg, stored = store.get("config"), store.get("data_fingerprints")
    cfg, stored = (v if isinstance(v, dict) else {} for v in (cfg, stored))  # damaged ones are problems already
    for spec in cfg.get("tasks", []):
        try:
            task = load_task(spec, cfg["seed"], cfg["data_dir"])
        except MunetError as err:
            if _local_files(spec) and not isinstance(err, TaskUnavailable):  # the user's files, moved or damaged:
                report.problems.append(f"the data of task {spec} cannot be loaded: {err}")  # no resume until back
            else:  # a package this machine lacks, or a download that failed: nothing known to be wrong
                report.notes.append(f"the data of task {spec} could not be loaded, so it was not verified: {err}")
            continue
        if task.name not in stored:
            report.notes.append(f"task {task.name} has no stored data fingerprint (a store from an older munet)")
        elif data_fingerprint(task) != stored[task.name]:
            report.problems.append(f"the data of task {task.name} ({task.description}) is not the data the run was "
                                   "made with (its sha256 differs from the one stored then)")
    report.counts["data sets"] = len(stored)


def _local_files(spec: str) -> bool:
    """Whether task ``spec`` reads the user's own files (``folder:``, ``npz:``, also inside ``split:``)."""
    while spec.startswith("split:"):
        spec = spec.removeprefix("split:").rpartition(":")[0]
    return spec.startswith(("folder:", "npz:"))
