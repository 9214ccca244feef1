"""The multitask system: the root path, every task's retained paths, locks, scores (spec §1.3, §4.2, §5)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from munet.evolution.hparams import DEFAULTS
from munet.model.components import NOT_TRAINABLE, Component, TokenParam, patch_embedding
from munet.model.path import TaskPath
from munet.model.root import Root


@dataclass
class ScoreConfig:
    """``score = quality · s^(accounted/P) · s_c^(flops/F)``.

    Args:
        scale_factor: s in (0, 1]; 1 scores pure quality (muNet), smaller values favour fewer parameters.
        compute_scale: s_c in (0, 1] of µ2Net+'s compute term; 1 disables it.
        reference_params: P; ``None`` means the root at its default image size plus a 2-class head (spec §1.1).
        reference_flops: F; ``None`` means the root path's FLOPs at its default image size.
        amortise_root: a root component counts as split between all the system's tasks (as the benchmark counts a
            baseline's frozen root), not only those whose retained paths lock it (the spec).
        amortise_over: with ``amortise_root``, ``all`` the system's tasks or those ``started`` (with a retained
            path, and the scored path's own task).
    """

    scale_factor: float = 1.0
    compute_scale: float = 1.0
    reference_params: float | None = None
    reference_flops: float | None = None
    amortise_root: bool = False
    amortise_over: str = "all"


@dataclass(frozen=True)
class Scorer:
    """Scores paths as their :class:`System` does (see :class:`ScoreConfig`), with its resolved references."""

    cfg: ScoreConfig
    reference_params: float
    reference_flops: float
    root_tasks: frozenset[str] = frozenset()  # with the scored path's task, those a root component is split between

    def __call__(self, path: TaskPath, quality: float | None = None) -> float:
        """``path``'s score with its recorded validation quality, or with ``quality`` when given."""
        quality = path.metrics.get("quality") if quality is None else quality
        if quality is None:
            return float("-inf")
        share = len(self.root_tasks | {path.task})
        score = quality * self.cfg.scale_factor ** (path.accounted_params(share) / self.reference_params)
        if self.cfg.compute_scale != 1.0:
            score *= self.cfg.compute_scale ** (path.flops() / self.reference_flops)
        return score


class System:
    """Population of paths over one root; owns the id counters so the same seed gives the same ids.

    Args:
        root: the root model whose parts seed every path.
        image_size: default ``ds_image_size`` of the root path.
        score: score settings.
        extra_hparams: hparams of the root path that override the defaults (e.g. ``opt_lr``, ``_mu_``).
    """

    def __init__(self, root: Root, image_size: int, score: ScoreConfig | None = None,
                 extra_hparams: dict[str, Any] | None = None):
        self.root = root
        self.score_cfg = score or ScoreConfig()
        self.next_path_id = 0
        self.next_component_id = 0
        self.posembed_cache: dict[int, Component] = {}
        self.paths: dict[str, list[TaskPath]] = {}
        self.num_classes: dict[str, int] = {}
        m = root.model
        comps = {
            "embedding": self._root_component("embedding", patch_embedding(m.patch_embed)),
            "cls": self._root_component("cls", TokenParam(m.cls_token)),
            "posembed": self._root_component("posembed", TokenParam(m.pos_embed)),
        }
        hparams = {**DEFAULTS, "num_layers": root.depth, "ds_image_size": image_size, **(extra_hparams or {})}
        # the root path reads its num_layers blocks; the deeper ones (max_depth) wait for a child that grows into them
        self.root_blocks = {f"block_{i}": self._root_component(f"block_{i}", copy.deepcopy(block))
                            for i, block in enumerate(m.blocks)}
        comps.update(list(self.root_blocks.items())[: hparams["num_layers"]])
        comps["norm"] = self._root_component("norm", copy.deepcopy(m.norm))
        self.root_path = TaskPath(self.take_path_id(), NOT_TRAINABLE, comps, hparams)
        self.root_path.metrics.update(score=float("-inf"))
        self.reference_params = self.score_cfg.reference_params or self._default_reference_params(image_size)
        self.reference_flops = self.score_cfg.reference_flops or self._reference_path(image_size).flops()

    # --- ids and components -------------------------------------------------------------------------------------
    def take_path_id(self) -> int:
        self.next_path_id += 1
        return self.next_path_id - 1

    def new_component(self, name: str, module: Any, locks: set[str] | None = None, origin: str = "root") -> Component:
        self.next_component_id += 1
        return Component(self.next_component_id - 1, name, module, locks, origin)

    def _root_component(self, name: str, module: Any) -> Component:
        module.requires_grad_(False)
        return self.new_component(name, module, {NOT_TRAINABLE})

    def clone_component(self, comp: Component, origin: str) -> Component:
        self.next_component_id += 1
        return comp.clone(self.next_component_id - 1, origin)

    def root_posembed(self, image_size: int) -> Component:
        """The root's position embedding resized to ``image_size`` (:meth:`Root.resized_pos_embed`), cached per
        size and locked (spec §2 step 5)."""
        grid = image_size // self.root.patch_size
        if grid not in self.posembed_cache:
            resized = self.root.resized_pos_embed(grid)
            self.posembed_cache[grid] = self._root_component("posembed", TokenParam(resized))
        return self.posembed_cache[grid]

    def _reference_path(self, image_size: int) -> TaskPath:
        comps = dict(self.root_path.components, posembed=self.root_posembed(image_size))
        return TaskPath(-1, NOT_TRAINABLE, comps, self.root_path.hparams)

    def _default_reference_params(self, image_size: int) -> int:
        dim = self.root.embed_dim
        return self._reference_path(image_size).num_params() + 2 * dim + 2

    # --- population ---------------------------------------------------------------------------------------------
    def add_task(self, task: str, num_classes: int) -> None:
        if task == NOT_TRAINABLE or task.startswith("_"):
            raise ValueError(f"reserved task name {task!r}")
        self.paths.setdefault(task, [])
        self.num_classes[task] = num_classes

    def best_path(self, task: str) -> TaskPath | None:
        """Highest score; ties go to the most recent path (µ2Net)."""
        paths = self.paths.get(task) or []
        return max(paths, key=lambda p: (self.score(p), p.id)) if paths else None

    def retained_paths(self) -> list[TaskPath]:
        return [p for task in self.paths for p in self.paths[task]]

    def score(self, path: TaskPath, quality: float | None = None) -> float:
        """The path's score with its recorded validation quality, or with ``quality`` when given (a child being
        trained: its parameters and FLOPs are known before its quality is)."""
        return self.scorer()(path, quality)

    def scorer(self) -> Scorer:
        """This system's scoring without the system (small and picklable: what a remote worker needs)."""
        if not self.score_cfg.amortise_root:
            root_tasks: frozenset[str] = frozenset()  # the spec: only the locks split a root component
        elif self.score_cfg.amortise_over == "started":
            root_tasks = frozenset(task for task, paths in self.paths.items() if paths)
        else:
            root_tasks = frozenset(self.num_classes)
        return Scorer(self.score_cfg, self.reference_params, self.reference_flops, root_tasks)

    def start_task(self, task: str) -> list[TaskPath]:
        """Unlocks ``task``'s components and returns the seed paths: other tasks' retained paths, newest first,
        then the root."""
        for path in self.paths[task]:
            for comp in path.components.values():
                comp.locks.discard(task)
        seeds = [p for t, ps in self.paths.items() if t != task for p in ps]
        return sorted(seeds, key=lambda p: p.id, reverse=True) + [self.root_path]

    def end_task(self, task: str) -> TaskPath | None:
        """Keeps only the best path, locks its components with ``task`` and drops links to discarded paths."""
        best = self.best_path(task)
        if best is None:
            return None
        self.paths[task] = [best]
        for comp in best.components.values():
            comp.locks.add(task)
        live = {id(p) for p in self.retained_paths()} | {id(self.root_path)}
        for path in self.retained_paths():
            parent = path.parent
            while parent is not None and id(parent) not in live:
                parent = parent.parent
            path.parent = parent
        return best

    def root_components(self) -> dict[str, Component]:
        """Every component of the root by name: the root path's, then the deeper blocks a path may grow into
        (``max_depth``; none by default)."""
        return {**self.root_path.components, **self.root_blocks}

    def components(self) -> dict[int, Component]:
        """Every component of the root or referenced by a retained path, by id."""
        found = {comp.id: comp for comp in self.root_components().values()}
        for path in self.retained_paths():
            for comp in path.components.values():
                found[comp.id] = comp
        return found
