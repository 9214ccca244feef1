"""Components: the unit of sharing, freezing and cloning in a muNet system (spec §1.2).

A path is an ordered set of components. The ViT building blocks themselves come from timm (``PatchEmbed``,
``Block``, ``LayerNorm``); this module only wraps them with an identity, a set of train locks and the few muNet
additions (zero-initialised residual adapters and the standardised zero-initialised head).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

NOT_TRAINABLE = "NOT_TRAINABLE"  # pseudo-task lock carried by the root's components


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


def block_index(name: str) -> int:
    """``"block_3"`` or ``"adapter_3"`` -> 3."""
    return int(name.rsplit("_", 1)[1])
