"""Training rows of the speed benchmark (benchmarks/speed.py): one child in munet against a plain PyTorch loop, a
real generation trained together against each child alone, and the peak memory of training it."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812  (conventional alias)
from speed_common import (
    CACHE_BYTES,
    Budget,
    Sizes,
    detached_copy,
    interleaved,
    max_abs_diff,
    new_evolution,
    ratio,
    sharing_ceiling,
)
from torch import nn

from munet.config import RunConfig
from munet.data.augment import eval_batch
from munet.data.registry import load_task
from munet.data.task import TaskData
from munet.evolution.hparams import DEFAULTS, MutationPolicy
from munet.evolution.mutate import make_child
from munet.model.path import TaskPath
from munet.model.root import Root
from munet.training.evaluate import Evaluator
from munet.training.frozen import FeatureCache
from munet.training.schedule import learning_rate
from munet.training.settings import TrainSettings
from munet.training.trainer import is_identity_augmentation, train_generation
from munet.wiring import Wiring

SPEED_SCRIPT = FsPath(__file__).resolve().with_name("speed.py")  # runs the memory rows' subprocesses
CAPTURE_TASKS = ("uci_digits", "fashion_mnist")  # generations are captured in the second task's iteration


# --- 1. one child: munet vs a plain PyTorch loop --------------------------------------------------------------------
class PlainViT(nn.Module):
    """The same network as the munet child, written as one ordinary module (a plain fine-tuning setup)."""

    def __init__(self, child: TaskPath):
        super().__init__()
        c = child.components
        self.patch_embed = copy.deepcopy(c["embedding"].module)
        self.cls_token = nn.Parameter(c["cls"].module.value.detach().clone())
        self.pos_embed = nn.Parameter(c["posembed"].module.value.detach().clone())
        self.blocks = nn.Sequential(*[copy.deepcopy(c[f"block_{i}"].module) for i in range(child.num_layers)])
        self.norm = copy.deepcopy(c["norm"].module)
        self.head = copy.deepcopy(c["head"].module)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + self.pos_embed
        return self.norm(self.blocks(tokens)[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def plain_training(model: PlainViT, task: TaskData, hparams: dict[str, Any], root: Root, settings: TrainSettings,
                   trainable_from: int, generator: torch.Generator) -> float:
    """A hand-written loop: freeze the first blocks, calibrate the head, SGD + clip, validate once at the end."""
    size = hparams["ds_image_size"]
    model.requires_grad_(True)
    for p in [*model.patch_embed.parameters(), model.cls_token, model.pos_embed,
              *model.blocks[:trainable_from].parameters()]:
        p.requires_grad_(False)
    with torch.no_grad():
        calib = eval_batch(task.train_x[: settings.calibration_examples], size, root.mean, root.std)
        model.head.calibrate(model.features(calib))
    params = [p for p in model.parameters() if p.requires_grad]
    momentum = float(hparams["opt_momentum"] or 0.0)
    opt = torch.optim.SGD(params, lr=hparams["opt_lr"], momentum=momentum,
                          nesterov=bool(hparams["opt_nesterov"]) and momentum > 0)
    k = settings.steps_between_validations(len(task.train_y))
    order, cursor = torch.randperm(len(task.train_y), generator=generator), 0
    model.train()
    for step in range(k * settings.validations):
        if cursor + settings.batch_size > len(order):
            order, cursor = torch.randperm(len(task.train_y), generator=generator), 0
        idx = order[cursor: cursor + settings.batch_size]
        cursor += settings.batch_size
        x = eval_batch(task.train_x[idx], size, root.mean, root.std)
        loss = F.cross_entropy(model(x), task.train_y[idx])
        for group in opt.param_groups:
            group["lr"] = learning_rate(hparams, step, k, settings.validations)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.clip_norm)
        opt.step()
    model.eval()
    with torch.no_grad():
        xv = eval_batch(task.val_x[: settings.max_val_examples], size, root.mean, root.std)
        return (model(xv).argmax(-1) == task.val_y[: len(xv)]).float().mean().item()


def bench_single_child(root: Root, cfg: RunConfig, task: TaskData, sizes: Sizes) -> dict[str, Any]:
    system = Wiring.of(cfg).system(root)
    system.add_task(task.name, task.num_classes)
    policy = MutationPolicy("fixed", 0.0, random.Random(0))  # no mutation: the root path's hparams
    ds = {k: v for k, v in DEFAULTS.items() if k.startswith("ds_")} | {"ds_image_size": cfg.image_size}
    child = make_child(system, system.root_path, task.name, ds, mutate=False, policy=policy)
    trainable_from = cfg.depth // 2  # blocks trainable_from.. + norm + head train, as a partial fine-tuning
    for name in [*(f"block_{i}" for i in range(trainable_from, cfg.depth)), "norm"]:
        child.components[name] = system.clone_component(child.components[name], task.name)
    settings = Budget(sizes.single_steps, 1, 64).settings(cfg.batch_size)
    outcome: dict[str, Any] = {}

    def run_munet() -> None:
        c = detached_copy([child])[0]
        ev = Evaluator(settings, FeatureCache(CACHE_BYTES), root.mean, root.std)
        result = train_generation([c], [float("-inf")], task, ds, settings, ev, lambda p, q: q,
                                  torch.Generator().manual_seed(0))
        outcome["munet"], outcome["munet_val"] = c, result[0].quality

    def run_plain() -> None:
        model = PlainViT(detached_copy([child])[0])
        outcome["plain_val"] = plain_training(model, task, child.hparams, root, settings, trainable_from,
                                              torch.Generator().manual_seed(0))
        outcome["plain"] = model

    t_plain, t_munet = interleaved(run_plain, run_munet, sizes.reps)
    trained, model = outcome["munet"], outcome["plain"]
    diff = max((trained.components[f"block_{i}"].module.state_dict()[k] - v).abs().max().item()
               for i in range(trainable_from, cfg.depth)
               for k, v in model.blocks[i].state_dict().items())
    diff = max(diff, (trained.components["head"].module.linear.weight - model.head.linear.weight).abs().max().item())
    return {"ratio": ratio(t_plain, t_munet), "munet_s": t_munet, "plain_s": t_plain,
            "steps": sizes.single_steps, "trainable": f"block_{trainable_from}..{cfg.depth - 1}, norm, head",
            "trainable_params": trained.num_trainable_params(), "max_weight_diff_vs_plain": diff,
            "val_munet": outcome["munet_val"], "val_plain": outcome["plain_val"]}


# --- 2. a real generation, with and without sharing ----------------------------------------------------------------
@dataclass
class Generation:
    """Children of one generation as the real loop made them, before training."""

    children: list[TaskPath]
    to_beat: list[float]
    task: str
    ds: dict[str, Any]


class _Captured(Exception):
    pass


def capture_generations(root: Root, cfg: RunConfig, tasks: dict[str, TaskData], sizes: Sizes,
                        generation_size: int = 8) -> dict[str, Generation]:
    """Runs the real loop over ``CAPTURE_TASKS`` and returns, before training, two generations of the last task's
    iteration: its first (the seed phase: probes of other tasks' paths and of the root, then mutated children) and
    its first made of mutated children only (after the seed phase)."""
    run_tasks = {n: tasks[n] for n in CAPTURE_TASKS}
    evo = new_evolution(root, cfg, run_tasks, sizes.capture, children=2 * generation_size,
                        generation_size=generation_size, max_seeds=cfg.max_seeds)
    found: dict[str, Generation] = {}

    def spy(task: str, gen: int, children: list[TaskPath], to_beat: list[float], ds: dict[str, Any]) -> None:
        if task == CAPTURE_TASKS[-1]:
            phase = "seed_phase" if any(c.metrics["seed_probe"] for c in children) else "after_seed_phase"
            found.setdefault(phase, Generation(detached_copy(children), list(to_beat), task, dict(ds)))
            if phase == "after_seed_phase":
                raise _Captured

    evo.before_training.append(spy)
    try:
        for name in CAPTURE_TASKS:
            evo.task_iteration(name)
    except _Captured:
        pass
    if len(found) < 2:
        raise RuntimeError("the capture run sampled no generation after the seed phase; raise children_per_task")
    return found


def describe(children: list[TaskPath]) -> list[dict[str, Any]]:
    """Where each child starts training and what it trains: how much of it can be shared."""
    rows = []
    for c in children:
        ops = c.ops()
        rows.append({"id": c.id, "first_trainable_op": c.first_trainable_op(ops), "ops": len(ops),
                     "trainable_params": c.num_trainable_params(),
                     "trainable": sorted(comp.name for comp in c.trainable_components())})
    return rows


def train_captured(gen: Generation, task: TaskData, root: Root, settings: TrainSettings,
                   which: list[int] | None = None) -> list[TaskPath]:
    """Trains fresh copies of the generation's children (all, or those indexed by ``which``) together, from a
    fresh cache and the same batch stream."""
    idx = list(range(len(gen.children))) if which is None else which
    children = detached_copy([gen.children[i] for i in idx])
    ev = Evaluator(settings, FeatureCache(CACHE_BYTES), root.mean, root.std)
    outcomes = train_generation(children, [gen.to_beat[i] for i in idx], task, gen.ds, settings, ev, lambda p, q: q,
                                torch.Generator().manual_seed(0))
    for child, outcome in zip(children, outcomes):
        child.metrics.update(outcome.as_metrics())
    return children


def bench_generation(gen: Generation, task: TaskData, root: Root, cfg: RunConfig, sizes: Sizes) -> dict[str, Any]:
    """The generation trained together (one cache) vs each child alone (a fresh cache each), same batches."""
    settings = sizes.generation.settings(cfg.batch_size)
    outcome: dict[str, list[TaskPath]] = {}

    def alone() -> None:
        outcome["alone"] = [train_captured(gen, task, root, settings, [i])[0] for i in range(len(gen.children))]

    def together() -> None:
        outcome["together"] = train_captured(gen, task, root, settings)

    t_alone, t_together = interleaved(alone, together, sizes.gen_reps)
    a, b = outcome["alone"], outcome["together"]
    same_evals = all(x.metrics["evals"] == y.metrics["evals"] for x, y in zip(a, b))
    shared = sum(1 for c in gen.children if c.first_trainable_op() > 0)
    return {"ratio": ratio(t_alone, t_together), "alone_s": t_alone, "together_s": t_together,
            "children": len(gen.children), "with_frozen_prefix": shared, "task": gen.task, "ds": gen.ds,
            "identical_evals": same_evals, "max_weight_diff": max_abs_diff(a, b),
            "ceiling": sharing_ceiling(gen.children, training=True),
            "augmented": not is_identity_augmentation(gen.ds), "composition": describe(gen.children)}



# --- 5. peak memory -----------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in FsPath("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(spec_file: str) -> None:
    """Subprocess side: trains the children named in the spec and prints the resident-set peak during training."""
    spec = torch.load(spec_file, weights_only=False)
    torch.set_num_threads(spec["threads"])
    root_stats, ds, budget, batch_size = spec["root_stats"], spec["ds"], spec["budget"], spec["batch_size"]
    task = load_task(spec["task_spec"], spec["seed"])
    gen: Generation = spec["generation"]
    children = detached_copy([gen.children[i] for i in spec["which"]])
    to_beat = [gen.to_beat[i] for i in spec["which"]]
    del gen, spec  # only the children being trained stay in memory
    settings = Budget(**budget).settings(batch_size)
    evaluator = Evaluator(settings, FeatureCache(CACHE_BYTES), *root_stats)
    FsPath("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on is training's
    before = _status_kb("VmRSS")
    train_generation(children, to_beat, task, ds, settings, evaluator, lambda p, q: q,
                     torch.Generator().manual_seed(0))
    print(json.dumps({"rss_before_kb": before, "peak_kb": _status_kb("VmHWM")}))


def bench_memory(gen: Generation, root: Root, cfg: RunConfig, sizes: Sizes, threads: int) -> dict[str, Any]:
    """Peak resident memory of training the generation vs its largest child alone, each in a fresh subprocess,
    repeated (A B B A ...): the allocator makes single peaks vary by several percent, so medians are compared."""
    largest = max(range(len(gen.children)), key=lambda i: gen.children[i].num_trainable_params())
    peaks: dict[str, list[tuple[int, int]]] = {"generation": [], "single": []}
    with tempfile.TemporaryDirectory() as tmp:
        specs = {}
        for label, which in (("generation", list(range(len(gen.children)))), ("single", [largest])):
            specs[label] = os.path.join(tmp, f"{label}.pt")
            torch.save({"generation": gen, "which": which, "task_spec": gen.task, "seed": cfg.seed, "ds": gen.ds,
                        "budget": dataclasses.asdict(sizes.memory), "batch_size": cfg.batch_size,
                        "threads": threads, "root_stats": (root.mean, root.std)}, specs[label])

        def measure(label: str) -> Callable[[], None]:
            def run() -> None:
                done = subprocess.run([sys.executable, str(SPEED_SCRIPT), "--memory-worker", specs[label]],
                                      capture_output=True, text=True, check=True)
                out = json.loads(done.stdout.strip().splitlines()[-1])
                peaks[label].append((out["peak_kb"] - out["rss_before_kb"], out["peak_kb"]))
            return run

        interleaved(measure("generation"), measure("single"), sizes.reps)
    (grow_g, peak_g), (grow_s, peak_s) = (tuple(statistics.median(v) for v in zip(*peaks[k]))
                                          for k in ("generation", "single"))
    mb = 1 / 1024
    return {"ratio": grow_g / max(grow_s, 1), "ratio_total_peak": peak_g / peak_s,
            "generation_growth_mb": grow_g * mb, "single_growth_mb": grow_s * mb,
            "generation_peak_mb": peak_g * mb, "single_peak_mb": peak_s * mb,
            "growth_mb_each": {k: [g * mb for g, _ in v] for k, v in peaks.items()},
            "single_child": gen.children[largest].id,
            "trainable_params": {"generation": sum(c.num_trainable_params() for c in gen.children),
                                 "single": gen.children[largest].num_trainable_params()}}

