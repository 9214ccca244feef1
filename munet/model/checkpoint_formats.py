"""Reading foreign ViT checkpoints (timm / PyTorch state dicts, Hugging Face ViT and Dinov2, big_vision ``.npz``)
into timm's key layout, for ``file:`` roots."""

from __future__ import annotations

import json
import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import _convert_dinov2

from munet.errors import ConfigError, WeightsError

Tuple3 = tuple[float, float, float]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# big_vision / AugReg checkpoints expect pixels in [-1, 1]
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

@dataclass
class _Converted:
    """A checkpoint in timm key layout plus what its format told us beyond the tensors."""

    state: dict[str, torch.Tensor]
    layout: str
    num_heads: int | None = None
    eps: float | None = None
    mean: Tuple3 | None = None
    std: Tuple3 | None = None


def read_checkpoint(path: Path) -> _Converted:
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
    raise WeightsError(f"{path} is not a recognised ViT checkpoint; its first keys are {first_few(list(raw))}")


def _first_line(exc: BaseException) -> str:
    """The gist of a reader's error: torch's weights_only refusal alone runs to a dozen lines of advice that does not
    apply (munet never unpickles code)."""
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "pickle" in line or "weights_only" in line:  # advice to load unsafely, which munet refuses by design
        return f"{type(exc).__name__} (not tensors, or not a checkpoint at all)"
    return f"{type(exc).__name__}: {line[:200]}"


def _read_torch_like(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            # weights_only: a checkpoint is data; refusing arbitrary pickled code keeps loading a file safe.
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle, zip and OS errors alike mean "corrupt or unreadable"
        raise WeightsError(f"root weights file {path} is not a readable checkpoint (corrupt, truncated, or holding "
                           f"objects other than tensors): {_first_line(exc)}") from None
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
    for i in range(count_indices(raw, re.escape(prefix) + r"encoder\.layer\.(\d+)\.", path)):
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
        mean, std = as_triple(pre["image_mean"], "mean"), as_triple(pre["image_std"], "std")
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
        raise WeightsError(f"root weights file {path} is not a readable .npz of arrays (corrupt, truncated, or "
                           f"holding objects): {_first_line(exc)}") from None
    prefix = next((p for p in ("", "opt/target/", "params/", "params/img/") if f"{p}embedding/kernel" in w), None)
    if prefix is None:
        raise WeightsError(f"{path} is not a ViT .npz (no 'embedding/kernel'); its first keys are {first_few(list(w))}")
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
        depth = count_indices(w, re.escape(prefix) + r"Transformer/encoderblock_(\d+)/", path)
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


def count_indices(keys: Mapping[str, Any], pattern: str, path: Path) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not found:
        raise WeightsError(f"{path} holds no transformer blocks")
    if found != set(range(len(found))):
        raise WeightsError(f"{path} has non-contiguous block indices {sorted(found)}")
    return len(found)


def add_token_slots(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
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


def as_triple(values: Any, what: str) -> Tuple3:
    vals = tuple(float(v) for v in values)
    if len(vals) != 3:
        raise ConfigError(f"root {what} needs 3 values (RGB), got {values!r}")
    return vals[0], vals[1], vals[2]


# ---------------------------------------------------------------------------------------------------------------
# dinov2-imgfocus


def first_few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
