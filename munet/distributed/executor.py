"""The executor seam: :class:`Evolution` hands each generation's children to an executor, which trains them and
returns their outcomes. :class:`LocalExecutor` trains them in this process (the default); ``RayExecutor``
(:mod:`munet.distributed.ray_executor`, imported only when asked for) trains one child per Ray task.

Whatever the executor, a child ends as :func:`~munet.training.trainer.train_generation` leaves it: its trainable
components trained (an accepted child's best snapshot loaded), its outcome returned, the generation's random stream
advanced to the same state. Everything else (sampling, selection, the store) stays on the driver.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any, Protocol

import torch

from munet.config import EXECUTORS
from munet.data.task import TaskData
from munet.errors import ConfigError
from munet.evolution.system import Scorer
from munet.model.path import TaskPath
from munet.training.evaluate import Evaluator
from munet.training.settings import TrainSettings
from munet.training.trainer import ChildOutcome, train_generation


class Executor(Protocol):
    """Trains a generation's children; the arguments are :func:`~munet.training.trainer.train_generation`'s."""

    def train(self, children: list[TaskPath], parent_scores: list[float], task: TaskData, ds_hparams: dict[str, Any],
              settings: TrainSettings, evaluator: Evaluator, scorer: Scorer, generator: torch.Generator,
              on_step: Callable[[int], None] | None = None) -> list[ChildOutcome]:
        """Trains ``children`` in place; returns their outcomes in order and advances ``generator``."""
        ...


class LocalExecutor:
    """Trains the children in this process, in lock-step on shared batches (or one by one, as the settings say)."""

    def train(self, children: list[TaskPath], parent_scores: list[float], task: TaskData, ds_hparams: dict[str, Any],
              settings: TrainSettings, evaluator: Evaluator, scorer: Scorer, generator: torch.Generator,
              on_step: Callable[[int], None] | None = None) -> list[ChildOutcome]:
        return train_generation(children, parent_scores, task, ds_hparams, settings, evaluator, scorer, generator,
                                on_step)


def make_executor(name: str, ray_address: str | None = None, threads: int = 1) -> Executor:
    """The executor a configuration names (``local`` or ``ray``); ``threads``: torch threads per remote child (the
    driver's, for results equal to a local run's).

    Raises:
        ConfigError: an unknown executor, or ``ray`` without Ray installed.
    """
    if name == "local":
        return LocalExecutor()
    if name != "ray":
        raise ConfigError(f"executor must be one of {list(EXECUTORS)}, got {name!r}")
    if importlib.util.find_spec("ray") is None:
        raise ConfigError("executor ray needs Ray, which is not installed: pip install 'munet[ray]'")
    from munet.distributed.ray_executor import RayExecutor

    return RayExecutor(ray_address, threads=threads)
