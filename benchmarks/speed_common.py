"""Shared parts of the speed benchmark (benchmarks/speed.py): the sizes of its rows, timings interleaved
A B B A so that load hits both sides alike, and the most sharing could save for given paths."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from munet.config import RunConfig
from munet.data.task import TaskData
from munet.evolution.loop import Evolution
from munet.evolution.system import System
from munet.model.components import NormKind, kind_of
from munet.model.path import TaskPath
from munet.model.root import Root
from munet.training.settings import TrainSettings
from munet.wiring import Wiring

CACHE_BYTES = 2048 << 20


@dataclass
class Budget:
    """Training budget of one child: steps between validations, validations, validation examples."""

    steps: int
    validations: int
    val: int
    calibration: int = 256

    def settings(self, batch_size: int) -> TrainSettings:
        return TrainSettings(batch_size=batch_size, max_steps_between_validations=self.steps,
                             validations=self.validations, max_val_examples=self.val,
                             calibration_examples=self.calibration)


@dataclass
class Sizes:
    """Everything the --quick flag shrinks."""

    reps: int  # A/B pairs per timed row (ordered A B B A ...)
    gen_reps: int  # A/B pairs of the (slow) generation rows
    single_steps: int  # training steps of the single-child row
    capture: Budget  # budget of the run whose generation is captured
    generation: Budget  # budget the captured generation is trained with
    memory: Budget  # budget of the memory subprocesses
    populate: Budget  # budget of the task iterations that fill the scaling systems
    iteration: Budget  # budget of the timed task iteration
    few_tasks: int
    many_tasks: int
    infer_batch: int


def full_sizes(cfg: RunConfig) -> Sizes:
    """Sizes of the full run, from the default configuration's budget."""
    # a sixth of a default child's steps (two validations): the ratios barely depend on the step count, and the
    # full run must stay under 15 minutes on 2 cores
    generation = Budget(max(cfg.steps_between_validations // 4, 1), 2, cfg.max_val_examples // 2)
    return Sizes(reps=3, gen_reps=1, single_steps=30, capture=Budget(2, 1, 128, 64), generation=generation,
                 memory=Budget(5, 2, 500), populate=Budget(1, 1, 64, 64), iteration=Budget(5, 2, 250),
                 few_tasks=8, many_tasks=32, infer_batch=256)


def quick_sizes() -> Sizes:
    """Small sizes: every row runs, in about 2 minutes; the ratios are only indicative."""
    return Sizes(reps=1, gen_reps=1, single_steps=6, capture=Budget(1, 1, 64, 32), generation=Budget(2, 1, 64),
                 memory=Budget(3, 1, 128), populate=Budget(1, 1, 32, 32), iteration=Budget(2, 1, 64),
                 few_tasks=4, many_tasks=12, infer_batch=64)


# --- helpers ------------------------------------------------------------------------------------------------------
def interleaved(a: Callable[[], Any], b: Callable[[], Any], reps: int) -> tuple[list[float], list[float]]:
    """Wall times of ``a`` and ``b``, run A B B A A B ... so that drifting load hits both sides alike."""
    times: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(reps):
        for side in ("ab" if r % 2 == 0 else "ba"):
            fn = a if side == "a" else b
            t0 = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - t0)
    return times["a"], times["b"]


def ratio(slow: list[float], fast: list[float]) -> float:
    """Speed-up of ``fast`` over ``slow``: ratio of the summed times of all repetitions."""
    return sum(slow) / sum(fast)


def shrink(task: TaskData, n: int) -> TaskData:
    """The task with only the first ``n`` validation and test examples (cheap evaluation while filling a system)."""
    return dataclasses.replace(task, val_x=task.val_x[:n], val_y=task.val_y[:n], test_x=task.test_x[:n],
                               test_y=task.test_y[:n])


def detached_copy(paths: list[TaskPath]) -> list[TaskPath]:
    """Deep copies of ``paths`` (shared components stay shared between the copies) without their ancestry."""
    parents = [p.parent for p in paths]
    for p in paths:
        p.parent = None
    try:
        return copy.deepcopy(paths)
    finally:
        for p, parent in zip(paths, parents):
            p.parent = parent


def new_evolution(root: Root, cfg: RunConfig, tasks: dict[str, TaskData], budget: Budget, children: int,
                  generation_size: int, max_seeds: int, seed: int = 0, system: System | None = None) -> Evolution:
    """An evolution wired as ``munet run`` wires one (``wiring.Wiring``), on an already loaded root, with this
    benchmark's budget; it keeps the spec's seed phase (the probes take the first children's slots) and clones
    blocks with μ, as the measured figures did."""
    wiring = Wiring.of(cfg.replace(children_per_task=children, generation_size=generation_size, max_seeds=max_seeds,
                                   seed=seed, separate_probes=False, clone_prob=cfg.mutation_prob,
                                   feature_cache_mb=CACHE_BYTES >> 20))
    return wiring.evolution(system or wiring.system(root), tasks, budget.settings(cfg.batch_size))


def max_abs_diff(a: list[TaskPath], b: list[TaskPath]) -> float:
    """Largest difference between the weights of corresponding paths."""
    worst = 0.0
    for pa, pb in zip(a, b):
        for name, comp in pa.components.items():
            other = pb.components[name].module.state_dict()
            for key, value in comp.module.state_dict().items():
                worst = max(worst, (value.float() - other[key].float()).abs().max().item())
    return worst


def op_flops(path: TaskPath, op: tuple[str, ...]) -> float:
    """Forward multiply-adds of one op for one image (the component kinds' counts of ``TaskPath.flops``)."""
    c = path.components
    dim = c["cls"].module.value.shape[-1]
    tokens = c["posembed"].module.value.shape[1]
    if isinstance(kind_of(op[0]), NormKind):
        return float(dim)  # the LayerNorm of the class token, which path FLOPs leave out
    return float(sum(kind_of(name).macs(c[name].module, tokens, dim) for name in op))


def sharing_ceiling(paths: list[TaskPath], training: bool) -> float:
    """Work of running ``paths`` one by one over the work when every prefix shared by component ids is computed
    once: the most any sharing can save. For training, an op on or after the first trainable one costs 3x its
    forward if it trains (forward, input and weight gradients), else 2x; only frozen prefixes can be shared."""
    alone = distinct = 0.0
    seen: set[tuple[int, ...]] = set()
    for path in paths:
        ops = path.ops()
        shareable = path.first_trainable_op(ops) if training else len(ops)
        for i, op in enumerate(ops):
            work = op_flops(path, op)
            if i < shareable:
                alone += work
                key = path.prefix_key(i + 1, ops)
                if key not in seen:
                    seen.add(key)
                    distinct += work
            else:
                trains = any(path.components[n].is_trainable() for n in op)
                alone += (3 if trains else 2) * work
                distinct += (3 if trains else 2) * work
    return alone / distinct

