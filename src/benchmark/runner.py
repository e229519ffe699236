"""The benchmark stage: the parent process. It never imports an inference runtime; it preprocesses the test split
once, starts one worker process per row (one after another), computes the metrics from the probabilities the
workers write, and writes benchmark.json / benchmark.md / benchmark.png through medq.artifacts."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medq import artifacts, engines, hwinfo, runrecord
# Each sibling by its own name, not through the package (whose __init__ re-exports this module).
import medq.benchmark.plan as plan
import medq.benchmark.reference as reference
import medq.benchmark.report as report
from medq.config import BenchmarkConfig, Config
from medq.data import pinned
from medq.data.cache import image_cache
from medq.data.index import DatasetIndex
from medq.errors import ConfigError, MedqError
from medq.progress import progress
from medq.selection import objective
from medq.subgroups import Subgroups

if TYPE_CHECKING:
    from medq.thresholds import Thresholds

log = logging.getLogger("medq")

BENCH_DIR = "benchmark"  # inputs, jobs, worker logs, probabilities and reference models of the stage
INPUTS = "test_inputs.npy"
CALIBRATION = "calibration_inputs.npy"
PREPROCESS_CHUNK = 64


class WorkerError(Exception):
    """A worker process failed; the row is recorded as skipped with this message."""


# --- inputs -----------------------------------------------------------------------------------------------------

def write_inputs(paths: list[str], spec: Any, target: Path, cache: Any = None) -> np.ndarray:
    """Preprocess ``paths`` into ``target`` (.npy), chunk by chunk with plain writes, so that neither a large split
    nor a memory map of it ever sits in this process's memory; returns the indices of the files kept (unreadable
    files are dropped)."""
    from medq.tfdata import iter_split_arrays

    kept: list[int] = []
    with artifacts.atomic_path(target) as tmp:
        rows = tmp.with_name(tmp.name + ".rows")
        try:
            with open(rows, "wb") as fh:
                for x, k in iter_split_arrays(paths, spec, chunk=PREPROCESS_CHUNK, cache=cache):
                    fh.write(np.ascontiguousarray(x, dtype=np.float32).tobytes())
                    kept.extend(int(i) for i in k)
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": (len(kept), *spec.input_shape)}
            with open(tmp, "wb") as out, open(rows, "rb") as fh:
                np.lib.format.write_array_header_1_0(out, header)
                shutil.copyfileobj(fh, out, 1 << 22)
        finally:
            rows.unlink(missing_ok=True)
    return np.asarray(kept, dtype=int)


def test_inputs(config: Config, manifest: runrecord.Manifest, index: DatasetIndex, bench: Path) -> dict[str, Any]:
    """The test split, preprocessed once with the run's recorded preprocessing: every engine loads this file."""
    from medq.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_dict(manifest.facts.preprocess)
    paths = index.paths("test")
    if not paths:
        raise MedqError(f"{config.data.root}: the test split is empty; the benchmark measures the task metric on it")
    target = bench / INPUTS
    kept = write_inputs(paths, spec, target, image_cache(config, spec))
    if not len(kept):
        raise MedqError(f"{config.data.root}: no test image could be decoded; run `medq data check {config.data.root}`")
    labels = index.labels("test")[kept]
    recorded = manifest.stage(runrecord.TrainEntry).split_size("test")
    return {"path": target, "sha256": artifacts.sha256(target), "n_images": int(len(kept)),
            "dropped": len(paths) - len(kept), "shape": [int(len(kept)), *spec.input_shape], "split": "test",
            "recorded_test_size": recorded, "labels": labels,
            "subgroups": Subgroups.of(index, "test", config.subgroups).kept(kept)}


def recorded_deploy(manifest: runrecord.Manifest) -> dict[str, Any]:
    """The deploy.yaml settings the run's INT8 graph was made with, as `medq quantize` recorded them ({} if none)."""
    return manifest.stage(runrecord.QuantizeEntry).deploy or {}


def calibration_inputs(config: Config, manifest: runrecord.Manifest, index: DatasetIndex, bench: Path) -> dict[str, Any]:
    """The calibration images of the reference INT8 models: the images `medq quantize` calibrates INC with (same
    deploy.yaml sampling size and seed, same stratified choice from the train split), else — without a usable
    deploy.yaml — a seeded sample of ``benchmark.calibration_images`` train images."""
    from medq.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_dict(manifest.facts.preprocess)
    target = bench / CALIBRATION
    try:
        from medq.calibration import load_calibration
        from medq.inc.deploy import load_deploy

        used = recorded_deploy(manifest) or load_deploy(config.quantize.deploy).to_dict()
        x, _, paths = load_calibration(index, spec, used["sampling_sizes"], used["random_seed"],
                                       cache=image_cache(config, spec))
        source = (f"the INC calibration set: {len(paths)} train-split images chosen as `medq quantize` chose them "
                  f"({used['path']}: sampling_size {used['sampling_sizes']}, seed {used['random_seed']})")
        with artifacts.atomic_path(target) as tmp:
            np.save(tmp, x)
        n = len(paths)
    except (ImportError, MedqError) as exc:
        train = index.paths("train")
        n = min(config.benchmark.calibration_images, len(train))
        pick = np.sort(np.random.default_rng(config.run.seed).choice(len(train), n, replace=False))
        n = len(write_inputs([train[i] for i in pick], spec, target, image_cache(config, spec)))
        source = f"{n} train-split images sampled with seed {config.run.seed} (no INC calibration set: {exc})"
    return {"path": target, "sha256": artifacts.sha256(target), "n_images": n, "source": source}


# --- worker processes -------------------------------------------------------------------------------------------

def worker_command(job_path: Path) -> list[str]:
    return [sys.executable, "-m", "medq.benchmark.worker", str(job_path)]


def worker_env(thread_env: dict[str, str], **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(thread_env)
    env.update(overrides)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    return env


def _paths(bench: Path, name: str) -> dict[str, Path]:
    safe = name.replace("/", "_").replace("@", "_at_").replace("#", "_")
    paths = {"job": bench / "jobs" / f"{safe}.json", "result": bench / "results" / f"{safe}.json",
             "log": bench / "logs" / f"{safe}.log"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    paths["result"].unlink(missing_ok=True)
    return paths


def _tail(log_path: Path, lines: int = 3) -> str:
    try:
        text = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])[-600:]


def _start(job: dict[str, Any], bench: Path, env: dict[str, str]) -> tuple[subprocess.Popen, dict[str, Path]]:
    paths = _paths(bench, job["id"])
    job["result"] = str(paths["result"])
    artifacts.write_json(paths["job"], job)
    with open(paths["log"], "wb") as log_file:
        proc = subprocess.Popen(worker_command(paths["job"]), env=env, stdout=log_file, stderr=subprocess.STDOUT)
    return proc, paths


def _finish(proc: subprocess.Popen, paths: dict[str, Path]) -> dict[str, Any]:
    if proc.returncode != 0 or not paths["result"].is_file():
        raise WorkerError(f"worker exited with code {proc.returncode}: {_tail(paths['log'])} (log: {paths['log']})")
    result = json.loads(paths["result"].read_text())
    result["command"] = worker_command(paths["job"])
    result["log"] = str(paths["log"])
    return result


def run_worker(job: dict[str, Any], bench: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run one worker to completion (nothing else measuring meanwhile) and return its result JSON."""
    proc, paths = _start(job, bench, env)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise WorkerError(f"worker timed out after {timeout:.0f} s (benchmark.worker_timeout; log: {paths['log']})")
    finally:  # an interrupted or terminated parent leaves no worker behind (SIGTERM reaches the parent only)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return _finish(proc, paths)


def run_instances(job: dict[str, Any], layout: plan.Layout, groups: list[list[int]], bench: Path,
                  thread_env: dict[str, str], timeout: float) -> dict[str, Any]:
    """The deliberate concurrent measurement: ``layout.instances`` workers, each pinned to its own cores; all load
    and warm up, then the parent releases them together and the aggregate throughput is the sum of theirs."""
    c = layout.cores_per_instance
    env = worker_env(thread_env, OMP_NUM_THREADS=str(c), TF_NUM_INTRAOP_THREADS=str(c))
    sync = bench / "sync"
    sync.mkdir(parents=True, exist_ok=True)
    go = sync / f"{job['id']}-{layout.name}.go"
    go.unlink(missing_ok=True)
    started: list[tuple[subprocess.Popen, dict[str, Path], Path]] = []
    deadline = time.monotonic() + timeout
    try:
        for i, cpus in enumerate(plan.instance_cpus(layout, groups)):
            ready = sync / f"{job['id']}-{layout.name}-{i}.ready"
            ready.unlink(missing_ok=True)
            instance_job = job | {"kind": "instance", "id": f"{job['id']}@{layout.name}#{i}", "cpus": cpus,
                                  "intra_op_threads": c, "ready": str(ready), "go": str(go)}
            proc, paths = _start(instance_job, bench, env)
            started.append((proc, paths, ready))
        while not all(ready.exists() for _, _, ready in started):
            failed = [(p, paths) for p, paths, _ in started if p.poll() is not None]
            if failed:
                raise WorkerError(f"an instance exited during loading: {_tail(failed[0][1]['log'])}")
            if time.monotonic() > deadline:
                raise WorkerError(f"instances did not load within {timeout:.0f} s")
            time.sleep(0.05)
        go.touch()
        results = []
        for proc, paths, _ in started:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            results.append(_finish(proc, paths))
    except subprocess.TimeoutExpired:
        raise WorkerError(f"instances timed out after {timeout:.0f} s (benchmark.worker_timeout)") from None
    finally:
        for proc, _, ready in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            ready.unlink(missing_ok=True)
        go.unlink(missing_ok=True)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"layout": layout.name, "instances": layout.instances, "cores_per_instance": c, "source": layout.source,
            "batch_size": job["batch_size"], "throughput_ips": float(sum(r["throughput_ips"] for r in results)),
            "wall_throughput_ips": float(sum(r["images"] for r in results) / span) if span > 0 else None,
            "per_instance_ips": [float(r["throughput_ips"]) for r in results],
            "per_instance_p50_ms": [r["batch_latency_ms"]["p50"] for r in results],
            "cpus": [r["cpus"] for r in results], "pids": [r["pid"] for r in results],
            "inputs_sha256": sorted({r.get("inputs_sha256") for r in results})}


# --- the stage --------------------------------------------------------------------------------------------------

def _check_settings(bc: BenchmarkConfig) -> list[int]:
    if bc.warmup < 0:
        raise ConfigError(f"benchmark.warmup: must be 0 or more, got {bc.warmup}")
    sizes = sorted(set(bc.batch_sizes) | {bc.batch_size})
    if any(b <= 0 for b in sizes):
        raise ConfigError(f"benchmark.batch_sizes: every batch size must be greater than 0, got {bc.batch_sizes}")
    if bc.repeats <= 0:
        raise ConfigError(f"benchmark.repeats: must be greater than 0, got {bc.repeats}")
    if bc.calibration_images <= 0:
        raise ConfigError(f"benchmark.calibration_images: must be greater than 0, got {bc.calibration_images}")
    if not 0 < bc.equivalence_margin < 0.5:
        raise ConfigError(f"benchmark.equivalence_margin: an AUC difference between 0 and 0.5 (e.g. 0.005), got "
                          f"{bc.equivalence_margin}")
    return sizes


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf → None, numpy scalars → Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _row_entry(row: plan.Row, result: dict[str, Any], run_dir: Path, main_bs: int) -> dict[str, Any]:
    sweep = {int(s["batch_size"]): s for s in result["sweep"]}
    return {
        "id": row.id, "engine": row.engine, "precision": row.precision,
        "model": os.path.relpath(row.model, run_dir),
        "model_bytes": reference.model_bytes(row.model, row.recipe),
        "options": row.options,
        "latency_ms": result["latency_ms"], "batch_size": main_bs, "throughput_ips": sweep[main_bs]["throughput_ips"],
        "throughput_mean_ips": sweep[main_bs].get("throughput_mean_ips"),
        "throughput_by_batch": {str(b): s["throughput_ips"] for b, s in sorted(sweep.items())},
        "batch_latency_p50_ms": {str(b): s["batch_latency_ms"]["p50"] for b, s in sorted(sweep.items())},
        "multi_instance": [], "pid": result["pid"], "parent_pid": result["parent_pid"],
        "inputs_sha256": result["inputs_sha256"], "cpus": result["cpus"], "threads": result["threads"],
        "intra_op_threads": result["intra_op_threads"], "inter_op_threads": result["inter_op_threads"],
        "engine_facts": result["engine_facts"], "seconds": result["seconds"], "rounds": result.get("rounds", []),
        "log": os.path.relpath(result["log"], run_dir), "command": result["command"],
    }


def _metrics(task: str, classes: list[str], labels: np.ndarray, probs: np.ndarray,
             operating: Thresholds) -> dict[str, Any]:
    from medq.metrics import task_metrics
    from medq.thresholds import held

    return _clean(task_metrics(task, labels, probs, classes, operating.per_column())
                  | {"operating_points": held(operating, labels, probs)})


def _clinical(task: str, classes: list[str], labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    from medq.metrics import clinical_metrics

    return _clean(clinical_metrics(task, labels, probs, classes))


def _fidelity(task: str, labels: np.ndarray, base: np.ndarray, probs: np.ndarray, margin: float,
              operating: Thresholds) -> dict[str, Any]:
    """The row against TF FP32 on the same images (:func:`medq.metrics.paired_comparison`), decisions at the run's
    thresholds."""
    from medq.metrics import paired_comparison

    return _clean(paired_comparison(task, labels, base, probs, margin, operating.per_column()))


@dataclass
class Measuring:
    """What every measuring worker of the stage shares: the run's facts, the test inputs, the settings, the thread
    settings and CPU groups, where jobs and logs go and the workers' environment."""

    manifest: runrecord.Manifest
    inputs: dict[str, Any]  # test_inputs(): path, sha256, labels, ...
    settings: BenchmarkConfig
    sizes: list[int]  # the throughput sweep's batch sizes
    thread_env: dict[str, str]
    inter_op_threads: int
    groups: list[list[int]]  # logical CPUs by physical core, for pinned instances
    bench: Path
    verbose: bool = False
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.env = worker_env(self.thread_env)

    @property
    def threads(self) -> int:
        return int(self.thread_env["TF_NUM_INTRAOP_THREADS"])

    def job(self, row: plan.Row) -> dict[str, Any]:
        bc = self.settings
        return {"kind": "measure", "id": row.id, "engine": row.engine,
                "engine_modules": [engines.get(row.engine).module], "precision": row.precision, "model": str(row.model),
                "input_name": self.manifest.facts.tensor_names()[0],
                "output_name": self.manifest.facts.tensor_names()[1], "options": row.options,
                "intra_op_threads": self.threads, "inter_op_threads": self.inter_op_threads,
                "inputs": str(self.inputs["path"]), "warmup": bc.warmup, "latency_iterations": bc.latency_iterations,
                "throughput_iterations": bc.throughput_iterations, "batch_size": bc.batch_size,
                "batch_sizes": self.sizes, "probs": str(self.probs(row))}

    def probs(self, row: plan.Row) -> Path:
        return self.bench / "probs" / f"{row.id}.npy"


def _build_models(rows: list[plan.Row], config: Config, index: DatasetIndex, run_models: dict[str, Path | None],
                  measuring: Measuring, notes: list[str]) -> dict[str, str]:
    """Build (or reuse) the models the rows run that engines make from the run's graphs (their recipes); sets each
    such row's model. Returns {row id: reason} for rows whose model could not be built."""
    wanted = {r.recipe for r in rows if r.recipe}
    if not wanted:
        return {}
    chain = engines.recipe_chain(wanted)
    ref_dir = measuring.bench.parent / engines.REFERENCE_DIR  # where `medq serve --engine` finds them
    ref_dir.mkdir(parents=True, exist_ok=True)
    models = {name: ref_dir / engines.recipe(name).file for name in chain}
    calibration = None
    if any(engines.recipe(name).calibrated for name in chain):
        calibration = calibration_inputs(config, measuring.manifest, index, measuring.bench)
        notes.append(f"reference INT8 calibration: {calibration['source']} (sha256 {calibration['sha256'][:12]})")
    cache_file = ref_dir / engines.CACHE
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    roots = {engines.root_artifact(name) for name in chain}
    shas = {key: artifacts.sha256(run_models[key]) for key in sorted(roots)}
    keys = {name: engines.cache_key(name, shas[engines.root_artifact(name)],
                                    calibration and calibration["sha256"], config.benchmark.onnx_opset)
            for name in chain}
    build = [name for name, key in keys.items() if not (models[name].is_file() and cache.get(name) == key)]
    failures: dict[str, str] = {}
    if build:
        log.info("benchmark: building reference models %s (not timed)", ", ".join(build))
        job = {"kind": "prepare", "id": "prepare-reference", "build": build,
               "engine_modules": sorted({engines.get(r.engine).module for r in rows}),
               "models": {k: str(v) for k, v in models.items()},
               "sources": {k: str(run_models[k]) for k in sorted(roots)}, "opset": config.benchmark.onnx_opset,
               "input_name": measuring.manifest.facts.tensor_names()[0],
               "output_name": measuring.manifest.facts.tensor_names()[1],
               "calibration": str(calibration["path"]) if calibration else None}
        try:
            built = run_worker(job, measuring.bench, measuring.env, config.benchmark.worker_timeout)["built"]
        except WorkerError as exc:
            built = {name: {"ok": False, "error": str(exc)} for name in build}
        for name, outcome in built.items():
            if outcome["ok"]:
                cache[name] = keys[name]
            else:
                cache.pop(name, None)
                failures[name] = outcome["error"]
        artifacts.write_json(cache_file, cache)
    skipped = {}
    for row in rows:
        if row.recipe is None:
            continue
        if row.recipe in failures or not models[row.recipe].is_file():
            skipped[row.id] = f"could not build the {row.recipe} model: {failures.get(row.recipe, 'missing')}"
        else:
            row.model = models[row.recipe]
    return skipped


def _measure_rounds(todo: list[plan.Row], measuring: Measuring, skipped: dict[str, str]
                    ) -> dict[str, list[dict[str, Any]]]:
    """``benchmark.repeats`` rounds; each round runs every row once, one process after another. A row whose worker
    fails is dropped (recorded in ``skipped``)."""
    measured: dict[str, list[dict[str, Any]]] = {row.id: [] for row in todo}
    repeats = measuring.settings.repeats
    with progress(total=repeats * len(todo), desc="benchmark rows", unit="row") as bar:
        for round_ in range(repeats):
            for i, row in enumerate(todo, 1):
                if row.id not in skipped:
                    where = f"[{i}/{len(todo)}]" + (f" round {round_ + 1}/{repeats}" if repeats > 1 else "")
                    result = _measure_row(row, round_, where, measuring)
                    if isinstance(result, str):
                        skipped[row.id] = result
                    else:
                        measured[row.id].append(result)
                bar.update(1)
    return {k: v for k, v in measured.items() if k not in skipped}


def _measure_row(row: plan.Row, round_: int, where: str, measuring: Measuring) -> dict[str, Any] | str:
    """One row's worker in one round: its result, or why it failed."""
    log.info("benchmark %s %s: measuring %s", where, row.id, row.model.name)
    job = measuring.job(row)
    if round_:
        job["id"] = f"{row.id}~{round_ + 1}"
    try:
        result = run_worker(job, measuring.bench, measuring.env, measuring.settings.worker_timeout)
    except WorkerError as exc:
        log.error("benchmark: %s failed: %s", row.id, exc)
        return f"failed: {exc}"
    (log.info if measuring.verbose else log.debug)("benchmark: %s ran as pid %s: %s (log: %s)", row.id, result["pid"],
                                                   " ".join(result["command"]), result["log"])
    return result


def combine_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several rounds of the same row: the median of each latency figure and each throughput; the
    rounds themselves are kept under ``rounds``."""
    first = dict(results[0])
    first["rounds"] = [{"pid": r["pid"], "inputs_sha256": r["inputs_sha256"], "latency_p50_ms": r["latency_ms"]["p50"],
                        "throughput_ips": {str(s["batch_size"]): s["throughput_ips"] for s in r["sweep"]}}
                       for r in results]
    if len(results) == 1:
        return first

    def median(values: list[float]) -> float:
        return float(np.median(values))

    first["latency_ms"] = {k: median([r["latency_ms"][k] for r in results]) for k in first["latency_ms"]}
    first["sweep"] = [{**s, **{k: median([r["sweep"][j][k] for r in results])
                               for k in ("throughput_ips", "throughput_mean_ips")},
                       "batch_latency_ms": {k: median([r["sweep"][j]["batch_latency_ms"][k] for r in results])
                                            for k in s["batch_latency_ms"]}}
                      for j, s in enumerate(first["sweep"])]
    first["seconds"] = round(sum(r["seconds"] for r in results), 2)
    return first


def _progress(i: int, n: int, entry: dict[str, Any], primary: str) -> str:
    metric = entry["metrics"].get(primary)
    metric_text = f", {primary} {metric:.4f}" if isinstance(metric, float) else ""
    return (f"benchmark [{i}/{n}] {entry['id']}: p50 {entry['latency_ms']['p50']:.2f} ms, "
            f"{entry['throughput_ips']:.1f} img/s at batch {entry['batch_size']}{metric_text} ({entry['seconds']:.0f} s)")


def run_benchmark(config: Config, verbose: bool = False) -> dict[str, Any]:
    """Measure every precision path (and the reference engines) of the run, each in its own process; write
    benchmark.json, benchmark.md and benchmark.png into the run folder and return the benchmark.json content."""

    started = time.perf_counter()
    run_dir = config.run_dir
    with runrecord.writer_lock(run_dir, "benchmark"):
        return _run_benchmark(config, run_dir, started, verbose)


@dataclass
class StagePlan:
    """What the stage will measure and what it skips, decided before anything runs."""

    rows: list[plan.Row]
    skipped: dict[str, str]  # row id → reason (measuring failures are added later)
    layouts: list[plan.Layout]
    layout_skips: dict[str, str]
    features: dict[str, Any]  # hwinfo.cpu_features()
    cores: int
    performance: dict[str, Any]  # the deploy.yaml's evaluation.performance
    run_models: dict[str, Path | None]  # fp32_pb, int8_pb (None: absent or unusable)
    notes: list[str]


def _run_benchmark(config: Config, run_dir: Path, started: float, verbose: bool) -> dict[str, Any]:
    fp32_pb = runrecord.verified_path(run_dir, "fp32_pb", config)
    manifest = runrecord.read_manifest(run_dir)
    missing = manifest.facts.missing("preprocess", "task", "classes")
    if missing:
        raise MedqError(f"{run_dir / runrecord.MANIFEST}: no {', '.join(missing)} recorded; run "
                        f"`{runrecord.command(config, 'train')}` first")
    sizes = _check_settings(config.benchmark)
    # every row decides at the run's thresholds (FP32's, chosen on validation): INT8 must not move the operating point
    from medq.thresholds import Thresholds

    operating = Thresholds.from_manifest(manifest, manifest.facts.task, list(manifest.facts.classes))
    load_before = os.getloadavg()
    stage = _plan(config, run_dir, manifest, fp32_pb)
    stage.notes[:0] = [f"thresholds: {n}" for n in operating.notes]

    bench = run_dir / BENCH_DIR
    bench.mkdir(parents=True, exist_ok=True)
    index = pinned.run_index(config, stage="benchmark")
    runrecord.check_classes(run_dir, manifest, index)
    inputs = test_inputs(config, manifest, index, bench)
    if inputs["recorded_test_size"] not in (None, len(index.paths("test"))):
        stage.notes.append(f"the test split has {len(index.paths('test'))} images now, {inputs['recorded_test_size']} "
                           "when the model was trained: check data.root and run.seed")
    if inputs["dropped"]:
        stage.notes.append(f"{inputs['dropped']} unreadable test images were dropped")
    measuring = Measuring(manifest, inputs, config.benchmark, sizes, hwinfo.thread_environment(config.runtime),
                          config.runtime.inter_op_threads, plan.core_groups(allowed=os.sched_getaffinity(0)), bench,
                          verbose)
    log.info("benchmark: %d test images (%s), %d rows, threads %s", inputs["n_images"],
             inputs["sha256"][:12], len(stage.rows), measuring.thread_env["OMP_NUM_THREADS"])

    own_rows = [r for r in stage.rows if not r.reference]
    ref_rows = [r for r in stage.rows if r.reference]
    if ref_rows:
        stage.skipped.update(_build_models(ref_rows, config, index, stage.run_models, measuring, stage.notes))
        ref_rows = [r for r in ref_rows if r.id not in stage.skipped]
    todo = own_rows + ref_rows
    measured = _measure_rounds(todo, measuring, stage.skipped)
    results = _results(todo, measured, measuring, stage.layouts, objective(config, manifest), run_dir, operating)

    load_after = os.getloadavg()
    busy = max(load_before[0], load_after[0])
    if busy > stage.cores + 0.5:  # the workers themselves account for about `cores`
        stage.notes.append(f"the machine was busy (1-minute load average up to {busy:.1f} on {stage.cores} cores): "
                           "absolute times are inflated and noisy; compare the ratios")
    out = _report(config, manifest, stage, measuring, results, (load_before, load_after), started, operating)
    written = report.write_reports(runrecord.staging_dir(run_dir), out)
    runrecord.commit(run_dir, "benchmark", artifacts=written,
                     inputs=("fp32_pb", "split") + (("int8_pb",) if stage.run_models["int8_pb"] is not None else ()),
                     rows=[r["id"] for r in results], skipped=out["skipped"], seconds=out["seconds"],
                     inputs_sha256=inputs["sha256"])
    return out


def _plan(config: Config, run_dir: Path, manifest: runrecord.Manifest, fp32_pb: Path) -> StagePlan:
    """The rows and layouts to measure, with every skip logged; a stale or changed INT8 graph is a listed skip."""
    bc = config.benchmark
    features = hwinfo.cpu_features()
    int8_pb, int8_unusable = _int8_graph(run_dir, config)
    rows, skipped = plan.plan_rows(bc.precisions, bc.reference, features, fp32_pb, int8_pb)
    if int8_unusable:
        skipped = {k: (int8_unusable if v == plan.NO_INT8 else v) for k, v in skipped.items()}
    cores = int(features.get("physical_cores") or hwinfo.physical_cores())
    performance = plan.deploy_performance(recorded_deploy(manifest).get("path") or config.quantize.deploy)
    layouts, layout_skips = plan.plan_layouts(bc.instances, cores, performance)
    for row_id, reason in {**skipped, **{f"multi-instance {k}": v for k, v in layout_skips.items()}}.items():
        log.warning("benchmark: skipping %s: %s", row_id, reason)
    notes: list[str] = []
    if not features.get("vnni") and any(r.precision.startswith("int8") for r in rows):
        notes.append("the CPU has no VNNI: INT8 runs without its dot-product instructions, expect little speed-up")
    return StagePlan(rows, skipped, layouts, layout_skips, features, cores, performance,
                     {"fp32_pb": fp32_pb, "int8_pb": int8_pb}, notes)


def _results(todo: list[plan.Row], measured: dict[str, list[dict[str, Any]]], measuring: Measuring,
             layouts: list[plan.Layout], primary: str, run_dir: Path, operating: Thresholds) -> list[dict[str, Any]]:
    """benchmark.json's rows: each measured row's combined rounds, metrics, clinical numbers, fidelity against the
    baseline (measured first) and its multi-instance layouts; every row decides at ``operating``."""
    task, classes, labels = measuring.manifest.facts.task, list(measuring.manifest.facts.classes), measuring.inputs["labels"]
    bc = measuring.settings
    results: list[dict[str, Any]] = []
    base_probs = None
    for i, row in enumerate(todo, 1):
        if not measured.get(row.id):
            continue
        entry = _row_entry(row, combine_rounds(measured[row.id]), run_dir, bc.batch_size)
        probs = np.load(measuring.probs(row))
        entry["metrics"] = _metrics(task, classes, labels, probs, operating)
        entry["clinical"] = _clinical(task, classes, labels, probs)
        if row.id == plan.BASELINE:
            base_probs = probs
        if measuring.inputs.get("subgroups") is not None:  # each subgroup paired with the baseline's predictions
            entry["subgroups"] = _clean(measuring.inputs["subgroups"].table(
                task, classes, labels, probs, operating, None if row.id == plan.BASELINE else base_probs))
        if base_probs is not None:  # the baseline is measured first: every other row is paired with it
            entry["fidelity"] = _fidelity(task, labels, base_probs, probs, bc.equivalence_margin, operating)
        if not row.reference and row.precision in bc.instance_precisions:
            entry["multi_instance"] = [_multi_instance(row, layout, measuring, f"[{i}/{len(todo)}]")
                                       for layout in layouts]
        results.append(entry)
        log.info("%s", _progress(i, len(todo), entry, primary))
    return results


def _multi_instance(row: plan.Row, layout: plan.Layout, measuring: Measuring, where: str) -> dict[str, Any]:
    log.info("benchmark %s %s: %d instance(s) x %d core(s)", where, row.id, layout.instances,
             layout.cores_per_instance)
    try:
        return run_instances(measuring.job(row), layout, measuring.groups, measuring.bench, measuring.thread_env,
                             measuring.settings.worker_timeout)
    except WorkerError as exc:
        log.error("benchmark: %s multi-instance %s failed: %s", row.id, layout.name, exc)
        return {"layout": layout.name, "error": str(exc)}


def _report(config: Config, manifest: runrecord.Manifest, stage: StagePlan, measuring: Measuring,
            results: list[dict[str, Any]], load: tuple[tuple[float, ...], tuple[float, ...]],
            started: float, operating: Thresholds) -> dict[str, Any]:
    """benchmark.json's content, with the comparisons against the baseline, JSON-safe."""
    bc, inputs, run_dir = config.benchmark, measuring.inputs, config.run_dir
    out = {
        "schema": 1, "run": config.run.name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": manifest.facts.task, "classes": list(manifest.facts.classes), "objective": objective(config, manifest),
        "baseline": plan.BASELINE,
        "thresholds": {"values": operating.values, "source": operating.source, "notes": operating.notes},
        "data_source": manifest.facts.data_source,
        "inputs": {k: (os.path.relpath(v, run_dir) if k == "path" else v) for k, v in inputs.items()
                   if k not in ("labels", "subgroups")},
        "settings": {"warmup": bc.warmup, "latency_iterations": bc.latency_iterations,
                     "throughput_iterations": bc.throughput_iterations, "batch_size": bc.batch_size,
                     "batch_sizes": measuring.sizes, "repeats": bc.repeats, "equivalence_margin": bc.equivalence_margin,
                     "instances": [layout.name for layout in stage.layouts],
                     "deploy_performance": stage.performance or None},
        "environment": {"cpu": stage.features, "thread_environment": measuring.thread_env,
                        "runtime": dataclasses.asdict(config.runtime),
                        "versions": artifacts.package_versions(engines.version_keys()),
                        "platform": platform.platform(), "python": sys.executable,
                        "parent_pid": os.getpid(), "parent_cpus": sorted(os.sched_getaffinity(0)),
                        "load_average": {"before": list(load[0]), "after": list(load[1])}},
        "results": results,
        "skipped": [{"id": k, "reason": v} for k, v in stage.skipped.items()]
        + [{"id": f"multi-instance {k}", "reason": v} for k, v in stage.layout_skips.items()],
        "notes": stage.notes, "seconds": round(time.perf_counter() - started, 1),
    }
    report.add_comparisons(out)
    return _clean(out)


def _int8_graph(run_dir: Path, config: Config) -> tuple[Path | None, str | None]:
    """The run's INT8 graph if it may be measured, else (None, why not) — a stale or changed INT8 graph is a listed
    skip, never measured."""
    if runrecord.recorded_path(run_dir, "int8_pb") is None:
        return None, None
    try:
        return runrecord.verified_path(run_dir, "int8_pb", config), None
    except runrecord.RunError as exc:
        return None, str(exc)
