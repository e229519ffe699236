"""Dynamic batching: requests for one model wait in a bounded queue; one worker thread runs them through the engine
in batches of up to ``max_batch_size`` images, waiting at most ``max_queue_delay`` after a batch's first request.

A full queue refuses a request at once (:class:`QueueFull`, the server's 503 + Retry-After) instead of growing; a
request whose deadline passed before its batch ran is dropped unrun (:class:`DeadlineExceeded`). Each request gets a
``concurrent.futures.Future`` resolved with its rows of the batch's output.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


class QueueFull(Exception):
    """The model's queue holds ``max_queue_size`` images already."""


class DeadlineExceeded(Exception):
    """The request waited in the queue past its deadline; it was not run."""


class Stopped(Exception):
    """The batcher was closed before the request ran."""


@dataclass
class _Request:
    x: np.ndarray
    deadline: float
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What one engine call did, for the metrics: images in it and each request's wait in the queue."""

    size: int
    queue_seconds: list[float]
    run_seconds: float


class Batcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], *, max_batch_size: int, max_queue_delay_s: float,
                 max_queue_size: int, name: str = "model", on_batch: Callable[[BatchStats], None] | None = None):
        self._run, self.name = run, name
        self.max_batch_size, self.max_queue_delay_s, self.max_queue_size = max_batch_size, max_queue_delay_s, \
            max_queue_size
        self._on_batch = on_batch
        self._queue: collections.deque[_Request] = collections.deque()
        self._queued_images = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def submit(self, x: np.ndarray, timeout_s: float) -> Future:
        """Queue ``x`` [n, ...] (n ≤ max_batch_size); raises QueueFull or Stopped instead of waiting."""
        if not 0 < len(x) <= self.max_batch_size:
            raise ValueError(f"{self.name}: {len(x)} images in one request; between 1 and {self.max_batch_size}")
        request = _Request(x, time.monotonic() + timeout_s)
        with self._cond:
            if self._closing:
                raise Stopped(f"{self.name}: the server is shutting down")
            if self._queued_images + len(x) > self.max_queue_size:
                raise QueueFull(f"{self.name}: {self._queued_images} images are queued (serve.max_queue_size "
                                f"{self.max_queue_size}); retry shortly")
            self._queue.append(request)
            self._queued_images += len(x)
            self._cond.notify()
        return request.future

    def close(self, timeout_s: float | None = None) -> None:
        """Stop taking requests; the ones queued still run; then the worker ends."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout_s)

    # --- the worker -----------------------------------------------------------------------------------------------

    def _take(self) -> list[_Request] | None:
        """The next batch: wait for a first request, then until the batch is full or its delay is up."""
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            due = self._queue[0].arrived + self.max_queue_delay_s
            while self._queued_images < self.max_batch_size and not self._closing:
                left = due - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, size = [], 0
            while self._queue and size + len(self._queue[0].x) <= self.max_batch_size:
                request = self._queue.popleft()
                self._queued_images -= len(request.x)
                size += len(request.x)
                batch.append(request)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for request in batch:
                if not request.future.set_running_or_notify_cancel():
                    continue  # the client went away
                if now > request.deadline:
                    request.future.set_exception(DeadlineExceeded(
                        f"{self.name}: waited {now - request.arrived:.1f} s in the queue, past the request's deadline "
                        "(serve.request_timeout_ms); not run"))
                    continue
                live.append(request)
            if live:
                self._run_batch(live, now)

    def _run_batch(self, batch: list[_Request], started: float) -> None:
        x = np.concatenate([r.x for r in batch]) if len(batch) > 1 else batch[0].x
        try:
            y = self._run(x)
        except Exception as exc:  # noqa: BLE001 - the requests get the error (and log it); the worker lives on
            for r in batch:
                r.future.set_exception(exc)
            return
        took = time.monotonic() - started
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(x), [started - r.arrived for r in batch], took))
        start = 0
        for r in batch:
            r.future.set_result(y[start:start + len(r.x)])
            start += len(r.x)
