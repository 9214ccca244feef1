"""Faults and hostile input (issue 11): nothing lost, no traceback, no unbounded allocation, read-only commands that
read only. Every case asserts the exit status, a message naming the problem and, where a store is involved, that
the store is unchanged."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3

import pytest
from conftest import make_run, make_task, make_tiny_root

from munet.cli import main
from munet.errors import StoreError
from munet.storage.check import check_store
from munet.storage.store import BLOB_DIR, DB_NAME, LOCK_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("faults") / "run"
    make_run(out)
    return out


def _copy(run_dir, target):
    shutil.copytree(run_dir, target)
    return target


def _files(run_dir) -> dict[str, str]:
    """Content hash of every file of a run directory but the lock (it only names the last writer) and SQLite's WAL
    index and empty WAL, which a reader may create and the next writer removes (they hold no data)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != LOCK_NAME
            and not p.name.endswith("-shm") and not (p.name.endswith("-wal") and p.stat().st_size == 0)}


def _error(capsys, argv: list[str], status: int = 2) -> str:
    """Runs the CLI, expecting ``status`` and an ``error:`` line without a traceback; returns stderr."""
    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def _cli_run(monkeypatch: pytest.MonkeyPatch, out, *extra: str) -> int:
    """``munet run`` of the tiny configuration of ``make_run`` (tiny root, synthetic tasks) through the CLI."""
    monkeypatch.setattr("munet.runner.load_root", lambda spec, depth=None: make_tiny_root(depth or 3))
    monkeypatch.setattr("munet.runner.load_tasks", lambda specs, seed, data_dir, stream: {
        n: make_task(n, 3 - i, seed=i + 1) for i, n in enumerate(specs)})
    return main(["run", "--out", str(out), "--set", "tasks=a,b", "--root", "tiny", "--depth", "3", "--image-size", "8",
                 "--max-image-size", "12", "--children-per-task", "2", "--generation-size", "2",
                 "--steps-between-validations", "2", "--validations", "1", "--max-val-examples", "48",
                 "--batch-size", "16", "--device", "cpu", *extra])


# --- 1. data lost ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["q?x", "h#x", "p%41x", "sp ace"])
def test_output_paths_are_never_read_as_uris(tmp_path, name):
    out = tmp_path / name
    make_run(out, children_per_task=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no sibling database `q`, `h` or `pAx`
    assert (out / DB_NAME).is_file() and check_store(out).problems == []
    other = tmp_path / (name[:-1] + "y")  # `q?y` once opened the database of `q?x`
    make_run(other, children_per_task=2, seed=1)
    assert check_store(other).problems == [] and (other / DB_NAME).is_file()


def test_complete_run_without_its_checkpoint_row_is_never_deleted(run_dir, tmp_path, capsys, monkeypatch):
    run = _copy(run_dir, tmp_path / "run")
    with sqlite3.connect(run / DB_NAME) as db:
        db.execute("DELETE FROM meta WHERE key = 'checkpoint'")
    db.close()
    before = _files(run)
    with pytest.raises(StoreError, match="damaged"):
        make_run(run)  # the same `munet run` once deleted its paths and blobs as an "interrupted creation"
    assert "damaged" in _error(capsys, ["resume", str(run)])
    assert "damaged" in _error(capsys, ["status", str(run)])
    assert main(["check", str(run)]) == 1  # check opens it anyway and reports the damage
    assert "no 'checkpoint' record" in capsys.readouterr().out
    assert _files(run) == before


def test_interrupted_creation_still_starts_afresh(tmp_path):
    from munet.storage.store import Store

    Store.create(tmp_path / "run").close()  # the schema committed, the first checkpoint not
    (tmp_path / "run" / BLOB_DIR / ("0" * 64 + ".safetensors")).write_bytes(b"root blob of the interrupted creation")
    make_run(tmp_path / "run", children_per_task=2)
    assert check_store(tmp_path / "run").problems == []
