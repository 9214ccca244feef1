"""µ3Net's asynchronous agents (``schedule = "agents"``): concurrent writers to one store, no forgetting between
agents, an agent killed (SIGKILL) restarting from its last publication while the others go on, and resume."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from test_resume import ONE_THREAD, _command, _write_tasks, dump

from munet.api import load
from munet.data.registry import load_task
from munet.distributed.agents import ID_SPAN, IMPORTS_ENV, Agent, AgentJob
from munet.errors import ConfigError, MunetError, StoreError
from munet.reporting.status import format_status, run_status
from munet.runner import Run, add_tasks, resume, run
from munet.storage.check import check_store
from munet.storage.snapshot import component_record
from munet.storage.store import AGENT_LOCK, DB_NAME, Store

pytestmark = [pytest.mark.agents, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(autouse=True)
def _agents_import_the_tiny_root_and_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Agent processes are fresh interpreters: they import conftest, which registers the tiny root and tasks."""
    monkeypatch.setenv(IMPORTS_ENV, "conftest")


def agents_config(out, **overrides):
    return tiny_config(out, schedule="agents", threads=1, children_per_task=2, generation_size=1, rounds=2).replace(
        **overrides)


def test_agents_run_completes_and_reads_like_a_round_robin_run(tmp_path):
    cfg = agents_config(tmp_path / "run", tasks=["a", "b", "c"])
    stream = io.StringIO()
    summary = run(cfg, stream)
    assert [row["task"] for row in summary["tasks"]] == ["a", "b", "c"]
    assert "agent b: cycle 2/2 published" in stream.getvalue()
    with Store.open(cfg.out) as store:
        agents = store.agent_records()
        assert {t: r.cycle for t, r in agents.items()} == {"a": 2, "b": 2, "c": 2}
        assert store.get("plan")["done"] == 6
        for position, task in enumerate(store.task_names()):  # every id an agent made lies in its own range
            base = (position + 1) * ID_SPAN
            own = [p["id"] for p in store.sampled_paths() if p["task"] == task]
            assert own and all(base <= pid < base + ID_SPAN for pid in own)
        retained = {p["task"]: p for p in store.retained_paths()}
        assert {t: retained[t]["id"] for t in retained} == {t: r.path.id for t, r in agents.items()}
        assert all(p["test_quality"] is not None for p in retained.values())
    assert check_store(tmp_path / "run").problems == []
    # a complete agents run resumes to its report; adding tasks to it is refused, naming why
    assert resume(cfg.out, {}, io.StringIO())["tasks"] == summary["tasks"]
    with pytest.raises(MunetError, match="agents run"):
        add_tasks(cfg.out, ["c"], {}, io.StringIO())


def test_store_takes_one_writer_per_agent_and_agents_never_collect(tmp_path):
    cfg = agents_config(tmp_path / "run")
    with Run.create(cfg, io.StringIO()):
        pass
    with pytest.raises(StoreError, match="has no task 'z'"):
        Store.open_agent(cfg.out, "z")
    first, other = Store.open_agent(cfg.out, "a"), Store.open_agent(cfg.out, "b")  # a and b write at once
    tensors = {"w": torch.arange(6.0)}
    assert first.write_blob(tensors) == other.write_blob(tensors)  # the same blob from two writers, stored once
    with pytest.raises(StoreError, match="never collects garbage"):
        first.collect_garbage()
    second: list[Store] = []
    waiting = threading.Thread(target=lambda: second.append(Store.open_agent(cfg.out, "a")))
    waiting.start()
    waiting.join(timeout=0.5)
    assert not second  # a second agent of task a waits for the first to exit
    first.close()
    waiting.join(timeout=30)
    assert second and second[0].agent == "a"
    second[0].close()
    other.close()


def test_config_refuses_an_unknown_schedule(tmp_path):
    with pytest.raises(ConfigError, match="schedule must be one of"):
        agents_config(tmp_path, schedule="async").validate()


def test_config_refuses_a_first_task_lever_with_agents(tmp_path):
    """Every agent starts before the others publish, so none has a first task to fine-tune as one run."""
    with pytest.raises(ConfigError, match="first_task_finetune needs schedule = round_robin"):
        agents_config(tmp_path, first_task_finetune=True).validate()
    agents_config(tmp_path, first_task_finetune=True, schedule="round_robin").validate()


def test_an_agent_never_changes_another_tasks_components(tmp_path):
    """Agent a publishes; agent b then evolves for three cycles, adopting a's path before each: a's components (in
    the store and in b's memory) and a's test accuracy stay identical byte for byte."""
    cfg = agents_config(tmp_path / "run", rounds=3, clone_prob=0.0)
    with Run.create(cfg, io.StringIO()):
        pass  # the store with the root, the tasks and the configuration; the agents are run here, one by one
    longer = {"rounds": 1, "children_per_task": 4, "validations": 4}  # so that a keeps a norm of its own, for b
    with Agent(AgentJob(cfg.out, "a", "a", longer)) as first:
        assert first.run() == 1
    with Store.open(cfg.out) as store:
        a_path = store.agent_records()["a"].path
        a_records = {r.id: r for r in store.components(set(a_path.components.values()))}
    a_data = load_task("a", cfg.seed)
    with Agent(AgentJob(cfg.out, "b", "b")) as second:
        held = second.system.paths["a"][0]
        evaluate = second.evolution.evaluator.accuracy
        test_before = evaluate(held, a_data, "test", held.hparams["ds_image_size"])
        assert test_before == held.metrics["test_quality"]
        for _ in range(3):
            second.run_cycle()
            assert second.system.paths["a"][0] is held  # nothing new published by a: the same path, never retrained
            for comp in held.components.values():  # b's copies of a's components are what the store holds
                assert component_record(second.store, comp).blob == a_records[comp.id].blob
                assert "a" in comp.locks and not any(p.requires_grad for p in comp.module.parameters())
        assert evaluate(held, a_data, "test", held.hparams["ds_image_size"]) == test_before
    with Store.open(cfg.out) as store:
        assert {r.id: r for r in store.components(set(a_path.components.values()))} == a_records
        assert store.agent_records()["a"].path == a_path
        assert store.agent_records()["b"].cycle == 3
        # b's children did use a's own components (frozen), so the test could fail
    with sqlite3.connect(os.path.join(cfg.out, DB_NAME)) as db:
        used = {cid for (comps,) in db.execute("SELECT components FROM paths WHERE task = 'b'")
                for cid in json.loads(comps).values()}
    assert used & {cid for cid in a_records if ID_SPAN <= cid < 2 * ID_SPAN}


def _start(cfg) -> tuple[threading.Thread, list]:
    """Runs ``cfg`` in a thread (its agents are processes); the list receives the summary or the error."""
    outcome: list = []

    def target() -> None:
        try:
            outcome.append(run(cfg, io.StringIO()))
        except BaseException as err:  # reported by the test
            outcome.append(err)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def _kill_agent_after(cfg, task: str, position: int, cycles: int) -> int:
    """SIGKILLs the agent process of ``task`` once it has published ``cycles`` cycles; returns its pid."""
    deadline = time.monotonic() + 240
    lock = os.path.join(cfg.out, AGENT_LOCK.format(position))
    while time.monotonic() < deadline:
        time.sleep(0.05)
        try:
            with Store.open(cfg.out) as store:
                record = store.agent_records().get(task)
        except Exception:  # the store is being created
            continue
        if record is not None and record.cycle >= cycles:
            assert record.cycle < cfg.rounds, "the agent finished before the kill: give it more cycles"
            pid = int(open(lock).read())
            os.kill(pid, signal.SIGKILL)
            return pid
    raise AssertionError(f"agent {task} never published {cycles} cycle(s)")


def test_one_agent_killed_then_restarted_equals_uninterrupted(tmp_path, caplog):
    """One agent is deterministic, and one killed in a cycle repeats it from its last publication exactly."""
    ref = agents_config(tmp_path / "ref", tasks=["a"], rounds=4)
    run(ref, io.StringIO())
    cfg = ref.replace(out=str(tmp_path / "run"))
    thread, outcome = _start(cfg)
    with caplog.at_level(logging.WARNING, logger="munet"):
        _kill_agent_after(cfg, "a", 0, 1)
        thread.join(timeout=300)
    assert not isinstance(outcome[0], BaseException), outcome[0]
    assert "the agent of task a died (exit code -9)" in caplog.text
    assert dump(tmp_path / "run") == dump(tmp_path / "ref")


def test_agent_killed_restarts_while_the_others_keep_going(tmp_path, caplog):
    cfg = agents_config(tmp_path / "run", rounds=4)
    thread, outcome = _start(cfg)
    with caplog.at_level(logging.WARNING, logger="munet"):
        _kill_agent_after(cfg, "b", 1, 1)
        thread.join(timeout=300)
    assert not isinstance(outcome[0], BaseException), outcome[0]
    restarts = [r.getMessage() for r in caplog.records if "died" in r.getMessage()]
    assert len(restarts) == 1 and "task b" in restarts[0]
    with Store.open(cfg.out) as store:
        assert {t: r.cycle for t, r in store.agent_records().items()} == {"a": 4, "b": 4}
    assert check_store(tmp_path / "run").problems == []


@pytest.mark.parametrize("streams", ["run", "child"])
def test_resume_continues_an_interrupted_agents_run(tmp_path, streams):
    """A run whose driver stopped after one cycle (its agents stop with it): `munet resume` finishes it as an
    uninterrupted run, with one random stream for the agent or one reseeded for every child."""
    cfg = agents_config(tmp_path / "run", tasks=["a"], rounds=3, random_streams=streams)
    with Run.create(cfg, io.StringIO()):
        pass
    with Agent(AgentJob(cfg.out, "a", "a", {"rounds": 1})) as agent:  # as if interrupted after one cycle
        agent.run()
    assert "in progress (agents): 1/3 cycles published (a 1)" in format_status(run_status(cfg.out))
    summary = resume(cfg.out, {}, io.StringIO())
    ref = agents_config(tmp_path / "ref", tasks=["a"], rounds=3, random_streams=streams)
    assert summary["tasks"] == run(ref, io.StringIO())["tasks"]
    assert dump(tmp_path / "run") == dump(tmp_path / "ref")


@pytest.fixture(scope="module")
def ray_here():
    """A local Ray instance whose workers import conftest (the tiny root and tasks) like the agent processes do."""
    ray = pytest.importorskip("ray")
    tests = os.path.dirname(os.path.abspath(__file__))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.mark.ray
def test_agents_on_ray_actors_survive_a_killed_actor(tmp_path, ray_here):
    """With --executor ray the agents are Ray actors; one whose worker is SIGKILLed is restarted by Ray from its
    last publication and the run completes."""
    cfg = agents_config(tmp_path / "run", executor="ray", rounds=4)
    thread, outcome = _start(cfg)
    _kill_agent_after(cfg, "a", 0, 1)
    thread.join(timeout=300)
    assert not isinstance(outcome[0], BaseException), outcome[0]
    with Store.open(cfg.out) as store:
        assert {t: r.cycle for t, r in store.agent_records().items()} == {"a": 4, "b": 4}
    assert check_store(tmp_path / "run").problems == []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (exited, not yet reaped) is not alive
        return stat.read().split()[2] != "Z"


def _lock_pid(lock: Path, timeout: float = 120.0) -> int:
    """The pid an agent writes into its lock file, once it has written it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(lock.read_text())
        time.sleep(0.1)
    raise AssertionError(f"{lock} never held a pid")


CYCLES = 16  # of the driver-kill test


def test_driver_sigkilled_its_agents_stop_and_resume_finishes(tmp_path):
    """`munet run --schedule agents` SIGKILLed after the first publication: its agent processes stop by themselves
    (at their next generation's end) and `munet resume` finishes the run with a sound store."""
    tasks = _write_tasks(tmp_path)  # npz files and a timm root: the command needs no test registrations
    out = tmp_path / "run"
    # enough cycles that no agent can finish them between its first publication and noticing the dead driver (an
    # idle CI machine finished 6)
    argv = [*_command(tasks, out), "--schedule", "agents", "--rounds", str(CYCLES), "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k != IMPORTS_ENV} | ONE_THREAD
    driver = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in driver.stdout:
        if "published" in line:
            break
    agents = [_lock_pid(out / AGENT_LOCK.format(i)) for i in range(2)]  # the other agent may still be starting
    driver.send_signal(signal.SIGKILL)
    driver.communicate(timeout=60)
    deadline = time.monotonic() + 120
    while any(map(_alive, agents)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(_alive, agents)), "orphaned agents kept running"
    with Store.open(out) as store:  # they stopped early, not at the end of their cycles
        assert min(r.cycle for r in store.agent_records().values()) < CYCLES
    done = subprocess.run([sys.executable, "-m", "munet", "resume", str(out)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    with Store.open(out) as store:
        assert {r.cycle for r in store.agent_records().values()} == {CYCLES}
        assert store.get("plan")["done"] == 2 * CYCLES  # two tasks
    assert check_store(out).problems == []


def test_an_agents_run_that_may_grow_paths_loads_back_from_its_store(tmp_path):
    """With ``max_depth`` the root holds blocks past the root path's; the driver stores every one of them, so an agent
    publishing a grown path writes nothing outside its range, and the run rebuilds its root from the store alone."""
    cfg = agents_config(tmp_path / "run", depth=1, max_depth=3, mutation_prob=1.0)
    run(cfg, io.StringIO())
    assert check_store(cfg.out).problems == []
    predicted = load(cfg.out).predict(torch.zeros(2, 3, 12, 12, dtype=torch.uint8))
    assert {task: len(p) for task, p in predicted.items()} == {"a": 2, "b": 2}
