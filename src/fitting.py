"""The training engine shared by the train and tune stages: build one model, fit it on the train split with the
run's augmentation and loss, and keep its best validation epoch by the run's objective (:mod:`medq.selection`).

Callbacks: per-image validation metrics (the best epoch's model can be saved atomically), early stopping and
reduce-on-plateau on the objective, a per-epoch log line and progress bar, and a last-epoch checkpoint (weights +
optimizer + callback state) that ``fit_model(..., resume=True)`` continues from.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medq import artifacts
from medq.data.cache import image_cache
from medq.data.index import DatasetIndex
from medq.errors import ConfigError, DataError, MedqError, first_line
from medq.losses import make_loss
from medq.metrics import task_metrics
from medq.models import build_model
from medq.preprocess import PreprocessSpec
from medq.selection import at_chance, is_better, rank
from medq.tfdata import image_dataset, shard_steps, sharded_image_dataset

log = logging.getLogger("medq")

LAST_STATE = "last_epoch.json"
BEST_WEIGHTS = "best_weights.npz"


class TrainingDiverged(MedqError):
    """The model's outputs stopped being numbers."""


@dataclass
class FitResult:
    model: Any
    best_epoch: int
    val_metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)  # parameters, FLOPs, input shape (medq.flops.model_facts)
    epochs_run: int = 0  # epochs trained by this call (less than the history after a resume)
    dropped: dict[str, str] = field(default_factory=dict)  # files that failed to decode while loading: reason
    # the best epoch's validation labels and probabilities (medq.thresholds chooses the operating thresholds on them)
    val_labels: np.ndarray | None = None
    val_probabilities: np.ndarray | None = None


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


# --- distribution ------------------------------------------------------------------------------------------------

_STRATEGIES: dict[str, Any] = {}


def make_strategy(name: str):
    """'none' → the default strategy; 'mirrored' → MirroredStrategy over this machine's devices; 'multi-worker' →
    MultiWorkerMirroredStrategy over the cluster in TF_CONFIG (one local worker when TF_CONFIG is unset).
    Created once per process (TensorFlow allows one multi-worker strategy per process)."""
    import tensorflow as tf

    if name not in _STRATEGIES:
        if name == "none":
            _STRATEGIES[name] = tf.distribute.get_strategy()
        elif name == "mirrored":
            _STRATEGIES[name] = tf.distribute.MirroredStrategy()
        elif name == "multi-worker":
            _STRATEGIES[name] = tf.distribute.MultiWorkerMirroredStrategy()
        else:
            raise ConfigError(f"train.distribute: {name!r} is not one of none, mirrored, multi-worker")
    return _STRATEGIES[name]


def is_chief(strategy) -> bool:
    """Whether this process writes the run's files (always, except on non-chief multi-worker workers)."""
    return bool(getattr(strategy.extended, "should_checkpoint", True))


# --- callbacks ---------------------------------------------------------------------------------------------------

def _validation_callback(val_ds, task: str, classes: list[str], save_path: Path | None, key: str):
    import tensorflow as tf

    class ValidationMetrics(tf.keras.callbacks.Callback):
        """Per-image task metrics on the validation split; keeps the best epoch's weights and saves it atomically."""

        def __init__(self):
            super().__init__()
            self.best = -np.inf
            self.best_epoch = -1
            self.best_metrics: dict[str, Any] = {}
            self.best_weights = None
            self.best_outputs: tuple[np.ndarray, np.ndarray] | None = None  # (labels, probabilities)
            # the last epoch scored higher, but its AUC interval reaches 0.5: the chance guard kept the earlier one
            self.guarded = False

        def on_epoch_end(self, epoch, logs=None):
            y, p = predict_dataset(self.model, val_ds)
            if not np.all(np.isfinite(p)):
                raise TrainingDiverged(f"epoch {epoch + 1}: the model's validation outputs are NaN or infinite "
                                       "(training diverged); lower train.learning_rate or check the input data")
            metrics = task_metrics(task, y, p, classes)
            logs = logs if logs is not None else {}
            logs["val_accuracy"] = metrics["accuracy"]
            logs["val_auc"] = metrics["auc"]
            logs["val_objective"] = metrics[key] if np.isfinite(metrics[key]) else -np.inf
            # A chance-level epoch never replaces a model; ties go to the later epoch only when the other metric
            # improved (accuracy saturates on easy splits).
            self.guarded = bool(self.best_epoch >= 0 and at_chance(metrics)
                                and rank(metrics, key)[1:] > rank(self.best_metrics, key)[1:])
            if self.best_epoch < 0 or is_better(metrics, self.best_metrics, key):
                self.best = metrics[key] if np.isfinite(metrics[key]) else -np.inf
                self.best_epoch, self.best_metrics = epoch, metrics
                self.best_weights = self.model.get_weights()
                self.best_outputs = (y, p)
                if save_path is not None:
                    with artifacts.atomic_path(save_path) as tmp:
                        self.model.save(tmp)

    return ValidationMetrics()


def _epoch_log(rows: list[dict[str, float]], n_epochs: int, steps: int, objective: str, validation):
    import tensorflow as tf

    from medq.progress import progress

    class EpochLog(tf.keras.callbacks.Callback):
        """Every epoch's logs (after the validation metrics and the learning-rate schedule wrote theirs), a log line
        per epoch and a progress bar over its batches."""

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()
            self.bar = progress(total=steps, desc=f"epoch {epoch + 1}/{n_epochs}", unit="batch")

        def on_train_batch_end(self, batch, logs=None):
            self.bar.update(1)

        def on_epoch_end(self, epoch, logs=None):
            self.bar.close()
            row = {k: float(v) for k, v in (logs or {}).items() if np.isscalar(v) or getattr(v, "shape", None) == ()}
            rows.append(row | {"epoch": epoch + 1})
            log.info("epoch %d/%d: loss %.4f, val %s %.4f (best epoch %d%s), %.0f s", epoch + 1, n_epochs,
                     row.get("loss", float("nan")), objective, row.get("val_objective", float("nan")),
                     validation.best_epoch + 1, _chance_note(validation), time.perf_counter() - self.started)

    return EpochLog()


def _chance_note(validation) -> str:
    """Why the best epoch is what it is, when the chance guard (medq.selection.at_chance) decided."""
    if validation.guarded:
        return "; this epoch scored higher, but its AUC interval reaches 0.5, so the chance guard kept the earlier one"
    if at_chance(validation.best_metrics):
        return ", at chance: its AUC interval reaches 0.5"
    return ""


# The attributes of Keras' EarlyStopping / ReduceLROnPlateau that on_train_begin resets and a resume must restore.
_CALLBACK_STATE = {"early_stopping": ("wait", "best", "best_epoch"), "plateau": ("wait", "best", "cooldown_counter")}


def _last_epoch_callback(manager, state_path: Path, fingerprint: str, validation, watched: dict[str, Any],
                         rows: list[dict[str, float]]):
    import tensorflow as tf

    class LastEpoch(tf.keras.callbacks.Callback):
        """After every epoch: checkpoint weights + optimizer, then (atomically) the epoch number and callback state."""

        def on_epoch_end(self, epoch, logs=None):
            try:
                path = manager.save(checkpoint_number=epoch + 1)
            except BaseException:  # a full disk, an interrupt: no half-written checkpoint is left to resume from
                for partial in state_path.parent.glob(f"last-{epoch + 1}[._]*"):
                    shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
                raise
            if validation.best_epoch == epoch:  # the best weights so far, kept apart from the run's model file
                with artifacts.atomic_path(state_path.parent / BEST_WEIGHTS) as tmp:
                    with open(tmp, "wb") as fh:
                        np.savez(fh, *validation.best_weights)
            state = {"epoch": epoch + 1, "checkpoint": Path(path).name, "fingerprint": fingerprint,
                     "best": _plain(float(validation.best)), "best_epoch": validation.best_epoch,
                     "best_metrics": validation.best_metrics,
                     "callbacks": {name: {a: _plain(getattr(cb, a, None)) for a in _CALLBACK_STATE[name]}
                                   for name, cb in watched.items()},
                     "history": rows, "finished": False}
            artifacts.write_json(state_path, state)

    return LastEpoch()


def _restore_callback(watched: dict[str, Any], saved: dict[str, dict[str, Any]]):
    import tensorflow as tf

    class RestoreState(tf.keras.callbacks.Callback):
        """Runs after the watched callbacks' on_train_begin (which reset them) and puts their saved state back."""

        def on_train_begin(self, logs=None):
            for name, cb in watched.items():
                for attr, value in saved.get(name, {}).items():
                    if value is not None:
                        setattr(cb, attr, value)

    return RestoreState()


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None  # JSON has no inf; None leaves the callback's fresh value in place
    return value


def _fingerprint(config: Any, split_sha: str | None) -> str:
    """What a resumed training must share with the interrupted one (not the epoch budget or patience): model,
    preprocessing, training settings, data settings, the pinned split itself and the objective."""
    train = {k: v for k, v in asdict(config.train).items() if k not in ("epochs", "early_stopping_patience",
                                                                        "tensorboard")}
    data = {"root": config.data.root, "format": config.data.format, "variant": config.data.variant,
            "val_fraction": config.data.val_fraction, "seed": config.run.seed}
    data |= {"val_split": config.data.val_split, "test_fraction": config.data.test_fraction, "split": split_sha,
             "bit_depth": config.data.bit_depth}
    blob = json.dumps({"model": asdict(config.model), "preprocess": asdict(config.preprocess), "train": train,
                       "data": data, "objective": config.run.objective}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- fitting -----------------------------------------------------------------------------------------------------

def fit_model(config: Any, index: DatasetIndex, *, learning_rate: float | None = None, batch_size: int | None = None,
              epochs: int | None = None, model_params: dict[str, Any] | None = None, dropout: float | None = None,
              save_path: Path | None = None, extra_callbacks: list | None = None, verbose: int = 0,
              optimizer: str | None = None, loss: str | None = None, initial_model: str | Path | None = None,
              checkpoint_dir: Path | None = None, resume: bool = False, log_dir: Path | None = None,
              distribute: str | None = None, split_sha: str | None = None) -> FitResult:
    """Build and train one model; returns it with the weights of its best validation epoch restored.

    ``optimizer``/``loss`` override the config (the tuner's choices); ``initial_model`` is a .keras file whose
    weights start the training (Hyperband's continued trials); ``checkpoint_dir`` enables the last-epoch checkpoint
    and ``resume`` continues from it; ``log_dir`` receives ``train.csv`` and (``train.tensorboard``) TensorBoard
    events; ``distribute`` overrides ``train.distribute``.
    """
    import tensorflow as tf

    from medq.flops import model_facts

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
    if bs > len(index.splits["train"]):  # a larger batch only pads memory (5 GB for 642 images at 100000)
        log.info("note: batch size %d exceeds the %d training images; training with batches of %d", bs,
                 len(index.splits["train"]), len(index.splits["train"]))
        bs = len(index.splits["train"])
    y_train = index.labels("train")
    dropped: dict[str, str] = {}
    cache = image_cache(config, spec)
    if cache is not None:
        cache.check_space(index.paths("train") + index.paths("val"), channels=spec.channels)
    strategy = make_strategy(distribute or tc.distribute)
    resolver = getattr(strategy, "cluster_resolver", None)
    workers = len(resolver.cluster_spec().as_dict().get("worker", [])) if resolver is not None else 1
    steps = -(-len(index.splits["train"]) // bs)
    steps_per_epoch = None
    if workers > 1:  # each worker reads its own share of the files, the same number of steps on each

        def worker_input(context):
            return sharded_image_dataset(
                index.paths("train"), y_train, spec, local_batch=context.get_per_replica_batch_size(bs),
                workers=context.num_input_pipelines, worker=context.input_pipeline_id, seed=config.run.seed,
                augment=tc.augment, cache=cache, dropped=dropped, class_weight=weights)

        weights, fit_class_weight = class_weights(y_train, index.task, tc.class_weight), None
        train_ds = strategy.distribute_datasets_from_function(worker_input)
        local_batch = max(1, bs // workers)
        steps = steps_per_epoch = shard_steps(len(index.splits["train"]), workers, local_batch)
        task = strategy.cluster_resolver.task_id
        log.info("worker %d of %d: %d of the %d training images per epoch (%d steps of %d)", task, workers,
                 steps * local_batch, len(index.splits["train"]), steps, local_batch)
    else:
        train_ds = image_dataset(index.paths("train"), y_train, spec, batch_size=bs, shuffle=True,
                                 seed=config.run.seed, augment=tc.augment, cache=cache, dropped=dropped)
        fit_class_weight = class_weights(y_train, index.task, tc.class_weight)
    val_ds = image_dataset(index.paths("val"), index.labels("val"), spec, batch_size=64, cache=cache,
                           dropped=dropped)


    params = dict(config.model.params)
    params.update(model_params or {})
    opt_name = optimizer or tc.optimizer
    optimizers = {"adam": tf.keras.optimizers.Adam, "sgd": tf.keras.optimizers.SGD,
                  "rmsprop": tf.keras.optimizers.RMSprop}
    if opt_name not in optimizers:
        raise ConfigError(f"optimizer {opt_name!r}: use one of {', '.join(optimizers)}")
    with strategy.scope():
        model = build_model(config.model.name, spec.input_shape, len(index.classes), index.task,
                            dropout=tc.dropout if dropout is None else dropout, weights=config.model.weights,
                            **params)
        if initial_model is not None:
            _copy_weights(initial_model, model)
        opt = optimizers[opt_name](learning_rate=lr)
        model.compile(optimizer=opt, loss=make_loss(loss or tc.loss, index.task, y_train.mean(axis=0),
                                                    gamma=tc.focal_gamma))
    facts = model_facts(model)

    rows: list[dict[str, float]] = []
    objective = config.run.objective
    validation = _validation_callback(val_ds, index.task, index.classes, save_path, objective)
    early = tf.keras.callbacks.EarlyStopping("val_objective", mode="max", patience=tc.early_stopping_patience)
    plateau = tf.keras.callbacks.ReduceLROnPlateau("val_objective", mode="max", factor=0.3,
                                                   patience=max(1, tc.early_stopping_patience // 2))
    watched = {"early_stopping": early, "plateau": plateau}
    callbacks = [validation, early, plateau, _epoch_log(rows, n_epochs, steps, objective, validation)]
    initial_epoch = 0
    state_path = manager = None
    finished = False
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        state_path = checkpoint_dir / LAST_STATE
        fingerprint = _fingerprint(config, split_sha)
        if not resume and checkpoint_dir.exists():
            shutil.rmtree(checkpoint_dir)  # a fresh training must not be resumed from an older one
        ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
        manager = tf.train.CheckpointManager(ckpt, str(checkpoint_dir), max_to_keep=2, checkpoint_name="last")
        if resume and state_path.is_file():
            state = json.loads(state_path.read_text())
            if state.get("fingerprint") != fingerprint:
                raise MedqError(f"{state_path}: this checkpoint was written with a different model, data, split or "
                                "training config; rerun without --resume to start over")
            ckpt.restore(str(checkpoint_dir / state["checkpoint"])).expect_partial()
            # an early-stopped training is over; one that ran out of epochs continues if train.epochs grew
            initial_epoch, finished = int(state["epoch"]), bool(state.get("stopped_early"))
            rows.extend(state.get("history", []))
            _restore_best(validation, state, checkpoint_dir, model)
            callbacks.append(_restore_callback(watched, state.get("callbacks", {})))
            log.info("resuming from epoch %d of %d (%s)", initial_epoch, n_epochs, state_path)
        elif resume:
            log.info("no checkpoint in %s: training from the start", checkpoint_dir)
        callbacks.append(_last_epoch_callback(manager, state_path, fingerprint, validation, watched, rows))
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        callbacks.append(tf.keras.callbacks.CSVLogger(str(Path(log_dir) / "train.csv"), append=initial_epoch > 0))
        if tc.tensorboard:
            callbacks.append(tf.keras.callbacks.TensorBoard(str(Path(log_dir) / "tensorboard"), write_graph=False,
                                                            profile_batch=0))
    start = time.perf_counter()
    epochs_before = len(rows)
    if not finished and initial_epoch < n_epochs:
        model.fit(train_ds, epochs=n_epochs, initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch,
                  callbacks=callbacks + list(extra_callbacks or []),
                  class_weight=fit_class_weight, verbose=verbose)
    seconds = time.perf_counter() - start
    if cache is not None:
        log.info("%s", cache.summary())
    if state_path is not None and state_path.is_file():
        state = json.loads(state_path.read_text())
        stopped = bool(state.get("stopped_early")) or early.stopped_epoch > 0
        artifacts.write_json(state_path, state | {"finished": True, "stopped_early": stopped})
    if validation.best_weights is not None:
        model.set_weights(validation.best_weights)
    if validation.best_outputs is None:  # the best epoch came from a checkpoint (--resume): score it once
        validation.best_outputs = predict_dataset(model, val_ds)
    if dropped:
        first = next(iter(dropped.values()))
        log.warning("%d file(s) failed to decode while training and were left out (first: %s); "
                    "`medq data check` lists them all", len(dropped), first)
    return FitResult(model, validation.best_epoch + 1, validation.best_metrics, rows, seconds, facts,
                     len(rows) - epochs_before, dropped, *validation.best_outputs)


def _copy_weights(source: str | Path, model) -> None:
    from medq.models import load_keras_model

    try:
        model.set_weights(load_keras_model(source).get_weights())
    except ValueError as exc:
        raise ConfigError(f"{source}: its weights do not fit {model.name} at input {model.input_shape[1:]} "
                          f"({first_line(exc)}); a model whose weights depend on the input size "
                          "(a dense layer after a flatten) cannot start from another resolution (train.low_res, "
                          "tune.warm_start)") from None


def _restore_best(validation, state: dict[str, Any], checkpoint_dir: Path, model) -> None:
    """Put the interrupted training's best epoch (metrics and weights) back."""
    if state.get("best_epoch", -1) < 0:
        return
    validation.best_epoch = int(state["best_epoch"])
    validation.best_metrics = state["best_metrics"]
    validation.best = state["best"] if state.get("best") is not None else -np.inf
    path = checkpoint_dir / BEST_WEIGHTS
    if path.is_file():
        with np.load(path) as saved:
            validation.best_weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    else:
        validation.best_weights = model.get_weights()


def dataset_facts(config: Any, index: DatasetIndex) -> dict[str, Any]:
    """What later stages need to know about the data without re-reading the config."""
    return {"classes": index.classes, "task": index.task, "dataset_format": index.format,
            "preprocess": PreprocessSpec.from_config(config).to_dict()}
