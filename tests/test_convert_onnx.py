"""medq.convert without torch: ONNX files in, medq models out to ONNX, the head rules, parity failures.

The ONNX models here are built node by node with onnx.helper and numpy weights, so this file needs no torch.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from medq import artifacts, runrecord
from medq.convert import convert, export_onnx
from medq.convert.parity import parity_report, phantom_batch, run_frozen
from medq.errors import MedqError
from medq.preprocess import PreprocessSpec

QUANTIZE_NEEDS = ("input_name", "output_name", "input_shape", "classes", "task", "preprocess")


def tiny_onnx(path, *, classes=3, channels=3, size=32, batch=1, ending=None, input_name="images",
              output_name="logits", seed=0):
    """Conv, Relu, Conv (stride 2), Relu, GlobalAveragePool, Flatten, Gemm [, ending]; NCHW, static sizes."""
    rng = np.random.default_rng(seed)

    def init(name, shape, scale):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", [input_name, "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["fc" if ending else output_name], transB=1),
    ]
    if ending:
        attrs = {"axis": 1} if ending == "Softmax" else {}
        nodes.append(helper.make_node(ending, ["fc"], [output_name], **attrs))
    inits = [init("w1", (8, channels, 3, 3), 0.4), init("b1", (8,), 0.1), init("w2", (12, 8, 3, 3), 0.2),
             init("b2", (12,), 0.1), init("wf", (classes, 12), 1.0), init("bf", (classes,), 0.1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def source_outputs(path, x_nchw, batch=1):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x_nchw[i:i + batch]})[0] for i in range(0, len(x_nchw), batch)])


def test_onnx_file_converts_without_torch(tmp_path, monkeypatch):
    for name in ("torch", "torchvision"):
        monkeypatch.setitem(sys.modules, name, None)  # `import torch` now fails, as when the extra is absent
    source = tiny_onnx(tmp_path / "study.onnx", classes=3, batch=1)  # static batch 1, own tensor names
    run = tmp_path / "run"
    result = convert(source, run_dir=run, task="multiclass", normalization="unit", classes=["a", "b", "c"],
                     verbose=False)
    assert sys.modules["torch"] is None
    # onnx2tf ran in a child: loaded here, its tf_keras makes every later tf.keras load_model hang forever.
    assert "onnx2tf" not in sys.modules and "tf_keras" not in sys.modules

    report = json.loads((run / "parity.json").read_text())
    assert report["passed"] and report["max_abs_diff"] < 1e-4
    assert set(report["engines"]) == {"source-onnx", "onnxruntime", "tensorflow"}
    # Independently: the frozen graph (NHWC) against the untouched source file plus a softmax.
    spec = PreprocessSpec(32, 3, "unit")
    noise = np.random.default_rng(1).uniform(0, 1, (3, 32, 32, 3)).astype(np.float32)
    x = np.concatenate([phantom_batch(spec, 3), noise])
    logits = source_outputs(source, x.transpose(0, 3, 1, 2))
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    got = run_frozen(result.fp32_pb, x)
    assert np.abs(got - expected).max() < 1e-5
    manifest = runrecord.read_manifest(run)
    assert {k: manifest[k] for k in QUANTIZE_NEEDS} == {
        "input_name": "input", "output_name": "output", "input_shape": [32, 32, 3], "classes": ["a", "b", "c"],
        "task": "multiclass",
            "preprocess": {"image_size": 32, "channels": 3, "normalization": "unit", "bit_depth": "auto"}}
    assert manifest["source_model"]["kind"] == "onnx" and manifest["source_model"]["appended_head"] == ["softmax"]
    assert runrecord.recorded_path(run, "fp32_pb") == result.fp32_pb

    # The other direction on the same run: its frozen graph → ONNX (tf2onnx), checked in onnxruntime.
    exported = export_onnx(run, verbose=False)
    assert exported.parity["passed"] and exported.parity["max_abs_diff"] < 1e-4
    session = ort.InferenceSession(str(exported.onnx), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert np.abs(session.run(["output"], {"input": x})[0] - expected).max() < 1e-5


def test_single_output_sigmoid_model_becomes_two_binary_columns(tmp_path):
    source = tiny_onnx(tmp_path / "bus.onnx", classes=1, channels=1, batch=4, ending="Sigmoid")
    result = convert(source, run_dir=tmp_path / "run", normalization="symmetric", verbose=False)  # size from file
    assert result.task == "binary" and result.classes == ["class_0", "class_1"]
    assert result.preprocess == PreprocessSpec(32, 1, "symmetric")
    x = phantom_batch(result.preprocess, 4)
    p = source_outputs(source, x.transpose(0, 3, 1, 2), batch=4)  # the file's static batch
    got = run_frozen(result.fp32_pb, x)
    assert got.shape == (4, 2)
    assert np.abs(got - np.concatenate([1 - p, p], axis=1)).max() < 1e-5


@pytest.mark.parametrize("kwargs, message", [
    ({"normalization": "unit"}, "pass --task"),  # logits: softmax or sigmoid is the user's call
    ({"task": "multilabel"}, "pass --normalization"),
    ({"task": "binary", "normalization": "unit"}, "binary means 2 classes"),
    ({"task": "multiclass", "normalization": "unit", "image_size": 64}, "takes 32x32 images"),
    ({"task": "multiclass", "normalization": "unit", "classes": ["a", "b"]}, "pass --classes with 3 distinct names"),
])
def test_onnx_input_errors_are_one_line_naming_the_file(tmp_path, kwargs, message):
    source = tiny_onnx(tmp_path / "m.onnx", classes=3)
    with pytest.raises(MedqError) as err:
        convert(source, run_dir=tmp_path / "run", verbose=False, **kwargs)
    text = str(err.value)
    assert message in text and str(source) in text and "\n" not in text


def test_torch_input_without_torch_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    checkpoint = tmp_path / "resnet18.pth"
    checkpoint.write_bytes(b"not read")
    with pytest.raises(MedqError, match=r"resnet18\.pth: .*pip install -r env/requirements-convert\.txt"):
        convert(checkpoint, arch="resnet18", run_dir=tmp_path / "run", verbose=False)


def test_parity_failure_stops_the_conversion(tmp_path, monkeypatch):
    import medq.convert.parity as parity

    real = parity.run_frozen
    monkeypatch.setattr(parity, "run_frozen", lambda *a, **k: real(*a, **k) + 1e-3)  # a subtly wrong TF graph
    run = tmp_path / "run"
    with pytest.raises(MedqError, match=r"m\.onnx: converted model does not match the source \(max \|diff\| 1\.00e-03, "
                                        r"logits relative .* > tolerance 1e-04\)"):
        convert(tiny_onnx(tmp_path / "m.onnx"), run_dir=run, task="multiclass", normalization="unit", verbose=False)
    report = json.loads((run / "parity.json").read_text())
    assert report["passed"] is False and report["pairs"]["onnxruntime~tensorflow"]["max_abs_diff"] > 1e-4
    assert not (run / "model_fp32.pb").exists() and "fp32_pb" not in runrecord.read_manifest(run).get("artifacts", {})


def test_saturated_probabilities_do_not_hide_different_logits():
    logits = np.array([[40.0, -40.0], [-35.0, 35.0]], np.float32)
    probs = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)  # what softmax gives in float32 for either logits
    spec = PreprocessSpec(32, 1, "unit")
    same = parity_report({"a": probs, "b": probs}, spec, 1e-4, {"a": logits, "b": logits})
    differ = parity_report({"a": probs, "b": probs}, spec, 1e-4, {"a": logits, "b": logits * 1.01})
    assert same["passed"] and same["saturated_fraction"] == 1.0
    assert not differ["passed"] and differ["max_abs_diff"] == 0.0
    assert differ["raw_outputs"]["max_rel_diff"] == pytest.approx(0.01, rel=1e-3)


def test_medq_keras_model_round_trips_to_onnx(tmp_path):
    import tensorflow as tf

    from medq.graph import freeze_keras

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([
        tf.keras.Input((32, 32, 1)),
        tf.keras.layers.Conv2D(8, 3, activation="relu"),
        tf.keras.layers.BatchNormalization(),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.GlobalAveragePooling2D(),
        tf.keras.layers.Dense(2, activation="softmax"),
    ])
    run = tmp_path / "run"
    pb = artifacts.write_bytes(run / "model_fp32.pb", freeze_keras(model).SerializeToString())
    runrecord.commit(run, "freeze", artifacts={"fp32_pb": pb}, facts={
        "input_name": "input", "output_name": "output", "input_shape": [32, 32, 1], "classes": ["NORMAL", "PNEUMONIA"],
        "task": "binary", "preprocess": {"image_size": 32, "channels": 1, "normalization": "unit"}})

    result = export_onnx(run, verbose=False)
    assert result.parity["passed"] and result.parity["max_abs_diff"] < 1e-4
    x = np.random.default_rng(0).uniform(0, 1, (5, 32, 32, 1)).astype(np.float32)
    session = ort.InferenceSession(str(result.onnx), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(["output"], {"input": x})[0] - model.predict(x, verbose=0)).max() < 1e-5
    assert runrecord.recorded_path(run, "fp32_onnx") == result.onnx
    assert json.loads((run / "parity_onnx.json").read_text())["engines"] == ["tensorflow", "onnxruntime"]


def test_export_needs_a_medq_run(tmp_path):
    with pytest.raises(MedqError, match="manifest.json: no preprocessing recorded"):
        export_onnx(tmp_path, verbose=False)
