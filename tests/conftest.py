"""Shared fixtures: sockets blocked, a tiny random-init root and small synthetic tasks.

Runs reach the tiny root and the synthetic tasks by name, through munet's own loaders: the root's architecture is
registered with timm (``random:munet_tiny``), the tasks ``a``, ``b`` and ``c`` with munet's task registry."""

from __future__ import annotations

import hashlib
import random
import socket
import sys
from pathlib import Path

import pytest
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from munet.config import RunConfig
from munet.data.registry import register_task
from munet.data.task import TaskData
from munet.evolution.hparams import MutationPolicy
from munet.evolution.system import System
from munet.model.root import Root
from munet.storage.store import LOCK_NAME, Store

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


def tiny_vit(depth: int = 3, **kwargs) -> VisionTransformer:
    """The tiny test ViT: 16 px, 4 px patches, dimension 32, 2 heads."""
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2.0,
                             class_token=True, global_pool="token", **kwargs)


@register_model
def munet_tiny(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """``random:munet_tiny``: the tiny ViT by name, for runs (the same weights as ``make_tiny_root`` for a seed)."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's, for pretrained weights
        kwargs.pop(key, None)
    model = tiny_vit(**kwargs)
    model.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    return model


TINY_ROOT = "random:munet_tiny"
TINY_CLASSES = {"a": 3, "b": 2, "c": 4}


def make_tiny_root(depth: int = 3, seed: int = 0) -> Root:
    torch.manual_seed(seed)
    model = tiny_vit(depth, num_classes=0)
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


for _seed, (_name, _classes) in enumerate(TINY_CLASSES.items(), start=1):
    register_task(_name)(lambda seed, name=_name, classes=_classes, own=_seed: make_task(name, classes, seed=own))


class Crash(Exception):
    """Stands for the process dying (in-process variant)."""


def crashing_store(point: str, nth: int, keep_on_failure: bool = False) -> type[Store]:
    """A :class:`Store` class that raises :class:`Crash` the ``nth`` time a store of it reaches crash point ``point``
    (``"blob"``, ``"commit"`` or ``"collect"``); ``keep_on_failure``: a failed creation leaves its files, as a
    killed process does."""

    class CrashingStore(Store):
        seen = 0  # across the stores of this class, as across one process's

        def crash_point(self, name: str) -> None:
            if name == point:
                type(self).seen += 1
                if type(self).seen == nth:
                    raise Crash(f"{name}:{nth}")

        def abandon(self) -> None:
            if keep_on_failure:
                self.close()
            else:
                super().abandon()

    return CrashingStore


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


def tiny_config(out, **overrides) -> RunConfig:
    """The configuration of :func:`make_run`."""
    return RunConfig(tasks=["a", "b"], root=TINY_ROOT, depth=3, image_size=8, max_image_size=12, children_per_task=4,
                     generation_size=2, steps_between_validations=2, validations=2, max_val_examples=48,
                     batch_size=16, device="cpu", out=str(out)).replace(**overrides)


def benchmark_module(filename: str):
    """``benchmarks/<filename>`` imported as a module (it puts the benchmarks folder on ``sys.path`` itself)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / filename
    spec = importlib.util.spec_from_file_location(f"{path.stem}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


def make_run(out, store_class: type[Store] = Store, **overrides) -> RunConfig:
    """A complete tiny run (tiny root, synthetic tasks "a" and "b") in ``out``, through the real runner; a run that
    ``out`` holds already is resumed."""
    import io

    from munet.runner import run

    cfg = tiny_config(out, **overrides)
    run(cfg, stream=io.StringIO(), store_class=store_class)
    return cfg


def run_files(run_dir) -> dict[str, str]:
    """Content hash of every file of a run directory but the lock (it only names the last writer) and SQLite's WAL
    index and empty WAL, which a reader may create and the next writer removes (they hold no data)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != LOCK_NAME
            and not p.name.endswith("-shm") and not (p.name.endswith("-wal") and p.stat().st_size == 0)}


def cli_error(capsys, argv: list[str], status: int = 2) -> str:
    """Runs the CLI, expecting ``status`` and an ``error:`` line without a traceback; returns stderr."""
    from munet.cli import main

    assert main(argv) == status
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err
