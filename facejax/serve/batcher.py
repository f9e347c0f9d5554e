"""Dynamic batching: concurrent queries share one call of the jitted embedder.

Request handlers decode their image, then `submit` it. A worker thread takes the oldest
query and gathers more until the batch is full, or `max_wait` has passed since the oldest
arrived, or no other query is being decoded (then nothing is about to arrive, so a lone
query does not wait for company). The batch is padded to a compiled power-of-two size,
embedded, and searched in one call. The queue is bounded: `submit` raises `Overloaded`
instead of letting waits grow without limit.

Several workers run batches at once: one XLA:CPU execution of a CNN kept only ~1.2 of 2 cores
busy, and two or three concurrent ones 1.9 (dlib ResNet, batch 8: 95 img/s in one thread,
140-181 in two or three; BUILD_NOTES.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The queue is full: the caller should answer 503 with Retry-After."""


@dataclasses.dataclass
class Answer:
    embedding: np.ndarray       # f32 [D]
    hits: list | None           # gallery hits (search queries), else None
    queue_s: float
    embed_s: float
    search_s: float
    batch_size: int


@dataclasses.dataclass
class _Job:
    image: np.ndarray
    k: int                      # 0: embed only
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float


class Batcher:
    """`embed_fn(images_u8[B,S,S,3]) -> f32[B,D]`; `search_fn(emb[Q,D], k) -> [hits per row]`."""

    def __init__(self, embed_fn: Callable, search_fn: Callable, *, batch_sizes: list[int],
                 max_wait_s: float, queue_size: int, on_batch: Callable | None = None,
                 workers: int = 1):
        self._embed, self._search = embed_fn, search_fn
        self._sizes = sorted(batch_sizes)
        self.max_batch = self._sizes[-1]
        self._max_wait = max_wait_s
        self._queue_size = queue_size
        self._on_batch = on_batch
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._decoding = 0
        self._running = False
        self._workers = workers
        self._threads: list[threading.Thread] = []

    # -- state for metrics
    @property
    def depth(self) -> int:
        """Queries waiting for the embedder or being decoded."""
        return len(self._jobs) + self._decoding

    def start(self) -> None:
        self._running = True
        self._threads = [threading.Thread(target=self._work, name=f"facejax-batcher-{i}",
                                          daemon=True) for i in range(self._workers)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=30)

    @contextlib.contextmanager
    def admit(self):
        """Counts one query from before its decode until it is queued; Overloaded when full."""
        with self._cond:
            if len(self._jobs) + self._decoding >= self._queue_size:
                raise Overloaded()
            self._decoding += 1
        try:
            yield
        finally:
            with self._cond:
                self._decoding -= 1
                self._cond.notify_all()

    async def submit(self, image: np.ndarray, k: int = 0) -> Answer:
        """Embeds `image` (and searches its top-`k` when k > 0) in the next batch."""
        loop = asyncio.get_running_loop()
        job = _Job(image, k, loop.create_future(), loop, time.perf_counter())
        with self._cond:
            if not self._running:
                raise Overloaded()
            self._jobs.append(job)  # admit() already bounded the count
            self._cond.notify_all()
        return await job.future

    def _take(self) -> list[_Job]:
        with self._cond:
            while self._running and not self._jobs:
                self._cond.wait()
            if not self._running:
                return []
            batch = [self._jobs.popleft()]
            deadline = batch[0].enqueued + self._max_wait
            while len(batch) < self.max_batch:
                if self._jobs:
                    batch.append(self._jobs.popleft())
                    continue
                left = deadline - time.perf_counter()
                if self._decoding == 0 or left <= 0:
                    break
                self._cond.wait(left)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                for job in self._drain():
                    _resolve(job, exc=Overloaded())
                return
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - handed to each waiting request
                log.exception("embedding a batch of %d failed", len(batch))
                for job in batch:
                    _resolve(job, exc=e)

    def _drain(self) -> list[_Job]:
        with self._cond:
            jobs = list(self._jobs)
            self._jobs.clear()
        return jobs

    def _run(self, batch: list[_Job]) -> None:
        n = len(batch)
        size = next(s for s in self._sizes if s >= n)
        images = np.zeros((size,) + batch[0].image.shape, np.uint8)
        for i, job in enumerate(batch):
            images[i] = job.image
        t0 = time.perf_counter()
        emb = self._embed(images)[:n]
        t1 = time.perf_counter()
        want = [i for i, job in enumerate(batch) if job.k > 0]
        hits: list = [None] * n
        if want:
            found = self._search(emb[want], max(batch[i].k for i in want))
            for i, h in zip(want, found):
                hits[i] = h[: batch[i].k]
        t2 = time.perf_counter()
        if self._on_batch is not None:
            self._on_batch(n, t1 - t0)
        for i, job in enumerate(batch):
            _resolve(job, Answer(emb[i], hits[i], t0 - job.enqueued, t1 - t0, t2 - t1, n))


def _resolve(job: _Job, answer: Answer | None = None, exc: BaseException | None = None) -> None:
    def settle():
        if job.future.done():  # the client went away and the request was cancelled
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(answer)

    with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is waiting
        job.loop.call_soon_threadsafe(settle)
