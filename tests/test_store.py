"""The run store: layout and records, content-addressed blobs, integrity errors, the writer lock, status."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections import Counter

import pytest
import torch
from conftest import make_run

import munet
from munet.cli import main
from munet.errors import StoreError
from munet.model.components import Component, ResidualAdapter
from munet.reporting.history import mutation_group, mutation_kind, run_history
from munet.reporting.status import run_status
from munet.runner import resume
from munet.storage.check import check_store
from munet.storage.store import BLOB_DIR, DB_NAME, LOCK_NAME, Store

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("store") / "run"
    make_run(out, inherit_momentum=True)
    return out


def _files(run_dir) -> dict[str, str]:
    """Content hash of every file of a run directory but the lock (which only names the last writer) and SQLite's
    WAL index and empty WAL (a read-only reader creates them, the next writer removes them; they hold no data)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != LOCK_NAME
            and not p.name.endswith("-shm") and not (p.name.endswith("-wal") and p.stat().st_size == 0)}


def _copy(run_dir, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(run_dir, target)
    return target


def test_layout_records_and_content_addressed_blobs(run_dir):
    with Store.open(run_dir) as store:
        assert store.get("config")["tasks"] == ["a", "b"] and store.get("plan") == {"order": ["a", "b"], "done": 2}
        root = store.get("root")
        assert {"source", "sha256", "arch", "components"} <= set(root) and root["source"] == "random-init"
    with sqlite3.connect(run_dir / DB_NAME) as db:  # the stored format itself, as any SQLite reader sees it
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        paths = db.execute("SELECT task, parent, components, hparams, accepted, reason, generation, iteration, "
                           "train_time, quality FROM paths").fetchall()
        assert len(paths) == 11  # every sampled path: 2 tasks x 4 children, and probes (task a: the root; b: a's, root)
        assert all(r[5].startswith(("accepted", "rejected", "discarded")) for r in paths)
        # generation 0 probes, generations 1 and 2 hold the children
        assert all(r[7] in (0, 1) and r[6] in (0, 1, 2) and r[8] > 0 and json.loads(r[3])["opt_lr"] for r in paths)
        population = db.execute("SELECT test_quality, accounted FROM paths WHERE id IN "
                                "(SELECT path_id FROM live WHERE rank IS NOT NULL)").fetchall()
        assert len(population) == 2  # one retained path per task, its record up to date
        assert all(test is not None and accounted > 0 for test, accounted in population)
        rows = db.execute("SELECT id, name, blob, momentum, num_params FROM components").fetchall()
    db.close()
    blobs = {p.stem for p in (run_dir / BLOB_DIR).iterdir()}
    for _, _, blob, momentum, _ in rows:
        assert hashlib.sha256((run_dir / BLOB_DIR / f"{blob}.safetensors").read_bytes()).hexdigest() == blob
        assert blob in blobs and (momentum is None or momentum in blobs)
    # a component used by several paths (the root's, at least) has one record and one blob
    with sqlite3.connect(run_dir / DB_NAME) as db:
        retained = [json.loads(c) for (c,) in db.execute("SELECT components FROM paths WHERE id IN "
                                                         "(SELECT path_id FROM live WHERE rank IS NOT NULL)")]
    db.close()
    shared = set(retained[0].values()) & set(retained[1].values())
    assert shared and shared <= {r[0] for r in rows}
    # µ2Net optimiser state: trained components keep their momentum trace
    assert any(r[3] for r in rows if r[1] in ("head", "norm"))
    assert blobs == {r[2] for r in rows} | {r[3] for r in rows if r[3]}  # nothing unreferenced is left


def test_records_of_paths_retained_in_the_last_generation_are_final(tmp_path):
    make_run(tmp_path / "run", children_per_task=2, separate_probes=False)  # one generation per task iteration
    with sqlite3.connect(tmp_path / "run" / DB_NAME) as db:
        rows = db.execute("SELECT generation, test_quality, metrics FROM paths WHERE id IN "
                          "(SELECT path_id FROM live WHERE rank IS NOT NULL)").fetchall()
    db.close()
    assert len(rows) == 2 and all(g == 0 and t is not None and json.loads(m)["test_quality"] == t for g, t, m in rows)


def test_store_size_close_to_unique_parameters(run_dir):
    status = run_status(run_dir)
    blob_bytes = status["store_bytes"]["blobs"]
    with Store.open(run_dir) as store:
        momentum = sum(store.blobs.path(d).stat().st_size for d in {r.momentum for r in store.components()} if d)
    # parameter blobs hold each unique float32 parameter once, plus a small header per blob
    assert 4 * status["unique_params"] <= blob_bytes - momentum <= 1.05 * 4 * status["unique_params"]


def test_status_command(run_dir, capsys):
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "complete: 2/2 task iterations" in out and "unique parameters" in out
    assert out.count("\na ") == 1 and "\nb " in out
    assert main(["status", str(run_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [t["task"] for t in status["tasks"]] == ["a", "b"]
    assert all(t["test_acc"] is not None for t in status["tasks"])


def test_history_matches_the_store(run_dir, capsys):
    history = run_history(run_dir)
    with Store.open(run_dir) as store:
        sampled = Counter(row["task"] for row in store.sampled_paths())
        best = {t["task"]: t["path"] for t in run_status(run_dir)["tasks"]}
    tasks = {t["task"]: t for t in history["tasks"]}
    assert {t: tasks[t]["children"] for t in tasks} == sampled
    for name, task in tasks.items():
        assert task["best"] == best[name] and task["lineage"][-1]["path"] == best[name]
        assert task["strict_accepted"] <= task["strict_children"] <= task["children"]
    # every strict-acceptance child is counted once per mutation kind it carries, or under "(none)"
    assert sum(t["strict_children"] for t in tasks.values()) <= sum(m["tried"] for m in history["mutations"])
    assert all(0 <= m["accepted"] <= m["tried"] for m in history["mutations"])
    # and exactly once in the group of what it carries
    groups = history["groups"]
    assert sum(g["tried"] for g in groups.values()) == sum(t["strict_children"] for t in tasks.values())
    assert sum(g["accepted"] for g in groups.values()) == sum(t["strict_accepted"] for t in tasks.values())
    # every path's training images counted once, where they went; the lineage's are those of its own paths
    with Store.open(run_dir) as store:
        rows = store.sampled_paths()
    for name, task in tasks.items():
        own = [r for r in rows if r["task"] == name]
        assert sum(task["images"].values()) == sum(r["metrics"]["train_images"] for r in own) > 0
        on_lineage = {step["path"] for step in task["lineage"]}
        assert task["images"]["lineage"] == sum(r["metrics"]["train_images"] for r in own if r["id"] in on_lineage)
        rejected = [r for r in own if not r["accepted"] and r["id"] not in on_lineage]
        assert task["images"]["rejected"] == sum(r["metrics"]["train_images"] for r in rejected)
        probes = [r for r in own if r["metrics"].get("seed_probe") and r["id"] not in on_lineage]
        assert task["images"]["probes"] == sum(r["metrics"]["train_images"] for r in probes)
    assert main(["history", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "mutations in children of the same task" in out and f"best path {best['a']} " in out
    assert "training images: " in out and "lineage " in out
    assert tasks["a"]["origin_is_root"] and "grown from root" in out  # the first task has nothing else to grow from
    assert main(["history", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"][0]["task"] == "a"


def test_mutation_kinds_group_indices():
    assert mutation_kind("clone:block_3") == "clone:block" and mutation_kind("add:adapter_12") == "add:adapter"
    assert mutation_kind("opt_lr") == "opt_lr" and mutation_kind("ds_image_size") == "ds_image_size"
    assert mutation_group({"clone:block", "add:adapter"}) == "structural" and mutation_group(set()) == "none"
    assert mutation_group({"clone:block", "opt_lr"}) == "other" and mutation_group({"clone:embedding"}) == "other"


def _commit_elsewhere(run) -> None:
    """What a run in progress does between a reader's reads: a writer commits (here the same plan again)."""
    with Store.open(run, write=True) as writer, writer.transaction():
        writer.put("plan", writer.get("plan"))


def test_a_reader_reads_one_snapshot_while_the_run_commits(run_dir, tmp_path):
    """A reader once saw each writer's commit between two of its reads: a path of the newest checkpoint beside the
    component records of the one before ("uses component #291, which RUN does not hold")."""
    run = _copy(run_dir, tmp_path)
    with Store.open(run) as reader:
        plan = reader.get("plan")
        began = time.monotonic()
        with Store.open(run, write=True) as writer, writer.transaction():
            writer.put("plan", {**plan, "done": 0})
        assert time.monotonic() - began < 10  # the writer's WAL fold once waited out the 30 s busy timeout
        assert reader.get("plan") == plan  # its snapshot
        assert reader.end_snapshot()
        assert reader.get("plan")["done"] == 0  # the snapshot ended: the newest commit


def test_a_blob_gone_with_a_newer_commit_is_read_again(run_dir, tmp_path, monkeypatch):
    """A run in progress deletes the blobs its newer checkpoint no longer needs: a reader of the older snapshot that
    misses one reads the newer one (it once said "missing or unreadable ... restore the run from a copy"). Without a
    commit a missing blob is damage, and the error stands."""
    import munet.api
    import munet.storage.check

    run = _copy(run_dir, tmp_path)
    with Store.open(run) as store:
        digest = next(r.blob for r in store.components() if r.origin == "root")
    blob, away = run / BLOB_DIR / f"{digest}.safetensors", tmp_path / "away"
    reads = []

    def racing(read):
        def first_misses_a_blob(store, *args):
            reads.append(store)
            if len(reads) == 1:  # the writer deletes the blob, then commits its newer checkpoint
                blob.rename(away)
                _commit_elsewhere(run)
            elif away.exists():  # (in the newer state the blob is needed again: here it comes back)
                away.rename(blob)
            return read(store, *args)
        return first_misses_a_blob

    monkeypatch.setattr(munet.api, "_system_of", racing(munet.api._system_of))
    assert munet.load(run).tasks == ["a", "b"] and len(reads) == 2
    monkeypatch.setattr(munet.storage.check, "_check", racing(munet.storage.check._check))
    reads.clear()
    report = check_store(run)
    assert report.problems == [] and len(reads) == 2
    monkeypatch.undo()
    blob.rename(away)  # no writer: damage, read once
    load_of, check_of, counts = munet.api._system_of, munet.storage.check._check, []
    monkeypatch.setattr(munet.api, "_system_of", lambda store: counts.append("load") or load_of(store))
    monkeypatch.setattr(munet.storage.check, "_check", lambda store, *a: counts.append("check") or check_of(store, *a))
    with pytest.raises(StoreError, match="missing"):
        munet.load(run)
    assert len(check_store(run).problems) == 1 and counts == ["load", "check"]


def test_status_of_a_run_in_progress_counts_no_blob_its_newer_checkpoint_dropped(run_dir, tmp_path):
    """The writer deletes the blobs its newer checkpoint no longer references: a reader's snapshot still names them,
    and `munet status` warned that they were missing."""
    run = _copy(run_dir, tmp_path)
    with Store.open(run) as reader:
        reader.referenced_blobs()  # the snapshot begins
        with contextlib.closing(sqlite3.connect(run / DB_NAME)) as db, db:  # the newer checkpoint
            cid, digest = db.execute("SELECT id, blob FROM components LIMIT 1").fetchone()
            other = db.execute("SELECT blob FROM components WHERE blob != ? LIMIT 1", (digest,)).fetchone()[0]
            db.execute("UPDATE components SET blob = ? WHERE id = ?", (other, cid))
            dropped = db.execute("SELECT count(*) FROM components WHERE blob = ? OR momentum = ?",
                                 (digest, digest)).fetchone()[0] == 0
        assert dropped
        (run / BLOB_DIR / f"{digest}.safetensors").unlink()  # its garbage collection
        assert reader.missing_blobs() == 0


def test_check_passes_on_a_sound_store(run_dir, capsys):
    assert main(["check", str(run_dir)]) == 0
    assert "ok" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete"])
def test_damaged_blob_is_reported_and_refused(run_dir, tmp_path, capsys, damage):
    run = _copy(run_dir, tmp_path)
    with Store.open(run) as store:
        cid, name, digest = next((r.id, r.name, r.blob) for r in store.components()
                                 if r.name == "block_0" and r.origin == "root")
    blob = run / BLOB_DIR / f"{digest}.safetensors"
    data = blob.read_bytes()
    if damage == "truncate":
        blob.write_bytes(data[: len(data) // 2])
    elif damage == "alter":
        blob.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    else:
        blob.unlink()
    before = _files(run)
    report = check_store(run)
    assert len(report.problems) == 1 and blob.name in report.problems[0] and f"{name}#{cid}" in report.problems[0]
    assert main(["check", str(run)]) == 1
    assert "1 problem(s)" in capsys.readouterr().out
    with pytest.raises(StoreError, match=blob.name):
        munet.load(run)
    assert main(["resume", str(run)]) == 2
    assert "error: " in capsys.readouterr().err
    assert _files(run) == before  # nothing was changed


def test_missing_database(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    (run / DB_NAME).unlink()
    before = _files(run)
    for argv in (["status", str(run)], ["check", str(run)], ["resume", str(run)],
                 ["predict", str(run), "--task", "a", "x.png"]):
        assert main(argv) == 2
        assert "database is missing" in capsys.readouterr().err
    with pytest.raises(StoreError, match="database"):
        make_run(run)  # a new run over the blobs of a run whose database is gone is refused
    assert _files(run) == before


def test_incompatible_version_and_corrupt_database(run_dir, tmp_path, capsys):
    run = _copy(run_dir, tmp_path)
    with sqlite3.connect(run / DB_NAME) as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    before = _files(run)
    for argv in (["status", str(run)], ["check", str(run)], ["resume", str(run)]):
        assert main(argv) == 2
        assert "incompatible munet version" in capsys.readouterr().err
    assert _files(run) == before
    (run / DB_NAME).write_bytes(b"not a database" * 100)
    assert main(["check", str(run)]) == 2
    assert "file is not a database" in capsys.readouterr().err


def test_second_writer_is_refused(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    with Store.open(run, write=True):
        before = _files(run)
        with pytest.raises(StoreError, match="being written by another munet process"):
            resume(str(run), {})
        with pytest.raises(StoreError, match="being written by another munet process"):
            make_run(run, inherit_momentum=True)  # the same command resumes, but not while another writes
        assert _files(run) == before
        assert check_store(run).problems == []  # readers are fine while a writer holds the run


def test_a_blob_that_cannot_be_written_is_named_or_said_to_be_unnamed(run_dir, tmp_path, monkeypatch):
    """A full disk's OSError carries no file name: the message said "blob ?"."""
    import errno

    run = _copy(run_dir, tmp_path)
    with Store.open(run, write=True) as store:
        for filename, words in ((None, "cannot write a blob in"), ("/x/ab12.safetensors", "cannot write blob ab12")):
            def full(tensors, filename=filename):
                raise OSError(errno.ENOSPC, "No space left on device", filename)

            monkeypatch.setattr(store.blobs, "write", full)
            with pytest.raises(StoreError, match=words + ".*No space left on device"):
                store.write_blob({"w": torch.zeros(2)})


def test_leftovers_of_an_interrupted_write_are_noted_then_removed(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path)
    (run / BLOB_DIR / ("0" * 64 + ".safetensors")).write_bytes(b"orphan")
    (run / BLOB_DIR / "x.safetensors.tmp").write_bytes(b"partial")
    report = check_store(run)
    assert report.problems == [] and "1 unreferenced blob(s) and 1 partial write(s)" in report.notes[0]
    with Store.open(run, write=True) as store:
        assert store.collect_garbage() == 2
    assert check_store(run).notes == []


def test_clone_inherits_momentum():
    comp = Component(1, "adapter_0", ResidualAdapter(8, 4), origin="a")
    comp.momentum = {"up.weight": torch.ones(8, 4)}
    twin = comp.clone(2, "b")
    assert torch.equal(twin.momentum["up.weight"], comp.momentum["up.weight"])
    assert twin.momentum["up.weight"] is not comp.momentum["up.weight"]


def test_training_starts_from_inherited_momentum(system):
    import random

    from conftest import make_task

    from munet.evolution.hparams import MutationPolicy
    from munet.evolution.mutate import make_child
    from munet.training.evaluate import Evaluator
    from munet.training.frozen import FeatureCache
    from munet.training.settings import TrainSettings
    from munet.training.trainer import train_generation

    task = make_task("a", 3)
    settings = TrainSettings(batch_size=16, max_steps_between_validations=2, validations=1, inherit_momentum=True)
    evaluator = Evaluator(settings, FeatureCache(1 << 24), (0.5,) * 3, (0.5,) * 3)
    policy = MutationPolicy("fixed", 0.0, random.Random(0))
    child = make_child(system, system.root_path, "a", {"ds_image_size": 8}, False, policy)
    outcome, = train_generation([child], [float("-inf")], task, child.hparams, settings, evaluator, lambda p, q: q,
                                torch.Generator().manual_seed(0))
    head = child.components["head"]
    assert outcome.accepted and set(head.momentum) == {"linear.weight", "linear.bias"}
    system.paths["a"].append(child)
    grandchild = make_child(system, child, "a", {"ds_image_size": 8}, True, policy)
    assert torch.equal(grandchild.components["head"].momentum["linear.weight"], head.momentum["linear.weight"])
