"""The evolutionary loop end to end on a tiny root: no forgetting, determinism, seed phase, population cap."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from conftest import make_task, make_tiny_root

from munet.evolution.hparams import MutationPolicy
from munet.evolution.loop import Evolution, continues_lineage
from munet.evolution.mutate import make_child
from munet.evolution.search import SearchConfig
from munet.evolution.system import System
from munet.model.path import TaskPath
from munet.training.evaluate import Evaluator
from munet.training.frozen import FeatureCache
from munet.training.settings import TrainSettings


def _evolution(seed: int = 0, cap: int = 0, mu_policy: str = "fixed", mu: float = 0.3, **options) -> Evolution:
    root = make_tiny_root()
    tasks = {"a": make_task("a", 3, seed=1), "b": make_task("b", 2, seed=2), "c": make_task("c", 4, seed=3)}
    policy = MutationPolicy(mu_policy, mu, random.Random(seed))
    extra: dict = {}
    policy.init_hparams(extra)
    system = System(root, 8, extra_hparams=extra)
    for name, t in tasks.items():
        system.add_task(name, t.num_classes)
    settings = TrainSettings(batch_size=16, max_steps_between_validations=2, validations=2, max_val_examples=48)
    evaluator = Evaluator(settings, FeatureCache(1 << 26), root.mean, root.std)
    executor = options.pop("executor", None)
    search = SearchConfig(children_per_task=4, generation_size=2, max_image_size=12, max_task_population=cap, seed=seed,
                          **options)
    return Evolution(system, tasks, policy, settings, evaluator, search, executor)


@torch.no_grad()
def _predictions(evo: Evolution, task: str) -> torch.Tensor:
    path = evo.system.best_path(task)
    x = evo.evaluator.inputs(evo.tasks[task], "test", path.hparams["ds_image_size"])
    return path(x)


def test_no_forgetting_earlier_tasks_predictions_are_bit_identical():
    evo = _evolution()
    evo.task_iteration("a")
    before = _predictions(evo, "a")
    acc = evo.system.best_path("a").metrics["test_quality"]
    evo.task_iteration("b")
    evo.task_iteration("c")
    assert torch.equal(_predictions(evo, "a"), before)
    best = evo.system.best_path("a")
    assert evo.evaluator.accuracy(best, evo.tasks["a"], "test", best.hparams["ds_image_size"]) == acc


def test_same_seed_same_result():
    runs = []
    for _ in range(2):
        evo = _evolution(seed=3)
        for t in ("a", "b", "a"):
            evo.task_iteration(t)
        runs.append([(p.id, p.metrics["quality"], p.metrics["test_quality"], sorted(p.components))
                     for p in evo.system.retained_paths()])
    assert runs[0] == runs[1]


def test_the_largest_seed_the_config_takes_runs_a_task_iteration():
    """Seeds near 2^63 once overflowed the batch stream's generator (seed x 1,000,003) with a traceback."""
    evo = _evolution(seed=2**63 - 1)
    assert evo.task_iteration("a") is not None


@pytest.mark.parametrize("after_child", [0, 1, 3])
def test_child_streams_keep_each_childs_draws_whatever_was_drawn_before(monkeypatch, after_child):
    """random_streams = child: draws made before a task iteration (an earlier task that drew more), or after one of
    its children (a lever acting on that child alone: the 1st is a probe of generation 0, before generation 1's data
    draws; the 3rd the first of generation 1's two mutated children), leave every other child's parent, mutations,
    hyperparameters and results as they were; with one stream they move."""
    import munet.evolution.loop as loop

    def children(streams: str, extra_draws: int) -> list:
        evo = _evolution(random_streams=streams)
        evo.task_iteration("a")
        made: list[TaskPath] = []

        def drawing_more(*args, **kwargs) -> TaskPath:
            made.append(make_child(*args, **kwargs))
            if len(made) == after_child:
                for _ in range(extra_draws):
                    evo.rng.random()
            return made[-1]

        monkeypatch.setattr(loop, "make_child", drawing_more)
        for _ in range(extra_draws if after_child == 0 else 0):
            evo.rng.random()
        seen: list[TaskPath] = []
        evo.after_generation.append(lambda task, gen, kids: seen.extend(kids))
        evo.task_iteration("b")
        monkeypatch.setattr(loop, "make_child", make_child)
        return [(c.parent.id, c.metrics.get("mutations"), c.hparams, c.metrics["quality"]) for c in seen]

    assert children("child", 0) == children("child", 7)
    assert children("run", 0) != children("run", 7)


def test_seed_phase_probes_other_tasks_then_mutates():
    evo = _evolution()
    evo.task_iteration("a")
    a_best = evo.system.best_path("a")
    seen = []
    evo.after_generation.append(lambda task, gen, children: seen.extend(children))
    evo.task_iteration("b")
    probes = [c for c in seen if c.metrics["seed_probe"]]
    assert [c.parent for c in probes] == [a_best, evo.system.root_path]
    for probe in probes:  # a head-only transfer probe: everything but the head is the parent's, by reference
        shared = {n for n, comp in probe.components.items() if comp is probe.parent.components.get(n)}
        assert shared >= set(probe.components) - {"head", "posembed"} and "head" not in shared
    assert all(not c.metrics["seed_probe"] for c in seen[2:])


def test_offspring_counts_are_the_same_task_children_sampled_from_each_path():
    evo = _evolution()
    seen = []
    evo.after_generation.append(lambda task, gen, children: seen.extend(children))
    evo.task_iteration("a")
    evo.task_iteration("a")
    by_id = {p.id: p for p in seen}
    counts = Counter(c.metrics["parent"] for c in seen if c.metrics["parent"] in by_id)
    assert sum(counts.values()) > 0  # some children came from the task's own paths
    assert {p.id: p.offsprings for p in seen if p.offsprings} == dict(counts)
    assert evo.system.root_path.offsprings == 0  # the root is no task's own path


@pytest.mark.parametrize("cap", [0, 1])
def test_population_cap_and_end_of_iteration_keep_best(cap):
    evo = _evolution(cap=cap)
    sizes = []
    evo.after_generation.append(lambda task, gen, children: sizes.append(len(evo.system.paths[task])))
    evo.task_iteration("a")
    assert max(sizes) == 1 if cap else max(sizes) > 1  # without a cap the population grows within the iteration
    assert len(evo.system.paths["a"]) == 1  # the end of an iteration keeps the best path only


def test_per_action_policy_runs():
    evo = _evolution(mu_policy="per_action")
    evo.task_iteration("a")
    evo.task_iteration("b")
    assert evo.system.best_path("b") is not None


def test_separate_probes_take_no_child_slot_and_train_their_own_budget():
    evo = _evolution(separate_probes=True, probe_validations=1)
    evo.task_iteration("a")
    generations = []
    evo.after_generation.append(lambda task, gen, children: generations.append(children))
    evo.task_iteration("b")
    probes, *rest = generations
    assert [c.parent for c in probes] == [evo.system.best_path("a"), evo.system.root_path]
    assert all(c.metrics["seed_probe"] and len(c.metrics["evals"]) == 1 for c in probes)
    children = [c for gen in rest for c in gen]
    assert len(rest) == 2 and len(children) == evo.search.children_per_task  # 4 children in generations of 2
    assert not any(c.metrics["seed_probe"] for c in children)
    assert all(len(c.metrics["evals"]) == evo.settings.validations for c in children if not c.metrics["failed"])


def test_before_training_hook_sees_each_generation_untrained():
    evo = _evolution()
    seen = []
    evo.before_training.append(lambda task, gen, children, to_beat, ds: seen.append(
        (task, gen, len(children), len(to_beat), ds["ds_image_size"], any("quality" in c.metrics for c in children))))
    evo.task_iteration("a")
    assert [s[:4] for s in seen] == [("a", 0, 2, 2), ("a", 1, 2, 2)]  # 4 children in generations of 2
    assert not any(s[5] for s in seen)


def test_run_train_adds_its_callbacks_next_to_a_callers(tmp_path):
    """Hooks compose: ``Run.train`` reports progress through callbacks of its own, a caller's callbacks run too, and
    only the caller's are left once it returns."""
    import io

    from conftest import tiny_config

    from munet.runner import Run

    seen, steps, stream = [], [], io.StringIO()
    with Run.create(tiny_config(tmp_path / "run", children_per_task=2), stream) as opened:
        evo = opened.evolution
        evo.after_generation.append(lambda task, gen, children: seen.append((task, gen)))
        evo.on_step.append(steps.append)
        opened.train()
        assert len(evo.after_generation) == 1 and len(evo.on_step) == 1
    assert seen == [(task, gen) for task in ("a", "b") for gen in range(evo.generations())]
    assert stream.getvalue().count("| gen ") == len(seen) and sum(steps) > 0


def test_length_ramp_trains_later_children_longer_within_the_iteration_s_budget():
    """length_ramp = 0.5: the 2 children's generations train 1 and 3 validation periods (2 each without it), the
    second starting where the first ended in the one schedule; the iteration trains as many steps either way."""
    steps: dict[float, list[tuple[int, int]]] = {}
    for ramp in (0.0, 0.5):
        evo = _evolution(separate_probes=True, probe_validations=1, schedule_span="iteration", length_ramp=ramp)
        spans = [(s.schedule_start, s.validations) for s in map(evo.child_settings, range(1, evo.generations()))]
        assert spans == ([(0, 2), (2, 2)] if ramp == 0 else [(0, 1), (1, 3)])
        trained = steps.setdefault(ramp, [])
        evo.after_training.append(lambda task, gen, children, outcomes, trained=trained: trained.extend(
            (gen, o.steps) for o in outcomes if gen > 0))
        evo.task_iteration("a")
        assert sum(n for _, n in trained) == evo.iteration_work("a") - evo.probes() * 2  # probes: 1 period of K = 2
    assert sorted(set(steps[0.5])) == [(1, 2), (2, 6)] and sorted(set(steps[0.0])) == [(1, 4), (2, 4)]


def test_work_done_counts_each_generation_s_children_at_their_own_length():
    """Progress (and a resumed run's steps done) sums each generation's children at their ramped length: 3 children
    in generations of 2 and 1 with lengths 1 and 3 periods of K = 2 steps, after a probe generation of 1 period."""
    evo = _evolution(separate_probes=True, probe_validations=1, schedule_span="iteration", length_ramp=0.5)
    evo.search = evo.search.replace(children_per_task=3)
    assert evo.lengths() == [1, 3] and evo.children_periods() == [2, 3]
    probes = evo.probes() * 2
    assert [evo.work_done("a", g) for g in range(4)] == [0, probes, probes + 4, probes + 10]
    assert evo.iteration_work("a") == probes + 10


def test_a_run_s_evolution_gets_the_configured_length_ramp(tmp_path):
    from conftest import tiny_config

    from munet.runner import Run

    for ramp in (0.0, 0.5):
        cfg = tiny_config(tmp_path / f"run{ramp}", generation_size=1, length_ramp=ramp, affordable_clones=bool(ramp))
        with Run.create(cfg) as opened:
            assert opened.evolution.lengths() == ([2, 2, 2, 2] if ramp == 0 else [1, 2, 2, 3])
            assert opened.evolution.search.affordable_clones == bool(ramp)


def test_iteration_schedule_span_gives_the_children_consecutive_parts_of_one_schedule():
    """schedule_span = iteration: the children's generations (after the probe generation) train parts 0, 1 of
    one schedule; the default (the spec) gives every child the whole schedule; the span changes what is learnt."""
    evo = _evolution(separate_probes=True, probe_validations=1, schedule_span="iteration")
    parts = [(s.schedule_start, s.validations, s.schedule_periods)
             for s in map(evo.child_settings, range(1, evo.generations()))]
    assert parts == [(0, 2, 4), (2, 2, 4)]
    spec = _evolution(separate_probes=True, probe_validations=1)
    assert spec.child_settings(2) is spec.settings
    evals: dict[int, list] = {id(evo): [], id(spec): []}
    for e in (evo, spec):
        e.after_training.append(lambda task, gen, children, outcomes, e=e: evals[id(e)].extend(
            o.evals for o in outcomes))
        e.task_iteration("a")
    assert len(evals[id(evo)]) == len(evals[id(spec)]) > 4
    assert evals[id(evo)] != evals[id(spec)]


@pytest.mark.parametrize("decay", [0.5, 1.0])
def test_parent_decay_one_always_extends_the_best_path(decay):
    """parent_decay = 1: every mutated child's parent is the task's best path when the generation is sampled; the
    spec's 0.5 leaves the best path once it has children, for a worse own path or a seed."""
    evo = _evolution(separate_probes=True, probe_validations=1, parent_decay=decay)
    evo.search = evo.search.replace(children_per_task=8, generation_size=1)
    parents: list[tuple[int, int]] = []
    evo.before_training.append(lambda task, gen, children, beat, ds: parents.extend(
        (c.parent.id, evo.system.best_path(task).id) for c in children if not c.metrics["seed_probe"]))
    for task in ("a", "b"):
        evo.task_iteration(task)
    assert len(parents) == 16
    best_first = sum(parent == best for parent, best in parents)
    assert best_first == 16 if decay == 1.0 else best_first < 16


@pytest.mark.parametrize("twins", ["off", "every", "start"])
def test_mutation_twins_train_a_child_s_block_clones_alone_beside_it(twins: str):
    """mutation_twins: a mutated child that drew a hyperparameter, layer or adapter mutation trains in the same
    generation as a twin with the same parent, the same block clones and the parent's hparams (the generation's data
    hparams aside); a child that only cloned blocks gets none. The best path is the highest scoring of all. With
    start_twins only a child starting a lineage (its parent a probe, another task's path or the root) gets one."""
    evo = _evolution(mu=0.6, separate_probes=True, probe_validations=1, mutation_twins=twins == "every",
                     start_twins=twins == "start")
    evo.search = evo.search.replace(children_per_task=4, generation_size=1)
    generations: list[list] = []
    parent_of: dict[int, TaskPath] = {}  # at sampling: parent links move to retained ancestors later

    def record(task, gen, children, beat, ds):
        generations.append(list(children))
        parent_of.update({c.id: c.parent for c in children})

    evo.before_training.append(record)
    for task in ("a", "b"):
        evo.task_iteration(task)
    children = [c for gen in generations for c in gen if not c.metrics["seed_probe"]]
    twins_made = [c for c in children if "twin_of" in c.metrics]
    moved = [c for c in children if "twin_of" not in c.metrics
             and any(not k.startswith("clone:") for k in c.metrics["mutations"])]
    assert moved  # mu = 0.6 draws other mutations than clones
    if twins == "off":
        assert not twins_made
        return
    if twins == "start":
        starting = [c for c in moved if not continues_lineage(parent_of[c.id], c.task)]
        assert starting and len(starting) < len(moved)  # both kinds drawn: the test can tell them apart
        moved = starting
    by_id = {c.id: c for c in children}
    assert sorted(t.metrics["twin_of"] for t in twins_made) == sorted(c.id for c in moved)
    for twin in twins_made:
        child = by_id[twin.metrics["twin_of"]]
        assert any(child in gen and twin in gen for gen in generations)  # trained side by side
        parent = parent_of[twin.id]
        assert parent is parent_of[child.id]
        assert set(twin.metrics["mutations"]) == {k for k in child.metrics["mutations"] if k.startswith("clone:")}
        model_keys = [k for k in parent.hparams if not k.startswith("ds_")]
        assert {k: twin.hparams[k] for k in model_keys} == {k: parent.hparams[k] for k in model_keys}
        assert [n for n in twin.components if n.startswith("adapter")] == \
            [n for n in parent.components if n.startswith("adapter")]
    for task in ("a", "b"):
        best = evo.system.best_path(task)
        assert evo.system.score(best) == max(evo.system.score(p) for p in evo.system.paths[task])


@pytest.mark.parametrize("judged", [False, True])
def test_judged_mutations_leave_a_new_lineage_s_first_child_with_block_clones_only(judged: bool):
    """judged_mutations: a mutated child of a probe, another task's path or the root keeps its parent's model
    hparams, layers and adapters (only blocks and the final norm are cloned), and the generation's data hparams stay
    the task's best path's while that is no trained path of the task; a child continuing its task's trained path
    still draws every mutation. Without it (the spec) first children do."""
    from munet.evolution.hparams import DATA_RANGES
    from munet.evolution.loop import continues_lineage

    evo = _evolution(mu=0.6, separate_probes=True, probe_validations=1, judged_mutations=judged)
    evo.search = evo.search.replace(children_per_task=6, generation_size=1)
    seen: list = []  # (child, whether it continues a lineage, whether its data hparams moved unjudged)

    def record(task, gen, children, beat, ds):
        best = evo.system.best_path(task)
        unjudged = best is not None and not continues_lineage(best, task)
        moved = unjudged and any(ds[k] != best.hparams[k] for k in [*DATA_RANGES, "ds_image_size"])
        seen.extend((c, continues_lineage(c.parent, task), moved) for c in children)

    evo.before_training.append(record)
    for task in ("a", "b", "c"):
        evo.task_iteration(task)
    first = [(c, moved) for c, cont, moved in seen if not c.metrics["seed_probe"] and not cont]
    later = [c for c, cont, _ in seen if not c.metrics["seed_probe"] and cont]
    assert first and later

    def changes(child) -> set[str]:
        return {k for k in child.metrics["mutations"] if not k.startswith("clone:block_")}

    assert any(k.startswith("clone:block_") for c, _ in first for k in c.metrics["mutations"])
    if judged:
        assert not any(changes(c) or moved for c, moved in first)
        for c, _ in first:
            assert {k: c.hparams[k] for k in c.parent.hparams if k.startswith(("opt_", "num_", "adapter_"))} == \
                {k: v for k, v in c.parent.hparams.items() if k.startswith(("opt_", "num_", "adapter_"))}
    else:
        assert any(changes(c) for c, _ in first)
    assert any(changes(c) for c in later)


@pytest.mark.parametrize("on", [False, True])
def test_root_clones_only_holds_every_mutation_but_block_clones_while_nothing_is_transferred(on: bool):
    """root_clones_only: a mutated child whose parent descends from the root through its own task's paths only
    clones blocks (and the final norm), and the data hparams hold while the task's best path is such a path; a
    child of another task's path or of a probe of one still draws every mutation. Without it (the spec) a first
    task's children draw them all."""
    from munet.evolution.hparams import DATA_RANGES
    from munet.evolution.loop import grows_from_root

    evo = _evolution(mu=0.6, separate_probes=True, probe_validations=1, root_clones_only=on)
    evo.search = evo.search.replace(children_per_task=6, generation_size=1)
    seen: list = []  # (child, whether its parent grows from the root, whether its data hparams moved untransferred)

    def record(task, gen, children, beat, ds):
        best = evo.system.best_path(task)
        alone = best is not None and grows_from_root(best, task)
        moved = alone and any(ds[k] != best.hparams[k] for k in [*DATA_RANGES, "ds_image_size"])
        seen.extend((c, grows_from_root(c.parent, task), moved) for c in children if not c.metrics["seed_probe"])

    evo.before_training.append(record)
    for task in ("a", "b", "c"):
        evo.task_iteration(task)
    alone = [(c, moved) for c, root_only, moved in seen if root_only]
    transferred = [c for c, root_only, _ in seen if not root_only]
    assert alone and transferred and all(c.task == "a" for c, _ in alone[:6])  # the first task has nothing else

    def changes(child) -> set[str]:
        return {k for k in child.metrics["mutations"] if not k.startswith("clone:block_")}

    assert any(k.startswith("clone:block_") for c, _ in alone for k in c.metrics["mutations"])
    if on:
        assert not any(changes(c) or moved for c, moved in alone)
    else:
        assert any(changes(c) or moved for c, moved in alone)
    assert any(changes(c) for c in transferred)


def test_a_child_of_its_task_s_path_judges_clones_at_the_ceiling_affordable_gain_sets(monkeypatch):
    """With affordable_clones, each mutated child of a path of its own task gets ``Evolution.ceiling`` of that parent
    (its accuracy plus affordable_gain of its error) to judge its clones at; other children judge at 1."""
    import munet.evolution.loop as loop

    seen: list = []  # (parent, mutate, ceiling)

    def recording(system, parent, task, ds, mutate, *args, **kwargs):
        seen.append((parent, mutate, args[-1]))
        return make(system, parent, task, ds, mutate, *args, **kwargs)

    make = loop.make_child
    monkeypatch.setattr(loop, "make_child", recording)
    evo = _evolution(separate_probes=True, probe_validations=1, affordable_clones=True, affordable_gain=0.5)
    evo.task_iteration("a")
    own = [(p, c) for p, mutate, c in seen if mutate and p.task == "a"]
    assert any(p.metrics["quality"] < 1 for p, _ in own)  # so that the ceiling differs from 1
    assert all(c == pytest.approx(p.metrics["quality"] + 0.5 * (1 - p.metrics["quality"])) for p, c in own)
    assert all(c == 1.0 for p, mutate, c in seen if not (mutate and p.task == "a"))


@pytest.mark.parametrize("on", [False, True])
def test_first_task_finetune_makes_the_first_task_one_fine_tuning_run_and_leaves_later_tasks_their_search(on: bool):
    """first_task_finetune: while the system holds no other task's path (task a), the children only clone blocks,
    train with inherited momentum and keep the data hparams of the task's best path; task b, evolved next, draws
    every mutation even below the root's probe (unlike root_clones_only) and starts its optimiser state fresh."""
    from munet.distributed.executor import LocalExecutor
    from munet.evolution.hparams import DATA_RANGES

    momentum: dict[str, set[bool]] = {}
    carried: dict[str, list[bool]] = {}  # per task, whether each child started with a momentum trace

    class Recording(LocalExecutor):
        def train(self, children, parent_scores, task, ds_hparams, settings, *args, **kwargs):
            momentum.setdefault(task.name, set()).add(settings.inherit_momentum)
            carried.setdefault(task.name, []).extend(
                any(c.momentum for c in child.trainable_components()) for child in children)
            return super().train(children, parent_scores, task, ds_hparams, settings, *args, **kwargs)

    evo = _evolution(mu=0.6, separate_probes=True, probe_validations=1, first_task_finetune=on, executor=Recording())
    evo.search = evo.search.replace(children_per_task=6, generation_size=1)
    seen: list = []  # (task, child, whether the generation's data hparams moved from the task's best path)

    def record(task, gen, children, beat, ds):
        best = evo.system.best_path(task)
        moved = best is not None and any(ds[k] != best.hparams[k] for k in [*DATA_RANGES, "ds_image_size"])
        seen.extend((task, c, moved) for c in children if not c.metrics["seed_probe"])

    evo.before_training.append(record)
    assert evo.alone("a")
    evo.task_iteration("a")
    assert not evo.alone("b")
    evo.task_iteration("b")

    def changes(child) -> set[str]:
        return {k for k in child.metrics["mutations"] if not k.startswith("clone:block_")}

    first = [(c, moved) for t, c, moved in seen if t == "a"]
    later = [c for t, c, _ in seen if t == "b"]
    assert any(k.startswith("clone:block_") for c, _ in first for k in c.metrics["mutations"])
    assert any(changes(c) for c in later)
    assert momentum == {"a": {on}, "b": {False}}
    if on:
        assert not any(changes(c) or moved for c, moved in first)
        assert any(carried["a"]) and any(c.momentum for c in evo.system.best_path("a").components.values())
    else:
        assert any(changes(c) or moved for c, moved in first)
        assert not any(carried["a"])


def test_grows_from_root_is_false_below_another_task_s_path():
    from munet.evolution.loop import grows_from_root
    from munet.evolution.mutate import make_child

    evo = _evolution(separate_probes=True, probe_validations=1)
    evo.search = evo.search.replace(children_per_task=2, generation_size=1)
    evo.task_iteration("a")
    a, root = evo.system.best_path("a"), evo.system.root_path
    ds = {k: a.hparams[k] for k in a.hparams if k.startswith("ds_")}
    probe_of_a = make_child(evo.system, a, "b", ds, mutate=False, policy=evo.policy)
    probe_of_root = make_child(evo.system, root, "b", ds, mutate=False, policy=evo.policy)
    assert grows_from_root(a, "a") and grows_from_root(probe_of_root, "b")
    assert not grows_from_root(a, "b") and not grows_from_root(probe_of_a, "b")  # they carry a's training


@pytest.mark.parametrize("policy", ["evolved", "per_action"])
@pytest.mark.parametrize("seed", range(3))
def test_judged_children_of_new_lineages_keep_every_hparam_under_every_policy(policy: str, seed: int):
    """Under µ2Net's and µ2Net+'s policies too, a clones-only child moves no hyperparameter (the per-action clone
    probabilities included)."""
    from munet.evolution.loop import continues_lineage

    evo = _evolution(seed=seed, mu=0.5, mu_policy=policy, separate_probes=True, probe_validations=1,
                     judged_mutations=True)
    evo.search = evo.search.replace(children_per_task=4, generation_size=1)
    firsts: list = []
    evo.before_training.append(lambda task, gen, children, beat, ds: firsts.extend(
        c for c in children if not c.metrics["seed_probe"] and not continues_lineage(c.parent, task)))
    for task in ("a", "b"):
        evo.task_iteration(task)
    assert firsts
    for child in firsts:
        assert all(k.startswith("clone:block_") for k in child.metrics["mutations"]), child.metrics["mutations"]


def test_lineage_lr_decay_lowers_the_rate_along_a_lineage_and_restarts_it_for_a_new_one():
    """lineage_lr_decay = 0.5: a mutated child of a trained path of its task has half its parent's scale, and the
    trainer's rate is scaled by it; a probe, or a child of a probe, another task's path or the root, starts at 1.
    The spec (1) sets no scale at all."""
    from munet.evolution.hparams import LR_SCALE
    from munet.training.schedule import learning_rate

    evo = _evolution(separate_probes=True, probe_validations=1, lineage_lr_decay=0.5)
    evo.search = evo.search.replace(children_per_task=6, generation_size=1)
    seen: list = []
    evo.before_training.append(lambda task, gen, children, beat, ds: seen.extend(children))
    evo.task_iteration("a")
    evo.task_iteration("b")
    mutated = [c for c in seen if not c.metrics["seed_probe"]]
    assert all(c.hparams[LR_SCALE] == 1.0 for c in seen if c.metrics["seed_probe"])
    for child in mutated:
        parent = child.parent
        continuing = parent.task == child.task and not parent.metrics["seed_probe"]
        expected = parent.hparams[LR_SCALE] * 0.5 if continuing else 1.0
        assert child.hparams[LR_SCALE] == expected
    assert min(c.hparams[LR_SCALE] for c in mutated) <= 0.25  # lineages of at least three children grew
    deep = min(mutated, key=lambda c: c.hparams[LR_SCALE])
    plain = {k: v for k, v in deep.hparams.items() if k != LR_SCALE}
    scaled = deep.hparams[LR_SCALE] * learning_rate(plain, 5, 10, 3)
    assert learning_rate(deep.hparams, 5, 10, 3) == pytest.approx(scaled)
    spec = _evolution(separate_probes=True, probe_validations=1)
    spec.task_iteration("a")
    assert not any(LR_SCALE in p.hparams for p in spec.system.paths["a"])
