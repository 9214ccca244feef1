"""The common fine-tuning baselines of spec §5, built as muNet paths so they share every code path with muNet.

Each baseline is one :class:`~munet.model.path.TaskPath` per task, made from the root path's components (the same
root, image size, default hyperparameters and standardised zero head as muNet's children), trained by
:func:`~munet.training.trainer.train_generation` and tested by :meth:`~munet.training.evaluate.Evaluator.accuracy`:

* ``finetune``: every component cloned and trained (embedding, class token, position embedding, blocks, norm).
* ``freeze:X``: the bottom ``X`` blocks (and the embedding) stay the root's; blocks ``>= X`` and the final norm
  are cloned and trained. ``X = depth`` is a linear probe plus the final norm.
* ``adapters:X``: a zero-initialised residual adapter of width ``X`` before every block; adapters, norm and head
  are trained, the root's blocks stay frozen.
* ``lora:R``: every block is a copy of the root's with rank-``R`` LoRA (Hugging Face PEFT) on ``qkv``, ``proj``,
  ``fc1`` and ``fc2``; only the LoRA matrices, the norm and the head train. Needs ``peft`` (``pip install -e
  .[bench]``).

Every baseline also gets a new :class:`~munet.model.components.StandardisedHead`, calibrated by the trainer like
muNet's fresh heads: the fair comparison the reference measurements ask for (offline-assets.md).

Budget: by default the training images of the longest lineage muNet can grow for the task (the paper's "same
sequential budget as one muNet lineage"), ``rounds x generations x validations x K x batch_size`` with
``generations = ceil(children_per_task / generation_size)`` and ``K = min(ceil(N_train / batch_size),
steps_between_validations)``; the quality benchmark instead passes as many validation periods as fill the images
muNet processed for the task (equal compute). A baseline trains once, validating every K steps and keeping its
best-validation snapshot, as muNet's children do.

Parameters per task: the task's own parameters (cloned or new components; for LoRA only its LoRA matrices) plus
the frozen root parts its path reads, split evenly between the tasks (every task of a baseline reads the same
root parts, so they are stored once). This is muNet's accounting (spec §5) applied to the baseline's paths.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from munet.config import RunConfig, generations_per_iteration
from munet.data.task import TaskData
from munet.evolution.hparams import DATA_RANGES
from munet.evolution.system import System
from munet.model.components import Component, ResidualAdapter, StandardisedHead
from munet.model.path import TaskPath
from munet.training.evaluate import Evaluator
from munet.training.settings import TrainSettings
from munet.training.trainer import train_generation

KINDS = ("finetune", "freeze", "adapters", "lora")
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")  # timm Block: attn.qkv, attn.proj, mlp.fc1, mlp.fc2
PEFT_HINT = "LoRA baselines need Hugging Face PEFT: pip install -e '.[bench]' (or pip install 'peft>=0.13,<1')"


@dataclass(frozen=True)
class BaselineSpec:
    """One baseline configuration.

    Args:
        kind: one of :data:`KINDS`.
        value: blocks frozen (``freeze``), adapter width (``adapters``) or LoRA rank (``lora``); ``None`` for
            ``finetune``.
    """

    kind: str
    value: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown baseline kind {self.kind!r}; expected one of {KINDS}")
        if (self.kind == "finetune") != (self.value is None):
            raise ValueError(f"baseline {self.kind} {'takes no' if self.kind == 'finetune' else 'needs a'} value")
        if self.value is not None and self.value < (0 if self.kind == "freeze" else 1):
            raise ValueError(f"baseline {self.kind}: value {self.value} out of range")

    @property
    def name(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value}"

    @classmethod
    def parse(cls, text: str) -> BaselineSpec:
        """``"finetune"``, ``"freeze:3"``, ``"adapters:32"``, ``"lora:8"`` -> spec."""
        kind, _, value = text.partition(":")
        return cls(kind, int(value) if value else None)


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def is_lora_param(name: str) -> bool:
    return "lora_" in name


class LoraBlock(nn.Module):
    """A copy of a root ViT block with LoRA (Hugging Face PEFT) on its linear layers; the copied base weights stay
    frozen whatever :meth:`requires_grad_` is asked, so a path can treat the whole block as one trainable component.

    PEFT zero-initialises ``lora_B``, so the block starts as the exact function of the root block.

    Args:
        block: the root block to copy (left unchanged).
        rank: LoRA rank r.
        alpha: LoRA alpha; ``None`` means ``rank`` (scaling 1, so the update's size does not depend on the rank).
        seed: seed of the ``lora_A`` initialisation (the global RNG is left untouched).
    """

    def __init__(self, block: nn.Module, rank: int, alpha: float | None = None, seed: int = 0):
        super().__init__()
        try:
            from peft import LoraConfig, inject_adapter_in_model  # optional extra: imported only when used
        except ImportError as err:
            raise ImportError(PEFT_HINT) from err
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.block = inject_adapter_in_model(config, copy.deepcopy(block))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        return self.block(x)

    def requires_grad_(self, requires_grad: bool = True) -> LoraBlock:
        # TaskPath.set_mode switches whole components; only the LoRA matrices may ever train.
        for name, p in self.named_parameters():
            p.requires_grad_(requires_grad and is_lora_param(name))
        return self

    def num_lora_params(self) -> int:
        return sum(v.numel() for k, v in self.state_dict().items() if is_lora_param(k))


# --- building -----------------------------------------------------------------------------------------------------
def build_baseline(system: System, task: str, spec: BaselineSpec, image_size: int | None = None, seed: int = 0
                   ) -> TaskPath:
    """A new path for ``task`` (already added to ``system``) that trains what ``spec`` says, from the root.

    Args:
        system: holds the root path; its components are shared (frozen) or cloned, never changed.
        task: the task the path is for.
        spec: the baseline.
        image_size: input size; ``None`` means the root path's ``ds_image_size``.
        seed: seed of new adapters and LoRA matrices.

    Returns:
        The path, with the root path's hyperparameters and ``fresh_head`` set so the trainer calibrates its head.
    """
    root = system.root_path
    depth = root.num_layers
    if spec.kind == "freeze" and spec.value > depth:
        raise ValueError(f"freeze:{spec.value} exceeds the root's {depth} blocks")
    hparams = dict(root.hparams)
    if image_size is not None:
        hparams["ds_image_size"] = image_size
    size = hparams["ds_image_size"]

    def clone(comp: Component) -> Component:
        return system.clone_component(comp, task)

    finetune = spec.kind == "finetune"
    comps: dict[str, Component] = {}
    for name in ("embedding", "cls"):
        comps[name] = clone(root.components[name]) if finetune else root.components[name]
    posembed = system.root_posembed(size)
    comps["posembed"] = clone(posembed) if finetune else posembed
    for i in range(depth):
        block = root.components[f"block_{i}"]
        if spec.kind == "adapters":
            init = torch.Generator().manual_seed(seed * 1_000_003 + i)
            comps[f"adapter_{i}"] = system.new_component(
                f"adapter_{i}", ResidualAdapter(system.root.embed_dim, spec.value, generator=init), origin=task)
            comps[f"block_{i}"] = block
        elif spec.kind == "lora":
            lora = LoraBlock(block.module, spec.value, seed=seed * 1_000_003 + i)
            comps[f"block_{i}"] = system.new_component(f"block_{i}", lora, origin=task)
        elif finetune or i >= spec.value:
            comps[f"block_{i}"] = clone(block)
        else:
            comps[f"block_{i}"] = block
    comps["norm"] = clone(root.components["norm"])  # trained by every baseline (spec §5)
    head = StandardisedHead(system.root.embed_dim, system.num_classes[task])
    comps["head"] = system.new_component("head", head, origin=task)
    path = TaskPath(system.take_path_id(), task, comps, hparams, parent=root, fresh_head=True)
    path.metrics.update(baseline=spec.name)
    return path


# --- accounting ---------------------------------------------------------------------------------------------------
def own_params(comp: Component) -> int:
    """Parameters the task stores itself: a trainable component's whole state, except a LoRA block, whose base
    weights are a frozen copy of the root block and so count as the root's."""
    if not comp.is_trainable():
        return 0
    if isinstance(comp.module, LoraBlock):
        return comp.module.num_lora_params()
    return comp.num_params


@dataclass
class ParamCount:
    """A baseline path's parameters.

    Attributes:
        total: everything the path reads.
        own: the task's own parameters (:func:`own_params` summed).
        trainable: parameters that receive gradients (``own`` less the head's frozen statistics).
        shared: the frozen root parameters the path reads (shared by every task of the baseline).
    """

    total: int
    own: int
    trainable: int
    shared: int

    def per_task(self, num_tasks: int) -> float:
        """``own + shared / num_tasks``: muNet's accounting when all ``num_tasks`` tasks read the same root parts."""
        return self.own + self.shared / max(num_tasks, 1)


def count_params(path: TaskPath) -> ParamCount:
    own = sum(own_params(c) for c in path.components.values())
    total = path.num_params()
    trainable = 0
    for c in path.trainable_components():
        for name, p in c.module.named_parameters():
            if not isinstance(c.module, LoraBlock) or is_lora_param(name):
                trainable += p.numel()
    return ParamCount(total=total, own=own, trainable=trainable, shared=total - own)


# --- budget -------------------------------------------------------------------------------------------------------
def generations(cfg: RunConfig) -> int:
    """Generations of mutated children per task iteration: the longest lineage a task iteration can grow."""
    return generations_per_iteration(cfg.children_per_task, cfg.generation_size, separate_probes=False)


def steps_between_validations(cfg: RunConfig, num_train: int) -> int:
    """muNet's K for a task with ``num_train`` training images."""
    return TrainSettings(batch_size=cfg.batch_size, max_steps_between_validations=cfg.steps_between_validations
                         ).steps_between_validations(num_train)


def lineage_budget(cfg: RunConfig, num_train: int) -> int:
    """Training images of the longest lineage muNet can grow for a task (the module docstring's budget)."""
    return cfg.rounds * generations(cfg) * cfg.validations * steps_between_validations(cfg, num_train) * cfg.batch_size


def baseline_settings(cfg: RunConfig, device: torch.device, validations: int | None = None) -> TrainSettings:
    """muNet's per-child settings with ``validations`` validation periods (default: those of a whole lineage, the
    paper's budget), so one training run uses the baseline's budget."""
    return TrainSettings(batch_size=cfg.batch_size, max_steps_between_validations=cfg.steps_between_validations,
                         validations=validations or cfg.validations * generations(cfg) * cfg.rounds,
                         max_val_examples=cfg.max_val_examples, device=device, autocast_bf16=device.type == "cuda")


# --- training -----------------------------------------------------------------------------------------------------
def train_baseline(path: TaskPath, task: TaskData, settings: TrainSettings, evaluator: Evaluator, seed: int = 0
                   ) -> dict[str, Any]:
    """Trains ``path`` with muNet's trainer (one child, nothing to beat) and tests its best-validation snapshot.

    Returns:
        ``val_acc``, ``test_acc`` (``None`` if training failed), ``failed``, ``steps``, ``images`` (training
        images processed), ``wall_s`` (training and testing) and ``evals``.
    """
    t0 = time.perf_counter()
    for comp in path.components.values():
        comp.module.to(settings.device)
    ds = {k: path.hparams[k] for k in (*DATA_RANGES, "ds_image_size")}
    generator = torch.Generator().manual_seed(seed)
    outcome = train_generation([path], [float("-inf")], task, ds, settings, evaluator, lambda p, q: q, generator)[0]
    path.metrics.update(outcome.as_metrics())
    test = evaluator.accuracy(path, task, "test", ds["ds_image_size"]) if outcome.accepted else None
    return {"val_acc": outcome.quality, "test_acc": test, "failed": outcome.failed, "steps": outcome.steps,
            "images": outcome.images, "wall_s": time.perf_counter() - t0, "evals": outcome.evals}

