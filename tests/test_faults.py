"""Faults and hostile input (issue 11): nothing lost, no traceback, no unbounded allocation, read-only commands that
read only. Every case asserts the exit status, a message naming the problem and, where a store is involved, that
the store is unchanged."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess

import pytest
import torch
from conftest import TINY_ROOT, Crash, crashing_store, make_run, tiny_vit
from conftest import cli_error as _error
from conftest import run_files as _files
from timm.models import register_model

from munet.cli import build_config, main, make_parser
from munet.errors import MunetError, StoreError
from munet.runner import run
from munet.storage.check import check_store
from munet.storage.store import BLOB_DIR, DB_NAME, LOCK_NAME, Store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("faults") / "run"
    make_run(out)
    return out


def _copy(run_dir, target):
    shutil.copytree(run_dir, target)
    return target


@register_model
def munet_tiny_nan(pretrained: bool = False, **kwargs) -> torch.nn.Module:
    """``random:munet_tiny_nan``: the tiny test ViT with one NaN weight."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = tiny_vit(**kwargs)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    return model


def _cli_argv(out, *extra: str, root: str = TINY_ROOT) -> list[str]:
    """``munet run`` of a tiny configuration (tiny root, synthetic tasks a and b, one generation per task)."""
    return ["run", "--out", str(out), "--set", "tasks=a,b", "--root", root, "--depth", "3", "--image-size", "8",
            "--max-image-size", "12", "--children-per-task", "2", "--generation-size", "2",
            "--steps-between-validations", "2", "--validations", "1", "--max-val-examples", "48",
            "--batch-size", "16", "--device", "cpu", *extra]


def _cli_run(out, *extra: str, root: str = TINY_ROOT) -> int:
    """The tiny ``munet run`` of :func:`_cli_argv` through the CLI."""
    return main(_cli_argv(out, *extra, root=root))


def _run_with_store(argv: list[str], store_class: type[Store]) -> None:
    """The run of the ``munet run`` command ``argv``, in-process with a fault-injecting ``store_class`` (which the
    command line cannot pass)."""
    run(build_config(make_parser().parse_args(argv)), io.StringIO(), store_class=store_class)


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


def test_complete_run_without_its_checkpoint_row_is_never_deleted(run_dir, tmp_path, capsys):
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


def test_a_damaged_database_costs_no_blob_when_opened_for_writing(run_dir, tmp_path, capsys):
    """Records that name a blob which is not there (edited, or another run's database put in place of the run's):
    resume, add-task and run refuse and delete nothing. Opening for writing once collected every blob those records
    did not name (the task heads among them) before anything found the damage."""
    run = _copy(run_dir, tmp_path / "run")
    with sqlite3.connect(run / DB_NAME) as db:
        db.execute("UPDATE components SET blob = ? WHERE origin = 'a'", ("0" * 64,))
    db.close()
    before = _files(run)
    for argv in (["resume", str(run)], ["add-task", str(run), "c"], _cli_argv(run)):
        _error(capsys, argv)
        assert _files(run) == before, argv
    shutil.rmtree(run)
    run = _copy(run_dir, tmp_path / "run")
    with sqlite3.connect(run / DB_NAME) as db:  # a sound blob, another component's: only the digest tells
        blobs = dict(db.execute("SELECT name, blob FROM components WHERE origin = 'root'"))
        db.execute("UPDATE components SET blob = ? WHERE name = 'block_2' AND origin = 'root'", (blobs["block_1"],))
    db.close()
    before = _files(run)
    assert "points at another blob" in _error(capsys, ["resume", str(run)])
    assert _files(run) == before  # block_2's blob, which the edit left unreferenced, is still there
    make_run(tmp_path / "other", seed=1)
    shutil.copyfile(tmp_path / "other" / DB_NAME, run / DB_NAME)  # its heads' blobs are not in this run
    before = _files(run)
    err = _error(capsys, ["resume", str(run)])
    assert "is missing or unreadable" in err and "restore the run from a copy (`munet check" in err
    assert _files(run) == before


def test_a_database_another_program_holds_is_named(run_dir, tmp_path):
    """An sqlite3 shell inside a write transaction: the message says so, not "free space (or fix the permissions)"."""
    run = _copy(run_dir, tmp_path / "run")
    holder = sqlite3.connect(run / DB_NAME, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with Store.open(run, write=True) as store:
            store._conn.execute("PRAGMA busy_timeout = 50")  # a command waits 30 s
            with pytest.raises(StoreError, match=r"another program \(not munet\) holds it open") as refused:
                with store.transaction():
                    store.put("wall_time_s", 1.0)
    finally:
        holder.close()
    assert "Free space" not in str(refused.value)
    assert check_store(run).problems == []


def test_interrupted_creation_still_starts_afresh(tmp_path):
    Store.create(tmp_path / "run").close()  # the schema committed, the first checkpoint not
    (tmp_path / "run" / BLOB_DIR / ("0" * 64 + ".safetensors")).write_bytes(b"root blob of the interrupted creation")
    make_run(tmp_path / "run", children_per_task=2)
    assert check_store(tmp_path / "run").problems == []


# --- 2. tracebacks and unbounded memory -----------------------------------------------------------------------------
@pytest.mark.parametrize("flags, match", [
    (["--seed=-1"], r"seed must be in \[0, 2\^63\)"),
    ([f"--seed={2**63}"], r"seed must be in \[0, 2\^63\)"),
    (["--image-size", "4200", "--max-image-size", "4200"], "max_image_size must be <= 1024 pixels"),
    (["--image-size", "4200"], "image_size 4200 exceeds max_image_size"),
])
def test_config_numbers_are_range_checked_before_anything_is_allocated(tmp_path, capsys, flags, match):
    err = _error(capsys, ["run", "--out", str(tmp_path / "run"), *flags])
    assert re.search(match, err), err
    assert not (tmp_path / "run").exists()


def test_config_file_that_is_not_utf8(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_bytes('tasks = ["caf\u00e9"]\n'.encode("latin-1"))
    err = _error(capsys, ["run", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert "is not UTF-8" in err and str(cfg) in err


def test_huge_npz_label_is_refused_before_naming_classes(tmp_path, capsys):
    import numpy as np

    x = np.zeros((20, 8, 8), np.uint8)
    y = np.arange(20) % 2
    y[3] = 2**40  # once built 2**40 class names until the kernel killed the process
    np.savez(tmp_path / "big.npz", x=x, y=y)
    err = _error(capsys, ["run", "--out", str(tmp_path / "run"), "--tasks", f"npz:{tmp_path / 'big.npz'}",
                          "--root", TINY_ROOT, "--depth", "3", "--image-size", "8", "--device", "cpu"])
    assert f"label {2**40} is out of range" in err and "big.npz" in err


def test_huge_split_range_is_refused_before_building_it(tmp_path):
    import numpy as np

    from munet.data.registry import load_task
    from munet.errors import DataError

    np.savez(tmp_path / "t.npz", x=np.zeros((30, 8, 8), np.uint8), y=np.arange(30) % 3)
    with pytest.raises(DataError, match=r"'0-1000000000' is out of range; the task has 3 classes"):
        load_task(f"split:npz:{tmp_path / 't.npz'}:0-1000000000", 0)  # once built a set of 10^9 ints first
    assert load_task(f"split:npz:{tmp_path / 't.npz'}:1-2", 0).num_classes == 2


@pytest.mark.parametrize("top", ["0", "-1"])
def test_predict_top_must_be_positive(run_dir, tmp_path, capsys, top):
    from PIL import Image

    Image.new("L", (12, 12)).save(tmp_path / "x.png")
    err = _error(capsys, ["predict", str(run_dir), "--task", "a", f"--top={top}", str(tmp_path / "x.png")])
    assert "--top must be >= 1" in err


@contextlib.contextmanager
def _mounted(target, *options: str):
    """``mount OPTIONS... target`` for the block, or the test is skipped with the reason the machine gives."""
    target.mkdir(exist_ok=True)
    try:
        done = subprocess.run(["mount", *options, str(target)], capture_output=True, text=True)
    except OSError as err:
        pytest.skip(f"no mount command here: {err}")
    if done.returncode != 0:
        pytest.skip(f"this machine cannot mount {' '.join(options)} (needs root): {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def _fill(folder) -> None:
    """Fills the file system of ``folder`` to the last byte."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)


def _results(run) -> list[tuple]:
    from munet.reporting.status import run_status

    return [(t["task"], t["path"], t["score"], t["test_acc"]) for t in run_status(run)["tasks"]]


def _filling_store(mount, where: str, nth: int) -> type[Store]:
    """A :class:`Store` class that fills the file system of ``mount`` just before the ``nth`` checkpoint's first
    write: its first new blob (``where="blob"``; its transaction if it writes no blob) or, after its blobs, its
    transaction (``"database"``). A checkpoint is one transaction, after its blobs."""

    class FillingStore(Store):
        transactions = 0  # begun, by the stores of this class
        filled = False

        def write_blob(self, tensors: dict[str, torch.Tensor]) -> str:
            self._fill_if(where == "blob" and FillingStore.transactions == nth - 1)
            return super().write_blob(tensors)

        @contextlib.contextmanager
        def transaction(self):
            FillingStore.transactions += 1
            self._fill_if(FillingStore.transactions == nth)
            with super().transaction():
                yield

        def _fill_if(self, due: bool) -> None:
            if due and not FillingStore.filled:
                FillingStore.filled = True
                _fill(mount)

    return FillingStore


@pytest.mark.parametrize("where, nth", [("blob", 1), ("blob", 2), ("blob", 4), ("database", 3)])
def test_disk_full_during_a_checkpoint(tmp_path, capsys, where, nth):
    """A real ENOSPC (a small tmpfs filled up) at the n-th checkpoint: a MunetError (the command line's `error:`,
    exit 2) naming the cause, the last complete checkpoint intact, and the same command finishes the run once there
    is space, with the uninterrupted results."""
    assert _cli_run(tmp_path / "ref") == 0
    capsys.readouterr()
    mount = tmp_path / "small"
    with _mounted(mount, "-t", "tmpfs", "-o", "size=8m", "tmpfs"):
        out = mount / "run"
        with pytest.raises(MunetError) as failed:
            _run_with_store(_cli_argv(out), _filling_store(mount, where, nth))
        err = str(failed.value)
        assert ("No space left on device" in err or "disk is full" in err) and "last complete checkpoint" in err
        assert not list((out / BLOB_DIR).glob("*.tmp")) if out.exists() else True  # no partial blob holds space
        if nth == 1:  # the first checkpoint failed: nothing to keep, nothing left
            assert not (out / DB_NAME).exists()
        else:
            assert check_store(out).problems == []
            with Store.open(out) as store:
                assert store.get("plan")["done"] < 2  # the run stopped at the last checkpoint that fitted
        (mount / "filler").unlink()
        assert _cli_run(out) == 0  # the same command resumes (or starts afresh)
        assert check_store(out).problems == [] and _results(out) == _results(tmp_path / "ref")


@pytest.mark.parametrize("task", ["a", "all"])
def test_an_export_on_a_full_disk_leaves_nothing(run_dir, tmp_path, capsys, task):
    """An export that runs out of space (a real ENOSPC on a small tmpfs) is `error:` naming the cause; the folders it
    created are gone again (they were left empty), while a folder the user made and an earlier export it was to
    replace stay as they were."""
    assert main(["export", str(run_dir), "--task", task, "--out", str(tmp_path / "earlier")]) == 0
    earlier = {p.name: p.read_bytes() for p in (tmp_path / "earlier").iterdir()}
    room = sum(len(data) for data in earlier.values()) * 3 // 2  # one export fits, a second beside it does not
    mount = tmp_path / "small"
    with _mounted(mount, "-t", "tmpfs", "-o", f"size={room}", "tmpfs"):
        shutil.copytree(tmp_path / "earlier", mount / "earlier")
        (mount / "mine").mkdir()
        for out in (mount / "exports" / task, mount / "mine", mount / "earlier"):
            assert "No space left on device" in _error(capsys, ["export", str(run_dir), "--task", task, "--out",
                                                                str(out)]), out
        assert sorted(p.name for p in mount.iterdir()) == ["earlier", "mine"] and not any((mount / "mine").iterdir())
        assert {p.name: p.read_bytes() for p in (mount / "earlier").iterdir()} == earlier


def test_os_error_while_writing(tmp_path, capsys):
    """An OSError from the machine (here EISDIR: the summary's temporary file cannot be opened, after the last
    checkpoint; root may write anywhere, so a permission cannot stand in for it) is `error:`, exit 2."""
    (tmp_path / "run" / "summary.json.tmp").mkdir(parents=True)
    assert _cli_run(tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Is a directory: ") and "summary.json.tmp" in err and "Traceback" not in err
    assert check_store(tmp_path / "run").problems == []


def test_a_rename_that_fails_names_both_paths(tmp_path, capsys):
    """A folder where the summary goes: the error once named only the temporary file, as if it were in the way."""
    make_run(tmp_path / "run", children_per_task=2)
    (tmp_path / "run" / "summary.json").unlink()
    (tmp_path / "run" / "summary.json").mkdir()
    err = _error(capsys, ["resume", str(tmp_path / "run")])
    assert f"summary.json.tmp -> {tmp_path / 'run' / 'summary.json'}" in err


# --- 3. valid input refused: read-only storage ----------------------------------------------------------------------
@contextlib.contextmanager
def _read_only(src, target):
    """``src`` seen read-only at ``target``: a read-only bind mount (root cannot write there either: EROFS); without
    root, a directory without write permission; else the test is skipped."""
    if os.geteuid() != 0:
        os.chmod(src, 0o555)
        try:
            yield src
        finally:
            os.chmod(src, 0o755)
        return
    with _mounted(target, "--bind", str(src)):
        done = subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"this machine cannot remount a bind mount read-only: {done.stderr.strip()}")
        assert not os.access(target, os.W_OK)
        yield target


@pytest.mark.parametrize("index", [False, True])
def test_read_only_commands_work_on_read_only_storage(run_dir, tmp_path, capsys, index):
    """``index``: SQLite's WAL index files are there (read with mode=ro), or not, as after the writer's last close
    (read with immutable=1)."""
    import munet

    src = _copy(run_dir, tmp_path / "src")
    (src / LOCK_NAME).unlink()  # a finished run copied to read-only media need not carry its lock file
    for name in (DB_NAME + "-wal", DB_NAME + "-shm"):
        (src / name).unlink(missing_ok=True)
    if index:
        reader = sqlite3.connect(f"file:{src / DB_NAME}?mode=ro", uri=True)
        reader.execute("SELECT 1 FROM meta").fetchone()
        reader.close()  # a read-only reader leaves the index behind
        assert (src / (DB_NAME + "-shm")).exists()
    from PIL import Image

    Image.new("L", (12, 12), 200).save(tmp_path / "x.png")
    before = _files(src)
    files = sorted(p.name for p in src.iterdir())
    with _read_only(src, tmp_path / "ro") as run:
        for argv in (["status", str(run)], ["history", str(run)], ["check", str(run)],
                     ["predict", str(run), "--task", "all", str(tmp_path / "x.png")],
                     ["export", str(run), "--task", "a", "--out", str(tmp_path / "export")]):
            assert main(argv) == 0, capsys.readouterr().err  # once "unable to open database file"
        assert "ok" in capsys.readouterr().out
        assert munet.load(run).tasks == ["a", "b"]
        err = _error(capsys, ["resume", str(run)])  # writing is refused with the reason
        assert "not writable" in err
    assert _files(src) == before and sorted(p.name for p in src.iterdir()) == files
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_unfolded_wal_on_read_only_storage_is_a_clear_error(run_dir, tmp_path, capsys):
    src = _copy(run_dir, tmp_path / "src")
    crashed = tmp_path / "crashed"
    conn = sqlite3.connect(src / DB_NAME)
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # the write stays in the WAL, as after a crash
    with conn:
        conn.execute("UPDATE meta SET value = '1.5' WHERE key = 'wall_time_s'")
    shutil.copytree(src, crashed, ignore=shutil.ignore_patterns("*-shm"))
    conn.close()
    assert (crashed / (DB_NAME + "-wal")).stat().st_size > 0
    with _read_only(crashed, tmp_path / "ro") as run:
        err = _error(capsys, ["status", str(run)])
    assert "copy the run directory to writable storage" in err


def test_read_only_commands_change_nothing(run_dir, tmp_path, capsys):
    """Every read-only command leaves every byte of the store as it was: the database is opened with mode=ro."""
    run = _copy(run_dir, tmp_path / "run")
    before = _files(run)
    for argv in (["status", str(run)], ["history", str(run)], ["check", str(run)]):
        assert main(argv) == 0
    assert _files(run) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / DB_NAME).write_bytes(b"")
    for argv in (["status", str(empty)], ["check", str(empty)], ["history", str(empty)]):
        _error(capsys, argv)
    assert (empty / DB_NAME).read_bytes() == b"" and sorted(p.name for p in empty.iterdir()) == [DB_NAME]


# --- 4. misleading words --------------------------------------------------------------------------------------------
def test_empty_database_is_not_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / DB_NAME).write_bytes(b"")
    for argv in (["status", str(run)], ["check", str(run)], ["resume", str(run)]):
        err = _error(capsys, argv)
        assert "not a munet run (empty database" in err and "incompatible" not in err
    assert (run / DB_NAME).read_bytes() == b""  # `check` once rewrote it
    assert _cli_run(run) == 0  # an empty database holds nothing to lose: a new run may start there


def test_what_stands_in_for_the_database_or_its_lock_is_named(run_dir, tmp_path, capsys):
    """Another program's SQLite file once read "written by an incompatible munet version (store schema 0)", a folder
    "disk I/O error", an emptied database beside the run's blobs "not a munet run ... delete munet.db", and a folder
    named munet.lock "output directory ... is not writable"."""
    other = _copy(run_dir, tmp_path / "other")
    (other / DB_NAME).unlink()
    with sqlite3.connect(other / DB_NAME) as db:
        db.execute("CREATE TABLE notes (text)")
    db.close()
    folder = _copy(run_dir, tmp_path / "folder")
    (folder / DB_NAME).unlink()
    (folder / DB_NAME).mkdir()
    emptied = _copy(run_dir, tmp_path / "emptied")
    (emptied / DB_NAME).write_bytes(b"")
    text = _copy(run_dir, tmp_path / "text")
    (text / DB_NAME).write_bytes(b"not a database" * 100)
    locked = _copy(run_dir, tmp_path / "locked")
    (locked / LOCK_NAME).unlink()
    (locked / LOCK_NAME).mkdir()
    cases = {other: "is not a munet run database (a SQLite database of other tables: notes)",
             folder: "is a directory or a special file, not the run's database",
             emptied: "holds blobs but its database munet.db is empty: the run's records are lost; restore",
             text: "file is not a database; it is damaged or not a munet database: restore the run from a copy"}
    for damaged, words in cases.items():
        before = _files(damaged)
        for argv in (["status", str(damaged)], ["check", str(damaged)], ["resume", str(damaged)]):
            err = _error(capsys, argv)
            assert words in err and "incompatible" not in err and "I/O" not in err and "delete" not in err, err
        assert _files(damaged) == before
    err = _error(capsys, ["resume", str(locked)])
    assert f"{locked / LOCK_NAME} is a directory, where munet keeps the run's lock file" in err


@pytest.mark.parametrize("config, words", [
    ("json_set(value, '$.future_key', 1)", "the run's stored configuration has keys munet 0.1.0 does not know "
                                           "(future_key): the run was written by a newer munet"),
    ("'[1, 2]'", "record of {db} is a list, not an object: the database was damaged or edited"),
])
def test_a_stored_configuration_this_munet_cannot_read(run_dir, tmp_path, capsys, config, words):
    """A key of a newer munet once read as the user's typo ("unknown configuration key ...; known keys: ..."), and a
    configuration that is no object was a traceback (also in `check --data`, which passed it as sound)."""
    run = _copy(run_dir, tmp_path / "run")
    with sqlite3.connect(run / DB_NAME) as db:
        db.execute(f"UPDATE meta SET value = {config} WHERE key = 'config'")
    db.close()
    words = words.format(db=run / DB_NAME)
    before = _files(run)
    for argv in (["status", str(run)], ["resume", str(run)], ["export", str(run), "--task", "a", "--out",
                                                                 str(tmp_path / "e")]):
        err = _error(capsys, argv)
        assert words in err and "known keys" not in err, err
    for argv in (["check", str(run)], ["check", str(run), "--data"]):
        assert main(argv) == 1
        out = capsys.readouterr().out
        assert words in out and "1 problem(s)" in out, out
    assert _files(run) == before


def test_wrong_kind_of_path_is_named(run_dir, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    err = _error(capsys, ["predict", str(run_dir), "--task", "a", str(tmp_path / "images")])
    assert "is a directory, not an image file" in err
    (tmp_path / "file").write_text("x")
    assert "is a file, not a run directory" in _error(capsys, ["check", str(tmp_path / "file")])
    err = _error(capsys, ["status", str(run_dir / DB_NAME)])
    assert "is a file, not a run directory; pass its directory" in err
    assert "does not exist" in _error(capsys, ["check", str(tmp_path / "nothing")])


def test_relative_data_paths_are_stored_absolute(tmp_path, capsys, monkeypatch):
    import numpy as np

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("t.npz", "sub/u.npz"):
        np.savez(data / name, x=rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), y=np.arange(40) % 2)
    monkeypatch.chdir(data)
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--tasks", "npz:t.npz,split:npz:sub/u.npz:0-1", "--root", TINY_ROOT,
            "--depth", "3", "--image-size", "8",
            "--max-image-size", "8", "--children-per-task", "2", "--generation-size", "2",
            "--steps-between-validations", "1", "--validations", "1", "--batch-size", "8", "--device", "cpu"]
    assert main(argv) == 0
    with Store.open(out) as store:
        assert store.get("config")["tasks"] == [f"npz:{data / 't.npz'}", f"split:npz:{data / 'sub' / 'u.npz'}:0-1"]
    monkeypatch.chdir(tmp_path)
    assert main(["resume", str(out)]) == 0  # once "npz file t.npz does not exist"
    assert "is complete" in capsys.readouterr().out


# --- 5. silently wrong ----------------------------------------------------------------------------------------------
def test_replaced_task_data_is_refused_by_resume(tmp_path, capsys):
    import numpy as np

    from munet.data.registry import clear_cache

    rng = np.random.default_rng(0)
    arrays = {n: (rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), np.arange(40) % 2) for n in ("t", "u")}
    for name, (x, y) in arrays.items():
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--tasks", f"npz:{tmp_path / 't.npz'},npz:{tmp_path / 'u.npz'}",
            "--root", TINY_ROOT, "--depth", "3", "--image-size", "8", "--max-image-size", "8",
            "--children-per-task", "2", "--generation-size", "2", "--steps-between-validations", "1",
            "--validations", "1", "--batch-size", "8", "--device", "cpu"]
    with pytest.raises(Crash):
        _run_with_store(argv, crashing_store("commit", 3))
    x, y = arrays["u"]
    np.savez(tmp_path / "u.npz", x=255 - x, y=y)  # same shapes and labels, other images
    clear_cache()  # a new process would read the file again
    before = _files(out)
    err = _error(capsys, ["resume", str(out)])
    assert "the data of task u " in err and "is not the data the run" in err
    assert main(["check", str(out), "--data"]) == 1
    assert "problem: the data of task u " in capsys.readouterr().out
    assert _files(out) == before
    np.savez(tmp_path / "u.npz", x=x, y=y)
    clear_cache()
    assert main(["resume", str(out)]) == 0 and check_store(out, data=True).problems == []


def test_resume_verifies_the_root_blobs_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        _run_with_store(_cli_argv(out), crashing_store("commit", 3))
    with Store.open(out) as store:
        digest = next(r.blob for r in store.components() if r.name == "block_1" and r.origin == "root")
    store.blobs.path(digest).unlink()
    before = _files(out)
    err = _error(capsys, ["resume", str(out)])  # once trained to the end, leaving a store predict cannot read
    assert f"blob {digest}.safetensors of the root's block_1 is missing" in err
    assert _files(out) == before


def test_record_pointed_at_another_components_blob_is_found(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path / "run")
    with sqlite3.connect(run / DB_NAME) as db:  # two blocks of the root: the same shapes, both blobs sound
        blobs = dict(db.execute("SELECT name, blob FROM components WHERE origin = 'root'"))
        db.execute("UPDATE components SET blob = ? WHERE name = 'block_2' AND origin = 'root'", (blobs["block_1"],))
    db.close()
    assert main(["check", str(run)]) == 1  # once passed, and predict answered with the wrong weights
    assert "points at another blob" in capsys.readouterr().out
    from PIL import Image

    Image.new("L", (12, 12)).save(tmp_path / "x.png")
    assert "points at another blob" in _error(capsys, ["predict", str(run), "--task", "a", str(tmp_path / "x.png")])


def test_root_with_nan_weights_is_refused(tmp_path, capsys):
    # once exit 0 with every child discarded
    assert _cli_run(tmp_path / "run", root="random:munet_tiny_nan") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "NaN or infinite weights in blocks.1.mlp.fc1.weight" in err
    assert not (tmp_path / "run" / DB_NAME).exists()


def test_stores_without_fingerprints_or_digest_stay_readable(run_dir, tmp_path, capsys):
    """A store written before data fingerprints and the components digest existed loads, checks and predicts."""
    import json

    import munet

    run = _copy(run_dir, tmp_path / "run")
    with sqlite3.connect(run / DB_NAME) as db:
        ck = json.loads(db.execute("SELECT value FROM meta WHERE key = 'checkpoint'").fetchone()[0])
        del ck["components_digest"]
        db.execute("UPDATE meta SET value = ? WHERE key = 'checkpoint'", (json.dumps(ck),))
        db.execute("DELETE FROM meta WHERE key = 'data_fingerprints'")
    db.close()
    assert check_store(run).problems == [] and munet.load(run).tasks == ["a", "b"]


# --- generated bad input (seeded, so a failure reproduces) ----------------------------------------------------------
def _damage(rng, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.choice([1, 4, 32])):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data[: rng.randrange(1, len(data))] if rng.random() < 0.3 else data)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fuzz_damaged_database(run_dir, tmp_path, capsys, seed):
    """Random byte flips and truncations of munet.db: every read-only command answers (ok, problems, or `error:`),
    never a traceback (once: sqlite3.DatabaseError, JSONDecodeError, KeyError), and changes nothing."""
    import random

    from PIL import Image

    Image.new("L", (12, 12)).save(tmp_path / "x.png")
    rng = random.Random(seed)
    for case in range(20):
        run = _copy(run_dir, tmp_path / f"c{case}")
        (run / DB_NAME).write_bytes(_damage(rng, (run / DB_NAME).read_bytes()))
        before = _files(run)
        for argv in (["check", str(run)], ["status", str(run)], ["history", str(run)],
                     ["predict", str(run), "--task", "all", str(tmp_path / "x.png")]):
            status = main(argv)
            err = capsys.readouterr().err
            assert status in (0, 1, 2) and "Traceback" not in err, (case, argv, err)
            assert status != 2 or err.startswith("error: "), (case, argv, err)
        assert _files(run) == before, case


@pytest.mark.parametrize("table, column, value", [
    ("meta", "checkpoint", "null"), ("meta", "plan", '{"order": 5, "done": "x"}'), ("meta", "wall_time_s", '"x"'),
    ("meta", "data_fingerprints", "3"), ("paths", "hparams", "[1, 2]"), ("paths", "metrics", "3"),
    ("paths", "components", '"x"'), ("components", "locks", "3"), ("components", "shape", "[1, 2]"),
    ("tasks", "class_names", "3"),
])
def test_records_of_another_json_type_are_damage(run_dir, tmp_path, capsys, table, column, value):
    """A record (or a record's column) of another JSON type than munet writes, as a hand edit leaves it: every command
    that reads it answers `error:` (check: a problem) naming the record, where each was a traceback (TypeError,
    AttributeError, ValueError) in status, history, report, check, predict or resume."""
    from PIL import Image

    run = _copy(run_dir, tmp_path / "run")
    with sqlite3.connect(run / DB_NAME) as db:
        if table == "meta":
            db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, column))
        else:
            db.execute(f"UPDATE {table} SET {column} = ?", (value,))
    db.close()
    Image.new("L", (12, 12)).save(tmp_path / "x.png")
    before = _files(run)
    for argv in (["check", str(run)], ["check", str(run), "--data"], ["status", str(run)], ["history", str(run)],
                 ["report", str(run), "--out", str(tmp_path / "r.html")],
                 ["predict", str(run), "--task", "all", str(tmp_path / "x.png")], ["resume", str(run)]):
        if argv[0] == "resume":  # the read-only commands changed nothing
            assert _files(run) == before
        status = main(argv)
        out, err = capsys.readouterr()
        assert status in (0, 1, 2) and "Traceback" not in err, (argv, err)
        assert status != 2 or err.startswith("error: "), (argv, err)
        assert argv[0] != "check" or status == 1 and "problem: " in out, (argv, out)


def _more_layers(db, comps: dict, hparams: dict) -> str:
    hparams["num_layers"] = 9
    return "has 9 layers but no component for block_3"


def _unknown_slot(db, comps: dict, hparams: dict) -> str:
    comps["wibble"] = comps["block_0"]
    return "has a component slot 'wibble' that no munet layer has"


def _block_as_adapter(db, comps: dict, hparams: dict) -> str:
    comps["adapter_1"] = comps["block_0"]
    return "holds a block_0 component in its adapter_1 slot"


def _no_head(db, comps: dict, hparams: dict) -> str:
    del comps["head"]
    return "has 3 layers but no component for head"


def _image_size(db, comps: dict, hparams: dict) -> str:
    hparams["ds_image_size"] = 16  # the tiny root's patches are 4 px; no path of the run is at 16 px
    return "but its image size 16 px makes 17"


def _odd_image_size(db, comps: dict, hparams: dict) -> str:
    hparams["ds_image_size"] += 1  # the same tokens, but no whole number of 4 px patches: the model asserted
    return "not a whole number of the root's 4 px patches"


def _other_tasks_head(db, comps: dict, hparams: dict) -> str:
    import json

    heads = dict(db.execute("SELECT id, shape FROM components WHERE name = 'head'").fetchall())
    own = json.loads(heads[comps["head"]])["num_classes"]
    comps["head"] = next(cid for cid, shape in heads.items() if json.loads(shape)["num_classes"] != own)
    return f"classes, but its task has {own}"


@pytest.mark.parametrize("damage", [_more_layers, _unknown_slot, _block_as_adapter, _no_head, _image_size,
                                    _odd_image_size, _other_tasks_head])
def test_a_path_record_munet_cannot_build_is_a_store_error(run_dir, tmp_path, capsys, damage):
    """A damaged path record (more layers than blocks, a slot no layer has, a block in an adapter's slot, no head, an
    image size its position embedding does not fit, another task's head): `munet check` names it as a problem where
    it said ok, and report, export and predict name the path, exit 2, where each was a traceback (KeyError,
    AttributeError, RuntimeError) at the first forward or export; nothing changes."""
    import json

    from PIL import Image

    Image.new("L", (12, 12)).save(tmp_path / "x.png")
    run = _copy(run_dir, tmp_path / "run")
    with contextlib.closing(sqlite3.connect(run / DB_NAME)) as db, db:
        pid, task, comps, hparams = db.execute(
            "SELECT p.id, p.task, p.components, p.hparams FROM paths p JOIN live l ON l.path_id = p.id "
            "WHERE l.rank IS NOT NULL LIMIT 1").fetchone()
        comps, hparams = json.loads(comps), json.loads(hparams)
        expected = damage(db, comps, hparams)
        db.execute("UPDATE paths SET components = ?, hparams = ? WHERE id = ?",
                   (json.dumps(comps), json.dumps(hparams), pid))
    expected_path = f"path #{pid} ({task}) "
    before = _files(run)
    assert main(["check", str(run)]) == 1
    found = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"problem: {expected_path}")]
    assert len(found) == 1 and expected in found[0], found
    for argv in (["predict", str(run), "--task", "all", str(tmp_path / "x.png")],
                 ["export", str(run), "--task", task, "--out", str(tmp_path / "export")]):
        err = _error(capsys, argv)
        assert expected_path in err and expected in err, (argv, err)
    if damage not in (_image_size, _odd_image_size, _other_tasks_head):  # the report shows names and slots, no shapes
        err = _error(capsys, ["report", str(run), "--out", str(tmp_path / "r.html")])
        assert expected_path in err and expected in err, err
    assert _files(run) == before


@pytest.mark.parametrize("column", ["quality", "score"])
def test_a_population_path_without_a_score_is_a_store_error(run_dir, tmp_path, capsys, column):
    """A retained path whose quality or score was set to NULL by hand: history and report were a TypeError traceback
    and `munet check` said ok; now check names it and the readers say so, exit 2, nothing changed."""
    run = _copy(run_dir, tmp_path / "run")
    with contextlib.closing(sqlite3.connect(run / DB_NAME)) as db, db:
        pid, task = db.execute("SELECT p.id, p.task FROM paths p JOIN live l ON l.path_id = p.id "
                               "WHERE l.rank IS NOT NULL LIMIT 1").fetchone()
        db.execute(f"UPDATE paths SET {column} = NULL WHERE id = ?", (pid,))
    expected = f"path #{pid} ({task}) of {run} is in its task's population but has no {column}"
    before = _files(run)
    assert main(["check", str(run)]) == 1
    assert expected in capsys.readouterr().out
    for argv in (["history", str(run)], ["status", str(run)], ["report", str(run), "--out", str(tmp_path / "r.html")]):
        assert expected in _error(capsys, argv), argv
    assert _files(run) == before


@pytest.mark.parametrize("edit, expected", [
    ("UPDATE paths SET test_quality = 'n/a' WHERE id = {pid}", "holds test_quality 'n/a', not a number"),
    ("UPDATE paths SET params = 'many' WHERE id = {pid}", "holds params 'many', not a number"),
    ("UPDATE paths SET accounted = 'x' WHERE id = {pid}", "holds accounted 'x', not a number"),
    ("train_images", "holds train_images 'lots', not a number"),  # (status reads no lineage: it answers)
    ("UPDATE paths SET parent = id", "the parents of path(s) #"),  # history and report once looped, memory growing
])
def test_paths_edited_to_hold_no_number_or_a_loop_are_store_errors(run_dir, tmp_path, capsys, edit, expected):
    """Hand edits to the paths table that status, history and report met with a traceback (or an endless lineage
    walk) while `munet check` said ok: check names them, and the readers say so, exit 2, nothing changed."""
    run = _copy(run_dir, tmp_path / "run")
    with contextlib.closing(sqlite3.connect(run / DB_NAME)) as db, db:
        pid = db.execute("SELECT p.id FROM paths p JOIN live l ON l.path_id = p.id WHERE l.rank IS NOT NULL "
                         "LIMIT 1").fetchone()[0]
        if edit == "train_images":  # in the metrics JSON (which SQLite's json_set refuses: it may hold NaN)
            metrics = json.loads(db.execute("SELECT metrics FROM paths WHERE id = ?", (pid,)).fetchone()[0])
            db.execute("UPDATE paths SET metrics = ? WHERE id = ?", (json.dumps({**metrics, edit: "lots"}), pid))
        else:
            db.execute(edit.format(pid=pid))
    before = _files(run)
    assert main(["check", str(run)]) == 1
    assert expected in capsys.readouterr().out
    readers = [["history", str(run)], ["report", str(run), "--out", str(tmp_path / "r.html")]]
    for argv in readers + ([["status", str(run)]] if edit != "train_images" and "parent" not in edit else []):
        assert expected in _error(capsys, argv), argv
    assert _files(run) == before


@pytest.mark.parametrize("edit, expected", [
    ("UPDATE paths SET parent = 9999 WHERE id = (SELECT max(id) FROM paths)", "names parent #9999, which has no path"),
    ("UPDATE meta SET value = json_set(value, '$.done', 99) WHERE key = 'plan'", "counts 99 of its"),
])
def test_edits_check_once_called_sound(run_dir, tmp_path, capsys, edit, expected):
    run = _copy(run_dir, tmp_path / "run")
    with contextlib.closing(sqlite3.connect(run / DB_NAME)) as db, db:
        db.execute(edit)
    assert main(["check", str(run)]) == 1
    assert expected in capsys.readouterr().out


@pytest.mark.parametrize("quality", [None, "0.9", True])
def test_a_population_path_whose_metrics_hold_no_quality_is_a_store_error(run_dir, tmp_path, capsys, quality):
    """The metrics JSON of a retained path with its quality removed or of another type (a hand edit): munet.load
    scored it -inf without a word and predict answered from another path; now check names it and the readers
    that rebuild the system say so, exit 2, nothing changed."""
    import munet

    run = _copy(run_dir, tmp_path / "run")
    with contextlib.closing(sqlite3.connect(run / DB_NAME)) as db, db:
        pid, task, metrics = db.execute("SELECT p.id, p.task, p.metrics FROM paths p JOIN live l ON l.path_id = p.id "
                                        "WHERE l.rank IS NOT NULL LIMIT 1").fetchone()
        metrics = {k: v for k, v in json.loads(metrics).items() if k != "quality"}
        if quality is not None:
            metrics["quality"] = quality
        db.execute("UPDATE paths SET metrics = ? WHERE id = ?", (json.dumps(metrics), pid))
    expected = f"path #{pid} ({task}) is in its task's population but its metrics hold no quality"
    before = _files(run)
    assert main(["check", str(run)]) == 1
    assert expected in capsys.readouterr().out
    with pytest.raises(StoreError, match=re.escape(expected)):
        munet.load(run)
    for argv in (["export", str(run), "--task", task, "--out", str(tmp_path / "export")], ["resume", str(run)]):
        assert expected in _error(capsys, argv), argv
    assert _files(run) == before


def _random_array(rng, np):
    shape = tuple(int(rng.integers(0, 6)) for _ in range(int(rng.integers(0, 5))))
    kind = rng.choice(["u1", "f4", "i8", "bool", "U3"])
    if kind == "U3":
        return np.full(shape, "ab")
    if kind == "f4":
        return rng.choice([0.0, 0.5, 1.0, 2.0, np.nan, np.inf, -1.0], size=shape).astype(np.float32)
    if kind == "i8":
        return rng.choice([0, 1, 2, 255, 256, -1, 2**40], size=shape)
    return rng.integers(0, 2 if kind == "bool" else 256, size=shape).astype(kind)


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_bad_npz(tmp_path, seed):
    """Random arrays under the npz keys load or raise DataError naming the file; nothing else."""
    import numpy as np

    from munet.data.user import load_npz
    from munet.errors import DataError

    rng = np.random.default_rng(seed)
    loaded = 0
    for case in range(150):
        layouts = [["x", "y"], ["images", "labels"], ["x_train", "y_train", "x_test", "y_test"], ["x"]]
        keys = layouts[int(rng.integers(len(layouts)))]
        arrays = {k: _random_array(rng, np) for k in keys}
        if rng.random() < 0.5:  # often a plausible image array, so the labels get checked too
            arrays[keys[0]] = rng.integers(0, 256, (int(rng.integers(1, 30)), 4, 4)).astype(np.uint8)
        if rng.random() < 0.2:
            arrays["class_names"] = _random_array(rng, np)
        path = tmp_path / f"c{case}.npz"
        np.savez(path, **arrays)
        try:
            load_npz(path, seed=0)
            loaded += 1
        except DataError as err:
            assert str(path) in str(err), (case, err)
    assert loaded < 150  # the generator does make bad files


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_config_values(tmp_path, seed):
    """Random values for every key, as --set pairs and in TOML files: a valid config, or a ConfigError naming the
    key; never another exception."""
    import dataclasses
    import random

    from munet.cli import build_config, make_parser
    from munet.config import RunConfig
    from munet.errors import MunetError

    rng = random.Random(seed)
    keys = [f.name for f in dataclasses.fields(RunConfig)]
    values = ["-1", "0", "1", "0.5", "1e400", "-1e400", "nan", "inf", str(2**63), str(-(2**63)), "true", "x", "",
              "a,b", "4096", "1,2"]
    toml_values = ["-1", "0", "2", "0.5", "nan", "inf", str(2**63 - 1), '"x"', "[1, 2]", "{a = 1}", "true", "4096"]
    for case in range(100):
        key = rng.choice(keys)
        if rng.random() < 0.5:
            argv = ["run", "--set", f"{key}={rng.choice(values)}"]
        else:
            cfg = tmp_path / f"c{case}.toml"
            cfg.write_text(f"{key} = {rng.choice(toml_values)}\n")
            argv = ["run", "--config", str(cfg)]
        try:
            build_config(make_parser().parse_args(argv))
        except MunetError:
            pass


def test_repeated_class_names_and_classes_without_examples_are_warned_about(tmp_path):
    import io

    import numpy as np

    from munet.wiring import load_tasks

    x = np.random.default_rng(0).integers(0, 255, (40, 8, 8), dtype=np.uint8)
    y = np.array([0, 1, 3] * 13 + [0])  # class 2 has no example
    np.savez(tmp_path / "t.npz", x=x, y=y, class_names=np.array(["cat", "dog", "eel", "cat"]))
    stream = io.StringIO()
    load_tasks([f"npz:{tmp_path / 't.npz'}"], 0, str(tmp_path), stream)
    text = stream.getvalue()
    assert "class names used more than once: 'cat'" in text and "1 class(es) without a training example" in text
    np.savez(tmp_path / "blank.npz", x=x, y=np.array([0, 1] * 20), class_names=np.array(["a", " "]))
    stream = io.StringIO()
    load_tasks([f"npz:{tmp_path / 'blank.npz'}"], 0, str(tmp_path), stream)
    assert "empty class names at [1]" in stream.getvalue()
    np.savez(tmp_path / "ok.npz", x=x, y=np.array([0, 1] * 20), class_names=np.array(["a", "b"]))
    stream = io.StringIO()
    load_tasks([f"npz:{tmp_path / 'ok.npz'}"], 0, str(tmp_path), stream)
    assert "warning" not in stream.getvalue()


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_bad_image_folders(tmp_path, seed):
    """Random folder layouts with good, truncated, empty and non-image files load or raise DataError naming the
    folder or the file; nothing else."""
    import io

    import numpy as np
    from PIL import Image

    from munet.data.user import load_image_folder
    from munet.errors import DataError

    rng = np.random.default_rng(seed)

    def png(size: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    kinds = [lambda: png(int(rng.integers(4, 12))), lambda: png(8)[: int(rng.integers(1, 40))], lambda: b"",
             lambda: b"not an image at all", lambda: png(1)]
    loaded = 0
    for case in range(40):
        root = tmp_path / f"f{case}"
        splits = [root / s for s in ("train", "val", "test")] if rng.random() < 0.3 else [root]
        for split in splits:
            for c in range(int(rng.integers(0, 5))):
                folder = split / f"class{c}"
                folder.mkdir(parents=True)
                for i in range(int(rng.integers(0, 12))):
                    kind = int(rng.choice(len(kinds), p=[0.96, 0.01, 0.01, 0.01, 0.01]))
                    (folder / f"{i}.png").write_bytes(kinds[kind]())
        root.mkdir(exist_ok=True)
        try:
            load_image_folder(root, seed=0)
            loaded += 1
        except DataError as err:
            assert str(root) in str(err), (case, err)
    assert 0 < loaded < 40  # the generator makes both good and bad folders
