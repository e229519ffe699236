"""medq.serve.batching.Batcher with a stand-in engine (no TensorFlow): batch composition, rows back to their
requests, the bounded queue, deadlines, an engine failure, closing."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from medq.serve.batching import Batcher, DeadlineExceeded, QueueFull, Stopped


class Engine:
    """Doubles its input; records each batch's size; optionally holds every call until ``release`` is set."""

    def __init__(self, hold: bool = False, fail_first: bool = False):
        self.sizes: list[int] = []
        self.release = threading.Event()
        self.entered = threading.Event()
        if not hold:
            self.release.set()
        self.fail_first = fail_first

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.release.wait(60)
        self.sizes.append(len(x))
        if self.fail_first and len(self.sizes) == 1:
            raise RuntimeError("engine broke")
        return x * 2


def _x(n: int, value: float) -> np.ndarray:
    return np.full((n, 2), value, np.float32)


def test_requests_are_batched_up_to_the_limit_and_get_their_own_rows():
    engine = Engine(hold=True)
    batcher = Batcher(engine, max_batch_size=4, max_queue_delay_s=60, max_queue_size=64)
    blocker = batcher.submit(_x(4, 0), 60)  # a full batch: runs at once, and the engine holds it
    assert engine.entered.wait(60)  # the worker is busy: what follows queues up
    futures = [batcher.submit(_x(n, i + 1), 60) for i, n in enumerate([1, 2, 1, 3, 1])]
    engine.release.set()
    for i, (future, n) in enumerate(zip(futures, [1, 2, 1, 3, 1])):
        np.testing.assert_array_equal(future.result(60), _x(n, 2 * (i + 1)))
    blocker.result(60)
    batcher.close(60)
    # the blocker, then 1+2+1 = 4 (full), then 3+1 = 4 (full): never above 4, requests in arrival order
    assert engine.sizes == [4, 4, 4]


def test_a_full_queue_refuses_at_once_and_a_late_request_is_not_run():
    engine = Engine(hold=True)
    batcher = Batcher(engine, max_batch_size=2, max_queue_delay_s=0, max_queue_size=3)
    batcher.submit(_x(1, 0), 60)
    assert engine.entered.wait(60)
    queued = batcher.submit(_x(2, 1), 60)
    expired = batcher.submit(_x(1, 2), -1)  # its deadline has passed before any batch can take it
    with pytest.raises(QueueFull, match="max_queue_size 3"):
        batcher.submit(_x(1, 3), 60)
    assert batcher.queued_images == 3
    engine.release.set()
    np.testing.assert_array_equal(queued.result(60), _x(2, 2))
    with pytest.raises(DeadlineExceeded):
        expired.result(60)
    batcher.close(60)
    assert engine.sizes == [1, 2]  # the expired request never reached the engine


def test_an_engine_failure_fails_its_batch_only_and_closing_runs_what_is_queued():
    engine = Engine(fail_first=True)
    batcher = Batcher(engine, max_batch_size=4, max_queue_delay_s=0, max_queue_size=8)
    with pytest.raises(RuntimeError, match="engine broke"):
        batcher.submit(_x(1, 1), 60).result(60)
    after = batcher.submit(_x(1, 5), 60)
    batcher.close(60)
    np.testing.assert_array_equal(after.result(0), _x(1, 10))
    with pytest.raises(Stopped):
        batcher.submit(_x(1, 1), 60)
    with pytest.raises(ValueError, match="between 1 and 4"):
        Batcher(engine, max_batch_size=4, max_queue_delay_s=0, max_queue_size=8).submit(_x(5, 1), 60)


def test_default_settings_batch_up_to_the_benchmarks_batch_size_under_load():
    """Under load the serve defaults run the benchmark's batch (the size its img/s is measured at), counted by the
    server's own batch-size metric: 32 requests queued while the engine is busy run as one batch of 32."""
    from prometheus_client.parser import text_string_to_metric_families

    from medq.config import BenchmarkConfig, ServeConfig
    from medq.serve.metrics import Metrics

    settings, metrics, engine = ServeConfig(), Metrics(), Engine(hold=True)
    batcher = Batcher(engine, max_batch_size=settings.max_batch_size,
                      max_queue_delay_s=settings.max_queue_delay_ms / 1000, max_queue_size=settings.max_queue_size,
                      on_batch=metrics.on_batch("m"))
    first = batcher.submit(_x(1, 0), 60)
    assert engine.entered.wait(60)  # the engine is busy with the first request: the load queues behind it
    queued = [batcher.submit(_x(1, i), 60) for i in range(BenchmarkConfig().batch_size)]
    engine.release.set()
    for i, future in enumerate([first, *queued]):
        np.testing.assert_array_equal(future.result(60), _x(1, 2 * (i - 1) if i else 0))
    batcher.close(60)
    samples = {s.name: s.value for family in text_string_to_metric_families(metrics.exposition().decode())
               for s in family.samples if s.name.startswith("medq_batch_size")}
    assert samples["medq_batch_size_count"] == 2  # the lone first request, then all 32 in one engine call
    assert samples["medq_batch_size_sum"] == 1 + 32
