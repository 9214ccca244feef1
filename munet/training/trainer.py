"""Training one generation of children in lock-step on shared batches, with validation-based snapshots (spec §4.4).

All children of a generation consume the same augmented batches. Each step computes every distinct frozen
prefix once (no autograd) and trains each child's trainable remainder. Every ``K`` steps each child is validated
on a fixed validation subset; a child keeps the snapshot of its best-scoring validation and is accepted only if
that score beats its parent's (children of another task's path or of the root always can). A child whose loss
becomes NaN or diverges is dropped with a logged reason.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from munet.data.augment import eval_batch
from munet.data.rows import ImageRows
from munet.data.task import TaskData
from munet.model.path import TaskPath
from munet.training.batches import Batch, Prefetch, draw_batches
from munet.training.evaluate import Evaluator
from munet.training.frozen import FeatureCache, frozen_forward, frozen_rows
from munet.training.schedule import learning_rate, make_optimizer
from munet.training.settings import TrainSettings, to_device

DIVERGENCE_FACTOR = 20.0  # loss above this multiple of chance-level loss (ln C) counts as diverged


def is_identity_augmentation(ds: dict[str, Any]) -> bool:
    """No crop, no flip, no colour jitter: training inputs are then deterministic per example."""
    jitter = ("ds_brightness_delta", "ds_contrast_delta", "ds_saturation_delta", "ds_hue_delta")
    return ds["ds_area_range_min"] >= 1.0 and not ds["ds_flip_left_right"] and not any(ds[k] for k in jitter)


@dataclass
class ChildState:
    """Bookkeeping of one child during training."""

    path: TaskPath
    best_score: float
    optimizer: torch.optim.Optimizer | None = None
    evals: list[float] = field(default_factory=list)
    snapshot: dict[int, dict[str, torch.Tensor]] | None = None
    momentum: dict[int, dict[str, torch.Tensor]] | None = None  # the optimiser's traces at the snapshot
    failed: str | None = None
    stopped: str | None = None  # why training ended early without failing (hopeless after a validation)
    steps: int = 0  # training steps taken

    @property
    def active(self) -> bool:
        return self.failed is None and self.stopped is None


@dataclass
class ChildOutcome:
    """What training did to one child.

    Attributes:
        quality: best validation accuracy (``None`` if never validated).
        evals: validation accuracy after each validation period.
        accepted: its best score beat the one to beat; its best-scoring snapshot is loaded.
        failed: why training broke down (NaN or diverging loss), if it did.
        stopped: why training ended early as hopeless, if it did.
        steps: training steps taken; ``images`` = steps x batch size.
        images: training images processed.
        train_time: wall seconds of the generation it was trained in.
        data_wait: seconds of ``train_time`` the generation waited for training batches (reading, augmentation).
    """

    quality: float | None
    evals: list[float]
    accepted: bool
    failed: str | None
    stopped: str | None
    steps: int
    images: int
    train_time: float
    data_wait: float

    def as_metrics(self) -> dict[str, Any]:
        """The outcome under the keys a path's metrics (and the store's ``paths.metrics``) use."""
        return {"quality": self.quality, "evals": self.evals, "improved": self.accepted, "failed": self.failed,
                "stopped": self.stopped, "train_steps": self.steps, "train_images": self.images,
                "train_time": self.train_time, "data_wait": self.data_wait}


def _calibrate_head(path: TaskPath, task: TaskData, evaluator: Evaluator, image_size: int) -> None:
    """Freezes a new head's input statistics from the features it will read on training images."""
    n = evaluator.settings.calibration_examples
    x = evaluator.inputs(task, "train", image_size, n)
    ops = path.ops()
    with torch.no_grad():
        start, h = frozen_forward(path, x, evaluator.cache, (task.name, "train", image_size, n),
                                  chunk=evaluator.settings.eval_batch_size)
        feats = path.forward(h, start=start, stop=len(ops) - 1)
    path.components["head"].module.calibrate(feats.float())


def train_generation(children: list[TaskPath], parent_scores: list[float], task: TaskData, ds_hparams: dict[str, Any],
                     settings: TrainSettings, evaluator: Evaluator, score_fn: Callable[[TaskPath, float], float],
                     generator: torch.Generator, on_step: Callable[[int], None] | None = None
                     ) -> list[ChildOutcome]:
    """Trains ``children`` in lock-step; returns each child's outcome, in order. Accepted children end with their
    best-scoring snapshot loaded.

    Args:
        children: the generation's children (all for ``task``).
        parent_scores: per child, the score to beat (``-inf`` when the parent is another task or the root).
        task: the task's data.
        ds_hparams: the generation's data hparams (``ds_image_size`` and augmentation).
        settings: budget and batching.
        evaluator: shared evaluator with its feature cache.
        score_fn: ``score_fn(path, quality)`` -> score of the path if it had that validation accuracy.
        generator: the random stream for batch order and augmentation.
        on_step: called after every training step with the number of children trained in it (progress).
    """
    if not settings.shared_training and len(children) > 1:
        start = generator.get_state()  # every child sees the batches and augmentations the generation would
        alone = [train_alone(child, score, task, ds_hparams, settings, evaluator, score_fn, start, on_step)
                 for child, score in zip(children, parent_scores)]
        generator.set_state(stream_after(alone))
        return [outcome for outcome, _ in alone]
    t0 = time.perf_counter()
    dev = settings.device
    size = ds_hparams["ds_image_size"]
    train_x, train_y = task.train_x, task.train_y
    k = settings.steps_between_validations(len(train_y))
    total = k * settings.validations
    limit = settings.max_val_examples
    chance_loss = math.log(max(task.num_classes, 2))
    states = [ChildState(c, s) for c, s in zip(children, parent_scores)]
    for st in states:
        if st.path.fresh_head and settings.calibration_examples:  # 0: the spec's plain head (mu 0, sigma 1)
            _calibrate_head(st.path, task, evaluator, size)
        st.path.set_mode(train=True)
        st.optimizer = make_optimizer(st.path.trainable_parameters(), st.path.hparams)
        if settings.inherit_momentum:
            _restore_momentum(st)
            st.momentum = {}  # not None: _validate then keeps the traces with each snapshot
    # frozen prefixes first, shortest first, so longer prefixes can start from shorter cached ones
    states.sort(key=lambda s: s.path.first_trainable_op())
    deterministic = is_identity_augmentation(ds_hparams)

    def images(rows: torch.Tensor, batch: Batch) -> torch.Tensor:
        if batch.x is not None and torch.equal(rows, batch.idx):  # read and preprocessed ahead
            return to_device(batch.x, dev)
        return to_device(eval_batch(train_x[rows], size, evaluator.mean, evaluator.std), dev)

    # a split read per batch is read ahead too when prefetching: its unaugmented inputs are then read at most once
    # per step, ahead, for every child whose frozen features are not cached
    inputs = "augmented" if not deterministic else "plain" if (
        settings.prefetch_batches and isinstance(train_x, ImageRows)) else "none"
    batches = draw_batches(task, ds_hparams, total, settings.batch_size, evaluator.mean, evaluator.std, generator,
                           inputs, pin=dev.type == "cuda")
    with Prefetch(batches, generator, settings.prefetch_batches) as prefetch:
        for step, batch in enumerate(prefetch):
            yb = to_device(train_y[batch.idx], dev)
            if deterministic:  # frozen prefixes of each example are computed once and kept across steps
                prefix = partial(frozen_rows, images=partial(images, batch=batch), idx=batch.idx,
                                 num_rows=len(train_y), cache=evaluator.cache, tag=(task.name, "train", size))
            else:  # augmented: frozen prefixes are shared between the children on this batch only
                prefix = partial(frozen_forward, x=to_device(batch.x, dev), cache=FeatureCache(1 << 40), tag="batch")
            for st in states:
                if st.active:
                    _train_step(st, prefix, yb, step, k, settings, evaluator, chance_loss)
            if (step + 1) % k == 0:
                for st in states:
                    if st.active:
                        _validate(st, task, size, limit, evaluator, score_fn, settings)
            if on_step:
                on_step(len(states))
            if not any(st.active for st in states):
                break
    elapsed = time.perf_counter() - t0
    outcomes: dict[int, ChildOutcome] = {}
    for st in states:
        accepted = st.snapshot is not None and (st.failed is None or settings.keep_diverged)
        outcomes[id(st.path)] = ChildOutcome(max(st.evals) if st.evals else None, st.evals, accepted, st.failed,
                                             st.stopped, st.steps, st.steps * settings.batch_size, elapsed,
                                             prefetch.waited)
        if accepted:
            comps = {c.id: c for c in st.path.trainable_components()}
            for cid, state in st.snapshot.items():
                comps[cid].module.load_state_dict(state)
            for cid, comp in comps.items():  # a clone's inherited trace is stale once it trains without it
                comp.momentum = (st.momentum or {}).get(cid) if settings.inherit_momentum else None
        st.path.set_mode(train=False)
        st.optimizer = st.snapshot = st.momentum = None
    return [outcomes[id(child)] for child in children]


def train_alone(child: TaskPath, parent_score: float, task: TaskData, ds_hparams: dict[str, Any],
                settings: TrainSettings, evaluator: Evaluator, score_fn: Callable[[TaskPath, float], float],
                start: torch.Tensor, on_step: Callable[[int], None] | None = None) -> tuple[ChildOutcome, torch.Tensor]:
    """Trains one child as :func:`train_generation` does, its random stream starting from the generator state
    ``start``; returns its outcome and the stream's end state (for :func:`stream_after`)."""
    generator = torch.Generator().set_state(start)
    outcome, = train_generation([child], [parent_score], task, ds_hparams, settings, evaluator, score_fn, generator,
                                on_step)
    return outcome, generator.get_state()


def stream_after(alone: list[tuple[ChildOutcome, torch.Tensor]]) -> torch.Tensor:
    """The generator state after children trained one by one (:func:`train_alone`) from the same start: where
    lock-step training, which runs as long as its longest child, would leave it (the first longest child's end)."""
    return max(alone, key=lambda result: result[0].steps)[1]


def _train_step(st: ChildState, prefix: Callable[[TaskPath], tuple[int, torch.Tensor]], yb: torch.Tensor, step: int,
                k: int, settings: TrainSettings, evaluator: Evaluator, chance_loss: float) -> None:
    path = st.path
    st.steps += 1  # counted before the loss check: the batch was processed even if it is the one that diverges
    with evaluator.autocast():
        start, h = prefix(path)
        logits = path.forward(h, start=start)
    loss = F.cross_entropy(logits.float(), yb)
    if not torch.isfinite(loss):
        st.failed = f"loss became {loss.item()} at step {step}"
    elif loss.item() > DIVERGENCE_FACTOR * chance_loss:
        st.failed = f"diverged: loss {loss.item():.3g} at step {step} (chance level {chance_loss:.3g})"
    if st.failed:
        return
    lr = learning_rate(path.hparams, step, k, settings.validations, settings.schedule_start, settings.schedule_periods)
    for group in st.optimizer.param_groups:
        group["lr"] = lr
    st.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(path.trainable_parameters(), settings.clip_norm)
    st.optimizer.step()
    # free the gradients now rather than at this child's next step: one child of the generation holds them at a time
    st.optimizer.zero_grad(set_to_none=True)


def _validate(st: ChildState, task: TaskData, size: int, limit: int, evaluator: Evaluator,
              score_fn: Callable[[TaskPath, float], float], settings: TrainSettings) -> None:
    quality = evaluator.accuracy(st.path, task, "val", size, limit)
    st.evals.append(quality)
    score = score_fn(st.path, quality)
    if st.snapshot is None and settings.stop_margin and score < st.best_score - settings.stop_margin:
        st.stopped = f"hopeless: validation score {score:.4f} after {st.steps} steps, {st.best_score:.4f} to beat"
        return
    bar = st.best_score + (settings.accept_margin if st.snapshot is None else 0.0)
    if score > bar or (settings.accept_ties and score == bar):  # muNet: strict; µ2Net: >=
        st.best_score = score
        st.snapshot = {c.id: copy.deepcopy(c.module.state_dict()) for c in st.path.trainable_components()}
        if st.momentum is not None:
            st.momentum = _momentum_traces(st)


def _restore_momentum(st: ChildState) -> None:
    """Seeds the optimiser with the momentum traces the child's components carry (cloned ones inherit theirs)."""
    if not st.optimizer.defaults["momentum"]:
        return
    for comp in st.path.trainable_components():
        for name, param in comp.module.named_parameters():
            trace = (comp.momentum or {}).get(name)
            if trace is not None and trace.shape == param.shape:
                st.optimizer.state[param]["momentum_buffer"] = trace.to(param.device, param.dtype).clone()


def _momentum_traces(st: ChildState) -> dict[int, dict[str, torch.Tensor]]:
    """The optimiser's current momentum trace of every trainable parameter, by component id and parameter name."""
    traces: dict[int, dict[str, torch.Tensor]] = {}
    for comp in st.path.trainable_components():
        own = {name: st.optimizer.state[param]["momentum_buffer"].detach().clone()
               for name, param in comp.module.named_parameters()
               if st.optimizer.state.get(param, {}).get("momentum_buffer") is not None}
        if own:
            traces[comp.id] = own
    return traces
