"""The server's Prometheus metrics, in a registry of its own (two servers in one process do not mix counts)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from medq.serve.batching import BatchStats

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("medq_requests", "Requests answered, by model, endpoint and HTTP status",
                                ["model", "endpoint", "status"], registry=r)
        self.latency = Histogram("medq_request_seconds", "Time from request to answer, by model and endpoint",
                                 ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("medq_queue_seconds", "Time a request waited in its model's queue before its batch ran",
                               ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("medq_batch_size", "Images per engine call (the count is the number of calls)",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.engine = Histogram("medq_engine_seconds", "Time per engine call", ["model"], buckets=LATENCY_BUCKETS,
                                registry=r)
        self.in_flight = Gauge("medq_in_flight_requests", "Requests being handled now", registry=r)
        self.queued = Gauge("medq_queued_images", "Images waiting in a model's queue", ["model"], registry=r)
        # process_resident_memory_bytes, process_cpu_seconds_total, ...: what `medq loadtest` reads for its RSS and
        # server CPU columns when it is not given the server's pid
        ProcessCollector(registry=r)

    def on_batch(self, model: str):
        """The batcher's callback for ``model``."""
        def record(stats: BatchStats) -> None:
            self.batch_size.labels(model).observe(stats.size)
            self.engine.labels(model).observe(stats.run_seconds)
            for waited in stats.queue_seconds:
                self.queue.labels(model).observe(waited)
        return record

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
