"""Training batches prepared ahead in a background thread (munet/training/batches.py): the same batches, the same
training and the same random stream as preparing each when its step needs it."""

from __future__ import annotations

import copy
import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from conftest import make_task

from munet.data.rows import DEFAULT_DATA_CACHE_BYTES, ImageRows, set_data_cache_bytes
from munet.evolution.hparams import DEFAULTS
from munet.evolution.mutate import make_child
from munet.training.batches import Batch, Prefetch, draw_batches
from munet.training.evaluate import Evaluator
from munet.training.frozen import FeatureCache
from munet.training.settings import TrainSettings
from munet.training.trainer import train_generation

AUGMENTED = {k: v for k, v in DEFAULTS.items() if k.startswith("ds_")} | {
    "ds_image_size": 8, "ds_area_range_min": 0.05, "ds_flip_left_right": True}
SETTINGS = TrainSettings(batch_size=16, max_steps_between_validations=3, validations=3, max_val_examples=48)


def _generation(system, policy, root, prefetch: int, stop_margin: float = 0.0):
    """Two children (one with a cloned block) trained on augmented batches; their outcomes, weights and the
    generator's state after."""
    children = [make_child(system, system.root_path, "a", AUGMENTED, mutate=False, policy=policy) for _ in range(2)]
    children[1].components["block_1"] = system.clone_component(children[1].components["block_1"], "a")
    settings = dataclasses.replace(SETTINGS, prefetch_batches=prefetch, stop_margin=stop_margin)
    generator = torch.Generator().manual_seed(3)
    parent = 1.0 if stop_margin else float("-inf")  # unbeatable: with a stop margin, both children stop early
    outcomes = train_generation(children, [parent] * 2, make_task("a"), AUGMENTED, settings,
                                Evaluator(settings, FeatureCache(1 << 26), root.mean, root.std), lambda p, q: q,
                                generator)
    weights = [{n: copy.deepcopy(c.module.state_dict()) for n, c in child.components.items()} for child in children]
    return outcomes, weights, generator.get_state()


@pytest.mark.parametrize("stop_margin", [0.0, 0.01])
def test_prefetched_training_equals_training_without_prefetch(system, policy, tiny_root, one_thread, stop_margin):
    torch.manual_seed(0)
    plain = _generation(copy.deepcopy(system), copy.deepcopy(policy), tiny_root, 0, stop_margin)
    ahead = _generation(copy.deepcopy(system), copy.deepcopy(policy), tiny_root, 2, stop_margin)
    if stop_margin:  # stopped after the first validation, with batches drawn ahead it had to give back
        assert all(o.stopped for o in plain[0]) and plain[0][0].steps < SETTINGS.max_steps_between_validations * 3
    for a, b in zip(plain[0], ahead[0]):
        assert (a.evals, a.steps, a.accepted) == (b.evals, b.steps, b.accepted)
    for a, b in zip(plain[1], ahead[1]):
        for name in a:
            for key, value in a[name].items():
                assert torch.equal(value, b[name][key]), f"{name}.{key}"
    assert torch.equal(plain[2], ahead[2])  # the next generation draws the same batches


def test_closing_early_leaves_the_generator_after_the_batches_taken():
    task = make_task("a")
    taken = torch.Generator().manual_seed(1)
    for _ in zip(range(3), draw_batches(task, AUGMENTED, 10, 16, (0.5,), (0.5,), taken, "augmented")):
        pass
    generator = torch.Generator().manual_seed(1)
    with Prefetch(draw_batches(task, AUGMENTED, 10, 16, (0.5,), (0.5,), generator, "augmented"),
                  generator, depth=4) as batches:
        first = [batch for _, batch in zip(range(3), batches)]
        time.sleep(0.05)  # the thread draws ahead meanwhile
    assert torch.equal(generator.get_state(), taken.get_state())
    assert first[-1].x.shape == (16, 3, 8, 8)


class ThreadNotingRows(ImageRows):
    """An in-memory source read per batch that notes which thread read each batch."""

    def __init__(self, x: torch.Tensor):
        super().__init__(tuple(x.shape), "thread-noting rows")
        self.x, self.readers = x.numpy(), []

    def read(self, rows: np.ndarray) -> np.ndarray:
        self.readers.append(threading.current_thread().name)
        return self.x[rows]


@pytest.mark.parametrize("feature_cache_bytes", [1 << 26, 0])
def test_a_split_read_per_batch_is_read_ahead_without_augmentation(system, policy, tiny_root, one_thread,
                                                                    feature_cache_bytes):
    """Plain inputs of a split read per batch come from the prefetch thread, with the same training (features
    cached, or computed per batch when the cache is too small for them)."""
    plain = {k: v for k, v in DEFAULTS.items() if k.startswith("ds_")} | {"ds_image_size": 8}
    results = {}
    for depth in (0, 2):
        task = make_task("a")
        rows = ThreadNotingRows(task.train_x)
        set_data_cache_bytes(0)  # nothing kept: every batch is read
        try:
            task = dataclasses.replace(task, train_x=rows)
            rows[:1]  # opens the (empty) cache while the budget is 0
        finally:
            set_data_cache_bytes(DEFAULT_DATA_CACHE_BYTES)
        rows.readers.clear()
        kids = [make_child(system, system.root_path, "a", plain, mutate=False, policy=copy.deepcopy(policy))
                for _ in range(2)]
        kids[1].components["block_1"] = system.clone_component(kids[1].components["block_1"], "a")
        settings = dataclasses.replace(SETTINGS, prefetch_batches=depth, calibration_examples=0)
        outcomes = train_generation(kids, [float("-inf")] * 2, task, plain, settings,
                                    Evaluator(settings, FeatureCache(feature_cache_bytes), tiny_root.mean,
                                              tiny_root.std), lambda p, q: q, torch.Generator().manual_seed(3))
        results[depth] = ([o.evals for o in outcomes], kids[1].components["head"].module.state_dict(), rows.readers)
    assert results[0][0] == results[2][0]
    for key, value in results[0][1].items():
        assert torch.equal(value, results[2][1][key])
    assert set(results[0][2]) == {"MainThread"} and set(results[2][2]) == {"munet-prefetch"}
    assert len(results[2][2]) == SETTINGS.max_steps_between_validations * SETTINGS.validations  # once per step


def _slow(n: int, seconds: float, fail_at: int = -1):
    for i in range(n):
        time.sleep(seconds)
        if i == fail_at:
            raise OSError("unreadable image")
        yield Batch(torch.tensor([i]), None, torch.Generator().get_state())


@pytest.mark.parametrize("depth", [0, 2])
def test_waiting_for_batches_is_counted_and_a_failed_read_reaches_the_trainer(depth):
    generator = torch.Generator()
    with Prefetch(_slow(4, 0.02), generator, depth) as batches:
        assert [int(b.idx) for b in batches] == [0, 1, 2, 3]
    assert batches.waited >= 0.02 * 3
    with pytest.raises(OSError, match="unreadable"), Prefetch(_slow(4, 0.0, fail_at=2), generator, depth) as failing:
        list(failing)
