"""Stage 3: a keras-tuner search whose best trial becomes the run's model when it beats the trained one.

The search lives in ``<run>/tuner/`` (keras-tuner's project folder, never overwritten): rerunning the same search
reloads it and continues — finished trials are not repeated, an interrupted trial is run again. Every trial trains
with :func:`medq.fitting.fit_model` (the same data, augmentation, loss and per-image validation metrics as `train`),
and is scored by ``val_objective``: the validation ``run.objective`` (AUC unless accuracy is asked for; maximised).
Trials are ranked by :mod:`medq.selection`: one whose validation AUC is not above chance by its 95% interval ranks
below every trial that is, and never replaces the run's model.

Each trial's folder holds its best-epoch ``model.keras`` and ``medq_trial.json`` (values, validation metrics,
parameters, FLOPs, batch-1 Keras latency, which tuner ran it). The run gets a trial table (``tune_trials.csv`` and
``.md``) and ``tune_tradeoff.png`` (metric against parameters, FLOPs and latency, Pareto front marked), so a user can
pick an accuracy/speed trade-off rather than only the top trial.

Distributed: with keras-tuner's ``KERASTUNER_TUNER_ID`` / ``KERASTUNER_ORACLE_IP`` / ``KERASTUNER_ORACLE_PORT``
set, the process whose tuner id is ``chief`` serves the oracle and then selects the model; every other process is
a worker that runs trials (docs/distributed-tuning.md).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medq import artifacts, runrecord, thresholds
from medq.data import pinned
from medq.data.index import DatasetIndex
from medq.errors import ConfigError, MedqError
from medq.metrics import with_ci
from medq.selection import is_better
from medq.tune.report import (OBJECTIVE, REPORT_CSV, REPORT_MD, REPORT_PNG, TRIAL_FACTS, TrialRow, collect_trials,
                              fmt, number, pick, trial_table_csv, trial_table_markdown, tradeoff_png)
from medq.tune.space import declare_space, trial_settings, with_image_size

log = logging.getLogger("medq")

TUNER_PROJECT = "tuner"  # <run>/tuner/: keras-tuner's project folder
WARM_START_MODEL = "warm_start.keras"
TRIAL_MODEL = "model.keras"
SEARCH_FILE = "medq_search.json"


@dataclass
class TuneResult:
    trials: list[TrialRow]
    best: TrialRow | None
    tradeoff: TrialRow | None  # the fastest trial within tune.tradeoff_tolerance of the best
    replaced: bool  # the best trial became the run's model
    decision: str
    role: str  # 'standalone' | 'chief' | 'worker'
    seconds: float
    reports: dict[str, Path] = field(default_factory=dict)


# --- the search's signature ----------------------------------------------------------------------------------------

def _search_signature(config: Any) -> dict[str, Any]:
    """What a resumed search must share with the one in the folder (max_trials may grow): also the split settings
    and the run's pinned split itself."""
    return {"tuner": config.tune.tuner, "search_space": config.tune.search_space, "epochs": config.tune.epochs,
            "hyperband_factor": config.tune.hyperband_factor, "model": config.model.name,
            "model_params": config.model.params, "preprocess": dataclasses.asdict(config.preprocess),
            "data": pinned.split_settings(config), "split": runrecord.split_sha(config.run_dir),
            "warm_start": config.tune.warm_start, "objective": config.run.objective,
            "decode": {"bit_depth": config.data.bit_depth}}  # the pixels every trial trains on


def _check_signature(project: Path, config: Any, worker: bool = False) -> None:
    path = project / SEARCH_FILE
    mine = json.loads(json.dumps(_search_signature(config), default=str))
    if path.is_file():
        theirs = json.loads(path.read_text())
        theirs.setdefault("decode", {"bit_depth": "auto"})  # written before medq recorded it: the default decoded
        if worker:  # a worker may have read the run before the chief pinned its split
            theirs.pop("split", None)
            mine.pop("split", None)
        if theirs != mine:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ConfigError(f"{project}: this search was started with a different {', '.join(changed)}; "
                              "use another run name (--run-name) or delete the folder to start a new search")
    elif not worker:  # only the chief writes it: a worker that starts first has not seen the chief's pinned split
        artifacts.write_json(path, mine)


# --- keras-tuner plumbing -----------------------------------------------------------------------------------------

def _tuner_class(kind: str):
    import keras_tuner as kt

    base = {"random": kt.RandomSearch, "hyperband": kt.Hyperband, "bayesian": kt.BayesianOptimization}[kind]

    class MedqTuner(base):
        """keras-tuner's oracle and bookkeeping; each trial is a medq training (``runner``)."""

        def __init__(self, runner, heartbeat_seconds: float | None = None, **kwargs):
            self._medq_runner = runner
            self._heartbeat_seconds = heartbeat_seconds  # a distributed worker's (None: no heartbeat)
            super().__init__(**kwargs)

        def run_trial(self, trial, *args, **kwargs):
            from medq.tune.kt_private import heartbeat

            with heartbeat(self, trial.trial_id, self._heartbeat_seconds):
                return self._medq_runner(self, trial, verbose=kwargs.get("verbose", 0))

        def load_model(self, trial):
            from medq.models import load_keras_model

            return load_keras_model(Path(self.get_trial_dir(trial.trial_id)) / TRIAL_MODEL)

    MedqTuner.__name__ = f"Medq{base.__name__}"
    return MedqTuner


def make_tuner(config: Any, hp, runner, heartbeat_seconds: float | None = None):
    """The configured tuner over ``hp``; each trial calls ``runner``; a distributed worker's tuner tells the chief
    it is alive every ``heartbeat_seconds`` while it runs a trial."""
    import keras_tuner as kt

    tc = config.tune
    common = dict(objective=kt.Objective(OBJECTIVE, "max"), seed=config.run.seed, hyperparameters=hp,
                  directory=str(config.run_dir), project_name=TUNER_PROJECT, overwrite=False,
                  heartbeat_seconds=heartbeat_seconds)
    if tc.tuner == "hyperband":
        if tc.hyperband_factor < 2:
            raise ConfigError(f"tune.hyperband_factor: must be 2 or more, got {tc.hyperband_factor}")
        return _tuner_class("hyperband")(runner, max_epochs=tc.epochs, factor=tc.hyperband_factor, **common)
    return _tuner_class(tc.tuner)(runner, max_trials=tc.max_trials, **common)


def _trial_runner(config: Any, index: DatasetIndex, warm_start: Path | None = None):
    """The function each tuner calls per trial: train, save the model, measure it, report the objective.

    ``warm_start``: a .keras model every trial of the same architecture and resolution starts from.
    """

    def run(tuner, trial, verbose: int = 0) -> dict[str, float]:
        import tensorflow as tf

        from medq.flops import keras_latency_ms
        from medq.fitting import fit_model

        values = dict(trial.hyperparameters.values)
        fit, params, size = trial_settings(config, values)
        trial_dir = Path(tuner.get_trial_dir(trial.trial_id))
        epochs, initial = config.tune.epochs, None
        if "tuner/epochs" in values:  # Hyperband: continue the parent trial's model for the extra epochs
            epochs = int(values["tuner/epochs"]) - int(values.get("tuner/initial_epoch", 0))
            parent = values.get("tuner/trial_id")
            if parent:
                initial = Path(tuner.get_trial_dir(parent)) / TRIAL_MODEL
        if initial is None and warm_start is not None and not params and size == config.preprocess.image_size:
            initial = warm_start
        tf.keras.backend.clear_session()
        log.info("trial %s (%s): %s", trial.trial_id, tuner.tuner_id, _short(values))
        result = fit_model(with_image_size(config, size), index, epochs=max(1, epochs), model_params=params,
                           initial_model=initial, verbose=verbose, **fit)
        with artifacts.atomic_path(trial_dir / TRIAL_MODEL) as tmp:
            result.model.save(tmp)
        latency = keras_latency_ms(result.model, runs=max(1, config.tune.latency_runs))
        key = config.run.objective
        facts = {"trial_id": trial.trial_id, "tuner_id": tuner.tuner_id, "values": values, "image_size": size,
                 "epochs": epochs, "best_epoch": result.best_epoch, "val_metrics": result.val_metrics,
                 "parameters": result.facts["parameters"], "flops": result.facts["flops"],
                 "latency_ms": round(latency, 3), "seconds": round(result.seconds, 1)}
        artifacts.write_json(trial_dir / TRIAL_FACTS, facts)
        log.info("trial %s: val %s %.4f, auc %.4f, %s params, %.1f ms", trial.trial_id, key,
                 result.val_metrics[key], result.val_metrics["auc"], f"{facts['parameters']:,}", latency)
        return {OBJECTIVE: float(result.val_metrics[key]), "val_auc": _finite(result.val_metrics["auc"])}

    return run


def _finite(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def _short(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items() if not k.startswith("tuner/"))


# --- the trial table -----------------------------------------------------------------------------------------------

# --- the stage -----------------------------------------------------------------------------------------------------

def run_tune(config: Any, index: DatasetIndex | None = None, verbose: int = 0) -> TuneResult:
    """Run (or continue) the configured search in ``<run>/tuner/``; its best trial replaces the run's model if its
    validation metric beats the model's (``selected_val_metrics`` in the manifest), or becomes the model when the
    run has none. The trial table, the trade-off plot and the decision are recorded in the manifest ('tune').

    When the best trial is a scaled-densenet at another resolution, ``config.preprocess.image_size`` is set to it
    (and the manifest's ``preprocess`` with it) so later stages feed the model what it was trained on.
    """
    from medq.tune.kt_private import distributed_role

    role = distributed_role()
    if role == "worker":  # workers share the chief's run folder; only the chief (or a lone tuner) writes the run
        return _run_tune(config, pinned.run_index(config, index, write=False), verbose, role)
    with runrecord.writer_lock(config.run_dir, "tune"):
        return _run_tune(config, pinned.run_index(config, index, stage="tune"), verbose, role)


def _run_tune(config: Any, index: DatasetIndex, verbose: int, role: str) -> TuneResult:
    start = time.perf_counter()
    run_dir = config.run_dir
    project = run_dir / TUNER_PROJECT
    project.mkdir(parents=True, exist_ok=True)
    hp = declare_space(config, index.task)
    _check_signature(project, config, worker=role == "worker")
    from medq.tune.kt_private import search_gave_up, serve_oracle

    heartbeat = max(1.0, config.tune.worker_timeout / 6) if role == "worker" else None
    tuner = make_tuner(config, hp, _trial_runner(config, index, _warm_start_model(config, project)), heartbeat)
    dropped: list[dict[str, Any]] = []
    try:
        if role == "chief":
            dropped = serve_oracle(tuner, config.tune.worker_timeout)
        else:
            tuner.search(verbose=verbose)
    except RuntimeError as exc:  # keras-tuner gives up after max_consecutive_failed_trials failed trials
        gave_up = search_gave_up(exc)
        if gave_up is None:
            raise
        raise MedqError(f"{project}: {gave_up}") from None
    if role == "worker":
        mine = [r for r in collect_trials(project, config.run.objective) if r.tuner_id == tuner.tuner_id]
        return TuneResult(mine, None, None, False, "worker: the chief selects the model", role,
                          time.perf_counter() - start)
    objective = config.run.objective
    rows = collect_trials(project, objective, tuner.oracle)
    best, tradeoff = pick(rows, config.tune.tradeoff_tolerance, objective)
    staging = runrecord.staging_dir(run_dir)
    reports = {
        "tune_trials_csv": artifacts.write_text(staging / REPORT_CSV, trial_table_csv(rows, best, tradeoff)),
        "tune_trials_md": artifacts.write_text(staging / REPORT_MD,
                                               trial_table_markdown(rows, best, tradeoff, objective)),
    }
    current = runrecord.read_manifest(run_dir).facts.selected_val_metrics or {}
    png = tradeoff_png(rows, best, tradeoff, objective, staging / REPORT_PNG,
                       reference=number(current.get(objective)))
    if png is not None:
        reports["tune_tradeoff_png"] = png
    replaced, decision, top = _select(config, index, best)
    seconds = time.perf_counter() - start
    entry = {"tuner": config.tune.tuner, "objective": objective,
             "trials": [r.to_dict() for r in rows], "best_trial": best.trial_id if best else None,
             "tradeoff_trial": tradeoff.trial_id if tradeoff else None, "replaced": replaced, "decision": decision,
             "best_values": best.values if best else None, "seconds": round(seconds, 1),
             "dropped_workers": dropped}
    model_artifact = {"keras_model": staging / runrecord.KERAS_MODEL} if replaced else {}
    runrecord.commit(run_dir, "tune", config=config, artifacts=reports | model_artifact, inputs=("split",),
                     facts=top | {"objective": objective}, **entry)
    log.info("tune: %s", decision)
    return TuneResult(rows, best, tradeoff, replaced, decision, role, seconds, reports)


def _warm_start_model(config: Any, project: Path) -> Path | None:
    """A snapshot of the run's trained model, taken once, so resumed trials start from the same weights."""
    snapshot = project / WARM_START_MODEL
    if not config.tune.warm_start:
        return None
    if not snapshot.exists():
        if not runrecord.usable(config.run_dir, "keras_model"):
            log.info("tune: no trained model in the run yet; trials start from scratch")
            return None
        trained = runrecord.verified_path(config.run_dir, "keras_model", config)
        artifacts.write_bytes(snapshot, trained.read_bytes())
    log.info("tune: trials start from the trained model (tune.warm_start)")
    return snapshot


def _select(config: Any, index: DatasetIndex, best: TrialRow | None) -> tuple[bool, str, dict[str, Any]]:
    """Copy the best trial's model over the run's when it is better (atomically); returns (replaced, why, top)."""
    from medq.fitting import dataset_facts

    run_dir = config.run_dir
    if best is None:
        return False, "no trial completed; the run's model is unchanged", {}
    manifest = runrecord.read_manifest(run_dir)
    has_model = runrecord.usable(run_dir, "keras_model")
    current = manifest.facts.selected_val_metrics if has_model else None
    source = run_dir / TUNER_PROJECT / f"trial_{best.trial_id}" / TRIAL_MODEL
    metric = config.run.objective
    trial = f"trial {best.trial_id}'s validation AUC {with_ci(best.val_auc, best.val_auc_ci, 4) or 'n/a'}"
    if current is not None and manifest.facts.model_source == "tune" and \
            manifest.artifacts["keras_model"].sha256 == artifacts.sha256(source):
        return False, f"trial {best.trial_id} is already the run's model", {}
    if current is not None and best.at_chance:
        return False, f"kept the run's model: the best {trial} is not above chance", {}
    if current is not None and not is_better(best.val_metrics, current, metric):
        return False, (f"kept the trained model: its validation {metric} {fmt(number(current.get(metric)))} "
                       f"(AUC {fmt(number(current.get('auc')))}) is not beaten by the best trial "
                       f"{best.trial_id}'s {best.val_objective:.4f} (AUC {fmt(best.val_auc)})"), {}
    if best.at_chance:
        log.warning("tune: the run had no model, so the best trial became it, but its validation AUC is not above "
                    "chance: train longer or check the data")
    staged = runrecord.staging_path(run_dir, runrecord.KERAS_MODEL)
    shutil.copyfile(source, staged)  # committed with the manifest entry
    top: dict[str, Any] = {"model_source": "tune", "selected_val_metrics": best.val_metrics,
                           "tuned_hyperparameters": best.values, "selected_hyperparameters": best.values}
    if best.image_size and best.image_size != config.preprocess.image_size:
        log.warning("the tuned model takes %d px input: preprocess.image_size is now %d for this run",
                    best.image_size, best.image_size)
        config.preprocess.image_size = best.image_size
    top |= dataset_facts(config, index)
    top[thresholds.MANIFEST_KEY] = _thresholds_of(config, index, staged)
    was = "no trained model" if current is None else f"the trained model's {fmt(number(current.get(metric)))}"
    return True, (f"trial {best.trial_id} became the run's model: validation {metric} {best.val_objective:.4f} "
                  f"(AUC {with_ci(best.val_auc, best.val_auc_ci, 4) or 'n/a'}) over {was}"), top


def _thresholds_of(config: Any, index: DatasetIndex, model_path: Path) -> dict[str, Any]:
    """The operating thresholds of the tuned model that replaces the run's: chosen on the validation split by the
    config's policy, as train chooses them for its model (the trained model's no longer apply)."""
    from medq.data.cache import image_cache
    from medq.fitting import predict_dataset
    from medq.models import load_keras_model
    from medq.preprocess import PreprocessSpec
    from medq.tfdata import image_dataset

    spec = PreprocessSpec.from_config(config)
    val = image_dataset(index.paths("val"), index.labels("val"), spec, batch_size=64, cache=image_cache(config, spec))
    y_true, y_prob = predict_dataset(load_keras_model(model_path), val)
    return thresholds.for_run(config, index.task, index.classes, y_true, y_prob, artifacts.sha256(model_path))
