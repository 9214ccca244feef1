"""Evolvable hyperparameters: value lists, defaults and neighbour-step mutation (spec §3, §7).

Also the three mutation-probability policies, selected by ``mu_policy``:

* ``fixed`` (muNet): every elementary decision is Bernoulli(mutation_prob).
* ``evolved`` (µ2Net): ``_mu_`` is itself an hparam, mutated first, and the child's value drives its draws.
* ``per_action`` (µ2Net+): every action (``hp:<key>``, ``clone:<name>``, ``add:<adapter>``) has its own
  probability ``_mu_|<action>``, initialised to ``_mu_`` and moved a neighbour step w.p. ``_mu_`` when queried.
"""

from __future__ import annotations

import random
from typing import Any

from munet.errors import ConfigError

MOMENTUM_NONE = 0.0  # the spec's "None" entry: plain SGD (the original crashes on float(None))

MU_POLICIES = ("fixed", "evolved", "per_action")
BLOCK_CLONE = "clone:block_"  # the action prefix that clone_prob governs
ADAPTER_ACTIONS = ("add:adapter_", "clone:adapter_")  # the action prefixes that adapter_prob governs
MU_VALUES = [round(0.10 + 0.02 * i, 2) for i in range(11)]  # µ2Net auto-tune range 0.10 ... 0.30
LR_SCALE = "opt_lr_scale"  # not evolved: set by the loop's lineage_lr_decay; multiplies opt_lr when present
MU_ACTION_VALUES = [round(0.02 * i, 2) for i in range(1, 16)]  # µ2Net+ per-action range 0.02 ... 0.30

# Per-child hparams; insertion order is the order mutations are drawn in (spec §2 step 2).
MODEL_RANGES: dict[str, list[Any]] = {
    "adapter_dim": [8, 16, 32, 64, 128],
    "opt_lr": [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1],
    "opt_lr_schedule": ["constant", "cosine", "restarts"],
    "opt_lr_warmup_ratio": [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4],
    "opt_momentum": [MOMENTUM_NONE, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
    "opt_nesterov": [True, False],
}

# Per-generation data hparams, shared by all children of a generation; ds_image_size is added per root.
DATA_RANGES: dict[str, list[Any]] = {
    "ds_area_range_min": [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
    "ds_aspect_ratio_range_min": [0.25, 0.5, 0.75, 1.0],
    "ds_flip_left_right": [True, False],
    "ds_brightness_delta": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
    "ds_contrast_delta": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
    "ds_saturation_delta": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
    "ds_hue_delta": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
}

DEFAULTS: dict[str, Any] = {
    "adapter_dim": 32,
    "opt_lr": 0.01,
    "opt_lr_schedule": "cosine",
    "opt_lr_warmup_ratio": 0.1,
    "opt_momentum": 0.9,
    "opt_nesterov": False,
    # µ2Net+ defaults (spec §7.2 item 7): no crop, no flip. muNet's crop-to-5%-area and flip destroy small glyph
    # and silhouette images (uci_digits probe: 0.39 with them, 0.89 without, same budget); evolution may turn
    # them back on.
    "ds_area_range_min": 1.0,
    "ds_aspect_ratio_range_min": 0.75,
    "ds_flip_left_right": False,
    "ds_brightness_delta": 0.0,
    "ds_contrast_delta": 0.0,
    "ds_saturation_delta": 0.0,
    "ds_hue_delta": 0.0,
}


def image_sizes(patch_size: int, max_image_size: int) -> list[int]:
    """Evolvable image sizes: every whole multiple of the patch up to ``max_image_size`` (the spec's 16·i,
    i = 1..24, for patch 16 and 384 px)."""
    return [patch_size * i for i in range(1, max_image_size // patch_size + 1)]


def check_image_sizes(image_size: int, max_image_size: int, patch_size: int) -> None:
    """Raises ConfigError unless ``image_size`` is one of :func:`image_sizes` and ``max_image_size`` is its last."""
    for name, size in (("image_size", image_size), ("max_image_size", max_image_size)):
        if size < patch_size or size % patch_size:
            nearest = sorted({max(patch_size, size // patch_size * patch_size), (size // patch_size + 1) * patch_size})
            raise ConfigError(f"{name} {size} is not a whole number of the root's {patch_size} px patches; use "
                              f"{' or '.join(map(str, nearest))}")
    if image_size > max_image_size:
        raise ConfigError(f"image_size {image_size} exceeds max_image_size {max_image_size}")


def incremental_mutation(value: Any, values: list[Any], rng: random.Random) -> Any:
    """A ±1 step in ``values`` (each w.p. 0.5), clipped at the ends, so at an end it can return ``value``."""
    i = values.index(value)
    i += 1 if rng.random() < 0.5 else -1
    return values[min(max(i, 0), len(values) - 1)]


class MutationPolicy:
    """Decides every elementary mutation of a child; see the module docstring for the three policies.

    Args:
        kind: one of ``MU_POLICIES``.
        mutation_prob: μ for ``fixed``; the initial ``_mu_`` otherwise.
        rng: the evolution's random stream.
        clone_prob: probability of cloning a transformer block (``clone:block_<i>``) for ``fixed``, the initial one
            for ``per_action`` (``None``: ``mutation_prob``); ``evolved`` draws it with its ``_mu_`` like every other
            action. The patch embedding, class token and position embedding clone with μ.
        adapter_prob: probability of a trainable adapter of the child's own before a block: inserting one where
            there is none (``add:adapter_<i>``) or cloning the frozen one reused there (``clone:adapter_<i>``), as
            ``clone_prob`` is for block clones (``None``: ``mutation_prob``).
    """

    def __init__(self, kind: str, mutation_prob: float, rng: random.Random, clone_prob: float | None = None,
                 adapter_prob: float | None = None):
        self.kind = kind
        self.mutation_prob = mutation_prob
        self.clone_prob = mutation_prob if clone_prob is None else clone_prob
        self.adapter_prob = mutation_prob if adapter_prob is None else adapter_prob
        self.rng = rng

    def init_hparams(self, hparams: dict[str, Any]) -> None:
        """Adds the policy's own hparams to a root path's hparams."""
        if self.kind != "fixed":
            hparams["_mu_"] = min(MU_VALUES, key=lambda v: abs(v - self.mutation_prob))

    def start_child(self, hparams: dict[str, Any], mutations: dict[str, tuple]) -> None:
        """µ2Net: mutate ``_mu_`` first, with the parent's value, so the child's μ drives the rest."""
        if self.kind == "evolved" and self.rng.random() < hparams["_mu_"]:
            self._step(hparams, "_mu_", MU_VALUES, mutations)

    def fires(self, action: str, hparams: dict[str, Any], mutations: dict[str, tuple], adapt: bool = True) -> bool:
        """Draws whether ``action`` (e.g. ``"hp:opt_lr"``, ``"clone:block_1"``, ``"add:adapter_0"``) happens;
        without ``adapt``, ``per_action`` leaves the action's own probability (a hyperparameter) where it is."""
        # Training a copied block is where a first task gains most; a retrained patch embedding shifts every
        # feature above it and rarely pays off within one child (benchmarks/README.md), so only blocks get clone_prob.
        # Adapters get their own adapter_prob: under a scale factor below 1 they are the adaptation a task can pay,
        # and on a path that reuses another task's adapters, cloning one is the only way to train its own.
        prob = (self.clone_prob if action.startswith(BLOCK_CLONE)
                else self.adapter_prob if action.startswith(ADAPTER_ACTIONS) else None)
        if self.kind == "fixed":
            return self.rng.random() < (self.mutation_prob if prob is None else prob)
        if self.kind == "evolved":
            return self.rng.random() < hparams["_mu_"]
        key = f"_mu_|{action}"
        if key not in hparams:
            start = hparams["_mu_"] if prob is None else prob
            hparams[key] = min(MU_ACTION_VALUES, key=lambda v: abs(v - start))
        if adapt and self.rng.random() < hparams["_mu_"]:
            self._step(hparams, key, MU_ACTION_VALUES, mutations)
        return self.rng.random() < hparams[key]

    def _step(self, hparams: dict[str, Any], key: str, values: list[Any], mutations: dict[str, tuple]) -> None:
        old = hparams[key]
        hparams[key] = incremental_mutation(old, values, self.rng)
        if hparams[key] != old:
            mutations[key] = (old, hparams[key])
