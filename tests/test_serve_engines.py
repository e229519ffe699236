"""`medq serve --engine onnxruntime|openvino`: a tiny run benchmarked with reference rows, then served from the very
files the benchmark built (probabilities as the runtime itself computes them on those files), and refused at start
when such a file is missing or was built from an older graph of the run."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests

pytest.importorskip("fastapi")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")

from medq import runrecord  # noqa: E402
from medq.errors import MedqError  # noqa: E402
from served_run import free_port, wait_ready  # noqa: E402


# --- fast: the cache check and the install line, on hand-made folders -------------------------------------------------

def test_built_model_is_current_only_for_the_graph_it_was_built_from(tmp_path):
    from medq import engines

    folder = tmp_path / "benchmark" / "reference"
    folder.mkdir(parents=True)
    sha = "ab" * 32
    assert engines.built_model(tmp_path, "onnx-fp32", sha)[0] is None  # nothing built
    (folder / "model_fp32.onnx").write_bytes(b"onnx")
    assert "no onnx-fp32 model" in engines.built_model(tmp_path, "onnx-fp32", sha)[1]  # no cache entry
    (folder / "cache.json").write_text(json.dumps({"onnx-fp32": f"{sha}|opset17"}))
    assert engines.built_model(tmp_path, "onnx-fp32", sha) == (folder / "model_fp32.onnx", "")
    path, why = engines.built_model(tmp_path, "onnx-fp32", "cd" * 32)
    assert path is None and "stale" in why and "abababababab" in why and "cdcdcdcdcdcd" in why
    (folder / "cache.json").write_text("[not json")
    assert "unreadable" in engines.built_model(tmp_path, "onnx-fp32", sha)[1]


def test_a_missing_runtime_is_refused_with_the_install_line(tmp_path, monkeypatch):
    import importlib.util

    from medq.inference import RunInfo
    from medq.preprocess import PreprocessSpec
    from medq.serve.engines import open_engine

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    info = RunInfo(tmp_path, ["normal", "pneumonia"], "binary", PreprocessSpec(32, 1, "unit"))
    with pytest.raises(MedqError, match=r"onnxruntime not installed; .*requirements-reference\.txt"):
        open_engine(info, "int8", engine="onnxruntime")


# --- slow: a trained, quantized and benchmarked run (well over 30 s) -------------------------------------------------

@pytest.fixture(scope="module")
def benchmarked(tmp_path_factory, make_tiny_run):
    """The tiny quantized run (conftest), benchmarked with the ONNX Runtime INT8 and OpenVINO FP32 reference rows."""
    from medq.benchmark import run_benchmark

    run = make_tiny_run(tmp_path_factory.mktemp("serveeng"))
    config = copy.deepcopy(run.config)
    bench = config.benchmark
    bench.precisions, bench.instances, bench.reference = ["fp32"], [], ["onnxruntime-int8", "openvino-fp32"]
    bench.warmup, bench.latency_iterations, bench.throughput_iterations = 1, 2, 1
    bench.batch_sizes, bench.batch_size, bench.calibration_images = [1], 4, 8
    report = run_benchmark(config)
    assert {r["id"] for r in report["results"]} >= {"onnxruntime-int8", "openvino-fp32"}, report["skipped"]
    reference = Path(run.run_dir) / "benchmark" / "reference"
    return SimpleNamespace(**vars(run), onnx_int8=reference / "model_int8.onnx", ov_fp32=reference / "openvino_fp32.xml")


def _batch(n: int) -> np.ndarray:
    return np.random.default_rng(7).random((n, 32, 32, 1), dtype=np.float32)


def _served(run_dir: Path, engine: str, model: str):
    from medq.serve.models import load_model

    return load_model(run_dir, model, engine_name=engine, threshold=None, max_megapixels=10.0, intra_op_threads=1)


@pytest.mark.slow
def test_v2_infer_gives_what_onnxruntime_computes_on_the_file_the_benchmark_built(benchmarked, tmp_path,
                                                                                   clean_thread_env):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "medq", "serve", "--set",
                                 f"run.output_dir={benchmarked.root / 'output'}", "--run", "tiny", "--engine",
                                 "onnxruntime", "--model", "int8", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, log)
        x = _batch(5)
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        answer = requests.post(f"{base}/v2/models/tiny/infer", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        got = np.array(answer.json()["outputs"][0]["data"], np.float32).reshape(5, -1)
        meta = requests.get(f"{base}/v2/models/tiny", timeout=30).json()
    finally:
        proc.terminate()
        proc.wait(120)
    session = ort.InferenceSession(str(benchmarked.onnx_int8), providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert meta["versions"] == [hashlib.sha256(benchmarked.onnx_int8.read_bytes()).hexdigest()[:12]]
    assert meta["platform"] == "onnxruntime_onnx"
    assert (meta["parameters"]["engine"], meta["parameters"]["precision"]) == ("onnxruntime", "int8")


@pytest.mark.slow
def test_openvino_serves_the_ir_the_benchmark_built(benchmarked):
    ov = pytest.importorskip("openvino")
    served = _served(benchmarked.run_dir, "openvino", "fp32")
    x = _batch(3)
    compiled = ov.Core().compile_model(str(benchmarked.ov_fp32), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    want = compiled(x)[compiled.output(0)]
    np.testing.assert_allclose(served.engine(x), want, atol=1e-5)
    assert served.metadata()["parameters"]["engine"] == "openvino"
    assert served.version == hashlib.sha256(benchmarked.ov_fp32.read_bytes()).hexdigest()[:12]
    weights = benchmarked.ov_fp32.with_suffix(".bin")
    assert served.facts["engine_facts"]["companions"] == {weights.name: hashlib.sha256(weights.read_bytes()).hexdigest()}
    served.engine.close()


def _copy_run(benchmarked, tmp_path: Path) -> Path:
    run = tmp_path / "output" / "tiny"
    shutil.copytree(benchmarked.run_dir, run, ignore=shutil.ignore_patterns("nc_workspace", "checkpoints", "logs"))
    return run


@pytest.mark.slow
def test_a_missing_or_stale_recipe_is_refused_with_the_command_that_builds_it(benchmarked, tmp_path):
    command = "medq benchmark --set run.output_dir={} --run-name tiny --set benchmark.reference=[onnxruntime-int8]"

    run = _copy_run(benchmarked, tmp_path / "missing")
    (run / "benchmark" / "reference" / "model_int8.onnx").unlink()
    with pytest.raises(MedqError) as missing:
        _served(run, "onnxruntime", "int8")
    assert "no onnx-int8 model has been built" in str(missing.value)
    assert command.format(run.parent) in str(missing.value)

    # the FP32 graph re-frozen (new bytes, recorded in the manifest) after the benchmark built its ONNX models
    run = _copy_run(benchmarked, tmp_path / "refrozen")
    graph = run / "model_fp32.pb"
    graph.write_bytes(graph.read_bytes() + b"\0")
    manifest = json.loads((run / runrecord.MANIFEST).read_text())
    manifest["artifacts"]["fp32_pb"]["sha256"] = hashlib.sha256(graph.read_bytes()).hexdigest()
    (run / runrecord.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MedqError) as stale:
        _served(run, "onnxruntime", "int8")
    assert "stale" in str(stale.value) and command.format(run.parent) in str(stale.value)

    # a cache entry naming another source graph
    run = _copy_run(benchmarked, tmp_path / "rekeyed")
    cache_file = run / "benchmark" / "reference" / "cache.json"
    cache = json.loads(cache_file.read_text())
    cache["onnx-int8"] = "0" * 64 + cache["onnx-int8"][64:]
    cache_file.write_text(json.dumps(cache))
    with pytest.raises(MedqError, match="stale"):
        _served(run, "onnxruntime", "int8")

    # the source graph itself changed without the manifest knowing: refused as every stage refuses it
    run = _copy_run(benchmarked, tmp_path / "tampered")
    with open(run / "model_fp32.pb", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(MedqError, match="sha256 differs"):
        _served(run, "onnxruntime", "int8")


@pytest.mark.slow
def test_an_engine_without_that_precision_is_refused(benchmarked):
    with pytest.raises(MedqError, match="offers no keras model; choose --model fp32 or int8"):
        _served(benchmarked.run_dir, "onnxruntime", "keras")
