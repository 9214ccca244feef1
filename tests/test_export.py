"""Export round trips (PyTorch, timm, ONNX) and predictions through ``munet.load`` and the CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import Crash, crashing_store, make_run
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import munet
from munet.cli import main
from munet.errors import DataError, ExportError, MunetError
from munet.export import export_path, path_config
from munet.model.components import ResidualAdapter
from munet.model.path import TaskPath
from munet.model.vitarch import describe_vit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("export") / "run"
    # μ = 0 and no block clones: no clone or adapter mutations, so both tasks' paths keep the same root components
    make_run(out, mutation_prob=0.0, clone_prob=0.0)
    return out


def _images(n: int = 5, size: int = 12) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


def _inputs(config: dict, n: int = 3) -> torch.Tensor:
    size = config["image_size"]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_export_round_trip_pytorch_and_timm(run_dir, tmp_path):
    system = munet.load(run_dir)
    assert system.tasks == ["a", "b"] and system.complete
    target = system.export("a", tmp_path / "a")
    assert target.name == "model.safetensors"
    model = munet.load_exported(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["class_names"] == ["c0", "c1", "c2"] and config["image_size"] == model.export_config["image_size"]
    assert len(config["mean"]) == len(config["std"]) == 3 and config["source"]["path_id"] == system.path("a").id
    x = _inputs(config)
    with torch.no_grad():
        expected = system.path("a").forward(x)
        assert torch.allclose(model(x), expected, atol=1e-5)
        # no adapters: the same weights load into timm's own class
        assert config["architecture"]["adapters"] == {} and config["timm_kwargs"]
        vit = VisionTransformer(**config["timm_kwargs"]).eval()
        from safetensors.torch import load_file

        vit.load_state_dict(load_file(str(target)), strict=True)
        assert torch.allclose(vit(x), expected, atol=1e-5)


def test_export_with_adapters(system, tmp_path):
    """A path with a (non-zero) adapter exports to munet's class, which reproduces it."""
    root = system.root_path
    comps = dict(root.components, posembed=system.root_posembed(root.hparams["ds_image_size"]))
    adapter = ResidualAdapter(system.root.embed_dim, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter.up.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    comps["adapter_1"] = system.new_component("adapter_1", adapter, {"a"}, "a")
    from munet.model.components import StandardisedHead

    head = StandardisedHead(system.root.embed_dim, 3)
    with torch.no_grad():
        head.linear.weight.normal_(0, 1, generator=torch.Generator().manual_seed(2))
        head.calibrate(torch.randn(64, system.root.embed_dim, generator=torch.Generator().manual_seed(3)))
    comps["head"] = system.new_component("head", head, {"a"}, "a")
    path = TaskPath(99, "a", comps, dict(root.hparams))
    arch = describe_vit(system.root.model)
    config = path_config(path, arch, ["x", "y", "z"], system.root.mean, system.root.std, {})
    export_path(path, config, tmp_path)
    model = munet.load_exported(tmp_path)
    assert config["timm_kwargs"] is None and set(config["architecture"]["adapters"]) == {"1"}
    assert any(k.startswith("adapters.1.") for k in model.state_dict())
    x = _inputs(config)
    with torch.no_grad():
        assert torch.allclose(model(x), path.forward(x), atol=1e-5)


def test_onnx_matches_pytorch(run_dir, tmp_path):
    system = munet.load(run_dir)
    target = system.export("b", tmp_path, format="onnx")
    config = json.loads((tmp_path / "config.json").read_text())
    x = _inputs(config, n=4)  # another batch size than the one traced: the batch axis is dynamic
    with torch.no_grad():
        expected = system.path("b").forward(x).numpy()
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"images": x.numpy()})
    except ImportError:  # the [export] extra is not installed: onnx's reference evaluator
        from onnx.reference import ReferenceEvaluator

        (got,) = ReferenceEvaluator(str(target)).run(None, {"images": x.numpy()})
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4


def test_predict_all_computes_shared_components_once(run_dir):
    system = munet.load(run_dir)
    paths = [system.path(t) for t in system.tasks]
    shared = paths[0].components["block_0"]
    assert shared is paths[1].components["block_0"] and all(p.hparams["ds_image_size"] == 8 for p in paths)
    calls = []
    hook = shared.module.register_forward_hook(lambda *args: calls.append(1))
    images = _images()
    try:
        together = system.predict(images, task="all")
        assert len(calls) == 1  # one batch: the shared prefix ran once for both tasks
        alone = {t: system.predict(images, task=t) for t in system.tasks}
    finally:
        hook.remove()
    assert set(together) == {"a", "b"}
    for task in system.tasks:
        assert [p.label for p in together[task]] == [p.label for p in alone[task]]
        assert np.allclose([p.probabilities for p in together[task]], [p.probabilities for p in alone[task]])
        assert all(abs(sum(p.probabilities) - 1) < 1e-5 and p.label in system.class_names[task]
                   for p in together[task])


def test_predictions_match_the_test_accuracy(run_dir):
    """Predicting the test images (as arrays) reproduces the accuracy the run recorded for each task."""
    from conftest import make_task

    system = munet.load(run_dir)
    for i, task in enumerate(system.tasks):
        data = make_task(task, len(system.class_names[task]), seed=i + 1)
        preds = system.predict(data.test_x.numpy(), task=task)
        accuracy = float(np.mean([p.index == y for p, y in zip(preds, data.test_y.tolist())]))
        assert accuracy == system.path(task).metrics["test_quality"]


def test_predict_and_export_commands(run_dir, tmp_path, capsys):
    files = []
    for i, image in enumerate(_images(2, 20)):
        files.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(image).save(files[-1])
    assert main(["predict", str(run_dir), "--task", "all", *files]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.split()[1] in ("a", "b") and "(" in line for line in lines)
    assert main(["predict", str(run_dir), "--task", "a", "--top", "2", "--json", files[0]]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["task"] == "a" and len(record["probabilities"]) == 3
    assert main(["predict", str(run_dir), "--task", "nope", files[0]]) == 2
    assert "no task 'nope'" in capsys.readouterr().err
    assert main(["predict", str(run_dir), "--task", "a", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--task", "b", "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "model.safetensors").is_file() and (tmp_path / "exp" / "config.json").is_file()


def test_load_errors(tmp_path):
    with pytest.raises(ExportError, match="not a munet export"):
        munet.load_exported(tmp_path)
    for load in (munet.load_exported, munet.load_multitask):
        with pytest.raises(ExportError, match="an export directory is a path, got a NoneType"):
            load(None)
    with pytest.raises(MunetError, match="not a munet run directory|does not exist"):
        munet.load(tmp_path)


def test_all_tasks_of_a_run_without_a_retained_path_is_an_error(run_dir, tmp_path):
    """A run interrupted in its first task iteration answers no task yet: "all" says so rather than answering with
    nothing (or failing on an empty list)."""
    system = munet.load(run_dir)
    system.class_names = {"later": ["x", "y"]}  # the only task has no retained path
    for call in (lambda: system.predict(_images(2)), lambda: system.export_all(tmp_path / "all")):
        with pytest.raises(MunetError, match="has no task with a retained path yet"):
            call()


def test_a_planned_task_without_a_path_yet_is_named_as_such(tmp_path, capsys):
    """A run stopped before its second task's first iteration ended: asking for that task says it has no path yet
    and how to get one, not that the run has no such task."""
    out = tmp_path / "run"
    with pytest.raises(Crash):  # the run stops after its third checkpoint, as a process killed mid-run
        make_run(out, crashing_store("commit", 3, keep_on_failure=True), mutation_prob=0.0, clone_prob=0.0)
    system = munet.load(out)
    assert system.tasks == ["a"] and system.planned == ["a", "b"] and system.tried == []  # a's iteration in flight
    assert main(["predict", str(out), "--task", "b", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "task 'b' of" in err and "has no retained path yet" in err and "munet resume" in err
    with pytest.raises(MunetError, match="no task 'zebra'"):
        system.path("zebra")
    system.system.paths["a"], system.done = [], 1  # as if every child of a's finished iteration had failed
    with pytest.raises(MunetError, match="task 'a' of .* kept no path: every child of its task iterations so far"):
        system.path("a")


def test_export_separate_goes_with_all_tasks(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--task", "a", "--separate", "--out", str(tmp_path / "s")]) == 2
    assert "--separate exports every task into its own directory" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_an_edited_export_config_is_an_export_error(run_dir, tmp_path):
    system = munet.load(run_dir)
    for kind, export, load in (("one", system.export, munet.load_exported),
                               ("all", lambda _, out: system.export_all(out), munet.load_multitask)):
        out = tmp_path / kind
        export(system.tasks[0], out)
        config = json.loads((out / "config.json").read_text())
        for edited, match in ((None, "is not a munet"), ([1], "is not a munet"),
                              ({k: v for k, v in config.items() if k != "architecture"}, "KeyError: 'architecture'")):
            (out / "config.json").write_text(json.dumps(edited))
            with pytest.raises(ExportError, match=match):  # once AttributeError or KeyError from inside
                load(out)
        (out / "config.json").write_bytes(b"\xff\xfe{}")
        with pytest.raises(ExportError, match="cannot read config.json"):  # once UnicodeDecodeError
            load(out)


@pytest.mark.parametrize("images, match", [
    (np.zeros((8, 8, 4), np.uint8), r"shape \(8, 8, 4\) is ambiguous"),  # RGBA was read as 8 images 4 px wide
    (None, "cannot read images from a NoneType"),
    ([[[0, 1], [2]]], "cannot read an image from a list"),
    ([np.zeros((8, 8), np.uint8), 7], "image number 1 is of type int"),
    ("/dev/null", "/dev/null is not a regular file"),  # once "does not exist"
])
def test_predict_refuses_what_is_not_an_image(run_dir, images, match):
    with pytest.raises(DataError, match=match):
        munet.load(run_dir).predict(images)


def test_predict_reads_encoded_images_from_any_bytes_like(run_dir):
    buffer = io.BytesIO()
    Image.fromarray(_images(1)[0]).save(buffer, format="PNG")
    system, data = munet.load(run_dir), buffer.getvalue()
    expected = system.predict(data, "a")
    assert system.predict(bytearray(data), "a") == system.predict(memoryview(data), "a") == expected


def test_predict_reads_bfloat16_and_names_a_task_that_is_not_a_string(run_dir):
    system = munet.load(run_dir)
    images = torch.rand(2, 3, 8, 8)
    task = system.tasks[0]
    expected = [p.probabilities for p in system.predict(images, task=task)]
    got = system.predict(images.to(torch.bfloat16), task=task)  # once numpy's "unsupported ScalarType BFloat16"
    assert len(got) == 2 and all(len(p.probabilities) == len(e) for p, e in zip(got, expected))
    with pytest.raises(MunetError, match="a task is named by a string, got a list"):
        system.predict(images, task=[task])
    with pytest.raises(MunetError, match="a run directory is a path, got a NoneType"):  # once pathlib's TypeError
        munet.load(None)
    with pytest.raises(ExportError, match="an export directory is a path, got a NoneType"):
        system.export(task, None)


def test_untrained_adapters_fold_into_the_biases_before_them(system, tmp_path):
    """Adapters with a zero output projection (a constant shift) fold into the position embedding (before block 0)
    and the previous block's MLP bias; a trained adapter stays; the export reproduces the path."""
    root = system.root_path
    comps = dict(root.components, posembed=system.root_posembed(root.hparams["ds_image_size"]))
    generator = torch.Generator().manual_seed(4)
    for i in range(3):
        adapter = ResidualAdapter(system.root.embed_dim, 4, generator=generator)
        with torch.no_grad():
            adapter.up.bias.normal_(0, 0.5, generator=generator)  # the constant the adapter adds
            if i == 1:
                adapter.up.weight.normal_(0, 0.1, generator=generator)  # trained: not foldable
        comps[f"adapter_{i}"] = system.new_component(f"adapter_{i}", adapter, {"a"}, "a")
    from munet.model.components import StandardisedHead

    head = StandardisedHead(system.root.embed_dim, 3)
    with torch.no_grad():
        head.linear.weight.normal_(0, 1, generator=generator)
    comps["head"] = system.new_component("head", head, {"a"}, "a")
    path = TaskPath(98, "a", comps, dict(root.hparams))
    config = path_config(path, describe_vit(system.root.model), ["x", "y", "z"], system.root.mean, system.root.std,
                         {})
    export_path(path, config, tmp_path)
    assert config["folded_adapters"] == [0, 2] and set(config["architecture"]["adapters"]) == {"1"}
    model = munet.load_exported(tmp_path)
    assert sorted(k.split(".")[1] for k in model.state_dict() if k.startswith("adapters.") and k.endswith("bias")) \
        == ["1", "1", "1"]  # only adapter 1's norm, down and up remain
    x = _inputs(config)
    with torch.no_grad():
        assert torch.allclose(model(x), path.forward(x), atol=1e-5)
        for name in ("adapter_0", "adapter_2"):  # the folded adapters do change the function: they are not dropped
            comps[name].module.up.bias.zero_()
        assert not torch.allclose(model(x), path.forward(x), atol=1e-3)
