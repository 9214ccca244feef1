"""Exporting one task's path as a self-contained model, and loading it back without a run store.

An export directory holds ``config.json`` (architecture, image size, normalisation, class names, provenance) and
``model.safetensors`` (or ``model.onnx`` with ``--format onnx``). The model is a timm ``VisionTransformer`` whose
standardised head is folded into a plain linear head; a path with residual adapters adds them as ``adapters.<i>``
(run before block ``i``), so a path without adapters has exactly timm's state dict and loads into timm's class.
An adapter is folded into the weights before it instead where that is exact (:func:`folded_adapters`: only one
whose output projection is zero; a trained adapter is nonlinear in its input and stays a module).

The model takes ``(B, 3, S, S)`` float images: RGB pixels in [0, 1] resized to ``S x S``, then normalised with
``(x - mean) / std`` (both in ``config.json``), and returns ``(B, num_classes)`` logits.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path as FsPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from munet import __version__
from munet.errors import ExportError
from munet.model.components import AdapterKind, ResidualAdapter, kind_of, slot_index
from munet.model.path import TaskPath
from munet.model.vitarch import build_vit
from munet.storage.files import atomic_write, blob_bytes, file_sha256

FORMAT = "munet-export"
VERSION = 1
FORMATS = ("safetensors", "onnx")
MODEL_FILES = {"safetensors": "model.safetensors", "onnx": "model.onnx"}  # the model file of each format
EXPORT_FILES = ("config.json", *MODEL_FILES.values())
TOLERANCE = 1e-4  # max |exported - path| logit difference accepted when an export checks itself


class ExportedViT(VisionTransformer):
    """A timm ``VisionTransformer`` with optional zero-initialised residual adapters before some blocks.

    Args:
        adapters: ``{block index: adapter width}``; empty keeps timm's forward and state dict unchanged.
        kwargs: ``VisionTransformer`` arguments.
    """

    def __init__(self, adapters: dict[int, int] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.adapters = nn.ModuleDict({str(i): ResidualAdapter(self.embed_dim, width)
                                       for i, width in sorted((adapters or {}).items())})

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        if not len(self.adapters) or attn_mask is not None or is_causal:
            return super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        for i, block in enumerate(self.blocks):
            if str(i) in self.adapters:
                x = self.adapters[str(i)](x)
            x = block(x)
        return self.norm(x)


def path_config(path: TaskPath, arch: dict[str, Any], class_names: list[str], mean: tuple, std: tuple,
                provenance: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of an exported path (``arch``: the root's :func:`~munet.model.vitarch.describe_vit`)."""
    size = int(path.hparams["ds_image_size"])
    vit = {**arch, "img_size": size, "depth": path.num_layers, "dynamic_img_size": False,
           "num_classes": len(class_names)}
    folded = folded_adapters(path)
    adapters = {str(slot_index(n)): kind_of(n).shape_args(c.module)["adapter_dim"] for n, c in path.components.items()
                if isinstance(kind_of(n), AdapterKind) and n not in folded}
    # timm's VisionTransformer defaults (its LayerNorm with eps 1e-6, GELU) make these arguments sufficient
    plain = not adapters and vit["norm"] == "timm" and vit["norm_eps"] == 1e-6 and vit["act"] == "gelu"
    timm_kwargs = {k: vit[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                                       "mlp_ratio", "qkv_bias", "qk_norm", "proj_bias", "init_values", "num_classes")}
    return {
        "format": FORMAT, "version": VERSION, "munet_version": __version__,
        "task": path.task, "class_names": list(class_names), "image_size": size,
        "mean": list(mean), "std": list(std),
        "input": f"float32 (batch, 3, {size}, {size}): RGB in [0, 1] resized to {size}x{size}, then (x - mean) / std",
        "output": f"float32 (batch, {len(class_names)}) logits, in the order of class_names",
        "architecture": {"vit": vit, "adapters": adapters},
        "folded_adapters": sorted(slot_index(n) for n in folded),
        "timm_kwargs": {**timm_kwargs, "global_pool": "token", "class_token": True} if plain else None,
        "source": provenance,
    }


def folded_adapters(path: TaskPath) -> dict[str, str]:
    """The path's adapters that fold exactly into the weights before them: adapter slot -> the bias it joins.

    An adapter computes ``x + W2 GELU(W1 LN(x)) + b2``; LayerNorm and GELU are not linear, so in general it cannot
    be merged into neighbouring weights. When ``W2 = 0`` (an adapter that never trained) it adds the constant ``b2``
    to every token, which joins the position embedding (before block 0, class slot included) or the last bias of
    the block before it (its MLP's output bias, when the block has no layer scale).
    """
    folded = {}
    for name, comp in path.components.items():
        if not isinstance(kind_of(name), AdapterKind) or bool(comp.module.up.weight.any()):
            continue
        i = slot_index(name)
        if i == 0:
            folded[name] = "pos_embed"
        elif not hasattr(path.components[f"block_{i - 1}"].module.ls2, "gamma"):  # layer scale would scale b2
            folded[name] = f"blocks.{i - 1}.mlp.fc2.bias"
    return folded


def path_state_dict(path: TaskPath) -> dict[str, torch.Tensor]:
    """The path's weights under the exported model's names; the standardised head is folded into the linear, and
    adapters into the biases before them where that is exact (:func:`folded_adapters`)."""
    folded = folded_adapters(path)
    state: dict[str, torch.Tensor] = {}
    for op in path.ops():
        for name in op:
            if name not in folded:
                state.update(kind_of(name).export(path.components[name].module, slot_index(name)))
    for name, target in folded.items():
        state[target] = state[target] + path.components[name].module.up.bias
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def build_model(config: dict[str, Any]) -> ExportedViT:
    """An (uninitialised) exported model of the architecture ``config`` describes."""
    arch = config["architecture"]
    adapters = {int(i): int(w) for i, w in arch["adapters"].items()}
    return build_vit(arch["vit"], cls=ExportedViT, adapters=adapters)


def export_path(path: TaskPath, config: dict[str, Any], out: str | FsPath, fmt: str = "safetensors") -> FsPath:
    """Writes ``path`` as a self-contained model into ``out`` and checks the written model against the path.

    Returns:
        The model file written.

    Raises:
        ExportError: unknown format, unwritable directory, or an export that does not reproduce the path.
    """
    with export_dir(out, fmt) as folder:
        model = build_model(config)
        model.load_state_dict(path_state_dict(path), strict=True)
        _check_same(model, path, config)
        if fmt == "safetensors":
            return write_export(folder, fmt, config, lambda tmp: atomic_write(tmp, blob_bytes(model.state_dict())))
        size = config["image_size"]
        return write_export(folder, fmt, config, lambda tmp: write_onnx(
            model, (torch.zeros(1, 3, size, size),), ["images"], ["logits"], tmp))


def write_export(out: FsPath, fmt: str, config: dict[str, Any], write: Callable[[FsPath], None],
                 check: Callable[[FsPath], None] | None = None) -> FsPath:
    """Puts an export in place. The model file is written by ``write(file)`` and checked by ``check(file)`` under a
    temporary name; ``config.json``, naming it and its sha256, is written under a temporary name too; the two are
    then renamed back to back, and the other format's model file that an earlier export left is removed (else it
    would be loaded in place of this one). A failure before the renames leaves the earlier export as it was and no
    temporary file; a crash between them leaves a model file whose digest its config.json refutes
    (:func:`read_export` refuses it).

    Returns:
        The model file written.

    Raises:
        ExportError: the files cannot be written (disk full, permissions), or ``check``'s.
    """
    target = out / MODEL_FILES[fmt]
    tmp = target.with_name(target.name + ".tmp")
    try:
        try:
            write(tmp)
            if check is not None:
                check(tmp)
            described = {**config, "weights": target.name, "weights_sha256": file_sha256(tmp)}
            atomic_write(out / "config.json", json.dumps(described, indent=1),
                         before_replace=lambda: os.replace(tmp, target))
        finally:
            tmp.unlink(missing_ok=True)
        for name in MODEL_FILES.values():
            if name != target.name:
                (out / name).unlink(missing_ok=True)
    except OSError as err:
        raise ExportError(f"cannot write the export into {out}: {err.strerror or err}") from err
    return target


def is_export(out: FsPath) -> bool:
    """Whether ``out`` holds a munet export: its config.json says so, and which munet wrote it."""
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and str(config.get("format", "")).startswith("munet") and "munet_version" in config


@contextlib.contextmanager
def export_dir(out: str | FsPath, fmt: str) -> Iterator[FsPath]:
    """The export directory ``out``, created, once ``fmt`` is known to be a format and ``out`` holds nothing an
    export would overwrite but an earlier export. The folders it creates are removed again if the export fails (a
    full disk, a model that does not reproduce its path), so a failed export leaves nothing behind.

    Raises:
        ExportError: unknown format, an empty name, a file, a directory holding other files of an export's names, or
            a directory that cannot be created.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not str(out).strip():
        raise ExportError("the export directory is empty: name one, e.g. --out exported")
    out = FsPath(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"cannot export into {out}: it is a file, not a directory")
    foreign = [name for name in EXPORT_FILES if (out / name).exists()]
    if foreign and not is_export(out):
        raise ExportError(f"{out} already holds {', '.join(foreign)} of something other than a munet export; export "
                          "into a new or empty directory (an earlier munet export there is replaced)")
    created = [folder for folder in (out, *out.parents) if not folder.exists()]  # innermost first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"cannot create export directory {out}: {err.strerror or err}") from err
    try:
        yield out
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()  # only if empty: nothing the failed export did not make
            except OSError:
                break
        raise


def read_export(directory: str | FsPath, kind: str, version: int) -> tuple[dict[str, Any], FsPath]:
    """``config.json`` of an export directory of format ``kind`` and its safetensors weights file.

    Raises:
        ExportError: no readable config.json, another format or version, an ONNX export, or no model.safetensors.
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise ExportError(f"an export directory is a path, got a {type(directory).__name__}: {directory!r}")
    directory = FsPath(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise ExportError(f"{directory} is not a munet export (cannot read config.json: {err})") from err
    if not isinstance(config, dict) or config.get("format") != kind or config.get("version") != version:
        raise ExportError(f"{directory}/config.json is not a {kind} of version {version}")
    named = config.get("weights", MODEL_FILES["safetensors"])  # exports before the key held safetensors only
    if named != MODEL_FILES["safetensors"]:
        raise ExportError(f"{directory} is an export in {named!r}, not in safetensors: load an ONNX export with "
                          "onnxruntime, or export the task again with --format safetensors")
    weights = directory / MODEL_FILES["safetensors"]
    if not weights.is_file():
        raise ExportError(f"{directory} holds no model.safetensors, which its config.json names: export again")
    bound = config.get("weights_sha256")  # absent in exports written before it was recorded
    if bound is not None and bound != file_sha256(weights):
        raise ExportError(f"{weights} is not the model its config.json was written with (an export interrupted "
                          "between its two files, or a file replaced by hand): export again")
    return config, weights


@contextlib.contextmanager
def edited_config(directory: FsPath) -> Iterator[None]:
    """Turns a model that cannot be built from an export's config.json (a key missing or of the wrong type, as a
    hand edit leaves it) into an ExportError naming the file."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
        raise ExportError(f"{directory}/config.json does not describe a model ({type(err).__name__}: {err}): it was "
                          "edited or damaged; export the task again") from err


def _check_same(model: ExportedViT, path: TaskPath, config: dict[str, Any]) -> None:
    size = config["image_size"]
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - path.forward(x.to(next(model.parameters()).device))).abs().max().item()
    if not diff <= TOLERANCE:
        raise ExportError(f"the exported model of path #{path.id} ({path.task}) does not reproduce the path: logits "
                          f"differ by {diff:.3g} (tolerance {TOLERANCE})")


def write_onnx(model: nn.Module, example: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str],
               target: FsPath) -> None:
    """Writes ``model`` traced on ``example`` as a checked ONNX graph whose inputs and outputs have a dynamic batch.

    Args:
        model: the model; ``model(*example)`` returns one tensor per name in ``outputs``.
        example: one input tensor per name in ``inputs``.
        inputs, outputs: the graph's input and output names.
        target: the file written (:func:`write_export` writes it under a temporary name and renames it).
    """
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes are not for users
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(target), dynamo=False, input_names=inputs, output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in inputs + outputs}, opset_version=17)
    import onnx

    onnx.checker.check_model(str(target))


def load_exported(directory: str | FsPath) -> ExportedViT:
    """The model of a ``munet export`` directory as a plain ``torch.nn.Module`` (eval mode); its ``config.json``
    is attached as ``model.export_config``.

    Raises:
        ExportError: not an export directory, written by an incompatible version, or weights that do not fit.
    """
    config, weights = read_export(directory, FORMAT, VERSION)
    with edited_config(FsPath(directory)):
        model = build_model(config)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise ExportError(f"{weights} does not fit the architecture in config.json: {err}") from err
    model.export_config = config
    return model.eval()
