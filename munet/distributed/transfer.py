"""Components and task data as numpy arrays, to cross process boundaries without pickling tensors: a component
travels as its module's skeleton (structure only, on the ``meta`` device: a few hundred bytes) plus its weights as
arrays, which an object store (Ray's) shares zero-copy with every reader on a node."""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from munet.data.task import TaskData
from munet.model.components import Component

Arrays = dict[str, np.ndarray]


def to_arrays(tensors: dict[str, torch.Tensor]) -> Arrays:
    """Tensors as CPU numpy arrays, by name."""
    return {name: t.detach().cpu().numpy() for name, t in tensors.items()}


def to_tensors(arrays: Arrays, *, writable: bool) -> dict[str, torch.Tensor]:
    """Arrays as CPU tensors, by name: views of the arrays (zero-copy, possibly read-only memory of an object store)
    unless ``writable``, then copies."""
    with warnings.catch_warnings():  # torch warns about read-only arrays; only a writable copy is ever written
        warnings.simplefilter("ignore", UserWarning)
        return {name: torch.from_numpy(np.array(a) if writable else a) for name, a in arrays.items()}


def nbytes(arrays: Arrays | None) -> int:
    return sum(a.nbytes for a in (arrays or {}).values())


def skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the ``meta`` device (no data)."""
    memo: dict[int, torch.Tensor] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for sub in module.modules():  # buffers outside the state dict keep their data: no state dict refills them
        for name, b in sub.named_buffers(recurse=False):
            if name not in sub._non_persistent_buffers_set:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


@dataclass
class PackedComponent:
    """A component in transit: identity, module skeleton, weights (and momentum traces) as arrays.

    Locks are not packed: they change as tasks end while the weights of a frozen component do not, so a packed
    frozen component can be reused across generations and the locks travel with each child.
    """

    cid: int
    name: str
    origin: str
    skeleton: nn.Module
    state: Arrays
    momentum: Arrays | None

    @classmethod
    def of(cls, comp: Component) -> PackedComponent:
        momentum = to_arrays(comp.momentum) if comp.momentum is not None else None
        return cls(comp.id, comp.name, comp.origin, skeleton(comp.module), to_arrays(comp.module.state_dict()),
                   momentum)

    @property
    def nbytes(self) -> int:
        return nbytes(self.state) + nbytes(self.momentum)

    def unpack(self, locks: set[str], device: torch.device, *, writable: bool) -> Component:
        """The component on ``device``; ``writable``: its weights are copies (it will be trained), else views. The
        component's module is this skeleton, filled (unpack a packed component once)."""
        module = self.skeleton
        module.load_state_dict(to_tensors(self.state, writable=writable), assign=True)
        comp = Component(self.cid, self.name, module.to(device), locks, self.origin)
        if self.momentum is not None:
            comp.momentum = to_tensors(self.momentum, writable=True)
        return comp


_SPLIT_FIELDS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def pack_task(task: TaskData) -> TaskData:
    """The task with numpy arrays in place of its in-memory tensors (shared zero-copy by an object store); images
    read per batch from files stay as they are (each worker then reads them)."""
    return dataclasses.replace(task, **{f: v.numpy() for f in _SPLIT_FIELDS
                                        if isinstance(v := getattr(task, f), torch.Tensor)})


def task_nbytes(task: TaskData) -> int:
    """Bytes of a packed task's arrays."""
    return nbytes({f: v for f in _SPLIT_FIELDS if isinstance(v := getattr(task, f), np.ndarray)})


def unpack_task(task: TaskData) -> TaskData:
    """The inverse of :func:`pack_task` (tensors viewing the arrays; training only reads them)."""
    arrays = {f: v for f in _SPLIT_FIELDS if isinstance(v := getattr(task, f), np.ndarray)}
    return dataclasses.replace(task, **to_tensors(arrays, writable=False))
