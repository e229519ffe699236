"""`medq loadtest` against a stub server that keeps its own ledger of what it answered (the independent oracle for
the tool's counts), and against the real `medq serve` on a tiny model (tests/test_loadtest_server.py)."""
from __future__ import annotations

import io
import json
import ssl
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medq.cli import main
from medq.errors import MedqError
from medq.loadtest import (CONNECTION_ERROR, Level, Outcome, Payload, Schedule, format_report, loopback_target,
                           run_loadtest, summarize, synthetic_jpeg)

SIZE = 4


class Stub(ThreadingHTTPServer):
    """A v2 server for one model with input [N, 4, 4, 1] and two classes; `misbehave(n, body)` may turn the n-th
    predict or infer into another status (503, 500), a swapped answer or a dropped connection. It records what it
    answered to each request (`ledger`: one entry per request received) and exposes a batch-size histogram whose
    every observation is 2, with 2 ms of engine time each."""
    daemon_threads = True

    def __init__(self, misbehave=None):
        super().__init__(("127.0.0.1", 0), Handler)
        self.misbehave = misbehave or (lambda n, body: None)
        self.ledger: list[str] = []
        self.images: list[int] = []  # images per infer request it answered 200
        self.lock = threading.Lock()
        self.served = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Stub

    def log_message(self, *args):
        pass

    def send(self, status: int, doc) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def refused(self) -> bool:
        """With `server.token` set, everything but health needs it (as medq serve's token rule)."""
        token = getattr(self.server, "token", None)
        if token is None or self.path.startswith("/v2/health/") or \
                self.headers.get("Authorization") == f"Bearer {token}":
            return False
        if self.command == "POST":
            self.rfile.read(int(self.headers["Content-Length"]))
        self.send(401, {"error": "missing or wrong bearer token"})
        return True

    def do_GET(self):
        if self.refused():
            return
        if self.path == "/v2/health/ready":
            self.send(200, {})
        elif self.path == "/v2/models/m":
            self.send(200, {"name": "m", "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, SIZE, SIZE, 1]}],
                            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 2]}]})
        elif self.path == "/metrics":
            n = self.server.served
            body = (f"# TYPE stub_batch_size histogram\nstub_batch_size_bucket{{le=\"+Inf\"}} {n}\n"
                    f"stub_batch_size_count {n}\nstub_batch_size_sum {2 * n}\n"
                    f"# TYPE stub_engine_seconds histogram\nstub_engine_seconds_sum {n / 500}\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send(404, {"error": "no such route"})

    def do_POST(self):
        if self.refused():
            return
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            n = len(self.server.ledger)
            self.server.ledger.append("?")
            self.server.served += 1
        status, doc = self.answer(body)
        override = self.server.misbehave(n, body)
        if override == "drop":
            self.server.ledger[n] = CONNECTION_ERROR
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if override == "swap" and status == 200:
            doc = {"outputs": [{"name": "output", "data": doc["outputs"][0]["data"][::-1]}]}
        elif isinstance(override, int):
            status, doc = override, {"error": "stub says no"}
        self.server.ledger[n] = str(status)
        self.send(status, doc)

    def answer(self, body: bytes):
        if self.path == "/v2/models/m/infer":
            length = self.headers.get("Inference-Header-Content-Length")
            head = json.loads(body[:int(length)] if length else body)
            (tensor,) = head["inputs"]
            n = tensor["shape"][0]
            if tensor["shape"][1:] != [SIZE, SIZE, 1]:
                return 400, {"error": "wrong shape"}
            data = np.frombuffer(body[int(length):], "<f4") if length else np.asarray(tensor["data"], np.float32)
            means = data.reshape(n, -1).mean(axis=1)  # one answer row per image
            with self.server.lock:
                self.server.images.append(n)
            return 200, {"outputs": [{"name": "output", "shape": [n, 2], "datatype": "FP32",
                                      "data": np.stack([means, 1 - means], axis=1).ravel().tolist()}]}
        elif self.path == "/v1/models/m/predict":
            if self.headers["Content-Type"] == "application/dicom":
                ds = pydicom.dcmread(io.BytesIO(body))
                if "PixelData" not in ds:
                    return 400, {"error": "no pixels"}
                mean = float(ds.pixel_array.mean()) / 255
            else:
                try:
                    with Image.open(io.BytesIO(body)) as image:
                        mean = float(np.asarray(image.convert("L")).mean()) / 255
                except OSError:
                    return 400, {"error": "not an image"}
        else:
            return 404, {"error": "no such route"}
        return 200, {"outputs": [{"name": "output", "shape": [1, 2], "datatype": "FP32", "data": [mean, 1 - mean]}]}


@pytest.fixture
def stub(request):
    server = Stub(getattr(request, "param", None))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def load(stub: Stub, **kwargs):
    options = dict(concurrency=[1, 3], requests=20, seconds=60, image_size=64, distinct=4)
    return run_loadtest(stub.url, "m", **(options | kwargs))


def server_answers(stub: Stub, skip: int) -> Counter:
    """The stub's own count of what it answered under load (after the SKIP requests sent alone first)."""
    return Counter(stub.ledger[skip:])


def test_counts_add_up_and_match_what_the_server_answered(stub):
    report = load(stub, bad_fraction=0.25)
    for level in report.levels:
        assert level.requests == 20 == sum(level.statuses.values())
        assert level.bad == 5 and level.good == 15  # 25% of 20, on the schedule's arithmetic
        assert level.statuses == {"200": 15, "400": 5} and level.wrong == 0 and level.problems == []
        assert level.batch_mean == pytest.approx(2.0)  # the stub's histogram observes 2 per request
        assert level.engine_ips == pytest.approx(1000.0)  # ... in 1/500 s of engine time each: 2 images per 2 ms
        assert level.p50_ms <= level.p95_ms <= level.p99_ms
    # what the tool counted is what the server says it answered (4 good inputs were first sent alone)
    tool = Counter()
    for level in report.levels:
        tool.update(level.statuses)
    assert server_answers(stub, skip=4) == tool
    assert report.problems == []


def test_several_images_per_request_are_sent_as_one_tensor_and_checked_row_by_row(stub):
    report = load(stub, concurrency=[2], images_per_request=3)
    assert stub.images and set(stub.images) == {3}  # every tensor the stub received held 3 images
    assert report.levels[0].statuses == {"200": 20} and report.levels[0].wrong == 0
    assert "3 images per request" in format_report(report)


@pytest.mark.parametrize("stub", [lambda n, body: "swap" if n == 7 else None], indirect=True)
def test_a_swapped_row_of_a_several_image_answer_is_wrong(stub):
    assert load(stub, concurrency=[1], images_per_request=2).levels[0].wrong == 1


def test_the_overload_level_has_its_own_request_count(stub):
    report = load(stub, concurrency=[2], overload=True, overload_requests=35)
    assert [(lv.concurrency, lv.label, lv.requests) for lv in report.levels] == [(2, "", 20), (8, "overload", 35)]
    assert server_answers(stub, skip=4) == Counter({"200": 55})


def test_client_and_server_cpu_are_read_per_level(stub):
    """The stub serves from this very process: its CPU time read from /proc/PID/stat (the server column) is the
    CPU time Python's process clock gives for the level (the client column), up to the kernel's 10 ms ticks."""
    import os

    report = load(stub, concurrency=[4], requests=400, input_kind="image", server_pid=os.getpid())
    (level,) = report.levels
    client, server = level.client_cpu * level.seconds, level.server_cpu * level.seconds
    assert client > 0.05  # decoding 400 JPEGs in the stub: enough CPU time for the ticks to resolve
    assert server == pytest.approx(client, abs=0.04)


@pytest.mark.parametrize("stub", [lambda n, body: 503 if n % 5 == 0 and n > 0 else 500 if n == 13 else None], indirect=True)
def test_statuses_are_counted_apart_and_a_500_is_a_failure(stub):
    report = load(stub, concurrency=[2])
    (level,) = report.levels
    assert Counter(level.statuses) == server_answers(stub, skip=4)
    assert level.count("503") == 4 and level.count("500") == 1
    assert report.problems == ["concurrency 2: statuses other than 200/400/503: {'500': 1}"]
    assert "FAIL concurrency 2" in format_report(report)


@pytest.mark.parametrize("stub", [lambda n, body: "drop" if n in (6, 11) else None], indirect=True)
def test_a_dropped_connection_is_counted_as_no_answer(stub):
    report = load(stub, concurrency=[2])
    (level,) = report.levels
    assert level.count(CONNECTION_ERROR) == 2 == server_answers(stub, skip=4)[CONNECTION_ERROR]
    assert level.requests == 20 and level.count("200") == 18
    assert any("2 requests got no HTTP answer" in p for p in report.problems)


@pytest.mark.parametrize("stub", [lambda n, body: "swap" if n in (5, 9, 17) else None], indirect=True)
def test_answers_that_differ_from_the_same_input_alone_are_wrong(stub):
    report = load(stub, concurrency=[3], input_kind="image")
    (level,) = report.levels
    assert level.wrong == 3 and level.count("200") == 20
    assert any("3 good requests answered 200 with other probabilities" in p for p in report.problems)


def test_every_bad_kind_reaches_the_server_and_a_bad_answered_200_is_reported(stub):
    stub.misbehave = lambda n, body: None
    report = load(stub, concurrency=[1], requests=40, bad_fraction=0.1, input_kind="image")
    assert report.levels[0].statuses == {"200": 36, "400": 4} and report.problems == []

    def accept_garbage(n, body):
        return 200 if body[:2] != b"\xff\xd8" and b"DICM" not in body[:200] and not body.startswith(b"{") else None
    stub.misbehave = accept_garbage
    report = load(stub, concurrency=[1], requests=40, bad_fraction=0.1, input_kind="image")
    assert any("bad requests not answered 400: {'garbage-bytes→200': 1}" in p for p in report.problems)


def test_rates_and_percentiles_leave_out_each_clients_first_request():
    """Two clients: their first requests (connection set-up) end at 1.0 s and 2.0 s; the steady part is the four
    requests sent from 2.0 s on, answered by 4.0 s: 4 / 2 s = 2 req/s; the 200s among them took 0.5, 0.5, 1.0 s."""
    good = Payload("tensor", "/g", b"", "")
    outcomes = [Outcome(good, "200", 1.0, True, 0.0, first=True), Outcome(good, "200", 2.0, True, 0.0, first=True),
                Outcome(good, "200", 0.5, True, 1.0),  # sent before the other client's first answer: not steady
                Outcome(good, "200", 0.5, True, 2.0), Outcome(good, "200", 0.5, True, 2.5),
                Outcome(good, "200", 1.0, True, 3.0), Outcome(good, "503", 2.0, None, 2.0)]
    level = summarize(Level(2), outcomes, seconds=4.0, overload=False)
    assert level.requests == 7 and level.statuses == {"200": 6, "503": 1}  # every request is counted
    assert level.throughput == pytest.approx(4 / 2.0)
    assert level.p50_ms == pytest.approx(float(np.percentile([500, 500, 1000], 50)))
    assert level.seconds == 4.0


def test_a_server_with_a_token_is_loaded_with_the_token_file(stub, tmp_path):
    stub.token = "s3cret-Token"
    with pytest.raises(MedqError, match="HTTP 401"):
        load(stub)
    (tmp_path / "token").write_text("s3cret-Token\n")
    report = load(stub, token_file=tmp_path / "token", concurrency=[2])
    assert report.levels[0].statuses == {"200": 20} and report.levels[0].batch_mean == pytest.approx(2.0)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(MedqError, match="must hold one token"):
        load(stub, token_file=tmp_path / "empty")


def test_schedule_mixes_exactly_the_fraction_of_bad_requests():
    goods = [Payload("tensor", "/g", b"", "", i) for i in range(3)]
    bads = [Payload(kind, "/b", b"", "") for kind in ("garbage-bytes", "wrong-shape")]
    for n, fraction in ((100, 0.1), (37, 0.25), (10, 0.0)):
        schedule = Schedule(goods, bads, fraction, n, 60)
        taken = []
        while (p := schedule.take()) is not None:
            taken.append(p)
        assert len(taken) == n and sum(p.bad for p in taken) == int(n * fraction)
    assert Counter(p.kind for p in taken) == {"tensor": 10}


@pytest.mark.parametrize("url", ["http://10.1.2.3:8000", "http://example.org:8000", "http://0.0.0.0:8000",
                                 "ftp://127.0.0.1:8000", "https://10.1.2.3:8443", "http://[2001:db8::1]:8000"])
def test_only_loopback_addresses_are_loaded(url):
    with pytest.raises(MedqError, match="loopback|http://"):
        loopback_target(url, "m")


@pytest.mark.parametrize("options, message", [({"images": [Path("x.jpg")]}, "only with --input image"),
                                              ({"bad_fraction": 1.0}, "--bad-fraction 1.0"),
                                              ({"concurrency": [0]}, "must be positive"),
                                              ({"input_kind": "pixels"}, "choose tensor or image"),
                                              ({"overload_requests": 50}, "add --overload"),
                                              ({"images_per_request": 2, "input_kind": "image"}, "--input tensor")])
def test_options_that_cannot_run_are_refused_before_any_request(stub, options, message):
    with pytest.raises(MedqError, match=message):
        load(stub, **options)
    assert stub.ledger == []


def test_loopback_forms_are_accepted_and_localhost_is_not_resolved():
    assert loopback_target("http://localhost:8000", "m").host == "127.0.0.1"
    assert loopback_target("https://localhost:8443", "m").tls.verify_mode == ssl.CERT_REQUIRED
    assert loopback_target("https://127.0.0.1", "m").port == 443
    with pytest.raises(MedqError, match="plain http"):
        loopback_target("http://127.0.0.1:8000", "m", cacert="cert.pem")
    assert loopback_target("127.0.0.2:81", "m").port == 81
    assert loopback_target("http://[::1]:8000", "m").host == "::1"


def test_synthetic_image_is_a_jpeg_of_the_asked_size():
    with Image.open(io.BytesIO(synthetic_jpeg(96, 3))) as image:
        assert image.format == "JPEG" and image.size == (96, 96)


def test_cli_writes_the_table_and_json_and_exits_1_on_a_failure(stub, tmp_path, capsys):
    out = tmp_path / "load.json"
    code = main(["loadtest", stub.url, "--model", "m", "--concurrency", "1,2", "--requests", "10", "--bad-fraction",
                 "0.2", "--output", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "| 2 | 10 |" in printed
    doc = json.loads(out.read_text())
    assert [lv["statuses"] for lv in doc["levels"]] == [{"200": 8, "400": 2}] * 2 and doc["problems"] == []
    stub.misbehave = lambda n, body: 500
    assert main(["loadtest", stub.url, "--model", "m", "--concurrency", "1", "--requests", "4"]) == 2  # alone: refused
    stub.ledger.clear()  # n counts from here: 8 inputs alone and 4 requests of the level fine, then 500s
    stub.misbehave = lambda n, body: 500 if n >= 12 else None
    assert main(["loadtest", stub.url, "--model", "m", "--concurrency", "1", "--requests", "8"]) == 1


class Other(BaseHTTPRequestHandler):
    """Some other web server on the port: 200 and a page for every GET."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = b"<!doctype html>\n<html>a dashboard</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_a_wrong_model_token_no_server_or_another_server_is_one_line(stub, capsys):
    """What the CLI prints for each: exit 2 and one line naming the URL and what the server said (its v2 {"error"}
    text, not the raw bytes) with the fix, never a traceback (a 200 that is not JSON was a JSONDecodeError)."""
    import socket

    other = ThreadingHTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        free = closed.getsockname()[1]

    def refused(url: str, model: str, message: str) -> None:
        assert main(["loadtest", url, "--model", model, "--concurrency", "1", "--requests", "2"]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("medq loadtest: error: ")]
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err

    try:
        refused(stub.url, "nope", f"{stub.url}/v2/models/nope: HTTP 404: no such route; the server serves the models")
        refused(f"http://127.0.0.1:{free}", "m", "no answer")
        for url, why in (("http://127.0.0.1:99999", "Port out of range"), ("http://127.0.0.1:abc", "Port could not"),
                         ("http://[::1", "Invalid IPv6 URL")):
            refused(url, "m", f"{url}: not a URL ({why}")
        refused(f"http://127.0.0.1:{other.server_address[1]}", "m",
                "the answer is not a JSON object (<!doctype html> <html>a dashboard")
        stub.misbehave = lambda n, body: 500  # the server fails the inputs sent alone
        refused(stub.url, "m", "request sent alone got HTTP 500: stub says no; fix the server or the input")
        stub.misbehave = lambda n, body: None
        stub.token = "s3cret"  # the command passes no --token-file
        refused(stub.url, "m", "HTTP 401: missing or wrong bearer token; pass the server's token file with --token")
    finally:
        other.shutdown()
        other.server_close()
