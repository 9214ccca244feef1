"""The one-model export of every task (`munet export RUN --task all`): ONNX in onnxruntime, safetensors through its
loader, each task's outputs equal to its path's, shared components once."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import make_run

import munet
from munet.cli import main
from munet.errors import ExportError
from munet.export import write_export
from munet.multitask_export import run_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("multitask") / "run"
    # μ = 0 and no block clones keep the root's blocks shared by the three tasks: one computation serves them all
    make_run(out, mutation_prob=0.0, clone_prob=0.0, tasks=["a", "b", "c"])
    return munet.load(out)


def _inputs(sizes: list[int], n: int = 4) -> list[torch.Tensor]:
    return [torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(10 + s)) for s in sizes]


def _distinct_blocks(paths) -> int:
    """Block computations of the paths' prefix tree: (image size, components up to and including the block)."""
    return len({(p.hparams["ds_image_size"], p.prefix_key(i + 1, ops)) for p in paths
                for ops in [p.ops()] for i, op in enumerate(ops) if op[0].startswith("block_")})


def test_onnx_graph_of_every_task(system, tmp_path, capsys):
    assert main(["export", str(system.run_dir), "--task", "all", "--format", "onnx", "--out", str(tmp_path)]) == 0
    assert f"exported a, b, c to {tmp_path / 'model.onnx'}" in capsys.readouterr().out
    config = json.loads((tmp_path / "config.json").read_text())
    paths = [system.path(t) for t in system.tasks]
    sizes = sorted({p.hparams["ds_image_size"] for p in paths})
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    assert [i.name for i in graph.input] == [f"images_{s}" for s in sizes] and list(config["tasks"]) == system.tasks
    assert [o.name for o in graph.output] == system.tasks
    # one attention softmax per block computation of the prefix tree, fewer than the paths run one by one
    softmaxes = sum(node.op_type == "Softmax" for node in graph.node)
    assert softmaxes == _distinct_blocks(paths) < sum(p.num_layers for p in paths)
    # and each shared block's weights are stored once (the exporter may fold equal constants such as zero biases,
    # so count the attention's random input projection, one per distinct block component)
    shape = tuple(paths[0].components["block_0"].module.attn.qkv.weight.shape)
    blocks = {c.id for p in paths for name, c in p.components.items() if name.startswith("block_")}
    assert sum(tuple(t.dims) in (shape, shape[::-1]) for t in graph.initializer) == len(blocks)
    inputs = _inputs(sizes)
    outputs = run_onnx(tmp_path / "model.onnx", [f"images_{s}" for s in sizes], inputs)
    for path, got in zip(paths, outputs):
        with torch.no_grad():
            want = path.forward(inputs[sizes.index(path.hparams["ds_image_size"])]).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
        task = config["tasks"][path.task]
        assert task["class_names"] == system.class_names[path.task] and task["path_id"] == path.id


def test_safetensors_of_every_task_and_its_loader(system, tmp_path):
    target = system.export_all(tmp_path)
    assert target.name == "model.safetensors"
    model = munet.load_multitask(tmp_path)
    assert model.tasks == system.tasks and model.export_config["weights"] == "model.safetensors"
    distinct = {c.id for t in system.tasks for c in system.path(t).components.values()}
    assert set(model.parts) == {str(i) for i in distinct}
    inputs = _inputs(model.sizes, n=3)
    with torch.no_grad():
        outputs = model(*inputs)
        for task, got in zip(model.tasks, outputs):
            path = system.path(task)
            want = path.forward(inputs[model.sizes.index(path.hparams["ds_image_size"])])
            assert torch.allclose(got, want, atol=1e-5)


def test_multitask_load_errors(system, tmp_path):
    system.export("a", tmp_path / "single")
    with pytest.raises(ExportError, match="not a munet-multitask-export"):
        munet.load_multitask(tmp_path / "single")
    system.export_all(tmp_path / "onnx", format="onnx")
    with pytest.raises(ExportError, match="onnxruntime"):
        munet.load_multitask(tmp_path / "onnx")


def _files(out) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def test_an_export_over_an_earlier_one_leaves_only_its_own_model_file(system, tmp_path):
    """An export into a directory holding an earlier export of the other format (or kind) replaces it whole: the
    earlier model file, left beside the new config.json, would be loaded in place of the new model."""
    out = tmp_path / "out"
    system.export("a", out)
    system.export("b", out, format="onnx")
    assert _files(out) == ["config.json", "model.onnx"]
    with pytest.raises(ExportError, match="onnxruntime"):  # not task a's safetensors under task b's config
        munet.load_exported(out)
    system.export_all(out)  # checked against the file it wrote, not the single-task model.onnx left there
    assert _files(out) == ["config.json", "model.safetensors"]
    assert munet.load_multitask(out).tasks == system.tasks
    system.export_all(out, format="onnx")
    assert _files(out) == ["config.json", "model.onnx"]


def test_a_model_file_that_is_not_the_one_its_config_names_is_refused(system, tmp_path):
    """What a crash between an export's two renames leaves (or a model file copied in by hand): a config.json
    beside another model file of the same architecture, which would load and answer with the wrong weights."""
    system.export("a", tmp_path / "a")
    system.export("b", tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(ExportError, match="is not the model its config.json was written with"):
        munet.load_exported(tmp_path / "a")


def test_a_failed_export_leaves_the_earlier_model_and_no_temporary_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"earlier")

    def rejected(file) -> None:
        raise ExportError("does not reproduce the path")

    def disk_full(file) -> None:
        file.write_bytes(b"par")
        raise OSError(28, "No space left on device")

    with pytest.raises(ExportError, match="does not reproduce"):
        write_export(tmp_path, "safetensors", {}, lambda file: file.write_bytes(b"new"), rejected)
    with pytest.raises(ExportError, match=f"cannot write the export into {tmp_path}: No space left on device"):
        write_export(tmp_path, "safetensors", {}, disk_full)
    assert _files(tmp_path) == ["model.safetensors"] and (tmp_path / "model.safetensors").read_bytes() == b"earlier"
