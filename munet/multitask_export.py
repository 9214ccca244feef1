"""One model for every task of a run (``munet export RUN --task all``): one ONNX graph, or one safetensors file, in
which each component that several tasks' paths share appears once, and which has one output per task.

The directory holds ``config.json`` and ``model.onnx`` or ``model.safetensors``:

- ONNX: one input per distinct image size ``S`` of the paths, named ``images_<S>`` (float32 ``(B, 3, S, S)``:
  RGB in [0, 1] resized to ``S x S``, then ``(x - mean) / std``), and one output per task, named after the task
  (float32 ``(B, num_classes)`` logits). A component sequence that several tasks start with is computed once in the
  graph (traced through :func:`~munet.training.frozen.shared_forward`), so Triton or onnxruntime run it once.
- safetensors: each component's tensors under ``<component id>.<tensor name>``; :func:`load_multitask` rebuilds a
  :class:`MultitaskModel` from it and ``config.json`` (which names, per task, the component in each path slot).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path as FsPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from munet import __version__
from munet.errors import ExportError
from munet.export import TOLERANCE, edited_config, export_dir, read_export, write_export, write_onnx
from munet.model.components import Component, kind_of, slot_index
from munet.model.path import TaskPath
from munet.model.vitarch import build_vit
from munet.storage.files import atomic_write, blob_bytes
from munet.training.frozen import FeatureCache, shared_forward

FORMAT = "munet-multitask-export"
VERSION = 1


def image_size(path: TaskPath) -> int:
    return int(path.hparams["ds_image_size"])


class MultitaskModel(nn.Module):
    """Every task's path as one module: ``model(*images)`` -> one logits tensor per task (in ``model.tasks``' order),
    with each shared prefix computed once.

    Args:
        paths: one path per task.
    """

    def __init__(self, paths: list[TaskPath]):
        super().__init__()
        self.paths = paths
        self.tasks = [p.task for p in paths]
        self.sizes = sorted({image_size(p) for p in paths})  # one input per size, in this order
        # registered once each, so a shared component's weights are one set of parameters (one ONNX initializer)
        self.parts = nn.ModuleDict({str(c.id): c.module for p in paths for c in p.components.values()})

    @property
    def inputs(self) -> list[str]:
        return [f"images_{size}" for size in self.sizes]

    def forward(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        by_size = dict(zip(self.sizes, images))
        return tuple(shared_forward(self.paths, by_size.__getitem__, FeatureCache(1 << 62), "multitask"))


def multitask_config(paths: list[TaskPath], arch: dict[str, Any], class_names: dict[str, list[str]], mean: tuple,
                     std: tuple, provenance: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a multitask export (``arch``: the root's :func:`~munet.model.vitarch.describe_vit`)."""
    components: dict[str, dict[str, Any]] = {}
    tasks: dict[str, dict[str, Any]] = {}
    for path in paths:
        for name, comp in path.components.items():
            components[str(comp.id)] = {"slot": name, "shape": kind_of(name).shape_args(comp.module)}
        size = image_size(path)
        tasks[path.task] = {
            "class_names": list(class_names[path.task]), "image_size": size, "input": f"images_{size}",
            "output": path.task, "num_layers": path.num_layers, "path_id": path.id,
            "components": {name: comp.id for name, comp in path.components.items()},
            "val_accuracy": path.metrics.get("quality"), "test_accuracy": path.metrics.get("test_quality")}
    return {"format": FORMAT, "version": VERSION, "munet_version": __version__, "mean": list(mean), "std": list(std),
            "input": "images_<S>: float32 (batch, 3, S, S), RGB in [0, 1] resized to SxS, then (x - mean) / std",
            "output": "<task>: float32 (batch, number of the task's classes) logits, in the order of class_names",
            "tasks": tasks, "components": components, "architecture": {"vit": arch}, "source": provenance}


def export_multitask(paths: list[TaskPath], config: dict[str, Any], out: str | FsPath,
                     fmt: str = "safetensors") -> FsPath:
    """Writes every path as one model into ``out`` and checks it against the paths (the ONNX graph in onnxruntime
    when it is installed).

    Returns:
        The model file written.

    Raises:
        ExportError: unknown format, unwritable directory, or a model that does not reproduce the paths.
    """
    with export_dir(out, fmt) as folder:
        model = MultitaskModel(paths).eval()
        if fmt == "safetensors":
            state = {f"{cid}.{k}": v for cid, part in model.parts.items() for k, v in part.state_dict().items()}
            return write_export(folder, fmt, config, lambda tmp: atomic_write(tmp, blob_bytes(state)),
                                lambda tmp: _check_same(folder, model, _rebuilt(config, tmp)))
        images = tuple(torch.zeros(1, 3, s, s) for s in model.sizes)
        return write_export(folder, fmt, config, lambda tmp: write_onnx(model, images, model.inputs, model.tasks, tmp),
                            lambda tmp: _check_same(folder, model, lambda *x: run_onnx(tmp, model.inputs, list(x))))


def _check_same(out: FsPath, model: MultitaskModel, written: Callable[..., Sequence[Any] | None]) -> None:
    """Raises unless ``written(*images)`` (the written file run; ``None`` without onnxruntime) gives the paths'
    logits."""
    example = [torch.randn(3, 3, s, s, generator=torch.Generator().manual_seed(s)) for s in model.sizes]
    with torch.no_grad():
        expected = [p.forward(example[model.sizes.index(image_size(p))]) for p in model.paths]
        got = written(*example)
    got = None if got is None else [g.numpy() if isinstance(g, torch.Tensor) else g for g in got]
    for task, want, have in zip(model.tasks, expected, got or []):
        diff = float((torch.from_numpy(have) - want).abs().max())
        if not diff <= TOLERANCE:
            raise ExportError(f"the multitask export in {out} does not reproduce task {task}'s path: logits differ "
                              f"by {diff:.3g} (tolerance {TOLERANCE})")


def run_onnx(target: FsPath, inputs: list[str], example: list[torch.Tensor]) -> list[Any] | None:
    """The outputs of an ONNX graph in onnxruntime on CPU, or ``None`` without onnxruntime (the export extra)."""
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    return session.run(None, {name: x.numpy() for name, x in zip(inputs, example)})


def load_multitask(directory: str | FsPath) -> MultitaskModel:
    """The model of a ``munet export --task all`` directory in safetensors form, as a ``torch.nn.Module`` (eval
    mode; ``model.tasks``, ``model.sizes``; ``config.json`` attached as ``model.export_config``).

    Raises:
        ExportError: not a multitask export, an incompatible version, or weights that do not fit.
    """
    config, weights = read_export(directory, FORMAT, VERSION)
    return _rebuilt(config, weights)


def _rebuilt(config: dict[str, Any], weights: FsPath) -> MultitaskModel:
    """The multitask model of ``config`` with the tensors of the safetensors file ``weights``."""
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ExportError(f"cannot read {weights}: {err}") from err
    with edited_config(weights.parent):  # a hand-edited config.json is the user's to fix
        depth = max(task["num_layers"] for task in config["tasks"].values())
        template = build_vit(config["architecture"]["vit"], depth=depth)  # the shapes components are built on
        components = {}
        for cid, spec in config["components"].items():
            module = kind_of(spec["slot"]).build(template, slot_index(spec["slot"]), spec["shape"])
            own = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == cid}
            try:
                module.load_state_dict(own, strict=True)
            except RuntimeError as err:
                raise ExportError(f"{weights} does not fit component {spec['slot']}#{cid} of config.json: "
                                  f"{err}") from err
            components[int(cid)] = Component(int(cid), spec["slot"], module.eval().requires_grad_(False))
        paths = [TaskPath(task["path_id"], name, {slot: components[cid] for slot, cid in task["components"].items()},
                          {"num_layers": task["num_layers"], "ds_image_size": task["image_size"]})
                 for name, task in config["tasks"].items()]
        model = MultitaskModel(paths).eval()
    model.export_config = config
    return model
