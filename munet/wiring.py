"""What a configuration is made into: the device, the root and tasks, the per-child training settings, and the
system and evolution built on them (:class:`Wiring`). A run (:mod:`munet.runner`), ``munet.load``, the agents and
the benchmarks all build through this module, so they build alike."""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, TextIO

import torch

from munet.config import RunConfig
from munet.data.registry import load_task
from munet.data.rows import set_data_cache_bytes
from munet.data.task import TaskData
from munet.distributed.executor import make_executor
from munet.errors import ConfigError, MunetError, TaskUnavailable
from munet.evolution.hparams import MutationPolicy, check_image_sizes
from munet.evolution.loop import Evolution
from munet.evolution.search import SearchConfig
from munet.evolution.system import ScoreConfig, System
from munet.model.root import Root
from munet.model.roots import load_root
from munet.training.evaluate import Evaluator
from munet.training.frozen import FeatureCache
from munet.training.settings import TrainSettings

#: Training batches prepared ahead on CUDA, where the device would otherwise wait for reading and augmentation; on
#: the CPU the preparing thread competes with training for the same cores (no gain measured, benchmarks/README.md).
PREFETCH_BATCHES = 2


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but no CUDA device is available")
    return torch.device(name)


def load_tasks(specs: list[str], seed: int, data_dir: str, stream: TextIO,
               stored: Collection[str] = ()) -> dict[str, TaskData]:
    """Loads every task; a task whose source is not installed is reported and left out, not fatal.

    Raises:
        ConfigError: two specs make tasks of the same name (the name is the run's key for a task), or a new task
            (not among the run's ``stored`` ones) is named ``all``, which predict, export and serve read as every task.
    """
    tasks: dict[str, TaskData] = {}
    spec_of: dict[str, str] = {}
    for spec in specs:
        try:
            data = load_task(spec, seed, data_dir)
        except TaskUnavailable as err:
            stream.write(f"warning: task {spec} is unavailable and is left out: {err}\n")
            continue
        if data.name in tasks:  # the later one would replace the earlier, and the run quietly lose a task
            raise ConfigError(f"tasks {spec_of[data.name]} and {spec} are both named {data.name!r} (a folder: or "
                              "npz: task is named after its folder or file); rename one folder or file, or give the "
                              "same data once")
        if data.name == "all" and data.name not in stored:  # a stored run keeps the names it has
            raise ConfigError(f"task {spec} would be named 'all', which predict, export and serve read as every task; "
                              "rename its folder or file")
        for doubt in data.doubts():
            stream.write(f"warning: task {data.name}: {doubt}\n")
        tasks[data.name], spec_of[data.name] = data, spec
    if not tasks:
        raise MunetError("none of the configured tasks could be loaded")
    return tasks


def task_order(rounds: int, tasks: dict[str, TaskData]) -> list[str]:
    """The task iterations of a run: ``rounds`` round-robin passes over ``tasks``."""
    return [name for _ in range(rounds) for name in tasks]


def load_inputs(cfg: RunConfig, stream: TextIO, stored: Collection[str] = ()) -> tuple[Root, dict[str, TaskData]]:
    """The root and the tasks of ``cfg`` (``stored``: the names of the tasks a resumed run holds already); its image
    sizes are checked against the root before the tasks load."""
    try:
        root = load_root(cfg.root, cfg.root_depth())
    except ConfigError as err:
        if not cfg.max_depth:
            raise
        raise ConfigError(f"max_depth {cfg.max_depth}: {err}") from err
    check_image_sizes(cfg.image_size, cfg.max_image_size, root.patch_size)
    set_data_cache_bytes(cfg.data_cache_mb << 20)  # before loading: it decides which tasks are read per batch
    return root, load_tasks(cfg.tasks, cfg.seed, cfg.data_dir, stream, stored)


def use_threads(threads: int) -> int:
    """Sets torch's CPU thread count (0 leaves torch's setting); returns the count computations will use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def train_settings(cfg: RunConfig, device: torch.device) -> TrainSettings:
    """The training budget and options of one child of a run of ``cfg`` on ``device``."""
    return TrainSettings(batch_size=cfg.batch_size, max_steps_between_validations=cfg.steps_between_validations,
                         validations=cfg.validations, max_val_examples=cfg.max_val_examples, device=device,
                         calibration_examples=TrainSettings.calibration_examples if cfg.standardise_head else 0,
                         autocast_bf16=device.type == "cuda", inherit_momentum=cfg.inherit_momentum,
                         prefetch_batches=PREFETCH_BATCHES if device.type == "cuda" else 0,
                         shared_training=cfg.shared_training, accept_ties=cfg.accept_ties,
                         stop_margin=cfg.stop_margin, accept_margin=cfg.accept_margin, keep_diverged=cfg.keep_diverged)


@dataclass
class Wiring:
    """What a configuration makes of a root and tasks, written once: a run (:meth:`Run.setup`), ``munet.load``
    and the benchmarks build their systems and evolutions through it, so they build them alike.

    Args:
        cfg: the configuration.
        policy: the mutation policy; it holds the evolution's random stream, seeded by ``cfg.seed``.
        hparams: the root path's hyperparameters (every path starts from them): the learning rate, the crop and
            flip defaults and the policy's own.
        score: how paths are scored.
    """

    cfg: RunConfig
    policy: MutationPolicy
    hparams: dict[str, Any]
    score: ScoreConfig

    @classmethod
    def of(cls, cfg: RunConfig) -> Wiring:
        policy = MutationPolicy(cfg.mu_policy, cfg.mutation_prob, random.Random(cfg.seed), cfg.clone_prob,
                                cfg.adapter_prob)
        hparams: dict[str, Any] = {"opt_lr": cfg.lr, "ds_area_range_min": cfg.crop_area_min,
                                   "ds_flip_left_right": cfg.flip}
        policy.init_hparams(hparams)
        if cfg.max_depth:  # the root holds max_depth blocks; paths start with depth of them
            hparams["num_layers"] = cfg.depth
        return cls(cfg, policy, hparams, ScoreConfig(cfg.scale_factor, cfg.compute_scale,
                                                         amortise_root=cfg.amortise_root,
                                                         amortise_over=cfg.amortise_over))

    def system(self, root: Root) -> System:
        """A new system on ``root`` (its root path only)."""
        return System(root, self.cfg.image_size, self.score, self.hparams)

    def evolution(self, system: System, tasks: dict[str, TaskData], settings: TrainSettings) -> Evolution:
        """The evolution of ``system`` over ``tasks``, which join the system (a task it has must keep its number
        of classes), with per-child ``settings`` and ``cfg``'s frozen-feature cache.

        Raises:
            MunetError: a task's number of classes differs from the system's.
        """
        cfg = self.cfg
        for name, data in tasks.items():
            if system.num_classes.get(name, data.num_classes) != data.num_classes:
                raise MunetError(f"task {name} has {data.num_classes} classes but the stored system has "
                                 f"{system.num_classes[name]}: its data is not the data the run was made with; "
                                 "restore the original data, or start a new run in another directory")
            system.add_task(name, data.num_classes)
        evaluator = Evaluator(settings, FeatureCache(cfg.feature_cache_mb << 20), system.root.mean, system.root.std)
        return Evolution(system, tasks, self.policy, settings, evaluator, SearchConfig.from_config(cfg),
                         executor=make_executor(cfg.executor, cfg.ray_address, torch.get_num_threads()))
