"""`medq loadtest` against a real `medq serve` process on a tiny trained run: the tool's counts by status agree with
the server's own request counter (its /metrics, an independent ledger), bad requests of every kind are 400s, the
answers under load are the answers alone, and an overload level gives only 200s and 503s."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import requests
import served_run

pytest.importorskip("fastapi")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from medq.loadtest import run_loadtest  # noqa: E402

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return served_run.tiny_run(tmp_path_factory.mktemp("loadtest"))


@pytest.fixture(scope="module")
def server(tiny_run):
    """`medq serve` in its own process: small batches and a small queue, so that load reaches its limits."""
    port = served_run.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "KMP_", "TF_"))}
    log = tiny_run.parent / "serve.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "medq", "serve", "--run", str(tiny_run), "--model", "fp32", "--port", str(port),
         "--set", "serve.max_batch_size=4", "--set", "serve.max_queue_size=8", "--set", "runtime.intra_op_threads=1"],
        cwd=tiny_run.parent, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    served_run.wait_ready(url, process, log)
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
