"""Stage 2: train a registered model on the dataset's train split, select the best epoch on the validation split.

The validation split is never trained on; the test split is not touched here (the benchmark stage evaluates on it).
"""
from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medq import artifacts
from medq.data.index import DatasetIndex
from medq.data.readers import read_dataset
from medq.errors import DataError
from medq.losses import make_loss
from medq.metrics import primary_metric, task_metrics
from medq.models import build_model
from medq.preprocess import PreprocessSpec
from medq.tfdata import image_dataset

KERAS_MODEL = "model.keras"


@dataclass
class FitResult:
    model: Any
    best_epoch: int
    val_metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def class_weights(labels: np.ndarray, task: str, mode: str) -> dict[int, float] | None:
    """'balanced': each class weighted by n / (k · n_class), so a 3:1 imbalance does not become a 3:1 bias."""
    if mode == "none" or task == "multilabel":
        return None  # multilabel imbalance is handled by the weighted-bce loss
    counts = labels.sum(axis=0)
    k = len(counts)
    return {i: float(labels.shape[0] / (k * c)) if c else 0.0 for i, c in enumerate(counts)}


def predict_dataset(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) over a tf.data dataset, labels taken from the batches actually decoded."""
    ys, ps = [], []
    for x, y in dataset:
        ps.append(model(x, training=False).numpy())
        ys.append(y.numpy())
    return np.concatenate(ys), np.concatenate(ps)


def _validation_callback(val_ds, task: str, classes: list[str], save_path: Path | None):
    import tensorflow as tf

    key = primary_metric(task)

    class ValidationMetrics(tf.keras.callbacks.Callback):
        """Per-image task metrics on the validation split; keeps the best epoch's weights and saves it atomically."""

        def __init__(self):
            super().__init__()
            self.best = -np.inf
            self.best_epoch = -1
            self.best_metrics: dict[str, Any] = {}
            self.best_weights = None

        def on_epoch_end(self, epoch, logs=None):
            y, p = predict_dataset(self.model, val_ds)
            metrics = task_metrics(task, y, p, classes)
            logs = logs if logs is not None else {}
            logs["val_primary"] = metrics[key]
            logs["val_auc"] = metrics["auc"]
            score = metrics[key] if np.isfinite(metrics[key]) else -np.inf
            # Ties go to the later epoch only when AUC improved: accuracy saturates on easy splits.
            if score > self.best or (score == self.best and metrics["auc"] > self.best_metrics.get("auc", -1)):
                self.best, self.best_epoch, self.best_metrics = score, epoch, metrics
                self.best_weights = self.model.get_weights()
                if save_path is not None:
                    with artifacts.atomic_path(save_path) as tmp:
                        self.model.save(tmp)

    return ValidationMetrics()


def fit_model(config: Any, index: DatasetIndex, *, learning_rate: float | None = None, batch_size: int | None = None,
              epochs: int | None = None, model_params: dict[str, Any] | None = None, dropout: float | None = None,
              save_path: Path | None = None, extra_callbacks: list | None = None, verbose: int = 0) -> FitResult:
    """Build and train one model; returns it with the weights of its best validation epoch restored."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(config.run.seed)
    spec = PreprocessSpec.from_config(config)
    tc = config.train
    lr = learning_rate or tc.learning_rate
    bs = batch_size or tc.batch_size
    n_epochs = epochs or tc.epochs
    if not index.splits["train"]:
        raise DataError(f"{config.data.root}: the train split is empty")
    if not index.splits["val"]:
        raise DataError(f"{config.data.root}: the validation split is empty; raise data.val_fraction")
    y_train = index.labels("train")
    train_ds = image_dataset(index.paths("train"), y_train, spec, batch_size=bs, shuffle=True,
                             seed=config.run.seed, augment=tc.augment)
    val_ds = image_dataset(index.paths("val"), index.labels("val"), spec, batch_size=64)

    params = dict(config.model.params)
    params.update(model_params or {})
    model = build_model(config.model.name, spec.input_shape, len(index.classes), index.task,
                        dropout=tc.dropout if dropout is None else dropout, weights=config.model.weights, **params)
    optimizer = {"adam": tf.keras.optimizers.Adam, "sgd": tf.keras.optimizers.SGD,
                 "rmsprop": tf.keras.optimizers.RMSprop}[tc.optimizer](learning_rate=lr)
    model.compile(optimizer=optimizer, loss=make_loss(tc.loss, index.task, y_train.mean(axis=0)))

    validation = _validation_callback(val_ds, index.task, index.classes, save_path)
    callbacks = [validation,
                 tf.keras.callbacks.EarlyStopping("val_primary", mode="max", patience=tc.early_stopping_patience),
                 tf.keras.callbacks.ReduceLROnPlateau("val_primary", mode="max", factor=0.3,
                                                      patience=max(1, tc.early_stopping_patience // 2))]
    start = time.perf_counter()
    history = model.fit(train_ds, epochs=n_epochs, callbacks=callbacks + list(extra_callbacks or []),
                        class_weight=class_weights(y_train, index.task, tc.class_weight), verbose=verbose)
    seconds = time.perf_counter() - start
    if validation.best_weights is not None:
        model.set_weights(validation.best_weights)
    rows = [{k: float(v[i]) for k, v in history.history.items()} | {"epoch": i + 1}
            for i in range(len(history.history.get("loss", [])))]
    return FitResult(model, validation.best_epoch + 1, validation.best_metrics, rows, seconds)


def run_train(config: Any, index: DatasetIndex | None = None, verbose: int = 0) -> FitResult:
    """Train the configured model; the best validation epoch becomes the run's Keras model."""
    index = index or read_dataset(config.data, seed=config.run.seed)
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    result = fit_model(config, index, save_path=run_dir / KERAS_MODEL, verbose=verbose)
    history_path = artifacts.write_text(run_dir / "train_history.csv", _history_csv(result.history))
    artifacts.update_manifest(
        run_dir, "train", config=config,
        artifacts={"keras_model": run_dir / KERAS_MODEL, "train_history": history_path},
        model=config.model.name, parameters=int(result.model.count_params()), best_epoch=result.best_epoch,
        val_metrics=result.val_metrics, seconds=round(result.seconds, 1),
        split_sizes={k: len(v) for k, v in index.splits.items()}, skipped=len(index.skipped), notes=index.notes,
        top=dataset_facts(config, index) | {"model_source": "train", "selected_val_metrics": result.val_metrics},
    )
    return result


def dataset_facts(config: Any, index: DatasetIndex) -> dict[str, Any]:
    """What later stages need to know about the data without re-reading the config."""
    return {"classes": index.classes, "task": index.task, "dataset_format": index.format,
            "preprocess": PreprocessSpec.from_config(config).to_dict()}


def _history_csv(rows: list[dict[str, float]]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["epoch"] + [k for k in rows[0] if k != "epoch"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
