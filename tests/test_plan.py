"""``munet run --dry-run`` (issue 13): the plan of a run, printed without training or creating the run directory."""

from __future__ import annotations

import pytest
from conftest import TINY_ROOT

from munet.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--dry-run", "--out", str(out), "--tasks", "a,c", "--root", TINY_ROOT, "--depth", "3",
            "--image-size", "8", "--max-image-size", "100", "--rounds", "2", "--children-per-task", "4",
            "--generation-size", "2", "--batch-size", "16", "--steps-between-validations", "2", "--validations", "2",
            "--max-val-examples", "40", "--device", "cpu", "--feature-cache-mb", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    # 96 training images in batches of 16: min(6, 2) steps between validations, 2 validations -> 4 steps a child
    assert "a      3 classes  train        96  val       48  test       48       4 steps = 64 images per child" in text
    assert "c      4 classes" in text
    assert "task iterations: 4 (2 round(s) x 2 tasks); each 3 generations: 4 children in generations of 2, 2 probes" \
        in text
    assert "learning rate: one warmup-cosine over each task iteration's children" in text
    # per iteration (4 children x 4 steps + 2 probes x 2 steps) x 16 images; (4 x 2 + 2 x 1) x 40 validation images
    assert "images seen in all (estimate): 1,280 training + 1,600 validation = 2,880" in text
    # 96 images x (1 + 25 x 25 tokens) x 32 dimensions x 4 bytes: above the 1 MB bound (computed per batch)
    assert "training-set features at max_image_size" in text and f"{96 * 626 * 32 * 4 / 2**20:,.1f} MB" in text


def test_dry_run_of_agents_says_one_agent_per_task(tmp_path, capsys):
    argv = ["run", "--dry-run", "--out", str(tmp_path / "run"), "--tasks", "a,c", "--root", TINY_ROOT, "--depth", "3",
            "--rounds", "3", "--image-size", "8", "--max-image-size", "8", "--device", "cpu", "--schedule", "agents",
            "--set", "schedule_span=child"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "tasks (2), one agent per task, all at once" in text and "(2 agents x 3 cycle(s))" in text
    assert "learning rate: one warmup-cosine per child" in text
