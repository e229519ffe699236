"""The converter on ONNX models onnx2tf cannot take, and on models that only run at their fixed batch.

Models are built node by node with onnx.helper (no torch): a convolution, then the op under test, then global
average pooling and a dense layer to 2 logits.
"""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from medq.convert import convert, export_onnx
from medq.convert.parity import phantom_batch, run_frozen
from medq.errors import MedqError

SIZE = 32


def classifier(path, middle: list, extra=(), batch: int = 1):
    """images [batch, 1, 32, 32] → Conv → MIDDLE (→ 'm') → GlobalAveragePool → Flatten → Gemm → logits
    [batch, 2]."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3],
                              name="conv"), *middle,
             helper.make_node("GlobalAveragePool", ["m"], ["gap"], name="gap"),
             helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1, name="fc")]
    inits = [numpy_helper.from_array((rng.standard_normal((4, 1, 3, 3)) * 0.4).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((2, 4)).astype(np.float32), "wf"),
             numpy_helper.from_array(np.zeros(2, np.float32), "bf"), *extra]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                         [batch, 1, SIZE, SIZE])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_an_op_onnx2tf_cannot_convert_is_named_and_no_opset_is_suggested_for_onnx_input(tmp_path):
    source = classifier(tmp_path / "lp.onnx", [helper.make_node("LpPool", ["c1"], ["m"], kernel_shape=[2, 2], p=2,
                                                                strides=[2, 2], name="lp_pool_7")])
    with pytest.raises(MedqError) as err:
        convert(source, run_dir=tmp_path / "run", task="multiclass", normalization="unit", verbose=False)
    text = str(err.value)
    assert "\n" not in text and str(source) in text
    assert "op LpPool" in text and "'lp_pool_7'" in text  # the node the file calls it, and its op
    assert "try another opset" not in text and "re-export" in text


def test_a_model_with_a_batch_1_grid_passes_parity_at_its_fixed_batch(tmp_path):
    """GridSample's grid is a batch-1 constant, so the model runs only at batch 1 (onnxruntime refuses batch 2)."""
    axis = np.linspace(-0.9, 0.9, SIZE, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis[::-1], indexing="xy"), -1)[None]  # a vertical flip, shrunk by 10 %
    source = classifier(tmp_path / "grid.onnx", [helper.make_node("GridSample", ["c1", "grid"], ["m"], name="warp")],
                        [numpy_helper.from_array(grid, "grid")])
    result = convert(source, run_dir=tmp_path / "run", task="multiclass", normalization="unit", verbose=False)

    report = json.loads((tmp_path / "run" / "parity.json").read_text())
    assert report["passed"] and report["batch"] == 1 and report["images"] == 8
    # Independently: the frozen graph, image by image, against the source in onnxruntime plus a softmax.
    x = phantom_batch(result.preprocess, 3)
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {"images": x[i:i + 1].transpose(0, 3, 1, 2)})[0] for i in range(3)])
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    got = run_frozen(result.fp32_pb, x, batch_size=1)
    assert np.abs(got - expected).max() < 1e-4

    exported = export_onnx(tmp_path / "run", verbose=False)  # the run's graph to ONNX, checked at the same batch
    assert exported.parity["passed"] and exported.parity["batch"] == 1


def test_the_node_onnx2tf_names_on_failure_is_reported_with_its_op(tmp_path):
    """onnx2tf's own failure report (utils/common_functions.py: ``error(f'onnx_op_name: {graph_node.name}')``, in
    colour) → the node and its op type from the model."""
    from medq.convert.onnx_graph import _failed_node

    source = classifier(tmp_path / "m.onnx", [helper.make_node("Relu", ["c1"], ["m"], name="act_3")])
    output = ("\x1b[31mERROR:\x1b[0m The trace log is below.\nTraceback ...\nValueError: shapes\n"
              "\x1b[31mERROR:\x1b[0m onnx_op_name: act_3\n\x1b[31mERROR:\x1b[0m Read this and deal with it.\n")
    assert _failed_node(source, output) == "node 'act_3' (op Relu)"
    assert _failed_node(source, "Segmentation fault") is None  # nothing named: the message says "the ONNX graph"
