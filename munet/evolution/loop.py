"""The evolutionary loop: round-robin task iterations, generations, parent sampling (spec §4, §9)."""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

from munet.config import generations_per_iteration
from munet.data.task import TaskData
from munet.distributed.executor import Executor, LocalExecutor
from munet.evolution.hparams import (
    DATA_RANGES,
    DEFAULTS,
    LR_SCALE,
    MutationPolicy,
    check_image_sizes,
    image_sizes,
    incremental_mutation,
)
from munet.evolution.mutate import make_child
from munet.evolution.system import System
from munet.model.components import NOT_TRAINABLE
from munet.model.path import TaskPath
from munet.training.evaluate import Evaluator
from munet.training.schedule import ramped_lengths
from munet.training.settings import TrainSettings

log = logging.getLogger("munet")


def continues_lineage(parent: TaskPath, task: str) -> bool:
    """Whether a child of ``parent`` continues a trained lineage of ``task``: its parent is a mutated path of the
    task, not a probe, another task's path or the root (whose score says nothing of the child's changes)."""
    return parent.task == task and not parent.metrics.get("seed_probe")


def grows_from_root(path: TaskPath, task: str) -> bool:
    """Whether ``path`` descends from the root through paths of ``task`` only: nothing in it was transferred from
    another task (a probe of another task's path, or a child of one, does not)."""
    return all(p.task in (task, NOT_TRAINABLE) for p in path.ancestors())


class Hook(list):
    """Callbacks called in order with the same arguments (EvoTorch's hooks): ``hook.append(callback)`` adds one
    without replacing another's."""

    def __call__(self, *args: Any) -> None:
        for callback in self:
            callback(*args)


@dataclass
class IterationState:
    """Where a task iteration stands between two generations: all that resuming it exactly needs.

    Args:
        task: the task being evolved.
        seeds: other tasks' retained paths and the root, probed first (seed phase), then fallback parents.
        next_seed: index of the next seed to probe.
        generation: index of the next generation.
        generator: the iteration's stream of training batches and augmentations.
    """

    task: str
    seeds: list[TaskPath]
    next_seed: int
    generation: int
    generator: torch.Generator


class Evolution:
    """Evolves ``system`` over ``tasks``.

    Args:
        system: the multitask system (root plus retained paths).
        tasks: loaded data per task name.
        policy: mutation-probability policy (holds the evolution's random stream).
        settings: per-child training budget.
        evaluator: validation/test evaluation with its frozen-feature cache.
        children_per_task: children per task iteration.
        generation_size: children per generation.
        max_image_size: upper end of the evolvable image sizes (a multiple of the root's patch size).
        mutate_adapters: allow adapter insertion.
        max_task_population: population cap per task after each generation (0: none).
        max_seeds: at most this many other tasks' paths probed per task iteration (0: all).
        seed: seed of the training-batch stream.
        separate_probes: probe the seeds in a generation of their own before the task's ``children_per_task``
            mutated children, instead of in the first children's slots (the spec); see :meth:`generations`.
        probe_validations: validation periods a probe of a separate probe generation trains (0: as a child).
        schedule_span: ``child`` (the spec: every child runs the whole warmup-cosine) or ``iteration`` (the
            children's generations run consecutive parts of one schedule over the task iteration).
        parent_decay: the parent sampling's walk over the task's paths, best first, takes each w.p.
            ``parent_decay ** offsprings`` (the spec: 0.5); 1 always extends the best path.
        lineage_lr_decay: a child of a mutated path of its own task trains at this times its parent's learning-rate
            scale (``LR_SCALE`` in its hparams; see :meth:`lr_scale`); 1: no scale (the spec).
        judged_mutations: a child that does not continue a lineage (see :func:`continues_lineage`) only clones
            blocks, since its acceptance cannot judge other changes; false: every child draws every mutation (spec).
        root_clones_only: a child whose parent grows from the root alone (see :func:`grows_from_root`) only clones
            blocks, and the data hparams hold while the task's best path does: with nothing transferred, the
            hyperparameter search is a lottery the children's validation cannot judge; false: the spec.
        first_task_finetune: while nothing can be transferred to a task (see :meth:`alone`), its children only clone
            blocks and inherit momentum, and the data hparams hold: one fine-tuning run cut into children.
        length_ramp: the children's generations of a task iteration train validation periods rising linearly from
            ``1 - length_ramp`` to ``1 + length_ramp`` times ``settings.validations``, the iteration's total kept
            (see :meth:`child_settings`); 0: every child trains ``settings.validations`` (the spec).
        affordable_clones: a mutated child of the task's own path gives back the clones that would leave it unable
            to beat its parent's score (:func:`munet.evolution.mutate.affordable`); false: the spec.
        given_back_adapters: with ``affordable_clones``, a layer whose clone was given back gets a fresh adapter
            instead, where the child can afford it (:func:`munet.evolution.mutate.adapters_for`).
        executor: where each generation's children train (:mod:`munet.distributed.executor`); in this process
            by default.

    Hooks (:class:`Hook` lists; append callbacks to them) run at fixed points of :meth:`step`:

    * ``before_training(task, generation, children, scores_to_beat, data_hparams)``: the generation sampled, untrained;
    * ``on_step(children_trained)``: after every training step (progress);
    * ``after_training(task, generation, children, outcomes)``: the generation trained, before selection;
    * ``after_generation(task, generation, children)``: selection done, the population pruned.
    """

    def __init__(self, system: System, tasks: dict[str, TaskData], policy: MutationPolicy, settings: TrainSettings,
                 evaluator: Evaluator, *, children_per_task: int, generation_size: int, max_image_size: int,
                 mutate_adapters: bool = True, max_task_population: int = 0, max_seeds: int = 0, seed: int = 0,
                 separate_probes: bool = False, probe_validations: int = 0, schedule_span: str = "child",
                 parent_decay: float = 0.5, lineage_lr_decay: float = 1.0, judged_mutations: bool = False,
                 length_ramp: float = 0.0, affordable_clones: bool = False, given_back_adapters: bool = False,
                 root_clones_only: bool = False, first_task_finetune: bool = False, executor: Executor | None = None):
        self.system, self.tasks, self.policy = system, tasks, policy
        self.settings, self.evaluator = settings, evaluator
        self.children_per_task, self.generation_size = children_per_task, generation_size
        patch = system.root.patch_size
        check_image_sizes(system.root_path.hparams["ds_image_size"], max_image_size, patch)
        self.sizes = image_sizes(patch, max_image_size)
        self.mutate_adapters = mutate_adapters
        self.max_task_population, self.max_seeds = max_task_population, max_seeds
        self.seed = seed
        self.separate_probes = separate_probes
        self.probe_settings = (dataclasses.replace(settings, validations=probe_validations)
                               if separate_probes and probe_validations else settings)
        self.schedule_span, self.parent_decay, self.lineage_lr_decay = schedule_span, parent_decay, lineage_lr_decay
        self.judged_mutations, self.root_clones_only = judged_mutations, root_clones_only
        self.first_task_finetune = first_task_finetune
        self.length_ramp = length_ramp
        self.affordable_clones = affordable_clones
        self.given_back_adapters = given_back_adapters
        self.executor = executor or LocalExecutor()
        self.iteration = 0  # task iterations done, across rounds and resumed runs
        self.before_training: Hook = Hook()
        self.on_step: Hook = Hook()
        self.after_training: Hook = Hook()
        self.after_generation: Hook = Hook()

    @property
    def rng(self) -> random.Random:
        return self.policy.rng

    def steps_per_child(self, task: str) -> int:
        """Training steps of a child of ``task`` (on average over the iteration's children with ``length_ramp``)."""
        k = self.settings.steps_between_validations(len(self.tasks[task].train_y))
        return k * self.settings.validations

    def children_periods(self) -> list[int]:
        """Per children's generation of a task iteration, the validation periods its children train in all."""
        return [n * min(self.generation_size, self.children_per_task - g * self.generation_size)
                for g, n in enumerate(self.lengths())]

    def work_done(self, task: str, generations: int) -> int:
        """Training steps of the first ``generations`` generations of an iteration of ``task``, for progress: exact
        for the children, and for separate probes assuming every other task has a retained path by then."""
        k = self.settings.steps_between_validations(len(self.tasks[task].train_y))
        first = int(self.separate_probes)
        work = k * sum(self.children_periods()[: max(generations - first, 0)])
        if self.separate_probes and generations > 0:
            work += self.probes() * k * self.probe_settings.validations
        return work

    def iteration_work(self, task: str) -> int:
        """Training steps of one whole iteration of ``task`` (see :meth:`work_done`)."""
        return self.work_done(task, self.generations())

    def probes(self) -> int:
        """Seeds probed per task iteration (the root and other tasks' paths), once every other task has a path."""
        others = len(self.tasks) - 1
        return 1 + (min(others, self.max_seeds) if self.max_seeds else others)

    def generations(self) -> int:
        """Generations per task iteration: the children's, plus the probe generation when probes are separate."""
        return generations_per_iteration(self.children_per_task, self.generation_size, self.separate_probes)

    def lengths(self) -> list[int]:
        """Validation periods of each children's generation of a task iteration (``length_ramp``)."""
        children_generations = self.generations() - int(self.separate_probes)
        return ramped_lengths(children_generations, self.settings.validations, self.length_ramp)

    def child_settings(self, generation: int) -> TrainSettings:
        """The training settings of a children's generation: its validation periods (``length_ramp``), and with
        ``schedule_span = "iteration"`` its part of one learning-rate schedule over the task iteration's children,
        so a lineage anneals instead of restarting at the peak rate with every child."""
        g, lengths = generation - int(self.separate_probes), self.lengths()
        settings = self.settings
        if lengths[g] != settings.validations:
            settings = dataclasses.replace(settings, validations=lengths[g])
        if self.schedule_span == "child":
            return settings
        return dataclasses.replace(settings, schedule_start=sum(lengths[:g]), schedule_periods=sum(lengths))

    def lr_scale(self, parent: TaskPath, task: str, mutate: bool) -> float:
        """The learning-rate scale of a child of ``parent``: the parent's times ``lineage_lr_decay`` when the child
        is mutated from a trained path of ``task`` (a lineage continuing), else 1 (a probe, or a lineage starting
        from a probe, a seed or the root, whose blocks have not been trained for this task yet)."""
        if not mutate or not continues_lineage(parent, task):
            return 1.0
        return parent.hparams.get(LR_SCALE, 1.0) * self.lineage_lr_decay

    # --- sampling -----------------------------------------------------------------------------------------------
    def sample_ds_hparams(self, task: str, mutate: bool) -> dict[str, Any]:
        """The generation's data hparams: the task's best path's values (or the defaults), each moved a
        neighbour step w.p. μ after the seed phase (spec §3); with ``judged_mutations`` only once that best path
        continues a lineage of the task, so its score can judge the move."""
        best = self.system.best_path(task)
        source = best.hparams if best else self.system.root_path.hparams
        ds = {k: source.get(k, DEFAULTS.get(k)) for k in [*DATA_RANGES, "ds_image_size"]}
        if self.clones_only_below(best, task):
            mutate = False
        if mutate:
            ranges = dict(DATA_RANGES, ds_image_size=self.sizes)
            for key, values in ranges.items():
                if self.rng.random() < self.policy.mutation_prob:
                    ds[key] = incremental_mutation(ds[key], values, self.rng)
        return ds

    def clones_only_below(self, path: TaskPath | None, task: str) -> bool:
        """Whether a mutated child of ``path`` (``None``: the task has no path yet) only clones blocks, and the data
        hparams hold while it is the task's best path: with ``judged_mutations`` when it continues no lineage of the
        task, with ``root_clones_only`` when it grows from the root alone, with ``first_task_finetune`` while the
        task is :meth:`alone`."""
        if self.first_task_finetune and self.alone(task):
            return True
        if path is None:
            return self.judged_mutations or self.root_clones_only
        return (self.judged_mutations and not continues_lineage(path, task)
                or self.root_clones_only and grows_from_root(path, task))

    def alone(self, task: str) -> bool:
        """Whether the system holds no path of another task: nothing could be transferred to ``task``."""
        return not any(paths for other, paths in self.system.paths.items() if other != task)

    def sample_parent(self, task: str, seeds: list[TaskPath]) -> TaskPath:
        """Best-first walk accepting each path w.p. parent_decay^offsprings; else uniform over seeds and own paths."""
        own = sorted(self.system.paths[task], key=lambda p: (self.system.score(p), p.id), reverse=True)
        for path in own:
            if self.rng.random() < self.parent_decay ** path.offsprings:
                return path
        return self.rng.choice(seeds + own)

    # --- the loop -----------------------------------------------------------------------------------------------
    def task_iteration(self, task: str) -> TaskPath | None:
        """One task iteration (spec §4.2); returns the task's retained best path."""
        state = self.begin(task)
        while not self.finished(state):
            self.step(state)
        return self.finish(state)

    def begin(self, task: str) -> IterationState:
        """Starts a task iteration: unlocks the task's own components and lists the seed paths."""
        system = self.system
        seeds = system.start_task(task)
        if self.max_seeds:
            seeds = seeds[: self.max_seeds] + [system.root_path] if len(seeds) > self.max_seeds + 1 else seeds
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.iteration)
        return IterationState(task, seeds, 0, 0, generator)

    def finished(self, state: IterationState) -> bool:
        return state.generation >= self.generations()

    def step(self, state: IterationState) -> list[TaskPath]:
        """Samples, trains and selects one generation of ``state``'s task iteration; returns its children."""
        system, task, gen = self.system, state.task, state.generation
        probing = self.separate_probes and gen == 0
        if probing:  # every seed at once: probes share batches and frozen prefixes, and take no child's slot
            n = len(state.seeds)
        else:
            n = min(self.generation_size, self.children_per_task - (gen - self.separate_probes) * self.generation_size)
        ds = self.sample_ds_hparams(task, mutate=state.next_seed >= len(state.seeds))
        children, parents = [], []
        for _ in range(n):
            if state.next_seed < len(state.seeds):
                parent, mutate = state.seeds[state.next_seed], False
                state.next_seed += 1
            else:
                parent, mutate = self.sample_parent(task, state.seeds), True
            clones_only = mutate and self.clones_only_below(parent, task)
            to_beat = system.score(parent) if mutate and self.affordable_clones and parent.task == task else None
            child = make_child(system, parent, task, ds, mutate, self.policy, self.mutate_adapters, clones_only,
                               to_beat, self.given_back_adapters)
            if self.lineage_lr_decay != 1:
                child.hparams[LR_SCALE] = self.lr_scale(parent, task, mutate)
            children.append(child)
            if parent.task == task:  # counted at once: the next child of this generation samples with it
                parent.offsprings += 1
            parents.append(parent)
        for child in children:
            for comp in child.components.values():
                comp.module.to(self.settings.device)
        to_beat = [system.score(p) if p.task == task else float("-inf") for p in parents]
        self.before_training(task, gen, children, to_beat, ds)
        settings = self.probe_settings if probing else self.child_settings(gen)
        if self.first_task_finetune and self.alone(task):
            settings = dataclasses.replace(settings, inherit_momentum=True)
        outcomes = self.executor.train(children, to_beat, self.tasks[task], ds, settings, self.evaluator,
                                       self.system.scorer(), state.generator, on_step=self.on_step)
        self.after_training(task, gen, children, outcomes)
        for child, parent, beat, outcome in zip(children, parents, to_beat, outcomes):
            child.metrics.update(outcome.as_metrics(), generation=gen, iteration=self.iteration, parent=parent.id,
                                 parent_score=beat)
            if child.metrics["failed"]:
                log.warning("task %s: child #%d discarded: %s", task, child.id, child.metrics["failed"])
            if child.metrics["improved"]:
                system.paths[task].append(child)
        self._prune(task)
        state.generation += 1
        self.after_generation(task, gen, children)
        return children

    def finish(self, state: IterationState) -> TaskPath | None:
        """Ends a task iteration: keeps and locks the best path, evaluates new retained paths on test."""
        best = self.system.end_task(state.task)
        for path in self.system.retained_paths():
            if path.metrics.get("test_quality") is None:
                t = self.tasks.get(path.task)
                if t is not None:
                    size = path.hparams["ds_image_size"]
                    path.metrics["test_quality"] = self.evaluator.accuracy(path, t, "test", size)
        self.iteration += 1
        return best

    def _prune(self, task: str) -> None:
        if self.max_task_population and len(self.system.paths[task]) > self.max_task_population:
            ranked = sorted(self.system.paths[task], key=lambda p: (self.system.score(p), p.id), reverse=True)
            self.system.paths[task] = ranked[: self.max_task_population]
