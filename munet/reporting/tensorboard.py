"""Live metrics of a run as TensorBoard event files (``munet run --log tensorboard``), under ``RUN/tensorboard``.

A hook on the evolution's ``after_generation`` writes, after every generation:

* ``children/<task>/path_<id>``: the child's validation curve (accuracy at each validation, x: its training steps);
* ``accepted/<task>``: 1 for an accepted child, 0 for a rejected one (x: the child's path id), and
  ``acceptance_rate/<task>``: the share of the generation's children accepted (x: the run's generation);
* ``best_val/<task>`` and ``best_test/<task>``: each task's best path so far (x: the run's generation), and
  ``task_iteration``: the task iterations done, so the bands of each iteration can be read off.

``tensorboard --logdir RUN`` shows them while the run trains. Needs the ``tensorboard`` package
(``munet[tensorboard]``).
"""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Any

from munet.errors import ConfigError
from munet.evolution.loop import Evolution
from munet.model.path import TaskPath
from munet.reporting.history import run_generation

LOG_DIR = "tensorboard"


class TensorBoardLog:
    """Writes an evolution's generations to TensorBoard event files; :meth:`attach` it, :meth:`close` it at the end.

    Args:
        run_dir: the run directory; events go to ``run_dir/tensorboard``.
        evolution: the evolution whose system and position the events describe.

    Raises:
        ConfigError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, run_dir: str | FsPath, evolution: Evolution):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError("log = 'tensorboard' needs the tensorboard package: pip install 'munet[tensorboard]' "
                              "(or run without --log)") from err
        self.evolution = evolution
        self.writer: Any = SummaryWriter(str(FsPath(run_dir) / LOG_DIR))

    def attach(self) -> None:
        self.evolution.after_generation.append(self.after_generation)

    def close(self) -> None:
        """Detaches the hook and flushes and closes the event file."""
        if self.after_generation in self.evolution.after_generation:
            self.evolution.after_generation.remove(self.after_generation)
        self.writer.close()

    def after_generation(self, task: str, generation: int, children: list[TaskPath]) -> None:
        evo, w = self.evolution, self.writer
        step = run_generation({"iteration": evo.iteration, "generation": generation}, evo.generations())
        for child in children:
            evals = child.metrics.get("evals") or []
            every = max(child.metrics.get("train_steps", 0) // max(len(evals), 1), 1)  # steps between validations
            for i, accuracy in enumerate(evals):
                w.add_scalar(f"children/{task}/path_{child.id:05d}", accuracy, (i + 1) * every)
            w.add_scalar(f"accepted/{task}", float(bool(child.metrics.get("improved"))), child.id)
        accepted = sum(bool(c.metrics.get("improved")) for c in children)
        w.add_scalar(f"acceptance_rate/{task}", accepted / max(len(children), 1), step)
        for name in evo.system.paths:
            best = evo.system.best_path(name)
            if best is None:
                continue
            w.add_scalar(f"best_val/{name}", best.metrics["quality"], step)
            if best.metrics.get("test_quality") is not None:
                w.add_scalar(f"best_test/{name}", best.metrics["test_quality"], step)
        w.add_scalar("task_iteration", evo.iteration, step)
        w.flush()  # a live view: TensorBoard reads what is on disk
