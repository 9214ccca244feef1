"""Training a generation: lock-step sharing, frozen components, snapshots, NaN handling, schedules (spec §4.4)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_task

from munet.evolution.hparams import DEFAULTS
from munet.evolution.mutate import make_child
from munet.training.frozen import FeatureCache
from munet.training.schedule import learning_rate
from munet.training.trainer import Evaluator, TrainSettings, train_generation

DS = {k: v for k, v in DEFAULTS.items() if k.startswith("ds_")} | {"ds_image_size": 8}
SETTINGS = TrainSettings(batch_size=16, max_steps_between_validations=3, validations=2, max_val_examples=48)


def _evaluator(root) -> Evaluator:
    return Evaluator(SETTINGS, FeatureCache(1 << 26), root.mean, root.std)


def _children(system, policy, n=3):
    kids = [make_child(system, system.root_path, "a", DS, mutate=False, policy=policy)]
    kids += [make_child(system, system.root_path, "a", DS, mutate=True, policy=policy) for _ in range(n - 1)]
    kids[-1].components["block_1"] = system.clone_component(kids[-1].components["block_1"], "a")
    return kids


def _train(children, task, root, seed=0):
    train_generation(children, [float("-inf")] * len(children), task, DS, SETTINGS, _evaluator(root),
                     lambda p, q: q, torch.Generator().manual_seed(seed))


def test_lock_step_generation_equals_training_children_one_by_one(system, policy, tiny_root):
    task = make_task("a")
    together = _children(system, policy)
    alone = [copy.deepcopy(c) for c in together]  # same weights, separate objects
    for c in alone:
        c.parent = None
    _train(together, task, tiny_root)
    for c in alone:
        _train([c], task, tiny_root)
    for a, b in zip(together, alone):
        assert a.metrics["evals"] == b.metrics["evals"]
        for name, comp in a.components.items():
            for x, y in zip(comp.module.state_dict().values(), b.components[name].module.state_dict().values()):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_frozen_components_are_bit_identical_after_training(system, policy, tiny_root):
    before = {n: copy.deepcopy(c.module.state_dict()) for n, c in system.root_path.components.items()}
    children = _children(system, policy)
    _train(children, make_task("a"), tiny_root)
    for name, comp in system.root_path.components.items():
        for k, v in comp.module.state_dict().items():
            assert torch.equal(v, before[name][k]), f"{name}.{k} changed"
    assert all(c.metrics["quality"] is not None for c in children)
    head = children[0].components["head"].module.linear.weight
    assert head.abs().sum() > 0  # the trainable head did train


def test_diverging_child_is_discarded_with_reason_and_others_go_on(system, policy, tiny_root):
    children = _children(system, policy)
    bad = children[1]
    bad.hparams.update(opt_lr=1e9, opt_lr_schedule="constant")
    with torch.no_grad():
        bad.components["head"].module.linear.weight.normal_().mul_(1e30)
    _train(children, make_task("a"), tiny_root)
    assert bad.metrics["failed"] and not bad.metrics["improved"]
    assert children[0].metrics["improved"] and children[0].metrics["failed"] is None


def test_child_not_beating_parent_is_rejected(system, policy, tiny_root):
    child = make_child(system, system.root_path, "a", DS, mutate=False, policy=policy)
    train_generation([child], [2.0], make_task("a"), DS, SETTINGS, _evaluator(tiny_root), lambda p, q: q,
                     torch.Generator().manual_seed(0))
    assert not child.metrics["improved"] and child.metrics["quality"] <= 1.0


def test_snapshot_restores_best_validation(system, policy, tiny_root):
    child = make_child(system, system.root_path, "a", DS, mutate=False, policy=policy)
    task = make_task("a")
    ev = _evaluator(tiny_root)
    train_generation([child], [float("-inf")], task, DS, SETTINGS, ev, lambda p, q: q, torch.Generator().manual_seed(0))
    assert ev.accuracy(child, task, "val", 8, SETTINGS.max_val_examples) == pytest.approx(max(child.metrics["evals"]))


def test_schedules():
    hp = dict(DEFAULTS, opt_lr=0.1)
    assert learning_rate(dict(hp, opt_lr_schedule="constant"), 5, 10, 3) == pytest.approx(0.05)
    cos = dict(hp, opt_lr_schedule="cosine", opt_lr_warmup_ratio=0.1)
    assert learning_rate(cos, 0, 10, 3) == pytest.approx(0.001)
    assert learning_rate(cos, 3, 10, 3) == pytest.approx(0.1)
    assert learning_rate(cos, 30, 10, 3) == pytest.approx(0.0)
    rs = dict(hp, opt_lr_schedule="restarts", opt_lr_warmup_ratio=0.2)
    assert learning_rate(rs, 2, 10, 3) == pytest.approx(learning_rate(rs, 12, 10, 3))
