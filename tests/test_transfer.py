"""Components and task data as numpy arrays for an object store: the round trip keeps every weight and buffer,
and the packed structure carries no tensor data."""

from __future__ import annotations

import pickle

import torch
from conftest import make_task

from munet.distributed.transfer import PackedComponent, pack_task, unpack_task
from munet.model.components import Component


class WithScratch(torch.nn.Module):
    """A module with a buffer outside its state dict (no state dict can refill it)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scale


def test_packed_component_round_trip(system):
    block = system.root_path.components["block_0"]
    packed = pickle.loads(pickle.dumps(PackedComponent.of(block)))
    assert len(pickle.dumps(packed.skeleton)) < 10_000 < packed.nbytes  # the structure carries no weights
    twin = packed.unpack({"a"}, torch.device("cpu"), writable=False)
    x = torch.randn(2, 5, 32)
    assert twin.id == block.id and twin.locks == {"a"} and torch.equal(twin.module(x), block.module(x))


def test_trainable_copy_is_writable_and_buffers_outside_the_state_dict_survive():
    comp = Component(7, "adapter_0", WithScratch())
    comp.momentum = {"linear.weight": torch.ones(3, 4)}
    twin = pickle.loads(pickle.dumps(PackedComponent.of(comp))).unpack(set(), torch.device("cpu"), writable=True)
    with torch.no_grad():
        twin.module.linear.weight.add_(1.0)  # a trained copy: the packed arrays are not written
    x = torch.randn(2, 4)
    assert torch.allclose(twin.module(x), comp.module(x) + 2 * x.sum(1, keepdim=True))
    assert torch.equal(twin.momentum["linear.weight"], comp.momentum["linear.weight"])


def test_task_round_trip():
    task = make_task("a")
    back = unpack_task(pickle.loads(pickle.dumps(pack_task(task))))
    assert all(torch.equal(getattr(back, f), getattr(task, f)) for f in ("train_x", "train_y", "test_x", "test_y"))
    assert back.class_names == task.class_names
