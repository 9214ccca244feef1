"""Shared fixtures: sockets blocked, a tiny random-init root and small synthetic tasks."""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from munet.config import RunConfig
from munet.data.task import TaskData
from munet.evolution.hparams import MutationPolicy
from munet.evolution.system import System
from munet.model.root import Root

# the benchmarks' own modules (the baselines) are importable by name, as they are when a benchmark script runs
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach the network: any connection attempt fails loudly."""

    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a CPU shared with other work: one thread avoids thread contention (tens of times faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_root(depth: int = 3, seed: int = 0) -> Root:
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2.0,
                              num_classes=0, class_token=True, global_pool="token")
    model.eval().requires_grad_(False)
    return Root(model=model, name="tiny", description="tiny random-init ViT", source="random-init", sha256=None,
                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), pretrained=False, full_depth=depth)


def make_task(name: str, num_classes: int = 3, n: int = 96, size: int = 12, seed: int = 0) -> TaskData:
    """A learnable synthetic task: each class is a bright square in its own quadrant, plus noise."""
    g = torch.Generator().manual_seed(seed)

    def split(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(count) % num_classes
        x = torch.randint(0, 60, (count, 1, size, size), generator=g, dtype=torch.uint8)
        half = size // 2
        for i, label in enumerate(y.tolist()):
            r, c = divmod(label % 4, 2)
            x[i, :, r * half:(r + 1) * half, c * half:(c + 1) * half] += 180
        return x, y

    (tx, ty), (vx, vy), (sx, sy) = split(n), split(n // 2), split(n // 2)
    return TaskData(name, [f"c{i}" for i in range(num_classes)], tx, ty, vx, vy, sx, sy, "synthetic")


@pytest.fixture
def tiny_root() -> Root:
    return make_tiny_root()


@pytest.fixture
def system(tiny_root: Root) -> System:
    s = System(tiny_root, image_size=8)
    s.add_task("a", 3)
    s.add_task("b", 2)
    return s


@pytest.fixture
def policy() -> MutationPolicy:
    return MutationPolicy("fixed", 0.1, random.Random(0))


def make_run(out, **overrides) -> RunConfig:
    """A complete tiny run (tiny root, synthetic tasks "a" and "b") in ``out``, through the real runner."""
    import io

    from munet.runner import run

    cfg = RunConfig(tasks=["a", "b"], root="tiny", depth=3, image_size=8, max_image_size=12, children_per_task=4,
                    generation_size=2, steps_between_validations=2, validations=2, max_val_examples=48,
                    batch_size=16, device="cpu", out=str(out)).replace(**overrides)
    classes = {"a": 3, "b": 2, "c": 4}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("munet.runner.load_root", lambda spec, depth=None: make_tiny_root(depth or 3))
        mp.setattr("munet.runner.load_tasks", lambda specs, seed, data_dir, stream: {
            n: make_task(n, classes[n], seed=i + 1) for i, n in enumerate(specs)})
        run(cfg, stream=io.StringIO())
    return cfg
