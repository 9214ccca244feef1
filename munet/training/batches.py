"""The training batches of a generation: example order and augmentation drawn from the generation's random stream,
optionally prepared ahead in a background thread so an accelerator does not wait for reading and augmentation.

Prefetching changes nothing in the results: the batches are drawn in the same order from the same generator, and
each batch carries the generator's state after it was drawn, so a generation that stops before its last step leaves
the generator where drawing only the batches it used would have left it (:meth:`Prefetch.close`). A thread, not
worker processes: the one generator must stay the only source of order and augmentation (worker processes would
each need a stream of their own), and reading, decoding and ``torch`` ops release the GIL.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from munet.data.augment import eval_batch, train_batch
from munet.data.task import TaskData


@dataclass
class Batch:
    """One training step's batch.

    Attributes:
        idx: rows of the training split.
        x: the batch's normalised inputs on the CPU (pinned when bound for CUDA), augmented or plain; ``None`` when
            not prepared (the trainer reads unaugmented inputs when the frozen-feature cache lacks their features).
        state: the generator's state after this batch was drawn.
    """

    idx: torch.Tensor
    x: torch.Tensor | None
    state: torch.Tensor


def draw_batches(task: TaskData, ds_hparams: dict[str, Any], steps: int, batch_size: int, mean: tuple, std: tuple,
                 generator: torch.Generator, inputs: str, pin: bool = False) -> Iterator[Batch]:
    """``steps`` batches of ``task``'s training split, a fresh example-level shuffle every epoch, at
    ``ds_image_size``; ``inputs``: ``augmented`` (with ``ds_hparams``), ``plain`` (preprocessed without
    augmentation, for a split read per batch: reading is then the cost) or ``none`` (rows only); ``pin``: the
    inputs in pinned memory."""
    n = len(task.train_y)
    order, cursor = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor: cursor + batch_size]
        cursor += batch_size
        size, x = ds_hparams["ds_image_size"], None
        if inputs == "augmented":
            x = train_batch(task.train_x[idx], ds_hparams, size, mean, std, generator)
        elif inputs == "plain":
            x = eval_batch(task.train_x[idx], size, mean, std)
        x = x.pin_memory() if pin and x is not None else x
        yield Batch(idx, x, generator.get_state())


class Prefetch:
    """Iterates over :func:`draw_batches` ``depth`` batches ahead in a background thread (``depth`` 0: in the
    calling thread); ``waited`` counts the seconds the caller spent waiting for batches. Use as a context manager
    (:meth:`close` on exit)."""

    def __init__(self, batches: Iterator[Batch], generator: torch.Generator, depth: int):
        self.generator = generator
        self.waited = 0.0
        self._batches = batches
        self._last: Batch | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue[tuple[Batch | None, BaseException | None]] = queue.Queue(maxsize=max(depth, 1))
        self._thread = threading.Thread(target=self._produce, name="munet-prefetch", daemon=True) if depth else None
        if self._thread:
            self._thread.start()

    def _produce(self) -> None:
        try:
            for batch in self._batches:
                if not self._put((batch, None)):
                    return
            self._put((None, None))
        except BaseException as err:  # handed to the caller, which raises it
            self._put((None, err))

    def _put(self, item: tuple[Batch | None, BaseException | None]) -> bool:
        """Queues ``item`` unless the caller has stopped taking batches; whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Batch:
        t0 = time.perf_counter()
        try:
            if self._thread is None:
                batch = next(self._batches)
            else:
                batch, err = self._queue.get()
                if err is not None:
                    raise err
                if batch is None:
                    raise StopIteration
        finally:
            self.waited += time.perf_counter() - t0
        self._last = batch
        return batch

    def close(self) -> None:
        """Stops the background thread and sets the generator to its state after the last batch taken."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._last is not None:
            self.generator.set_state(self._last.state)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
