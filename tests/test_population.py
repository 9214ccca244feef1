"""Locks, accounting, scores and parent sampling (spec §1.3, §4.2, §5)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from munet.evolution.hparams import MutationPolicy
from munet.evolution.loop import Evolution
from munet.evolution.mutate import make_child
from munet.evolution.search import SearchConfig
from munet.evolution.system import ScoreConfig, System
from munet.model.components import NOT_TRAINABLE
from munet.model.path import TaskPath


def _retain(system: System, path: TaskPath, quality: float) -> None:
    path.metrics["quality"] = quality
    system.paths[path.task].append(path)


def test_accounting_splits_shared_components_between_locking_tasks(system, policy):
    a = make_child(system, system.root_path, "a", {"ds_image_size": 8}, mutate=False, policy=policy)
    _retain(system, a, 0.9)
    root_only = {n: c for n, c in a.components.items() if n != "head"}
    total_root = sum(c.num_params for c in root_only.values())
    head = a.components["head"].num_params
    assert a.accounted_params() == pytest.approx(total_root + head)  # root components used by one task count fully
    system.end_task("a")
    b = make_child(system, a, "b", {"ds_image_size": 8}, mutate=False, policy=policy)
    _retain(system, b, 0.8)
    system.end_task("b")
    # both tasks now lock the same root components: each pays half, plus its own head
    assert a.accounted_params() == pytest.approx(total_root / 2 + head)
    assert b.accounted_params() == pytest.approx(total_root / 2 + b.components["head"].num_params)
    distinct = {c.id: c.num_params for p in (a, b) for c in p.components.values()}
    assert a.accounted_params() + b.accounted_params() == pytest.approx(sum(distinct.values()))


def test_score_trades_quality_for_size(tiny_root, policy):
    system = System(tiny_root, 8, ScoreConfig(scale_factor=0.5, reference_params=1000.0))
    system.add_task("a", 3)
    p = make_child(system, system.root_path, "a", {"ds_image_size": 8}, mutate=False, policy=policy)
    p.metrics["quality"] = 0.8
    assert system.score(p) == pytest.approx(0.8 * 0.5 ** (p.accounted_params() / 1000.0))
    system.score_cfg = ScoreConfig(1.0)
    assert system.score(p) == pytest.approx(0.8)


def test_amortise_root_splits_root_components_between_all_tasks_in_the_score_only(tiny_root, policy):
    system = System(tiny_root, 8, ScoreConfig(scale_factor=0.5, reference_params=1000.0, amortise_root=True))
    for task in ("a", "b", "c", "d"):
        system.add_task(task, 3)
    p = make_child(system, system.root_path, "a", {"ds_image_size": 8}, mutate=False, policy=policy)
    p.metrics["quality"] = 0.8
    root = sum(c.num_params for c in p.components.values() if c.locks == {NOT_TRAINABLE})
    own = p.components["head"].num_params
    assert p.accounted_params() == pytest.approx(root + own)  # what is reported keeps the spec's split
    assert system.score(p) == pytest.approx(0.8 * 0.5 ** ((root / 4 + own) / 1000.0))
    system.score_cfg = ScoreConfig(scale_factor=0.5, reference_params=1000.0)
    assert system.score(p) == pytest.approx(0.8 * 0.5 ** ((root + own) / 1000.0))


def test_amortise_over_started_splits_the_root_between_the_tasks_started_so_far(tiny_root, policy):
    cfg = ScoreConfig(scale_factor=0.5, reference_params=1000.0, amortise_root=True, amortise_over="started")
    system = System(tiny_root, 8, cfg)
    for task in ("a", "b", "c", "d"):
        system.add_task(task, 3)
    ds = {"ds_image_size": 8}
    first = make_child(system, system.root_path, "a", ds, mutate=False, policy=policy)
    root = sum(c.num_params for c in first.components.values() if c.locks == {NOT_TRAINABLE})
    own = first.components["head"].num_params
    _retain(system, first, 0.8)
    assert system.score(first) == pytest.approx(0.8 * 0.5 ** ((root + own) / 1000.0))  # the first task: the spec
    system.end_task("a")
    second = make_child(system, system.root_path, "b", ds, mutate=False, policy=policy)
    second.metrics["quality"] = 0.8
    # "a" has a retained path, "b" is the scored path's own task: 2 tasks; then "c" starts (not yet locking)
    assert system.score(second) == pytest.approx(0.8 * 0.5 ** ((root / 2 + own) / 1000.0))
    _retain(system, make_child(system, system.root_path, "c", ds, mutate=False, policy=policy), 0.8)
    assert system.score(second) == pytest.approx(0.8 * 0.5 ** ((root / 3 + own) / 1000.0))
    assert second.accounted_params() == pytest.approx(root / 2 + own)  # reported: the spec's split


def test_end_task_keeps_best_and_locks_it_start_task_unlocks(system, policy):
    ds = {"ds_image_size": 8}
    worse = make_child(system, system.root_path, "a", ds, mutate=False, policy=policy)
    better = make_child(system, system.root_path, "a", ds, mutate=True, policy=policy)
    _retain(system, worse, 0.5)
    _retain(system, better, 0.7)
    assert system.end_task("a") is better and system.paths["a"] == [better]
    assert all("a" in c.locks for c in better.components.values())
    seeds = system.start_task("b")
    assert seeds == [better, system.root_path]
    system.start_task("a")
    assert better.components["head"].is_trainable()
    assert not better.components["block_0"].is_trainable()  # still locked by the root


def test_parent_sampling_follows_half_power_of_offspring(system, policy):
    ds = {"ds_image_size": 8}
    best = make_child(system, system.root_path, "a", ds, mutate=False, policy=policy)
    second = make_child(system, system.root_path, "a", ds, mutate=False, policy=policy)
    _retain(system, best, 0.9)
    _retain(system, second, 0.8)
    best.offsprings, second.offsprings = 1, 0
    evo = Evolution.__new__(Evolution)
    evo.system, evo.policy = system, MutationPolicy("fixed", 0.1, random.Random(0))
    evo.search = SearchConfig(children_per_task=1, generation_size=1, max_image_size=8, parent_decay=0.5)
    seeds = [system.root_path]
    n = 20000
    counts = Counter(evo.sample_parent("a", seeds).id for _ in range(n))
    # best accepted w.p. 0.5; else second w.p. 1 (0.5^0); the uniform fallback is never reached
    assert counts[best.id] / n == pytest.approx(0.5, abs=0.02)
    assert counts[second.id] / n == pytest.approx(0.5, abs=0.02)
    second.offsprings = 1
    counts = Counter(evo.sample_parent("a", seeds).id for _ in range(n))
    # 0.5 best, 0.25 second, 0.25 uniform over {root, best, second}
    assert counts[best.id] / n == pytest.approx(0.5 + 0.25 / 3, abs=0.02)
    assert counts[second.id] / n == pytest.approx(0.25 + 0.25 / 3, abs=0.02)
    assert counts[system.root_path.id] / n == pytest.approx(0.25 / 3, abs=0.02)
