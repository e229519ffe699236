"""`medq run` end to end through the CLI on a tiny configuration: every stage really runs, offline."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medq.graph import op_type_counts, read_graph_def

pytestmark = pytest.mark.slow  # one `medq run` of every stage, minutes on 2 cores

TINY = [
    "data.phantom.n_train=240", "data.phantom.n_test=60", "data.phantom.size=64",
    "preprocess.image_size=48", "model.params={blocks: 3, filters: 8, dense_units: 16}",
    "train.epochs=20", "train.early_stopping_patience=20",  # 6 left this tiny model at chance: quantize refuses it
    "tune.max_trials=2", "tune.epochs=1",
    "benchmark.warmup=2", "benchmark.latency_iterations=10", "benchmark.throughput_iterations=2",
    "benchmark.batch_size=8",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, repo_root):
    tmp = tmp_path_factory.mktemp("e2e")
    args = [sys.executable, "-m", "medq", "run", "--config", str(Path(repo_root) / "configs" / "default.yaml"),
            "--set", f"data.root={tmp / 'data' / 'chest_xray'}", "--set", f"run.output_dir={tmp / 'out'}",
            "--set", f"quantize.deploy={Path(repo_root) / 'configs' / 'deploy.yaml'}"]
    for override in TINY:
        args += ["--set", override]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "out" / "default", result


def _plain_tensorflow(pb: Path, inputs: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    graph_def = tf.compat.v1.GraphDef.FromString(pb.read_bytes())
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
        with tf.compat.v1.Session(graph=graph) as session:
            return session.run("output:0", {"input:0": inputs})


def test_run_writes_every_artifact_with_its_checksum(finished_run):
    run_dir, _ = finished_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for key in ("keras_model", "fp32_pb", "int8_pb", "benchmark_json"):
        assert key in manifest["artifacts"], key
    for stage in ("data", "train", "tune", "freeze", "quantize", "benchmark", "run"):
        assert stage in manifest["stages"], stage
    assert manifest["input_name"] == "input" and manifest["output_name"] == "output"
    assert manifest["classes"] == ["NORMAL", "PNEUMONIA"]
    assert not list(run_dir.glob(".*.tmp*")), "a temporary file was left behind"


def test_int8_graph_has_quantized_convolutions_and_keeps_the_metric(finished_run):
    run_dir, _ = finished_run
    ops = op_type_counts(read_graph_def(run_dir / "model_int8.pb"))
    assert any("QuantizedConv2D" in op for op in ops), ops
    assert "Conv2D" not in ops or ops.get("Conv2D", 0) < op_type_counts(read_graph_def(run_dir / "model_fp32.pb"))["Conv2D"]
    quantize = json.loads((run_dir / "manifest.json").read_text())["stages"]["quantize"]
    assert quantize["criterion"]["met"] is True
    metric = quantize["metric"]
    assert quantize["int8_val"][metric] >= quantize["criterion"]["threshold"] - 1e-9


def test_benchmark_compares_fp32_and_int8_on_the_test_split(finished_run):
    run_dir, result = finished_run
    report = json.loads((run_dir / "benchmark.json").read_text())
    rows = {r["precision"]: r for r in report["results"] if r["engine"].startswith("tensorflow")}
    assert {"fp32", "int8"} <= set(rows)
    # the oracle: the test images' classes from their folder names (the phantoms' layout), the preprocessed inputs
    # run through the FP32 graph by plain TensorFlow, and every row's saved probabilities scored by sklearn
    from sklearn.metrics import accuracy_score, roc_auc_score

    split = json.loads((run_dir / "split.json").read_text())
    samples = [dict(zip(split["columns"], s)) for s in split["samples"]]
    truth = np.array([report["classes"].index(Path(s["path"]).parent.name) for s in samples if s["split"] == "test"])
    inputs = np.load(run_dir / report["inputs"]["path"])
    assert len(inputs) == len(truth) == report["inputs"]["n_images"] == 60
    np.testing.assert_allclose(_plain_tensorflow(run_dir / "model_fp32.pb", inputs),
                               np.load(run_dir / "benchmark" / "probs" / f"{rows['fp32']['id']}.npy"), atol=1e-5)
    # decisions at the run's operating threshold for the positive class (chosen on validation, in the manifest)
    recorded = json.loads((run_dir / "manifest.json").read_text())["thresholds"]
    t = recorded["classes"][report["classes"][1]]["value"]
    for row in rows.values():
        assert 0 < row["latency_ms"]["p50"] <= row["latency_ms"]["p90"] <= row["latency_ms"]["p99"]
        assert row["throughput_ips"] > 0
        probs = np.load(run_dir / "benchmark" / "probs" / f"{row['id']}.npy")
        assert row["metrics"]["accuracy"] == pytest.approx(accuracy_score(truth, probs[:, 1] >= t), abs=1e-9)
        assert row["metrics"]["auc"] == pytest.approx(roc_auc_score(truth, probs[:, 1]), abs=1e-9)
    assert (run_dir / "benchmark.md").read_text().count("|") > 10
    assert (run_dir / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "benchmark.md" in result.stdout and "int8" in result.stdout.lower()

