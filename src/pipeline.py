"""The data stage and `medq run`: every stage in order, each reading the previous stage's output from the run folder."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

from medq import artifacts, runrecord
from medq.config import builtin_data_root
from medq.data.common import PHANTOM_MARKER, data_source
from medq.data.index import DatasetIndex
from medq.errors import DataError

log = logging.getLogger("medq")

# What each phantom kind stands in for: named when a dataset folder is missing outside the built-in location.
EXPECTED_LAYOUT = {
    "chest-pneumonia": "the Kaggle chest_xray folder (train/ and test/, each with NORMAL/ and PNEUMONIA/)",
    "chest-multilabel": "the NIH ChestX-ray14 folder (Data_Entry_2017.csv and images_*/images/*.png)",
    "rsna-dicom": "the RSNA challenge folder (stage_2_train_images/*.dcm and stage_2_detailed_class_info.csv)",
    "busi": "the Dataset_BUSI_with_GT folder (benign/, malignant/, normal/)",
}
VERIFY_ALL_UP_TO = 5000  # decode every file up front when the dataset is this small; larger ones skip lazily


def ensure_phantoms(config: Any, phantoms: bool = False) -> bool:
    """Generate the built-in phantom dataset at ``data.root`` when it is missing (or was generated differently).

    A missing folder is generated only where the user clearly asked for phantoms: the config's built-in location
    (:func:`medq.config.builtin_data_root`) or anywhere with ``phantoms`` (`--phantoms`); elsewhere it is a
    DataError saying what was expected there, so a mistyped path never trains on synthetic data. Only a folder
    medq generated itself (it carries a marker file) is ever replaced; a user's data never is.
    Returns True when it generated.
    """
    root = Path(config.data.root)
    with runrecord.folder_lock(root, "phantoms"):  # two data stages must not generate into one folder at once
        return _ensure_phantoms(config, root, phantoms)


def _asked_for_phantoms(config: Any, root: Path, phantoms: bool) -> bool:
    builtin = builtin_data_root(config)
    return phantoms or (builtin is not None and builtin.resolve() == root.resolve())


def _ensure_phantoms(config: Any, root: Path, phantoms: bool) -> bool:
    from medq.data.phantoms import generate_phantoms

    params = asdict(config.data.phantom)
    marker = root / PHANTOM_MARKER
    if root.exists():
        if not marker.is_file():
            return False  # the user's own dataset
        if _read_marker(marker) == params:
            return False
        log.info("phantom settings changed: regenerating %s", root)
        shutil.rmtree(root)
    elif not config.data.generate:
        raise DataError(f"{root}: dataset folder not found; set data.root (or DATA_DIR) to your dataset, "
                        "or data.generate: true for the built-in phantoms")
    elif not _asked_for_phantoms(config, root, phantoms):
        expected = EXPECTED_LAYOUT.get(config.data.phantom.kind, "your dataset")
        raise DataError(f"{root}: dataset folder not found; expected {expected} there — check data.root (or "
                        "DATA_DIR) for a typo, or pass --phantoms to generate synthetic phantoms there")
    start = time.perf_counter()
    p = config.data.phantom
    # Generated beside root and renamed into place when complete: an interrupted generation leaves no half
    # dataset at root that a later run would take for the user's own.
    partial = root.parent / f".{root.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    counts = generate_phantoms(p.kind, partial, n_train=p.n_train, n_val=p.n_val, n_test=p.n_test, size=p.size,
                               seed=p.seed)
    artifacts.write_json(partial / PHANTOM_MARKER, params)
    partial.rename(root)
    counts["root"] = str(root)
    log.info("generated %s phantoms in %s (%.1f s): %s", p.kind, root, time.perf_counter() - start, counts)
    return True


def _read_marker(marker: Path) -> Any:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None  # damaged: medq's own folder all the same, so it is regenerated


def run_data(config: Any, resplit: bool = False, phantoms: bool = False) -> DatasetIndex:
    """Stage 1: make sure the dataset is there (``phantoms``: generate it wherever data.root points), read it,
    report counts, skips and patient overlap, and pin the run's split (``resplit``: split the current dataset
    again, which makes the run's models stale)."""
    from medq.data import pinned
    from medq.data.check import note_pixel_range, verify_images
    from medq.data.cache import cache_root
    from medq.data.readers import class_warnings, read_dataset

    ensure_phantoms(config, phantoms)
    with runrecord.writer_lock(config.run_dir, "data"):
        index = read_dataset(config.data, seed=config.run.seed, cache_root=cache_root(config))
        if sum(len(v) for v in index.splits.values()) <= VERIFY_ALL_UP_TO:
            index = verify_images(index, strict=config.data.strict, max_megapixels=config.data.max_megapixels,
                                  bit_depth=config.data.bit_depth)
        index = pinned.run_index(config, index, resplit=resplit, stage="data")
        source = data_source(config.data.root, index.format)
        log.info("data: %s at %s", source, config.data.root)
        for note in index.notes:
            log.info("%s", note)
        note_pixel_range(index, config.data.bit_depth, config.run.seed)
        for split, samples in index.splits.items():
            log.info("%-5s %5d images  %s", split, len(samples), index.counts(split))
        if index.skipped:
            log.warning("skipped %d unreadable files (first: %s — %s)", len(index.skipped), *index.skipped[0])
        overlap = index.patient_overlap()
        if any(overlap.values()):
            log.warning("patients shared between splits: %s", overlap)
        warnings = class_warnings(index)
        for warning in warnings:
            log.warning("%s", warning)
        runrecord.commit(
            config.run_dir, "data", config=config, facts={"data_source": source},
            format=index.format, task=index.task, classes=index.classes,
            split_sizes={k: len(v) for k, v in index.splits.items()},
            class_counts={k: index.counts(k) for k in index.splits}, patient_overlap=overlap,
            skipped=[{"path": p, "reason": r} for p, r in index.skipped], notes=index.notes, warnings=warnings,
        )
    return index


def build_cache(config: Any, index: DatasetIndex) -> dict[str, Any]:
    """`medq data --cache`: decode every image of the run's split once into the image cache, in threads, at the
    input size (and at train.low_res's); an interrupted build resumes where it stopped (entries are complete files)."""
    from concurrent.futures import ThreadPoolExecutor

    from medq.data.cache import image_cache
    from medq.data.decode import UnreadableImage
    from medq.preprocess import PreprocessSpec
    from medq.progress import progress

    spec = PreprocessSpec.from_config(config)
    specs = [spec] + ([replace(spec, image_size=config.train.low_res.image_size)] if config.train.low_res.epochs
                      else [])
    paths = [p for split in ("train", "val", "test") for p in index.paths(split)]
    facts: dict[str, Any] = {}
    for each in specs:
        cache = image_cache(config, each)
        if cache is None:
            raise DataError("medq data --cache: data.cache is false; set data.cache: true to use the image cache")
        cache.check_space(paths, channels=each.channels)

        def fill(path: str) -> None:
            try:
                cache.get(path)
            except UnreadableImage:
                pass  # listed by `medq data check`; the stages drop it and count it

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool, \
                progress(total=len(paths), desc=f"cache {each.image_size}px", unit="img") as bar:
            for _ in pool.map(fill, paths):
                bar.update(1)
        seconds = time.perf_counter() - start
        rate = len(paths) / seconds if seconds else float("inf")
        log.info("%s; %.0f images/s", cache.summary(), rate)
        facts[f"{each.image_size}px"] = {"folder": str(cache.folder), "images": len(paths),
                                         "decoded": cache.stats.misses + cache.stats.rebuilt,
                                         "images_per_second": round(rate, 1)}
    return facts


def run_all(config: Any, verbose: bool = False, phantoms: bool = False) -> dict[str, Any]:
    """`medq run`: data → train → tune → freeze → quantize → benchmark; returns the benchmark report."""
    with runrecord.writer_lock(config.run_dir, "run"):
        return _run_stages(config, verbose, phantoms)


def _run_stages(config: Any, verbose: bool, phantoms: bool) -> dict[str, Any]:
    from medq.benchmark import run_benchmark
    from medq.freeze import run_freeze
    from medq.quantize import run_quantize
    from medq.train import run_train
    from medq.tune import run_tune

    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        log.info("── %s ──", name)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 1)
        log.info("%s done in %.1f s", name, timings[name])
        return result

    index = timed("data", run_data, config, phantoms=phantoms)
    timed("train", run_train, config, index=index, verbose=2 if verbose else 0)
    if config.tune.enabled:
        timed("tune", run_tune, config, index=index)
    timed("freeze", run_freeze, config)
    timed("quantize", run_quantize, config, verbose=verbose)
    report = timed("benchmark", run_benchmark, config, verbose=verbose)
    runrecord.commit(config.run_dir, "run", stage_seconds=timings, total_seconds=round(sum(timings.values()), 1))
    from medq.modelcard import write_card

    log.info("model card: %s", write_card(config.run_dir)["md"])
    return report


def run_preset(name: str, config: Any, overrides: list[str] | tuple[str, ...] = (),
               verbose: bool = False) -> dict[str, Any]:
    """Run the preset's whole pipeline on ``config`` (``configs/<name>.yaml`` loaded with ``overrides``); returns
    the benchmark report, which also records the stage times and the command that reproduces it."""
    with runrecord.writer_lock(config.run_dir, "benchmark --preset"):
        report = run_all(config, verbose=verbose, phantoms=True)  # a preset is defined on its phantoms
        report = _record_preset(name, config, overrides, report)
        from medq.modelcard import write_card

        write_card(config.run_dir)  # again: the preset rewrote benchmark.json, which made run_all's card stale
        return report


def _record_preset(name: str, config: Any, overrides: list[str] | tuple[str, ...],
                   report: dict[str, Any]) -> dict[str, Any]:
    from medq.benchmark.report import write_reports

    timings = runrecord.read_manifest(config.run_dir).stage(runrecord.RunEntry).stage_seconds
    report["preset"] = {"name": name, "config_file": config.source, "overrides": list(overrides),
                        "command": " ".join(["medq benchmark --preset", name, *(f"--set {o}" for o in overrides)]),
                        "stage_seconds": timings, "total_seconds": round(sum(timings.values()), 1)}
    written = write_reports(runrecord.staging_dir(config.run_dir), report)
    made_from = ("fp32_pb", "split") + (("int8_pb",) if runrecord.usable(config.run_dir, "int8_pb") else ())
    runrecord.commit(config.run_dir, "preset", artifacts=written, inputs=made_from, **report["preset"])
    return report
