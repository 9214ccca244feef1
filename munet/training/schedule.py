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


def learning_rate(hparams: dict[str, Any], step: int, steps_per_validation: int, validations: int, part: int = 0,
                  parts: int = 1) -> float:
    """The learning rate at ``step`` of a child's training.

    ``constant`` runs at half the peak so its mean matches the other schedules; ``restarts`` repeats the
    warmup-cosine once per validation period (SGDR). A ``cosine`` child trains part ``part`` of ``parts`` equal
    consecutive parts of one warmup-cosine (the spec: one part, the whole schedule per child).
    """
    lr = hparams["opt_lr"] * hparams.get(LR_SCALE, 1.0)
    kind, ratio = hparams["opt_lr_schedule"], hparams["opt_lr_warmup_ratio"]
    if kind == "constant":
        return 0.5 * lr
    if kind == "cosine":
        child = steps_per_validation * validations
        total = child * parts
        return warmup_cosine(part * child + step, lr, int(ratio * total), total)
    if kind == "restarts":
        return warmup_cosine(step % steps_per_validation, lr, int(ratio * steps_per_validation), steps_per_validation)
    raise ValueError(f"unknown schedule {kind!r}; expected one of {SCHEDULES}")


def make_optimizer(params: list[torch.nn.Parameter], hparams: dict[str, Any]) -> torch.optim.SGD:
    """SGD with the child's momentum; momentum 0 (the spec's "None") is plain SGD, so Nesterov is off there."""
    momentum = float(hparams["opt_momentum"] or 0.0)
    return torch.optim.SGD(params, lr=hparams["opt_lr"], momentum=momentum,
                           nesterov=bool(hparams["opt_nesterov"]) and momentum > 0)
