"""keras-tuner's distributed mode on loopback: a chief oracle and two workers as separate `medq tune` processes.

Slow (minutes of three TensorFlow processes); the chief's rules themselves are tested in-process in
test_tune_chief.py."""
import os
import socket
import subprocess
import sys
import time

import pytest

from medq import runrecord

pytestmark = pytest.mark.slow


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chief_and_two_workers_share_the_trials(tmp_path):
    from medq.data.phantoms import generate_chest_pneumonia

    data = tmp_path / "chest_xray"
    generate_chest_pneumonia(data, 40, 4, 8, 40, 7)
    config = tmp_path / "search.yaml"
    config.write_text(f"""
run: {{name: dist, output_dir: {tmp_path / 'out'}}}
data: {{root: {data}, generate: false}}
preprocess: {{image_size: 32}}
model: {{name: refkit-cnn, params: {{blocks: 2, filters: 4, dense_units: 8}}}}
train: {{tensorboard: false}}
tune:
  max_trials: 4
  epochs: 1
  latency_runs: 2
  search_space: {{learning_rate: [0.001, 0.003], batch_size: [8, 16]}}
""")
    base = dict(os.environ, KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(_free_port()),
                TF_CPP_MIN_LOG_LEVEL="2")
    # Workers import TensorFlow first, then wait for each other before asking the chief for trials: a worker that
    # starts seconds late on a busy machine would otherwise find every trial taken.
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    start = ("import os, sys, time, pathlib, tensorflow, keras_tuner, medq.tune.stage; from medq.cli import main; "
             "b = pathlib.Path(sys.argv[1]); tid = os.environ['KERASTUNER_TUNER_ID']; (b / tid).touch(); "
             "t = time.time()\n"
             "while tid != 'chief' and len(list(b.iterdir())) < 3 and time.time() - t < 300: time.sleep(0.1)\n"
             "sys.exit(main(sys.argv[2:]))")
    args = [sys.executable, "-c", start, str(barrier), "tune", "--config", str(config)]
    procs = {tid: subprocess.Popen(args, env=dict(base, KERASTUNER_TUNER_ID=tid), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
             for tid in ("chief", "tuner0", "tuner1")}
    try:
        deadline = time.monotonic() + 600  # one deadline for all three, not 600 s each
        outputs = {tid: p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for tid, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    assert {tid: p.returncode for tid, p in procs.items()} == {"chief": 0, "tuner0": 0, "tuner1": 0}, outputs

    manifest = runrecord.read_manifest(tmp_path / "out" / "dist")
    trials = manifest["stages"]["tune"]["trials"]
    assert len(trials) == 4 and all(t["status"] == "COMPLETED" for t in trials)
    ran = {t["tuner_id"] for t in trials}
    assert ran == {"tuner0", "tuner1"}, f"each worker should run at least one trial: {trials}"
    assert manifest["model_source"] == "tune"  # the chief selected the best trial as the run's model
    assert len({tuple(sorted(t["values"].items())) for t in trials}) == 4  # no trial ran twice


def test_a_worker_killed_mid_trial_does_not_hang_the_chief_and_its_trial_runs_elsewhere(tmp_path):
    from medq.data.phantoms import generate_chest_pneumonia

    data = tmp_path / "chest_xray"
    generate_chest_pneumonia(data, 40, 4, 8, 40, 7)
    config = tmp_path / "search.yaml"
    config.write_text(f"""
run: {{name: dist, output_dir: {tmp_path / 'out'}}}
data: {{root: {data}, generate: false}}
preprocess: {{image_size: 32}}
model: {{name: refkit-cnn, params: {{blocks: 2, filters: 4, dense_units: 8}}}}
train: {{tensorboard: false}}
tune:
  max_trials: 3
  epochs: 1
  latency_runs: 2
  worker_timeout: 6
  search_space: {{learning_rate: [0.001, 0.003], batch_size: [8, 16]}}
""")
    base = dict(os.environ, KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(_free_port()),
                TF_CPP_MIN_LOG_LEVEL="2")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    # tuner1 SIGKILLs itself once its first trial has started (after the chief handed it the trial); tuner0 starts
    # its first trial only after that, so that tuner1 always holds a trial when it dies (on a loaded machine tuner0
    # could otherwise finish every trial before tuner1 asks for one)
    start = ("import os, signal, sys, time, pathlib, tensorflow, keras_tuner, medq.tune.stage\n"
             "from medq.cli import main\n"
             "b = pathlib.Path(sys.argv[1]); tid = os.environ['KERASTUNER_TUNER_ID']; (b / tid).touch(); "
             "t = time.time(); sized = medq.tune.stage.with_image_size\n"
             "def dying(*a): (b.parent / 'tuner1-has-a-trial').touch(); os.kill(os.getpid(), signal.SIGKILL)\n"
             "def waiting(*a):\n"
             "    while not (b.parent / 'tuner1-has-a-trial').exists() and time.time() - t < 300: time.sleep(0.1)\n"
             "    return sized(*a)\n"
             "if tid == 'tuner1': medq.tune.stage.with_image_size = dying\n"
             "if tid == 'tuner0': medq.tune.stage.with_image_size = waiting\n"
             "while tid != 'chief' and len(list(b.iterdir())) < 3 and time.time() - t < 300: time.sleep(0.1)\n"
             "sys.exit(main(sys.argv[2:]))")
    args = [sys.executable, "-c", start, str(barrier), "tune", "--config", str(config)]
    procs = {tid: subprocess.Popen(args, env=dict(base, KERASTUNER_TUNER_ID=tid), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
             for tid in ("chief", "tuner0", "tuner1")}
    try:
        deadline = time.monotonic() + 600  # one deadline for all three, not 600 s each
        outputs = {tid: p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for tid, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    codes = {tid: p.returncode for tid, p in procs.items()}
    assert codes == {"chief": 0, "tuner0": 0, "tuner1": -9}, outputs

    stage = runrecord.read_manifest(tmp_path / "out" / "dist")["stages"]["tune"]
    (dropped,) = stage["dropped_workers"]
    assert dropped["tuner_id"] == "tuner1" and dropped["silent_seconds"] >= 6
    trials = stage["trials"]
    assert len(trials) == 3 and all(t["status"] == "COMPLETED" for t in trials), trials
    assert {t["tuner_id"] for t in trials} == {"tuner0"}  # tuner0 ran tuner1's trial too
    assert dropped["trial_id"] in {t["trial_id"] for t in trials}

