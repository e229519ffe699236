"""The distributed chief's rules in-process, against a real keras-tuner Oracle (no gRPC, no training): when a worker
must wait, how a silent worker's trial is requeued and handed on, heartbeats; and the rest of medq.tune.kt_private
(the version check, trial.json, keras-tuner's give-up error). The same rules across processes: test_tune_distributed.py
(slow)."""
import configparser
from pathlib import Path

import pytest

from medq.errors import MedqError
from medq.tune import kt_private

protos, trial_module = kt_private.protos, kt_private.trial_module


def _oracle(tmp_path, max_trials, **kwargs):
    from keras_tuner import HyperParameters, Objective
    from keras_tuner.oracles import RandomSearchOracle

    hp = HyperParameters()
    hp.Choice("lr", [0.1, 0.2, 0.3, 0.4])
    oracle = RandomSearchOracle(objective=Objective("val_auc", "max"), max_trials=max_trials, hyperparameters=hp,
                                seed=1, **kwargs)
    oracle._set_project_dir(str(tmp_path), "search")
    return oracle


def _complete(oracle, trial, auc=0.7):
    oracle.update_trial(trial.trial_id, {"val_auc": auc})
    trial.status = "COMPLETED"
    oracle.end_trial(trial)


def test_a_worker_waits_only_while_no_trial_is_left_but_others_still_hold_one(tmp_path):
    oracle = _oracle(tmp_path, max_trials=2)
    assert not kt_private.must_wait(oracle, "a")  # trials left to hand out
    first = oracle.create_trial("a")
    second = oracle.create_trial("b")
    assert not kt_private.must_wait(oracle, "a")  # it holds a trial itself: keras-tuner answers it
    assert kt_private.must_wait(oracle, "c")  # none left, but a and b may die and theirs come back
    kt_private.requeue_trial(oracle, "b")
    assert not kt_private.must_wait(oracle, "c")  # b's trial is queued: c gets it
    retried = oracle.create_trial("c")
    assert retried.trial_id == second.trial_id
    _complete(oracle, first)
    _complete(oracle, retried)
    assert not oracle.ongoing_trials and not kt_private.must_wait(oracle, "c")  # all done: stop, do not wait


def test_a_requeued_trial_is_the_next_one_handed_out_with_its_values(tmp_path):
    oracle = _oracle(tmp_path, max_trials=3)
    taken = oracle.create_trial("dead")
    returned = kt_private.requeue_trial(oracle, "dead")
    assert returned.trial_id == taken.trial_id
    assert "dead" not in oracle.ongoing_trials and "dead" not in oracle.tuner_ids
    assert kt_private.requeue_trial(oracle, "dead") is None  # nothing left to take back
    assert kt_private.requeue_trial(oracle, "never-seen") is None
    again = oracle.create_trial("live")
    assert again.trial_id == taken.trial_id and again.hyperparameters.values == taken.hyperparameters.values
    assert len(oracle.trials) == 1  # the same trial, not a new one
    fresh = oracle.create_trial("other")
    assert fresh.trial_id != taken.trial_id


def _servicer(oracle):
    servicer = kt_private.HeartbeatServicer(oracle)
    servicer.idle_seconds = 0
    return servicer


def _ask(servicer, tuner_id):
    request = protos.get_service().CreateTrialRequest(tuner_id=tuner_id)
    return trial_module.Trial.from_proto(servicer.CreateTrial(request, None).trial)


def _beat(servicer, trial_id):
    servicer.UpdateTrial(protos.get_service().UpdateTrialRequest(trial_id=trial_id, metrics={}), None)


def test_only_a_worker_silent_past_the_timeout_is_dropped_and_a_heartbeat_keeps_one_alive(tmp_path):
    oracle = _oracle(tmp_path, max_trials=3)
    servicer = _servicer(oracle)
    silent, beating, quiet = _ask(servicer, "silent"), _ask(servicer, "beating"), _ask(servicer, "quiet")
    for tuner_id in ("silent", "beating"):
        servicer.last_seen[tuner_id] -= 60
    servicer.last_seen["quiet"] -= 20  # silent, but not yet for the timeout
    _beat(servicer, beating.trial_id)  # a heartbeat (no metrics) refreshes its worker
    assert oracle.trials[beating.trial_id].status == "RUNNING"  # and changes nothing else

    servicer.drop_silent_workers(timeout=30)
    assert [(d["tuner_id"], d["trial_id"]) for d in servicer.dropped] == [("silent", silent.trial_id)]
    assert 60 <= servicer.dropped[0]["silent_seconds"] <= 61
    assert set(oracle.ongoing_trials) == {"beating", "quiet"}
    assert oracle.ongoing_trials["quiet"].trial_id == quiet.trial_id
    servicer.drop_silent_workers(timeout=30)
    assert len(servicer.dropped) == 1  # dropped once
    assert _ask(servicer, "new").trial_id == silent.trial_id  # its trial goes to the next worker that asks


def test_a_worker_that_finishes_first_waits_for_a_dead_workers_trial_instead_of_leaving(tmp_path):
    """The live worker asks for more work before the dead one is noticed: it must be told to wait (IDLE), not stop,
    or the dead worker's trial is dropped into the retry queue with no one left to run it."""
    oracle = _oracle(tmp_path, max_trials=2)
    servicer = _servicer(oracle)

    def finish(trial):
        trial.status = "COMPLETED"
        _beat(servicer, trial.trial_id)
        oracle.update_trial(trial.trial_id, {"val_auc": 0.7})
        servicer.EndTrial(protos.get_service().EndTrialRequest(trial=trial.to_proto()), None)

    dead_trial, live_trial = _ask(servicer, "dead"), _ask(servicer, "live")
    finish(live_trial)
    assert _ask(servicer, "live").status == "IDLE"  # keras-tuner alone answers STOPPED here and forgets the worker
    assert not servicer.stop_triggered

    servicer.last_seen["dead"] -= 60
    servicer.drop_silent_workers(timeout=30)
    retried = _ask(servicer, "live")
    assert retried.trial_id == dead_trial.trial_id and retried.status == "RUNNING"
    finish(retried)
    assert _ask(servicer, "live").status == "STOPPED" and kt_private.oracle_chief.exit_chief(oracle)
    assert {t.status for t in oracle.trials.values()} == {"COMPLETED"} and len(oracle.trials) == 2


# --- the rest of keras-tuner's internals ---------------------------------------------------------------------------

def test_the_supported_keras_tuner_range_is_setup_cfgs_and_other_versions_are_refused():
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    declared = [line.strip() for line in setup["options"]["install_requires"].splitlines()
                if line.strip().startswith("keras-tuner")]
    assert declared == [f"keras-tuner{kt_private.SUPPORTED_TEXT}"]
    for fine in ("1.4.0", "1.4.8", "1.4.10rc1"):
        kt_private.check_version(fine)
    for wrong in ("1.3.9", "1.5.0", "2.0.0", "1.40.0", "dev"):
        with pytest.raises(MedqError, match=rf"keras-tuner {wrong} is installed.*keras-tuner >=1\.4,<1\.5"):
            kt_private.check_version(wrong)


def test_trial_json_as_keras_tuner_writes_it(tmp_path):
    oracle = _oracle(tmp_path, max_trials=2)
    trial = oracle.create_trial("tuner0")
    _complete(oracle, trial, auc=0.8)
    folder = tmp_path / "search" / f"trial_{trial.trial_id}"  # keras-tuner's project layout
    assert kt_private.read_trial(folder) == {"trial_id": trial.trial_id, "status": "COMPLETED",
                                             "values": {"lr": trial.hyperparameters.get("lr")}}
    assert kt_private.read_trial(tmp_path / "no-such-trial") == {}


def test_keras_tuners_give_up_error_becomes_one_line_with_the_last_trials_error(tmp_path):
    oracle = _oracle(tmp_path, max_trials=3, max_consecutive_failed_trials=1)
    trial = oracle.create_trial("tuner0")
    trial.status = "FAILED"
    trial.message = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in run\n"
                     "ValueError: Exception encountered when calling layer 'pool' (type MaxPooling2D).\n\n"
                     "Negative dimension size caused by subtracting 2 from 1\n")
    with pytest.raises(RuntimeError) as raised:
        oracle.end_trial(trial)
    assert kt_private.search_gave_up(raised.value) == (
        "Number of consecutive failures exceeded the limit of 1; the last trial failed with: ValueError: Exception "
        "encountered when calling layer 'pool' (type MaxPooling2D). Negative dimension size caused by subtracting "
        "2 from 1")
    assert kt_private.search_gave_up(RuntimeError("something else")) is None
    assert kt_private.search_gave_up(ValueError("Number of consecutive failures")) is None
