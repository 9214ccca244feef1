"""Training a generation: lock-step sharing, frozen components, snapshots, NaN handling, schedules (spec §4.4)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import make_task

from munet.evolution.hparams import DEFAULTS
from munet.evolution.mutate import make_child
from munet.training.evaluate import Evaluator
from munet.training.frozen import FeatureCache
from munet.training.schedule import learning_rate, ramped_lengths, warmup_cosine
from munet.training.settings import TrainSettings
from munet.training.trainer import train_generation

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
    return train_generation(children, [float("-inf")] * len(children), task, DS, SETTINGS, _evaluator(root),
                     lambda p, q: q, torch.Generator().manual_seed(seed))


def test_lock_step_generation_equals_training_children_one_by_one(system, policy, tiny_root):
    task = make_task("a")
    together = _children(system, policy)
    alone = [copy.deepcopy(c) for c in together]  # same weights, separate objects
    for c in alone:
        c.parent = None
    outcomes = _train(together, task, tiny_root)
    alone_outcomes = [_train([c], task, tiny_root)[0] for c in alone]
    for a, b, oa, ob in zip(together, alone, outcomes, alone_outcomes):
        assert oa.evals == ob.evals
        for name, comp in a.components.items():
            for x, y in zip(comp.module.state_dict().values(), b.components[name].module.state_dict().values()):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_frozen_components_are_bit_identical_after_training(system, policy, tiny_root):
    before = {n: copy.deepcopy(c.module.state_dict()) for n, c in system.root_path.components.items()}
    children = _children(system, policy)
    outcomes = _train(children, make_task("a"), tiny_root)
    for name, comp in system.root_path.components.items():
        for k, v in comp.module.state_dict().items():
            assert torch.equal(v, before[name][k]), f"{name}.{k} changed"
    assert all(o.quality is not None for o in outcomes)
    head = children[0].components["head"].module.linear.weight
    assert head.abs().sum() > 0  # the trainable head did train


def test_diverging_child_is_discarded_with_reason_and_others_go_on(system, policy, tiny_root):
    children = _children(system, policy)
    bad = children[1]
    bad.hparams.update(opt_lr=1e9, opt_lr_schedule="constant")
    with torch.no_grad():
        bad.components["head"].module.linear.weight.normal_().mul_(1e30)
    outcomes = _train(children, make_task("a"), tiny_root)
    assert outcomes[1].failed and not outcomes[1].accepted
    assert outcomes[0].accepted and outcomes[0].failed is None


def test_child_not_beating_parent_is_rejected(system, policy, tiny_root):
    child = make_child(system, system.root_path, "a", DS, mutate=False, policy=policy)
    outcome, = train_generation([child], [2.0], make_task("a"), DS, SETTINGS, _evaluator(tiny_root), lambda p, q: q,
                                torch.Generator().manual_seed(0))
    assert not outcome.accepted and outcome.quality <= 1.0


def test_snapshot_restores_best_validation(system, policy, tiny_root):
    child = make_child(system, system.root_path, "a", DS, mutate=False, policy=policy)
    task = make_task("a")
    ev = _evaluator(tiny_root)
    outcome, = train_generation([child], [float("-inf")], task, DS, SETTINGS, ev, lambda p, q: q,
                                torch.Generator().manual_seed(0))
    assert ev.accuracy(child, task, "val", 8, SETTINGS.max_val_examples) == pytest.approx(max(outcome.evals))


@pytest.mark.parametrize("inherit", [False, True])
def test_an_accepted_child_keeps_momentum_traces_only_when_it_trained_with_them(system, policy, tiny_root, inherit):
    """inherit_momentum: the accepted components hold the optimiser's traces at the snapshot; without it a trace
    a clone carried (from a task that inherited momentum) is dropped, being stale once the weights moved."""
    child = make_child(system, system.root_path, "a", DS, mutate=False, policy=policy)
    head = child.components["head"]
    head.momentum = {name: torch.ones_like(p) for name, p in head.module.named_parameters()}
    settings = dataclasses.replace(SETTINGS, inherit_momentum=inherit)
    outcome, = train_generation([child], [float("-inf")], make_task("a"), DS, settings, _evaluator(tiny_root),
                                lambda p, q: q, torch.Generator().manual_seed(0))
    assert outcome.accepted
    if inherit:
        assert head.momentum and not all(torch.equal(t, torch.ones_like(t)) for t in head.momentum.values())
    else:
        assert head.momentum is None


def test_schedules():
    hp = dict(DEFAULTS, opt_lr=0.1)
    assert learning_rate(dict(hp, opt_lr_schedule="constant"), 5, 10, 3) == pytest.approx(0.05)
    cos = dict(hp, opt_lr_schedule="cosine", opt_lr_warmup_ratio=0.1)
    assert learning_rate(cos, 0, 10, 3) == pytest.approx(0.001)
    assert learning_rate(cos, 3, 10, 3) == pytest.approx(0.1)
    assert learning_rate(cos, 30, 10, 3) == pytest.approx(0.0)
    rs = dict(hp, opt_lr_schedule="restarts", opt_lr_warmup_ratio=0.2)
    assert learning_rate(rs, 2, 10, 3) == pytest.approx(learning_rate(rs, 12, 10, 3))


@pytest.mark.parametrize("lengths", [[3, 3, 3, 3], [1, 2, 4, 5]])
def test_a_cosine_split_into_parts_is_one_schedule_over_all_parts(lengths: list[int]):
    """schedule_span = iteration: children of 3 x 10 steps each (or of rising lengths), each starting where the
    previous one ended, train one warmup-cosine over 120 steps, warming up over 10 % of all of them."""
    cos = dict(DEFAULTS, opt_lr=0.1, opt_lr_schedule="cosine", opt_lr_warmup_ratio=0.1)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    split = [learning_rate(cos, step, 10, n, start, 12) for n, start in zip(lengths, starts) for step in range(10 * n)]
    assert split == pytest.approx([warmup_cosine(step, 0.1, 12, 120) for step in range(120)])
    assert learning_rate(cos, 0, 10, 3, 0, 12) == pytest.approx(0.001)
    assert learning_rate(cos, 29, 10, 3, 9, 12) < 1e-3 < learning_rate(cos, 29, 10, 3, 0, 12)


@pytest.mark.parametrize("generations,validations,ramp", [(8, 3, 0.5), (8, 2, 0.5), (16, 3, 0.9), (5, 4, 0.3),
                                                          (8, 3, 0.0), (1, 3, 0.5), (8, 1, 0.9)])
def test_ramped_lengths_rise_and_keep_the_iteration_s_total(generations: int, validations: int, ramp: float):
    lengths = ramped_lengths(generations, validations, ramp)
    assert len(lengths) == generations and sum(lengths) == generations * validations and min(lengths) >= 1
    assert lengths == sorted(lengths)
    if ramp == 0 or generations == 1 or validations == 1:
        assert set(lengths) == {validations}
    else:  # the ends are about (1 -/+ ramp) x validations
        assert lengths[0] < validations < lengths[-1]
        assert abs(lengths[-1] - (1 + ramp) * validations) <= 1 and abs(lengths[0] - (1 - ramp) * validations) <= 1


def test_the_trainer_trains_the_settings_part_of_the_schedule(system, policy, tiny_root):
    """A child trained in the last part of a long schedule (learning rate near 0) barely moves; the same child
    trained over the whole schedule moves."""
    moved = {}
    for start, periods in ((0, 0), (2998, 3000)):  # the whole schedule; its last 2 of 3000 periods
        child = make_child(system, system.root_path, "a", DS, mutate=False, policy=policy)
        before = [p.detach().clone() for p in child.trainable_parameters()]
        settings = dataclasses.replace(SETTINGS, schedule_start=start, schedule_periods=periods)
        train_generation([child], [float("-inf")], make_task("a"), DS, settings, _evaluator(tiny_root), lambda p, q: q,
                         torch.Generator().manual_seed(0))
        moved[periods] = max((p - b).abs().max().item() for p, b in zip(child.trainable_parameters(), before))
    assert moved[3000] < 1e-3 * moved[0]


def test_child_diverging_after_an_accepted_validation_keeps_that_snapshot(system, policy, tiny_root):
    """Spec §4.3: a child whose loss blows up after a validation it was accepted on keeps that snapshot;
    ``keep_diverged=False`` discards it (the behaviour before the fix)."""
    task = make_task("a")
    outcomes = {}
    for keep in (True, False):
        child = make_child(system, system.root_path, "a", DS, mutate=False, policy=policy)
        settings = dataclasses.replace(SETTINGS, keep_diverged=keep)
        steps = []

        def after_step(n, child=child, steps=steps):
            steps.append(n)
            if len(steps) == SETTINGS.max_steps_between_validations:  # right after the first (accepted) validation
                with torch.no_grad():
                    child.components["head"].module.linear.weight.fill_(float("nan"))

        outcome, = train_generation([child], [float("-inf")], task, DS, settings, _evaluator(tiny_root),
                                    lambda p, q: q, torch.Generator().manual_seed(0), on_step=after_step)
        assert outcome.failed and len(outcome.evals) == 1
        outcomes[keep] = outcome.accepted
        if keep:  # the snapshot is loaded back: finite weights that give the accepted validation accuracy
            assert torch.isfinite(child.components["head"].module.linear.weight).all()
            acc = _evaluator(tiny_root).accuracy(child, task, "val", 8, SETTINGS.max_val_examples)
            assert acc == pytest.approx(outcome.evals[0])
    assert outcomes == {True: True, False: False}


@pytest.mark.parametrize("ties", [False, True])
def test_a_tie_with_the_parent_is_accepted_only_with_accept_ties(system, policy, tiny_root, ties):
    child = make_child(system, system.root_path, "a", DS, mutate=False, policy=policy)
    settings = dataclasses.replace(SETTINGS, accept_ties=ties)
    outcome, = train_generation([child], [0.5], make_task("a"), DS, settings, _evaluator(tiny_root),
                                lambda p, q: 0.5, torch.Generator().manual_seed(0))
    assert outcome.accepted is ties


@pytest.mark.parametrize("margin", [0.0, 0.05, 0.13, 0.2])
def test_accept_margin_asks_the_first_kept_snapshot_to_clear_the_parent_by_the_margin(system, policy, tiny_root,
                                                                                      margin):
    """Validation scores 0.52, 0.58, 0.61, 0.64 against a parent's 0.5: the child is accepted once one clears
    0.5 + margin (0.2: none clears 0.7, so it is rejected)."""
    child = make_child(system, system.root_path, "a", DS, mutate=False, policy=policy)
    settings = dataclasses.replace(SETTINGS, validations=4, accept_margin=margin)
    scores = iter([0.52, 0.58, 0.61, 0.64])
    outcome, = train_generation([child], [0.5], make_task("a"), DS, settings, _evaluator(tiny_root),
                                lambda p, q: next(scores), torch.Generator().manual_seed(0))
    assert outcome.accepted is (margin < 0.14)


def test_hopeless_child_stops_early_and_a_close_one_trains_on(system, policy, tiny_root):
    settings = dataclasses.replace(SETTINGS, validations=4, stop_margin=0.1)
    hopeless, close = (make_child(system, system.root_path, "a", DS, mutate=False, policy=policy) for _ in range(2))
    scores = {id(hopeless): 0.3, id(close): 0.75}
    stop, go = train_generation([hopeless, close], [0.8, 0.8], make_task("a"), DS, settings, _evaluator(tiny_root),
                     lambda p, q: scores[id(p)], torch.Generator().manual_seed(0))
    k = settings.max_steps_between_validations
    assert stop.stopped and stop.steps == k and len(stop.evals) == 1 and not stop.accepted
    assert go.stopped is None and go.steps == 4 * k and go.images == 4 * k * settings.batch_size


def test_one_by_one_training_leaves_the_batch_stream_where_lock_step_training_does(system, policy, tiny_root):
    settings = dataclasses.replace(SETTINGS, validations=3, stop_margin=0.1)
    ends = []
    for shared in (True, False):
        kids = [make_child(system, system.root_path, "a", DS, mutate=False, policy=policy) for _ in range(2)]
        scores = {id(kids[0]): 0.3, id(kids[1]): 0.75}  # the first child stops after one validation
        gen = torch.Generator().manual_seed(0)
        train_generation(kids, [0.8, 0.8], make_task("a"), DS, dataclasses.replace(settings, shared_training=shared),
                         _evaluator(tiny_root), lambda p, q, scores=scores: scores[id(p)], gen)
        ends.append(torch.randint(1 << 30, (4,), generator=gen))
    assert torch.equal(ends[0], ends[1])
