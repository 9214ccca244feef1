"""The Ray executor: one Ray task per child, frozen components shared through Ray's object store.

Each child of a generation becomes a Ray task that rebuilds the child's path in a worker, trains it alone
(:func:`~munet.training.trainer.train_alone`: the one-by-one semantics that ``shared_training = false`` runs
locally, with the same results as lock-step training) and returns only its trained components, their momentum
traces, its :class:`~munet.training.trainer.ChildOutcome` and the end state of its random stream. Frozen
components go into the object store once, as numpy arrays that every worker of a node reads zero-copy; their
weights never change once frozen, so a component put in one generation serves the later ones too. A task whose
worker dies is retried (``MAX_RETRIES``) with the same arguments, hence the same result.

Ray is imported when the executor first trains, so ``munet`` itself does not need it.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from munet.data.task import TaskData
from munet.distributed.transfer import (
    Arrays,
    PackedComponent,
    nbytes,
    pack_task,
    task_nbytes,
    to_arrays,
    to_tensors,
    unpack_task,
)
from munet.errors import MunetError
from munet.evolution.system import Scorer
from munet.model.path import TaskPath
from munet.training.evaluate import Evaluator
from munet.training.frozen import FeatureCache
from munet.training.settings import TrainSettings
from munet.training.trainer import ChildOutcome, stream_after, train_alone

MAX_RETRIES = 3  # attempts after a worker dies in the middle of a child
#: Fault injection for the tests: a worker that finds this variable set and the file it names absent creates the
#: file and dies (``os._exit``) before training, so exactly one attempt of one child fails.
FAULT_ENV = "MUNET_FAULT_KILL_CHILD_ONCE"


@dataclass
class ChildSpec:
    """What a worker needs of a child besides the shared components: its identity, hparams, the component id and
    locks of each slot, its own (trainable) components and the score it must beat."""

    path_id: int
    task: str
    hparams: dict[str, Any]
    fresh_head: bool
    slots: dict[str, tuple[int, set[str]]]
    trainable: list[PackedComponent]
    parent_score: float


@dataclass
class ChildResult:
    """What comes back from a worker: the outcome, trained weights and momentum traces by component id, and the
    end state of the child's random stream."""

    outcome: ChildOutcome
    trained: dict[int, Arrays]
    momentum: dict[int, Arrays | None]
    end_state: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(nbytes(a) for a in self.trained.values()) + sum(nbytes(a) for a in self.momentum.values())


@dataclass
class Traffic:
    """Bytes a generation moved through the object store.

    Attributes:
        frozen_put: frozen components put (those no earlier generation had put).
        task_put: task data put (once per task).
        to_workers: the children's own components, sent with each task.
        from_workers: trained components and momentum traces returned.
        driver_s: seconds the driver spent packing, putting and loading (not waiting for workers).
    """

    frozen_put: int
    task_put: int
    to_workers: int
    from_workers: int
    driver_s: float = 0.0


def _fault_point() -> None:
    marker = os.environ.get(FAULT_ENV)
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


def train_child(spec: ChildSpec, task: TaskData, ds_hparams: dict[str, Any], settings: TrainSettings,
                cache_bytes: int, mean: tuple, std: tuple, scorer: Scorer, start: np.ndarray, threads: int,
                *frozen: PackedComponent) -> ChildResult:
    """The Ray task: rebuilds the child on ``settings.device`` and trains it alone from generator state ``start``
    with ``threads`` torch threads (fixed, so results do not depend on the worker's machine)."""
    _fault_point()
    torch.set_num_threads(threads)
    device = settings.device
    own = {p.cid: p for p in spec.trainable}
    shared = {p.cid: p for p in frozen}
    built = {}
    for cid, locks in spec.slots.values():
        if cid not in built:
            packed = own.get(cid) or shared[cid]
            built[cid] = packed.unpack(locks, device, writable=cid in own)
    path = TaskPath(spec.path_id, spec.task, {slot: built[cid] for slot, (cid, _) in spec.slots.items()},
                    spec.hparams, fresh_head=spec.fresh_head)
    evaluator = Evaluator(settings, FeatureCache(cache_bytes), mean, std)
    outcome, end = train_alone(path, spec.parent_score, unpack_task(task), ds_hparams, settings, evaluator, scorer,
                               torch.from_numpy(start.copy()))
    mine = path.trainable_components()
    return ChildResult(outcome, {c.id: to_arrays(c.module.state_dict()) for c in mine},
                       {c.id: None if c.momentum is None else to_arrays(c.momentum) for c in mine}, end.numpy())


class RayExecutor:
    """Trains each child as a Ray task on the cluster at ``address``.

    Args:
        address: the Ray cluster (``ray start --head`` prints it); ``None``: the one ``RAY_ADDRESS`` or a local
            ``ray start`` names, else a new single-machine instance. Ignored when Ray is already initialised.
        threads: torch threads (and CPUs asked of Ray) per child; results equal a local run's with as many threads
            (the CPU kernels a matrix product picks may depend on them).
        gpus_per_child: GPUs asked of Ray per child when the device is CUDA.

    ``traffic`` lists each generation's :class:`Traffic`.
    """

    def __init__(self, address: str | None = None, *, threads: int = 1, gpus_per_child: float = 1.0):
        self.address, self.threads, self.gpus_per_child = address, threads, gpus_per_child
        self.traffic: list[Traffic] = []
        self._remote: Any = None
        self._remote_options: Any = None  # the remote function with the resources each child asks for
        self._frozen: dict[int, Any] = {}  # component id -> object ref
        self._tasks: dict[str, Any] = {}  # task name -> object ref

    def _ray(self) -> Any:
        ray = connect_ray(self.address)
        if self._remote is None:
            self._remote = ray.remote(train_child)
        return ray

    def _options(self, ray: Any, device: torch.device) -> dict[str, Any]:
        gpus = self.gpus_per_child if device.type == "cuda" else 0
        if gpus and ray.cluster_resources().get("GPU", 0) < gpus:
            raise MunetError(f"device {device} asks for {gpus} GPU per child but the Ray cluster has "
                             f"{ray.cluster_resources().get('GPU', 0)}; join GPU workers or run with --device cpu")
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
        if self.threads > largest:
            raise MunetError(f"each child asks for {self.threads} CPUs (the driver's threads) but the largest Ray "
                             f"node has {largest:g}; run with --threads {max(int(largest), 1)} or fewer")
        options: dict[str, Any] = {"num_cpus": self.threads, "num_gpus": gpus, "max_retries": MAX_RETRIES}
        if os.environ.get(FAULT_ENV):  # workers started before the variable was set would not see it
            options["runtime_env"] = {"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}}
        return options

    def train(self, children: list[TaskPath], parent_scores: list[float], task: TaskData, ds_hparams: dict[str, Any],
              settings: TrainSettings, evaluator: Evaluator, scorer: Scorer, generator: torch.Generator,
              on_step: Callable[[int], None] | None = None) -> list[ChildOutcome]:
        """Trains ``children`` as Ray tasks (see :class:`~munet.distributed.executor.Executor`); ``on_step`` gets
        each child's steps when it comes back."""
        # Ray's client draws from Python's global random stream (when it starts or joins a cluster, for one); a run
        # checkpoints that stream, so training here must leave it as a local run does
        python_rng = random.getstate()
        try:
            return self._train(children, parent_scores, task, ds_hparams, settings, evaluator, scorer, generator,
                               on_step)
        finally:
            random.setstate(python_rng)

    def _train(self, children: list[TaskPath], parent_scores: list[float], task: TaskData, ds_hparams: dict[str, Any],
               settings: TrainSettings, evaluator: Evaluator, scorer: Scorer, generator: torch.Generator,
               on_step: Callable[[int], None] | None) -> list[ChildOutcome]:
        ray = self._ray()
        if self._remote_options is None:
            self._remote_options = self._remote.options(**self._options(ray, settings.device))
        remote = self._remote_options
        traffic = Traffic(0, 0, 0, 0)
        t0 = time.perf_counter()
        if task.name not in self._tasks:
            packed_task = pack_task(task)
            self._tasks[task.name] = ray.put(packed_task)
            traffic.task_put = task_nbytes(packed_task)
        start = generator.get_state().numpy()
        refs = []
        for child, score in zip(children, parent_scores):
            frozen = [c for c in child.components.values() if not c.is_trainable()]
            for comp in frozen:
                if comp.id not in self._frozen:
                    packed = PackedComponent.of(comp)
                    self._frozen[comp.id] = ray.put(packed)
                    traffic.frozen_put += packed.nbytes
            own = [PackedComponent.of(c) for c in child.trainable_components()]
            traffic.to_workers += sum(p.nbytes for p in own)
            slots = {slot: (c.id, set(c.locks)) for slot, c in child.components.items()}
            spec = ChildSpec(child.id, child.task, child.hparams, child.fresh_head, slots, own, score)
            refs.append(remote.remote(spec, self._tasks[task.name], ds_hparams, settings, evaluator.cache.max_bytes,
                                      evaluator.mean, evaluator.std, scorer, start, self.threads,
                                      *[self._frozen[c.id] for c in frozen]))
        results: dict[int, ChildResult] = {}
        pending = list(refs)
        traffic.driver_s = time.perf_counter() - t0
        while pending:  # progress as children come back, in whatever order they finish
            done, pending = ray.wait(pending, num_returns=1)
            result = results[refs.index(done[0])] = ray.get(done[0])
            if on_step:
                on_step(result.outcome.steps)
        ordered = [results[i] for i in range(len(children))]
        t0 = time.perf_counter()
        for child, result in zip(children, ordered):
            _load(child, result)
            traffic.from_workers += result.nbytes
        generator.set_state(stream_after([(r.outcome, torch.from_numpy(r.end_state.copy())) for r in ordered]))
        traffic.driver_s += time.perf_counter() - t0
        self.traffic.append(traffic)
        return [r.outcome for r in ordered]


def connect_ray(address: str | None) -> Any:
    """The ``ray`` module, connected to the cluster at ``address`` (or a new local instance) unless it already is.

    Raises:
        MunetError: the cluster cannot be reached or started; the message says how to fix it.
    """
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise MunetError(f"cannot start or reach {where}: {err}; start a cluster with `ray start --head` "
                             "and pass the address it prints as --ray-address; a cluster with token "
                             "authentication (Ray's default since 2.59) also needs RAY_AUTH_MODE=token and its "
                             "token (`ray get-auth-token` on the head) in RAY_AUTH_TOKEN") from err
    return ray


def _load(child: TaskPath, result: ChildResult) -> None:
    """Puts a worker's training into the driver's child: weights, momentum traces, modes as training leaves them."""
    for comp in child.trainable_components():
        comp.module.load_state_dict(to_tensors(result.trained[comp.id], writable=False))
        momentum = result.momentum[comp.id]
        comp.momentum = None if momentum is None else to_tensors(momentum, writable=True)
    child.set_mode(train=False)
