"""The registry of component kinds: every registered kind is put through the same checks (the pattern of timm's
registry-parametrised model tests), so a new kind is tested as soon as it is registered."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_root
from torch.utils.flop_counter import FlopCounterMode

from munet.evolution.system import System
from munet.export import ExportedViT
from munet.model.components import (
    Component,
    ComponentKind,
    ResidualAdapter,
    StandardisedHead,
    get_kind,
    kind_of,
    list_kinds,
    register_kind,
    slot_index,
)
from munet.model.path import TaskPath
from munet.model.vitarch import build_vit, describe_vit

KINDS = list_kinds()
SIZE = 16  # image size of the tiny root (patch 4): 1 + 4 * 4 = 17 tokens


@pytest.fixture(scope="module")
def parts():
    """The tiny root and a path over it holding a component of every kind (an adapter before block 1)."""
    root = make_tiny_root(2)
    system = System(root, SIZE)
    dim = root.embed_dim
    comps = dict(system.root_path.components)
    comps["adapter_1"] = Component(-1, "adapter_1", ResidualAdapter(dim, 16, torch.Generator().manual_seed(0)))
    head = StandardisedHead(dim, 3)
    with torch.no_grad():  # a head that does something, with statistics to fold into the export
        head.linear.weight.normal_()
        head.calibrate(torch.randn(64, dim) * 3 + 1)
    comps["head"] = Component(-2, "head", head)
    order = ["embedding", "cls", "posembed", "block_0", "adapter_1", "block_1", "norm", "head"]
    path = TaskPath(0, "a", {n: comps[n] for n in order}, dict(system.root_path.hparams))
    return root, path


def _slot(kind: ComponentKind) -> str:
    return kind.slot(1 if kind.indexed else None)


def test_registry_holds_every_kind_once_in_forward_order():
    assert KINDS == ["embedding", "cls", "posembed", "adapter", "block", "norm", "head"]
    for slot in ("adapter", "head_1", "block_x", "adapter_dim", "cls_token"):
        with pytest.raises(KeyError):
            kind_of(slot)
    with pytest.raises(ValueError, match="registered twice"):
        register_kind(type("Again", (ComponentKind,), {"name": "head", "timm_name": "head"}))


@pytest.mark.parametrize("name", KINDS)
def test_slot_names_map_back_to_their_kind(name):
    kind = get_kind(name)
    for index in (0, 11) if kind.indexed else (None,):
        slot = kind.slot(index)
        assert kind_of(slot) is kind and slot_index(slot) == index


@pytest.mark.parametrize("name", KINDS)
def test_stored_arguments_rebuild_a_module_of_the_same_shapes(name, parts):
    root, path = parts
    kind = get_kind(name)
    slot = _slot(kind)
    module = path.components[slot].module
    args = json.loads(json.dumps(kind.shape_args(module)))  # what the store keeps, as it reads it back
    built = kind.build(root.model, slot_index(slot), args)
    assert built is not module
    assert Component(0, slot, built).shape_key() == path.components[slot].shape_key()
    built.load_state_dict(module.state_dict())  # strict: the same tensor names


@pytest.mark.parametrize("name", KINDS)
def test_multiply_adds_match_torch_flop_counter(name, parts):
    """Each forward step's counted multiply-adds are half the FLOPs torch counts running it (attention unfused,
    so its matmuls are counted); class token and position embedding are read by the embedding's step."""
    root, path = parts
    kind = get_kind(name)
    slot = _slot(kind)
    comps = {n: Component(c.id, n, copy.deepcopy(c.module)) for n, c in path.components.items()}
    for comp in comps.values():
        if hasattr(comp.module, "attn"):
            comp.module.attn.fused_attn = False
    tokens, dim = path.components["posembed"].module.value.shape[1:]
    macs = kind.macs(comps[slot].module, tokens, dim)
    if slot not in {op[0] for op in path.ops()}:
        assert macs == 0
        return
    x = {"embedding": torch.rand(1, 3, SIZE, SIZE), "head": torch.rand(1, dim)}.get(slot, torch.rand(1, tokens, dim))
    with FlopCounterMode(display=False) as counter:
        kind.forward(comps, slot, x)
    assert 2 * macs == counter.get_total_flops()
    assert isinstance(macs, int)  # path FLOPs are summed exactly


def test_path_flops_are_the_sum_over_its_steps(parts):
    _, path = parts
    tokens, dim = path.components["posembed"].module.value.shape[1:]
    assert path.flops() == 2.0 * sum(kind_of(n).macs(c.module, tokens, dim) for n, c in path.components.items())
    assert path.flops() > 2.0 * kind_of("block_0").macs(path.components["block_0"].module, tokens, dim)


@pytest.mark.parametrize("name", KINDS)
def test_exported_weights_have_timm_names_and_shapes(name, parts):
    root, path = parts
    kind = get_kind(name)
    slot = _slot(kind)
    vit = build_vit({**describe_vit(root.model), "num_classes": 3}, cls=ExportedViT, adapters={1: 16})
    target = vit.state_dict()
    exported = kind.export(path.components[slot].module, slot_index(slot))
    assert exported and all(k in target and target[k].shape == v.shape for k, v in exported.items())


def test_exported_path_computes_what_the_path_computes(parts):
    root, path = parts
    vit = build_vit({**describe_vit(root.model), "num_classes": 3}, cls=ExportedViT, adapters={1: 16}).eval()
    state = {k: v for n, c in path.components.items() for k, v in kind_of(n).export(c.module, slot_index(n)).items()}
    vit.load_state_dict(state)  # strict: every weight of the model, once
    x = torch.rand(4, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(vit(x), path(x), atol=1e-5)
