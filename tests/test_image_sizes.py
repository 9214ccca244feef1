"""Large image sizes (issue 13): every multiple of the patch up to ``max_image_size`` is evolvable, position embeddings
are resized as the spec says, impossible sizes are refused with an ``error:`` line."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import TINY_ROOT, make_task, make_tiny_root

from munet.cli import main
from munet.errors import ConfigError
from munet.evolution.hparams import MutationPolicy, check_image_sizes, image_sizes
from munet.evolution.loop import Evolution
from munet.evolution.search import SearchConfig
from munet.evolution.system import System
from munet.model.roots import posembed_resize
from munet.storage.store import Store
from munet.training.evaluate import Evaluator
from munet.training.frozen import FeatureCache
from munet.training.settings import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")

PATCH = 4  # the tiny root's patch
LARGE = 25 * PATCH  # 25 x 25 patches: beyond the 16 patches the evolvable list once stopped at


def test_spec_image_size_list_reaches_max_image_size():
    assert image_sizes(16, 384) == [16 * i for i in range(1, 25)]  # spec §3: 16·i for i = 1..24
    assert image_sizes(14, 1022)[-1] == 1022
    check_image_sizes(384, 384, 16)


@pytest.mark.parametrize("size, largest, match", [
    (390, 400, "image_size 390 is not a whole number of the root's 16 px patches; use 384 or 400"),
    (80, 390, "max_image_size 390 is not a whole number of the root's 16 px patches; use 384 or 400"),
    (8, 384, "image_size 8 is not a whole number of the root's 16 px patches; use 16"),
    (400, 384, "image_size 400 exceeds max_image_size 384"),
])
def test_impossible_sizes_are_refused(size, largest, match):
    with pytest.raises(ConfigError, match=match):
        check_image_sizes(size, largest, 16)


def test_cli_refuses_a_size_that_is_not_whole_patches(tmp_path, capsys):
    argv = ["run", "--out", str(tmp_path / "run"), "--tasks", "a", "--root", TINY_ROOT, "--depth", "3",
            "--image-size", "10", "--max-image-size", "12", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: image_size 10 is not a whole number of the root's 4 px patches; use 8 or 12")
    assert not Store.exists(tmp_path / "run")


def _large_evolution(image_size: int) -> Evolution:
    """An evolution whose every data hparam moves at each generation (μ = 1), up to LARGE pixels."""
    root = make_tiny_root()
    tasks = {"a": make_task("a", 3, n=32, seed=1)}
    system = System(root, image_size)
    system.add_task("a", 3)
    settings = TrainSettings(batch_size=8, max_steps_between_validations=1, validations=1, max_val_examples=16)
    evaluator = Evaluator(settings, FeatureCache(1 << 24), root.mean, root.std)
    return Evolution(system, tasks, MutationPolicy("fixed", 1.0, random.Random(0)), settings, evaluator,
                     SearchConfig(children_per_task=4, generation_size=2, max_image_size=LARGE))


def test_mutations_to_and_from_the_largest_size_and_a_path_evaluated_there():
    evo = _large_evolution(LARGE)  # starting at the top once crashed with "100 is not in list"
    evo.task_iteration("a")  # a seed generation at LARGE, then two mutated ones
    sizes = [p.hparams["ds_image_size"] for p in evo.system.paths["a"]]
    down = [evo.sample_ds_hparams("a", mutate=True)["ds_image_size"] for _ in range(8)]
    assert set(down) == {LARGE - PATCH, LARGE}, down  # a neighbour step down, or clipped at the top
    best = evo.system.best_path("a")
    best.hparams["ds_image_size"] = LARGE - PATCH
    up = {evo.sample_ds_hparams("a", mutate=True)["ds_image_size"] for _ in range(8)}
    assert up == {LARGE - 2 * PATCH, LARGE}, up
    best.hparams["ds_image_size"] = LARGE
    path = evo.system.paths["a"][sizes.index(LARGE)]
    assert path.components["posembed"].module.value.shape == (1, 1 + 25 * 25, 32)
    accuracy = evo.evaluator.accuracy(path, evo.tasks["a"], "test", LARGE)
    assert 0.0 <= accuracy <= 1.0 and path.metrics["test_quality"] is not None


def test_position_embedding_resized_bilinearly_with_corners_aligned():
    root = make_tiny_root()  # a 4 x 4 grid; the spec's scipy.ndimage.zoom(order=1) keeps the corner cells
    ramp = torch.arange(4.0).repeat_interleave(4).reshape(1, 16, 1).expand(1, 16, 32)
    root.model.pos_embed.data = torch.cat([torch.full((1, 1, 32), 7.0), ramp], dim=1)
    resized = root.resized_pos_embed(25)
    rows = resized[0, 1:, 0].reshape(25, 25)
    assert torch.allclose(rows[:, 3], torch.linspace(0, 3, 25), atol=1e-6)  # a ramp stays a ramp, 0 to 3
    assert torch.equal(resized[0, 0], torch.full((32,), 7.0))  # the class slot is kept
    assert torch.equal(root.resized_pos_embed(4), root.model.pos_embed.data)


def test_dinov2_roots_keep_their_own_bicubic_resize():
    assert posembed_resize("vit_small_patch14_dinov2") == "bicubic" and posembed_resize("HF Dinov2") == "bicubic"
    assert posembed_resize("vit_base_patch16_224.augreg_in21k") == "bilinear"
    assert posembed_resize("AugReg npz") == "bilinear"
