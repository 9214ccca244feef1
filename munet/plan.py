"""The plan of a run (``munet run --dry-run``): what a configuration will train and hold in memory, from the
derived quantities the run itself uses (:class:`~munet.evolution.loop.Evolution`), without training anything or
creating the run directory."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

import torch

from munet.config import RunConfig
from munet.data.rows import ImageRows
from munet.data.task import TaskData
from munet.evolution.loop import Evolution
from munet.wiring import Wiring, load_inputs, resolve_device, task_order, train_settings, use_threads

FLOAT_BYTES = 4  # frozen features and evaluation inputs are float32 (bfloat16 autocast on CUDA only halves them)


@dataclass
class TaskPlan:
    """One task of the plan.

    Args:
        name: the task.
        num_classes: its classes.
        sizes: examples per split (``train``, ``val``, ``test``).
        steps_per_child: training steps of one child.
        iteration_steps: training steps of one task iteration (children and probes).
        validation_images: images the children and probes of one task iteration are validated on.
    """

    name: str
    num_classes: int
    sizes: dict[str, int]
    steps_per_child: int
    iteration_steps: int
    validation_images: int


@dataclass
class Plan:
    """What a run of ``cfg`` will do; memory figures are estimates in bytes (see :func:`plan_run`)."""

    cfg: RunConfig
    root: str
    device: str
    threads: int
    tasks: list[TaskPlan]
    order: list[str]
    generations: int
    probes: int
    probe_validations: int
    memory: dict[str, int]

    @property
    def training_images(self) -> int:
        steps = {t.name: t.iteration_steps for t in self.tasks}
        return sum(steps[name] for name in self.order) * self.cfg.batch_size

    @property
    def validation_images(self) -> int:
        images = {t.name: t.validation_images for t in self.tasks}
        return sum(images[name] for name in self.order)


def plan_run(cfg: RunConfig, stream: TextIO) -> Plan:
    """The plan of a run of ``cfg``: its root and tasks are loaded (unavailable tasks are reported on ``stream``
    and left out, as a run does), nothing is trained or written.

    Memory estimates: the decoded images of every task held in memory, and the bound of those read per batch
    (``data_cache_mb``, when any task is); the evaluation inputs of the largest split at ``max_image_size`` (up to
    the feature cache bound: larger splits are evaluated per batch); the frozen features of one task's whole training
    set, at the starting and the largest image size (beyond the bound they are computed per batch); and the peak, an
    upper bound: decoded images, the image cache, evaluation inputs and a full feature cache.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    threads = use_threads(cfg.threads)
    root, tasks = load_inputs(cfg, stream)
    wiring = Wiring.of(cfg)
    evo = wiring.evolution(wiring.system(root), tasks, train_settings(cfg, device))
    probes = evo.probes() if cfg.separate_probes else 0
    task_plans = [TaskPlan(name, data.num_classes, data.sizes(), evo.steps_per_child(name), evo.iteration_work(name),
                           _validation_images(evo, name, probes)) for name, data in tasks.items()]

    def features(size: int) -> int:  # one training set's frozen token features at ``size``
        tokens = 1 + (size // root.patch_size) ** 2
        return max(t.sizes["train"] for t in task_plans) * tokens * root.embed_dim * FLOAT_BYTES

    def evaluation_inputs(data: TaskData, plan: TaskPlan) -> int:  # the largest split's, at max_image_size
        rows = max(min(plan.sizes["val"], cfg.max_val_examples), plan.sizes["test"])
        held = rows * 3 * cfg.max_image_size ** 2 * FLOAT_BYTES
        return min(held, bound) if isinstance(data.test_x, ImageRows) else held  # beyond: evaluated per batch

    bound, largest = cfg.feature_cache_mb << 20, features(cfg.max_image_size)
    images = [x for d in tasks.values() for x, _ in map(d.split, d.sizes())]
    memory = {
        "decoded images": sum(x.numel() * x.element_size() for x in images if isinstance(x, torch.Tensor)),
        "image cache bound (tasks read per batch)": (cfg.data_cache_mb << 20) * any(isinstance(x, ImageRows)
                                                                                   for x in images),
        "root weights": sum(p.numel() * p.element_size() for p in root.model.parameters()),
        "evaluation inputs": max(evaluation_inputs(data, plan) for data, plan in zip(tasks.values(), task_plans)),
        "training-set features": features(cfg.image_size),
        "training-set features at max_image_size": largest,
        "feature cache bound": bound,
    }
    held = sum(memory[k] for k in ("decoded images", "image cache bound (tasks read per batch)", "root weights",
                                    "evaluation inputs"))
    memory["peak (upper bound)"] = held + bound
    return Plan(cfg, f"{root.description} [{root.source}]", str(device), threads, task_plans,
                task_order(cfg.rounds, tasks), evo.generations(), probes, evo.probe_settings.validations, memory)


def _validation_images(evo: Evolution, task: str, probes: int) -> int:
    """Images the children and separate probes of one iteration of ``task`` are validated on."""
    rows = min(evo.tasks[task].sizes()["val"], evo.settings.max_val_examples)
    return (sum(evo.children_periods()) + probes * evo.probe_settings.validations) * rows


def format_plan(plan: Plan) -> str:
    """The plan as the lines ``munet run --dry-run`` prints."""
    cfg = plan.cfg
    probes = (f"{plan.probes} probes in a generation of their own ({plan.probe_validations} validation period(s) "
              "each)" if cfg.separate_probes else "the seed probes in the first children's slots")
    agents = cfg.schedule == "agents"
    order = "one agent per task, all at once" if agents else "in round-robin order"
    iterations = (f"{len(plan.tasks)} agents x {cfg.rounds} cycle(s)" if agents
                  else f"{cfg.rounds} round(s) x {len(plan.tasks)} tasks")
    span = ("one warmup-cosine per child" if cfg.schedule_span == "child"
            else "one warmup-cosine over each task iteration's children")
    if cfg.length_ramp:
        span += f", children's validations rising {1 - cfg.length_ramp:g}x to {1 + cfg.length_ramp:g}x"
    if cfg.lineage_lr_decay != 1:
        span += f", its peak x{cfg.lineage_lr_decay:g} per child along a lineage"
    lines = [f"plan of {cfg.out} (dry run: nothing is trained or written)",
             f"root: {plan.root}; device {plan.device}, {plan.threads} CPU thread(s)",
             f"tasks ({len(plan.tasks)}), {order}; per child {cfg.validations} validations (on average) on up to "
             f"{cfg.max_val_examples} images, batches of {cfg.batch_size}:"]
    width = max(len(t.name) for t in plan.tasks)
    for t in plan.tasks:
        s = t.sizes
        lines.append(f"  {t.name:<{width}}  {t.num_classes:>5} classes  train {s['train']:>9,}  val {s['val']:>8,}  "
                     f"test {s['test']:>8,}  {t.steps_per_child:>6,} steps = "
                     f"{t.steps_per_child * cfg.batch_size:,} images per child (on average)")
    lines += [f"task iterations: {len(plan.order)} ({iterations}); each {plan.generations} generations: "
              f"{cfg.children_per_task} children in generations of {cfg.generation_size}, {probes}; learning rate: "
              f"{span}",
              f"images seen in all (estimate): {plan.training_images:,} training + {plan.validation_images:,} "
              f"validation = {plan.training_images + plan.validation_images:,}",
              "memory (estimates):"]
    lines += [f"  {k:<40} {v / 2**20:>12,.1f} MB" for k, v in plan.memory.items()]
    return "\n".join(lines)
