"""`medq loadtest`: closed-loop load on a medq server over loopback, reported the way Triton's perf_analyzer does.

At each concurrency C, C workers each send a request, wait for its answer and send the next, until the level's
request count or its time is used up (both bounded). Each row counts every request by what came back (an HTTP
status, or a connection error: a crash, a reset, a timeout), so its counts add up to the requests sent, and gives the
throughput, the latency percentiles of the answered-200 requests, the server's mean batch size over the level (from
its Prometheus `/metrics`) and the server's resident memory before and after.

What a medical server must get right under load is checked on every request, not sampled:
- a good request (tensor or image) is answered 200 with the probabilities the server gave for the same input sent
  alone (a batcher that mixes up rows or a precision change under load shows here), or 503 when the server sheds load;
- a bad request (garbage bytes, a truncated JPEG, a tensor of the wrong shape, a DICOM without pixels) is a 400;
- nothing else: no 5xx but 503, no dropped connection.
Any breach is listed under the table and makes the exit code 1.

Only loopback addresses are loaded (127.0.0.0/8, ::1, localhost): this tool is for measuring a server on this
machine, never for sending traffic elsewhere.
"""
from __future__ import annotations

import http.client
import io
import ipaddress
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import numpy as np

from medq.errors import MedqError, first_line

log = logging.getLogger("medq.loadtest")

CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
SHED = 503  # the one refusal a loaded server may give a good request
BAD_KINDS = ("garbage-bytes", "truncated-jpeg", "wrong-shape", "dicom-without-pixels")
CONNECTION_ERROR = "connection-error"


# --- where and what to send ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    host: str
    port: int
    model: str
    token: str | None = field(default=None, repr=False)  # sent as `Authorization: Bearer …` (serve.token_file)
    tls: ssl.SSLContext | None = field(default=None, repr=False, compare=False)  # https:// (serve.tls_cert)

    @property
    def base(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def infer_path(self) -> str:
        return f"/v2/models/{self.model}/infer"

    @property
    def predict_path(self) -> str:
        return f"/v1/models/{self.model}/predict"


def loopback_target(url: str, model: str, token_file: str | Path | None = None,
                    cacert: str | Path | None = None) -> Target:
    """The server at URL, which must be on a loopback address: http://, or https:// verified against CACERT (the
    server's own certificate when it is self-signed; default: the system's CAs)."""
    try:
        parts = urlsplit(url if "//" in url else f"http://{url}")
        port = parts.port  # parsed on access: 'abc' or 99999 raise here
    except ValueError as exc:
        raise MedqError(f"{url}: not a URL ({first_line(exc)}); give the server's address as http://127.0.0.1:PORT") \
            from None
    if parts.scheme not in ("http", "https"):
        raise MedqError(f"{url}: only http:// and https:// URLs are load-tested (the server on this machine)")
    if cacert is not None and parts.scheme != "https":
        raise MedqError(f"--cacert {cacert}: the URL {url} is plain http; give https://… for a server with TLS")
    host = parts.hostname or ""
    try:  # never a name the resolver could send elsewhere: localhost is 127.0.0.1
        loopback = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise MedqError(f"{url}: {parts.hostname or 'no host'} is not a loopback address; medq loadtest only loads a "
                        "server on this machine (http://127.0.0.1:PORT)")
    if host == "localhost" and parts.scheme == "http":  # https keeps the name its certificate may carry
        host = "127.0.0.1"
    if not model or "/" in model:
        raise MedqError(f"--model {model!r}: give the model's name as the server lists it (GET /v2/models/NAME)")
    tls = None
    if parts.scheme == "https":
        try:
            tls = ssl.create_default_context(cafile=str(cacert) if cacert is not None else None)
        except (OSError, ssl.SSLError) as exc:
            raise MedqError(f"--cacert {cacert}: not a readable PEM certificate ({first_line(exc)}); give the "
                            "server's certificate (serve.tls_cert) or the CA that signed it") from None
    default_port = 443 if tls else 80
    return Target(host, port or default_port, model, _read_token(token_file), tls)


def _read_token(path: str | Path | None) -> str | None:
    if path is None:
        return None
    from medq.serve.server import read_token  # the very rule the server applies to the same file

    return read_token(str(path))


@dataclass(frozen=True)
class Payload:
    """One request body: a good input (with the server's answer to it alone, once known) or a bad one."""
    kind: str  # "tensor", "image" or one of BAD_KINDS
    path: str
    body: bytes
    content_type: str
    index: int = 0  # which good input
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def bad(self) -> bool:
        return self.kind in BAD_KINDS


def tensor_body(name: str, array: np.ndarray) -> bytes:
    """An Open Inference Protocol v2 JSON request for one FP32 tensor."""
    return json.dumps({"inputs": [{"name": name, "shape": list(array.shape), "datatype": "FP32",
                                   "data": array.ravel().tolist()}]}).encode()


def binary_tensor_body(name: str, array: np.ndarray) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """The same request in the v2 binary-data extension (what tritonclient and perf_analyzer send): the JSON header,
    then the raw little-endian float32 bytes; JSON numbers would cost the server more than the model for large
    images."""
    raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
    head = json.dumps({"inputs": [{"name": name, "shape": list(array.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return head + raw, (("Inference-Header-Content-Length", str(len(head))),)


def model_input(metadata: dict) -> tuple[str, list[int]]:
    """(input name, shape of one image [1, H, W, C]) from the v2 model metadata."""
    try:
        (spec,) = metadata["inputs"]
        shape = [1 if int(d) < 0 else int(d) for d in spec["shape"]]
        name = str(spec["name"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MedqError(f"the server's model metadata has no single input with a shape ({first_line(exc)}); "
                        "is this a medq server?") from exc
    if len(shape) != 4:
        raise MedqError(f"the model's input {name} has shape {spec['shape']}; medq loadtest sends [N, H, W, C] images")
    return name, [1, *shape[1:]]


def tensor_payloads(target: Target, metadata: dict, count: int, seed: int, images: int = 1) -> list[Payload]:
    """COUNT distinct requests of IMAGES images each ([IMAGES, H, W, C] tensors)."""
    name, shape = model_input(metadata)
    shape = [images, *shape[1:]]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        body, headers = binary_tensor_body(name, rng.random(shape, dtype=np.float32))
        out.append(Payload("tensor", target.infer_path, body, "application/octet-stream", i, headers))
    return out


def synthetic_jpeg(size: int, seed: int) -> bytes:
    """A chest-radiograph-like phantom at SIZE², JPEG quality 90 (what a viewer would send)."""
    from medq.data.phantoms_chest import draw_chest
    from medq.data.phantoms_draw import encode, to_uint

    image, _ = draw_chest(np.random.default_rng(seed), size, "virus" if seed % 2 else "normal")
    return encode(to_uint(image), ".jpg", quality=90)


CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".dcm": "application/dicom"}


def image_payloads(target: Target, files: Sequence[Path], count: int, size: int, seed: int) -> list[Payload]:
    """The given image files, or COUNT synthetic JPEGs of SIZE² (distinct, so that swapped answers show)."""
    if files:
        out = []
        for i, path in enumerate(files):
            kind = CONTENT_TYPES.get(path.suffix.lower())
            if kind is None:
                raise MedqError(f"{path}: not a .jpg/.jpeg/.png/.dcm image; give image files to --images")
            try:
                out.append(Payload("image", target.predict_path, path.read_bytes(), kind, i))
            except OSError as exc:
                raise MedqError(f"{path}: cannot read it ({first_line(exc)})") from exc
        return out
    return [Payload("image", target.predict_path, synthetic_jpeg(size, seed + i), "image/jpeg", i)
            for i in range(count)]


def dicom_without_pixels() -> bytes:
    """A valid DICOM file with no PixelData (as a structured report or a presentation state would be)."""
    import pydicom

    from medq.data.dicom import dicom_bytes

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((8, 8), np.uint8))))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def bad_payloads(target: Target, metadata: dict, jpeg: bytes, seed: int) -> list[Payload]:
    """One request of each bad kind; the server must answer each 400."""
    name, shape = model_input(metadata)
    wrong = [1, shape[1] + 1, max(shape[2] - 1, 1), shape[3]]
    garbage = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return [Payload("garbage-bytes", target.predict_path, garbage, "image/jpeg"),
            Payload("truncated-jpeg", target.predict_path, jpeg[: len(jpeg) // 2], "image/jpeg"),
            Payload("wrong-shape", target.infer_path,
                    tensor_body(name, np.full(wrong, 0.5, np.float32)), "application/json"),
            Payload("dicom-without-pixels", target.predict_path, dicom_without_pixels(), "application/dicom")]


# --- the HTTP side -------------------------------------------------------------------------------------------------

class Connection:
    """One kept-alive HTTP/1.1 connection to the target, reopened after a failure."""

    def __init__(self, target: Target, timeout: float):
        self.target, self.timeout = target, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                extra: tuple[tuple[str, str], ...] = ()) -> tuple[int, bytes]:
        """(status, body); raises OSError/HTTPException when the connection fails."""
        headers = {"Content-Type": content_type} if content_type else {}
        if self.target.token:
            headers["Authorization"] = f"Bearer {self.target.token}"
        headers.update(extra)
        try:
            if self.conn is None:
                self.conn = (http.client.HTTPSConnection(self.target.host, self.target.port, timeout=self.timeout,
                                                         context=self.target.tls) if self.target.tls else
                             http.client.HTTPConnection(self.target.host, self.target.port, timeout=self.timeout))
                self.conn.connect()
                # http.client writes the headers and the body apart: without this, Nagle's algorithm may hold the
                # body until the server acknowledges the headers (a delayed ACK, up to 40 ms); curl and tritonclient
                # set it too
                self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def get_json(target: Target, path: str, timeout: float = 30.0) -> dict:
    conn = Connection(target, timeout)
    try:
        status, body = conn.request("GET", path)
    except (OSError, http.client.HTTPException) as exc:
        raise MedqError(f"{target.base}{path}: no answer ({first_line(exc)}); is the server "
                        "running (`medq serve`)?") from exc
    finally:
        conn.close()
    if status != 200:
        hint = {404: f"; the server serves the models GET {target.base}/v2/models/NAME answers for (--model)"
                if path.startswith("/v2/models/") else "",
                401: "; pass the server's token file with --token-file"}.get(status, "")
        raise MedqError(f"{target.base}{path}: HTTP {status}: {server_said(body)}{hint}")
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise MedqError(f"{target.base}{path}: the answer is not a JSON object ({excerpt(body)}); is this a medq "
                        "serve (or other Open Inference Protocol v2) server?")
    return doc


def excerpt(body: bytes) -> str:
    """The start of an answer as one line of text, for a message."""
    return " ".join(body[:120].decode("utf-8", "replace").split()) or "empty body"


def server_said(body: bytes) -> str:
    """An error answer's v2 ``{"error": ...}`` text, else its start."""
    try:
        said = json.loads(body).get("error")
    except (ValueError, AttributeError):
        said = None
    return said if isinstance(said, str) else excerpt(body)


def probabilities(body: bytes) -> np.ndarray | None:
    """The class probabilities in a 200 answer: v2 `outputs[0].data`, or the image route's `probabilities`."""
    try:
        doc = json.loads(body)
        if "outputs" in doc:
            return np.asarray(doc["outputs"][0]["data"], dtype=np.float64).ravel()
        found = _find_probabilities(doc)
        return None if found is None else np.asarray(found, dtype=np.float64).ravel()
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _find_probabilities(doc):
    if isinstance(doc, dict):
        if "probabilities" in doc:
            value = doc["probabilities"]
            return list(value.values()) if isinstance(value, dict) else value
        for value in doc.values():
            found = _find_probabilities(value)
            if found is not None:
                return found
    if isinstance(doc, list) and doc:
        return _find_probabilities(doc[0])
    return None


def scrape(target: Target) -> dict[str, float]:
    """The server's Prometheus metrics, summed over labels: {sample name: value} (empty when it has none)."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:  # the batch and memory columns stay empty
        return {}
    conn = Connection(target, 10.0)
    try:
        status, body = conn.request("GET", "/metrics")
    except (OSError, http.client.HTTPException):
        return {}
    finally:
        conn.close()
    if status != 200:
        return {}
    totals: dict[str, float] = Counter()
    for family in text_string_to_metric_families(body.decode("utf-8", "replace")):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return dict(totals)


def batch_mean(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Mean server batch size over the level: the growth of a *batch_size histogram's _sum over its _count."""
    for name in after:
        if "batch_size" in name and name.endswith("_count"):
            stem = name[: -len("_count")]
            count = after[name] - before.get(name, 0.0)
            total = after.get(f"{stem}_sum", 0.0) - before.get(f"{stem}_sum", 0.0)
            return total / count if count > 0 else None
    return None


def cpu_seconds(metrics: dict[str, float], pid: int | None) -> float | None:
    """The server's CPU time so far (user + system, every thread): /proc/PID/stat when its pid is given, else its
    process metrics."""
    if pid is not None:
        try:  # the fields after the command's closing parenthesis; utime and stime are the 12th and 13th
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None
    return metrics.get("process_cpu_seconds_total")


def engine_rate(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Images per second while the server's engine ran over the level (*batch_size_sum over *engine_seconds_sum):
    the server's own figure to set beside the benchmark's img/s at the same batch size."""
    images = [n for n in after if "batch_size" in n and n.endswith("_sum")]
    seconds = [n for n in after if "engine_seconds" in n and n.endswith("_sum")]
    if not images or not seconds:
        return None
    busy = after[seconds[0]] - before.get(seconds[0], 0.0)
    return (after[images[0]] - before.get(images[0], 0.0)) / busy if busy > 0 else None


def resident_bytes(metrics: dict[str, float], pid: int | None) -> float | None:
    """The server's resident memory: /proc/PID/status when its pid is given, else its process metrics."""
    if pid is not None:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return float(line.split()[1]) * 1024
        except OSError:
            return None
    return metrics.get("process_resident_memory_bytes")


# --- one level of load ---------------------------------------------------------------------------------------------

@dataclass
class Level:
    """One row of the table."""
    concurrency: int
    label: str = ""  # "overload" for the 4x-saturation row
    requests: int = 0
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)  # "200", "400", "503", ..., CONNECTION_ERROR
    good: int = 0
    bad: int = 0
    wrong: int = 0  # good requests answered 200 with other probabilities than alone
    throughput: float = 0.0  # answered requests per second
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    batch_mean: float | None = None
    engine_ips: float | None = None  # images per second of engine time in the server (its /metrics)
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None
    # CPU time over the level, in cores (CPU seconds / wall seconds): this client's own (every thread of this
    # process: on a machine it shares with the server this is what the server did not get) and the server's
    client_cpu: float | None = None
    server_cpu: float | None = None
    problems: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return self.statuses.get(status, 0)


class Schedule:
    """Hands out request numbers until the count or the time is used up; request i is bad when the running share
    of bad requests would otherwise fall below the fraction (so exactly round(n * fraction) of n are bad)."""

    def __init__(self, goods: list[Payload], bads: list[Payload], fraction: float, requests: int, seconds: float):
        self.goods, self.bads, self.fraction = goods, bads, fraction
        self.requests, self.deadline = requests, time.monotonic() + seconds
        self.next = 0
        self.lock = threading.Lock()

    def take(self) -> Payload | None:
        with self.lock:
            i = self.next
            if i >= self.requests or time.monotonic() >= self.deadline:
                return None
            self.next += 1
        bad_before, bad_after = int(i * self.fraction + 1e-9), int((i + 1) * self.fraction + 1e-9)
        if bad_after > bad_before and self.bads:
            return self.bads[bad_before % len(self.bads)]
        return self.goods[(i - bad_before) % len(self.goods)]


@dataclass
class Outcome:
    payload: Payload
    status: str
    seconds: float
    same: bool | None  # a good 200: whether its probabilities are those given alone
    started: float = 0.0  # perf_counter when it was sent
    first: bool = False  # its client's first request (opens the connection): counted, but not timed

    @property
    def ended(self) -> float:
        return self.started + self.seconds


def run_level(target: Target, concurrency: int, schedule: Schedule, alone: list[np.ndarray], tolerance: float,
              timeout: float) -> tuple[list[Outcome], float]:
    """CONCURRENCY workers in a closed loop over SCHEDULE: (every request's outcome, the wall time)."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def worker() -> None:
        conn = Connection(target, timeout)
        mine: list[Outcome] = []
        try:
            while (payload := schedule.take()) is not None:
                start = time.perf_counter()
                try:
                    status, body = conn.request("POST", payload.path, payload.body, payload.content_type,
                                                payload.headers)
                    code = str(status)
                except (OSError, http.client.HTTPException):
                    body, code = b"", CONNECTION_ERROR
                elapsed = time.perf_counter() - start
                same = None
                if code == "200" and not payload.bad:
                    got = probabilities(body)
                    want = alone[payload.index]
                    same = got is not None and got.shape == want.shape and bool(
                        np.allclose(got, want, rtol=0.0, atol=tolerance))
                mine.append(Outcome(payload, code, elapsed, same, start, first=not mine))
        finally:
            conn.close()
            with lock:
                outcomes.extend(mine)

    threads = [threading.Thread(target=worker, name=f"loadtest-{n}", daemon=True) for n in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes, time.perf_counter() - start


def summarize(level: Level, outcomes: list[Outcome], seconds: float, overload: bool) -> Level:
    """Fill LEVEL's counts, rates and percentiles from the outcomes, and list what the server got wrong."""
    level.requests, level.seconds = len(outcomes), seconds  # the level's whole wall time
    level.statuses = dict(sorted(Counter(o.status for o in outcomes).items()))
    level.bad = sum(o.payload.bad for o in outcomes)
    level.good = level.requests - level.bad
    # Rates and percentiles over the steady part, as perf_analyzer measures after its warm-up: from the moment every
    # client has its first answer (connection set-up, thread start) to the last answer; the whole level when the
    # level is too short to have one.
    warm = max((o.ended for o in outcomes if o.first), default=0.0)
    steady = [o for o in outcomes if o.started >= warm]
    if steady:
        seconds = max(o.ended for o in steady) - warm
    else:
        steady = outcomes
    answered = [o for o in steady if o.status != CONNECTION_ERROR]
    level.throughput = len(answered) / seconds if seconds > 0 else 0.0
    ok = [o.seconds * 1000 for o in steady if o.status == "200"]
    if ok:
        level.p50_ms, level.p95_ms, level.p99_ms = (float(v) for v in np.percentile(ok, [50, 95, 99]))
    level.wrong = sum(o.same is False for o in outcomes)
    problems = level.problems
    if level.count(CONNECTION_ERROR):
        problems.append(f"{level.count(CONNECTION_ERROR)} requests got no HTTP answer (connection reset, refused "
                        "or timed out)")
    others = {s: n for s, n in level.statuses.items() if s not in ("200", "400", str(SHED), CONNECTION_ERROR)}
    if others:
        problems.append(f"statuses other than 200/400/503: {others}")
    if level.wrong:
        problems.append(f"{level.wrong} good requests answered 200 with other probabilities than the same input alone")
    refused_good = Counter(o.payload.kind for o in outcomes if not o.payload.bad and o.status == "400")
    if refused_good:
        problems.append(f"good requests answered 400: {dict(refused_good)}")
    bad_kinds = Counter(f"{o.payload.kind}→{o.status}" for o in outcomes
                        if o.payload.bad and o.status not in ("400", str(SHED), CONNECTION_ERROR))
    if bad_kinds:
        problems.append(f"bad requests not answered 400: {dict(bad_kinds)}")
    if not overload:
        shed_bad = sum(o.payload.bad and o.status == str(SHED) for o in outcomes)
        if shed_bad:
            problems.append(f"{shed_bad} bad requests answered 503 below overload, where each must be a 400")
    return level


# --- the sweep -----------------------------------------------------------------------------------------------------

@dataclass
class Report:
    url: str
    model: str
    input: str
    bad_fraction: float
    levels: list[Level]
    saturation: int | None = None
    rss_growth_mb: float | None = None
    images_per_request: int = 1  # req/s times this is img/s

    @property
    def problems(self) -> list[str]:
        return [f"concurrency {lv.concurrency}{' (' + lv.label + ')' if lv.label else ''}: {p}"
                for lv in self.levels for p in lv.problems]

    def as_json(self) -> dict:
        return {**asdict(self), "problems": self.problems}


def saturating(levels: list[Level]) -> int:
    """The smallest concurrency whose throughput is within 10% of the best seen."""
    best = max(lv.throughput for lv in levels)
    return min(lv.concurrency for lv in levels if lv.throughput >= 0.9 * best)


def answers_alone(target: Target, goods: list[Payload], timeout: float) -> list[np.ndarray]:
    """The server's probabilities for each good input sent alone, one at a time: the oracle for the load levels."""
    conn = Connection(target, timeout)
    out = []
    try:
        for payload in goods:
            try:
                status, body = conn.request("POST", payload.path, payload.body, payload.content_type,
                                            payload.headers)
            except (OSError, http.client.HTTPException) as exc:
                raise MedqError(f"{target.host}:{target.port}{payload.path}: no answer to a good {payload.kind} "
                                f"request sent alone ({first_line(exc)})") from exc
            got = probabilities(body) if status == 200 else None
            if got is None:
                raise MedqError(f"{payload.path}: a good {payload.kind} request sent alone got HTTP {status}: "
                                f"{server_said(body) if status != 200 else excerpt(body)}; fix the server or the "
                                "input before loading it")
            out.append(got)
    finally:
        conn.close()
    return out


def run_loadtest(url: str, model: str, *, input_kind: str = "tensor", images: Sequence[Path] = (),
                 image_size: int = 1024, concurrency: Sequence[int] = CONCURRENCY, requests: int = 200,
                 seconds: float = 30.0, bad_fraction: float = 0.0, overload: bool = False, tolerance: float = 1e-4,
                 timeout: float = 60.0, server_pid: int | None = None, distinct: int = 8, seed: int = 0,
                 token_file: str | Path | None = None, overload_requests: int | None = None,
                 images_per_request: int = 1, cacert: str | Path | None = None) -> Report:
    target = loopback_target(url, model, token_file, cacert)
    if input_kind not in ("tensor", "image"):
        raise MedqError(f"--input {input_kind}: choose tensor or image")
    if images and input_kind != "image":
        raise MedqError("--images are sent only with --input image; add it, or drop --images to send tensors")
    if not 0.0 <= bad_fraction < 1.0:
        raise MedqError(f"--bad-fraction {bad_fraction}: give a fraction in [0, 1), e.g. 0.1")
    if requests < 1 or seconds <= 0 or not concurrency or min(concurrency) < 1 or (overload_requests or 1) < 1:
        raise MedqError("--requests, --overload-requests, --seconds and every --concurrency must be positive")
    if images_per_request < 1 or (images_per_request > 1 and input_kind != "tensor"):
        raise MedqError(f"--images-per-request {images_per_request}: a positive count, sent as [N, H, W, C] tensors "
                        "(--input tensor)")
    if overload_requests is not None and not overload:
        raise MedqError("--overload-requests sizes the overload level; add --overload, or drop it")
    get_json(target, "/v2/health/ready")
    metadata = get_json(target, f"/v2/models/{model}")
    goods = (tensor_payloads(target, metadata, distinct, seed, images_per_request) if input_kind == "tensor"
             else image_payloads(target, list(images), distinct, image_size, seed))
    bads = bad_payloads(target, metadata, synthetic_jpeg(image_size, seed), seed) if bad_fraction > 0 else []
    alone = answers_alone(target, goods, timeout)
    report = Report(url, model, input_kind, bad_fraction, [], images_per_request=images_per_request)
    first_rss = None

    def level(c: int, label: str = "", count: int = requests) -> Level:
        nonlocal first_rss
        before = scrape(target)
        lv = Level(c, label, rss_before_mb=_mb(resident_bytes(before, server_pid)))
        first_rss = lv.rss_before_mb if first_rss is None else first_rss
        server_before, client_before = cpu_seconds(before, server_pid), time.process_time()
        outcomes, wall = run_level(target, c, Schedule(goods, bads, bad_fraction, count, seconds), alone,
                                   tolerance, timeout)
        lv.client_cpu = (time.process_time() - client_before) / wall
        after = scrape(target)
        lv.batch_mean, lv.engine_ips = batch_mean(before, after), engine_rate(before, after)
        lv.rss_after_mb = _mb(resident_bytes(after, server_pid))
        server_after = cpu_seconds(after, server_pid)
        if server_before is not None and server_after is not None:
            lv.server_cpu = (server_after - server_before) / wall
        summarize(lv, outcomes, wall, overload=bool(label))
        log.info("%s", format_row(lv))
        return lv

    for c in concurrency:
        report.levels.append(level(c))
    if overload:
        report.saturation = saturating(report.levels)
        report.levels.append(level(4 * report.saturation, "overload", overload_requests or requests))
    last = report.levels[-1].rss_after_mb
    if first_rss is not None and last is not None:
        report.rss_growth_mb = last - first_rss
    return report


def _mb(value: float | None) -> float | None:
    return None if value is None else value / 2**20


# --- the table -----------------------------------------------------------------------------------------------------

HEADER = ("concurrency", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "200", "400", "503", "other",
          "no answer", "wrong", "batch mean", "engine img/s", "RSS MB", "client CPU", "server CPU")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def row_cells(lv: Level) -> list[str]:
    other = sum(n for s, n in lv.statuses.items() if s not in ("200", "400", "503", CONNECTION_ERROR))
    rss = "-" if lv.rss_after_mb is None else f"{_fmt(lv.rss_before_mb, 0)}→{_fmt(lv.rss_after_mb, 0)}"
    return [f"{lv.concurrency}{' (overload)' if lv.label else ''}", str(lv.requests), _fmt(lv.throughput),
            _fmt(lv.p50_ms), _fmt(lv.p95_ms), _fmt(lv.p99_ms), str(lv.count("200")), str(lv.count("400")),
            str(lv.count("503")), str(other), str(lv.count(CONNECTION_ERROR)), str(lv.wrong), _fmt(lv.batch_mean, 2),
            _fmt(lv.engine_ips), rss, _fmt(lv.client_cpu, 2), _fmt(lv.server_cpu, 2)]


def format_row(lv: Level) -> str:
    return " ".join(f"{h}={c}" for h, c in zip(HEADER, row_cells(lv)))


def format_report(report: Report) -> str:
    lines = [f"medq loadtest {report.url} model {report.model}: {report.input} input"
             + (f", {report.images_per_request} images per request" if report.images_per_request > 1 else "")
             + (f", {report.bad_fraction:.0%} bad requests" if report.bad_fraction else ""),
             "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row_cells(lv)) + " |" for lv in report.levels]
    if report.saturation is not None:
        lines.append(f"\nsaturation at concurrency {report.saturation}; overload row at 4x")
    if report.rss_growth_mb is not None:
        lines.append(f"server RSS growth over the run: {report.rss_growth_mb:+.1f} MB")
    problems = report.problems
    lines.append("\n" + ("\n".join(f"FAIL {p}" for p in problems) if problems else
                         "every request answered as it must be (good: 200 with the probabilities alone or 503; "
                         "bad: 400)"))
    return "\n".join(lines)
