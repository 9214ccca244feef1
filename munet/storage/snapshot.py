"""Checkpoints: the system and the evolution's position, written to a :class:`Store` after every generation and
read back, so a resumed run continues exactly where the last checkpoint left it.

A checkpoint holds: each task's population with its metrics (offspring counts included), the ancestors still
reachable through parent links during a task iteration, every component those paths use (weights and, with
µ2Net's inheritance, momentum traces, as blobs), the locks, the id counters, the plan of task iterations and how
far it got, the in-flight iteration (seeds, seed cursor, generation) and every random state (the evolution's
``random.Random``, the iteration's ``torch.Generator``, and the global Python and torch streams).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from munet.data.rows import ImageRows
from munet.data.task import TaskData
from munet.errors import DataError, StoreError
from munet.evolution.loop import Evolution, IterationState
from munet.evolution.system import ScoreConfig, System
from munet.model.components import Component, kind_of, slot_index
from munet.model.path import SlotContent, TaskPath, slot_problems
from munet.model.root import Root
from munet.storage.records import ComponentRecord, LivePathRecord
from munet.storage.store import Store


@dataclass
class Checkpoint:
    """The evolution's position as stored: the plan of task iterations and the in-flight one.

    Args:
        plan: task names, one per task iteration, in the order the run performs them.
        done: task iterations of ``plan`` finished.
        iteration: the evolution's count of finished task iterations (across runs of the same system).
        in_flight: the unfinished task iteration (task, seed ids, seed cursor, generation), or ``None``.
        paths: every live path by id, the root path included.
        raw: the stored record, for the random states.
    """

    plan: list[str]
    done: int
    iteration: int
    in_flight: dict[str, Any] | None
    paths: dict[int, TaskPath] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunState:
    """What a checkpoint saves: the system, the evolution (iteration count and random stream), and where the run
    stands in its plan.

    Args:
        system: the multitask system.
        evolution: the evolution over it.
        plan: task names, one per task iteration, in the order the run performs them.
        done: task iterations of ``plan`` finished.
        in_flight: the unfinished task iteration, ``None`` between task iterations.
    """

    system: System
    evolution: Evolution
    plan: list[str] = field(default_factory=list)
    done: int = 0
    in_flight: IterationState | None = None


# --- writing ----------------------------------------------------------------------------------------------------
FINGERPRINT_ROWS = 4096  # images of a split read per batch hashed at a time


def data_fingerprint(data: TaskData) -> str:
    """sha256 over a task's class names and every split's images and labels (shapes, types and bytes): stored when
    the task joins a run, compared when the run resumes, so replaced data cannot silently change a run."""
    sha = hashlib.sha256(json.dumps(data.class_names).encode())
    for split in ("train", "val", "test"):
        for tensor in data.split(split):
            if isinstance(tensor, ImageRows):  # read per batch: hashed a chunk at a time, the digest of it loaded whole
                sha.update(f"{split} uint8 {tensor.shape}".encode())
                for start in range(0, len(tensor), FINGERPRINT_ROWS):
                    sha.update(tensor.read(np.arange(start, min(start + FINGERPRINT_ROWS, len(tensor)))).data)
                continue
            array = tensor.contiguous().numpy()
            sha.update(f"{split} {array.dtype} {array.shape}".encode())
            sha.update(array.data)
    return sha.hexdigest()


def _fingerprints(store: Store, tasks: dict[str, TaskData]) -> dict[str, str]:
    """The stored data fingerprints with those of ``tasks`` added; raises DataError when a task's data is not the
    data it joined the run with (checked before the checkpoint writes anything)."""
    stored = dict(store.get("data_fingerprints") or {})  # a store written before fingerprints records them now
    for name, data in tasks.items():
        digest = data_fingerprint(data)
        if stored.setdefault(name, digest) != digest:
            raise DataError(f"the data of task {name} ({data.description}) is not the data the run in {store.dir} "
                            f"was made with (its sha256 differs from the one stored then); restore the original data, "
                            "or start a new run in another directory")
    return stored


def path_row(system: System, path: TaskPath) -> dict[str, Any]:
    """The record of a sampled path, taken right after its generation (its parent link is still the original)."""
    # the stored metrics hold the path's offspring count and head flag too, first, as they always have
    m = {"offsprings": path.offsprings, "fresh_head": path.fresh_head, **path.metrics}
    mutations = m.pop("mutations", None) or {}
    score = system.score(path)
    return {
        "id": path.id, "task": path.task, "parent": m.get("parent", path.parent.id if path.parent else None),
        "iteration": m.get("iteration"), "generation": m.get("generation"),
        "components": json.dumps({n: c.id for n, c in path.components.items()}),
        "hparams": json.dumps(path.hparams), "mutations": json.dumps(mutations), "metrics": json.dumps(m),
        "accepted": int(bool(m.get("improved"))), "reason": _reason(m, score), "quality": m.get("quality"),
        "test_quality": m.get("test_quality"), "score": score if math.isfinite(score) else None,
        "params": path.num_params(), "accounted": path.accounted_params(), "train_time": m.get("train_time"),
        "recorded_at": time.time(),
    }


def _reason(m: dict[str, Any], score: float) -> str:
    if m.get("failed") and not m.get("improved"):
        return f"discarded: {m['failed']}"
    beat = m.get("parent_score", float("-inf"))
    if m.get("improved"):
        later = f" (then {m['failed']}; its accepted snapshot is kept)" if m.get("failed") else ""
        if not math.isfinite(beat):
            return "accepted: its parent is another task's path or the root, so any validated child is kept" + later
        return f"accepted: validation score {score:.4f} beats its parent's {beat:.4f}" + later
    if m.get("stopped"):
        return f"rejected: stopped early, {m['stopped']}"
    if m.get("quality") is None:
        return "rejected: never validated"
    return f"rejected: best validation score {score:.4f} did not beat its parent's {beat:.4f}"


def save_checkpoint(store: Store, run: RunState, sampled: list[dict[str, Any]] | None = None,
                    meta: dict[str, Any] | None = None, tasks: dict[str, TaskData] | None = None) -> None:
    """Writes one checkpoint in one transaction (blobs first), then deletes blobs nothing references any more.

    Args:
        store: the run's store, open for writing.
        run: what to save.
        sampled: :func:`path_row` records of the paths sampled since the last checkpoint.
        meta: extra meta values to write in the same transaction (config, root identity).
        tasks: tasks to record (name, classes) if not recorded yet, in the run's order.
    """
    system, evolution, state = run.system, run.evolution, run.in_flight
    fingerprints = _fingerprints(store, tasks) if tasks else None
    live = _live_paths(system)
    comps = {c.id: c for c in system.root_components().values()}
    comps.update({c.id: c for c in system.posembed_cache.values()})
    for path, _, _ in live.values():
        comps.update({c.id: c for c in path.components.values()})
    known = store.component_ids()
    # a component's weights never change once its generation is over
    new_records = [component_record(store, comp) for cid, comp in comps.items() if cid not in known]
    with store.transaction():
        for key, value in (meta or {}).items():
            store.put(key, value)
        if fingerprints is not None:
            store.put("data_fingerprints", fingerprints)
        store.record_tasks([(name, data.num_classes, data.class_names, data.description)
                            for name, data in (tasks or {}).items()])
        store.record_paths(sampled or [])
        # metrics move on (offspring counts, test accuracy, accounted params)
        store.update_paths([path_row(system, path) for path, _, _ in live.values()])
        store.set_live([(pid, link, rank) for pid, (_, link, rank) in live.items()])
        store.add_components(new_records)
        store.set_locks({cid: sorted(c.locks) for cid, c in comps.items()})
        store.delete_components(known - set(comps))
        store.put("plan", {"order": run.plan, "done": run.done})
        store.put("checkpoint", {
            "iteration": evolution.iteration, "next_path_id": system.next_path_id,
            "next_component_id": system.next_component_id,
            "posembeds": {str(g): c.id for g, c in system.posembed_cache.items()},
            "num_classes": system.num_classes, "policy_rng": _jsonable_state(evolution.policy.rng.getstate()),
            "python_rng": _jsonable_state(random.getstate()), "saved_at": time.time(),
            "components_digest": store.components_digest(),
            "in_flight": None if state is None else {
                "task": state.task, "seeds": [p.id for p in state.seeds], "next_seed": state.next_seed,
                "generation": state.generation},
        })
        store.put("torch_rng", bytes(torch.get_rng_state().numpy()))
        store.put("generator", b"" if state is None else bytes(state.generator.get_state().numpy()))
    store.collect_garbage()


def component_record(store: Store, comp: Component) -> ComponentRecord:
    """The record of ``comp``, its weights (and momentum trace) written as blobs first."""
    state_dict = comp.module.state_dict()
    shapes, args = {k: list(v.shape) for k, v in state_dict.items()}, kind_of(comp.name).shape_args(comp.module)
    return ComponentRecord(comp.id, comp.name, comp.origin, sorted(comp.locks), args, shapes, comp.num_params,
                           store.write_blob(state_dict),
                           store.write_blob(comp.momentum) if comp.momentum else None)


def _live_paths(system: System) -> dict[int, tuple[TaskPath, int | None, int | None]]:
    """``id -> (path, current parent id, rank in its task's population or None)`` of every path the system holds:
    the populations and the ancestors their parent links still reach (the root path excluded)."""
    live: dict[int, tuple[TaskPath, int | None, int | None]] = {}
    for paths in system.paths.values():
        for rank, path in enumerate(paths):
            live[path.id] = (path, path.parent.id if path.parent else None, rank)
    for path, _, _ in list(live.values()):
        p = path.parent
        while p is not None and p is not system.root_path and p.id not in live:
            live[p.id] = (p, p.parent.id if p.parent else None, None)
            p = p.parent
    return live


def _jsonable_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _tuple_state(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


# --- reading ----------------------------------------------------------------------------------------------------
def load_checkpoint(store: Store, root: Root, image_size: int, score: ScoreConfig,
                    extra_hparams: dict[str, Any], verify_digest: bool = True) -> tuple[System, Checkpoint]:
    """Rebuilds the checkpointed system on ``root`` (which must be the run's root); returns it with the position.
    ``verify_digest=False`` skips checking the component records against the checkpoint's digest: an agents run's
    agents add records after the driver's checkpoint (until the driver merges their publications).

    Raises:
        StoreError: a record or blob is missing or corrupt.
    """
    ck = store.record("checkpoint")
    plan = store.record("plan")
    if ck is None or plan is None:
        raise StoreError(f"{store.dir} holds no committed checkpoint")
    rec = store.root_record()
    if verify_digest and not store.components_match(ck):
        raise StoreError(f"the component records of {store.dir} are not those its checkpoint was written with (a "
                         f"record points at another blob); run `munet check {store.dir}`")
    system = System(root, image_size, score, extra_hparams)
    if {n: c.id for n, c in system.root_components().items()} != rec["components"]:
        raise StoreError(f"the root components of {store.dir} do not match the root's layout")
    by_id = {c.id: c for c in system.root_components().values()}
    records = store.components()
    posembed_ids = {cid: int(g) for g, cid in ck["posembeds"].items()}
    for r in records:
        if r.id in by_id:
            continue
        by_id[r.id] = comp = component_from_record(store, r, root)
        if r.id in posembed_ids:
            system.posembed_cache[posembed_ids[r.id]] = comp
    for r in records:  # the root's components are built with the system; their locks are the stored ones
        by_id[r.id].locks = set(r.locks)
    paths: dict[int, TaskPath] = {system.root_path.id: system.root_path}
    links: dict[int, int | None] = {}
    population: list[tuple[int, int, str]] = []
    for rec in store.live_paths():
        try:
            comps = {n: by_id[cid] for n, cid in rec.components.items()}
        except KeyError as err:
            raise StoreError(f"path #{rec.id} uses component #{err.args[0]}, which {store.dir} does not hold; run "
                             f"`munet check {store.dir}`") from None
        paths[rec.id] = path_from_record(rec, comps, root.patch_size, ck["num_classes"].get(rec.task))
        links[rec.id] = rec.link
        if rec.rank is not None:
            population.append((rec.rank, rec.id, rec.task))
    for pid, link in links.items():
        paths[pid].parent = paths[link] if link is not None else None
    for task, n in ck["num_classes"].items():
        system.add_task(task, n)
    for _, pid, task in sorted(population):
        system.paths[task].append(paths[pid])
    system.next_path_id = ck["next_path_id"]
    system.next_component_id = ck["next_component_id"]
    return system, Checkpoint(plan["order"], plan["done"], ck["iteration"], ck["in_flight"], paths, ck)


def path_from_record(rec: LivePathRecord, components: dict[str, Component], patch_size: int,
                     num_classes: int | None) -> TaskPath:
    """The path of record ``rec`` over ``components`` (its slots' components), without a parent link.

    Raises:
        StoreError: the record describes a path munet cannot build (see :func:`require_buildable`).
    """
    contents = {comp.id: (comp.name, kind_of(comp.name).shape_args(comp.module)) for comp in components.values()}
    require_buildable(rec, contents, patch_size, num_classes)
    metrics = dict(rec.metrics, mutations=rec.mutations)
    offsprings, fresh_head = metrics.pop("offsprings", 0), metrics.pop("fresh_head", False)
    return TaskPath(rec.id, rec.task, components, rec.hparams, None, metrics, offsprings, fresh_head)


def record_problems(rec: LivePathRecord, contents: dict[int, SlotContent], patch_size: int | None = None,
                    num_classes: int | None = None) -> list[str]:
    """Why path record ``rec`` describes no path munet can build, one sentence each naming the path (empty: it
    can be built); ``contents``: component id -> what it is (an id without one is a missing record, which the
    readers report apart). See :func:`slot_problems` for the rest."""
    slots = {slot: contents.get(cid, (slot, None)) for slot, cid in rec.components.items()}
    problems = slot_problems(slots, rec.hparams, patch_size, num_classes)
    quality = rec.metrics.get("quality")
    if rec.rank is not None and (isinstance(quality, bool) or not isinstance(quality, int | float)):
        problems.append("is in its task's population but its metrics hold no quality to score it by")
    return [f"path #{rec.id} ({rec.task}) {problem}" for problem in problems]


def require_buildable(rec: LivePathRecord, contents: dict[int, SlotContent], patch_size: int | None = None,
                      num_classes: int | None = None) -> None:
    """Raises StoreError with the first of :func:`record_problems` (a damaged or edited record: a traceback at the
    first forward, report or export otherwise)."""
    problems = record_problems(rec, contents, patch_size, num_classes)
    if problems:
        raise StoreError(f"{problems[0]}; run `munet check`")


def component_from_record(store: Store, r: ComponentRecord, root: Root) -> Component:
    """The component of record ``r``, its weights read from its blobs (frozen until a task unlocks it).

    Raises:
        StoreError: a blob is missing or corrupt, or does not fit the record.
    """
    what = f"component {r.name}#{r.id}"
    module = _empty_module(r.name, r.shape, root)
    try:
        module.load_state_dict(store.blobs.read(r.blob, what))
    except RuntimeError as err:
        raise StoreError(f"{what} does not match its stored tensors: {err}") from err
    module.requires_grad_(False)
    comp = Component(r.id, r.name, module, set(r.locks), r.origin)
    if r.momentum:
        comp.momentum = store.blobs.read(r.momentum, f"momentum of {what}")
    return comp


def restore_run(store: Store, evolution: Evolution, ck: Checkpoint) -> RunState:
    """Puts ``evolution`` (over the system :func:`load_checkpoint` rebuilt) and the global random streams where the
    checkpoint left them; returns the run's state with its position in the plan."""
    evolution.iteration = ck.iteration
    evolution.policy.rng.setstate(_tuple_state(ck.raw["policy_rng"]))
    random.setstate(_tuple_state(ck.raw["python_rng"]))
    torch.set_rng_state(torch.frombuffer(bytearray(store.get("torch_rng")), dtype=torch.uint8))
    in_flight = None
    if ck.in_flight is not None:
        f = ck.in_flight
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(store.get("generator")), dtype=torch.uint8))
        seeds = [ck.paths[pid] for pid in f["seeds"]]
        in_flight = IterationState(f["task"], seeds, f["next_seed"], f["generation"], generator)
    return RunState(evolution.system, evolution, ck.plan, ck.done, in_flight)


def _empty_module(name: str, shape: dict[str, int], root: Root) -> torch.nn.Module:
    """A module of the right architecture for a stored component, to load its tensors into."""
    try:
        kind = kind_of(name)
    except KeyError:
        raise StoreError(f"unknown component name {name!r} in the store") from None
    return kind.build(root.model, slot_index(name), shape)
