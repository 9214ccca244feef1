"""Components: the unit of sharing, freezing and cloning in a muNet system (spec §1.2), and the registry of their
kinds.

A path is an ordered set of components. The ViT building blocks themselves come from timm (``PatchEmbed``,
``Block``, ``LayerNorm``); this module only wraps them with an identity, a set of train locks and the few muNet
additions (zero-initialised residual adapters and the standardised zero-initialised head).

A component's slot name says its kind: ``embedding``, ``cls``, ``posembed``, ``block_<i>``, ``adapter_<i>``,
``norm``, ``head``. Everything munet does differently per kind (the forward step, FLOPs, the constructor arguments
a store keeps, the module a stored component is loaded into, the names of its weights in an exported timm model)
is a method of its :class:`ComponentKind`, registered with :func:`register_kind` (timm's ``register_model``
pattern); :func:`kind_of` finds the kind of a slot.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import torch
from torch import nn

NOT_TRAINABLE = "NOT_TRAINABLE"  # pseudo-task lock carried by the root's components
EMBEDDING_SLOTS = ("embedding", "cls", "posembed")  # the first forward step reads these three together


class TokenParam(nn.Module):
    """A bare learned tensor (class token or position embedding) as a module, so every component is a module."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = nn.Parameter(value.detach().clone())

    def forward(self) -> torch.Tensor:
        return self.value


class ResidualAdapter(nn.Module):
    """``x + W2 GELU(W1 LN(x))`` with ``W2 = 0`` at init, so inserting it leaves the path's function unchanged.

    Args:
        dim: token width D.
        adapter_dim: bottleneck width a.
        generator: source of the (seeded) init of the first projection.
    """

    def __init__(self, dim: int, adapter_dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.down = nn.Linear(dim, adapter_dim)
        self.up = nn.Linear(adapter_dim, dim)
        with torch.no_grad():
            # Flax's default Dense init (lecun normal), which the reference adapters use.
            self.down.weight.normal_(0.0, 1.0 / math.sqrt(dim), generator=generator)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        return x + self.up(nn.functional.gelu(self.down(self.norm(x))))


class StandardisedHead(nn.Module):
    """Zero-initialised linear head that reads ``(cls - mu) / sigma`` with ``mu``, ``sigma`` frozen at creation.

    Deviation from the spec (which uses a plain zero head): at shallow depth the pretrained DINOv2 CLS token is
    nearly constant across images, so a plain zero head takes all the gradient, global-norm clipping shrinks
    everything and training stalls at chance. Standardising the head input with statistics of the features the
    head sees at creation fixes that (see docs/design.md).

    Args:
        dim: feature width D.
        num_classes: number of outputs.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("sigma", torch.ones(dim))
        self.linear = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @torch.no_grad()
    def calibrate(self, features: torch.Tensor) -> None:
        """Freezes the input statistics from a ``(N, D)`` sample of the features this head will read."""
        self.mu.copy_(features.mean(0))
        self.sigma.copy_(features.std(0, unbiased=False).clamp_min(1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, num_classes)
        return self.linear((x - self.mu) / self.sigma)


class Component:
    """A named module with an identity and train locks; paths hold references to shared components.

    Args:
        cid: unique id within its system.
        name: architectural slot, e.g. ``"block_2"``, ``"adapter_0"``, ``"posembed"``, ``"head"``.
        module: the torch module holding the weights.
        locks: names of the tasks whose retained paths use it (plus ``NOT_TRAINABLE`` for the root's).
        origin: the task that created it (``"root"`` for the root's), for reporting reuse.
    """

    def __init__(self, cid: int, name: str, module: nn.Module, locks: set[str] | None = None, origin: str = "root"):
        self.id = cid
        self.name = name
        self.module = module
        self.origin = origin
        self.locks: set[str] = set(locks or ())
        self.num_params = sum(t.numel() for t in module.state_dict().values())
        # µ2Net's optimiser-state inheritance: the momentum trace of each trained parameter (by parameter name)
        # at the kept snapshot, copied on clone and used to start the next training of a clone.
        self.momentum: dict[str, torch.Tensor] | None = None

    def is_trainable(self) -> bool:
        return not self.locks

    def shape_key(self) -> tuple:
        """Shapes of all tensors; an ancestor's component is reusable only if this matches."""
        return tuple((k, tuple(v.shape)) for k, v in self.module.state_dict().items())

    def clone(self, cid: int, origin: str) -> Component:
        """A deep copy with no locks: the copy is trainable and owned by ``origin``, the task that cloned it."""
        twin = Component(cid, self.name, copy.deepcopy(self.module), origin=origin)
        twin.momentum = copy.deepcopy(self.momentum)
        return twin

    def __repr__(self) -> str:
        return f"Component({self.name}#{self.id}, {self.num_params} params, locks={sorted(self.locks)})"


def patch_embedding(patch_embed: nn.Module) -> nn.Module:
    """A copy of a timm ``PatchEmbed`` that returns tokens ``(B, g*g, D)`` for any image size divisible by the patch
    (one embedding serves every evolved image size; dynamic-size roots would otherwise return NHWC maps)."""
    module = copy.deepcopy(patch_embed)
    module.strict_img_size = False
    module.flatten = True
    return module


# --- kinds --------------------------------------------------------------------------------------------------------
class ComponentKind:
    """What munet does with one kind of component; the defaults suit a module applied to the token sequence.

    Subclasses set ``name`` (the slot name; for an ``indexed`` kind, one per layer, the prefix of ``<name>_<i>``) and
    ``timm_name`` (where timm's ``VisionTransformer`` keeps the weights, ``{i}`` standing for the layer index), and
    override what differs.
    """

    name: ClassVar[str]
    timm_name: ClassVar[str]
    indexed: ClassVar[bool] = False

    def slot(self, index: int | None = None) -> str:
        """The slot name of this kind (at layer ``index`` for an indexed kind)."""
        return f"{self.name}_{index}" if self.indexed else self.name

    def forward(self, components: dict[str, Component], slot: str, x: torch.Tensor) -> torch.Tensor:
        """The forward step this component starts, on the previous step's output ``x``."""
        return components[slot].module(x)

    def macs(self, module: nn.Module, tokens: int, dim: int) -> int:
        """Forward multiply-adds for one image of ``tokens`` tokens (class token included) of width ``dim``."""
        return 0

    def shape_args(self, module: nn.Module) -> dict[str, int]:
        """The constructor arguments a store keeps, so that :meth:`build` makes a module of the same shapes."""
        return {}

    def build(self, root: nn.Module, index: int | None, args: dict[str, int]) -> nn.Module:
        """A module of this kind's architecture on ``root`` (a timm ``VisionTransformer``), to load weights into."""
        raise NotImplementedError

    def export(self, module: nn.Module, index: int | None) -> dict[str, torch.Tensor]:
        """The component's weights under timm's ``VisionTransformer`` names."""
        prefix = self.timm_name.format(i=index)
        return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


_KINDS: dict[str, ComponentKind] = {}


def register_kind(cls: type[ComponentKind]) -> type[ComponentKind]:
    """Class decorator: registers one instance of ``cls`` under its ``name``."""
    if cls.name in _KINDS:
        raise ValueError(f"component kind {cls.name!r} is registered twice")
    _KINDS[cls.name] = cls()
    return cls


def list_kinds() -> list[str]:
    """The registered kind names, in forward order."""
    return list(_KINDS)


def get_kind(name: str) -> ComponentKind:
    return _KINDS[name]


def kind_of(slot: str) -> ComponentKind:
    """The kind of the component in ``slot``: ``"block_3"`` -> the block kind, ``"head"`` -> the head kind.

    Raises:
        KeyError: ``slot`` is no slot name of a registered kind.
    """
    prefix, _, index = slot.rpartition("_")
    kind = _KINDS.get(prefix) if index.isdigit() else _KINDS.get(slot)
    if kind is None or kind.indexed != index.isdigit():
        raise KeyError(f"unknown component slot {slot!r}")
    return kind


def slot_index(slot: str) -> int | None:
    """The layer index of an indexed kind's slot (``"adapter_3"`` -> 3), ``None`` for other kinds."""
    return int(slot.rpartition("_")[2]) if kind_of(slot).indexed else None


def _token_param_export(kind: ComponentKind, module: nn.Module) -> dict[str, torch.Tensor]:
    return {kind.timm_name: module.value.detach()}


@register_kind
class PatchEmbeddingKind(ComponentKind):
    """The patch embedding; its forward step also reads the class token and the position embedding."""

    name, timm_name = "embedding", "patch_embed"

    def forward(self, components: dict[str, Component], slot: str, x: torch.Tensor) -> torch.Tensor:
        tokens = components["embedding"].module(x)  # (B, g*g, D)
        cls = components["cls"].module().expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, tokens], dim=1) + components["posembed"].module()

    def macs(self, module: nn.Module, tokens: int, dim: int) -> int:
        return (tokens - 1) * module.proj.weight.numel()

    def build(self, root: nn.Module, index: int | None, args: dict[str, int]) -> nn.Module:
        return patch_embedding(root.patch_embed)


@register_kind
class ClassTokenKind(ComponentKind):
    """The class token (read by the patch embedding's forward step)."""

    name, timm_name = "cls", "cls_token"

    def build(self, root: nn.Module, index: int | None, args: dict[str, int]) -> nn.Module:
        return TokenParam(root.cls_token)

    def export(self, module: nn.Module, index: int | None) -> dict[str, torch.Tensor]:
        return _token_param_export(self, module)


@register_kind
class PositionEmbeddingKind(ComponentKind):
    """The position embedding, class slot included; its length follows the image size."""

    name, timm_name = "posembed", "pos_embed"

    def shape_args(self, module: nn.Module) -> dict[str, int]:
        return {"tokens": module.value.shape[1]}

    def build(self, root: nn.Module, index: int | None, args: dict[str, int]) -> nn.Module:
        return TokenParam(torch.zeros(1, args["tokens"], root.embed_dim))

    def export(self, module: nn.Module, index: int | None) -> dict[str, torch.Tensor]:
        return _token_param_export(self, module)


@register_kind
class AdapterKind(ComponentKind):
    """A residual adapter, run before the block of the same index."""

    name, timm_name, indexed = "adapter", "adapters.{i}", True

    def macs(self, module: nn.Module, tokens: int, dim: int) -> int:
        return 2 * tokens * dim * module.down.out_features

    def shape_args(self, module: nn.Module) -> dict[str, int]:
        return {"adapter_dim": module.down.out_features}

    def build(self, root: nn.Module, index: int | None, args: dict[str, int]) -> nn.Module:
        return ResidualAdapter(root.embed_dim, args["adapter_dim"])


@register_kind
class BlockKind(ComponentKind):
    """A transformer block of the root."""

    name, timm_name, indexed = "block", "blocks.{i}", True

    def macs(self, module: nn.Module, tokens: int, dim: int) -> int:
        hidden = module.mlp.fc1.out_features
        return tokens * (4 * dim * dim + 2 * dim * hidden) + 2 * tokens * tokens * dim

    def build(self, root: nn.Module, index: int | None, args: dict[str, int]) -> nn.Module:
        return copy.deepcopy(root.blocks[index])


@register_kind
class NormKind(ComponentKind):
    """The final LayerNorm ("technically part of the head"); FLOPs leave it out."""

    name, timm_name = "norm", "norm"

    def forward(self, components: dict[str, Component], slot: str, x: torch.Tensor) -> torch.Tensor:
        return components["norm"].module(x[:, 0])  # LayerNorm is per token, so only the class token is needed

    def build(self, root: nn.Module, index: int | None, args: dict[str, int]) -> nn.Module:
        return copy.deepcopy(root.norm)


@register_kind
class HeadKind(ComponentKind):
    """The standardised head; exported as timm's plain linear head, the standardisation folded in."""

    name, timm_name = "head", "head"

    def macs(self, module: nn.Module, tokens: int, dim: int) -> int:
        return module.linear.weight.numel()

    def shape_args(self, module: nn.Module) -> dict[str, int]:
        return {"num_classes": module.linear.out_features}

    def build(self, root: nn.Module, index: int | None, args: dict[str, int]) -> nn.Module:
        return StandardisedHead(root.embed_dim, args["num_classes"])

    def export(self, module: nn.Module, index: int | None) -> dict[str, torch.Tensor]:
        # (x - mu) / sigma -> W x + b  is  (W / sigma) x + (b - (W / sigma) mu); folded in float64, stored as float32
        weight = module.linear.weight.double() / module.sigma.double()
        return {"head.weight": weight.float(),
                "head.bias": (module.linear.bias.double() - weight @ module.mu.double()).float()}
