"""The run database file: its schema, how it is opened, and what tells a run's database from anything else.

:mod:`munet.storage.store` is the one module that reads and writes its records; this module only makes, opens and
classifies the file (a run, an interrupted creation, damage), so that the store's record queries read top-down.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path as FsPath
from urllib.parse import quote, urlencode

from munet import __version__
from munet.errors import StoreError

SCHEMA_VERSION = 1
DB_NAME = "munet.db"
BLOB_DIR = "blobs"  # beside the database: the content-addressed blobs (see munet.storage.store)
BUSY_TIMEOUT_S = 30  # how long a connection waits for another's lock (agents' writes wait for each other)
# What reading a damaged database raises: SQLite's errors (a malformed file, text that is not UTF-8) and records
# that are no longer JSON.
DAMAGE_ERRORS = (sqlite3.DatabaseError, json.JSONDecodeError, UnicodeDecodeError)

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
CREATE TABLE tasks (name TEXT PRIMARY KEY, position INTEGER NOT NULL, num_classes INTEGER NOT NULL,
                    class_names TEXT NOT NULL, description TEXT NOT NULL);
CREATE TABLE paths (id INTEGER PRIMARY KEY, task TEXT NOT NULL, parent INTEGER, iteration INTEGER,
                    generation INTEGER, components TEXT NOT NULL, hparams TEXT NOT NULL, mutations TEXT,
                    metrics TEXT NOT NULL, accepted INTEGER, reason TEXT, quality REAL, test_quality REAL,
                    score REAL, params INTEGER, accounted REAL, train_time REAL, recorded_at REAL);
CREATE TABLE components (id INTEGER PRIMARY KEY, name TEXT NOT NULL, origin TEXT NOT NULL, locks TEXT NOT NULL,
                         shape TEXT NOT NULL, tensors TEXT NOT NULL, num_params INTEGER NOT NULL,
                         blob TEXT NOT NULL, momentum TEXT);
CREATE TABLE live (path_id INTEGER PRIMARY KEY, link INTEGER, rank INTEGER);
CREATE TABLE agents (task TEXT PRIMARY KEY, cycle INTEGER NOT NULL, path_id INTEGER, state TEXT NOT NULL,
                     published_at REAL NOT NULL);
"""
# paths: every path ever sampled; components: every component the in-memory system holds (with its blob);
# live: the paths the system holds, i.e. each task's population (rank = position) and, during a task iteration,
# the ancestors still reachable through parent links (rank NULL); link is the current parent.
# agents: each µ3Net agent's last publication: cycles done, its retained path (NULL: none) and its own state (id
# counters, position-embedding cache, the path's parent link); absent from stores made before agents existed.
PATH_COLUMNS = ("id", "task", "parent", "iteration", "generation", "components", "hparams", "mutations", "metrics",
                "accepted", "reason", "quality", "test_quality", "score", "params", "accounted", "train_time",
                "recorded_at")
# what moves on after a path's generation (offspring counts, test accuracy, accounted parameters)
UPDATED_PATH_COLUMNS = ("metrics", "mutations", "quality", "test_quality", "score", "params", "accounted")
# the tables every run has; ``agents`` is not among them: stores made before agents existed lack it
TABLES = ("meta", "tasks", "paths", "components", "live")


def uri(db: FsPath, **params: str) -> str:
    """A SQLite URI for ``db``. The path is percent-encoded: unescaped, a ``?``, ``#`` or ``%`` in a directory name
    would end the path or start an escape, and SQLite would open (or create) another file."""
    return f"file://{quote(str(db.absolute()))}?{urlencode(params)}"


def connect(db: FsPath, create: bool) -> sqlite3.Connection:
    """Opens ``db`` for writing, in WAL mode with full sync (a commit survives a power cut), creating the file only
    when ``create``."""
    mode = "rwc" if create else "rw"  # never create a database by accident when opening one
    try:
        conn = sqlite3.connect(uri(db, mode=mode), uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as err:
        raise StoreError(f"cannot open the run database {db}: {err}") from err
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as err:
        conn.close()
        raise StoreError(f"cannot open the run database {db}: {err}") from err
    return conn


def create(db: FsPath) -> sqlite3.Connection:
    """A new database at ``db`` holding the empty tables, open for writing; one transaction, so a crash leaves
    either no tables or all of them."""
    conn = connect(db, create=True)
    try:
        conn.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
    except sqlite3.Error as err:
        conn.close()
        raise StoreError(f"cannot create the run database {db}: {err}") from err
    return conn


def sidecars(db: FsPath) -> tuple[FsPath, FsPath]:
    """The WAL and shared-memory index files SQLite keeps beside ``db`` (``-wal``, ``-shm``)."""
    return db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")


def run_database(run_dir: FsPath) -> FsPath:
    """The database file of the run directory ``run_dir``, once it is there and is a file.

    Raises:
        StoreError: ``run_dir`` is missing (or a dangling link), a file, or holds no database file (with a blob
            folder: the database of a run is missing, else it is no run directory).
    """
    db = run_dir / DB_NAME
    if run_dir.is_symlink() and not run_dir.exists():
        raise StoreError(f"{run_dir} is a symbolic link to {os.readlink(run_dir)}, which does not exist")
    if not run_dir.exists():
        raise StoreError(f"{run_dir} does not exist")
    if not run_dir.is_dir():
        hint = f"; pass its directory {run_dir.parent}" if run_dir.name == DB_NAME else ""
        raise StoreError(f"{run_dir} is a file, not a run directory{hint}")
    if not db.exists():
        what = "its database is missing" if (run_dir / BLOB_DIR).is_dir() else "it is not a munet run directory"
        raise StoreError(f"{run_dir} holds no {DB_NAME}: {what}")
    if not db.is_file():  # SQLite says "disk I/O error"
        raise StoreError(f"{db} is a directory or a special file, not the run's database; restore the run from a "
                         "copy")
    return db


def connect_readonly(db: FsPath) -> sqlite3.Connection:
    """Opens ``db`` for reading only: SQLite's ``mode=ro`` never writes the database (an empty file stays empty).

    A WAL database read with ``mode=ro`` still needs its ``-shm`` index, which SQLite creates beside the database
    (with an empty ``-wal``) when it is missing; a read-only directory cannot hold them. There, with no WAL content
    to read, ``immutable=1`` tells SQLite that nothing can change the file, so it reads it without any index or
    lock, which is true of read-only media. A WAL holding transactions that were never folded back (a crash) is
    still readable with ``mode=ro`` when its ``-shm`` is there too; without it the run must be copied to writable
    storage first.
    """
    wal, shm = sidecars(db)
    params = {"mode": "ro"}
    if not os.access(db.parent, os.W_OK) and not (wal.exists() and shm.exists()):
        if wal.exists() and wal.stat().st_size > 0:
            raise StoreError(f"{db}: its last transactions are in {wal.name}, which SQLite cannot read without "
                             f"{shm.name}, and the directory is read-only; copy the run directory to writable "
                             "storage and read it there")
        params["immutable"] = "1"
    try:
        return sqlite3.connect(uri(db, **params), uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as err:
        raise StoreError(f"cannot open the run database {db}: {err}") from err


def check_version(conn: sqlite3.Connection, db: FsPath, require_checkpoint: bool = True,
                  has_blobs: bool = False) -> None:
    """Raises StoreError unless ``db`` is a run database this munet reads; ``has_blobs``: the run directory holds
    blobs (so an empty database is a run's lost records, not a directory that never held a run)."""
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        raise StoreError(f"{db} is not a readable munet database: {err}; it is damaged or not a munet database: "
                         "restore the run from a copy") from err
    if version == 0 and not tables and has_blobs:
        raise StoreError(f"{db.parent} holds blobs but its database {db.name} is empty: the run's records are lost; "
                         f"restore {db.name} from a copy of the run")
    if version == 0 and not tables:
        raise StoreError(f"{db.parent} is not a munet run (empty database {db.name}); delete {db} or choose "
                         "another directory")
    if version == 0 and not set(TABLES) & tables:  # munet writes its schema version with its tables
        raise StoreError(f"{db} is not a munet run database (a SQLite database of other tables: "
                         f"{', '.join(sorted(tables)[:5])}); pass the directory of a munet run, or restore its "
                         f"{db.name} from a copy")
    if version != SCHEMA_VERSION:
        raise StoreError(f"{db} was written by an incompatible munet version (store schema {version}; munet "
                         f"{__version__} reads schema {SCHEMA_VERSION}); use the munet version that wrote it")
    missing = set(TABLES) - tables
    if missing:
        raise StoreError(f"{db} is incomplete: tables {', '.join(sorted(missing))} are missing")
    if not require_checkpoint:
        return
    # the first checkpoint writes these records in one transaction: one without the others means damage
    first = {r[0] for r in conn.execute("SELECT key FROM meta WHERE key IN ('checkpoint', 'config', 'root', 'plan')")}
    if "checkpoint" not in first and not has_records(conn):
        raise StoreError(f"{db} holds no checkpoint: the run's creation was interrupted; run the same `munet run` "
                         "again to start it afresh")
    if len(first) < 4:
        raise StoreError(damaged_message(db))


def has_records(conn: sqlite3.Connection) -> bool:
    """Whether any table holds a row; the creation transaction makes them all empty, the first checkpoint fills
    them all in one transaction, so rows without a checkpoint mean damage, not an interrupted creation."""
    return any(conn.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() for t in TABLES)


def damaged_message(db: FsPath) -> str:
    return (f"{db} holds a run's records but no checkpoint record: the database is damaged (this is not an "
            f"interrupted creation), so munet neither resumes nor replaces it; inspect it with `munet check "
            f"{db.parent}`, and to start afresh delete {db.parent} yourself or choose another directory")


def db_state(db: FsPath) -> str:
    """What ``db`` holds: ``absent``, ``empty`` (no tables), ``interrupted`` (the tables, no record),
    ``committed`` (a checkpoint), ``damaged`` (records without a checkpoint) or ``unreadable``."""
    if not db.exists():
        return "absent"
    try:
        conn = connect_readonly(db)
    except StoreError:
        return "unreadable"
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            return "empty"
        if not set(TABLES) <= tables:
            return "unreadable"  # opening it says what is wrong
        if conn.execute("SELECT 1 FROM meta WHERE key = 'checkpoint'").fetchone() is not None:
            return "committed"
        return "damaged" if has_records(conn) else "interrupted"
    except sqlite3.Error:
        return "unreadable"  # present but unreadable: opening it reports why; never overwrite it
    finally:
        conn.close()
