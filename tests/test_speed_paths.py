"""The fast paths of issue 5 compute the same results as the plain ones: lock-step training with augmentation,
frozen prefixes without autograd, the bounded feature cache, shared multi-task inference, the seed bound, and the
GPU-only settings being inert on the CPU."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import make_task

from munet.evolution.hparams import DEFAULTS
from munet.evolution.loop import Evolution
from munet.evolution.mutate import make_child
from munet.evolution.search import SearchConfig
from munet.model.path import TaskPath
from munet.training.evaluate import Evaluator
from munet.training.frozen import FeatureCache, RowStore, frozen_forward, frozen_rows, shared_forward
from munet.training.settings import TrainSettings, to_device
from munet.training.trainer import train_generation

DS = {k: v for k, v in DEFAULTS.items() if k.startswith("ds_")} | {"ds_image_size": 8}
DS_AUGMENTED = DS | {"ds_area_range_min": 0.5, "ds_flip_left_right": True, "ds_brightness_delta": 0.1,
                     "ds_hue_delta": 0.05}
SETTINGS = TrainSettings(batch_size=16, max_steps_between_validations=3, validations=2, max_val_examples=48)


def _evaluator(root, settings: TrainSettings = SETTINGS, max_bytes: int = 1 << 26) -> Evaluator:
    return Evaluator(settings, FeatureCache(max_bytes), root.mean, root.std)


def _children(system, policy, ds=DS) -> list[TaskPath]:
    """A probe of the root (head only), two mutated children and one with its own block_1: three frozen prefixes."""
    kids = [make_child(system, system.root_path, "a", ds, mutate=False, policy=policy)]
    kids += [make_child(system, system.root_path, "a", ds, mutate=True, policy=policy) for _ in range(2)]
    kids.append(make_child(system, system.root_path, "a", ds, mutate=False, policy=policy))
    kids[-1].components["block_1"] = system.clone_component(kids[-1].components["block_1"], "a")
    return kids


def _alone_copies(children: list[TaskPath]) -> list[TaskPath]:
    copies = [copy.deepcopy(c) for c in children]  # same weights, separate objects
    for c in copies:
        c.parent = None
    return copies


def _train(children, task, root, ds=DS, settings: TrainSettings = SETTINGS) -> None:
    """Trains ``children`` together and keeps each outcome in its metrics, as the loop does."""
    outcomes = train_generation(children, [float("-inf")] * len(children), task, ds, settings,
                                _evaluator(root, settings), lambda p, q: q, torch.Generator().manual_seed(0))
    for child, outcome in zip(children, outcomes):
        child.metrics.update(outcome.as_metrics())


def _assert_same_training(a: list[TaskPath], b: list[TaskPath], exact: bool = False) -> None:
    for x, y in zip(a, b):
        assert x.metrics["evals"] == y.metrics["evals"]
        for name, comp in x.components.items():
            other = y.components[name].module.state_dict()
            for key, value in comp.module.state_dict().items():
                if exact:
                    assert torch.equal(value, other[key]), f"{name}.{key}"
                else:
                    torch.testing.assert_close(value, other[key], rtol=1e-5, atol=1e-6)


# --- 1. lock-step training ------------------------------------------------------------------------------------------
def test_lock_step_generation_with_augmentation_equals_training_children_one_by_one(system, policy, tiny_root):
    task = make_task("a")
    together = _children(system, policy, DS_AUGMENTED)
    assert len({c.first_trainable_op() for c in together}) > 1  # several distinct frozen prefixes share batches
    alone = _alone_copies(together)
    _train(together, task, tiny_root, DS_AUGMENTED)
    for c in alone:
        _train([c], task, tiny_root, DS_AUGMENTED)
    _assert_same_training(together, alone)


@pytest.mark.parametrize("ds", [DS, DS_AUGMENTED], ids=["plain", "augmented"])
def test_children_with_the_same_frozen_prefix_compute_it_once(system, policy, tiny_root, ds):
    task = make_task("a")
    # probes of the root: zero-initialised heads over the root's (shared, hooked) components
    together, alone = ([make_child(system, system.root_path, "a", ds, mutate=False, policy=policy) for _ in range(2)]
                       for _ in range(2))
    calls = {"n": 0}
    hook = system.root_path.components["block_0"].module.register_forward_hook(
        lambda *_: calls.__setitem__("n", calls["n"] + 1))
    try:
        _train(together, task, tiny_root, ds)
        shared = calls["n"]
        calls["n"] = 0
        for c in alone:
            _train([c], task, tiny_root, ds)
    finally:
        hook.remove()
    assert 0 < shared and 2 * shared == calls["n"]  # calibration, training batches and validation alike
    _assert_same_training(together, alone)


def test_frozen_prefixes_build_no_autograd_graph_and_frozen_components_get_no_gradients(system, policy, tiny_root):
    child = _children(system, policy)[-1]  # own block_1: the embedding and block_0 are its frozen prefix
    child.set_mode(train=True)
    task = make_task("a")
    x = _evaluator(tiny_root).inputs(task, "train", 8, 16)
    k, h = frozen_forward(child, x, FeatureCache(1 << 20), "batch")
    assert k == child.first_trainable_op() > 0
    assert not h.requires_grad and h.grad_fn is None
    k, h = frozen_rows(child, lambda rows: x[rows], torch.arange(8), len(x), FeatureCache(1 << 20), "rows")
    assert not h.requires_grad and h.grad_fn is None
    _train([child], task, tiny_root)
    for comp in child.components.values():
        if not comp.is_trainable():
            assert all(p.grad is None for p in comp.module.parameters()), comp
    assert all(p.grad is None for p in child.trainable_parameters())  # freed after each step, not kept


# --- 2. the bounded feature cache -----------------------------------------------------------------------------------
def test_feature_cache_evicts_least_recently_used_entries_within_its_byte_bound():
    cache = FeatureCache(max_bytes=100)
    cache.put("a", torch.zeros(10))  # 40 bytes
    cache.put("b", torch.zeros(10))
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("c", torch.zeros(10))  # 120 bytes > 100: "b" goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.bytes == 80 and len(cache) == 2
    cache.put("too big", torch.zeros(30))  # larger than the bound: not kept, evicts nothing
    assert cache.get("too big") is None and len(cache) == 2
    cache.put("rows", RowStore(torch.zeros(5, 2)))  # row stores count their full size
    assert cache.bytes <= cache.max_bytes and cache.get("rows") is not None
    off = FeatureCache(max_bytes=0)
    off.put("a", torch.zeros(1))
    assert len(off) == 0 and off.bytes == 0


def test_evaluator_cache_is_keyed_by_components_and_size_shared_across_children_and_bounded(system, policy,
                                                                                            tiny_root):
    task = make_task("a")
    probe_1, probe_2 = (make_child(system, system.root_path, "a", DS, mutate=False, policy=policy) for _ in range(2))
    own_block = _children(system, policy)[-1]
    at_12 = make_child(system, system.root_path, "a", DS | {"ds_image_size": 12}, mutate=False, policy=policy)
    for p in (probe_1, probe_2, own_block, at_12):
        torch.nn.init.normal_(p.components["head"].module.linear.weight, generator=torch.Generator().manual_seed(p.id))
    ev = _evaluator(tiny_root)
    ev.accuracy(probe_1, task, "val", 8)
    assert len(ev.cache) == 1
    ev.accuracy(probe_2, task, "val", 8)  # another child, same frozen components: served from the cache
    assert len(ev.cache) == 1
    ev.accuracy(own_block, task, "val", 8)  # different components: its own entry
    ev.accuracy(at_12, task, "val", 12)  # different image size: its own entry
    assert len(ev.cache) == 3
    small = _evaluator(tiny_root, max_bytes=ev.cache.bytes // 2)  # too small for all three entries
    for p, size in ((probe_1, 8), (own_block, 8), (at_12, 12), (probe_2, 8)):
        assert small.accuracy(p, task, "val", size) == ev.accuracy(p, task, "val", size)
        assert small.cache.bytes <= small.cache.max_bytes
    assert 0 < len(small.cache) < 3


# --- 3. multi-task inference ----------------------------------------------------------------------------------------
def _retained(system, policy) -> list[TaskPath]:
    """Four locked paths: two differing only in their head, one with its own block_2, one at another image size."""
    paths = [make_child(system, system.root_path, t, DS, mutate=False, policy=policy) for t in ("a", "b", "a")]
    paths[2].components["block_2"] = system.clone_component(paths[2].components["block_2"], "a")
    paths.append(make_child(system, system.root_path, "b", DS | {"ds_image_size": 12}, mutate=False,
                            policy=policy))
    g = torch.Generator().manual_seed(0)
    for p in paths:
        torch.nn.init.normal_(p.components["head"].module.linear.weight, generator=g)
        for comp in p.components.values():
            comp.locks.add(p.task)
    return paths


def test_shared_forward_equals_each_path_alone_and_runs_shared_components_once(system, policy, tiny_root):
    paths = _retained(system, policy)
    task = make_task("a")
    ev = _evaluator(tiny_root)

    def images(size: int) -> torch.Tensor:
        return ev.inputs(task, "test", size, 20)

    with torch.no_grad():
        alone = [p(images(p.hparams["ds_image_size"])) for p in paths]
    calls: dict[str, int] = {}
    root = system.root_path.components
    hooks = [root[n].module.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
             for n in ("block_0", "block_2", "norm")]
    try:
        together = shared_forward(paths, images, FeatureCache(1 << 26), "batch")
    finally:
        for h in hooks:
            h.remove()
    for x, y in zip(alone, together):
        torch.testing.assert_close(x, y)
    # block_0: once at 8 px (three paths), once at 12 px; block_2 and norm: once for the two paths sharing them,
    # plus the path with its own block_2 (norm only) and the 12 px path
    assert calls == {"block_0": 2, "block_2": 2, "norm": 3}
    chunked = shared_forward(paths, images, FeatureCache(1 << 26), "batch", chunk=7)
    for x, y in zip(alone, chunked):
        torch.testing.assert_close(x, y)
    evicting = shared_forward(paths, images, FeatureCache(0), "batch")  # nothing kept: recomputed, same outputs
    for x, y in zip(alone, evicting):
        torch.testing.assert_close(x, y)


# --- 4. the seed bound ----------------------------------------------------------------------------------------------
def test_seed_phase_probes_at_most_max_seeds_other_tasks_newest_first_plus_the_root(system, policy, tiny_root):
    others = ["b", "c", "d", "e"]
    for name in others[1:]:
        system.add_task(name, 2)
    for name in others:  # one retained path per other task, in this order
        path = make_child(system, system.root_path, name, DS, mutate=False, policy=policy)
        path.metrics["quality"] = 0.5
        system.paths[name].append(path)
        system.end_task(name)
    settings = TrainSettings(batch_size=16, max_steps_between_validations=1, validations=1, max_val_examples=16)
    evo = Evolution(system, {"a": make_task("a")}, policy, settings, _evaluator(tiny_root, settings),
                    SearchConfig(children_per_task=4, generation_size=4, max_image_size=8, max_seeds=2))
    probed: list[TaskPath] = []
    evo.after_generation.append(
        lambda task, gen, children: probed.extend(c for c in children if c.metrics["seed_probe"]))
    evo.task_iteration("a")
    newest = [system.best_path(t) for t in ("e", "d")]
    assert [p.parent for p in probed] == [*newest, system.root_path]


# --- 5. GPU-only settings on the CPU --------------------------------------------------------------------------------
def test_bf16_autocast_setting_is_inert_on_cpu_and_leaves_results_bit_identical(system, policy, tiny_root):
    task = make_task("a")
    plain = _children(system, policy)
    flagged = _alone_copies(plain)
    _train(plain, task, tiny_root)
    _train(flagged, task, tiny_root, settings=dataclasses.replace(SETTINGS, autocast_bf16=True))
    _assert_same_training(plain, flagged, exact=True)


def test_to_device_on_cpu_returns_the_tensor_unchanged():
    t = torch.arange(6)
    assert to_device(t, torch.device("cpu")) is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_on_cuda_copies_through_pinned_memory():
    t = torch.arange(6)
    out = to_device(t, torch.device("cuda"))
    torch.cuda.synchronize()
    assert out.is_cuda and torch.equal(out.cpu(), t)
