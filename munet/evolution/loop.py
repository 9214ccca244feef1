"""The evolutionary loop: round-robin task iterations, generations, parent sampling (spec §4, §9)."""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

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
from munet.evolution.search import SearchConfig
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
        search: the search's knobs (:class:`SearchConfig`): children and generations per task iteration, probes,
            parent sampling, schedules and the levers that deviate from the spec (documented on ``RunConfig``).
        executor: where each generation's children train (:mod:`munet.distributed.executor`); in this process
            by default.

    Hooks (:class:`Hook` lists; append callbacks to them) run at fixed points of :meth:`step`:

    * ``before_training(task, generation, children, scores_to_beat, data_hparams)``: the generation sampled, untrained;
    * ``on_step(children_trained)``: after every training step (progress);
    * ``after_training(task, generation, children, outcomes)``: the generation trained, before selection;
    * ``after_generation(task, generation, children)``: selection done, the population pruned.
    """

    def __init__(self, system: System, tasks: dict[str, TaskData], policy: MutationPolicy, settings: TrainSettings,
                 evaluator: Evaluator, search: SearchConfig, executor: Executor | None = None):
        self.system, self.tasks, self.policy = system, tasks, policy
        self.settings, self.evaluator = settings, evaluator
        self.search = search
        patch = system.root.patch_size
        check_image_sizes(system.root_path.hparams["ds_image_size"], search.max_image_size, patch)
        self.sizes = image_sizes(patch, search.max_image_size)
        self.executor = executor or LocalExecutor()
        self.iteration = 0  # task iterations done, across rounds and resumed runs
        self.before_training: Hook = Hook()
        self.on_step: Hook = Hook()
        self.after_training: Hook = Hook()
        self.after_generation: Hook = Hook()

    @property
    def rng(self) -> random.Random:
        return self.policy.rng

    @property
    def probe_settings(self) -> TrainSettings:
        """A separate probe generation's training settings: ``probe_validations`` periods (0: as a child)."""
        if self.search.separate_probes and self.search.probe_validations:
            return dataclasses.replace(self.settings, validations=self.search.probe_validations)
        return self.settings

    def period_steps(self, task: str) -> int:
        """Training steps of one validation period of a child of ``task`` (K of spec §4.4)."""
        return self.settings.steps_between_validations(len(self.tasks[task].train_y))

    def steps_per_child(self, task: str) -> int:
        """Training steps of a child of ``task`` (on average over the iteration's children with ``length_ramp``)."""
        return self.period_steps(task) * self.settings.validations

    def child_steps(self, task: str, generation: int) -> int:
        """Training steps of each child in ``generation`` (a children's generation) of an iteration of ``task``."""
        return self.period_steps(task) * self.child_settings(generation).validations

    def children_periods(self) -> list[int]:
        """Per children's generation of a task iteration, the validation periods its children train in all."""
        return [n * self.search.children_in(g)
                for g, n in enumerate(self.lengths())]

    def work_done(self, task: str, generations: int) -> int:
        """Training steps of the first ``generations`` generations of an iteration of ``task``, for progress: exact
        for the children, and for separate probes assuming every other task has a retained path by then."""
        k = self.period_steps(task)
        first = int(self.search.separate_probes)
        work = k * sum(self.children_periods()[: max(generations - first, 0)])
        if self.search.separate_probes and generations > 0:
            work += self.probes() * k * self.probe_settings.validations
        return work

    def iteration_work(self, task: str) -> int:
        """Training steps of one whole iteration of ``task`` (see :meth:`work_done`)."""
        return self.work_done(task, self.generations())

    def probes(self) -> int:
        """Seeds probed per task iteration (the root and other tasks' paths), once every other task has a path."""
        others = len(self.tasks) - 1
        return 1 + (min(others, self.search.max_seeds) if self.search.max_seeds else others)

    def generations(self) -> int:
        """Generations per task iteration: the children's, plus the probe generation when probes are separate."""
        return self.search.generations()

    def lengths(self) -> list[int]:
        """Validation periods of each children's generation of a task iteration (``length_ramp``)."""
        children_generations = self.generations() - int(self.search.separate_probes)
        return ramped_lengths(children_generations, self.settings.validations, self.search.length_ramp)

    def child_settings(self, generation: int) -> TrainSettings:
        """The training settings of a children's generation: its validation periods (``length_ramp``), and with
        ``schedule_span = "iteration"`` its part of one learning-rate schedule over the task iteration's children,
        so a lineage anneals instead of restarting at the peak rate with every child."""
        g, lengths = generation - int(self.search.separate_probes), self.lengths()
        settings = self.settings
        if lengths[g] != settings.validations:
            settings = dataclasses.replace(settings, validations=lengths[g])
        if self.search.schedule_span == "child":
            return settings
        return dataclasses.replace(settings, schedule_start=sum(lengths[:g]), schedule_periods=sum(lengths))

    def lr_scale(self, parent: TaskPath, task: str, mutate: bool) -> float:
        """The learning-rate scale of a child of ``parent``: the parent's times ``lineage_lr_decay`` when the child
        is mutated from a trained path of ``task`` (a lineage continuing), else 1 (a probe, or a lineage starting
        from a probe, a seed or the root, whose blocks have not been trained for this task yet)."""
        if not mutate or not continues_lineage(parent, task):
            return 1.0
        return parent.hparams.get(LR_SCALE, 1.0) * self.search.lineage_lr_decay

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
        if self.search.first_task_finetune and self.alone(task):
            return True
        if path is None:
            return self.search.judged_mutations or self.search.root_clones_only
        return (self.search.judged_mutations and not continues_lineage(path, task)
                or self.search.root_clones_only and grows_from_root(path, task))

    def ceiling(self, parent: TaskPath) -> float:
        """The validation accuracy a child of ``parent`` (a path of its task) is taken to reach at best when it
        judges which clones it can afford: ``affordable_gain`` of the parent's error removed."""
        quality = parent.metrics.get("quality") or 0.0  # a path in the population has been validated; 0 is a guard
        return quality + self.search.affordable_gain * (1.0 - quality)

    def alone(self, task: str) -> bool:
        """Whether the system holds no path of another task: nothing could be transferred to ``task``."""
        return not any(paths for other, paths in self.system.paths.items() if other != task)

    def sample_parent(self, task: str, seeds: list[TaskPath]) -> TaskPath:
        """Best-first walk accepting each path w.p. parent_decay^offsprings; else uniform over seeds and own paths."""
        own = sorted(self.system.paths[task], key=lambda p: (self.system.score(p), p.id), reverse=True)
        for path in own:
            if self.rng.random() < self.search.parent_decay ** path.offsprings:
                return path
        return self.rng.choice(seeds + own)

    def twins_for(self, parent: TaskPath, task: str) -> bool:
        """Whether a mutated child of ``parent`` gets a twin: always with ``mutation_twins``, with ``start_twins``
        when it starts a lineage of ``task`` (its parent's score cannot judge its moves)."""
        return self.search.mutation_twins or self.search.start_twins and not continues_lineage(parent, task)

    def twin(self, child: TaskPath, parent: TaskPath, task: str, ds: dict[str, Any]) -> TaskPath | None:
        """``mutation_twins``: a twin of ``child`` (the same parent and clones of frozen components, none of its other
        mutations) when it drew a model hyperparameter, layer or adapter mutation; else ``None``. It draws nothing
        from the policy's random stream."""
        mutations = child.metrics.get("mutations") or {}
        if child.metrics.get("seed_probe") or all(m.startswith(("clone:", "_mu_")) for m in mutations):
            return None
        clones = {m for m in mutations if m.startswith("clone:")}
        twin = make_child(self.system, parent, task, ds, True, self.policy, self.search.mutate_adapters,
                          clones_only=True, clones=clones)
        if LR_SCALE in child.hparams:
            twin.hparams[LR_SCALE] = child.hparams[LR_SCALE]
        twin.metrics["twin_of"] = child.id
        return twin

    def start_stream(self, generation: int, draw: int | str) -> None:
        """With ``random_streams = "child"``, reseeds the evolution's stream for one ``draw`` of ``generation`` (a
        child's slot, or ``"data"`` for the generation's data hparams) of this task iteration, so the draws it makes
        do not depend on how many every earlier draw made; with ``run`` (the default) the one stream runs on."""
        if self.search.random_streams == "child":
            self.rng.seed(f"{self.search.seed}:{self.iteration}:{generation}:{draw}")

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
        most = self.search.max_seeds
        if most and len(seeds) > most + 1:
            seeds = seeds[:most] + [system.root_path]
        # modulo 2^64, the most a torch generator takes: any seed the config accepts (< 2^63) starts a stream
        generator = torch.Generator().manual_seed((self.search.seed * 1_000_003 + self.iteration) % 2**64)
        return IterationState(task, seeds, 0, 0, generator)

    def finished(self, state: IterationState) -> bool:
        return state.generation >= self.generations()

    def step(self, state: IterationState) -> list[TaskPath]:
        """Samples, trains and selects one generation of ``state``'s task iteration; returns its children."""
        system, task, gen = self.system, state.task, state.generation
        probing = self.search.separate_probes and gen == 0
        if probing:  # every seed at once: probes share batches and frozen prefixes, and take no child's slot
            n = len(state.seeds)
        else:
            n = self.search.children_in(gen - int(self.search.separate_probes))
        self.start_stream(gen, "data")
        ds = self.sample_ds_hparams(task, mutate=state.next_seed >= len(state.seeds))
        children, parents = [], []
        for slot in range(n):
            self.start_stream(gen, slot)
            if state.next_seed < len(state.seeds):
                parent, mutate = state.seeds[state.next_seed], False
                state.next_seed += 1
            else:
                parent, mutate = self.sample_parent(task, state.seeds), True
            clones_only = mutate and self.clones_only_below(parent, task)
            affordable = mutate and self.search.affordable_clones and parent.task == task
            to_beat = system.score(parent) if affordable else None
            child = make_child(system, parent, task, ds, mutate, self.policy, self.search.mutate_adapters, clones_only,
                               to_beat, self.search.given_back_adapters, self.ceiling(parent) if affordable else 1.0,
                               frozen_bottom=self.search.frozen_bottom, remove_layers=self.search.remove_layers)
            if self.search.lineage_lr_decay != 1:
                child.hparams[LR_SCALE] = self.lr_scale(parent, task, mutate)
            twin = self.twin(child, parent, task, ds) if self.twins_for(parent, task) else None
            for offspring in [child] if twin is None else [child, twin]:
                children.append(offspring)
                parents.append(parent)
                if parent.task == task:  # counted at once: the next child of this generation samples with it
                    parent.offsprings += 1
        for child in children:
            for comp in child.components.values():
                comp.module.to(self.settings.device)
        to_beat = [system.score(p) if p.task == task else float("-inf") for p in parents]
        self.before_training(task, gen, children, to_beat, ds)
        settings = self.probe_settings if probing else self.child_settings(gen)
        if self.search.first_task_finetune and self.alone(task):
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
        cap = self.search.max_task_population
        if cap and len(self.system.paths[task]) > cap:
            ranked = sorted(self.system.paths[task], key=lambda p: (self.system.score(p), p.id), reverse=True)
            self.system.paths[task] = ranked[:cap]
