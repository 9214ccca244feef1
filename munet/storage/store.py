"""The run store: one SQLite database (WAL) plus content-addressed safetensors blobs, in one run directory.

Layout::

    RUN/munet.db            tables meta, tasks, paths, components, live, agents (see
                            :mod:`munet.storage.database`)
    RUN/blobs/<sha256>.safetensors
                            one component's tensors (or its momentum trace); the name is the hash of the file, so
                            equal content is stored once and any change to a file is detected
    RUN/munet.lock          held (flock) by the one process allowed to write the run
    RUN/munet.agent-<i>.lock
                            held by the agent of the run's i-th task while it runs (``schedule = "agents"``)
    RUN/summary.json        the final per-task table, rewritten at the end of each `munet run`

Every write is atomic: a blob is written to a temporary file, fsynced and renamed before the transaction that
references it commits; all rows of one checkpoint go in one transaction (SQLite ``synchronous=FULL``). A crash
at any moment therefore leaves the last committed checkpoint intact, at worst with unreferenced blobs, which the
next commit deletes.

Concurrent writers (µ3Net agents, ``schedule = "agents"``): the driver holds ``munet.lock``; each agent opens the
store with :meth:`Store.open_agent`, holding its own agent lock, and writes only its own rows (its sampled paths,
the components it created, whose ids lie in its own range, and its ``agents`` record) in ``BEGIN IMMEDIATE``
transactions that wait for each other (SQLite WAL, a 30 s busy timeout). Blobs are content-addressed and written
through a temporary file of the writing process's own, so two agents writing the same blob never interleave.
Agents never collect garbage; the driver's collection first waits for every agent lock, so it never deletes the
blob of a transaction in flight.

Readers (:meth:`Store.open` without ``write``; predict, export, serve, status, check) read a run in progress too:
each reads one snapshot (one read transaction), so it never sees half of a checkpoint, and :func:`read_run` reads
a newer snapshot when the writer has since deleted a blob the older one references.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path as FsPath
from typing import Any, TypeVar

import torch

from munet.errors import StoreError
from munet.storage import database
from munet.storage.database import BLOB_DIR, DAMAGE_ERRORS, DB_NAME, PATH_COLUMNS, UPDATED_PATH_COLUMNS
from munet.storage.files import SUFFIX, BlobDir, lock_file, unlock_file
from munet.storage.records import (
    META_TYPES,
    ROOT_FIELDS,
    AgentRecord,
    ComponentRecord,
    LivePathRecord,
    json_value,
    live_path_record,
    meta_problem,
    number_problems,
    parent_loops,
    path_object,
)

LOCK_NAME = "munet.lock"
AGENT_LOCK = "munet.agent-{}.lock"  # formatted with the agent's task position
_ABSENT = object()  # a meta record that is not there (a stored JSON null reads as None)
T = TypeVar("T")
READ_ATTEMPTS = 5  # snapshots a reader of a run in progress reads when the writer commits while it reads
CRASH_ENV = "MUNET_CRASH_AT"  # fault injection for the resume tests: "<point>:<n>" kills the process (SIGKILL)


class Store:
    """An open run store; use :meth:`create` or :meth:`open`, and close it (or use it as a context manager).

    Args:
        run_dir: the run directory.
        conn: the SQLite connection.
        lock: the open lock file when this store may write, else ``None``.
    """

    def __init__(self, run_dir: FsPath, conn: sqlite3.Connection, lock: Any | None, agent: str | None = None,
                 snapshot: int | None = None):
        self.dir = run_dir
        self._conn = conn
        self._lock = lock
        self.agent = agent  # the task of the agent this store writes for; None: the run's one writer (or a reader)
        self._crash_counts: dict[str, int] = {}
        self.blobs = BlobDir(run_dir / BLOB_DIR, self.crash_point)
        self._snapshot = snapshot  # a reader's snapshot: SQLite's data_version when it began (None: none held)

    # --- opening ------------------------------------------------------------------------------------------------
    @staticmethod
    def exists(run_dir: str | FsPath) -> bool:
        """Whether ``run_dir`` holds a store that a new run must not replace: a committed run, or a database that is
        damaged or unreadable (opening it says why). Nothing, an empty database or an interrupted creation does not
        count."""
        return database.db_state(FsPath(run_dir) / DB_NAME) not in ("absent", "empty", "interrupted")

    @classmethod
    def create(cls, run_dir: str | FsPath) -> Store:
        """A new, empty store in ``run_dir`` (created if needed), locked for writing.

        Only an interrupted creation (tables without a single record) or an empty database without blobs is
        replaced; anything that may hold a run's data is refused, never deleted.
        """
        run_dir = FsPath(run_dir)
        lock = lock_file(run_dir, LOCK_NAME)
        db = run_dir / DB_NAME
        try:
            state = database.db_state(db)
            if state in ("committed", "unreadable"):
                raise StoreError(f"{run_dir} already holds a munet run")
            if state == "damaged":
                raise StoreError(database.damaged_message(db))
            blobs = run_dir / BLOB_DIR
            if state in ("absent", "empty") and blobs.is_dir() and any(blobs.iterdir()):
                what = "missing" if state == "absent" else "empty"
                raise StoreError(f"{run_dir} holds blobs but its database {DB_NAME} is {what}: the run cannot be "
                                 "read; restore the database or choose another directory")
            # tables without any record are an interrupted creation: it committed nothing, start afresh
            for leftover in (db, *database.sidecars(db),
                             *(blobs.iterdir() if blobs.is_dir() else ())):
                leftover.unlink(missing_ok=True)
            blobs.mkdir(exist_ok=True)
            conn = database.create(db)
        except BaseException:
            unlock_file(lock)
            raise
        return cls(run_dir, conn, lock)

    @classmethod
    def open(cls, run_dir: str | FsPath, write: bool = False, require_checkpoint: bool = True) -> Store:
        """The store of an existing run.

        Args:
            run_dir: the run directory.
            write: take the run's lock (one writer at a time) and open the database for writing; without it the
                store is opened read-only and no record or blob changes (read-only media work too); SQLite may
                leave its index files (``-shm``, an empty ``-wal``) beside the database, see :func:`_connect_readonly`.
            require_checkpoint: refuse a database without a checkpoint record (``munet check`` reports it instead).
        """
        run_dir = FsPath(run_dir)
        db = database.run_database(run_dir)
        lock = lock_file(run_dir, LOCK_NAME) if write else None
        conn, snapshot = None, None
        try:
            conn = database.connect_readonly(db)
            blobs = run_dir / BLOB_DIR
            database.check_version(conn, db, require_checkpoint,
                                   has_blobs=blobs.is_dir() and any(blobs.glob(f"*{SUFFIX}")))
            if write:  # only once it is known to be a run: opening for writing turns the database to WAL mode
                conn.close()
                conn = None
                conn = database.connect(db, create=False)
            else:
                snapshot = _begin_snapshot(conn)
        except BaseException as err:
            if conn is not None:
                conn.close()  # the last connection's close removes SQLite's -wal and -shm files again
            unlock_file(lock)
            if isinstance(err, DAMAGE_ERRORS):
                raise StoreError(f"{db} is damaged: {err}; restore the run from a copy") from err
            raise
        return cls(run_dir, conn, lock, snapshot=snapshot)

    def end_snapshot(self) -> bool:
        """Ends a reader's snapshot (later reads see each newest commit); returns whether a writer committed since it
        began, so that what the reader found missing (a blob the newer checkpoint no longer needs, which that writer
        deletes) may be there in the newer state."""
        if self._snapshot is None:
            return False
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("COMMIT")
        began, self._snapshot = self._snapshot, None
        return self._conn.execute("PRAGMA data_version").fetchone()[0] != began

    @classmethod
    def open_agent(cls, run_dir: str | FsPath, task: str) -> Store:
        """The store of a running agents run, for the agent of ``task``: it holds that agent's lock (so one agent
        per task runs at a time, waiting for a previous one to exit) but not the run's, and may write only its
        own records (see the module docstring).

        Raises:
            StoreError: ``task`` is not one of the run's tasks, or the store cannot be opened.
        """
        run_dir = FsPath(run_dir)
        reader = cls.open(run_dir)
        try:
            names = reader.task_names()
        finally:
            reader.close()
        if task not in names:
            raise StoreError(f"{run_dir} has no task {task!r} (its tasks: {', '.join(names)})")
        lock = lock_file(run_dir, AGENT_LOCK.format(names.index(task)), wait=True)
        try:
            conn = database.connect(run_dir / DB_NAME, create=False)
        except BaseException:
            unlock_file(lock)
            raise
        return cls(run_dir, conn, lock, agent=task)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        unlock_file(self._lock)
        self._lock = None

    def abandon(self) -> None:
        """Closes a store whose creation failed before its first checkpoint, removing what it wrote."""
        try:
            committed = self.get("checkpoint") is not None
        except sqlite3.Error:
            committed = True  # cannot tell (a broken connection): keep everything rather than risk a run
        self.close()
        if committed:
            return
        db = self.dir / DB_NAME
        for leftover in (db, *database.sidecars(db), self.dir / LOCK_NAME):
            leftover.unlink(missing_ok=True)
        blobs = self.dir / BLOB_DIR
        if blobs.is_dir():
            for path in blobs.iterdir():
                path.unlink()
            blobs.rmdir()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        # a record without a field it always has is damage too, when only records were read (in a writer's block a
        # KeyError may come from any code, and must stay a bug report)
        damage = DAMAGE_ERRORS if self.writable else (*DAMAGE_ERRORS, KeyError)
        self.close()
        if isinstance(exc, damage):  # a damaged or hand-edited database is the user's to fix, not a crash
            raise StoreError(f"the run database {self.dir / DB_NAME} cannot be read: {exc}. It is damaged or was "
                             f"edited: `munet check {self.dir}` reports what it can read; restore the run from a "
                             "copy") from exc

    @property
    def writable(self) -> bool:
        return self._lock is not None

    # --- meta ---------------------------------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """A JSON value from the meta table (bytes values are returned as they are)."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        if row is None:
            return default
        return row[0] if isinstance(row[0], bytes) else json.loads(row[0])

    def record(self, key: str) -> dict[str, Any] | None:
        """A meta record that is a JSON object (``checkpoint``, ``plan``); ``None`` when absent.

        Raises:
            StoreError: the value is not an object, or not of its record's shape (the database was damaged or
                edited).
        """
        value = self.get(key)
        problem = None if value is None else meta_problem(key, value)
        if problem:
            raise StoreError(self._edited(key, problem))
        return value

    def meta_problems(self) -> dict[str, str]:
        """``key -> what is wrong`` for each run-wide record of :data:`META_TYPES` that is present but of another
        type, a JSON null included (the database was damaged or edited; munet never writes one)."""
        problems = {}
        for key in META_TYPES:
            value = self.get(key, _ABSENT)
            problem = None if value is _ABSENT else meta_problem(key, None if isinstance(value, bytes) else value)
            if problem:
                problems[key] = self._edited(key, problem)
        return problems

    def require_records(self) -> None:
        """Raises StoreError naming the first of :meth:`meta_problems`; the readers of the run-wide records call it
        (``munet history`` reads the path records alone, so it still answers)."""
        problems = list(self.meta_problems().values())
        if problems:
            more = f" ({len(problems) - 1} more: `munet check {self.dir}` lists them)" if problems[1:] else ""
            raise StoreError(problems[0] + more)

    def _edited(self, key: str, what: str) -> str:
        return (f"the {key!r} record of {self.dir / DB_NAME} {what}: the database was damaged or edited; restore the "
                "run from a copy")

    def root_record(self) -> dict[str, Any] | None:
        """The root's record (written by :func:`munet.storage.stored_root.root_record`); ``None`` before the first
        checkpoint.

        Raises:
            StoreError: a record without a field every root record has (the database was damaged or edited).
        """
        rec = self.get("root")
        if rec is None:
            return None
        missing = [f for f in ROOT_FIELDS if f not in rec] if isinstance(rec, dict) else list(ROOT_FIELDS)
        if missing:
            raise StoreError(f"the root record of {self.dir / DB_NAME} lacks {', '.join(missing)}: the database was "
                             "damaged or edited; restore the run from a copy")
        return rec

    def put(self, key: str, value: Any) -> None:
        """Sets a meta value (JSON, or raw bytes); call inside :meth:`transaction`."""
        stored = value if isinstance(value, bytes) else json.dumps(value)
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, stored))

    # --- records ------------------------------------------------------------------------------------------------
    def task_names(self) -> list[str]:
        """The run's tasks, in the order they joined it."""
        return [row[0] for row in self._conn.execute("SELECT name FROM tasks ORDER BY position")]

    def sampled_paths(self) -> list[dict[str, Any]]:
        """Every path the run sampled, by id: ``task``, ``parent``, ``hparams``, ``mutations``, ``accepted``,
        ``quality`` (best validation), ``test_quality``, ``score``, ``retained`` (in a task's population now) and
        ``metrics`` (the trainer's outcome: validation curve, training steps and images...)."""
        retained = {row[0] for row in self._conn.execute("SELECT path_id FROM live WHERE rank IS NOT NULL")}
        rows = [{"id": pid, "task": task, "parent": parent, "hparams": path_object(hp, "hparams", pid),
                 "mutations": path_object(mut, "mutations", pid), "accepted": bool(acc), "quality": q,
                 "test_quality": tq, "score": sc, "retained": pid in retained,
                 "metrics": path_object(metrics, "metrics", pid)}
                for pid, task, parent, hp, mut, acc, q, tq, sc, metrics in self._conn.execute(
                    "SELECT id, task, parent, hparams, mutations, accepted, quality, test_quality, score, metrics "
                    "FROM paths ORDER BY id")]
        for row in rows:
            wrong = number_problems(row, ("quality", "test_quality", "score"))
            wrong += number_problems({"train_images": row["metrics"].get("train_images")}, ("train_images",))
            if wrong:
                raise StoreError(self._edited_path(row, f"holds {', '.join(wrong)}, not a number"))
            if not isinstance(row["parent"], int | None):
                raise StoreError(self._edited_path(row, f"holds parent {row['parent']!r}, not a path id"))
        looped = parent_loops({row["id"]: row["parent"] for row in rows})
        if looped:  # a walk along their lineage would never end
            raise StoreError(f"the parents of path(s) {', '.join(f'#{p}' for p in looped[:10])} of {self.dir} loop "
                             f"back to them: the database was damaged or edited; run `munet check {self.dir}`")
        return rows

    def task_class_names(self) -> dict[str, list[str]]:
        """Each task's class names, in the order the tasks joined the run."""
        return {name: json_value(names, list, f"the class names of task {name!r}") for name, names in
                self._conn.execute("SELECT name, class_names FROM tasks ORDER BY position")}

    def retained_paths(self) -> list[dict[str, Any]]:
        """The paths in the tasks' populations: ``task``, ``id``, ``score``, ``quality``, ``test_quality``,
        ``params`` and ``accounted``, by id."""
        keys = ("task", "id", "score", "quality", "test_quality", "params", "accounted")
        query = (f"SELECT {', '.join('paths.' + k for k in keys)} FROM live JOIN paths ON paths.id = live.path_id "
                 "WHERE live.rank IS NOT NULL ORDER BY paths.id")
        rows = [dict(zip(keys, row)) for row in self._conn.execute(query)]
        for row in rows:  # a population's path has been validated: a NULL here is an edit, not a state munet writes
            unset = [k for k in ("score", "quality") if row[k] is None]
            if unset:
                raise StoreError(self._edited_path(row, f"is in its task's population but has no {' or '.join(unset)}"))
            wrong = number_problems(row, ("score", "quality", "test_quality", "params", "accounted"))
            if wrong:
                raise StoreError(self._edited_path(row, f"holds {', '.join(wrong)}, not a number"))
        return rows

    def _edited_path(self, row: dict[str, Any], problem: str) -> str:
        """The message of a path record munet cannot have written."""
        return (f"path #{row['id']} ({row['task']}) of {self.dir} {problem}: the database was damaged or edited; run "
                f"`munet check {self.dir}`")

    def live_paths(self) -> list[LivePathRecord]:
        """Every path the checkpointed system holds, by id."""
        query = ("SELECT live.path_id, live.link, live.rank, paths.task, paths.components, paths.hparams, "
                 "paths.mutations, paths.metrics FROM live JOIN paths ON paths.id = live.path_id ORDER BY live.path_id")
        return [live_path_record(*row) for row in self._conn.execute(query)]

    def live_links(self) -> dict[int, int | None]:
        """``path id -> current parent id`` of every live path, whether or not its path record exists."""
        return dict(self._conn.execute("SELECT path_id, link FROM live"))

    def agent_records(self) -> dict[str, AgentRecord]:
        """Each agent's last publication by task, with its retained path (``link`` from its state, ``rank`` 0); empty
        for a store made before agents existed."""
        exists = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'agents'"
        if self._conn.execute(exists).fetchone() is None:
            return {}
        query = ("SELECT agents.task, agents.cycle, agents.state, paths.id, paths.components, paths.hparams, "
                 "paths.mutations, paths.metrics FROM agents LEFT JOIN paths ON paths.id = agents.path_id "
                 "ORDER BY agents.task")
        records = {}
        for task, cycle, state, pid, comps, hparams, mutations, metrics in self._conn.execute(query):
            state = json.loads(state)
            path = None if pid is None else live_path_record(pid, state.get("link"), 0, task, comps, hparams,
                                                               mutations, metrics)
            records[task] = AgentRecord(task, cycle, path, state)
        return records

    def set_agent(self, task: str, cycle: int, path_id: int | None, state: dict[str, Any]) -> None:
        """Records an agent's publication (call inside :meth:`transaction`)."""
        self._conn.execute("INSERT OR REPLACE INTO agents VALUES (?, ?, ?, ?, ?)",
                           (task, cycle, path_id, json.dumps(state), time.time()))

    def path_counts(self) -> dict[str, int]:
        """How many paths were ``sampled`` and ``accepted``, and how many are ``live``."""
        sampled, accepted = self._conn.execute("SELECT COUNT(*), SUM(accepted) FROM paths").fetchone()
        live = self._conn.execute("SELECT COUNT(*) FROM live").fetchone()[0]
        return {"sampled": sampled, "accepted": accepted or 0, "live": live}

    def components(self, ids: set[int] | None = None) -> list[ComponentRecord]:
        """Every component record (or those of ``ids``), by id."""
        query = "SELECT id, name, origin, locks, shape, tensors, num_params, blob, momentum FROM components"
        if ids is None:
            rows = self._conn.execute(query + " ORDER BY id")
        else:
            rows = self._conn.execute(query + " WHERE id IN (SELECT value FROM json_each(?)) ORDER BY id",
                                      (json.dumps(sorted(ids)),))
        return [ComponentRecord(cid, name, origin, json_value(locks, list, f"the locks of component #{cid}"),
                                json_value(shape, dict, f"the shape of component #{cid}"),
                                json_value(tensors, dict, f"the tensor shapes of component #{cid}"),
                                n, blob, momentum)
                for cid, name, origin, locks, shape, tensors, n, blob, momentum in rows]

    def component_ids(self) -> set[int]:
        return {row[0] for row in self._conn.execute("SELECT id FROM components")}

    def component_blob(self, cid: int) -> str | None:
        """The blob of component ``cid``, ``None`` when it has no record."""
        row = self._conn.execute("SELECT blob FROM components WHERE id = ?", (cid,)).fetchone()
        return None if row is None else row[0]

    def unique_params(self) -> dict[str, int]:
        """``params``: the parameters of all component records; ``blobs``: their distinct weight and momentum blobs."""
        query = "SELECT SUM(num_params), COUNT(DISTINCT blob) FROM components"
        n_params, n_blobs = self._conn.execute(query).fetchone()
        momentum = self._conn.execute("SELECT COUNT(DISTINCT momentum) FROM components").fetchone()[0]
        return {"params": int(n_params or 0), "blobs": n_blobs + momentum}

    def integrity(self) -> str:
        """SQLite's integrity check of the database: ``ok``, or what is wrong."""
        return self._conn.execute("PRAGMA integrity_check").fetchone()[0]

    # --- checkpoint writes (call inside :meth:`transaction`) -------------------------------------------------------
    def record_tasks(self, tasks: list[tuple[str, int, list[str], str]]) -> None:
        """Records ``(name, num_classes, class_names, description)`` of tasks not recorded yet, after those that
        are, in the given order."""
        recorded = set(self.task_names())
        new = [task for task in tasks if task[0] not in recorded]
        self._conn.executemany("INSERT INTO tasks VALUES (?, ?, ?, ?, ?)",
                              [(name, len(recorded) + i, n, json.dumps(names), description)
                               for i, (name, n, names, description) in enumerate(new)])

    def record_paths(self, rows: list[dict[str, Any]]) -> None:
        """Writes sampled paths' records (keys :data:`PATH_COLUMNS`), replacing earlier records of the same id."""
        self._conn.executemany(f"INSERT OR REPLACE INTO paths VALUES ({', '.join('?' * len(PATH_COLUMNS))})",
                              [tuple(row[c] for c in PATH_COLUMNS) for row in rows])

    def update_paths(self, rows: list[dict[str, Any]]) -> None:
        """Updates the :data:`UPDATED_PATH_COLUMNS` of existing path records (``id`` names the record)."""
        for row in rows:
            self._conn.execute(f"UPDATE paths SET {', '.join(f'{c} = ?' for c in UPDATED_PATH_COLUMNS)} WHERE id = ?",
                              (*[row[c] for c in UPDATED_PATH_COLUMNS], row["id"]))

    def set_live(self, live: list[tuple[int, int | None, int | None]]) -> None:
        """Replaces the live paths by ``(path id, current parent id, rank)``."""
        self._conn.execute("DELETE FROM live")
        self._conn.executemany("INSERT INTO live VALUES (?, ?, ?)", live)

    def add_components(self, records: list[ComponentRecord]) -> None:
        self._conn.executemany("INSERT INTO components VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                              [(r.id, r.name, r.origin, json.dumps(r.locks), json.dumps(r.shape),
                                json.dumps(r.tensors), r.num_params, r.blob, r.momentum) for r in records])

    def set_locks(self, locks: dict[int, list[str]]) -> None:
        """Sets the locks of components by id."""
        self._conn.executemany("UPDATE components SET locks = ? WHERE id = ?",
                              [(json.dumps(names), cid) for cid, names in locks.items()])

    def delete_components(self, ids: set[int]) -> None:
        self._conn.executemany("DELETE FROM components WHERE id = ?", [(cid,) for cid in ids])

    # --- blobs --------------------------------------------------------------------------------------------------
    def write_blob(self, tensors: dict[str, torch.Tensor]) -> str:
        """Stores ``tensors`` (once per content, in :attr:`blobs`) and returns their hash."""
        self._require_write()
        try:
            return self.blobs.write(tensors)
        except OSError as err:
            blob = f"blob {FsPath(err.filename).name}" if err.filename else "a blob"  # a full disk names no file
            raise StoreError(f"cannot write {blob} in {self.dir}: {err.strerror or err}. {_KEPT}") from err

    def components_digest(self) -> str:
        """sha256 binding every component record to its blobs (id, name, blob, momentum): stored with each checkpoint,
        so a record pointed at another component's (sound) blob is found."""
        sha = hashlib.sha256()
        for row in self._conn.execute("SELECT id, name, blob, momentum FROM components ORDER BY id"):
            sha.update(json.dumps(row).encode())
        return sha.hexdigest()

    def referenced_blobs(self) -> set[str]:
        rows = self._conn.execute("SELECT blob, momentum FROM components").fetchall()
        return {d for row in rows for d in row if d}

    def collect_garbage(self) -> int:
        """Deletes blobs no component references and temporary files of interrupted writes; returns the count.

        Trusts the component records: a caller that did not write them itself checks :meth:`records_intact` first.
        Waits for every agent of the run to exit first (their blobs are referenced only once they commit)."""
        self._require_write()
        if self.agent is not None:
            raise StoreError("an agent never collects garbage: other agents' blobs may be in flight")
        self._require_blob_folder()
        agents = [lock_file(self.dir, path.name, wait=True) for path in sorted(self.dir.glob(AGENT_LOCK.format("*")))]
        try:
            return self._collect_garbage()
        finally:
            for lock in agents:
                unlock_file(lock)

    def _collect_garbage(self) -> int:
        self.crash_point("collect")
        return self.blobs.collect(self.referenced_blobs())

    def records_intact(self) -> bool:
        """Whether the component records can be trusted to name every blob the run needs (a damaged, edited or
        swapped database's unreferenced blobs may be what restoring the run needs): each blob they reference is on
        disk and, outside agents runs (whose agents add records between the driver's checkpoints), they are
        the records the last checkpoint was written with (its components digest).

        Raises:
            StoreError: the blob folder is missing.
        """
        self._require_blob_folder()
        referenced = self.referenced_blobs()
        if any(not self.blobs.path(digest).is_file() for digest in referenced):
            return False
        return self.components_match(self.record("checkpoint") or {}) or bool(self.agent_records())

    def _require_blob_folder(self) -> None:
        if not self.blobs.folder.is_dir():
            raise StoreError(f"the blob folder {self.blobs.folder} is missing: the run's weights are gone; restore the "
                             f"run from a copy (`munet check {self.dir}` lists what is missing)")

    def components_match(self, checkpoint: dict[str, Any]) -> bool:
        """Whether the component records are those ``checkpoint`` was written with (its components digest; a store
        made before the digest was recorded matches)."""
        bound = checkpoint.get("components_digest")
        return bound is None or bound == self.components_digest()

    # --- transactions -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic transaction; the WAL is folded back into the database after it commits."""
        self._require_write()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            yield
            self.crash_point("commit")
            self._conn.execute("COMMIT")
        except BaseException as err:
            with contextlib.suppress(sqlite3.Error):  # SQLite may have rolled back itself (it does on a full disk)
                self._conn.execute("ROLLBACK")
            if isinstance(err, sqlite3.OperationalError) and _busy(err):  # munet's own writers hold munet.lock
                raise StoreError(f"cannot write the run database {self.dir / DB_NAME}: {err}: another program (not "
                                 "munet) holds it open in a transaction, e.g. an sqlite3 shell or a database "
                                 "browser. Nothing of this checkpoint was kept: the run's last complete checkpoint "
                                 "is intact. Close that program, then run the same command again") from err
            if isinstance(err, sqlite3.OperationalError):  # disk full, I/O error, permissions
                raise StoreError(f"cannot write the run database in {self.dir}: {err}. {_KEPT}") from err
            raise
        # keeps the run directory at its real size (the WAL otherwise grows to ~4 MB before SQLite folds it); the
        # transaction is durable in the WAL already, so a fold that fails (a full disk) is retried by the next one.
        # Agents fold what they can without waiting for other connections' readers (PASSIVE). Nor does the run's
        # writer wait: a reader (`munet predict`, `serve`) holds its snapshot while it reads, and the fold would
        # stall training until it finished; the next commit folds what a reader held back
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA busy_timeout = 0")
            self._conn.execute(f"PRAGMA wal_checkpoint({'TRUNCATE' if self.agent is None else 'PASSIVE'})")
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute(f"PRAGMA busy_timeout = {database.BUSY_TIMEOUT_S * 1000}")

    def crash_point(self, name: str) -> None:
        """Test hook: with ``MUNET_CRASH_AT=<name>:<n>`` the process kills itself the n-th time it gets here."""
        spec = os.environ.get(CRASH_ENV, "")
        point, _, count = spec.partition(":")
        if point != name:
            return
        self._crash_counts[name] = self._crash_counts.get(name, 0) + 1
        if self._crash_counts[name] == int(count or 1):
            os.kill(os.getpid(), 9)

    def _require_write(self) -> None:
        if self._lock is None:
            raise StoreError(f"the store of {self.dir} was opened read-only")

    # --- sizes --------------------------------------------------------------------------------------------------
    def missing_blobs(self) -> int:
        """How many blobs the records reference that are not on disk (``munet check`` says which); those a
        checkpoint committed meanwhile no longer references (it deletes their blobs after its commit) do not count.
        When any is missing, a reader's snapshot ends here."""
        missing = {digest for digest in self.referenced_blobs() if not self.blobs.path(digest).is_file()}
        if missing:  # those the newest commit still references (a reader's snapshot ends for it: the last read)
            self.end_snapshot()
            missing &= self.referenced_blobs()
        return len(missing)

    def sizes(self) -> dict[str, int]:
        """Bytes on disk: the database (with its WAL) and the blobs."""
        db = sum(p.stat().st_size for p in self.dir.glob(DB_NAME + "*") if p.is_file())
        blobs = self.blobs.size()
        return {"database": db, "blobs": blobs, "total": db + blobs}


def _begin_snapshot(conn: sqlite3.Connection) -> int:
    """Starts the one read transaction of a reader, so that all its reads see one commit: a run in progress commits
    between them otherwise (a path of the newest checkpoint beside the component records of the one before).
    Returns SQLite's ``data_version`` (it changes when another connection commits)."""
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot is taken at the first read
    return conn.execute("PRAGMA data_version").fetchone()[0]


def read_run(run_dir: str | FsPath, read: Callable[[Store], T], **open_args: Any) -> T:
    """``read(store)`` on a reader of the run in ``run_dir`` (``open_args``: see :meth:`Store.open`). A StoreError
    raised on a snapshot a writer has since moved past (a run in progress deletes the blobs its newer checkpoint no
    longer references) is read again on the newer one, up to :data:`READ_ATTEMPTS` times; any other stands."""
    attempt = 1
    while True:
        with Store.open(run_dir, **open_args) as store:
            try:
                return read(store)
            except StoreError:
                if attempt == READ_ATTEMPTS or not store.end_snapshot():
                    raise
        attempt += 1


def owned_by_store(path: FsPath) -> bool:
    """Whether ``path`` names a file the store of a run directory owns, which nothing else may write: the database
    and its SQLite sidecars, the lock files, anything in its blob folder."""
    run_dir = path.parent.parent if path.parent.name == BLOB_DIR else path.parent
    if not (run_dir / DB_NAME).exists():
        return False
    return (path.parent.name == BLOB_DIR or path.name.startswith(DB_NAME) or path.name == LOCK_NAME
            or fnmatch.fnmatch(path.name, AGENT_LOCK.format("*")))


def _busy(err: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused a write because another connection held the database past the busy timeout."""
    return (getattr(err, "sqlite_errorname", None) or "").startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))


_KEPT = ("Nothing of this checkpoint was kept: the run's last complete checkpoint is intact. Free space (or fix the "
         "permissions), then run the same command again")

