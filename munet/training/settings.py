"""Settings of a child's training and evaluation, and moving tensors to the compute device."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor bound for CUDA goes through pinned memory so the copy is asynchronous."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class TrainSettings:
    """Budget and batching of one child's training.

    Args:
        batch_size: training batch size.
        max_steps_between_validations: K is ``min(ceil(N_train / batch_size), this)``.
        validations: validations per child; a child trains ``K * validations`` steps.
        max_val_examples: size of the fixed validation subset.
        eval_batch_size: batch size for evaluation and frozen-feature computation.
        clip_norm: global gradient-norm clip.
        calibration_examples: training images used to freeze a new head's input statistics (0: none, so a new
            head is the spec's plain zero-initialised linear head on the class token).
        device: torch device.
        autocast_bf16: run forward passes in bfloat16 autocast (CUDA only).
        prefetch_batches: training batches read and augmented ahead in a background thread
            (:mod:`munet.training.batches`; 0: each when its step needs it). Results are the same either way.
        inherit_momentum: µ2Net's optimiser-state inheritance: start each trainable component's momentum from
            the trace it was cloned with, and keep the trace of the kept snapshot on the component.
        shared_training: train a generation's children in lock-step sharing frozen prefixes; ``False`` trains
            them one after another on the same batches (same results, for measuring what sharing saves).
        accept_ties: accept a validation score equal to the one to beat (µ2Net's ``>=``); muNet's test is strict.
        accept_margin: the first snapshot a child keeps must score more than this above the score to beat.
        stop_margin: stop training a child, before its budget ends, at a validation whose score is more than this
            below the score it must beat while it has no accepted snapshot (0: never; only children of a path of
            the same task have a finite score to beat).
        keep_diverged: a child that diverges after an accepted validation keeps that snapshot (the spec); ``False``
            discards it.
        schedule_start: a ``cosine`` child trains its ``validations`` periods from this validation period of one
            warmup-cosine ``schedule_periods`` periods long (0 of 0: its own whole schedule, the spec).
        schedule_periods: see ``schedule_start``.
    """

    batch_size: int = 64
    max_steps_between_validations: int = 10
    validations: int = 4
    max_val_examples: int = 1000
    eval_batch_size: int = 256
    clip_norm: float = 1.0
    calibration_examples: int = 256
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_bf16: bool = False
    prefetch_batches: int = 0
    inherit_momentum: bool = False
    shared_training: bool = True
    accept_ties: bool = False
    stop_margin: float = 0.0
    accept_margin: float = 0.0
    keep_diverged: bool = True
    schedule_start: int = 0
    schedule_periods: int = 0

    def steps_between_validations(self, num_train: int) -> int:
        return max(1, min(math.ceil(num_train / self.batch_size), self.max_steps_between_validations))
