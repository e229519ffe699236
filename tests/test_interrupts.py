"""Ctrl-C (SIGINT) and SIGTERM stop a real `medq` process with exit 130/143 and leave its run exactly as it was.

Each command runs in a child process that sends the signal to itself at a chosen point of the work (INC's first
trial, the second training epoch): a real signal through the real handlers, at a moment the test controls.
"""
import hashlib
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from medq.config import load_config

pytestmark = pytest.mark.slow  # a tiny model is trained, frozen and quantized once (about a minute)

REPO = Path(__file__).resolve().parents[1]
WIDE = REPO / "tests" / "fixtures" / "wide_criterion_deploy.yaml"
# What belongs to the run's record; logs/ (which record the interruption) and INC's scratch workspace do not.
NOT_RECORD = ("logs", "nc_workspace", "benchmark")  # benchmark/: the benchmark's working folder


def write_films(root: Path, per_split: dict[str, int], size: int = 32) -> None:
    """Kaggle layout: a bright disc on PNEUMONIA films, a dark one on NORMAL ones."""
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for i in range(n):
            sick = i % 2 == 0
            image = rng.normal(90, 20, (size, size))
            cv2.circle(image, (size // 2, size // 2), size // 5, 230 if sick else 40, -1)
            folder = root / split / ("PNEUMONIA" if sick else "NORMAL")
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{split}{i}.png"), np.clip(image, 0, 255).astype(np.uint8))


def snapshot(run_dir: Path) -> dict[str, str]:
    """Every file of the run (its record) → sha256."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.relative_to(run_dir).parts[0] not in NOT_RECORD}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A run with a good INT8 graph from a first `medq quantize`; its --set overrides."""
    from medq.freeze import run_freeze
    from medq.quantize import run_quantize
    from medq.train import run_train

    base = tmp_path_factory.mktemp("interrupts")
    write_films(base / "chest_xray", {"train": 24, "val": 8, "test": 4})
    overrides = [f"data.root={base / 'chest_xray'}", "data.generate=false", f"run.output_dir={base / 'output'}",
                 "run.name=good", "preprocess.image_size=32", "model.params={blocks: 1, filters: 4, dense_units: 8}",
                 "train.epochs=2", "train.batch_size=8", f"quantize.deploy={WIDE}", "quantize.precisions=[fp32, int8]",
                 "quantize.int8_concat=false", "benchmark.precisions=[fp32, int8]", "benchmark.reference=[]",
                 "benchmark.instances=[]", "benchmark.batch_sizes=[4]", "benchmark.batch_size=4",
                 "benchmark.warmup=1", "benchmark.latency_iterations=3", "benchmark.throughput_iterations=2"]
    config = load_config(None, overrides)
    run_train(config)
    run_freeze(config)
    run_quantize(config)
    return config, overrides


def interrupted(quantized, command: str, patch: str, cwd: Path) -> tuple[subprocess.CompletedProcess, dict, dict]:
    """``medq COMMAND`` on the run in a child whose ``patch`` (Python source) arranges for the signal; returns the
    child's result and the run's snapshot before and after."""
    config, overrides = quantized
    before = snapshot(config.run_dir)
    argv = [command, *[a for o in overrides for a in ("--set", o)]]
    driver = textwrap.dedent(patch) + f"\nimport sys\nfrom medq.cli import main\nsys.exit(main({argv!r}))\n"
    result = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, cwd=cwd, timeout=600)
    assert not (config.run_dir / ".staging").exists() and not (config.run_dir / ".commit.json").exists()
    return result, before, snapshot(config.run_dir)


# SIGINT to this very process on INC's second evaluation: the first INT8 trial (the first is the FP32 baseline).
SIGNAL_IN_FIRST_TRIAL = """
import os, signal
from medq.inc import adapters
real = adapters.eval_func
def eval_func(score):
    calls = []
    def signalled(graph_def):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.{sig})
        return score(graph_def)
    return real(signalled)
adapters.eval_func = eval_func
"""


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_during_inc_tuning_exits_and_keeps_the_good_int8_graph(quantized, sig, code, tmp_path):
    manifest = json.loads((quantized[0].run_dir / "manifest.json").read_text())
    assert manifest["stages"]["quantize"]["status"] == "ok"
    result, before, after = interrupted(quantized, "quantize", SIGNAL_IN_FIRST_TRIAL.replace("{sig}", sig), tmp_path)

    assert result.returncode == code, result.stderr
    assert "could not produce" not in result.stderr and "unexpected error" not in result.stderr
    word = "interrupted" if sig == "SIGINT" else "terminated"
    assert f"medq quantize: {word}" in result.stderr.splitlines()[-1]
    assert "model_int8.pb" in before and after == before  # manifest, INT8 graph, op table: byte for byte


# SIGINT at the end of the first training epoch (after its checkpoint), as a Ctrl-C in the second would arrive.
SIGNAL_AFTER_FIRST_EPOCH = """
import os, signal
import medq.fitting as fitting
real = fitting._last_epoch_callback
def last_epoch(*args, **kwargs):
    callback = real(*args, **kwargs)
    save = callback.on_epoch_end
    def on_epoch_end(epoch, logs=None):
        save(epoch, logs)
        os.kill(os.getpid(), signal.SIGINT)
    callback.on_epoch_end = on_epoch_end
    return callback
fitting._last_epoch_callback = last_epoch
"""


def test_ctrl_c_during_training_exits_130_and_leaves_the_run_as_it_was(quantized, tmp_path):
    result, before, after = interrupted(quantized, "train", SIGNAL_AFTER_FIRST_EPOCH, tmp_path)

    assert result.returncode == 130, result.stderr
    assert "--resume" in result.stderr.splitlines()[-1]
    # the run's record is untouched; only the resumable checkpoint of the interrupted training is new
    assert {k: v for k, v in after.items() if not k.startswith("checkpoints/")} == \
        {k: v for k, v in before.items() if not k.startswith("checkpoints/")}


# SIGTERM to this process (only: as `kill PID` or a container stop would) once the first benchmark worker runs.
SIGTERM_WITH_A_WORKER_RUNNING = """
import os, signal, threading
from medq.benchmark import runner
real = runner._start
def start(job, bench, env):
    proc, paths = real(job, bench, env)
    (bench.parents[2] / "worker.pid").write_text(str(proc.pid))
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()  # while the parent waits for it
    return proc, paths
runner._start = start
"""


def test_sigterm_during_the_benchmark_stops_its_worker_and_leaves_the_run_as_it_was(quantized, tmp_path):
    import os

    result, before, after = interrupted(quantized, "benchmark", SIGTERM_WITH_A_WORKER_RUNNING, tmp_path)

    assert result.returncode == 143, result.stderr
    assert "medq benchmark: terminated" in result.stderr.splitlines()[-1]
    assert after == before
    worker = int((quantized[0].run_dir.parents[1] / "worker.pid").read_text())
    with pytest.raises(ProcessLookupError):  # the worker is gone (and reaped), not measuring on as an orphan
        os.kill(worker, 0)


def test_inc_timeout_still_ends_tuning_while_a_user_signal_passes_through():
    """INC's timer interrupts the main thread through the same SIGINT handler as a Ctrl-C: fit() must go on treating
    the first as "stop tuning" and the second must reach the caller once fit() has returned."""
    import os
    import time

    from neural_compressor import quantization

    from medq.inc.ptq import _interrupts_pass_through, _Record

    def fit(stop):  # INC's shape: tuning under its time limit, KeyboardInterrupt swallowed
        try:
            with quantization.time_limit(0.2):
                stop()
                time.sleep(5)
        except KeyboardInterrupt:
            return "stopped"
        return "finished"

    record = _Record()
    with _interrupts_pass_through(record):
        assert fit(lambda: None) == "stopped"  # the timer fired
    assert record.timed_out and record.interrupted is None

    with pytest.raises(KeyboardInterrupt):
        with _interrupts_pass_through(_Record()):
            assert fit(lambda: os.kill(os.getpid(), signal.SIGINT)) == "stopped"  # swallowed inside, as INC does
