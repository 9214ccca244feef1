"""A user's mistakes at the command line, found by probing every command: output paths that are empty, files,
folders that do not exist or lie in the run's store; numbers past any finishable run; booleans given as numbers;
task lists with commas inside a spec; a root record edited by hand; a corrupt root file; add-task options that
cannot apply. Each is an exit 2 (check: 1) with a message that names the problem, no traceback, nothing lost."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY_ROOT, make_run
from conftest import cli_error as _error
from conftest import run_files as _files
from PIL import Image

import munet
from munet.cli import build_config, main, make_parser
from munet.data.registry import clear_cache, split_specs
from munet.errors import ExportError
from munet.storage.store import BLOB_DIR, DB_NAME, Store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("cli_input") / "run"
    make_run(out, children_per_task=2)
    return out


# --- output paths ---------------------------------------------------------------------------------------------------
def test_report_target_is_checked_before_rendering(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "--out is empty" in _error(capsys, ["report", str(run_dir), "--out", ""])
    (tmp_path / "folder").mkdir()
    err = _error(capsys, ["report", str(run_dir), "--out", str(tmp_path / "folder")])
    assert "is a directory: give the HTML file to write" in err and ".tmp" not in err
    err = _error(capsys, ["report", str(run_dir), "--out", str(tmp_path / "nowhere" / "r.html")])
    assert "its folder" in err and "does not exist" in err and ".tmp" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
    assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html")]) == 0


def test_export_never_overwrites_what_is_not_an_export(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "--out is empty" in _error(capsys, ["export", str(run_dir), "--task", "a", "--out", ""])
    assert "--out is empty" in _error(capsys, ["export", str(run_dir), "--task", "all", "--separate", "--out", ""])
    with pytest.raises(ExportError, match="export directory is empty"):
        munet.load(run_dir).export_all("")
    assert list(tmp_path.iterdir()) == []  # once: the model and config.json written into the current folder
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text('{"learning_rate": 0.1}')
    err = _error(capsys, ["export", str(run_dir), "--task", "all", "--out", str(theirs)])
    assert "already holds config.json of something other than a munet export" in err
    assert (theirs / "config.json").read_text() == '{"learning_rate": 0.1}' and len(list(theirs.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    assert "it is a file" in _error(capsys, ["export", str(run_dir), "--task", "a", "--out", str(tmp_path / "file")])
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = _files(run)
    for inside in (run / BLOB_DIR, run, run / BLOB_DIR / "x"):  # in blobs/, the next checkpoint deleted the model
        assert "hold the run's own files" in _error(capsys, ["export", str(run), "--task", "a", "--out", str(inside)])
    assert _files(run) == before
    assert main(["export", str(run), "--task", "a", "--out", str(run / "exports")]) == 0
    mine = tmp_path / "mine"
    for task in ("a", "all", "b"):  # an earlier export, of one task or all, is replaced
        assert main(["export", str(run_dir), "--task", task, "--out", str(mine)]) == 0


def test_run_output_must_name_a_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "out: the run directory is empty" in _error(capsys, ["run", "--set", "out="])
    (tmp_path / "file").write_text("x")
    assert "is a file; choose a directory" in _error(capsys, ["run", "--out", str(tmp_path / "file")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_run_keeps_a_users_summary_and_leaves_no_folder_when_it_fails(tmp_path, capsys):
    """A user's `summary.json` in --out was overwritten by the run's table; a run refused while setting up (a task
    named 'all') left its new, empty --out folder behind."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "summary.json").write_text("my notes")
    tiny = ["--root", TINY_ROOT, "--depth", "3", "--image-size", "8", "--max-image-size", "8"]
    err = _error(capsys, ["run", *tiny, "--tasks", "a", "--children-per-task", "2", "--out", str(tmp_path / "notes")])
    assert f"{tmp_path / 'notes'} holds a summary.json but no munet run" in err
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["summary.json"]
    assert (tmp_path / "notes" / "summary.json").read_text() == "my notes"
    x = np.random.default_rng(0).integers(0, 255, (40, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "all.npz", x=x, y=np.arange(40) % 2)
    err = _error(capsys, ["run", *tiny, "--tasks", f"npz:{tmp_path}/all.npz", "--out", str(tmp_path / "new" / "run")])
    assert "would be named 'all'" in err
    assert not (tmp_path / "new").exists()  # neither the folder nor the parent made for it


def test_report_replaces_only_an_earlier_report(run_dir, tmp_path, capsys):
    """`--out` once replaced whatever it named through a rename: the run's own database (the run was lost), a device
    such as /dev/null (as root: a regular file took its place), a symbolic link (the link, not its file)."""
    import stat
    import threading

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = _files(run)
    for target in (run / DB_NAME, run / f"{DB_NAME}-wal", run / "munet.lock", run / BLOB_DIR / "r.html"):
        err = _error(capsys, ["report", str(run), "--out", str(target)])
        assert "is one of a run store's own files" in err and f"--out {run / 'report.html'}" in err
    assert _files(run) == before  # an HTML -wal (once written) would be in it: only an empty one is left out
    (tmp_path / "notes.html").write_text("mine")
    assert "exists and is not a munet report" in _error(capsys, ["report", str(run), "--out",
                                                                 str(tmp_path / "notes.html")])
    assert (tmp_path / "notes.html").read_text() == "mine"
    pipe, read = tmp_path / "pipe", []
    os.mkfifo(pipe)
    reader = threading.Thread(target=lambda: read.append(pipe.read_bytes()), daemon=True)
    reader.start()
    assert main(["report", str(run), "--out", str(pipe)]) == 0  # written into, as /dev/stdout would be
    assert stat.S_ISFIFO(pipe.lstat().st_mode)  # (once replaced by a file: the reader then waits forever)
    reader.join(timeout=60)
    assert read[0].startswith(b"<!DOCTYPE html>")
    (tmp_path / "link.html").symlink_to(tmp_path / "page.html")
    for _ in range(2):  # the second replaces the first report
        assert main(["report", str(run), "--out", str(tmp_path / "link.html")]) == 0
    assert (tmp_path / "link.html").is_symlink() and "munet report" in (tmp_path / "page.html").read_text()


def test_a_run_directory_that_is_a_dangling_link(tmp_path, capsys):
    """A link to a folder that is gone: `run` once said "not writable: File exists", `status` "does not exist"."""
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    assert f"{link} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in _error(capsys, [
        "status", str(link)])
    err = _error(capsys, ["run", "--out", str(link), "--root", TINY_ROOT, "--tasks", "a"])
    assert "is a symbolic link to" in err and "create that directory or choose another --out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


# --- configuration values -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line, match", [
    ("rounds = true", "rounds: cannot read True as int"),
    ("batch_size = false", "batch_size: cannot read False as int"),
    ("scale_factor = true", "scale_factor: cannot read True as float"),
    ("separate_probes = 2", "separate_probes: cannot read 2 as bool"),
    ("rounds = 100000000", "rounds must be <= 100,000"),
    ("children_per_task = 1e11", "children_per_task must be <= 10,000"),
    ("validations = 1000000", "validations must be <= 10,000"),
    ('root = ["dinov2-imgfocus"]', "root: cannot read ['dinov2-imgfocus'] as str"),  # once the root "['dinov2-..."
    ("data_dir = 5", "data_dir: cannot read 5 as str"),  # once a folder named "5"
    ('ray_address = ["head:6379"]', "ray_address: cannot read ['head:6379'] as str"),
])
def test_config_values_a_typo_makes(tmp_path, capsys, line, match):
    (tmp_path / "c.toml").write_text(line + "\n")
    err = _error(capsys, ["run", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "run"), "--dry-run"])
    assert match in err
    assert not (tmp_path / "run").exists()


def test_a_config_file_names_the_run_directory_only_with_text(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text('out = ["mine"]\n')
    assert "out: cannot read ['mine'] as str" in _error(capsys, ["run", "--config", "c.toml", "--dry-run"])
    assert list(tmp_path.iterdir()) == [tmp_path / "c.toml"]


def test_tasks_of_the_same_name_are_an_error_not_one_task(tmp_path, capsys):
    """Two files or folders of one name make tasks of one name: the later one replaced the earlier, and the run
    went on with one task fewer than asked for (also a file named like a registered task)."""
    x, y = np.random.default_rng(0).integers(0, 255, (40, 8, 8), dtype=np.uint8), np.arange(40) % 2
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        np.savez(tmp_path / folder / "t.npz", x=x, y=y)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    tiny = ["--root", TINY_ROOT, "--depth", "3", "--image-size", "8", "--max-image-size", "8", "--dry-run"]
    err = _error(capsys, ["run", "--tasks", f"npz:{tmp_path}/one/t.npz,npz:{tmp_path}/two/t.npz", *tiny,
                          "--out", str(tmp_path / "run")])
    assert f"tasks npz:{tmp_path}/one/t.npz and npz:{tmp_path}/two/t.npz are both named 't'" in err
    assert "rename one folder or file" in err
    assert "both named 'a'" in _error(capsys, ["run", "--tasks", f"npz:{tmp_path}/a.npz,a", *tiny])
    assert not (tmp_path / "run").exists()
    np.savez(tmp_path / "all.npz", x=x, y=y)  # a name predict, export and serve would read as every task
    err = _error(capsys, ["run", "--tasks", f"npz:{tmp_path}/all.npz", *tiny])
    assert f"task npz:{tmp_path}/all.npz would be named 'all'" in err and "rename its folder or file" in err
    assert main(["run", "--tasks", "split:uci_digits:0,1,3", *tiny, "--out", str(tmp_path / "split")]) == 0  # a comma


def test_resuming_on_data_with_other_classes_says_what_to_do(tmp_path, capsys):
    data = tmp_path / "t.npz"
    x = np.random.default_rng(0).integers(0, 255, (40, 8, 8), dtype=np.uint8)
    np.savez(data, x=x, y=np.arange(40) % 2)
    make_run(tmp_path / "run", tasks=[f"npz:{data}"], children_per_task=2)
    before = _files(tmp_path / "run")
    np.savez(data, x=x, y=np.arange(40) % 4)
    clear_cache()
    err = _error(capsys, ["resume", str(tmp_path / "run")])
    assert "task t has 4 classes but the stored system has 2" in err and "restore the original data" in err
    assert _files(tmp_path / "run") == before


def test_commas_inside_a_task_spec():
    assert split_specs("split:uci_digits:0,1,2,faces") == ["split:uci_digits:0,1,2", "faces"]
    assert split_specs("folder:/data/pics, old,npz:/x,y.npz,mnist_5k") == ["folder:/data/pics, old", "npz:/x,y.npz",
                                                                          "mnist_5k"]
    assert split_specs(" faces , ,mnist_5k") == ["faces", "mnist_5k"]
    assert split_specs("npz:/a.npz,") == split_specs("npz:/a.npz, ") == ["npz:/a.npz"]  # once the file "/a.npz,"
    assert split_specs("mnist_5k,fashon") == ["mnist_5k", "fashon"]  # a typo stays its own (unknown) task
    assert split_specs("torchvision:EMNIST:split=digits,download=False,faces") == [
        "torchvision:EMNIST:split=digits,download=False", "faces"]
    assert split_specs("hf:user/name:config,split:npz:/a/b.npz:0-3,7") == ["hf:user/name:config",
                                                                          "split:npz:/a/b.npz:0-3,7"]
    args = make_parser().parse_args(["run", "--tasks", "split:uci_digits:0-2,7,faces"])
    assert build_config(args).tasks == ["split:uci_digits:0-2,7", "faces"]


# --- the store and the root -----------------------------------------------------------------------------------------
def _edited_copy(run_dir, tmp_path, sql: str, *params: str):
    """A copy of the run whose database ``sql`` has edited, as a damaged or hand-edited store would be."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    with sqlite3.connect(run / DB_NAME) as db:
        db.execute(sql, params)
    db.close()
    return run


def test_root_record_without_its_fields(run_dir, tmp_path, capsys):
    run = _edited_copy(run_dir, tmp_path, """UPDATE meta SET value = '{"x": 1}' WHERE key = 'root'""")
    before = _files(run)
    for command in ("resume", "status", "report", "history"):
        assert "the root record of" in _error(capsys, [command, str(run)]), command
    assert "lacks name, description" in _error(capsys, ["export", str(run), "--task", "a", "--out",
                                                        str(tmp_path / "e")])
    assert main(["check", str(run)]) == 1
    assert "lacks name, description, source" in capsys.readouterr().out
    assert _files(run) == before


@pytest.mark.parametrize("key", ["checkpoint", "plan"])
def test_a_checkpoint_or_plan_record_that_is_no_object(run_dir, tmp_path, capsys, key):
    run = _edited_copy(run_dir, tmp_path, "UPDATE meta SET value = '[1, 2]' WHERE key = ?", key)
    before = _files(run)
    damaged = f"the {key!r} record of"
    for command in ("resume", "status", "report"):
        assert damaged in _error(capsys, [command, str(run)]), command
    assert main(["history", str(run)]) == 0  # the lineages, read from the path records alone
    assert damaged in _error(capsys, ["export", str(run), "--task", "a", "--out", str(tmp_path / "e")])
    assert damaged in _error(capsys, ["predict", str(run), "--task", "a", str(tmp_path / "none.png")])
    assert main(["check", str(run)]) == 1  # the diagnosis names it too, and goes on with the other checks
    assert f"{damaged} {run / DB_NAME} is a list, not an object" in capsys.readouterr().out
    assert _files(run) == before


def test_class_names_that_do_not_fit_the_task(run_dir, tmp_path, capsys):
    run = _edited_copy(run_dir, tmp_path, """UPDATE tasks SET class_names = '["only"]' WHERE name = 'a'""")
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    export = ["export", str(run), "--task", "all", "--out", str(tmp_path / "e")]
    for argv in (["predict", str(run), "--task", "all", str(image)], export):
        assert "task 'a' has 1 class names for 3 classes" in _error(capsys, argv), argv
    assert main(["check", str(run)]) == 1
    assert "problem: task 'a' has 1 class names for 3 classes" in capsys.readouterr().out


def test_check_data_finds_a_task_whose_file_is_gone(tmp_path, capsys):
    data = tmp_path / "t.npz"
    np.savez(data, x=np.random.default_rng(0).integers(0, 255, (40, 8, 8), dtype=np.uint8), y=np.arange(40) % 2)
    make_run(tmp_path / "run", tasks=[f"npz:{data}"], children_per_task=2)
    assert main(["check", "--data", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    data.rename(tmp_path / "moved.npz")
    clear_cache()  # as a new process would: the loaded task is cached in-process
    assert main(["check", "--data", str(tmp_path / "run")]) == 1  # once "ok": a missing file was only a note
    assert f"problem: the data of task npz:{data} cannot be loaded" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"\x80\x02 not a pickle at all", b""])
def test_corrupt_root_file_is_named_in_one_line(tmp_path, capsys, content):
    (tmp_path / "root.pth").write_bytes(content)
    err = _error(capsys, ["run", "--root", f"file:{tmp_path / 'root.pth'}", "--out", str(tmp_path / "run"),
                          "--dry-run"])
    assert f"root weights file {tmp_path / 'root.pth'} is not a readable checkpoint" in err
    assert "weights_only" not in err and len(err.splitlines()) == 1


def test_add_task_options_that_cannot_apply(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = _files(run)
    assert "--preset does not apply" in _error(capsys, ["add-task", str(run), "c", "--preset", "default"])
    err = _error(capsys, ["add-task", str(run), "c", "--set", "depth=2"])
    assert "add-task cannot change depth" in err
    err = _error(capsys, ["add-task", str(run), "c", "--root", TINY_ROOT + "_other"])
    assert "add-task cannot change root" in err
    for seed in (["--seed", "1"], ["--set", "seed=1"]):  # once blamed the earlier tasks' data (split by the seed)
        err = _error(capsys, ["add-task", str(run), "c", *seed])
        assert "add-task cannot change seed" in err and "not the data" not in err
    err = _error(capsys, ["add-task", str(run), "c", "--set", f"out={tmp_path / 'elsewhere'}"])  # was ignored
    assert f"{run} is trained in place: out '{tmp_path / 'elsewhere'}' cannot move it" in err
    assert _files(run) == before and not (tmp_path / "elsewhere").exists()
    assert main(["add-task", str(run), "c", "--set", "depth=3", "--set", "lr=0.05"]) == 0  # depth as it was
    assert "the new tasks train with lr 0.05 (stored: 0.02)" in capsys.readouterr().out


def test_add_task_of_tasks_the_run_has_or_twice(run_dir, tmp_path, capsys):
    """`add-task RUN a c` with `a` in the run once added `c` alone without a word; `a` alone was refused only after
    loading the root and every task ("already in RUN or unavailable")."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = _files(run)
    assert "no new task to add: a already in" in _error(capsys, ["add-task", str(run), "a"])
    err = _error(capsys, ["add-task", str(run), "a", "c"])
    assert err.startswith(f"error: a already in {run} (its tasks: a, b); add-task adds only tasks the run does not")
    assert "task c is given twice" in _error(capsys, ["add-task", str(run), "c", "c"])
    assert "task c is given twice" in _error(capsys, ["add-task", str(run), "c,c"])  # commas split, as --tasks
    assert "',' names no task" in _error(capsys, ["add-task", str(run), ","])
    assert _files(run) == before


def test_run_without_its_blob_folder(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    shutil.rmtree(run / BLOB_DIR)
    before = _files(run)
    assert main(["status", str(run)]) == 0  # the records still read; the loss is said, not hidden
    assert "blob(s) the run references are missing" in capsys.readouterr().out
    assert "the blob folder" in _error(capsys, ["resume", str(run)])  # once "No such file or directory"
    assert _files(run) == before and not (run / BLOB_DIR).exists()


def test_report_baselines_file_of_another_shape(run_dir, tmp_path, capsys):
    (tmp_path / "list.json").write_text("[1, 2]")
    err = _error(capsys, ["report", str(run_dir), "--baselines", str(tmp_path / "list.json"), "--out",
                          str(tmp_path / "r.html")])
    assert "holds no list of methods" in err


def test_check_names_an_interrupted_creation(tmp_path, capsys):
    Store.create(tmp_path / "run").close()  # the schema committed, the first checkpoint not
    assert main(["check", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    assert "creation was interrupted before its first checkpoint" in out and "no 'config' record" not in out


def test_ctrl_c_says_what_it_left(run_dir, capsys, monkeypatch):
    """Ctrl-C in `report` once said "the run is saved up to its last finished generation; continue it with the same
    command", and in `add-task` "the same command", which then finds the run unfinished."""
    import munet.reporting.report
    import munet.runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(munet.reporting.report, "write_report", interrupted)
    monkeypatch.setattr(munet.runner, "add_tasks", interrupted)
    assert main(["report", str(run_dir)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted; {run_dir} is unchanged (this command only reads it)" in err and "saved" not in err
    assert main(["add-task", str(run_dir), "c"]) == 130
    err = capsys.readouterr().err
    assert f"continue it with `munet resume {run_dir}`" in err and "same command" not in err
    monkeypatch.setattr(munet.runner, "run", interrupted)  # `munet run` stopped once set up, or while setting up
    assert main(["run", "--out", str(run_dir)]) == 130
    assert f"or `munet resume {run_dir}`" in capsys.readouterr().err  # the folder, where it printed RUN
    assert main(["run", "--out", str(run_dir / "new")]) == 130
    err = capsys.readouterr().err
    assert f"interrupted before the run was created in {run_dir / 'new'}: nothing was saved" in err
    assert "resume" not in err


def test_a_reader_that_goes_away_stops_the_command_quietly():
    """`munet presets | head -1`: the reader closes the pipe; munet stops with a shell's SIGPIPE status and prints
    nothing, where it printed `error: Broken pipe` (exit 2) or Python's `Exception ignored ... BrokenPipeError`."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write: every write to the pipe fails
    try:
        done = subprocess.run([sys.executable, "-m", "munet", "presets"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")


def test_a_report_to_standard_output_whose_reader_went_away(run_dir):
    """`munet report RUN --out /dev/stdout | head`: the report's own write error once became `error: cannot write the
    report to /dev/stdout: Broken pipe` (exit 2), not the quiet stop of any other command."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "munet", "report", str(run_dir), "--out", "/dev/stdout"],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (141, "")
