"""Stage 2: train a registered model on the dataset's train split, select the best epoch on the validation split.

The validation split is never trained on; the test split is not touched here (the benchmark stage evaluates on it,
and :func:`run_evaluate` reports single-crop and 10-crop metrics on it, with their confidence intervals).

The engine (:func:`medq.fitting.fit_model`) picks the best epoch by ``run.objective``; this stage writes
``model.keras``, the CSV log and TensorBoard events in ``<run>/logs/``, and the last-epoch checkpoint in
``<run>/checkpoints/`` that ``run_train(config, resume=True)`` continues from.
"""
from __future__ import annotations

import csv
import io
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from medq import artifacts, runrecord, thresholds
from medq.data import pinned
from medq.data.check import note_pixel_range, stage_skipped_files
from medq.data.index import DatasetIndex
from medq.data.cache import image_cache
from medq.errors import ConfigError, DataError
from medq.fitting import FitResult, dataset_facts, fit_model, is_chief, make_strategy
from medq.metrics import clinical_metrics, task_metrics
from medq.preprocess import PreprocessSpec, preprocess, read_source
from medq.selection import objective
from medq.subgroups import Subgroups
from medq.tta import ten_crops

log = logging.getLogger("medq")

KERAS_MODEL = runrecord.KERAS_MODEL
CHECKPOINT_DIR = "checkpoints"
LOW_RES_MODEL = "low_res.keras"  # train.low_res: the first phase's best epoch
EVALUATION = "evaluation.json"


def run_train(config: Any, index: DatasetIndex | None = None, verbose: int = 0, resume: bool = False) -> FitResult:
    """Train the configured model; the best validation epoch becomes the run's Keras model.

    ``resume=True`` continues an interrupted training from ``<run>/checkpoints/`` (the last finished epoch, with
    its optimizer and callback state); without a checkpoint it trains from the start. The run's model.keras and
    its manifest entry change together when training finishes: an interrupted (re)training leaves both as they were.
    """
    run_dir = config.run_dir
    strategy = make_strategy(config.train.distribute)
    if not is_chief(strategy):
        # Multi-worker: every worker trains and saves in step with the chief (reading batch-norm statistics is a
        # collective operation), but into a temporary folder; only the chief writes the run.
        # Its calls must match the chief's one for one (same data, same saves), or the collectives mismatch.
        index = pinned.run_index(config, index, stage="train", write=False)
        split = runrecord.split_sha(run_dir)
        with tempfile.TemporaryDirectory(prefix="medq-worker-") as tmp:
            low_res = _train_low_res(config, index, verbose, False, split, Path(tmp))
            result = fit_model(config, index, checkpoint_dir=Path(tmp) / CHECKPOINT_DIR, verbose=verbose,
                               initial_model=Path(tmp) / LOW_RES_MODEL if low_res else None, split_sha=split)
            result.model.save(Path(tmp) / KERAS_MODEL)
            return result
    if resume and config.train.distribute == "multi-worker" and strategy.num_replicas_in_sync > 1:
        raise ConfigError("train.distribute: resuming a multi-worker training is not supported (the other workers' "
                          "checkpoints are temporary); rerun without --resume")
    with runrecord.writer_lock(run_dir, "train"):
        index = pinned.run_index(config, index, stage="train")
        thresholds.check_per_class(config.thresholds, index.task, index.classes)  # before hours of training
        note_pixel_range(index, config.data.bit_depth, config.run.seed)
        split = runrecord.split_sha(run_dir)
        low_res = _train_low_res(config, index, verbose, resume, split, run_dir)
        result = fit_model(config, index, verbose=verbose, checkpoint_dir=run_dir / CHECKPOINT_DIR, resume=resume,
                           log_dir=run_dir / "logs", initial_model=run_dir / LOW_RES_MODEL if low_res else None,
                           split_sha=split)
        staged_model = runrecord.staging_path(run_dir, KERAS_MODEL)
        result.model.save(staged_model)  # the best epoch
        history = runrecord.staging_path(run_dir, "train_history.csv")
        artifacts.write_text(history, _history_csv(result.history))
        skipped_list = stage_skipped_files(run_dir, index.skipped, result.dropped)
        # on the selected epoch's validation outputs, the ones it was selected on: no second pass over the split
        chosen = thresholds.for_run(config, index.task, index.classes, result.val_labels, result.val_probabilities,
                                    artifacts.sha256(staged_model))
        log.info("%s: %s parameters, %s FLOPs at %s", config.model.name, f"{result.facts['parameters']:,}",
                 f"{result.facts['flops']:,}", "x".join(map(str, result.facts["input_shape"])))
        runrecord.commit(
            run_dir, "train", config=config,
            artifacts={"keras_model": staged_model, "train_history": history, "skipped_files": skipped_list},
            inputs=("split",), model=config.model.name, parameters=int(result.model.count_params()),
            flops=result.facts["flops"], best_epoch=result.best_epoch, val_metrics=result.val_metrics,
            seconds=round(result.seconds, 1), epochs_run=result.epochs_run,
            resumed=resume and result.epochs_run < len(result.history), low_res=low_res,
            split_sizes={k: len(v) for k, v in index.splits.items()}, skipped=len(index.skipped), notes=index.notes,
            dropped_while_loading=[{"path": p, "reason": r} for p, r in sorted(result.dropped.items())],
            facts=dataset_facts(config, index) | {"model_source": "train", "selected_val_metrics": result.val_metrics,
                                                  "selected_hyperparameters": training_hyperparameters(config),
                                                  "objective": config.run.objective,
                                                  thresholds.MANIFEST_KEY: chosen},
        )
    return result


def training_hyperparameters(config: Any) -> dict[str, Any]:
    """The settings that made the run's model (`medq runs show` prints the selected model's own)."""
    tc = config.train
    return {"learning_rate": tc.learning_rate, "batch_size": tc.batch_size, "optimizer": tc.optimizer,
            "loss": tc.loss, "dropout": tc.dropout, "epochs": tc.epochs, **dict(config.model.params)}


def _train_low_res(config: Any, index: DatasetIndex, verbose: int, resume: bool, split_sha: str | None,
                   folder: Path) -> dict[str, Any] | None:
    """``train.low_res``: the first phase of progressive resizing, its best epoch saved as ``folder/low_res.keras``
    (kept by --resume), whose weights start the full-resolution training."""
    low = config.train.low_res
    if not low.epochs:
        return None
    target = folder / LOW_RES_MODEL
    if resume and target.is_file():
        log.info("train.low_res: reusing %s", target)
        return {"image_size": low.image_size, "epochs": low.epochs, "reused": True}
    log.info("train.low_res: %d epoch(s) at %dx%d, then %d at %dx%d", low.epochs, low.image_size, low.image_size,
             config.train.epochs, config.preprocess.image_size, config.preprocess.image_size)
    small = replace(config, preprocess=replace(config.preprocess, image_size=low.image_size))
    result = fit_model(small, index, epochs=low.epochs, learning_rate=low.learning_rate or None, save_path=target,
                       verbose=verbose, split_sha=split_sha)  # saves its best epoch
    return {"image_size": low.image_size, "epochs": low.epochs, "best_epoch": result.best_epoch,
            "val_metrics": result.val_metrics, "seconds": round(result.seconds, 1)}


def _history_csv(rows: list[dict[str, float]]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    names = ["epoch"] + sorted({k for row in rows for k in row if k != "epoch"})
    writer = csv.DictWriter(out, fieldnames=names, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# --- evaluation: single crop and CheXNet's 10-crop ---------------------------------------------------------------

def evaluate_keras(model, paths: list[str], labels: np.ndarray, spec: PreprocessSpec, ten_crop: bool = False, *,
                   task: str | None = None, classes: list[str] | None = None, batch_size: int = 32,
                   threshold: "float | thresholds.Thresholds" = 0.5, cache: Any = None,
                   chunk: int = 256, subgroups: Subgroups | None = None) -> dict[str, Any]:
    """Task metrics of ``model`` on images, single-crop and (``ten_crop``) 10-crop averaged, side by side.

    Both views come from the same decode → :func:`medq.preprocess.preprocess` path: single crop at
    ``spec.image_size`` S, ten crops of S from the image preprocessed at round(S · 256/224). Images stream through
    in chunks of ``chunk`` (only the probabilities are kept); unreadable files are dropped from both and counted.
    ``threshold``: one for every class, or the run's :class:`medq.thresholds.Thresholds` (then each view also
    carries ``operating_points``: how they held on these images, and with ``subgroups`` (the images' patient
    metadata) its subgroup table, :mod:`medq.subgroups`).
    Returns ``{'single_crop': metrics, 'ten_crop': metrics | None, 'n_skipped': k}``.
    """
    from medq.data.decode import UnreadableImage
    from medq.tfdata import iter_split_arrays

    labels = np.asarray(labels, dtype=np.float32)
    if task is None:
        head = model.get_layer("probabilities").activation.__name__
        task = "multilabel" if head == "sigmoid" else ("binary" if labels.shape[1] == 2 else "multiclass")
    classes = classes or [f"class{k}" for k in range(labels.shape[1])]
    p_single, p_ten, kept = [], [], []
    if ten_crop:  # the crops need the decoded image at a larger size than the cache holds
        for start in range(0, len(paths), chunk):
            single, tens = [], []
            for i, path in enumerate(paths[start:start + chunk], start):
                try:
                    image = read_source(path, spec)
                except UnreadableImage:
                    continue
                kept.append(i)
                single.append(preprocess(image, spec))
                tens.append(ten_crops(image, spec))
            if single:
                p_single.append(model.predict(np.stack(single), batch_size=batch_size, verbose=0))
                p_ten.append(model.predict(np.concatenate(tens), batch_size=batch_size, verbose=0)
                             .reshape(len(single), 10, -1).mean(axis=1))
    else:
        for images, indices in iter_split_arrays(paths, spec, chunk=chunk, cache=cache):
            if len(images):
                p_single.append(model.predict(images, batch_size=batch_size, verbose=0))
                kept.extend(int(i) for i in indices)
    if not kept:
        raise DataError("evaluate: none of the images could be decoded")
    y = labels[kept]
    groups = subgroups.kept(kept) if subgroups is not None else None
    out: dict[str, Any] = {"n_skipped": len(paths) - len(kept), "ten_crop": None}
    out["single_crop"] = _view_metrics(task, y, np.concatenate(p_single), classes, threshold, groups)
    if ten_crop:
        out["ten_crop"] = _view_metrics(task, y, np.concatenate(p_ten), classes, threshold, groups)
    return out


def _view_metrics(task: str, y: np.ndarray, p: np.ndarray, classes: list[str],
                  threshold: "float | thresholds.Thresholds", groups: Subgroups | None = None) -> dict[str, Any]:
    operating = threshold if isinstance(threshold, thresholds.Thresholds) else None
    out = task_metrics(task, y, p, classes, operating.per_column() if operating else threshold) | {
        "clinical": clinical_metrics(task, y, p, classes)}
    if operating:
        out["operating_points"] = thresholds.held(operating, y, p)
        if groups is not None:
            out["subgroups"] = groups.table(task, classes, y, p, operating)
    return out


def run_evaluate(config: Any, split: str = "test", ten_crop: bool = False,
                 index: DatasetIndex | None = None, threshold: float | None = None) -> dict[str, Any]:
    """Evaluate the run's model on ``split``; writes ``evaluation.json`` and the manifest's 'evaluate' entry.
    The model is the Keras model, or a converted run's frozen FP32 graph (:mod:`medq.runmodel`); a converted run
    without thresholds gets them chosen on its validation split first, recorded as train records them.
    Decisions (sensitivity, specificity, confusion matrices) are taken at the run's operating thresholds (chosen on
    validation by train; 0.5 with a note for a run without them), or at ``threshold`` for every class when given.
    ``operating_points`` shows, per thresholded class, sensitivity/specificity at its threshold on ``split`` with
    Wilson intervals beside the validation figures it was chosen at."""
    from medq.runmodel import converted_thresholds, open_run_model

    run_dir = config.run_dir
    with runrecord.writer_lock(run_dir, "evaluate"):
        model = open_run_model(run_dir, config)
        manifest = runrecord.read_manifest(run_dir)
        index = pinned.run_index(config, index, stage="evaluate")
        runrecord.check_classes(run_dir, manifest, index)
        if split not in index.splits or not index.splits[split]:
            raise DataError(f"{config.data.root}: the {split} split is empty")
        recorded = manifest.facts.preprocess
        spec = PreprocessSpec.from_dict(recorded) if recorded is not None else PreprocessSpec.from_config(config)
        cache = image_cache(config, spec)
        chosen = converted_thresholds(config, manifest, model, index, spec, cache)
        if chosen is not None:
            manifest.facts.thresholds = chosen  # decided with now, committed with the evaluation
        operating = thresholds.run_thresholds(manifest, index.task, index.classes, threshold)
        result = evaluate_keras(model, index.paths(split), index.labels(split), spec,
                                ten_crop, task=index.task, classes=index.classes, threshold=operating, cache=cache,
                                subgroups=Subgroups.of(index, split, config.subgroups))
        result |= {"split": split, "n_images": len(index.paths(split)), "objective": objective(config, manifest),
                   "model": model.key}
        path = artifacts.write_json(runrecord.staging_path(run_dir, EVALUATION), result)
        runrecord.commit(run_dir, "evaluate", artifacts={"evaluation": path}, inputs=(model.key, "split"),
                         facts={thresholds.MANIFEST_KEY: chosen} if chosen is not None else None,
                         split=split, ten_crop=ten_crop, threshold=operating.values, threshold_source=operating.source,
                         objective=result["objective"], single_crop=_summary(result["single_crop"]),
                         ten_crop_metrics=_summary(result["ten_crop"]),
                         subgroups=result["single_crop"].get("subgroups"))
    return result


def _summary(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    return {k: metrics[k] for k in ("accuracy", "auc", "sensitivity", "specificity", "n_images", "ci") if k in metrics}
