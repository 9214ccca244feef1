"""Learning-rate schedules and the optimiser of spec §3: SGD with momentum / Nesterov, no weight decay."""

from __future__ import annotations

import math
from typing import Any

import torch

from munet.evolution.hparams import LR_SCALE

SCHEDULES = ("constant", "cosine", "restarts")


def warmup_cosine(step: int, peak: float, warmup: int, total: int) -> float:
    """optax's ``warmup_cosine_decay_schedule(peak/100, peak, warmup, total)``: linear warmup from peak/100,
    then cosine decay to 0 at ``total`` (which includes the warmup)."""
    if step < warmup:
        return peak / 100 + (peak - peak / 100) * step / warmup
    decay = max(total - warmup, 1)
    return 0.5 * peak * (1 + math.cos(math.pi * min(step - warmup, decay) / decay))


def learning_rate(hparams: dict[str, Any], step: int, steps_per_validation: int, validations: int, start: int = 0,
                  periods: int = 0) -> float:
    """The learning rate at ``step`` of a child's training.

    ``constant`` runs at half the peak so its mean matches the other schedules; ``restarts`` repeats the
    warmup-cosine once per validation period (SGDR). A ``cosine`` child trains its ``validations`` periods from
    period ``start`` of one warmup-cosine ``periods`` validation periods long (the spec: 0 of 0, the child's own
    whole schedule).
    """
    lr = hparams["opt_lr"] * hparams.get(LR_SCALE, 1.0)
    kind, ratio = hparams["opt_lr_schedule"], hparams["opt_lr_warmup_ratio"]
    if kind == "constant":
        return 0.5 * lr
    if kind == "cosine":
        total = steps_per_validation * (periods or validations)
        return warmup_cosine(start * steps_per_validation + step, lr, int(ratio * total), total)
    if kind == "restarts":
        return warmup_cosine(step % steps_per_validation, lr, int(ratio * steps_per_validation), steps_per_validation)
    raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")


def ramped_lengths(generations: int, validations: int, ramp: float) -> list[int]:
    """Validation periods of each of a task iteration's ``generations`` children's generations (``length_ramp``):
    rising linearly from ``1 - ramp`` to ``1 + ramp`` times ``validations``, rounded, at least one each, and
    adding up to ``generations x validations`` (the rounding's excess taken from the longest, its shortfall given
    to the shortest, so the lengths never fall). ``ramp = 0``: every generation ``validations``."""
    if generations == 1 or not ramp:
        return [validations] * generations
    lengths = [max(1, math.floor(validations * (1 + ramp * (2 * i / (generations - 1) - 1)) + 0.5))
               for i in range(generations)]
    total = generations * validations
    while sum(lengths) > total:
        lengths[lengths.index(max(lengths))] -= 1
    while sum(lengths) < total:
        lengths[len(lengths) - 1 - lengths[::-1].index(min(lengths))] += 1
    return lengths


def make_optimizer(params: list[torch.nn.Parameter], hparams: dict[str, Any]) -> torch.optim.SGD:
    """SGD with the child's momentum; momentum 0 (the spec's "None") is plain SGD, so Nesterov is off there."""
    momentum = float(hparams["opt_momentum"] or 0.0)
    return torch.optim.SGD(params, lr=hparams["opt_lr"], momentum=momentum,
                           nesterov=bool(hparams["opt_nesterov"]) and momentum > 0)
