"""The knobs of the evolutionary search, apart from the system it evolves (EvoTorch's search apart from the problem)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from munet.config import generations_per_iteration

if TYPE_CHECKING:
    from munet.config import RunConfig


@dataclass(frozen=True)
class SearchConfig:
    """How :class:`munet.evolution.loop.Evolution` spends a task iteration. Each field is the :class:`RunConfig` key
    of the same name (documented there and in ``munet run --help``); the defaults are the spec's behaviour, so a
    lever is off unless a configuration sets it.

    Args:
        children_per_task: children per task iteration.
        generation_size: children per generation.
        max_image_size: upper end of the evolvable image sizes (a multiple of the root's patch size).
        seed: seed of the training-batch stream.
    """

    children_per_task: int
    generation_size: int
    max_image_size: int
    seed: int = 0
    mutate_adapters: bool = True
    max_task_population: int = 0
    max_seeds: int = 0
    separate_probes: bool = False
    probe_validations: int = 0
    schedule_span: str = "child"
    parent_decay: float = 0.5
    lineage_lr_decay: float = 1.0
    judged_mutations: bool = False
    mutation_twins: bool = False
    start_twins: bool = False
    root_clones_only: bool = False
    first_task_finetune: bool = False
    length_ramp: float = 0.0
    affordable_clones: bool = False
    affordable_gain: float = 1.0
    given_back_adapters: bool = False
    frozen_bottom: int = 0
    remove_layers: bool = True
    random_streams: str = "run"

    @classmethod
    def from_config(cls, cfg: RunConfig) -> SearchConfig:
        """The search a run's configuration sets: every field read from the key of the same name."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    def replace(self, **changes) -> SearchConfig:
        return dataclasses.replace(self, **changes)

    def generations(self) -> int:
        """Generations per task iteration: the children's, plus the probe generation when probes are separate."""
        return generations_per_iteration(self.children_per_task, self.generation_size, self.separate_probes)

    def children_in(self, generation: int) -> int:
        """Children of the ``generation``-th children's generation (counted after a separate probe generation)."""
        return min(self.generation_size, self.children_per_task - generation * self.generation_size)
