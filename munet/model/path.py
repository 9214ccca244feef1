"""A path: one model for one task, as an ordered list of (possibly shared) component references (spec §1.3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from munet.model.components import EMBEDDING_SLOTS, NOT_TRAINABLE, Component, kind_of

Op = tuple[str, ...]  # the component names one forward step reads


@dataclass(eq=False)
class TaskPath:
    """A model for ``task``: component references, hyperparameters, metrics and a parent link.

    ``offsprings`` counts the children the evolution sampled from this path for its own task (the parent sampling
    accepts it w.p. 0.5^offsprings, spec §4); ``fresh_head`` says its head was made new, so training calibrates it
    first.

    Forward pass (shapes for a batch of B images of S x S pixels, patch p, g = S / p, width D)::

        embed: patch_embed(x) (B, g*g, D) -> cat(cls) (B, 1+g*g, D) -> + posembed
        for i < num_layers: [adapter_i] -> block_i                      (B, 1+g*g, D)
        norm(x[:, 0]) (B, D) -> head (B, num_classes)
    """

    id: int
    task: str
    components: dict[str, Component]
    hparams: dict[str, Any]
    parent: TaskPath | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    offsprings: int = 0
    fresh_head: bool = False

    # --- architecture -------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.hparams["num_layers"])

    def ops(self) -> list[Op]:
        """The forward steps in order; each names the components it reads."""
        ops: list[Op] = [EMBEDDING_SLOTS]
        for i in range(self.num_layers):
            if f"adapter_{i}" in self.components:
                ops.append((f"adapter_{i}",))
            ops.append((f"block_{i}",))
        ops.append(("norm",))
        if "head" in self.components:
            ops.append(("head",))
        return ops

    def first_trainable_op(self, ops: list[Op] | None = None) -> int:
        """Index of the first op that reads a trainable component (len(ops) if all are frozen)."""
        ops = ops or self.ops()
        for k, op in enumerate(ops):
            if any(self.components[n].is_trainable() for n in op):
                return k
        return len(ops)

    def prefix_key(self, k: int, ops: list[Op] | None = None) -> tuple[int, ...]:
        """Identity of the computation done by ``ops[:k]``: equal keys give equal outputs for equal inputs."""
        ops = ops or self.ops()
        return tuple(self.components[n].id for op in ops[:k] for n in op)

    # --- forward ------------------------------------------------------------------------------------------------
    def run_op(self, op: Op, x: torch.Tensor) -> torch.Tensor:
        return kind_of(op[0]).forward(self.components, op[0], x)

    def forward(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Runs ``ops[start:stop]`` on ``x`` (images if start == 0, else the output of op ``start - 1``)."""
        for op in self.ops()[start:stop]:
            x = self.run_op(op, x)
        return x

    __call__ = forward

    def flops(self) -> float:
        """Forward FLOPs for one image (2 per multiply-add), counted analytically from the components' shapes."""
        c = self.components
        dim = c["cls"].module.value.shape[-1]
        tokens = c["posembed"].module.value.shape[1]
        return 2.0 * sum(kind_of(name).macs(c[name].module, tokens, dim) for op in self.ops() for name in op)

    # --- parameters ---------------------------------------------------------------------------------------------
    def trainable_components(self) -> list[Component]:
        return [c for c in self.components.values() if c.is_trainable()]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for c in self.trainable_components() for p in c.module.parameters()]

    def num_params(self) -> int:
        return sum(c.num_params for c in self.components.values())

    def num_trainable_params(self) -> int:
        return sum(c.num_params for c in self.trainable_components())

    def accounted_params(self, root_share: int = 1) -> float:
        """Params with each shared component split between the tasks locking it (spec §5); with ``root_share`` a
        root component is split between at least that many tasks (``amortise_root``)."""
        total = 0.0
        for c in self.components.values():
            owners = len((c.locks | {self.task}) - {NOT_TRAINABLE})
            if NOT_TRAINABLE in c.locks:
                owners = max(owners, root_share)
            total += c.num_params / owners
        return total

    def ancestors(self) -> list[TaskPath]:
        """``[self, parent, grandparent, ...]`` up to the root path."""
        chain, p = [], self
        while p is not None:
            chain.append(p)
            p = p.parent
        return chain

    def set_mode(self, train: bool) -> None:
        for c in self.components.values():
            c.module.train(train and c.is_trainable())
            c.module.requires_grad_(train and c.is_trainable())

    def __repr__(self) -> str:
        ids = [c.id for c in self.components.values()]
        return f"TaskPath(#{self.id} {self.task}, layers={self.num_layers}, components={ids})"


#: What a slot holds, as the checks of :func:`slot_problems` read it: the component's name and its shape arguments
#: (``ComponentKind.shape_args``; ``None``: not known, e.g. a component without a record).
SlotContent = tuple[str, "dict[str, Any] | None"]


def slot_problems(slots: dict[str, SlotContent], hparams: dict[str, Any], patch_size: int | None = None,
                  num_classes: int | None = None) -> list[str]:
    """What keeps a path of ``slots`` (slot -> what it holds) and ``hparams`` from running, one phrase each (empty: it
    can be built). A damaged or edited path record is the only source of these.

    Args:
        slots: each slot's content; a component must sit in its own slot, of a layer munet has.
        hparams: the path's hyperparameters (``num_layers``: the blocks it needs; ``ds_image_size``: the position
            embedding's tokens).
        patch_size: the root's patch size; ``None`` skips the position embedding's check.
        num_classes: the task's classes; ``None`` skips the head's check.
    """
    problems = []
    for slot, (name, _) in slots.items():
        try:
            kind_of(slot)
        except KeyError:
            problems.append(f"has a component slot {slot!r} that no munet layer has")
            continue
        if name != slot:
            problems.append(f"holds a {name} component in its {slot} slot")
    try:
        layers = int(hparams["num_layers"])
    except (KeyError, TypeError, ValueError) as err:
        return [*problems, f"has damaged hyperparameters (num_layers: {type(err).__name__}: {err})"]
    if layers < 1:
        return [*problems, f"has damaged hyperparameters (num_layers {layers})"]
    needed = [*EMBEDDING_SLOTS, *(f"block_{i}" for i in range(layers)), "norm", "head"]
    missing = [slot for slot in needed if slot not in slots]
    if missing:
        problems.append(f"has {layers} layers but no component for {', '.join(missing)}")
    posembed, head = (slots.get(slot, ("", None))[1] for slot in ("posembed", "head"))
    if patch_size is not None and posembed is not None:
        size = hparams.get("ds_image_size")
        if not isinstance(size, int) or size < patch_size or size % patch_size:
            problems.append(f"has damaged hyperparameters (ds_image_size {size!r}: not a whole number of the root's "
                            f"{patch_size} px patches)")
        elif posembed.get("tokens") != 1 + (size // patch_size) ** 2:
            problems.append(f"has a position embedding of {posembed.get('tokens')} tokens, but its image size {size} "
                            f"px makes {1 + (size // patch_size) ** 2}")
    if num_classes is not None and head is not None and head.get("num_classes") != num_classes:
        problems.append(f"has a head of {head.get('num_classes')} classes, but its task has {num_classes}")
    return problems
