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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medq import artifacts, hwinfo, runrecord
from medq.benchmark import plan, reference, report
from medq.errors import ConfigError, MedqError
from medq.data.cache import image_cache
from medq.progress import progress

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


def test_inputs(config: Any, manifest: dict[str, Any], index: Any, bench: Path) -> dict[str, Any]:
    """The test split, preprocessed once with the run's recorded preprocessing: every engine loads this file."""
    from medq.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_dict(manifest["preprocess"])
    paths = index.paths("test")
    if not paths:
        raise MedqError(f"{config.data.root}: the test split is empty; the benchmark measures the task metric on it")
    target = bench / INPUTS
    kept = write_inputs(paths, spec, target, image_cache(config, spec))
    if not len(kept):
        raise MedqError(f"{config.data.root}: no test image could be decoded; run `medq data check {config.data.root}`")
    labels = index.labels("test")[kept]
    recorded = manifest.get("stages", {}).get("train", {}).get("split_sizes", {}).get("test")
    return {"path": target, "sha256": artifacts.sha256(target), "n_images": int(len(kept)),
            "dropped": len(paths) - len(kept), "shape": [int(len(kept)), *spec.input_shape], "split": "test",
            "recorded_test_size": recorded, "labels": labels}


def recorded_deploy(manifest: dict[str, Any]) -> dict[str, Any]:
    """The deploy.yaml settings the run's INT8 graph was made with, as `medq quantize` recorded them ({} if none)."""
    return (manifest.get("stages", {}).get("quantize") or {}).get("deploy") or {}


def calibration_inputs(config: Any, manifest: dict[str, Any], index: Any, bench: Path) -> dict[str, Any]:
    """The calibration images of the reference INT8 models: the images `medq quantize` calibrates INC with (same
    deploy.yaml sampling size and seed, same stratified choice from the train split), else — without a usable
    deploy.yaml — a seeded sample of ``benchmark.calibration_images`` train images."""
    from medq.preprocess import PreprocessSpec

    spec = PreprocessSpec.from_dict(manifest["preprocess"])
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

def _check_settings(bc: Any) -> list[int]:
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
        "model": os.path.relpath(row.model, run_dir), "model_bytes": reference.model_bytes(row.model),
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


def _job(row: plan.Row, manifest: dict[str, Any], inputs: dict[str, Any], bc: Any, sizes: list[int],
         threads: int, inter: int, bench: Path) -> dict[str, Any]:
    return {"kind": "measure", "id": row.id, "engine": row.engine, "precision": row.precision, "model": str(row.model),
            "input_name": manifest.get("input_name", "input"), "output_name": manifest.get("output_name", "output"),
            **row.options, "intra_op_threads": threads, "inter_op_threads": inter, "inputs": str(inputs["path"]),
            "warmup": bc.warmup, "latency_iterations": bc.latency_iterations,
            "throughput_iterations": bc.throughput_iterations, "batch_size": bc.batch_size, "batch_sizes": sizes,
            "probs": str(bench / "probs" / f"{row.id}.npy")}


def _prepare_reference(rows: list[plan.Row], config: Any, manifest: dict[str, Any], index: Any, fp32_pb: Path,
                       bench: Path, env: dict[str, str], notes: list[str]) -> dict[str, str]:
    """Build (or reuse) the reference models; sets each row's model. Returns {row id: reason} for rows whose model
    could not be built."""
    wanted = {plan.REFERENCE_MODEL[r.id] for r in rows}
    ref_dir = bench / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    models = {name: ref_dir / reference.FILES[name] for name in reference.FILES}
    calibration = None
    if wanted & reference.NEEDS_CALIBRATION:
        calibration = calibration_inputs(config, manifest, index, bench)
        notes.append(f"reference INT8 calibration: {calibration['source']} (sha256 {calibration['sha256'][:12]})")
    cache_file = ref_dir / reference.CACHE
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    fp32_sha = artifacts.sha256(fp32_pb)
    keys = {name: reference.cache_key(name, fp32_sha, calibration and calibration["sha256"], config.benchmark.onnx_opset)
            for name in reference.needed(wanted)}
    build = [name for name, key in keys.items() if not (models[name].is_file() and cache.get(name) == key)]
    failures: dict[str, str] = {}
    if build:
        log.info("benchmark: building reference models %s (not timed)", ", ".join(build))
        job = {"kind": "prepare", "id": "prepare-reference", "build": build,
               "models": {k: str(v) for k, v in models.items()}, "fp32_pb": str(fp32_pb),
               "opset": config.benchmark.onnx_opset, "input_name": manifest.get("input_name", "input"),
               "output_name": manifest.get("output_name", "output"),
               "calibration": str(calibration["path"]) if calibration else None}
        try:
            built = run_worker(job, bench, env, config.benchmark.worker_timeout)["built"]
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
        name = plan.REFERENCE_MODEL[row.id]
        if name in failures or not models[name].is_file():
            skipped[row.id] = f"could not build the {name} model: {failures.get(name, 'missing')}"
        else:
            row.model = models[name]
    return skipped


def _measure_rounds(todo: list[plan.Row], manifest: dict[str, Any], inputs: dict[str, Any], bc: Any,
                    sizes: list[int], threads: int, inter: int, bench: Path, env: dict[str, str],
                    skipped: dict[str, str], verbose: bool) -> dict[str, list[dict[str, Any]]]:
    """``bc.repeats`` rounds; each round runs every row once, one process after another. A row whose worker fails
    is dropped (recorded in ``skipped``)."""
    measured: dict[str, list[dict[str, Any]]] = {row.id: [] for row in todo}
    with progress(total=bc.repeats * len(todo), desc="benchmark rows", unit="row") as bar:
        for round_ in range(bc.repeats):
            for i, row in enumerate(todo, 1):
                if row.id not in skipped:
                    _measure_row(i, round_, row, todo, (manifest, inputs, bc, sizes, threads, inter, bench, env),
                                 skipped, measured, verbose)
                bar.update(1)
    return {k: v for k, v in measured.items() if k not in skipped}


def _measure_row(i: int, round_: int, row: plan.Row, todo: list[plan.Row], job_args: tuple,
                 skipped: dict[str, str], measured: dict[str, list[dict[str, Any]]], verbose: bool) -> None:
    """One row's worker in one round: its result appended to ``measured``, or the row ``skipped`` if it failed."""
    manifest, inputs, bc, sizes, threads, inter, bench, env = job_args
    where = f"[{i}/{len(todo)}]" + (f" round {round_ + 1}/{bc.repeats}" if bc.repeats > 1 else "")
    log.info("benchmark %s %s: measuring %s", where, row.id, row.model.name)
    job = _job(row, manifest, inputs, bc, sizes, threads, inter, bench)
    if round_:
        job["id"] = f"{row.id}~{round_ + 1}"
    try:
        result = run_worker(job, bench, env, bc.worker_timeout)
    except WorkerError as exc:
        skipped[row.id] = f"failed: {exc}"
        log.error("benchmark: %s failed: %s", row.id, exc)
        return
    (log.info if verbose else log.debug)("benchmark: %s ran as pid %s: %s (log: %s)", row.id, result["pid"],
                                         " ".join(result["command"]), result["log"])
    measured[row.id].append(result)


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


def run_benchmark(config: Any, verbose: bool = False) -> dict[str, Any]:
    """Measure every precision path (and the reference engines) of the run, each in its own process; write
    benchmark.json, benchmark.md and benchmark.png into the run folder and return the benchmark.json content."""

    started = time.perf_counter()
    run_dir = config.run_dir
    with runrecord.writer_lock(run_dir, "benchmark"):
        return _run_benchmark(config, run_dir, started, verbose)


def _run_benchmark(config: Any, run_dir: Path, started: float, verbose: bool) -> dict[str, Any]:
    from medq.selection import objective

    fp32_pb = runrecord.verified_path(run_dir, "fp32_pb", config)
    manifest = runrecord.read_manifest(run_dir)
    missing = [k for k in ("preprocess", "task", "classes") if k not in manifest]
    if missing:
        raise MedqError(f"{run_dir / runrecord.MANIFEST}: no {', '.join(missing)} recorded; run "
                        f"`{runrecord.command(config, 'train')}` first")
    bc = config.benchmark
    sizes = _check_settings(bc)
    task, classes = manifest["task"], list(manifest["classes"])
    primary = objective(config, manifest)
    # every row decides at the run's thresholds (FP32's, chosen on validation): INT8 must not move the operating point
    from medq.thresholds import Thresholds

    operating = Thresholds.from_manifest(manifest, task, classes)
    features = hwinfo.cpu_features()
    load_before = os.getloadavg()
    int8_pb, int8_unusable = _int8_graph(run_dir, config)
    rows, skipped = plan.plan_rows(bc.precisions, bc.reference, features, fp32_pb, int8_pb)
    if int8_unusable:
        skipped = {k: (int8_unusable if v == plan.NO_INT8 else v) for k, v in skipped.items()}
    cores = int(features.get("physical_cores") or hwinfo.physical_cores())
    performance = plan.deploy_performance(recorded_deploy(manifest).get("path") or config.quantize.deploy)
    layouts, layout_skips = plan.plan_layouts(bc.instances, cores, performance)
    for row_id, reason in {**skipped, **{f"multi-instance {k}": v for k, v in layout_skips.items()}}.items():
        log.warning("benchmark: skipping %s: %s", row_id, reason)
    notes: list[str] = [f"thresholds: {n}" for n in operating.notes]
    if not features.get("vnni") and any(r.precision.startswith("int8") for r in rows):
        notes.append("the CPU has no VNNI: INT8 runs without its dot-product instructions, expect little speed-up")

    bench = run_dir / BENCH_DIR
    bench.mkdir(parents=True, exist_ok=True)
    index = runrecord.run_index(config, stage="benchmark")
    runrecord.check_classes(run_dir, manifest, index)
    inputs = test_inputs(config, manifest, index, bench)
    if inputs["recorded_test_size"] not in (None, len(index.paths("test"))):
        notes.append(f"the test split has {len(index.paths('test'))} images now, {inputs['recorded_test_size']} when "
                     "the model was trained: check data.root and run.seed")
    if inputs["dropped"]:
        notes.append(f"{inputs['dropped']} unreadable test images were dropped")
    thread_env = hwinfo.thread_environment(config.runtime)
    threads = int(thread_env["TF_NUM_INTRAOP_THREADS"])
    env = worker_env(thread_env)
    groups = plan.core_groups(allowed=os.sched_getaffinity(0))
    log.info("benchmark: %d test images (%s), %d rows, threads %s", inputs["n_images"],
             inputs["sha256"][:12], len(rows), thread_env["OMP_NUM_THREADS"])

    tf_rows = [r for r in rows if not r.reference]
    ref_rows = [r for r in rows if r.reference]
    if ref_rows:
        skipped.update(_prepare_reference(ref_rows, config, manifest, index, fp32_pb, bench, env, notes))
        ref_rows = [r for r in ref_rows if r.id not in skipped]
    todo = tf_rows + ref_rows
    measured = _measure_rounds(todo, manifest, inputs, bc, sizes, threads, config.runtime.inter_op_threads, bench,
                               env, skipped, verbose)
    results: list[dict[str, Any]] = []
    base_probs = None
    for i, row in enumerate(todo, 1):
        if not measured.get(row.id):
            continue
        entry = _row_entry(row, combine_rounds(measured[row.id]), run_dir, bc.batch_size)
        probs = np.load(bench / "probs" / f"{row.id}.npy")
        entry["metrics"] = _metrics(task, classes, inputs["labels"], probs, operating)
        entry["clinical"] = _clinical(task, classes, inputs["labels"], probs)
        if row.id == plan.BASELINE:
            base_probs = probs
        if base_probs is not None:  # the baseline is measured first: every other row is paired with it
            entry["fidelity"] = _fidelity(task, inputs["labels"], base_probs, probs, bc.equivalence_margin,
                                          operating)
        if not row.reference and row.precision in bc.instance_precisions:
            job = _job(row, manifest, inputs, bc, sizes, threads, config.runtime.inter_op_threads, bench)
            for layout in layouts:
                log.info("benchmark [%d/%d] %s: %d instance(s) x %d core(s)", i, len(todo), row.id,
                         layout.instances, layout.cores_per_instance)
                try:
                    entry["multi_instance"].append(
                        run_instances(job, layout, groups, bench, thread_env, bc.worker_timeout))
                except WorkerError as exc:
                    entry["multi_instance"].append({"layout": layout.name, "error": str(exc)})
                    log.error("benchmark: %s multi-instance %s failed: %s", row.id, layout.name, exc)
        results.append(entry)
        log.info("%s", _progress(i, len(todo), entry, primary))

    load_after = os.getloadavg()
    busy = max(load_before[0], load_after[0])
    if busy > cores + 0.5:  # the workers themselves account for about `cores`
        notes.append(f"the machine was busy (1-minute load average up to {busy:.1f} on {cores} cores): "
                     "absolute times are inflated and noisy; compare the ratios")
    out = {
        "schema": 1, "run": config.run.name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task": task, "classes": classes, "objective": primary, "baseline": plan.BASELINE,
        "thresholds": {"values": operating.values, "source": operating.source, "notes": operating.notes},
        "data_source": manifest.get("data_source"),
        "inputs": {k: (os.path.relpath(v, run_dir) if k == "path" else v) for k, v in inputs.items() if k != "labels"},
        "settings": {"warmup": bc.warmup, "latency_iterations": bc.latency_iterations,
                     "throughput_iterations": bc.throughput_iterations, "batch_size": bc.batch_size,
                     "batch_sizes": sizes, "repeats": bc.repeats, "equivalence_margin": bc.equivalence_margin,
                     "instances": [layout.name for layout in layouts],
                     "deploy_performance": performance or None},
        "environment": {"cpu": features, "thread_environment": thread_env,
                        "runtime": dataclasses.asdict(config.runtime), "versions": artifacts.package_versions(),
                        "platform": platform.platform(), "python": sys.executable,
                        "parent_pid": os.getpid(), "parent_cpus": sorted(os.sched_getaffinity(0)),
                        "load_average": {"before": list(load_before), "after": list(load_after)}},
        "results": results,
        "skipped": [{"id": k, "reason": v} for k, v in skipped.items()]
        + [{"id": f"multi-instance {k}", "reason": v} for k, v in layout_skips.items()],
        "notes": notes, "seconds": round(time.perf_counter() - started, 1),
    }
    report.add_comparisons(out)
    out = _clean(out)
    written = report.write_reports(runrecord.staging_dir(run_dir), out)
    runrecord.commit(run_dir, "benchmark", artifacts=written,
                     inputs=("fp32_pb", "split") + (("int8_pb",) if int8_pb is not None else ()),
                     rows=[r["id"] for r in results], skipped=out["skipped"], seconds=out["seconds"],
                     inputs_sha256=inputs["sha256"])
    return out


def _int8_graph(run_dir: Path, config: Any) -> tuple[Path | None, str | None]:
    """The run's INT8 graph if it may be measured, else (None, why not) — a stale or changed INT8 graph is a listed
    skip, never measured."""
    if runrecord.recorded_path(run_dir, "int8_pb") is None:
        return None, None
    try:
        return runrecord.verified_path(run_dir, "int8_pb", config), None
    except runrecord.RunError as exc:
        return None, str(exc)
