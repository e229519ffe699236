"""`medq loadtest` against a real `medq serve` process on a tiny trained run: the tool's counts by status agree with
the server's own request counter (its /metrics, an independent ledger), bad requests of every kind are 400s, the
answers under load are the answers alone, and an overload level gives only 200s and 503s."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

pytest.importorskip("fastapi")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from medq.loadtest import run_loadtest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A 32-px refkit-cnn trained one epoch on phantom radiographs and frozen (model_fp32.pb)."""
    from medq.config import load_config
    from medq.data.phantoms import generate_chest_pneumonia
    from medq.freeze import run_freeze
    from medq.train import run_train

    root = tmp_path_factory.mktemp("loadtest")
    generate_chest_pneumonia(root / "data", n_train=40, n_val=4, n_test=16, size=48, seed=1)
    config = load_config(None, [f"run.output_dir={root / 'output'}", f"data.root={root / 'data'}", "run.name=tiny",
                                "data.generate=false", "preprocess.image_size=32", "train.epochs=1",
                                "model.params={blocks: 2, filters: 4, dense_units: 8}"])
    run_train(config)
    run_freeze(config)
    return Path(config.run_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run):
    """`medq serve` in its own process: small batches and a small queue, so that load reaches its limits."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "KMP_", "TF_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "medq", "serve", "--run", str(tiny_run), "--model", "fp32", "--port", str(port),
         "--set", "serve.max_batch_size=4", "--set", "serve.max_queue_size=8", "--set", "runtime.intra_op_threads=1"],
        cwd=tiny_run.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180  # stops a hung start; asserts nothing about speed
    while True:
        assert process.poll() is None, f"medq serve exited: {process.stdout.read()}"
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "medq serve did not become ready"
        time.sleep(0.2)
    yield url, process.pid
    process.terminate()
    process.wait(60)


def answered_by_server(url: str) -> Counter:
    """The server's own count of inference answers by status (medq_requests_total, infer and predict)."""
    text = requests.get(f"{url}/metrics", timeout=30).text
    out = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "medq_requests_total" and sample.labels["endpoint"] in ("infer", "predict"):
                out[sample.labels["status"]] += int(sample.value)
    return out


@pytest.mark.parametrize("input_kind", ["image", "tensor"])
def test_counts_agree_with_the_servers_ledger_and_bad_requests_are_400(server, input_kind):
    url, pid = server
    before = answered_by_server(url)
    report = run_loadtest(url, "tiny", input_kind=input_kind, image_size=256, concurrency=[1, 4], requests=24,
                          bad_fraction=0.25, server_pid=pid, distinct=4)
    counted = Counter()
    for level in report.levels:
        assert level.requests == 24 == sum(level.statuses.values())
        assert level.bad == 6 and level.count("400") == 6 and level.count("200") == 18, level.statuses
        assert level.wrong == 0 and level.problems == []
        assert level.batch_mean is not None and 1 <= level.batch_mean <= 4  # serve.max_batch_size=4
        assert level.rss_before_mb > 0 and level.rss_after_mb > 0
        counted.update(level.statuses)
    counted["200"] += 4  # the four good inputs sent alone first, for the reference answers
    assert answered_by_server(url) - before == counted
    assert report.problems == []


def test_overload_gives_only_200_and_503_and_every_answer_is_right(server):
    url, pid = server
    report = run_loadtest(url, "tiny", input_kind="tensor", concurrency=[1, 2], requests=40, overload=True,
                          server_pid=pid, distinct=4)
    overload = report.levels[-1]
    assert overload.label == "overload" and overload.concurrency == 4 * report.saturation
    assert set(overload.statuses) <= {"200", "503"} and overload.requests == 40
    assert overload.wrong == 0 and report.problems == []
    assert report.rss_growth_mb is not None
