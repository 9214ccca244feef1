"""Presets: one module per experiment, each with ``get_config() -> RunConfig`` and a docstring saying what it
reproduces, what to expect and the exact command (big_vision style)."""

from __future__ import annotations

import importlib
from typing import Any

from munet.config import RunConfig
from munet.errors import ConfigError

PRESETS = ("default", "compact", "smoke", "chars", "vdd")

#: The muNet paper's loop, shared by its two benchmarks (spec §2-§5): every key whose offline default deviates is set
#: back to the spec, so the ``chars`` and ``vdd`` presets inherit none of the offline default's deviations.
PAPER_MUNET: dict[str, Any] = {
    "max_image_size": 384,  # ds_image_size evolves over 16·i, i = 1..24 (§3)
    "children_per_task": 64, "generation_size": 8, "rounds": 2,  # §4.1: 2 rounds x 64 children, 8 per generation
    "lr": 0.01, "crop_area_min": 0.05, "flip": True,  # §3 defaults: lr 0.01, crops to >= 5 % of the area, flips
    "standardise_head": False,  # §1.2: a plain zero-initialised head
    "mutation_prob": 0.1, "clone_prob": 0.1, "adapter_prob": 0.1,  # §2: every decision with μ = 0.1
    "mu_policy": "fixed",
    "mutate_adapters": True, "inherit_momentum": False,  # §2 adapters on; muNet's optimiser state starts fresh
    "max_seeds": 0, "separate_probes": False,  # §4.2: every other task's path and the root probed, in child slots
    "probe_validations": 0, "accept_ties": False, "keep_diverged": True, "stop_margin": 0.0,  # §4.3
    "accept_margin": 0.0,  # §4.3: a child is accepted when it scores strictly above its parent
    "schedule_span": "child",  # §3: every child runs its own warmup-cosine
    "parent_decay": 0.5,  # §4.2 PPDecay: the best-first walk takes a path w.p. 0.5^offsprings
    "lineage_lr_decay": 1.0,  # §3: every child trains at its own opt_lr
    "judged_mutations": False,  # §2: every child draws every mutation, whatever its parent
    "mutation_twins": False,  # §4.2: a generation holds the sampled children only
    "start_twins": False,  # (no twins at a lineage's start either)
    "length_ramp": 0.0,  # §4.1: every child trains the same number of steps
    "affordable_clones": False,  # §2: clones are drawn whatever they cost the child's score
    "affordable_gain": 1.0,  # (no effect without affordable_clones)
    "amortise_root": False,  # §5: a root component used only by this task counts fully
    "given_back_adapters": False,  # §2: adapters are inserted w.p. μ only
    "root_clones_only": False,  # §2: a first task's children draw every mutation too
    "first_task_finetune": False,  # §2, §3: ... and start their optimiser state fresh
    "frozen_bottom": 0,  # §2: every frozen component, the embedding and block 0 among them, may be cloned
    "random_streams": "run",  # §4: one random stream for the whole run
    "max_task_population": 0, "scale_factor": 1.0, "compute_scale": 1.0,  # §4.3 no cap; §5 muNet: s = 1
}


def get_preset(name: str) -> RunConfig:
    """The preset's configuration; unknown names raise ConfigError listing the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return importlib.import_module(f"munet.configs.{name}").get_config()


def describe(name: str) -> str:
    """First line of the preset's docstring."""
    doc = importlib.import_module(f"munet.configs.{name}").__doc__ or ""
    return doc.strip().splitlines()[0]
