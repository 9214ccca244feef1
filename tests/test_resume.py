"""Checkpoint and resume: a run interrupted at any moment (an exception, or SIGKILL during training or during a
write) and resumed ends with exactly the population, scores, records and weights of an uninterrupted run."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Crash, crashing_store, make_run, tiny_config

from munet.api import load
from munet.runner import Run
from munet.storage.store import BLOB_DIR, CRASH_ENV, DB_NAME, Store

ONE_THREAD = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMINGS = ("train_time", "data_wait", "recorded_at", "saved_at", "wall_time_s", "created_at")


pytestmark = pytest.mark.usefixtures("one_thread")



def dump(run_dir: Path) -> dict:
    """Everything a run's store holds but wall-clock timings: records, population, weights (blob hashes)."""
    with sqlite3.connect(run_dir / DB_NAME) as db:
        db.row_factory = sqlite3.Row
        paths = []
        for row in db.execute("SELECT * FROM paths ORDER BY id"):
            rec = {k: row[k] for k in row.keys() if k not in TIMINGS}
            rec["metrics"] = {k: v for k, v in json.loads(rec["metrics"]).items() if k not in TIMINGS}
            paths.append(rec)
        tables = {t: [tuple(r) for r in db.execute(f"SELECT * FROM {t} ORDER BY 1")] for t in ("components", "live",
                                                                                                 "tasks")}
        meta = {}
        for key, value in db.execute("SELECT key, value FROM meta"):
            if key in TIMINGS:
                continue
            value = value if isinstance(value, bytes) else json.loads(value)
            meta[key] = {k: v for k, v in value.items() if k not in TIMINGS + ("out",)} if isinstance(value, dict) \
                else value
    db.close()
    blobs = sorted(p.name for p in (run_dir / BLOB_DIR).iterdir())
    return {"paths": paths, **tables, "meta": meta, "blobs": blobs}


def test_run_without_sharing_or_cache_equals_default_run(tmp_path):
    """Sharing (lock-step children, frozen-feature cache) is an optimisation only: the same records and weights."""
    settings = {"seed": 5, "mutation_prob": 0.4}
    make_run(tmp_path / "shared", **settings)
    make_run(tmp_path / "alone", shared_training=False, feature_cache_mb=0, **settings)
    shared, alone = dump(tmp_path / "shared"), dump(tmp_path / "alone")
    for d in (shared, alone):
        d["meta"]["config"] = {k: v for k, v in d["meta"]["config"].items()
                               if k not in ("shared_training", "feature_cache_mb")}
    assert len(shared["paths"]) > 4 and alone == shared


@pytest.mark.parametrize("streams", ["run", "child"])
def test_interrupted_then_resumed_equals_uninterrupted_in_process(tmp_path, streams):
    """Resumed at three checkpoints, with one random stream for the run or one reseeded for every child."""
    settings = {"rounds": 2, "inherit_momentum": True, "seed": 3, "mutation_prob": 0.3, "random_streams": streams}
    make_run(tmp_path / "ref", **settings)
    out = tmp_path / "run"
    trained = []

    def crash_after_training(task, gen, children, outcomes):
        trained.append(gen)
        if len(trained) == 3:  # halfway: the generation's training is lost, the last checkpoint is not
            raise Crash("training")

    with Run.create(tiny_config(out, **settings), io.StringIO()) as opened:
        opened.evolution.after_training.append(crash_after_training)
        with pytest.raises(Crash):
            opened.train()
    for point in ("commit:2", "blob:1", "commit:3"):
        name, count = point.split(":")
        with pytest.raises(Crash):
            make_run(out, crashing_store(name, int(count)), **settings)
        with Store.open(out) as store:
            assert store.get("plan")["done"] < 4
    make_run(out, **settings)
    assert dump(out) == dump(tmp_path / "ref")


def test_run_killed_after_its_last_commit_is_cleaned_by_resume(tmp_path):
    """A kill between the last checkpoint's commit and its clean-up leaves a complete run with orphaned blobs;
    opening it again removes them, so the store equals the uninterrupted one."""
    # a seed (and schedule) whose last checkpoint drops a component
    settings = {"seed": 0, "mutation_prob": 0.4, "schedule_span": "child"}

    class Counting(Store):
        collects = 0

        def crash_point(self, name: str) -> None:
            type(self).collects += name == "collect"

    make_run(tmp_path / "ref", Counting, **settings)
    out = tmp_path / "run"
    with pytest.raises(Crash):
        make_run(out, crashing_store("collect", Counting.collects), **settings)
    with Store.open(out) as store:
        plan, referenced = store.get("plan"), store.referenced_blobs()
    assert plan["done"] == len(plan["order"])  # complete: nothing left for a checkpoint to clean
    assert {p.stem for p in (out / BLOB_DIR).glob("*.safetensors")} - referenced  # orphans to remove
    make_run(out, **settings)
    assert dump(out) == dump(tmp_path / "ref")


def test_opening_an_existing_run_refuses_changes_and_releases_it(tmp_path):
    """`run` on a directory made with another configuration, `resume` with a result-affecting change and
    `add-task` of a task the run has are refused, and the refused opening leaves the run free to open."""
    from munet.errors import MunetError
    from munet.runner import add_tasks, resume

    out = tmp_path / "run"
    make_run(out)
    before = dump(out)
    with pytest.raises(MunetError, match=r"holds a run with another configuration \(seed 1 \(stored: 0\)\)"):
        make_run(out, seed=1)
    with pytest.raises(MunetError, match="a resumed run keeps its configuration; cannot change seed 1"):
        resume(str(out), {"seed": 1})
    with pytest.raises(MunetError, match="no new task to add: a already in"):
        add_tasks(str(out), ["a"], {})
    Store.open(out, write=True).close()  # each refusal released the writer lock
    assert dump(out) == before


def test_a_complete_run_resumed_keeps_its_recorded_runtime(tmp_path):
    """Resuming a complete run computes nothing: its summary once took this session's runtime (another --threads
    claimed results it never computed)."""
    from munet.runner import resume

    out = tmp_path / "run"
    make_run(out)
    before = json.loads((out / "summary.json").read_text())
    threads = torch.get_num_threads()
    try:
        resume(str(out), {"threads": before["runtime"]["threads"] + 1}, io.StringIO())
    finally:
        torch.set_num_threads(threads)
    after = json.loads((out / "summary.json").read_text())
    assert after["runtime"] == before["runtime"] and after["tasks"] == before["tasks"]


def test_crash_during_creation_starts_afresh(tmp_path, capsys):
    """Dying before the first checkpoint leaves nothing to resume: the same command starts the run afresh."""
    make_run(tmp_path / "ref")
    out = tmp_path / "run"
    with pytest.raises(Crash):  # a killed process cleans nothing up
        make_run(out, crashing_store("blob", 2, keep_on_failure=True))
    assert (out / DB_NAME).exists() and any((out / BLOB_DIR).iterdir())
    from munet.cli import main

    assert main(["status", str(out)]) == 2
    assert "creation was interrupted" in capsys.readouterr().err
    make_run(out)
    assert dump(out) == dump(tmp_path / "ref")


# --- SIGKILL of the real command ----------------------------------------------------------------------------------
def _write_tasks(folder: Path) -> list[str]:
    rng = np.random.default_rng(0)
    specs = []
    for name, classes in (("ta", 3), ("tb", 2)):
        y = np.arange(90) % classes
        x = rng.integers(0, 60, (90, 12, 12)).astype(np.uint8)
        for i, label in enumerate(y):
            r, c = divmod(int(label), 2)
            x[i, r * 6:(r + 1) * 6, c * 6:(c + 1) * 6] += 180
        np.savez(folder / f"{name}.npz", x=x, y=y)
        specs.append(f"npz:{folder / name}.npz")
    return specs


def _command(tasks: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "munet", "run", "--root", "random:vit_tiny_patch16_224", "--depth", "1",
            "--image-size", "16", "--max-image-size", "32", "--tasks", ",".join(tasks), "--children-per-task", "6",
            "--generation-size", "3", "--steps-between-validations", "3", "--validations", "2", "--batch-size", "16",
            "--max-val-examples", "32", "--mutation-prob", "0.3", "--inherit-momentum", "true", "--out", str(out)]


def _start(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **ONE_THREAD, **env})


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    tasks = _write_tasks(tmp_path)
    ref = _start(_command(tasks, tmp_path / "ref"), {})
    stamps = [time.perf_counter() for line in ref.stdout if "| gen " in line]
    assert ref.wait(timeout=300) == 0
    generation_time = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    out = tmp_path / "run"
    rng = random.Random(1234)
    # (how the process dies, which command resumes): a random moment after a finished generation (so during the
    # next generation's training or its checkpoint), or a crash point inside a checkpoint's write
    attempts = [("timed", "run"), (f"{CRASH_ENV}=blob:2", "resume"), ("timed", "run"),
                (f"{CRASH_ENV}=commit:3", "resume"), ("timed", "resume")]
    killed, positions = 0, []
    for attempt, (how, command) in enumerate(attempts):
        argv = _command(tasks, out) if command == "run" or not (out / DB_NAME).exists() else [
            sys.executable, "-m", "munet", "resume", str(out)]
        env = dict([how.split("=", 1)]) if "=" in how else {}
        proc = _start(argv, env)
        if how == "timed":
            # wait for 1, 2 or 3 finished generations (so the kills land in different places however loaded the
            # machine is), then kill at a random moment
            finished = 0
            for line in proc.stdout:
                finished += "| gen " in line
                if finished == 1 + attempt % 3:
                    time.sleep(rng.uniform(0.0, 1.2 * generation_time))
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.communicate(timeout=300)
        if proc.returncode == 0:
            break  # the run finished before the kill
        assert proc.returncode == -signal.SIGKILL
        killed += 1
        with Store.open(out) as store:  # where the last checkpoint is; the kills land at different places
            plan, ck = store.get("plan"), store.get("checkpoint")
        positions.append((plan["done"], (ck["in_flight"] or {}).get("generation")))
    print("checkpoints at the kills:", positions)
    # the crash points can land where a timed kill did, and a fast machine finishes before the last kills
    assert killed >= 3 and len(set(positions)) >= 2
    done = subprocess.run([sys.executable, "-m", "munet", "resume", str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **ONE_THREAD})
    assert done.returncode == 0, done.stdout + done.stderr
    assert dump(out) == dump(tmp_path / "ref")
    check = subprocess.run([sys.executable, "-m", "munet", "check", str(out)], capture_output=True, text=True)
    assert check.returncode == 0 and "ok" in check.stdout


def test_paths_grown_past_depth_resume_exactly(tmp_path):
    """With ``max_depth`` a child re-adds the root's next pretrained block; a resumed run finds it again."""
    settings = {"depth": 2, "max_depth": 3, "seed": 1, "mutation_prob": 0.5}
    make_run(tmp_path / "ref", **settings)
    ref = dump(tmp_path / "ref")
    layers = [json.loads(p["hparams"])["num_layers"] for p in ref["paths"]]
    assert layers[0] == 2 and 3 in layers  # the root path starts at depth; some child grew
    out = tmp_path / "run"
    with pytest.raises(Crash):
        make_run(out, crashing_store("commit", 3), **settings)
    make_run(out, **settings)
    assert dump(out) == ref
    grown = load(out)  # the root rebuilt from the store alone, its deeper blocks included
    assert {task: len(p) for task, p in grown.predict(torch.zeros(2, 3, 12, 12, dtype=torch.uint8)).items()} == {
        "a": 2, "b": 2}
