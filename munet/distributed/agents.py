"""µ3Net's asynchronous agents (``schedule = "agents"``, spec §7.3): one agent per task, evolving its task in
cycles (the analogue of task iterations) concurrently with the others, sharing state only through the run's store.

Before each cycle an agent adopts every other agent's latest published path (the seeds of its cycle, as the
round-robin loop's seed phase uses other tasks' retained paths); at the cycle's end it publishes its task's
retained path in one transaction: the paths it sampled, the components it created and its own record
(:meth:`~munet.storage.store.Store.open_agent`). An agent only ever writes components it created, whose ids lie
in its own range (``ID_SPAN`` ids from ``(position + 1) · ID_SPAN``), and a stored component is never rewritten:
other tasks' components are locked in its system, so it can reuse or clone them but never train them (no
forgetting). Each cycle's random streams are seeded by (seed, task, cycle), so an agent killed in a cycle restarts
from its last publication and repeats that cycle as it would have run, given the same published paths.

Agents run as local processes (``multiprocessing``, spawn) or as Ray actors (``executor = "ray"``); the driver
restarts one that dies (up to ``MAX_RESTARTS`` times), prints each publication, and when every agent has finished
merges the publications into one ordinary checkpoint, which ``status``, ``report``, ``predict`` and ``export``
read as they read a round-robin run.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from munet.config import RunConfig
from munet.data.registry import load_task
from munet.data.rows import set_data_cache_bytes
from munet.errors import MunetError, StoreError, TaskUnavailable
from munet.evolution.system import System
from munet.model.components import NOT_TRAINABLE, Component
from munet.model.path import TaskPath
from munet.model.roots import load_root
from munet.storage.records import LivePathRecord
from munet.storage.snapshot import (
    component_from_record,
    component_record,
    path_from_record,
    path_row,
)
from munet.storage.store import Store
from munet.storage.stored_root import stored_posembed_resize, verify_root
from munet.wiring import Wiring, resolve_device, train_settings, use_threads

if TYPE_CHECKING:
    from munet.runner import Run

log = logging.getLogger("munet")

ID_SPAN = 1_000_000  # path and component ids of one agent: [(position + 1) · ID_SPAN, (position + 2) · ID_SPAN)
MAX_RESTARTS = 3  # restarts of one agent that died (killed, out of memory) before the run gives up
POLL_S = 1.0  # how often the driver looks for publications and dead agents
USER_ERROR = 2  # an agent's exit code for bad input (a MunetError): restarting it would fail again
#: Modules every agent imports first (comma-separated), e.g. a script's that registers custom tasks or roots with
#: ``register_task``/timm: an agent is a fresh process, which knows only what it imports.
IMPORTS_ENV = "MUNET_AGENT_IMPORTS"


def cycle_seed(seed: int, task: str, cycle: int) -> int:
    """The seed of an agent's random streams in one cycle: a function of (run seed, task, cycle) only, so a cycle
    repeated after a restart draws what it drew the first time (32 bits: it also seeds the batch stream)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{task}:{cycle}".encode()).digest()[:4], "big")


@dataclass(frozen=True)
class AgentJob:
    """What an agent process or actor needs: the run, its task (name and spec), the driver's operational keys,
    the modules to import first and, for a local process, the driver's pid (it exits when the driver is gone)."""

    run_dir: str
    task: str
    spec: str
    overrides: dict[str, Any] = field(default_factory=dict)
    imports: tuple[str, ...] = ()
    driver_pid: int | None = None


# --- shared by agents and the driver ----------------------------------------------------------------------------
def adopt_published(store: Store, system: System, skip: str | None = None) -> None:
    """Replaces each task's population in ``system`` by its agent's latest published path (but ``skip``'s), then
    links every retained path to its recorded parent (the root when the parent is no longer held: spec §7.3) and
    sets the locks: each component locked by the tasks whose retained path uses it."""
    held: dict[int, Component] = {c.id: c for c in system.components().values()}
    held.update({c.id: c for c in system.posembed_cache.values()})
    links = {p.id: p.parent.id if p.parent else None for p in system.retained_paths()}
    for rec in store.agent_records().values():
        if rec.path is None or rec.task == skip or rec.task not in system.paths:
            continue
        if [p.id for p in system.paths[rec.task]] != [rec.path.id]:
            system.paths[rec.task] = [_path(store, system, rec.path, held)]
            links[rec.path.id] = rec.path.link
    by_id = {p.id: p for p in [system.root_path, *system.retained_paths()]}
    for path in system.retained_paths():
        path.parent = by_id.get(links.get(path.id), system.root_path)
    for comp in [*system.components().values(), *system.posembed_cache.values()]:
        comp.locks &= {NOT_TRAINABLE}
    for path in system.retained_paths():
        for comp in path.components.values():
            comp.locks.add(path.task)


def _path(store: Store, system: System, rec: LivePathRecord, held: dict[int, Component]) -> TaskPath:
    """The path of ``rec``, its components taken from ``held`` or read from the store (and added to ``held``)."""
    missing = set(rec.components.values()) - held.keys()
    for r in store.components(missing):
        comp = component_from_record(store, r, system.root)
        comp.locks &= {NOT_TRAINABLE}  # the tasks' locks are set from the retained paths
        held[r.id] = comp
    absent = missing - held.keys()
    if absent:
        raise StoreError(f"the published path #{rec.id} of task {rec.task} uses component(s) "
                         f"{', '.join(map(str, sorted(absent)))}, which {store.dir} does not hold; run `munet check "
                         f"{store.dir}`")
    return path_from_record(rec, {name: held[cid] for name, cid in rec.components.items()}, system.root.patch_size,
                            system.num_classes.get(rec.task))


# --- one agent --------------------------------------------------------------------------------------------------
class Agent:
    """The agent of one task: its own system (the root, the others' published paths, its task's population) and
    evolution, opened from the run's store where its last publication left it. Use it as a context manager."""

    def __init__(self, job: AgentJob):
        for module in job.imports:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise MunetError(f"cannot import {module!r}, named in {IMPORTS_ENV}: {err}; make it importable in "
                                 "the agents' processes (PYTHONPATH) or remove it") from err
        self.job, self.task = job, job.task
        self.store = store = Store.open_agent(job.run_dir, job.task)
        try:
            cfg = RunConfig.from_stored(store.get("config")).replace(**job.overrides).replace(
                executor="local", ray_address=None, out=job.run_dir)  # an agent trains its children itself
            self.cfg = cfg
            use_threads(cfg.threads)
            root = load_root(cfg.root, cfg.root_depth())
            root.posembed_resize = stored_posembed_resize(store)
            set_data_cache_bytes(cfg.data_cache_mb << 20)
            data = load_task(job.spec, cfg.seed, cfg.data_dir)
            wiring = Wiring.of(cfg)
            system = wiring.system(root)
            verify_root(store, root, system)
            for name, classes in store.task_class_names().items():
                system.add_task(name, len(classes))
            self.evolution = wiring.evolution(system, {job.task: data}, train_settings(cfg, resolve_device(cfg.device)))
            self.base = (store.task_names().index(job.task) + 1) * ID_SPAN
            record = store.agent_records().get(job.task)
            state = record.state if record else {}
            self.cycle = record.cycle if record else 0
            system.next_path_id = state.get("next_path_id", self.base)
            system.next_component_id = state.get("next_component_id", self.base)
            self._restore_posembeds({int(g): cid for g, cid in state.get("posembeds", {}).items()})
            adopt_published(store, system)  # its own publication too: where it restarts from
        except BaseException:
            store.close()
            raise

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()

    @property
    def system(self) -> System:
        return self.evolution.system

    def _restore_posembeds(self, posembeds: dict[int, int]) -> None:
        """The resized position embeddings this agent made (kept by id, so a restarted agent reuses them)."""
        cached = {c.id for c in self.system.posembed_cache.values()}
        by_id = {r.id: r for r in self.store.components({cid for cid in posembeds.values() if cid not in cached})}
        for grid, cid in posembeds.items():
            if cid not in cached:
                self.system.posembed_cache[grid] = component_from_record(self.store, by_id[cid], self.system.root)

    def run(self) -> int:
        """Runs the remaining cycles, publishing after each; returns the cycles done."""
        if self.job.driver_pid is not None:
            self.evolution.after_generation.append(self._exit_without_driver)
        while self.cycle < self.cfg.rounds:
            self.run_cycle()
        return self.cycle

    def run_cycle(self) -> TaskPath | None:
        """One cycle: adopt the others' latest publications, evolve the task one iteration, publish."""
        evo, system = self.evolution, self.system
        adopt_published(self.store, system, skip=self.task)
        seed = cycle_seed(self.cfg.seed, self.task, self.cycle)
        evo.policy.rng.seed(seed)
        random.seed(seed)
        torch.manual_seed(seed)
        evo.search, evo.iteration = evo.search.replace(seed=seed), self.cycle  # batches: seed · 1,000,003 + cycle
        state = evo.begin(self.task)
        sampled = []
        while not evo.finished(state):
            sampled += [path_row(system, child) for child in evo.step(state)]  # before finish() relinks parents
        best = evo.finish(state)
        self.publish(best, sampled)
        self.cycle += 1
        return best

    def publish(self, best: TaskPath | None, sampled: list[dict[str, Any]]) -> None:
        """Writes the cycle's sampled paths, the new components of ``best`` (and of the position-embedding cache)
        and this agent's record in one transaction.

        Raises:
            StoreError: a component to write lies outside this agent's id range (it would be another agent's).
        """
        system, store = self.system, self.store
        comps = {c.id: c for c in system.posembed_cache.values()}
        comps.update({c.id: c for c in (best.components.values() if best else ())})
        known = store.component_ids()
        new = [comp for cid, comp in comps.items() if cid not in known]
        end = self.base + ID_SPAN
        foreign = sorted(c.id for c in new if not self.base <= c.id < end)
        if foreign or max(system.next_path_id, system.next_component_id) > end:
            raise StoreError(f"the agent of task {self.task} would write ids outside its range [{self.base}, {end}) "
                             f"(components {foreign}, next ids {system.next_path_id}, {system.next_component_id})")
        records = [component_record(store, comp) for comp in new]  # blobs first, then one transaction
        state = {"link": best.parent.id if best and best.parent else None, "next_path_id": system.next_path_id,
                 "next_component_id": system.next_component_id,
                 "posembeds": {str(g): c.id for g, c in system.posembed_cache.items()}}
        with store.transaction():
            store.record_paths(sampled)
            if best is not None:
                store.update_paths([path_row(system, best)])  # its test accuracy and accounting moved on
            store.add_components(records)
            store.set_agent(self.task, self.cycle + 1, best.id if best else None, state)

    def _exit_without_driver(self, *_: object) -> None:
        if os.getppid() != self.job.driver_pid:  # the driver died: stop at a generation's end, as a kill would
            raise SystemExit(1)


def agent_main(job: AgentJob) -> int:
    """An agent's entry point (a process or a Ray actor's method): runs it to the end; returns its cycles.

    Bad input exits the process with :data:`USER_ERROR` after an ``error:`` line (the driver does not restart it).
    """
    try:
        with Agent(job) as agent:
            return agent.run()
    except MunetError as err:
        if job.driver_pid is None:
            raise
        sys.stderr.write(f"error: agent {job.task}: {err}\n")
        sys.stderr.flush()
        os._exit(USER_ERROR)


class AgentActor:
    """The Ray actor of one agent; Ray restarts it (and retries :meth:`run`) when its worker dies."""

    def run(self, job: AgentJob) -> int:
        return agent_main(job)


# --- the driver -------------------------------------------------------------------------------------------------
def run_agents(run: Run) -> None:
    """Runs an agents run's remaining cycles, one agent per task, restarting agents that die, then merges the
    publications into the run's checkpoint.

    Raises:
        MunetError: an agent failed on bad input, or died more than ``MAX_RESTARTS`` times.
    """
    from munet.runner import OPERATIONAL_KEYS

    cfg, store = run.cfg, run.store
    specs = {}
    for spec in cfg.tasks:  # each task's spec by name (loaded already: the registry's cache answers)
        try:
            specs[load_task(spec, cfg.seed, cfg.data_dir).name] = spec
        except TaskUnavailable:
            continue
    overrides = {k: v for k, v in cfg.to_dict().items() if k in OPERATIONAL_KEYS}
    imports = tuple(m for m in os.environ.get(IMPORTS_ENV, "").split(",") if m)
    done = {task: rec.cycle for task, rec in store.agent_records().items()}
    todo = [task for task in run.tasks if done.get(task, 0) < cfg.rounds]
    watch = Publications(run, done)
    if todo:
        run.stream.write(f"agents: {', '.join(todo)} ({cfg.rounds} cycle(s) each, "
                         f"{'Ray actors' if cfg.executor == 'ray' else 'local processes'})\n")
        run.stream.flush()
        jobs = [AgentJob(str(run.out), task, specs[task], overrides, imports) for task in todo]
        if cfg.executor == "ray":
            _on_ray(jobs, cfg.ray_address, max(1, cfg.threads), watch)
        else:
            _in_processes(jobs, watch)
    watch.poll()
    merge_publications(run)


class Publications:
    """Prints each agent's publications as the driver finds them in the store."""

    def __init__(self, run: Run, done: dict[str, int]):
        self.run, self.seen = run, dict(done)

    def poll(self) -> None:
        for task, rec in sorted(self.run.store.agent_records().items()):
            if rec.cycle <= self.seen.get(task, 0):
                continue
            self.seen[task] = rec.cycle
            scores = {k: rec.path.metrics.get(k) for k in ("quality", "test_quality")} if rec.path else {}
            kept = "nothing kept" if rec.path is None else (f"path #{rec.path.id}, " + ", ".join(
                f"{label} {scores[k]:.4f}" for k, label in (("quality", "val"), ("test_quality", "test"))
                if scores[k] is not None))
            self.run.stream.write(f"agent {task}: cycle {rec.cycle}/{self.run.cfg.rounds} published: {kept}\n")
            self.run.stream.flush()


def _in_processes(jobs: list[AgentJob], watch: Publications) -> None:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads or Ray state
    restarts = {job.task: 0 for job in jobs}
    by_task = {job.task: AgentJob(**{**job.__dict__, "driver_pid": os.getpid()}) for job in jobs}
    running: dict[str, multiprocessing.process.BaseProcess] = {}

    def start(task: str) -> None:
        running[task] = context.Process(target=agent_main, args=(by_task[task],), name=f"munet-agent-{task}")
        running[task].start()

    try:
        for task in by_task:
            start(task)
        while running:
            multiprocessing.connection.wait([p.sentinel for p in running.values()], timeout=POLL_S)
            watch.poll()
            for task, process in list(running.items()):
                if process.exitcode is None:
                    continue
                del running[task]
                code = process.exitcode
                if code == 0:
                    continue
                if code == USER_ERROR:
                    raise MunetError(f"the agent of task {task} stopped on an error (above); fix it, then `munet "
                                     f"resume {by_task[task].run_dir}`")
                if restarts[task] >= MAX_RESTARTS:
                    raise MunetError(f"the agent of task {task} died {restarts[task] + 1} times (last exit code "
                                     f"{code}); `munet resume {by_task[task].run_dir}` continues the run")
                restarts[task] += 1
                log.warning("the agent of task %s died (exit code %s); restarting it from its last publication "
                            "(%d/%d)", task, code, restarts[task], MAX_RESTARTS)
                start(task)
    finally:
        for process in running.values():  # the others, when one failed for good (or the driver is interrupted)
            process.terminate()
            process.join()


def _on_ray(jobs: list[AgentJob], address: str | None, cpus: int, watch: Publications) -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from munet.distributed.ray_executor import connect_ray

    ray = connect_ray(address)
    # on the driver's node: agents write the run's SQLite database, whose WAL needs every writer on one host
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor_class = ray.remote(num_cpus=cpus, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS,
                             scheduling_strategy=here)(AgentActor)
    actors = {job.task: actor_class.remote() for job in jobs}  # held: an actor without a handle is destroyed
    pending = {actors[job.task].run.remote(job): job.task for job in jobs}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
        watch.poll()
        for ref in done:
            task = pending.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as err:
                raise MunetError(f"the agent of task {task} failed on Ray: {err}") from err


def merge_publications(run: Run) -> None:
    """Adopts every agent's last publication into the driver's system and saves it as the run's checkpoint (the
    plan done as far as the agents' cycles go), so readers see an agents run as they see a round-robin one."""
    store, system, state = run.store, run.system, run.state
    records = store.agent_records()
    adopt_published(store, system)
    for rec in records.values():
        system.next_path_id = max(system.next_path_id, rec.state["next_path_id"])
        system.next_component_id = max(system.next_component_id, rec.state["next_component_id"])
    state.done = sum(min(rec.cycle, run.cfg.rounds) for rec in records.values())
    state.in_flight = None
    run.evolution.iteration = state.done
    run.save()
