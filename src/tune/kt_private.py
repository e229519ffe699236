"""Everything medq's tuning takes from keras-tuner beyond its public API, in one place.

keras-tuner's public API has no hook for a worker's heartbeat, for dropping a dead worker or for reading a finished
search's trials, so this module uses its internals: ``keras_tuner.src.distribute`` (the chief's gRPC servicer and the
role variables), ``keras_tuner.src.protos``, ``Trial.to_proto``, the oracle's ``_retry_queue`` and
``@synchronized`` lock, the layout of ``trial.json`` and the text of the error it raises after too many failed
trials. They were written against :data:`SUPPORTED`; importing this module with any other keras-tuner version is a
:class:`~medq.errors.MedqError` naming the range, not a wrong search later. No other medq module imports
``keras_tuner.src`` (tests/test_layers.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Iterator

import keras_tuner

from medq.errors import MedqError

SUPPORTED = (1, 4), (1, 5)  # keras-tuner >=1.4,<1.5: setup.cfg's range (tests/test_tune_private.py checks they agree)
SUPPORTED_TEXT = ">={}.{},<{}.{}".format(*SUPPORTED[0], *SUPPORTED[1])

log = logging.getLogger("medq")


def check_version(version: str) -> None:
    """Refuse a keras-tuner whose internals this module was not written against."""
    parts = re.match(r"(\d+)\.(\d+)", version)
    if parts is None or not SUPPORTED[0] <= (int(parts[1]), int(parts[2])) < SUPPORTED[1]:
        raise MedqError(f"keras-tuner {version} is installed, but medq's tuning relies on keras-tuner internals "
                        f"written for keras-tuner {SUPPORTED_TEXT}; install the pinned one "
                        "(pip install -r env/requirements.txt)")


check_version(keras_tuner.__version__)

# Imported only after the version check: another version may not have these modules at all.
import grpc  # noqa: E402
from keras_tuner.src import protos  # noqa: E402
from keras_tuner.src.distribute import oracle_chief, utils  # noqa: E402
from keras_tuner.src.engine import trial as trial_module  # noqa: E402
from keras_tuner.src.engine.oracle import synchronized  # noqa: E402

GAVE_UP = "Number of consecutive failures"  # how keras-tuner's RuntimeError after too many failed trials begins


def distributed_role() -> str:
    """'standalone', or with keras-tuner's distribution variables set, 'chief' or 'worker'."""
    if not utils.has_chief_oracle():
        return "standalone"
    return "chief" if utils.is_chief_oracle() else "worker"


def read_trial(trial_dir: Path) -> dict[str, Any]:
    """keras-tuner's ``trial.json`` of one trial folder as {trial_id, status, values, message}; keys it lacks (a
    trial that has not saved yet) are absent."""
    path = trial_dir / "trial.json"
    trial = json.loads(path.read_text()) if path.is_file() else {}
    out = {"trial_id": trial.get("trial_id"), "status": trial.get("status"),
           "values": (trial.get("hyperparameters") or {}).get("values"), "message": trial.get("message")}
    return {k: v for k, v in out.items() if v is not None}


def search_gave_up(exc: BaseException) -> str | None:
    """keras-tuner's "too many consecutive failed trials" error as one line with the last trial's error, or None
    for any other error."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not isinstance(exc, RuntimeError) or not lines or not lines[0].startswith(GAVE_UP):
        return None
    return f"{lines[0].rstrip('.')}; the last trial failed with: {_error_line(lines)}"


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


# --- a worker's heartbeat -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def heartbeat(tuner, trial_id: str, interval: float | None) -> Iterator[None]:
    """A distributed worker tells the chief it is alive while it runs a trial: an UpdateTrial without metrics every
    ``interval`` seconds (keras-tuner reports nothing between a trial's start and its end)."""
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


# --- the chief ----------------------------------------------------------------------------------------------------

def serve_oracle(tuner, worker_timeout: float, poll_seconds: float = 0.5) -> list[dict[str, Any]]:
    """The chief: serve the oracle over gRPC until every trial is handed out and finished.

    keras-tuner's own ``start_server`` polls the workers' exit every 20 s and waits forever for a worker that died;
    here a worker whose last message (heartbeat, trial request, result) is older than ``worker_timeout`` seconds is
    dropped and its trial handed to the next worker that asks. Returns the workers dropped.
    """
    oracle = tuner.oracle
    tuner.save()
    if oracle.remaining_trials() == 0 and not oracle.ongoing_trials:
        return []  # a finished search, reloaded
    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = HeartbeatServicer(oracle)
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


class HeartbeatServicer(oracle_chief.OracleServicer):
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
            # keras-tuner would stop this worker; if the busy one is dead, its trial would then have no one left to
            # run it once dropped. The worker asks again (IDLE) until the others end or are dropped.
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
            self.dropped.append({"tuner_id": tuner_id, "trial_id": trial.trial_id, "silent_seconds": round(silent)})
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
    """Take ``tuner_id``'s running trial back and queue it for the next worker; None when it holds none."""
    trial = oracle.ongoing_trials.pop(tuner_id, None)
    if trial is not None:
        oracle.tuner_ids.discard(tuner_id)
        oracle._retry_queue.append(trial.trial_id)  # keras-tuner's queue of trials to run again, served first
        oracle.save()
    return trial
