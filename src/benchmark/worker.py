"""One measuring process: ``python -m medq.benchmark.worker JOB.json`` (the parent starts it with an argument list
and the thread environment of the run's runtime config, and never runs two of them at once except for the
deliberate multi-instance measurement).

Job kinds:
- ``measure``: load one engine, then latency at batch 1 (warm-up first), throughput for each batch size of the sweep,
  and the probabilities for every input image (written to ``job['probs']``; the parent computes the metrics);
- ``instance``: one instance of a multi-instance run, pinned to its CPUs with ``os.sched_setaffinity``: load and warm
  up, signal ready, wait for the parent's go, then time ``throughput_iterations`` batches;
- ``prepare``: build the engines' models from their recipes (medq.benchmark.reference), nothing timed.

Every kind writes its result JSON to ``job['result']`` with its own pid and parent pid, the sha256 of the inputs it
loaded, its CPU affinity and the thread settings in force.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from medq import artifacts, engines
from medq.hwinfo import thread_settings_in_force

GO_TIMEOUT = 900.0  # seconds an instance waits for the others to load


def clock() -> float:
    """System-wide monotonic seconds: comparable between the processes of a multi-instance run."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean()),
            "min": float(ms.min()), "max": float(ms.max()), "n": int(len(ms))}


def make_batches(x: np.ndarray, batch_size: int, count: int) -> list[np.ndarray]:
    """``count`` contiguous in-memory batches cycling through the inputs (repeating images when there are fewer
    than ``batch_size``), so that timing never touches the memory-mapped file."""
    n = len(x)
    count = max(1, min(count, -(-n // batch_size)))
    return [np.ascontiguousarray(x[(k * batch_size + np.arange(batch_size)) % n]) for k in range(count)]


def timed_calls(predict: Callable[[np.ndarray], np.ndarray], batches: list[np.ndarray], warmup: int,
                iterations: int) -> list[float]:
    for i in range(warmup):
        predict(batches[i % len(batches)])
    times = []
    for i in range(iterations):
        batch = batches[i % len(batches)]
        start = time.perf_counter()
        predict(batch)
        times.append(time.perf_counter() - start)
    return times


def throughput(times: list[float], batch_size: int) -> dict[str, Any]:
    """Images per second from the median batch time (robust to bursts of load from other processes); the mean-based
    figure is kept beside it."""
    return {"batch_size": batch_size, "throughput_ips": batch_size / float(np.median(times)),
            "throughput_mean_ips": batch_size * len(times) / sum(times), "batch_latency_ms": percentiles_ms(times)}


def predict_all(predict, path: str | Path, batch_size: int) -> np.ndarray:
    """Probabilities for every row of the .npy at ``path``, read batch by batch with plain reads (a memory map
    would keep every page it touched in this process's resident memory: the whole test split)."""
    return np.concatenate([predict(batch) for batch in npy_batches(path, batch_size)])


def npy_batches(path: str | Path, batch_size: int) -> Iterator[np.ndarray]:
    with open(path, "rb") as fh:
        header = {(1, 0): np.lib.format.read_array_header_1_0}.get(np.lib.format.read_magic(fh),
                                                                  np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = header(fh)
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not written by medq")
        row = int(np.prod(shape[1:], dtype=np.int64))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            yield np.fromfile(fh, dtype=dtype, count=n * row).reshape(n, *shape[1:])


def _load(job: dict[str, Any]) -> tuple[np.ndarray, Callable, dict[str, Any]]:
    x = np.load(job["inputs"], mmap_mode="r")
    start = time.perf_counter()
    request = engines.LoadRequest(Path(job["model"]), job["input_name"], job["output_name"],
                                  job["intra_op_threads"], job["inter_op_threads"], job["options"])
    predict, facts = engines.open_engine(job["engine"], request)
    predict(np.ascontiguousarray(x[:1]))  # first run: graph optimisation / kernel compilation, not timed below
    facts["load_seconds"] = round(time.perf_counter() - start, 3)
    return x, predict, facts


def measure(job: dict[str, Any]) -> dict[str, Any]:
    x, predict, facts = _load(job)
    warmup = job["warmup"]
    latency_batches = make_batches(x, 1, warmup + job["latency_iterations"])
    latency = percentiles_ms(timed_calls(predict, latency_batches, warmup, job["latency_iterations"]))
    sweep = []
    for bs in job["batch_sizes"]:
        batches = make_batches(x, bs, job["throughput_iterations"])
        sweep.append(throughput(timed_calls(predict, batches, warmup, job["throughput_iterations"]), bs))
    start = time.perf_counter()
    probs = predict_all(predict, job["inputs"], job["batch_size"])
    with artifacts.atomic_path(job["probs"]) as tmp:
        np.save(tmp, probs)
    return {"engine_facts": facts, "latency_ms": latency, "sweep": sweep,
            "predict_seconds": round(time.perf_counter() - start, 3), "n_images": int(len(x))}


def instance(job: dict[str, Any]) -> dict[str, Any]:
    x, predict, facts = _load(job)
    bs = job["batch_size"]
    batches = make_batches(x, bs, job["throughput_iterations"])
    timed_calls(predict, batches, job["warmup"], 0)
    Path(job["ready"]).touch()
    deadline = clock() + GO_TIMEOUT
    while not Path(job["go"]).exists():
        if clock() > deadline:
            raise TimeoutError("the parent never signalled go")
        time.sleep(0.002)
    start = clock()
    times = timed_calls(predict, batches, 0, job["throughput_iterations"])
    end = clock()
    return {"engine_facts": facts, **throughput(times, bs), "start": start, "end": end,
            "images": bs * len(times)}


def prepare(job: dict[str, Any]) -> dict[str, Any]:
    from medq.benchmark.reference import prepare as build

    return {"built": build(job)}


KINDS = {"measure": measure, "instance": instance, "prepare": prepare}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m medq.benchmark.worker JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    if job.get("cpus"):
        os.sched_setaffinity(0, job["cpus"])  # before any runtime starts its thread pool
    engines.import_modules(job.get("engine_modules", ()))  # specs registered outside medq.engines
    result: dict[str, Any] = {"id": job.get("id"), "kind": job["kind"], "pid": os.getpid(),
                              "parent_pid": os.getppid(), "cpus": sorted(os.sched_getaffinity(0)),
                              "threads": thread_settings_in_force(),
                              "intra_op_threads": job.get("intra_op_threads"),
                              "inter_op_threads": job.get("inter_op_threads")}
    if job.get("inputs"):
        result["inputs_sha256"] = artifacts.sha256(job["inputs"])
    start = time.perf_counter()
    result.update(KINDS[job["kind"]](job))
    result["seconds"] = round(time.perf_counter() - start, 2)
    artifacts.write_json(job["result"], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
