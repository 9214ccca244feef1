"""Baseline paths (spec §5): what each kind trains or freezes, parameter counts, identity at init, the budget."""

from __future__ import annotations

import copy

import pytest
import torch
from baselines import (
    BaselineSpec,
    LoraBlock,
    baseline_settings,
    build_baseline,
    count_params,
    lineage_budget,
    train_baseline,
)
from conftest import make_task

from munet.config import RunConfig
from munet.model.components import ResidualAdapter
from munet.training.evaluate import Evaluator
from munet.training.frozen import FeatureCache
from munet.training.settings import TrainSettings

SIZE = 8  # the system fixture's image size: 2 x 2 patches of the tiny root
TINY = TrainSettings(batch_size=16, max_steps_between_validations=3, validations=2, max_val_examples=48)


def _root_ids(system) -> set[int]:
    return {c.id for c in system.root_path.components.values()} | {system.root_posembed(SIZE).id}


def _features(path, x):
    """Output of the final norm (everything but the head)."""
    with torch.no_grad():
        return path.forward(x, stop=len(path.ops()) - 1)


def _state(path) -> dict[str, dict[str, torch.Tensor]]:
    return {n: copy.deepcopy(c.module.state_dict()) for n, c in path.components.items()}


def _train(path, tiny_root, task):
    evaluator = Evaluator(TINY, FeatureCache(1 << 26), tiny_root.mean, tiny_root.std)
    return train_baseline(path, task, TINY, evaluator)


def test_spec_parsing_and_validation():
    assert BaselineSpec.parse("finetune") == BaselineSpec("finetune")
    assert BaselineSpec.parse("lora:8").name == "lora:8"
    for bad in ("finetune:1", "freeze", "adapters:0", "nope:3"):
        with pytest.raises(ValueError):
            BaselineSpec.parse(bad)


def test_finetune_clones_every_component(system):
    path = build_baseline(system, "a", BaselineSpec("finetune"))
    assert set(path.components) == {"embedding", "cls", "posembed", "block_0", "block_1", "block_2", "norm", "head"}
    assert all(c.is_trainable() for c in path.components.values())
    assert not {c.id for c in path.components.values()} & _root_ids(system)
    n = count_params(path)
    assert n.own == n.total == path.num_params() and n.shared == 0
    assert n.trainable == n.own - 2 * system.root.embed_dim  # the head's frozen mu and sigma are not trained


@pytest.mark.parametrize("frozen", [0, 1, 2, 3])
def test_freeze_bottom_blocks(system, frozen):
    path = build_baseline(system, "a", BaselineSpec("freeze", frozen))
    root = system.root_path.components
    for name in ("embedding", "cls"):
        assert path.components[name] is root[name]
    assert path.components["posembed"] is system.root_posembed(SIZE)
    for i in range(3):
        comp = path.components[f"block_{i}"]
        assert (comp is root[f"block_{i}"]) == (i < frozen)
        assert comp.is_trainable() == (i >= frozen)
    assert path.components["norm"].is_trainable() and path.components["head"].is_trainable()
    n = count_params(path)
    expected = sum(path.components[f"block_{i}"].num_params for i in range(frozen, 3))
    expected += path.components["norm"].num_params + path.components["head"].num_params
    assert n.own == expected and n.own + n.shared == n.total
    assert n.per_task(4) == pytest.approx(n.own + n.shared / 4)
    assert path.first_trainable_op() == 1 + frozen  # the frozen prefix is embedding + the frozen blocks


def test_adapters_before_every_block_start_as_identity(system):
    path = build_baseline(system, "a", BaselineSpec("adapters", 8))
    probe = build_baseline(system, "a", BaselineSpec("freeze", 3))
    for i in range(3):
        adapter = path.components[f"adapter_{i}"]
        assert isinstance(adapter.module, ResidualAdapter) and adapter.module.down.out_features == 8
        assert adapter.is_trainable()
        assert path.components[f"block_{i}"] is system.root_path.components[f"block_{i}"]
    trained = {n for n, c in path.components.items() if c.is_trainable()}
    assert trained == {"adapter_0", "adapter_1", "adapter_2", "norm", "head"}
    x = torch.randn(5, 3, SIZE, SIZE)
    torch.testing.assert_close(_features(path, x), _features(probe, x))


def test_lora_wraps_every_block_starts_as_identity_and_trains_only_lora(system, tiny_root):
    pytest.importorskip("peft")
    path = build_baseline(system, "a", BaselineSpec("lora", 2))
    probe = build_baseline(system, "a", BaselineSpec("freeze", 3))
    x = torch.randn(5, 3, SIZE, SIZE)
    torch.testing.assert_close(_features(path, x), _features(probe, x))
    dim = system.root.embed_dim
    hidden = system.root_path.components["block_0"].module.mlp.fc1.out_features
    per_block = 2 * ((dim + 3 * dim) + (dim + dim) + (dim + hidden) + (hidden + dim))  # r (in + out) per target
    blocks = [path.components[f"block_{i}"] for i in range(3)]
    assert all(isinstance(b.module, LoraBlock) and b.module.num_lora_params() == per_block for b in blocks)
    n = count_params(path)
    assert n.own == 3 * per_block + path.components["norm"].num_params + path.components["head"].num_params
    assert n.trainable == n.own - 2 * dim
    path.set_mode(train=True)  # what the trainer does: the base weights must stay frozen all the same
    grads = {name for b in blocks for name, p in b.module.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in name for name in grads)
    root_before = _state(system.root_path)
    path.set_mode(train=False)
    before = _state(path)
    result = _train(path, tiny_root, make_task("a"))
    assert result["test_acc"] is not None and result["failed"] is None
    for b, name in zip(blocks, ("block_0", "block_1", "block_2")):
        for key, value in b.module.state_dict().items():
            if "lora_B" in key:
                assert not torch.equal(value, before[name][key]), f"{name}.{key} did not train"
            elif "lora_" not in key:
                assert torch.equal(value, before[name][key]), f"{name}.{key} (base weight) changed"
    for name, comp in system.root_path.components.items():
        for key, value in comp.module.state_dict().items():
            assert torch.equal(value, root_before[name][key])


def test_finetune_trains_every_component_and_leaves_the_root_alone(system, tiny_root):
    path = build_baseline(system, "a", BaselineSpec("finetune"))
    before, root_before = _state(path), _state(system.root_path)
    result = _train(path, tiny_root, make_task("a"))
    assert result["test_acc"] is not None and 0.0 <= result["test_acc"] <= 1.0
    assert result["steps"] == 3 * 2 and result["images"] == 3 * 2 * 16
    for name, comp in path.components.items():
        changed = any(not torch.equal(v, before[name][k]) for k, v in comp.module.state_dict().items())
        assert changed, f"{name} did not train"
    for name, comp in system.root_path.components.items():
        for key, value in comp.module.state_dict().items():
            assert torch.equal(value, root_before[name][key])


def test_budget_is_the_longest_munet_lineage():
    cfg = RunConfig(children_per_task=8, generation_size=4, rounds=2, batch_size=64, steps_between_validations=20,
                    validations=3)
    # K = min(ceil(6000 / 64), 20) = 20: 2 rounds x 2 generations x 3 validations x 20 steps x 64 images
    assert lineage_budget(cfg, 6000) == 2 * 2 * 3 * 20 * 64
    assert lineage_budget(cfg, 120) == 2 * 2 * 3 * 2 * 64  # K = ceil(120 / 64) = 2
    settings = baseline_settings(cfg, torch.device("cpu"))
    for n in (120, 1078, 6000):
        steps = settings.steps_between_validations(n) * settings.validations
        assert steps * settings.batch_size == lineage_budget(cfg, n)
    assert baseline_settings(cfg, torch.device("cpu"), validations=7).validations == 7
