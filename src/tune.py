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

import contextlib
import csv
import dataclasses
import inspect
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from medq import artifacts, runrecord
from medq.data import pinned
from medq.data.index import DatasetIndex
from medq.errors import ConfigError, MedqError
from medq.losses import resolve_loss_name
from medq.metrics import with_ci
from medq.selection import at_chance, is_better, other_metric, rank

log = logging.getLogger("medq")

TUNER_PROJECT = "tuner"  # <run>/tuner/: keras-tuner's project folder
TRIAL_FACTS = "medq_trial.json"
WARM_START_MODEL = "warm_start.keras"
TRIAL_MODEL = "model.keras"
SEARCH_FILE = "medq_search.json"
REPORT_CSV, REPORT_MD, REPORT_PNG = "tune_trials.csv", "tune_trials.md", "tune_tradeoff.png"
OBJECTIVE = "val_objective"
FIT_KEYS = ("learning_rate", "batch_size", "dropout", "optimizer", "loss")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
RANGE_KINDS = ("loguniform", "uniform", "int")
SCALING_KEYS = ("alpha", "beta", "phi")


@dataclass
class TrialRow:
    """One trial as the table shows it."""

    trial_id: str
    status: str
    values: dict[str, Any]
    tuner_id: str | None = None
    image_size: int | None = None
    epochs: int | None = None
    val_objective: float | None = None
    val_auc: float | None = None
    val_auc_ci: list[float] | None = None
    val_accuracy: float | None = None
    val_accuracy_ci: list[float] | None = None
    at_chance: bool = False  # the validation AUC's 95% interval reaches 0.5
    parameters: int | None = None
    flops: int | None = None
    latency_ms: float | None = None
    seconds: float | None = None
    pareto: bool = False
    message: str | None = None
    val_metrics: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def completed(self) -> bool:
        return self.status == "COMPLETED" and self.val_objective is not None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("val_metrics")
        return out


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


# --- the search space ---------------------------------------------------------------------------------------------

def _model_params(model_name: str) -> set[str]:
    from medq.models import MODELS, model_names

    model_names()  # registers the zoo
    fn = MODELS.get(model_name)
    if fn is None:
        raise ConfigError(f"model.name: unknown model {model_name!r}; choose one of {', '.join(sorted(MODELS))}")
    return {name for name, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY}


def _scaling_defaults() -> dict[str, float]:
    from medq.models import zoo

    params = inspect.signature(zoo.scaled_densenet).parameters
    return {k: params[k].default for k in SCALING_KEYS}


def declare_space(config: Any, task: str):
    """``tune.search_space`` → keras_tuner.HyperParameters, every name and value checked before any trial runs."""
    import keras_tuner as kt

    space = config.tune.search_space
    if not space:
        raise ConfigError("tune.search_space: empty; give at least learning_rate and batch_size choices")
    allowed = set(FIT_KEYS) | _model_params(config.model.name)
    hp = kt.HyperParameters()
    for name, spec in space.items():
        where = f"tune.search_space.{name}"
        if name not in allowed:
            raise ConfigError(f"{where}: {config.model.name} has no such setting; "
                              f"use one of {', '.join(sorted(allowed))}")
        if not spec:
            raise ConfigError(f"{where}: empty list; give choices or [loguniform, low, high]")
        if isinstance(spec[0], str) and spec[0] in RANGE_KINDS:
            if len(spec) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec[1:]) \
                    or not spec[1] < spec[2]:
                raise ConfigError(f"{where}: a range is [{spec[0]}, low, high] with low < high, got {spec}")
            kind, low, high = spec
            if kind == "int":
                hp.Int(name, int(low), int(high))
            else:
                if kind == "loguniform" and low <= 0:
                    raise ConfigError(f"{where}: a loguniform range needs low > 0, got {low}")
                hp.Float(name, float(low), float(high), sampling="log" if kind == "loguniform" else "linear")
            continue
        values = list(spec)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and \
                any(isinstance(v, float) for v in values):
            values = [float(v) for v in values]  # keras-tuner wants one type per Choice
        if len({type(v) for v in values}) > 1:
            raise ConfigError(f"{where}: choices must all be numbers or all be names, got {values}")
        if name == "loss":
            for v in values:
                resolve_loss_name(v, task)
        if name == "optimizer" and set(values) - set(OPTIMIZERS):
            raise ConfigError(f"{where}: optimizers are {', '.join(OPTIMIZERS)}, got {values}")
        if name == "batch_size" and any(not isinstance(v, int) or v <= 0 for v in values):
            raise ConfigError(f"{where}: batch sizes are positive integers, got {values}")
        hp.Choice(name, values)
    _check_scaling(config, space)
    return hp


def _check_scaling(config: Any, space: dict[str, list[Any]]) -> None:
    """Every (alpha, beta) the search can pick must satisfy the compound-scaling constraint."""
    if config.model.name != "scaled-densenet":
        return
    from medq.models.zoo import compound_scaling

    base = _scaling_defaults() | {k: v for k, v in config.model.params.items() if k in SCALING_KEYS}

    def options(key):
        spec = space.get(key)
        if spec is None:
            return [base[key]]
        return [spec[1], spec[2]] if isinstance(spec[0], str) else list(spec)

    for alpha, beta in itertools.product(options("alpha"), options("beta")):
        try:
            compound_scaling(float(alpha), float(beta), 0.0)
        except ConfigError as exc:
            raise ConfigError(f"tune.search_space: {exc}") from None


def trial_settings(config: Any, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
    """A trial's values → (fit_model keyword arguments, model params, input resolution).

    For scaled-densenet searches over alpha/beta/phi the resolution is preprocess.image_size · γ^φ (the φ = 0
    size is the config's); every other model keeps preprocess.image_size.
    """
    fit = {k: values[k] for k in FIT_KEYS if k in values}
    params = {k: v for k, v in values.items() if k not in FIT_KEYS and not k.startswith("tuner/")}
    size = config.preprocess.image_size
    if config.model.name == "scaled-densenet" and any(k in params for k in SCALING_KEYS):
        from medq.models.zoo import scaled_image_size

        s = _scaling_defaults() | {k: v for k, v in config.model.params.items() if k in SCALING_KEYS} | \
            {k: v for k, v in params.items() if k in SCALING_KEYS}
        size = scaled_image_size(size, float(s["alpha"]), float(s["beta"]), float(s["phi"]))
    return fit, params, size


def with_image_size(config: Any, size: int) -> Any:
    if size == config.preprocess.image_size:
        return config
    return dataclasses.replace(config, preprocess=dataclasses.replace(config.preprocess, image_size=size))


def _search_signature(config: Any) -> dict[str, Any]:
    """What a resumed search must share with the one in the folder (max_trials may grow): also the split settings
    and the run's pinned split itself."""
    return {"tuner": config.tune.tuner, "search_space": config.tune.search_space, "epochs": config.tune.epochs,
            "hyperband_factor": config.tune.hyperband_factor, "model": config.model.name,
            "model_params": config.model.params, "preprocess": dataclasses.asdict(config.preprocess),
            "data": pinned.split_settings(config), "split": runrecord.split_sha(config.run_dir),
            "warm_start": config.tune.warm_start, "objective": config.run.objective}


def _check_signature(project: Path, config: Any, worker: bool = False) -> None:
    path = project / SEARCH_FILE
    mine = json.loads(json.dumps(_search_signature(config), default=str))
    if path.is_file():
        theirs = json.loads(path.read_text())
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

        def __init__(self, runner, **kwargs):
            self._medq_runner = runner
            super().__init__(**kwargs)

        def run_trial(self, trial, *args, **kwargs):
            with _heartbeat(self, trial.trial_id):
                return self._medq_runner(self, trial, verbose=kwargs.get("verbose", 0))

        def load_model(self, trial):
            from medq.models import load_keras_model

            return load_keras_model(Path(self.get_trial_dir(trial.trial_id)) / TRIAL_MODEL)

    MedqTuner.__name__ = f"Medq{base.__name__}"
    return MedqTuner


def make_tuner(config: Any, hp, runner):
    import keras_tuner as kt

    tc = config.tune
    common = dict(objective=kt.Objective(OBJECTIVE, "max"), seed=config.run.seed, hyperparameters=hp,
                  directory=str(config.run_dir), project_name=TUNER_PROJECT, overwrite=False)
    if tc.tuner == "hyperband":
        if tc.hyperband_factor < 2:
            raise ConfigError(f"tune.hyperband_factor: must be 2 or more, got {tc.hyperband_factor}")
        return _tuner_class("hyperband")(runner, max_epochs=tc.epochs, factor=tc.hyperband_factor, **common)
    return _tuner_class(tc.tuner)(runner, max_trials=tc.max_trials, **common)


def distributed_role() -> str:
    """'standalone', or with keras-tuner's distribution variables set, 'chief' or 'worker'."""
    from keras_tuner.src.distribute import utils

    if not utils.has_chief_oracle():
        return "standalone"
    return "chief" if utils.is_chief_oracle() else "worker"


@contextlib.contextmanager
def _heartbeat(tuner, trial_id: str) -> Iterator[None]:
    """A distributed worker tells the chief it is alive while it runs a trial: an UpdateTrial without metrics every
    ``tune.worker_timeout / 6`` seconds (keras-tuner reports nothing between a trial's start and its end)."""
    interval = getattr(tuner, "_medq_heartbeat", None)
    if not interval or not hasattr(tuner.oracle, "stub"):  # standalone, or the chief's own oracle
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                tuner.oracle.update_trial(trial_id, {}, step=0)
            except Exception as exc:  # noqa: BLE001 - a missed beat is not the trial's failure
                log.debug("heartbeat for trial %s failed: %s", trial_id, exc)

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def serve_oracle(tuner, worker_timeout: float, poll_seconds: float = 0.5) -> list[dict[str, Any]]:
    """The chief: serve the oracle over gRPC until every trial is handed out and finished.

    keras-tuner's own ``start_server`` polls the workers' exit every 20 s and waits forever for a worker that died;
    here a worker whose last message (heartbeat, trial request, result) is older than ``worker_timeout`` seconds is
    dropped and its trial handed to the next worker that asks. Returns the workers dropped.
    """
    from concurrent import futures

    import grpc
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    oracle = tuner.oracle
    tuner.save()
    if oracle.remaining_trials() == 0 and not oracle.ongoing_trials:
        return []  # a finished search, reloaded
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = _heartbeat_servicer(oracle_chief.OracleServicer, protos)(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    if not server.add_insecure_port(address):
        raise MedqError(f"KERASTUNER_ORACLE_IP/PORT {address}: cannot listen there; choose a free port")
    server.start()
    log.info("oracle serving on %s", address)
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(poll_seconds)
            servicer.drop_silent_workers(worker_timeout)
    finally:
        server.stop(grace=2)
    return servicer.dropped


def _heartbeat_servicer(base, protos):
    from keras_tuner.src.engine import trial as trial_module
    from keras_tuner.src.engine.oracle import synchronized

    class HeartbeatServicer(base):
        """keras-tuner's OracleServicer that remembers when it last heard from each worker."""

        def __init__(self, oracle):
            super().__init__(oracle)
            self.last_seen: dict[str, float] = {}
            self.dropped: list[dict[str, Any]] = []
            self.idle_seconds = 1.0

        def _seen_trial(self, trial_id: str) -> None:
            for tuner_id, trial in list(self.oracle.ongoing_trials.items()):
                if trial.trial_id == trial_id:
                    self.last_seen[tuner_id] = time.monotonic()

        def CreateTrial(self, request, context):
            self.last_seen[request.tuner_id] = time.monotonic()
            if must_wait(self.oracle, request.tuner_id):
                # keras-tuner would stop this worker; if the busy one is dead, its trial would then have no one left
                # to run it once dropped. The worker asks again (IDLE) until the others end or are dropped.
                time.sleep(self.idle_seconds)
                idle = trial_module.Trial(self.oracle.get_space(), status=trial_module.TrialStatus.IDLE)
                return protos.get_service().CreateTrialResponse(trial=idle.to_proto())
            return super().CreateTrial(request, context)

        def UpdateTrial(self, request, context):
            self._seen_trial(request.trial_id)
            if not request.metrics:  # a heartbeat
                trial = self.oracle.trials[request.trial_id]
                return protos.get_service().UpdateTrialResponse(trial=trial.to_proto())
            return super().UpdateTrial(request, context)

        def EndTrial(self, request, context):
            self._seen_trial(request.trial.trial_id)
            return super().EndTrial(request, context)

        def drop_silent_workers(self, timeout: float) -> None:
            now = time.monotonic()
            for tuner_id in [t for t in self.oracle.ongoing_trials if now - self.last_seen.get(t, now) > timeout]:
                trial = requeue_trial(self.oracle, tuner_id)
                if trial is None:
                    continue
                silent = now - self.last_seen.pop(tuner_id, now)
                self.dropped.append({"tuner_id": tuner_id, "trial_id": trial.trial_id,
                                     "silent_seconds": round(silent)})
                log.warning("tune: worker %s silent for %.0f s (dead?); its trial %s goes to the next worker",
                            tuner_id, silent, trial.trial_id)

    # keras-tuner's @synchronized locks on its first argument, so these take the oracle first (not the servicer)
    @synchronized
    def must_wait(oracle, tuner_id: str) -> bool:
        """No new trial to give, but other workers still hold trials that may come back if they are dropped."""
        return (oracle.max_trials is not None and len(oracle.trials) >= oracle.max_trials
                and not oracle._retry_queue and tuner_id not in oracle.ongoing_trials
                and bool(oracle.ongoing_trials))

    @synchronized
    def requeue_trial(oracle, tuner_id: str):
        trial = oracle.ongoing_trials.pop(tuner_id, None)
        if trial is not None:
            oracle.tuner_ids.discard(tuner_id)
            oracle._retry_queue.append(trial.trial_id)  # keras-tuner's queue of trials to run again, served first
            oracle.save()
        return trial

    return HeartbeatServicer


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


def _error_line(lines: list[str]) -> str:
    """The exception line of a traceback (with the reason Keras puts on the next line), shortened."""
    errors = [i for i, line in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception)\b", line.strip())]
    if not errors:
        return lines[-1].strip()[:300]
    i = errors[-1]
    text = lines[i].strip()
    if "Exception encountered" in text and i + 1 < len(lines):
        text += " " + lines[i + 1].strip()
    return text[:300]


def _finite(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def _short(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items() if not k.startswith("tuner/"))


# --- the trial table -----------------------------------------------------------------------------------------------

def collect_trials(project: Path, objective: str, oracle=None) -> list[TrialRow]:
    """Every trial in the project folder (keras-tuner's trial.json + medq's facts), in trial-id order."""
    rows = []
    for trial_dir in sorted(project.glob("trial_*"), key=_trial_order):
        facts_path, trial_path = trial_dir / TRIAL_FACTS, trial_dir / "trial.json"
        facts = json.loads(facts_path.read_text()) if facts_path.is_file() else {}
        trial = json.loads(trial_path.read_text()) if trial_path.is_file() else {}
        trial_id = trial.get("trial_id") or trial_dir.name[len("trial_"):]
        status = trial.get("status", "RUNNING")
        if oracle is not None and trial_id in getattr(oracle, "trials", {}):
            status = oracle.trials[trial_id].status
        values = trial.get("hyperparameters", {}).get("values") or facts.get("values", {})
        metrics = facts.get("val_metrics", {})
        message = (trial.get("message") or "").strip().splitlines()
        row = TrialRow(trial_id, status, {k: v for k, v in values.items() if not k.startswith("tuner/")},
                       facts.get("tuner_id"), facts.get("image_size"), facts.get("epochs"),
                       message=message[-1][:200] if message else None, val_metrics=metrics)
        if facts:
            ci = metrics.get("ci") or {}
            row.val_objective = _number(metrics.get(objective))
            row.val_auc, row.val_auc_ci = _number(metrics.get("auc")), ci.get("auc")
            row.val_accuracy, row.val_accuracy_ci = _number(metrics.get("accuracy")), ci.get("accuracy")
            row.at_chance = at_chance(metrics)
            row.parameters, row.flops = facts.get("parameters"), facts.get("flops")
            row.latency_ms, row.seconds = facts.get("latency_ms"), facts.get("seconds")
        rows.append(row)
    return rows


def _trial_order(trial_dir: Path) -> tuple[int, str]:
    trial_id = trial_dir.name[len("trial_"):]
    return (int(trial_id), trial_id) if trial_id.isdigit() else (1 << 30, trial_id)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _latency(row: TrialRow) -> float:
    return row.latency_ms if row.latency_ms is not None else math.inf


def pick(rows: list[TrialRow], tolerance: float, objective: str) -> tuple[TrialRow | None, TrialRow | None]:
    """(best by :func:`medq.selection.rank`, the fastest trial above chance within ``tolerance`` of the best's
    objective); marks the Pareto front of rank (higher) against latency (lower)."""
    done = [r for r in rows if r.completed]
    if not done:
        return None, None

    def key(r: TrialRow) -> tuple[bool, float, float]:
        return rank(r.val_metrics, objective)

    best = max(done, key=key)
    for r in done:
        r.pareto = not any(key(o) >= key(r) and _latency(o) <= _latency(r) and
                           (key(o) > key(r) or _latency(o) < _latency(r)) for o in done if o is not r)
    near = [r for r in done if r.at_chance == best.at_chance and r.val_objective >= best.val_objective - tolerance]
    tradeoff = min(near, key=lambda r: (_latency(r), [-k for k in key(r)]))
    return best, tradeoff


def _columns(rows: list[TrialRow]) -> list[str]:
    names = []
    for r in rows:
        names += [k for k in r.values if k not in names]
    return names


def trial_table_csv(rows: list[TrialRow], best: TrialRow | None, tradeoff: TrialRow | None) -> str:
    hp_names = _columns(rows)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "tuner", "status", *hp_names, "image_size", "epochs", "val_objective", "val_auc",
                     "val_auc_ci_low", "val_auc_ci_high", "val_accuracy", "val_accuracy_ci_low",
                     "val_accuracy_ci_high", "at_chance", "parameters", "flops", "latency_ms", "seconds", "pareto",
                     "pick"])
    for r in rows:
        auc_ci, acc_ci = r.val_auc_ci or [None, None], r.val_accuracy_ci or [None, None]
        writer.writerow([r.trial_id, r.tuner_id or "", r.status, *[r.values.get(k, "") for k in hp_names],
                         r.image_size or "", r.epochs or "", _fmt(r.val_objective), _fmt(r.val_auc),
                         _fmt(auc_ci[0]), _fmt(auc_ci[1]), _fmt(r.val_accuracy), _fmt(acc_ci[0]), _fmt(acc_ci[1]),
                         int(r.at_chance), r.parameters or "", r.flops or "", _fmt(r.latency_ms, 3),
                         r.seconds or "", int(r.pareto), _pick_label(r, best, tradeoff)])
    return out.getvalue()


def trial_table_markdown(rows: list[TrialRow], best: TrialRow | None, tradeoff: TrialRow | None,
                         objective: str) -> str:
    from medq.flops import human

    hp_names = _columns(rows)
    head = ["trial", "tuner", "status", *hp_names, "size", "val AUC [95% CI]", "val accuracy [95% CI]", "params",
            "FLOPs", "bs1 ms", "train s", "pick"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        auc = with_ci(r.val_auc, r.val_auc_ci) + (" (chance)" if r.at_chance else "")
        cells = [r.trial_id, r.tuner_id or "", r.status, *[str(r.values.get(k, "")) for k in hp_names],
                 str(r.image_size or ""), auc, with_ci(r.val_accuracy, r.val_accuracy_ci),
                 human(r.parameters) if r.parameters else "", human(r.flops) if r.flops else "",
                 _fmt(r.latency_ms, 2), str(r.seconds or ""),
                 " ".join(filter(None, [_pick_label(r, best, tradeoff), "pareto" if r.pareto else ""]))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Objective (run.objective): validation {objective} per image ({OBJECTIVE}, maximised; ties by "
             f"{other_metric(objective)}). A trial marked (chance) has a validation AUC whose 95% DeLong interval "
             "reaches 0.5: it ranks below every trial that does not and never replaces the run's model. "
             "Accuracy intervals: Wilson. "
             "bs1 ms: batch-1 Keras latency, median, measured once per trial model in the search process. "
             "pareto: no other trial is both at least as good and at least as fast."]
    if best is not None:
        notes.append(f"Best: trial {best.trial_id}. Trade-off pick: trial {tradeoff.trial_id} (the fastest within "
                     f"the configured tolerance of the best).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def _pick_label(r: TrialRow, best: TrialRow | None, tradeoff: TrialRow | None) -> str:
    labels = [name for name, t in (("best", best), ("tradeoff", tradeoff)) if t is not None and t is r]
    return "+".join(labels)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def tradeoff_png(rows: list[TrialRow], best: TrialRow | None, tradeoff: TrialRow | None, objective: str,
                 target: Path, reference: float | None = None) -> Path | None:
    """Metric against parameters, FLOPs and latency, one panel each; Pareto trials filled, best/pick labelled, and
    the run's current model's metric (``reference``, the bar a trial must beat) as a dashed line."""
    done = [r for r in rows if r.completed]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from medq.flops import human

    axes_spec = [("parameters", "parameters", True), ("flops", "FLOPs (batch 1)", True),
                 ("latency_ms", "batch-1 Keras latency, ms", False)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, (attr, label, log_scale) in zip(axes, axes_spec):
        for r in done:
            x = getattr(r, attr)
            if x is None:
                continue
            ax.scatter([x], [r.val_objective], s=50, c="tab:blue" if r.pareto else "white", edgecolors="tab:blue",
                       zorder=3)
            tag = r.trial_id + (" best" if r is best else "") + (" pick" if r is tradeoff and r is not best else "")
            ax.annotate(tag, (x, r.val_objective), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if reference is not None:
            ax.axhline(reference, color="tab:red", linestyle="--", linewidth=1,
                       label="the run's model before this tune")
        if log_scale:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"validation {objective}")
    if reference is not None:
        axes[0].legend(loc="lower right", fontsize=7)
    fig.suptitle("tuning trials: filled = Pareto front (metric vs latency)")
    fig.tight_layout()
    with artifacts.atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return target


# --- the stage -----------------------------------------------------------------------------------------------------

def run_tune(config: Any, index: DatasetIndex | None = None, verbose: int = 0) -> TuneResult:
    """Run (or continue) the configured search in ``<run>/tuner/``; its best trial replaces the run's model if its
    validation metric beats the model's (``selected_val_metrics`` in the manifest), or becomes the model when the
    run has none. The trial table, the trade-off plot and the decision are recorded in the manifest ('tune').

    When the best trial is a scaled-densenet at another resolution, ``config.preprocess.image_size`` is set to it
    (and the manifest's ``preprocess`` with it) so later stages feed the model what it was trained on.
    """
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
    tuner = make_tuner(config, hp, _trial_runner(config, index, _warm_start_model(config, project)))
    tuner._medq_heartbeat = max(1.0, config.tune.worker_timeout / 6) if role == "worker" else None
    dropped: list[dict[str, Any]] = []
    try:
        if role == "chief":
            dropped = serve_oracle(tuner, config.tune.worker_timeout)
        else:
            tuner.search(verbose=verbose)
    except RuntimeError as exc:  # keras-tuner gives up after max_consecutive_failed_trials failed trials
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        if not lines or not lines[0].startswith("Number of consecutive failures"):
            raise
        raise MedqError(f"{project}: {lines[0].rstrip('.')}; the last trial failed with: {_error_line(lines)}") \
            from None
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
                       reference=_number(current.get(objective)))
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
        return False, (f"kept the trained model: its validation {metric} {_fmt(_number(current.get(metric)))} "
                       f"(AUC {_fmt(_number(current.get('auc')))}) is not beaten by the best trial "
                       f"{best.trial_id}'s {best.val_objective:.4f} (AUC {_fmt(best.val_auc)})"), {}
    if best.at_chance:
        log.warning("tune: the run had no model, so the best trial became it, but its validation AUC is not above "
                    "chance: train longer or check the data")
    shutil.copyfile(source, runrecord.staging_path(run_dir, runrecord.KERAS_MODEL))  # committed with the manifest entry
    top: dict[str, Any] = {"model_source": "tune", "selected_val_metrics": best.val_metrics,
                           "tuned_hyperparameters": best.values, "selected_hyperparameters": best.values}
    if best.image_size and best.image_size != config.preprocess.image_size:
        log.warning("the tuned model takes %d px input: preprocess.image_size is now %d for this run",
                    best.image_size, best.image_size)
        config.preprocess.image_size = best.image_size
    top |= dataset_facts(config, index)
    was = "no trained model" if current is None else f"the trained model's {_fmt(_number(current.get(metric)))}"
    return True, (f"trial {best.trial_id} became the run's model: validation {metric} {best.val_objective:.4f} "
                  f"(AUC {with_ci(best.val_auc, best.val_auc_ci, 4) or 'n/a'}) over {was}"), top
