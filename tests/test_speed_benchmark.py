"""The speed benchmark's own logic (benchmarks/speed_*.py) on the tiny root: its timings alternate A B B A, its
sharing ceiling counts shared prefixes once, and its single-child row trains the same weights as the plain loop it
is timed against (else the 1.0x it reports would compare two different computations)."""

from __future__ import annotations

import dataclasses

import pytest
import speed_common
import speed_training
from conftest import TINY_ROOT, make_task

from munet.config import RunConfig
from munet.evolution.hparams import DEFAULTS
from munet.evolution.mutate import make_child


def test_timings_alternate_so_drifting_load_hits_both_sides() -> None:
    calls: list[str] = []
    a_times, b_times = speed_common.interleaved(lambda: calls.append("a"), lambda: calls.append("b"), reps=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert len(a_times) == len(b_times) == 3


def test_the_sharing_ceiling_counts_a_shared_prefix_once(system, policy) -> None:
    ds = {k: v for k, v in DEFAULTS.items() if k.startswith("ds_")} | {"ds_image_size": 8}
    path = make_child(system, system.root_path, "a", ds, mutate=False, policy=policy)
    # the same path twice: every op is shared when answering, so running them one by one is exactly twice the work
    assert speed_common.sharing_ceiling([path, path], training=False) == pytest.approx(2.0)
    # when training, the trainable ops (here the head) run for each path, so less than that can be saved
    training = speed_common.sharing_ceiling([path, path], training=True)
    assert 1.0 < training < 2.0
    # a path that trains from block_1 on shares less of itself than one training only its head
    deep = make_child(system, system.root_path, "a", ds, mutate=False, policy=policy)
    deep.components["block_1"] = system.clone_component(deep.components["block_1"], "a")
    assert 1.0 < speed_common.sharing_ceiling([deep, deep], training=True) < training


def test_the_single_child_row_trains_what_the_plain_loop_trains(tiny_root, one_thread) -> None:
    cfg = RunConfig(root=TINY_ROOT, depth=3, image_size=8, tasks=["a"], batch_size=8)
    sizes = dataclasses.replace(speed_common.quick_sizes(), reps=1, single_steps=3)
    row = speed_training.bench_single_child(tiny_root, cfg, make_task("a", 3), sizes)
    assert row["trainable"] == "block_1..2, norm, head"
    assert row["max_weight_diff_vs_plain"] < 1e-5
    assert row["val_munet"] == pytest.approx(row["val_plain"])
