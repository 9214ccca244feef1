"""The records a run store holds, as typed values, the checks of their JSON types and of records against each other.
Nothing here touches the database: :mod:`munet.storage.store`, its one owner, reads and writes the records through
these."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from munet.errors import StoreError

#: Fields every root record has had since the store's first version (later ones are read with defaults).
ROOT_FIELDS = ("name", "description", "source", "sha256", "mean", "std", "pretrained", "full_depth", "depth", "arch",
               "components")
#: The JSON type of each run-wide meta record (see meta_problem: `munet check` and the readers check it).
META_TYPES: dict[str, type | tuple[type, ...]] = {
    "config": dict, "root": dict, "plan": dict, "checkpoint": dict, "runtime": dict, "data_fingerprints": dict,
    "wall_time_s": (int, float)}


def meta_problem(key: str, value: Any) -> str | None:
    """What is wrong with ``value`` as run-wide record ``key`` (its type of :data:`META_TYPES`, an object for other
    keys, and the plan's fields), or ``None``."""
    kind = META_TYPES.get(key, dict)
    if not isinstance(value, kind):
        return f"is a {type(value).__name__}, not {'an object' if kind is dict else 'a number'}"
    if key == "plan" and not (isinstance(value.get("order"), list) and isinstance(value.get("done"), int)):
        return "lacks its list 'order' or its count 'done'"
    if key == "plan" and not 0 <= value["done"] <= len(value["order"]):
        return f"counts {value['done']} of its {len(value['order'])} task iterations done"
    return None


def parent_loops(parents: dict[int, int | None]) -> list[int]:
    """The paths of ``parents`` (path id -> parent id) whose chain of parents comes back to themselves (a hand edit:
    a child is recorded after its parent), by id; a walk along their lineage would never end."""
    looped: set[int] = set()
    ended: set[int] = set()  # paths whose chain ends (at a path without a parent, or one not recorded)
    for start in parents:
        chain: dict[int, int] = {}  # path id -> its position in this walk
        pid: int | None = start
        while pid in parents and pid not in ended and pid not in looped and pid not in chain:
            chain[pid] = len(chain)
            pid = parents[pid]
        walked = list(chain)
        if pid in chain:  # the walk met its own chain: from there on, a loop
            looped.update(walked[chain[pid]:])
            ended.update(walked[:chain[pid]])  # (they lead into a loop but are no part of it)
        else:
            ended.update(walked)
    return sorted(looped)


@dataclass(frozen=True)
class ComponentRecord:
    """One component as stored: ``shape`` holds its constructor arguments, ``tensors`` its tensor shapes, ``blob``
    and ``momentum`` the hashes of its weights and of its momentum trace."""

    id: int
    name: str
    origin: str
    locks: list[str]
    shape: dict[str, int]
    tensors: dict[str, list[int]]
    num_params: int
    blob: str
    momentum: str | None


@dataclass(frozen=True)
class LivePathRecord:
    """A path the checkpointed system holds: ``link`` is its current parent, ``rank`` its place in its task's
    population (``None``: an ancestor kept for its children's lineage)."""

    id: int
    link: int | None
    rank: int | None
    task: str
    components: dict[str, int]
    hparams: dict[str, Any]
    mutations: dict[str, Any]
    metrics: dict[str, Any]


@dataclass(frozen=True)
class AgentRecord:
    """An agent's last publication: ``cycle`` cycles done, its task's retained ``path`` (``None``: nothing kept
    yet) and its own ``state`` (what restarting it needs)."""

    task: str
    cycle: int
    path: LivePathRecord | None
    state: dict[str, Any]


def json_value(text: str | None, kind: type, what: str) -> Any:
    """A JSON column's value, which must be a ``kind`` (``None``: an empty one).

    Raises:
        StoreError: another type (the database was damaged or edited); text that is not JSON raises
            JSONDecodeError, which the store's readers report as damage too.
    """
    value = kind() if text is None else json.loads(text)
    if not isinstance(value, kind):
        raise StoreError(f"{what} is a {type(value).__name__} in the run database, not a {kind.__name__}: the database "
                         "was damaged or edited; restore the run from a copy (`munet check` reports what it can read)")
    return value


def path_object(text: str | None, column: str, path_id: int) -> dict[str, Any]:
    """Column ``column`` of path ``path_id``'s record: a JSON object (see :func:`json_value`)."""
    return json_value(text, dict, f"the {column} of path #{path_id}")


def class_name_misfits(class_names: dict[str, list[str]], num_classes: dict[str, int]) -> list[str]:
    """One line per task whose class names (``Store.task_class_names``) are not as many as ``num_classes`` (the
    checkpoint's) says it has: a prediction would index past its names, or leave classes unnamed."""
    return [f"task {task!r} has {len(names)} class names for {num_classes[task]} classes"
            for task, names in class_names.items() if task in num_classes and len(names) != num_classes[task]]


def live_path_record(pid: int, link: int | None, rank: int | None, task: str, components: str | None,
                     hparams: str | None, mutations: str | None, metrics: str | None) -> LivePathRecord:
    """The record of path ``pid`` from its row's JSON columns, each checked to be an object (see :func:`json_value`)."""
    return LivePathRecord(pid, link, rank, task, path_object(components, "components", pid),
                          path_object(hparams, "hparams", pid), path_object(mutations, "mutations", pid),
                          path_object(metrics, "metrics", pid))


def number_problems(values: dict[str, Any], columns: tuple[str, ...]) -> list[str]:
    """One phrase per column of ``columns`` in a record's ``values`` that holds neither a number nor NULL (a hand
    edit: munet writes numbers there), e.g. ``test_quality 'n/a'``."""
    return [f"{column} {values[column]!r}" for column in columns
            if values[column] is not None and (isinstance(values[column], bool)
                                               or not isinstance(values[column], int | float))]

