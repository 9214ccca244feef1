"""Dynamic batching: requests that arrive within a few milliseconds of each other, for any tasks, are merged into one
forward batch, so every component their paths share runs once per batch, not once per request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from munet.predict import Prediction
from munet.serving.metrics import ServeMetrics

# infer(images, tasks, wanted) -> task -> one prediction per image of wanted[task], in that order
Infer = Callable[[list[torch.Tensor], list[str], dict[str, list[int]]], dict[str, list[Prediction]]]
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The batcher's queue holds its maximum number of requests: the caller should retry later."""


@dataclass
class _Job:
    images: list[torch.Tensor]
    tasks: list[str]
    answer: asyncio.Future[dict[str, list[Prediction]]]


class Batcher:
    """Collects requests into batches and runs each batch in one worker thread.

    A batch starts with the oldest waiting request and takes every request that arrives within ``max_wait_s`` of
    it, up to ``max_images`` images. It runs once for the union of the requested tasks: the components several of
    those tasks' paths start with run once on all of the batch's images, each task's own components only on the
    images of the requests that asked for it; each request receives its own tasks' answers for its own images.

    Args:
        infer: ``infer(images, tasks, wanted)`` -> task -> one prediction per image of ``wanted[task]`` (e.g.
            :meth:`munet.api.MultitaskSystem.predict_tasks`).
        metrics: where batch sizes and the queue's depth are recorded.
        max_wait_s: how long a batch waits for more requests after its first.
        max_images: images per batch beyond which no further request joins it.
        max_queue: requests that may wait; beyond it :meth:`submit` raises :class:`QueueFull`.
    """

    def __init__(self, infer: Infer, metrics: ServeMetrics, max_wait_s: float = 0.005, max_images: int = 64,
                 max_queue: int = 256):
        self.infer = infer
        self.metrics = metrics
        self.max_wait_s = max_wait_s
        self.max_images = max_images
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(max_queue)
        self._worker: asyncio.Task[None] | None = None
        # one thread: torch runs one batch at a time, and the event loop stays free to accept requests meanwhile
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="munet-batch")

    def start(self) -> None:
        """Starts collecting batches (call inside the running event loop)."""
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stops the worker; requests still waiting are answered with an error."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.answer.done():
                job.answer.set_exception(RuntimeError("the server is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, images: list[torch.Tensor], tasks: list[str]) -> dict[str, list[Prediction]]:
        """The predictions of ``tasks`` for ``images``, computed in the next batch.

        Raises:
            QueueFull: too many requests are waiting.
        """
        job = _Job(images, tasks, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull from None
        self.metrics.queued.set(self._queue.qsize())
        return await job.answer

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            images = len(batch[0].images)
            deadline = loop.time() + self.max_wait_s
            while images < self.max_images:
                if not self._queue.empty():  # already waiting: joins even when the wait is over (max_wait_s = 0)
                    job = self._queue.get_nowait()
                elif loop.time() >= deadline:
                    break
                else:
                    try:
                        job = await asyncio.wait_for(self._queue.get(), deadline - loop.time())
                    except TimeoutError:
                        break
                batch.append(job)
                images += len(job.images)
            self.metrics.queued.set(self._queue.qsize())
            await self._answer(batch, loop)

    async def _answer(self, batch: list[_Job], loop: asyncio.AbstractEventLoop) -> None:
        tasks = list(dict.fromkeys(t for job in batch for t in job.tasks))  # first-seen order, no repeats
        images = [x for job in batch for x in job.images]
        wanted: dict[str, list[int]] = {t: [] for t in tasks}
        offsets = []  # per job: task -> where its answers start in that task's answers
        start = 0
        for job in batch:
            offsets.append({t: len(wanted[t]) for t in job.tasks})
            for t in job.tasks:
                wanted[t].extend(range(start, start + len(job.images)))
            start += len(job.images)
        self.metrics.batch_images.observe(len(images))
        self.metrics.batch_requests.observe(len(batch))
        try:
            answers = await loop.run_in_executor(self._executor, self.infer, images, tasks, wanted)
        except Exception as err:  # the batch's requests fail; the server and the next batches carry on
            log.exception("a batch of %d requests failed", len(batch))
            for job in batch:
                if not job.answer.done():
                    job.answer.set_exception(err)
            return
        for job, offset in zip(batch, offsets):
            if not job.answer.done():  # a client that went away cancelled its future
                job.answer.set_result({t: answers[t][offset[t]: offset[t] + len(job.images)] for t in job.tasks})
