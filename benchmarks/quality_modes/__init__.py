"""Quality-benchmark modes: one module per mode, each with ``get_mode() -> Mode`` and a docstring saying what it
reproduces, the expected result and the command (big_vision style). ``load_mode(name)`` imports one."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

from baselines import steps_between_validations

from munet.config import RunConfig

#: Baselines trained at every budget of the curve (the strongest kinds; the full grid runs at budget 1), the most
#: accurate at budget 1 first, so that a curve finished in part already holds the ones the targets compare with.
CURVE_BASELINES = ("freeze:1", "freeze:2", "freeze:0", "lora:16", "adapters:64", "finetune")


@dataclass(frozen=True)
class Mode:
    """One benchmark size.

    Args:
        name: the mode's module name.
        cfg: the muNet configuration (tasks, root, depth, image size, budget) every unit shares, at budget 1.
        scales: muNet scale factors with the pretrained root (budget 1, seed 0).
        adapters: adapter widths of the budget-1 grid.
        lora_ranks: LoRA ranks of the budget-1 grid.
        output: stem of the result files (JSON and PNG), relative to the results directory.
        seeds: seeds of muNet s = 1 and of the ``top_baselines`` best baselines at budget 1 (mean and spread).
        sweep_seeds: seeds of the s < 1 points with the curve (seed 0 alone without it).
        budgets: compute multiples of budget 1 on the curve (muNet s = 1 and ``curve_baselines``, seed 0).
        budget_seeds: seeds of muNet s = 1 and of the ``budget_top_baselines`` best baselines (by their mean over
            the seeds run so far) at each budget above 1, so that a budget's verdict is a mean with a spread, as
            budget 1's is.
        curve_baselines: baselines trained at budgets above 1.
        top_baselines: how many of the best baselines at budget 1 are repeated over ``seeds``.
        budget_top_baselines: how many of the best baselines at each budget above 1 are repeated over
            ``budget_seeds``.
        ablations: ``(label, config overrides)`` muNet runs at budget 1, seed 0, s = 1.
        default_target: average test accuracy muNet s = 1 must reach at budget 1 (checked on the mode's own tasks).
    """

    name: str
    cfg: RunConfig
    scales: tuple[float, ...]
    adapters: tuple[int, ...]
    lora_ranks: tuple[int, ...]
    output: str
    seeds: tuple[int, ...] = (0,)
    sweep_seeds: tuple[int, ...] = (0,)
    budgets: tuple[int, ...] = (1,)
    curve_baselines: tuple[str, ...] = CURVE_BASELINES
    top_baselines: int = 3
    budget_seeds: tuple[int, ...] = (0,)
    budget_top_baselines: int = 1
    ablations: tuple[tuple[str, dict[str, Any]], ...] = field(default=())
    default_target: float | None = None

    def at_budget(self, cfg: RunConfig, factor: int) -> RunConfig:
        """muNet's configuration at ``factor`` times budget 1: the same children per task iteration, each trained
        ``factor`` times the validation periods. Measured to use extra compute better than ``factor`` times the
        children (whose extra images went mostly to rejected children) or more rounds: benchmarks/README.md,
        "Spending a larger budget"."""
        return cfg if factor == 1 else cfg.replace(validations=cfg.validations * factor)


def baseline_validations(cfg: RunConfig, images: int, num_train: int) -> int:
    """Validation periods of a baseline that trains on about ``images`` training images of a task: muNet's
    validation period K of that task, as many periods as the images fill (at least one)."""
    return max(1, round(images / (steps_between_validations(cfg, num_train) * cfg.batch_size)))


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__))


def load_mode(name: str) -> Mode:
    """The mode defined by ``benchmarks/quality_modes/<name>.py``."""
    if name not in names():
        raise SystemExit(f"error: unknown mode {name!r}; known modes: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}").get_mode()
