"""`medq serve` against a tiny trained, frozen and quantized run: the v2 protocol through tritonclient, the same
probabilities as `medq predict` for PNG/JPEG/DICOM, batching, the bounded queue, SIGTERM drain, refusal of a tampered or
stale model, the bearer token, and bad input answered 400 with one message."""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import requests
import served_run

pytest.importorskip("fastapi")
tritonclient_http = pytest.importorskip("tritonclient.http")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from medq import runrecord  # noqa: E402
from medq.config import ServeConfig  # noqa: E402
from medq.data.dicom import dicom_bytes  # noqa: E402
from medq.errors import MedqError  # noqa: E402
from medq.graph import FrozenGraph  # noqa: E402
from medq.loadtest import run_loadtest  # noqa: E402

PATIENT = "Doe^Jane-4711"  # PatientID and PatientName of the test DICOM files: must never reach a log


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, make_tiny_run):
    """The tiny quantized run (conftest), its models loaded once as the server loads them."""
    from medq.serve import load_models

    run = make_tiny_run(tmp_path_factory.mktemp("serve"))
    models = load_models(run.config, [run.run_dir])
    yield SimpleNamespace(**vars(run), models=models, int8=runrecord.recorded_path(run.run_dir, "int8_pb"))
    for m in models:
        m.engine.close()


@contextlib.contextmanager
def serving(models, *, token=None, state=None, **settings):
    """The app on an ephemeral port in a thread of this process, as `medq serve` runs it (DrainingServer; ``state``:
    its ServerState, e.g. with a limit); yields its base URL (http://127.0.0.1:PORT)."""
    import uvicorn

    from medq.serve import ServerState, create_app
    from medq.serve.server import DrainingServer

    state = state or ServerState()
    app = create_app(models, ServeConfig(**settings), token=token, state=state)
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"), state, 30)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the test server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def _metric(base: str, name: str, **labels) -> float:
    """A sample's value from /metrics, read with prometheus_client's own parser (0 when absent)."""
    text = requests.get(f"{base}/metrics", timeout=30).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _wait_for(condition, what: str, limit_s: float = 120) -> None:
    """Poll until ``condition()``; the limit only stops a hung test, it asserts nothing about speed."""
    end = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.05)


def _graph_probs(pb: Path, x: np.ndarray) -> np.ndarray:
    with FrozenGraph(pb) as graph:
        return graph.predict(x)


def _batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 32, 32, 1), dtype=np.float32)


# --- the protocol -------------------------------------------------------------------------------------------------

def test_v2_protocol_through_tritonclient_json_and_binary(tiny):
    sha = hashlib.sha256(tiny.int8.read_bytes()).hexdigest()
    with serving(tiny.models) as base:
        client = tritonclient_http.InferenceServerClient(base.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
        assert client.get_server_metadata()["name"] == "medq"
        meta = client.get_model_metadata("tiny")
        assert meta["versions"] == [sha[:12]]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 32, 32, 1]}]
        assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 2]}]
        facts = meta["parameters"]
        assert (facts["classes"], facts["task"], facts["precision"], facts["sha256"], facts["threshold"]) == \
            (["NORMAL", "PNEUMONIA"], "binary", "int8", sha, None)
        assert facts["preprocessing"].items() >= {"image_size": 32, "channels": 1, "normalization": "unit"}.items()
        assert client.get_model_config("tiny")["max_batch_size"] == 32  # the default: the benchmark's batch
        x = _batch(3)
        want = _graph_probs(tiny.int8, x)
        for binary in (False, True):
            tensor = tritonclient_http.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            out = tritonclient_http.InferRequestedOutput("output", binary_data=binary)
            result = client.infer("tiny", [tensor], outputs=[out], request_id="r-1")
            np.testing.assert_allclose(result.as_numpy("output"), want, atol=1e-6)
            assert result.get_response()["id"] == "r-1"
            assert result.get_response()["model_version"] == sha[:12]
        result = client.infer("tiny", [tensor])  # no outputs named: tritonclient asks for binary outputs
        np.testing.assert_allclose(result.as_numpy("output"), want, atol=1e-6)
        for algorithm in ("gzip", "deflate"):
            result = client.infer("tiny", [tensor], request_compression_algorithm=algorithm)
            np.testing.assert_allclose(result.as_numpy("output"), want, atol=1e-6)
        with pytest.raises(tritonclient_http.InferenceServerException, match="version"):
            client.infer("tiny", [tensor], model_version="0000")
        with pytest.raises(tritonclient_http.InferenceServerException, match="not served"):
            client.get_model_metadata("other")


def test_tritonclient_fp16_and_fp64_tensors_and_the_version_in_the_url(tiny):
    """numpy's float64 and float16 arrays sent as tritonclient sends them (binary and JSON, the URL with
    /versions/{v}): the answer is the graph's on the same values as float32 (FP16 exactly, FP64 rounded as numpy
    rounds it); integer pixels are refused naming FP32."""
    x64 = _batch(2, seed=11).astype(np.float64) + 1e-9  # values float32 cannot hold exactly
    with serving(tiny.models) as base:
        client = tritonclient_http.InferenceServerClient(base.removeprefix("http://"))
        version = client.get_model_metadata("tiny")["versions"][0]
        for array, datatype in ((x64, "FP64"), (x64.astype(np.float16), "FP16")):
            want = _graph_probs(tiny.int8, array.astype(np.float32))
            for binary in (True, False):
                tensor = tritonclient_http.InferInput("input", list(array.shape), datatype)
                tensor.set_data_from_numpy(array, binary_data=binary)
                result = client.infer("tiny", [tensor], model_version=version)
                np.testing.assert_allclose(result.as_numpy("output"), want, atol=1e-6, err_msg=datatype)
        tensor = tritonclient_http.InferInput("input", [1, 32, 32, 1], "UINT8")
        tensor.set_data_from_numpy(np.full((1, 32, 32, 1), 128, np.uint8))
        with pytest.raises(tritonclient_http.InferenceServerException, match="expected FP32"):
            client.infer("tiny", [tensor])


def test_two_runs_served_side_by_side_with_the_fp32_graph_and_the_keras_model(tiny, tmp_path):
    import copy

    from medq.errors import ConfigError
    from medq.serve import load_models

    second = tmp_path / "second"
    shutil.copytree(tiny.run_dir, second, ignore=shutil.ignore_patterns("nc_workspace", "checkpoints", "logs"))
    x = _batch(4, seed=7)
    want = _graph_probs(runrecord.recorded_path(tiny.run_dir, "fp32_pb"), x)
    for model, tolerance in (("fp32", 1e-6), ("keras", 1e-5)):  # Keras and its frozen graph: float rounding only
        config = copy.deepcopy(tiny.config)
        config.serve.model = model
        models = load_models(config, [tiny.run_dir, second])
        try:
            with serving(models) as base:
                client = tritonclient_http.InferenceServerClient(base.removeprefix("http://"))
                for name in ("tiny", "second"):
                    assert client.get_model_metadata(name)["parameters"]["precision"] == model
                    tensor = tritonclient_http.InferInput("input", list(x.shape), "FP32")
                    tensor.set_data_from_numpy(x)
                    np.testing.assert_allclose(client.infer(name, [tensor]).as_numpy("output"), want, atol=tolerance)
        finally:
            for m in models:
                m.engine.close()
    with pytest.raises(ConfigError, match="two runs named 'tiny'"):
        load_models(tiny.config, [tiny.run_dir, tmp_path / "elsewhere" / "tiny"])


class _MeanEngine:
    """Stands in for a model: answers each image's per-channel input means (one class per channel, the rest 0) and
    records the batch shapes it was given."""

    name, precision, facts = "tensorflow", "fp32", {}

    def __init__(self, classes: int):
        self.classes, self.shapes = classes, []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.shapes.append(x.shape)
        means = x.mean(axis=(1, 2))
        return np.pad(means, ((0, 0), (0, self.classes - means.shape[1]))).astype(np.float32)

    def close(self) -> None:
        pass


def test_two_runs_of_different_input_sizes_and_classes_each_preprocess_as_their_own(tmp_path):
    """One uniform gray PNG to a 32-px one-channel 'unit' model and a 40-px three-channel 'imagenet' one: each engine
    gets its own shape and units (hand-computed: 128/255, and (128/255 − mean) / std per ImageNet channel), each
    answer names its own classes, and a tensor of one model's shape is refused by the other."""
    from medq.inference import RunInfo
    from medq.preprocess import PreprocessSpec
    from medq.serve.models import ServedModel

    small = RunInfo(tmp_path, ["NORMAL", "PNEUMONIA"], "binary", PreprocessSpec(32, 1, "unit"))
    large = RunInfo(tmp_path, ["benign", "malignant", "normal"], "multiclass", PreprocessSpec(40, 3, "imagenet"))
    engines = {"small": _MeanEngine(2), "large": _MeanEngine(3)}
    models = [ServedModel(name, info, engines[name], "v1", None, 100.0, ready=True)
              for name, info in (("small", small), ("large", large))]
    png = cv2.imencode(".png", np.full((50, 70), 128, np.uint8))[1].tobytes()
    gray = 128 / 255
    with serving(models) as base:
        answers = {name: requests.post(f"{base}/v1/models/{name}/predict", data=png, timeout=30).json()
                   for name in engines}
        assert engines["small"].shapes == [(1, 32, 32, 1)] and engines["large"].shapes == [(1, 40, 40, 3)]
        assert answers["small"]["probabilities"] == pytest.approx({"NORMAL": gray, "PNEUMONIA": 0.0}, abs=1e-6)
        imagenet = (gray - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
        assert answers["large"]["probabilities"] == pytest.approx(dict(zip(large.classes, imagenet)), abs=1e-5)
        meta = requests.get(f"{base}/v2/models/large", timeout=30).json()
        assert meta["inputs"][0]["shape"] == [-1, 40, 40, 3]
        # pixel 0 and 255 through ImageNet's mean and std, by hand: (0 − mean) / std, (1 − mean) / std
        assert meta["parameters"]["input_range"] == {
            "min": pytest.approx([-2.117904, -2.035714, -1.804444], abs=1e-5),
            "max": pytest.approx([2.248908, 2.428571, 2.64], abs=1e-5)}
        pixels = {"name": "input", "datatype": "FP32", "shape": [1, 32, 32, 1], "data": [128.0] * 1024}
        unscaled = requests.post(f"{base}/v2/models/small/infer", json={"inputs": [pixels]}, timeout=30)
        assert unscaled.status_code == 400 and "outside what the run's preprocessing gives" in unscaled.json()["error"]
        tensor = {"name": "input", "datatype": "FP32", "shape": [1, 32, 32, 1], "data": [0.5] * 1024}
        assert requests.post(f"{base}/v2/models/small/infer", json={"inputs": [tensor]}, timeout=30).status_code == 200
        refused = requests.post(f"{base}/v2/models/large/infer", json={"inputs": [tensor]}, timeout=30)
        assert refused.status_code == 400 and "expected [N, 40, 40, 3]" in refused.json()["error"]


# --- images in: the same answer as `medq predict` -------------------------------------------------------------------

def _films(folder: Path, source: str) -> list[Path]:
    """One radiograph as PNG, 16-bit PNG, JPEG, DICOM MONOCHROME2, and 12-bit DICOM MONOCHROME1 with a VOI window."""
    gray = cv2.imread(source, cv2.IMREAD_GRAYSCALE)
    twelve = (4095 - gray.astype(np.uint16) * 16).astype(np.uint16)  # inverted, 12 bits: the display pipeline's work
    contents = {"film.png": cv2.imencode(".png", gray)[1].tobytes(),
                "film16.png": cv2.imencode(".png", gray.astype(np.uint16) * 257)[1].tobytes(),
                "film.jpeg": cv2.imencode(".jpeg", gray, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes(),
                "film_m2.dcm": dicom_bytes(gray, patient_id=PATIENT),
                "film_m1.dcm": dicom_bytes(twelve, photometric="MONOCHROME1", bits_stored=12, window=(2000, 3000),
                                           patient_id=PATIENT)}
    folder.mkdir(parents=True)
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in contents]


def test_images_in_give_exactly_the_predict_cli_probabilities(tiny, tmp_path, clean_thread_env):
    from medq.cli import main

    files = _films(tmp_path / "a", tiny.test_files[0]) + _films(tmp_path / "b", tiny.test_files[5])
    out = tmp_path / "predict.jsonl"
    assert main(["predict", "--run", str(tiny.run_dir), "--model", "int8", "-q", "-o", str(out),
                 *map(str, files)]) == 0
    expected = {Path(r["file"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert len(expected) == len(files)
    with serving(tiny.models) as base:
        for path in files:  # one image per request, the file as the body
            got = requests.post(f"{base}/v1/models/tiny/predict", data=path.read_bytes(), timeout=60)
            assert got.status_code == 200, got.text
            answer = got.json()
            assert answer["probabilities"] == expected[path]["probabilities"], path.name
            assert answer["prediction"] == expected[path]["prediction"]
        paths = files[:5]  # several images in one multipart request, answered in part order
        parts = [("image", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
        got = requests.post(f"{base}/v1/models/tiny/predict", files=parts, timeout=60)
        assert got.status_code == 200, got.text
        answers = got.json()["predictions"]
        assert [a["file"] for a in answers] == [p.name for p in paths]
        assert [a["probabilities"] for a in answers] == [expected[p]["probabilities"] for p in paths]


def _more_films(folder: Path, source: str) -> dict[str, bytes]:
    """The same radiograph as the files hospitals also send: 16-bit PNG holding 12-bit values (no sBIT: predict
    warns), RGBA, gray+alpha and palette PNG, CMYK and progressive JPEG, a JPEG with EXIF Orientation 6 (rotated),
    a 1×1 PNG, DICOM with RescaleSlope/Intercept, with an inverting VOI LUT, and signed 16-bit."""
    from PIL import Image

    gray = cv2.resize(cv2.imread(source, cv2.IMREAD_GRAYSCALE), (40, 56))
    pil = Image.fromarray(gray)

    def saved(image, fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    rotated = Image.fromarray(np.ascontiguousarray(gray[:, :40]))
    exif = rotated.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    files = {"low16.png": cv2.imencode(".png", gray.astype(np.uint16) * 16)[1].tobytes(),
             "rgba.png": saved(pil.convert("RGBA"), "PNG"), "la.png": saved(pil.convert("LA"), "PNG"),
             "palette.png": saved(pil.convert("P"), "PNG"), "cmyk.jpg": saved(pil.convert("CMYK"), "JPEG"),
             "progressive.jpg": saved(pil, "JPEG", progressive=True), "exif6.jpg": saved(rotated, "JPEG", exif=exif),
             "one.png": saved(pil.resize((1, 1)), "PNG"),
             "rescale.dcm": dicom_bytes(gray.astype(np.uint16), rescale=(2.0, -100.0), patient_id=PATIENT),
             "voi_lut.dcm": dicom_bytes(gray.astype(np.uint16), bits_stored=8, patient_id=PATIENT,
                                        voi_lut=(0, 8, list(range(255, -1, -1)))),
             "signed.dcm": dicom_bytes(gray.astype(np.int16) - 128, patient_id=PATIENT)}
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_every_kind_of_image_gets_the_predict_cli_line_warning_included(tiny, tmp_path, clean_thread_env):
    """predict's JSON line is the oracle, whole (probabilities, prediction, thresholds and any warning): a 16-bit PNG
    of 12-bit values reads near black, and the server must say so as predict does, not answer silently."""
    from medq.cli import main

    files = _more_films(tmp_path / "in", tiny.test_files[3])
    out = tmp_path / "predict.jsonl"
    assert main(["predict", "--run", str(tiny.run_dir), "--model", "int8", "-q", "-o", str(out),
                 str(tmp_path / "in")]) == 0
    expected = {Path(r["file"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(expected) == set(files) and "error" not in str(expected)
    assert "data.bit_depth: 12" in expected["low16.png"]["warning"]
    with serving(tiny.models) as base:
        url = f"{base}/v1/models/tiny/predict"
        for name, data in files.items():
            got = requests.post(url, data=data, timeout=60)
            assert got.status_code == 200, (name, got.text)
            assert got.json() == {**expected[name], "file": None}, name
        got = requests.post(url, files=[("image", (n, d)) for n, d in list(files.items())[:4]], timeout=60)
        assert got.status_code == 200, got.text
        assert got.json()["predictions"] == [expected[n] | {"file": n} for n in list(files)[:4]]


def test_multipart_parts_are_each_answered_or_the_request_refused_naming_the_part(tiny):
    """A part without a filename is a form field to the parser: it used to be skipped, so two images got one answer
    (the client's second image would be matched with nothing, or the first with the second's). A bad part refuses
    the request naming that part; no answer is given for half a request."""
    png = cv2.imencode(".png", np.full((48, 48), 128, np.uint8))[1].tobytes()
    with serving(tiny.models, max_batch_size=4) as base:
        url = f"{base}/v1/models/tiny/predict"
        cases = {
            "part 1 ('a') is a form field": [("a", (None, png)), ("b", ("b.png", png))],
            "file part 2 ('b.png') of 3 cannot be read: not a PNG, JPEG or DICOM": [
                ("a", ("a.png", png)), ("b", ("b.png", b"<html>no</html>")), ("c", ("c.png", png))],
            "serve.max_batch_size 4": [(f"p{i}", (f"p{i}.png", png)) for i in range(5)],
        }
        for message, parts in cases.items():
            answer = requests.post(url, files=parts, timeout=60)
            assert answer.status_code == 400 and message in answer.json()["error"], (message, answer.text)
        empty = requests.post(url, data=b"--x--\r\n", headers={"Content-Type": "multipart/form-data; boundary=x"},
                              timeout=60)  # zero parts
        assert empty.status_code == 400 and "holds no file parts" in empty.json()["error"]
        mixed = requests.post(url, data=png, headers={"Content-Type": "multipart/mixed; boundary=x"}, timeout=60)
        assert mixed.status_code == 400 and "multipart/form-data" in mixed.json()["error"]
        # curl -d @film.png: the body is the file less its 0x0A/0x0D bytes, which may still decode (to other pixels)
        form = requests.post(url, data=png, headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
        assert form.status_code == 400 and "--data-binary" in form.json()["error"]


def test_gzip_and_deflate_images_are_answered_as_sent_plain_a_bomb_is_413_another_encoding_415(tiny):
    """/v1 predict undoes Content-Encoding as /v2 infer does (it answered 400 'not a PNG, JPEG or DICOM'); the limit
    holds after inflating: 4 KiB of gzip inflating to 4 MiB is a 413, not 4 MiB (or 4 GiB) in memory."""
    import zlib

    png = cv2.imencode(".png", np.full((48, 48), 90, np.uint8))[1].tobytes()
    jpeg = cv2.imencode(".jpg", np.tile(np.arange(48, dtype=np.uint8) * 5, (48, 1)))[1].tobytes()
    with serving(tiny.models, max_body_mb=1) as base:
        url = f"{base}/v1/models/tiny/predict"
        plain = requests.post(url, data=png, timeout=60).json()
        for encoding, packed in (("gzip", gzip.compress(png)), ("deflate", zlib.compress(png))):
            answer = requests.post(url, data=packed, headers={"Content-Encoding": encoding}, timeout=60)
            assert answer.status_code == 200 and answer.json() == plain, (encoding, answer.text)
        parts = [("a", ("a.png", png)), ("b", ("b.jpeg", jpeg))]
        form = requests.Request("POST", url, files=parts).prepare()
        plain_parts = requests.post(url, files=parts, timeout=60).json()
        answer = requests.post(url, data=gzip.compress(form.body), timeout=60,
                               headers={"Content-Type": form.headers["Content-Type"], "Content-Encoding": "gzip"})
        assert answer.status_code == 200 and answer.json() == plain_parts
        assert [p["file"] for p in plain_parts["predictions"]] == ["a.png", "b.jpeg"]

        bomb = gzip.compress(png + b"\0" * (4 * 2 ** 20))
        assert len(bomb) < 16 * 2 ** 10
        for endpoint in (url, f"{base}/v2/models/tiny/infer"):
            answer = requests.post(endpoint, data=bomb, headers={"Content-Encoding": "gzip"}, timeout=60)
            assert answer.status_code == 413 and "inflates to more than serve.max_body_mb (1 MiB)" in \
                answer.json()["error"], answer.text
            answer = requests.post(endpoint, data=png, headers={"Content-Encoding": "br"}, timeout=60)
            assert answer.status_code == 415 and "Content-Encoding 'br'" in answer.json()["error"], answer.text
        assert requests.post(url, data=png, timeout=60).json() == plain  # the server carries on


# --- batching, the bounded queue ------------------------------------------------------------------------------------

def _infer_json(base: str, x: np.ndarray, headers: dict | None = None) -> requests.Response:
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    return requests.post(f"{base}/v2/models/tiny/infer", json=body, headers=headers or {}, timeout=120)


def test_concurrent_requests_run_in_fewer_engine_calls(tiny):
    x = _batch(8, seed=3)
    want = _graph_probs(tiny.int8, x)
    with serving(tiny.models, max_batch_size=8, max_queue_delay_ms=2000, max_queue_size=64) as base:
        results: dict[int, requests.Response] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _infer_json(base, x[i:i + 1])))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(8):  # each request gets its own row back, whatever batch it ran in
            assert results[i].status_code == 200, results[i].text
            np.testing.assert_allclose(results[i].json()["outputs"][0]["data"], want[i], atol=1e-6)
        calls = _metric(base, "medq_batch_size_count", model="tiny")
        assert _metric(base, "medq_batch_size_sum", model="tiny") == 8
        assert calls < 8, f"8 concurrent requests took {calls} engine calls: nothing was batched"
        assert _metric(base, "medq_requests_total", model="tiny", endpoint="infer", status="200") == 8


def test_the_engine_runs_the_benchmarks_threads_and_metrics_show_the_process(tiny):
    """runtime.intra_op_threads 0 is every physical core for the server's engine, as for the benchmark's rows (psutil
    counts the cores); /metrics carries the process's memory and CPU time (what `medq loadtest` reads), the memory
    equal to the kernel's VmRSS of this process (the server runs in it)."""
    psutil = pytest.importorskip("psutil")
    assert tiny.config.runtime.intra_op_threads == 0
    threads = tiny.models[0].metadata()["parameters"]["threads"]
    assert threads == {"intra_op": psutil.cpu_count(logical=False), "inter_op": tiny.config.runtime.inter_op_threads}
    with serving(tiny.models) as base:
        rss = _metric(base, "process_resident_memory_bytes")
        vm_rss = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith("VmRSS:"))
        assert abs(rss - vm_rss) < 16 * 2**20
        assert _metric(base, "process_cpu_seconds_total") > 0


def test_the_warm_up_runs_every_batch_size_the_batcher_may_form(tiny, monkeypatch):
    """Before the model is ready the engine has run one batch of every size 1..max_batch_size, so no size's kernels
    are first built under load."""
    import medq.serve.models as served_models

    sizes: list[int] = []

    class Recording:
        name, precision, facts = "tensorflow", "int8", {}
        path, sha256 = tiny.int8, hashlib.sha256(tiny.int8.read_bytes()).hexdigest()

        def __call__(self, x):
            sizes.append(len(x))
            return np.full((len(x), 2), 0.5, np.float32)

        def close(self):
            pass

    monkeypatch.setattr(served_models, "open_engine", lambda *args, **kwargs: Recording())
    model = served_models.load_model(tiny.run_dir, "int8", threshold=None, max_megapixels=100, warmup_batch=6)
    assert model.ready and sorted(sizes) == [1, 2, 3, 4, 5, 6]


def test_a_full_queue_answers_503_with_retry_after_at_once(tiny):
    with serving(tiny.models, max_batch_size=4, max_queue_delay_ms=3000, max_queue_size=4) as base:
        first: dict[str, requests.Response] = {}
        waiting = threading.Thread(target=lambda: first.setdefault("r", _infer_json(base, _batch(3))))
        waiting.start()  # 3 images wait for a fourth (or the 3 s delay)
        _wait_for(lambda: _metric(base, "medq_queued_images", model="tiny") == 3, "the first request to queue")
        refused = _infer_json(base, _batch(2))  # 3 + 2 > max_queue_size 4
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert "max_queue_size" in refused.json()["error"]
        waiting.join()
        assert first["r"].status_code == 200  # the queued request still ran


# --- start and stop ---------------------------------------------------------------------------------------------

def _serve_process(tiny, tmp_path, *extra: str, tls: Path | None = None) -> tuple[subprocess.Popen, str]:
    """`medq serve --run tiny` in a child process on a free port, once it answers ready; (process, base URL)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "medq", "serve", "--set", f"run.output_dir={tiny.root / 'output'}",
                             "--run", "tiny", "--port", str(port), *extra],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        with contextlib.suppress(requests.ConnectionError):
            return requests.get(f"{base}/v2/health/ready", timeout=5, verify=str(tls or True)).status_code == 200
        return False

    _wait_for(ready, "the server to be ready", 300)
    return proc, base


@contextlib.contextmanager
def _stopped(proc: subprocess.Popen):
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(tiny, tmp_path):
    proc, base = _serve_process(tiny, tmp_path, "--set", "serve.max_queue_delay_ms=4000")
    with _stopped(proc):
        x = _batch(2, seed=5)
        want = _graph_probs(tiny.int8, x)
        results: dict[int, requests.Response] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, _infer_json(base, x[i:i + 1])))
                   for i in range(2)]
        for t in threads:
            t.start()
        _wait_for(lambda: _metric(base, "medq_queued_images", model="tiny") == 2, "two requests in the queue")
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: requests.get(f"{base}/v2/health/ready", timeout=5).status_code == 503, "draining")
        late = _infer_json(base, x[:1])
        assert late.status_code == 503 and "shutting down" in late.json()["error"]
        for t in threads:
            t.join()
        for i in range(2):
            assert results[i].status_code == 200, results[i].text
            np.testing.assert_allclose(results[i].json()["outputs"][0]["data"], want[i], atol=1e-6)
        assert proc.wait(120) == 0, (tmp_path / "serve.log").read_text()


def _copy_run(tiny, tmp_path: Path) -> Path:
    run = tmp_path / "output" / "tiny"
    shutil.copytree(tiny.run_dir, run, ignore=shutil.ignore_patterns("nc_workspace", "checkpoints", "logs"))
    return run


def _refused(run: Path, tmp_path: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "medq", "serve", "--run", str(run), "--port", "0"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("medq serve: error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr and "ready" not in done.stderr, done.stderr
    return errors[0]


def test_a_tampered_or_stale_model_is_refused_at_start(tiny, tmp_path):
    run = _copy_run(tiny, tmp_path / "tampered")
    with open(run / "model_int8.pb", "ab") as fh:
        fh.write(b"\0")
    assert "sha256 differs" in _refused(run, tmp_path)

    run = _copy_run(tiny, tmp_path / "stale")
    manifest = json.loads((run / runrecord.MANIFEST).read_text())
    manifest["artifacts"]["fp32_pb"]["sha256"] = "0" * 64  # as if `medq freeze` had written a new FP32 graph
    (run / runrecord.MANIFEST).write_text(json.dumps(manifest))
    assert "stale" in _refused(run, tmp_path)


# --- security and bad input -----------------------------------------------------------------------------------------

def test_the_bearer_token_is_required_when_configured(tiny):
    with serving(tiny.models, token="s3cret-token") as base:
        url = f"{base}/v2/models/tiny"
        assert requests.get(url, timeout=30).status_code == 401
        assert requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
        assert requests.get(f"{base}/metrics", timeout=30).status_code == 401
        assert requests.get(url, headers={"Authorization": "Bearer s3cret-token"}, timeout=30).status_code == 200
        assert _infer_json(base, _batch(1)).status_code == 401
        assert requests.get(f"{base}/v2/health/ready", timeout=30).status_code == 200  # probes need no token


def test_tls_and_the_token_file_from_the_command_line(tiny, tmp_path):
    cert, key = served_run.self_signed(tmp_path)
    token = tmp_path / "token"
    token.write_text("k9-Xq2-token\n")
    token.chmod(0o600)
    proc, base = _serve_process(tiny, tmp_path, "--token-file", str(token), "--tls-cert", str(cert), "--tls-key",
                                str(key), tls=cert)
    with _stopped(proc):
        url = f"{base}/v2/models/tiny"
        assert requests.get(url, verify=str(cert), timeout=30).status_code == 401
        good = requests.get(url, verify=str(cert), headers={"Authorization": "Bearer k9-Xq2-token"}, timeout=30)
        assert good.status_code == 200 and good.json()["name"] == "tiny"
        with pytest.raises(requests.ConnectionError):  # no plain HTTP beside HTTPS
            requests.get(url.replace("https://", "http://"), timeout=30)
        # medq loadtest over HTTPS with the token: every answer 200 and the same as requests' own
        report = run_loadtest(base, "tiny", concurrency=[2], requests=12, token_file=token, cacert=cert)
        assert report.problems == [] and [level.statuses for level in report.levels] == [{"200": 12}]
        with pytest.raises(MedqError, match="token|401"):
            run_loadtest(base, "tiny", concurrency=[1], requests=2, cacert=cert)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0


def test_bad_input_is_a_400_with_one_message_and_the_server_carries_on(tiny, tmp_path):
    x = _batch(1)
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 32, 32, 1], "data": x.ravel().tolist()}
    png = cv2.imencode(".png", np.full((48, 48), 128, np.uint8))[1].tobytes()
    binary = {"name": "input", "datatype": "FP32", "shape": [1, 32, 32, 1], "parameters": {"binary_data_size": 4096}}
    head = json.dumps({"inputs": [binary]}).encode()  # announces 4096 bytes, carries 8
    with serving(tiny.models, max_body_mb=1) as base:
        infer = f"{base}/v2/models/tiny/infer"
        predict = f"{base}/v1/models/tiny/predict"
        cases = {
            "not valid JSON": requests.post(infer, data=b"{nope", timeout=30),
            "shape": requests.post(infer, json={"inputs": [{**tensor, "shape": [1, 28, 28, 1]}]}, timeout=30),
            "datatype": requests.post(infer, json={"inputs": [{**tensor, "datatype": "INT8"}]}, timeout=30),
            "input": requests.post(infer, json={"inputs": [{**tensor, "name": "pixels"}]}, timeout=30),
            "holds": requests.post(infer, json={"inputs": [{**tensor, "data": tensor["data"][:-1]}]}, timeout=30),
            "NaN": requests.post(infer, data=json.dumps({"inputs": [{**tensor, "data": [float("nan")] * 1024}]}),
                                 timeout=30),
            "binary_data_size": requests.post(infer, data=head + b"\0" * 8, timeout=30,
                                              headers={"Inference-Header-Content-Length": str(len(head))}),
            "not a PNG, JPEG or DICOM": requests.post(predict, data=b"<html>hello</html>", timeout=30),
            "truncated": requests.post(predict, data=png[:-20], timeout=30),
            "empty": requests.post(predict, data=b"", timeout=30),
        }
        for expected, answer in cases.items():
            assert answer.status_code == 400, (expected, answer.status_code, answer.text)
            message = answer.json()["error"]
            assert expected in message and "\n" not in message, (expected, message)
        big = requests.post(predict, data=b"\0" * (2 * 2 ** 20), timeout=30)
        assert big.status_code == 413 and "max_body_mb" in big.json()["error"]
        bomb = requests.post(infer, data=gzip.compress(b" " * (2 * 2 ** 20)), headers={"Content-Encoding": "gzip"},
                             timeout=30)  # 2 KiB that inflate to 2 MiB
        assert bomb.status_code == 413 and "inflates" in bomb.json()["error"]
        garbled = requests.post(infer, data=b"not gzip", headers={"Content-Encoding": "gzip"}, timeout=30)
        assert garbled.status_code == 400 and "not valid gzip" in garbled.json()["error"]
        assert requests.post(f"{base}/v1/models/nope/predict", data=png, timeout=30).status_code == 404
        assert requests.get(f"{base}/v2/health/ready", timeout=30).status_code == 200
        assert _infer_json(base, x).status_code == 200


def test_the_pixel_limit_refuses_a_large_image(tiny):
    models = [dataclasses.replace(m, max_megapixels=0.001) for m in tiny.models]  # 1000 pixels at most
    png = cv2.imencode(".png", np.full((48, 48), 128, np.uint8))[1].tobytes()
    with serving(models) as base:
        for image in (png, dicom_bytes(np.full((48, 48), 128, np.uint8))):  # DICOM: from Rows × Columns
            answer = requests.post(f"{base}/v1/models/tiny/predict", data=image, timeout=30)
            assert answer.status_code == 400 and "max_megapixels" in answer.json()["error"]


def test_logs_carry_the_request_id_and_no_patient_attributes(tiny, caplog):
    gray = cv2.imread(tiny.test_files[2], cv2.IMREAD_GRAYSCALE)
    good = dicom_bytes(gray, patient_id=PATIENT)
    with caplog.at_level(logging.INFO, logger="medq"), serving(tiny.models) as base:
        url = f"{base}/v1/models/tiny/predict"
        ok = requests.post(url, data=good, headers={"X-Request-ID": "trace-42"}, timeout=30)
        bad = requests.post(url, data=good[:len(good) // 2], timeout=30)  # pixel data cut off
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "trace-42"
    assert bad.status_code == 400 and PATIENT not in bad.text
    text = caplog.text
    assert "trace-42" in text and bad.headers["x-request-id"] in text
    assert PATIENT not in text and "Doe" not in text


def _bad_dicoms(gray: np.ndarray) -> dict[str, bytes]:
    """DICOM files holding PATIENT in their patient attributes, each bad in another way, with the words their 400
    must carry."""
    import pydicom
    from pydicom.uid import JPEGLSLossless

    good = dicom_bytes(gray, patient_id=PATIENT)
    mislabelled = pydicom.dcmread(io.BytesIO(dicom_bytes(gray, jpeg_quality=90, patient_id=PATIENT)))
    mislabelled.file_meta.TransferSyntaxUID = JPEGLSLossless  # a JPEG-LS decoder given baseline JPEG data fails
    buffer = io.BytesIO()
    mislabelled.save_as(buffer)
    return {"cannot be decoded": good[:len(good) // 2],
            "without pixel data": dicom_bytes(gray, with_pixels=False, patient_id=PATIENT),
            "multi-frame": dicom_bytes(np.stack([gray, gray]), frames=2, patient_id=PATIENT),
            "(JPEG-LS Lossless Image Compression)": buffer.getvalue()}


def test_bad_dicoms_are_400s_and_no_patient_attribute_reaches_a_log_or_an_answer(tiny, caplog):
    gray = cv2.imread(tiny.test_files[2], cv2.IMREAD_GRAYSCALE)
    with caplog.at_level(logging.INFO), serving(tiny.models) as base:  # every logger, pydicom's included
        url = f"{base}/v1/models/tiny/predict"
        for reason, data in _bad_dicoms(gray).items():
            for answer in (requests.post(url, data=data, timeout=30),
                           requests.post(url, files=[("a", ("a.dcm", data))], timeout=30)):
                assert answer.status_code == 400 and reason in answer.json()["error"], (reason, answer.text)
                assert PATIENT not in answer.text and "Doe" not in answer.text
    assert PATIENT not in caplog.text and "Doe" not in caplog.text


class _HeldEngine:
    """Stands in for a model: holds every call until released, or fails."""

    precision, path = "int8", Path("stand-in.pb")

    def __init__(self, fail: bool = False):
        self.release, self.fail = threading.Event(), fail

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.fail:
            raise RuntimeError("kernel exploded")
        self.release.wait(60)
        return np.full((len(x), 2), 0.5, np.float32)

    def close(self) -> None:
        pass


def test_not_ready_deadline_and_engine_failure_answers(tiny, caplog):
    held, broken = _HeldEngine(), _HeldEngine(fail=True)
    models = [dataclasses.replace(tiny.models[0], name="held", engine=held),
              dataclasses.replace(tiny.models[0], name="broken", engine=broken),
              dataclasses.replace(tiny.models[0], name="cold", ready=False)]
    with caplog.at_level(logging.INFO, logger="medq"), serving(models, request_timeout_ms=300) as base:
        assert requests.get(f"{base}/v2/health/ready", timeout=30).status_code == 503  # one model is not ready
        assert requests.get(f"{base}/v2/models/cold/ready", timeout=30).status_code == 503
        assert requests.get(f"{base}/v2/models/held/ready", timeout=30).status_code == 200
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32, 32, 1], "data": [0.0] * 1024}]}
        answers = {name: requests.post(f"{base}/v2/models/{name}/infer", json=body, timeout=60)
                   for name in ("cold", "held", "broken")}
        held.release.set()
        assert answers["cold"].status_code == 503 and "not ready" in answers["cold"].json()["error"]
        assert answers["held"].status_code == 504 and "request_timeout_ms" in answers["held"].json()["error"]
        failed = answers["broken"]
        assert failed.status_code == 500 and failed.headers["x-request-id"] in failed.json()["error"]
        assert "kernel exploded" not in failed.text  # the details go to the log, not to the client
    assert f"request {failed.headers['x-request-id']}: broken failed on its batch: RuntimeError: kernel exploded" \
        in caplog.text


def test_at_its_limit_of_requests_and_connections_the_server_answers_503_as_json(tiny):
    """`medq serve` caps requests and connections at once; beyond, uvicorn's own limit_concurrency answered a plain
    text "Service Unavailable" that v2 clients cannot read as {"error": ...}. Probes still answer."""
    import socket

    from medq.serve import ServerState

    held = _HeldEngine()
    model = dataclasses.replace(tiny.models[0], name="held", engine=held)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 32, 32, 1], "data": [0.0] * 1024}]}
    state = ServerState(limit=2)
    with serving([model], state=state) as base:
        url = f"{base}/v2/models/held/infer"
        answers: list[requests.Response] = []
        threads = [threading.Thread(target=lambda: answers.append(requests.post(url, json=body, timeout=60)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        _wait_for(lambda: state.in_flight == 2, "two requests held in flight")
        refused = requests.post(url, json=body, timeout=30)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json() == {"error": "the server is at its limit of 2 requests and connections at once; "
                                           "retry after a second"}
        assert requests.get(f"{base}/v2/health/live", timeout=30).status_code == 200
        held.release.set()
        for t in threads:
            t.join(60)
        assert [a.status_code for a in answers] == [200, 200]

        host, port = base.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=30) for _ in range(2)]  # open, nothing sent
        # the request's own connection is the third: above the limit of 2 connections
        try:
            _wait_for(lambda: state.connections() >= 2, "two idle connections counted")
            refused = requests.post(url, json=body, timeout=30)
            assert refused.status_code == 503 and "limit of 2" in refused.json()["error"]
        finally:
            for sock in idle:
                sock.close()
        _wait_for(lambda: state.connections() == 0, "the idle connections closed")
        assert requests.post(url, json=body, timeout=30).status_code == 200


def test_an_answer_naming_a_file_whose_bytes_are_not_utf8_is_valid_utf8_json(tiny):
    """A name carrying os.fsdecode's surrogate escape (b'caf\\xe9.png') is answered as the text caf\\xe9.png: the
    JSON encodes as strict UTF-8 (a lone surrogate would not) and the byte stays recognisable."""
    answer = tiny.models[0].answer(np.array([0.25, 0.75], np.float32), os.fsdecode(b"caf\xe9.png"))
    line = json.dumps(answer, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    assert json.loads(line)["file"] == "caf" + "\\" + "xe9.png"


def test_serve_settings_are_checked_with_one_line_each(tmp_path, caplog):
    from medq.config import load_config
    from medq.errors import ConfigError
    from medq.serve.server import check_settings, read_token

    for override, message in [("serve.max_batch_size=0", "greater than 0"), ("serve.model=fp16", "not allowed"),
                              ("serve.port=http", "integer")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    cases = [({"runs": []}, "no run to serve"), ({"threshold": 1.0}, "between 0 and 1"),
             ({"max_queue_size": 4, "max_batch_size": 8}, "could never queue"),
             ({"decode_threads": -1}, "decode_threads -1: must be 0"),
             ({"max_body_mb": float("nan")}, "max_body_mb nan: must be a finite number"),
             ({"request_timeout_ms": float("inf")}, "request_timeout_ms inf: must be a finite number"),
             ({"max_queue_delay_ms": 30000.0}, "not below serve.request_timeout_ms 30000"),
             ({"tls_cert": "cert.pem"}, "go together"), ({"token_file": str(tmp_path / "none")}, "not found")]
    for changes, message in cases:
        settings = dataclasses.replace(ServeConfig(runs=["tiny"]), **changes)
        with pytest.raises(ConfigError, match=message):
            check_settings(settings)
    # the warm-up runs a batch of every size: 1 + 2 + ... + 1024 = 1024 * 1025 / 2 = 524800 images before ready
    with pytest.raises(ConfigError, match=r"serve.max_batch_size 1024: above 128; the warm-up before ready would run "
                                          r"524800 images"):
        check_settings(dataclasses.replace(ServeConfig(runs=["tiny"]), max_batch_size=1024, max_queue_size=2048))
    check_settings(dataclasses.replace(ServeConfig(runs=["tiny"]), max_batch_size=128, max_queue_size=128))
    (tmp_path / "blank").write_text("\n")
    with pytest.raises(ConfigError, match="one token"):
        read_token(str(tmp_path / "blank"))
    shared = tmp_path / "shared-token"  # as Kubernetes mounts a secret (0644): served, with a warning naming the fix
    shared.write_text("k9-token\n")
    shared.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="medq"):
        assert read_token(str(shared)) == "k9-token"
    assert f"chmod 600 {shared}" in caplog.text


def test_a_wrong_tls_pair_is_one_line_before_any_model_loads(tmp_path):
    """A key of another certificate, a file that is no PEM, an encrypted key (OpenSSL would prompt for its pass
    phrase on a terminal the server does not have): each a ConfigError naming both files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from medq.errors import ConfigError
    from medq.serve.server import check_settings

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert, key = served_run.self_signed(tmp_path / "a")
    _, other_key = served_run.self_signed(tmp_path / "b")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    locked = tmp_path / "locked.pem"
    locked.write_bytes(load_pem_private_key(key.read_bytes(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass phrase")))
    check_settings(ServeConfig(runs=["tiny"], tls_cert=str(cert), tls_key=str(key)))  # the right pair passes
    for pair, message in [((cert, other_key), "does not belong to the certificate"),
                          ((garbage, key), "not a PEM certificate"), ((cert, locked), "the key is encrypted")]:
        with pytest.raises(ConfigError, match=message) as refused:
            check_settings(ServeConfig(runs=["tiny"], tls_cert=str(pair[0]), tls_key=str(pair[1])))
        assert str(pair[0]) in str(refused.value) and str(pair[1]) in str(refused.value)


def test_a_port_in_use_is_one_line_before_any_model_loads(tmp_path, monkeypatch):
    import socket

    import medq.serve.server as server
    from medq.config import load_config

    def load_models(*args, **kwargs):
        raise AssertionError("the models were loaded before the port was checked")

    monkeypatch.setattr(server, "load_models", load_models)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load_config(None, ["serve.runs=[tiny]", f"serve.port={port}"])
        with pytest.raises(MedqError, match=f"127.0.0.1:{port}: the server cannot listen there"):
            server.run_serve(config, [tmp_path / "tiny"])


def test_an_unset_threshold_serves_the_runs_own_thresholds_and_the_metadata_states_them(tmp_path):
    from medq.inference import RunInfo
    from medq.preprocess import PreprocessSpec
    from medq.serve.models import ServedModel
    from medq.thresholds import Thresholds

    classes = ["NORMAL", "PNEUMONIA"]
    info = RunInfo(tmp_path, classes, "binary", PreprocessSpec(8, 1, "unit"),
                   thresholds=Thresholds("binary", classes, {"PNEUMONIA": 0.3}, "validation"))
    served = ServedModel("r", info, SimpleNamespace(name="tensorflow", precision="int8"), "abc", None, 10.0)
    answer = served.answer(np.array([0.6, 0.4]), None)  # 0.4 ≥ 0.3: PNEUMONIA, not the arg-max NORMAL
    assert answer["prediction"] == "PNEUMONIA" and answer["thresholds"] == {"PNEUMONIA": 0.3}
    parameters = served.metadata()["parameters"]
    assert parameters["thresholds"] == {"PNEUMONIA": 0.3} and parameters["thresholds_source"] == "validation"
    assert "probability >= its threshold" in parameters["decision"]
    fixed = ServedModel("r", info, SimpleNamespace(name="tensorflow", precision="int8"), "abc", 0.5, 10.0)
    assert fixed.answer(np.array([0.6, 0.4]), None)["prediction"] == "NORMAL"
