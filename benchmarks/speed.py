"""Speed benchmark: what munet's shared computation buys, measured side by side in one run.

Every row is a ratio of two timings (or memory peaks) taken in the same process, with the two sides interleaved
(A B B A ...) so that load from other work on the machine hits both alike. Absolute times are recorded in the
JSON for reference only.

Rows (targets from issue 5):
    1. one child's training in munet vs a plain hand-written PyTorch loop training the same model (>= 0.95x);
    2. a real generation of children (sampled by the actual policy in a real run) trained together, sharing frozen
       prefixes, vs each child trained alone with a fresh cache (>= 2x, identical results);
    3. every task answered together on one batch (:func:`munet.training.frozen.shared_forward`) vs the retained
       paths run one after another (>= 3x, identical outputs);
    4. a task iteration with many tasks in the system vs few, seed phase bounded by ``max_seeds`` (<= 1.3x);
    5. peak memory (resident set, measured in fresh subprocesses) of training the generation vs its largest child
       alone (<= 1.5x);
    6. the default ``munet run`` with all sharing off vs on, two processes side by side (faster, same results).

The "ceiling" column is what sharing could give at best for those very paths: the work of running them one by one
over the work with every prefix shared by component ids computed once (forward FLOPs of each op; a training op
on or after a path's first trainable op counts 3x if it trains, 2x if it only passes gradients).

Usage::

    python benchmarks/speed.py            # full, < 15 min on 2 CPU cores
    python benchmarks/speed.py --quick    # small sizes, < 3 min: checks that everything runs
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812  (conventional alias)
from torch import nn

from munet.config import RunConfig
from munet.configs.default import get_config
from munet.data.augment import eval_batch
from munet.data.registry import load_task
from munet.data.task import TaskData
from munet.evolution.hparams import DEFAULTS, MutationPolicy
from munet.evolution.loop import Evolution
from munet.evolution.mutate import make_child
from munet.evolution.system import System
from munet.model.components import NormKind, kind_of
from munet.model.path import TaskPath
from munet.model.root import Root
from munet.model.roots import load_root
from munet.reporting.status import run_status
from munet.training.evaluate import Evaluator
from munet.training.frozen import FeatureCache, shared_forward
from munet.training.schedule import learning_rate
from munet.training.settings import TrainSettings
from munet.training.trainer import is_identity_augmentation, train_generation
from munet.wiring import Wiring

RESULTS = FsPath(__file__).resolve().parent / "results" / "speed.json"
CACHE_BYTES = 2048 << 20
# Extra tasks for the scaling row: class subsets of the offline tasks (split:TASK:a-b).
EXTRA_TASKS = [f"split:{base}:{r}" for base in ("fashion_mnist", "animal_silhouettes", "uci_digits")
               for r in ("0-4", "5-9", "0-2", "3-5", "6-9", "0-1", "2-3", "4-5")]
SCALING_TASK = "split:mnist_5k:0-4"  # the task whose iteration is timed; in neither system
CAPTURE_TASKS = ("uci_digits", "fashion_mnist")  # generations are captured in the second task's iteration


@dataclass
class Budget:
    """Training budget of one child: steps between validations, validations, validation examples."""

    steps: int
    validations: int
    val: int
    calibration: int = 256

    def settings(self, batch_size: int) -> TrainSettings:
        return TrainSettings(batch_size=batch_size, max_steps_between_validations=self.steps,
                             validations=self.validations, max_val_examples=self.val,
                             calibration_examples=self.calibration)


@dataclass
class Sizes:
    """Everything the --quick flag shrinks."""

    reps: int  # A/B pairs per timed row (ordered A B B A ...)
    gen_reps: int  # A/B pairs of the (slow) generation rows
    single_steps: int  # training steps of the single-child row
    capture: Budget  # budget of the run whose generation is captured
    generation: Budget  # budget the captured generation is trained with
    memory: Budget  # budget of the memory subprocesses
    populate: Budget  # budget of the task iterations that fill the scaling systems
    iteration: Budget  # budget of the timed task iteration
    few_tasks: int
    many_tasks: int
    infer_batch: int


def full_sizes(cfg: RunConfig) -> Sizes:
    """Sizes of the full run, from the default configuration's budget."""
    # a sixth of a default child's steps (two validations): the ratios barely depend on the step count, and the
    # full run must stay under 15 minutes on 2 cores
    generation = Budget(max(cfg.steps_between_validations // 4, 1), 2, cfg.max_val_examples // 2)
    return Sizes(reps=3, gen_reps=1, single_steps=30, capture=Budget(2, 1, 128, 64), generation=generation,
                 memory=Budget(5, 2, 500), populate=Budget(1, 1, 64, 64), iteration=Budget(5, 2, 250),
                 few_tasks=8, many_tasks=32, infer_batch=256)


def quick_sizes() -> Sizes:
    """Small sizes: every row runs, in about 2 minutes; the ratios are only indicative."""
    return Sizes(reps=1, gen_reps=1, single_steps=6, capture=Budget(1, 1, 64, 32), generation=Budget(2, 1, 64),
                 memory=Budget(3, 1, 128), populate=Budget(1, 1, 32, 32), iteration=Budget(2, 1, 64),
                 few_tasks=4, many_tasks=12, infer_batch=64)


# --- helpers ------------------------------------------------------------------------------------------------------
def interleaved(a: Callable[[], Any], b: Callable[[], Any], reps: int) -> tuple[list[float], list[float]]:
    """Wall times of ``a`` and ``b``, run A B B A A B ... so that drifting load hits both sides alike."""
    times: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(reps):
        for side in ("ab" if r % 2 == 0 else "ba"):
            fn = a if side == "a" else b
            t0 = time.perf_counter()
            fn()
            times[side].append(time.perf_counter() - t0)
    return times["a"], times["b"]


def ratio(slow: list[float], fast: list[float]) -> float:
    """Speed-up of ``fast`` over ``slow``: ratio of the summed times of all repetitions."""
    return sum(slow) / sum(fast)


def shrink(task: TaskData, n: int) -> TaskData:
    """The task with only the first ``n`` validation and test examples (cheap evaluation while filling a system)."""
    return dataclasses.replace(task, val_x=task.val_x[:n], val_y=task.val_y[:n], test_x=task.test_x[:n],
                               test_y=task.test_y[:n])


def detached_copy(paths: list[TaskPath]) -> list[TaskPath]:
    """Deep copies of ``paths`` (shared components stay shared between the copies) without their ancestry."""
    parents = [p.parent for p in paths]
    for p in paths:
        p.parent = None
    try:
        return copy.deepcopy(paths)
    finally:
        for p, parent in zip(paths, parents):
            p.parent = parent


def new_evolution(root: Root, cfg: RunConfig, tasks: dict[str, TaskData], budget: Budget, children: int,
                  generation_size: int, max_seeds: int, seed: int = 0, system: System | None = None) -> Evolution:
    """An evolution wired as ``munet run`` wires one (``wiring.Wiring``), on an already loaded root, with this
    benchmark's budget; it keeps the spec's seed phase (the probes take the first children's slots) and clones
    blocks with μ, as the measured figures did."""
    wiring = Wiring.of(cfg.replace(children_per_task=children, generation_size=generation_size, max_seeds=max_seeds,
                                   seed=seed, separate_probes=False, clone_prob=cfg.mutation_prob,
                                   feature_cache_mb=CACHE_BYTES >> 20))
    return wiring.evolution(system or wiring.system(root), tasks, budget.settings(cfg.batch_size))


def max_abs_diff(a: list[TaskPath], b: list[TaskPath]) -> float:
    """Largest difference between the weights of corresponding paths."""
    worst = 0.0
    for pa, pb in zip(a, b):
        for name, comp in pa.components.items():
            other = pb.components[name].module.state_dict()
            for key, value in comp.module.state_dict().items():
                worst = max(worst, (value.float() - other[key].float()).abs().max().item())
    return worst


def op_flops(path: TaskPath, op: tuple[str, ...]) -> float:
    """Forward multiply-adds of one op for one image (the component kinds' counts of ``TaskPath.flops``)."""
    c = path.components
    dim = c["cls"].module.value.shape[-1]
    tokens = c["posembed"].module.value.shape[1]
    if isinstance(kind_of(op[0]), NormKind):
        return float(dim)  # the LayerNorm of the class token, which path FLOPs leave out
    return float(sum(kind_of(name).macs(c[name].module, tokens, dim) for name in op))


def sharing_ceiling(paths: list[TaskPath], training: bool) -> float:
    """Work of running ``paths`` one by one over the work when every prefix shared by component ids is computed
    once: the most any sharing can save. For training, an op on or after the first trainable one costs 3x its
    forward if it trains (forward, input and weight gradients), else 2x; only frozen prefixes can be shared."""
    alone = distinct = 0.0
    seen: set[tuple[int, ...]] = set()
    for path in paths:
        ops = path.ops()
        shareable = path.first_trainable_op(ops) if training else len(ops)
        for i, op in enumerate(ops):
            work = op_flops(path, op)
            if i < shareable:
                alone += work
                key = path.prefix_key(i + 1, ops)
                if key not in seen:
                    seen.add(key)
                    distinct += work
            else:
                trains = any(path.components[n].is_trainable() for n in op)
                alone += (3 if trains else 2) * work
                distinct += (3 if trains else 2) * work
    return alone / distinct


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


# --- 3. multi-task inference ----------------------------------------------------------------------------------------
def bench_inference(paths: list[TaskPath], images_u8: torch.Tensor, root: Root, sizes: Sizes) -> dict[str, Any]:
    """All retained paths answer one batch: shared prefixes once vs each path on its own."""
    outcome: dict[str, list[torch.Tensor]] = {}

    def images(size: int) -> torch.Tensor:
        return eval_batch(images_u8, size, root.mean, root.std)

    def standalone() -> None:
        with torch.no_grad():
            outcome["standalone"] = [p.forward(images(p.hparams["ds_image_size"])) for p in paths]

    def together() -> None:
        outcome["together"] = shared_forward(paths, images, FeatureCache(CACHE_BYTES), "batch")

    t_alone, t_together = interleaved(standalone, together, 2 * sizes.reps)  # cheap: more repetitions
    diff = max((x - y).abs().max().item() for x, y in zip(outcome["standalone"], outcome["together"]))
    return {"ratio": ratio(t_alone, t_together), "standalone_s": t_alone, "together_s": t_together,
            "paths": len(paths), "batch": len(images_u8), "max_output_diff": diff,
            "ceiling": sharing_ceiling(paths, training=False),
            "composition": describe_retained(paths)}


def bench_saved_run(run_dir: FsPath, sizes: Sizes) -> dict[str, Any]:
    """The multi-task inference row on the retained paths of a saved run, on test images of its first task."""
    from munet.api import load  # the store is only needed for this option

    run = load(run_dir)
    cfg = run.meta["config"]
    x = load_task(cfg["tasks"][0], cfg["seed"], cfg.get("data_dir")).test_x[: sizes.infer_batch]
    result = bench_inference([run.path(t) for t in run.tasks], x, run.system.root, sizes)
    return dict(result, source=str(run_dir))


def describe_retained(paths: list[TaskPath]) -> list[dict[str, Any]]:
    """Task, image size and component ids of each path: which prefixes they can share."""
    return [{"task": p.task, "image_size": p.hparams["ds_image_size"],
             "components": [c.id for c in p.components.values()]} for p in paths]


# --- 4. a task iteration with few vs many tasks ---------------------------------------------------------------------
def populate(root: Root, cfg: RunConfig, names: list[str], sizes: Sizes, evo: Evolution | None = None) -> Evolution:
    """Fills a system with one retained path per task by real task iterations at a tiny budget (cheap
    evaluation), each probing the most recent other task and the root, then mutating."""
    tasks = {n: shrink(load_task(n, cfg.seed), sizes.populate.val) for n in names}
    if evo is None:
        evo = new_evolution(root, cfg, tasks, sizes.populate, children=4, generation_size=4, max_seeds=1)
    else:
        for name, data in tasks.items():
            evo.system.add_task(name, data.num_classes)
        evo.tasks.update(tasks)
    for name in names:
        evo.task_iteration(name)
    return evo


def bench_scaling(root: Root, cfg: RunConfig, few: System, many: System, sizes: Sizes) -> dict[str, Any]:
    """Times one task iteration of a new task on copies of a system with few and with many tasks; repetition
    ``r`` uses policy seed ``r`` on both sides, so both sample children with the same random stream."""
    task = load_task(SCALING_TASK, cfg.seed)
    max_seeds = cfg.max_seeds or 3  # the bound must be active
    totals: dict[str, float] = {}
    runs: dict[str, int] = {}

    def iteration(system: System, label: str) -> Callable[[], None]:
        def run() -> None:
            seed = runs.get(label, 0)
            runs[label] = seed + 1
            evo = new_evolution(root, cfg, {task.name: task}, sizes.iteration, cfg.children_per_task,
                                cfg.generation_size, max_seeds, seed=seed, system=copy.deepcopy(system))
            trained = [0.0]
            evo.after_generation.append(lambda _task, _gen, children: trained.__setitem__(
                0, trained[0] + children[0].metrics["train_time"]))
            macs = [0]

            def count(module: nn.Module, _args: Any, output: Any) -> None:
                if isinstance(module, nn.Linear):
                    macs[0] += output.numel() * module.in_features
                elif isinstance(module, nn.Conv2d):
                    macs[0] += output.numel() * module.weight[0].numel()

            hook = nn.modules.module.register_module_forward_hook(count)
            t0 = time.perf_counter()
            try:
                evo.task_iteration(task.name)
            finally:
                hook.remove()
            elapsed = time.perf_counter() - t0
            totals[f"{label}_s"] = totals.get(f"{label}_s", 0.0) + elapsed
            totals[f"{label}_forward_gmacs"] = totals.get(f"{label}_forward_gmacs", 0.0) + macs[0] / 1e9
            totals[f"{label}_overhead_s"] = totals.get(f"{label}_overhead_s", 0.0) + elapsed - trained[0]
        return run

    # the deep copy of the system is outside the timed iteration; the children differ between the two sides
    # (their seeds are other tasks' paths), so the forward work each side did is counted too
    interleaved(iteration(few, "few"), iteration(many, "many"), sizes.reps)
    ratio_ = totals["many_s"] / totals["few_s"]
    work = totals["many_forward_gmacs"] / totals["few_forward_gmacs"]
    return {"ratio": ratio_, "overhead_ratio": totals["many_overhead_s"] / totals["few_overhead_s"],
            "work_ratio": work, "ratio_per_work": ratio_ / work,
            "few_tasks": len(few.paths), "many_tasks": len(many.paths),
            "max_seeds": max_seeds, "task": SCALING_TASK, **{k: v / sizes.reps for k, v in totals.items()}}


# --- 6. the default run, before and after ---------------------------------------------------------------------------
def bench_default_run(quick: bool, threads: int) -> dict[str, Any]:
    """``munet run`` (the default configuration; the smoke preset with ``quick``) with sharing against the same run
    with all of it off (``shared_training=false``, ``feature_cache_mb=0``: each child trained alone and every frozen
    prefix recomputed, as in the official code): two processes side by side with ``threads`` threads each."""
    with tempfile.TemporaryDirectory() as tmp:
        base = [sys.executable, "-m", "munet", "run"] + (["--preset", "smoke"] if quick else [])
        commands = {"shared": base + ["--out", f"{tmp}/shared"],
                    "unshared": base + ["--out", f"{tmp}/unshared", "--shared-training", "false",
                                        "--feature-cache-mb", "0"]}
        env = dict(os.environ, OMP_NUM_THREADS=str(threads or 1), PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        procs = {k: subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for k, c in commands.items()}
        wall: dict[str, float] = {}
        while len(wall) < len(procs):
            for k, proc in procs.items():
                if k not in wall and proc.poll() is not None:
                    wall[k] = time.perf_counter() - t0
            time.sleep(0.2)
        for k, proc in procs.items():
            if proc.returncode:
                raise RuntimeError(f"{' '.join(commands[k])} failed: {proc.stderr.read()[-2000:]}")
        tables = {k: [(t["task"], t["path"], t["test_acc"]) for t in run_status(f"{tmp}/{k}")["tasks"]]
                  for k in commands}
    accs = [acc for _, _, acc in tables["shared"]]
    return {"ratio": wall["unshared"] / wall["shared"], "shared_s": wall["shared"], "unshared_s": wall["unshared"],
            "identical_results": tables["shared"] == tables["unshared"], "average_test": sum(accs) / len(accs),
            "threads": threads or 1, "preset": "smoke" if quick else "default"}


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
                done = subprocess.run([sys.executable, __file__, "--memory-worker", specs[label]],
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


# --- driver ---------------------------------------------------------------------------------------------------------
TARGETS = {
    "single_child": (">=", 0.95), "generation_sharing": (">=", 2.0), "seed_phase_sharing": (">=", 2.0),
    "multitask_inference": (">=", 3.0), "task_scaling": ("<=", 1.3), "task_scaling_overhead": ("<=", 1.3),
    "task_scaling_per_work": ("<=", 1.3),
    "generation_memory": ("<=", 1.5), "generation_memory_total": ("<=", 1.5), "default_run": (">", 1.0),
}


def table(results: dict[str, Any]) -> str:
    labels = {
        "single_child": "one child: munet vs plain PyTorch loop (speed-up)",
        "generation_sharing": "generation of {children} after the seed phase: together vs each child alone (speed-up)",
        "seed_phase_sharing": "seed-phase generation of {children}: together vs each child alone (speed-up)",
        "multitask_inference": "{paths} tasks answered together vs paths one by one (speed-up)",
        "task_scaling": "task iteration: {many_tasks} vs {few_tasks} tasks in the system (time ratio)",
        "task_scaling_overhead": "task iteration outside training: {many_tasks} vs {few_tasks} tasks (time ratio)",
        "task_scaling_per_work": "task iteration per unit of model work: {many_tasks} vs {few_tasks} tasks "
                                 "(time ratio / forward-MAC ratio {work_ratio:.2f})",
        "generation_memory": "peak memory growth while training: generation vs its largest child alone",
        "generation_memory_total": "peak resident memory of the process: generation vs its largest child alone",
        "default_run": "`munet run` ({preset}): sharing off vs on, side by side (speed-up; same results: "
                       "{identical_results})",
    }
    lines = ["| measurement | measured | target | met | ceiling |", "|---|---|---|---|---|"]
    for key, (op, target) in TARGETS.items():
        if key not in results:
            continue
        r = results[key]
        met = r["ratio"] >= target if op == ">=" else r["ratio"] > target if op == ">" else r["ratio"] <= target
        ceiling = f"{r['ceiling']:.2f}x" if "ceiling" in r else ""
        lines.append(f"| {labels[key].format(**r)} | {r['ratio']:.2f}x | {op} {target}x | {'yes' if met else 'NO'} "
                     f"| {ceiling} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast check (< 3 min)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=str(RESULTS), help="where to write the JSON results")
    parser.add_argument("--only", default="", help="comma-separated subset of " + ",".join(TARGETS))
    parser.add_argument("--run-dir", help="answer the tasks of this saved run (its retained paths) in the multi-task "
                        "inference row, instead of the paths of the system the benchmark fills itself")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(filter(None, args.only.split(","))) or set(TARGETS)
    t_start = time.perf_counter()
    cfg = get_config()
    sizes = quick_sizes() if args.quick else full_sizes(cfg)
    torch.manual_seed(cfg.seed)
    root = load_root(cfg.root, cfg.depth)
    tasks = {n: load_task(n, cfg.seed) for n in CAPTURE_TASKS}
    results: dict[str, Any] = {}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    if "single_child" in only:
        results["single_child"] = bench_single_child(root, cfg, tasks[CAPTURE_TASKS[-1]], sizes)
        log(f"single child: {results['single_child']['ratio']:.2f}x")
    if only & {"generation_sharing", "seed_phase_sharing", "generation_memory"}:
        gens = capture_generations(root, cfg, tasks, sizes)
        gen = gens["after_seed_phase"]
        log(f"captured two generations of {len(gen.children)} children for {gen.task}")
        for key, phase in (("generation_sharing", "after_seed_phase"), ("seed_phase_sharing", "seed_phase")):
            if key in only:
                results[key] = bench_generation(gens[phase], tasks[gen.task], root, cfg, sizes)
                log(f"{key}: {results[key]['ratio']:.2f}x")
        if "generation_memory" in only:
            results["generation_memory"] = bench_memory(gen, root, cfg, sizes, torch.get_num_threads())
            results["generation_memory_total"] = dict(results["generation_memory"],
                                                      ratio=results["generation_memory"]["ratio_total_peak"])
            log(f"generation memory: {results['generation_memory']['ratio']:.2f}x")
    if args.run_dir and "multitask_inference" in only:
        only.discard("multitask_inference")
        results["multitask_inference"] = bench_saved_run(FsPath(args.run_dir), sizes)
        log(f"multi-task inference ({args.run_dir}): {results['multitask_inference']['ratio']:.2f}x")
    if only & {"multitask_inference", "task_scaling"}:
        names = (list(cfg.tasks) + EXTRA_TASKS)[: sizes.many_tasks]
        evo = populate(root, cfg, names[: sizes.few_tasks], sizes)
        few = copy.deepcopy(evo.system)
        log(f"filled a system with {sizes.few_tasks} tasks")
        if "multitask_inference" in only:
            paths = [p for p in few.retained_paths()]
            x = load_task(names[0], cfg.seed).test_x[: sizes.infer_batch]
            results["multitask_inference"] = bench_inference(paths, x, root, sizes)
            log(f"multi-task inference: {results['multitask_inference']['ratio']:.2f}x")
        if "task_scaling" in only:
            populate(root, cfg, names[sizes.few_tasks:], sizes, evo)
            log(f"filled a system with {sizes.many_tasks} tasks")
            results["task_scaling"] = bench_scaling(root, cfg, few, evo.system, sizes)
            scaling = results["task_scaling"]
            for key, value in (("task_scaling_overhead", "overhead_ratio"),
                               ("task_scaling_per_work", "ratio_per_work")):
                results[key] = dict(scaling, ratio=scaling[value])
            log(f"task scaling: {results['task_scaling']['ratio']:.2f}x")
    if "default_run" in only:
        results["default_run"] = bench_default_run(args.quick, args.threads)
        log(f"default run: {results['default_run']['ratio']:.2f}x")
    out = FsPath(args.out)
    if args.only and out.exists():  # a subset of rows updates the earlier results
        results = {**json.loads(out.read_text()), **results}
    meta_key = f"meta:{args.only}" if args.only else "meta"  # a subset's run is described beside the full one's
    results[meta_key] = {
        "mode": "quick" if args.quick else "full", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "root": root.description, "image_size": cfg.image_size, "batch_size": cfg.batch_size,
        "sizes": dataclasses.asdict(sizes), "wall_s": time.perf_counter() - t_start,
        "command": "python benchmarks/speed.py" + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else "") + (f" --only {args.only}" if args.only else "")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    print(f"results in {out}; wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
