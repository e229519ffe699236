"""The op census of INC's INT8 DenseNet121, under configs/deploy.yaml: which ops stay FP32.

This is where DenseNet's INT8 time goes (tests/perf/int8_profile.py measures it): every convolution is INT8, but
INC 2.6 on intel-tensorflow 2.14 leaves the pre-activation BatchNorm+ReLU in front of each dense layer, and every
ConcatV2, in FP32, with a Quantize/Dequantize pair around each. The counts are derived from the FP32 graph's
structure, so a change that puts more ops in FP32 (or fewer in INT8) fails here; a rewrite that moves them to INT8
lowers the expected FP32 counts below.
"""
from pathlib import Path

import numpy as np
import pytest

from medq.graph import op_type_counts

# every test here reads INC's INT8 DenseNet121 (a module fixture of ~1 min); each pass's fast test is in
# tests/test_inc_rewrite.py
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]


def _producer(graph_def, name: str):
    nodes = {n.name: n for n in graph_def.node}
    node = nodes[name.split(":")[0].lstrip("^")]
    while node.op == "Identity":
        node = nodes[node.input[0].split(":")[0]]
    return node


@pytest.fixture(scope="module")
def densenet_graphs(repo_root, tmp_path_factory):
    import tensorflow as tf

    from medq.graph import freeze_keras
    from medq.inc.adapters import CalibrationLoader
    from medq.inc.deploy import load_deploy
    from medq.inc.ptq import run_ptq
    from medq.models import build_model

    tf.keras.utils.set_random_seed(0)
    model = build_model("densenet121", (32, 32, 3), 14, "multilabel")
    x = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    model(x, training=True)  # moving statistics that are not the initial ones, so BN folding is not trivial
    fp32 = freeze_keras(model)
    work = tmp_path_factory.mktemp("census")
    loader = CalibrationLoader(x, np.zeros((16, 14), np.float32), [f"{i}.png" for i in range(16)], batch_size=8)
    result = run_ptq(fp32, load_deploy(Path(repo_root) / "configs" / "deploy.yaml"), inputs=["input"], outputs=["output"],
                     sampling_sizes=[16], calib_dataloader=loader, eval_func=lambda graph: 1.0,
                     workspace=work / "nc_workspace", log_path=work / "inc.log")
    assert result.graph_def is not None
    return fp32, result.graph_def


def test_densenet_int8_census(densenet_graphs):
    fp32, int8 = densenet_graphs
    before, after = op_type_counts(fp32), op_type_counts(int8)
    batchnorms = [n for n in fp32.node if n.op == "FusedBatchNormV3"]
    pre_activation = [n for n in batchnorms if _producer(fp32, n.input[0]).op != "Conv2D"]
    assert (before["Conv2D"], before["ConcatV2"], len(batchnorms), len(pre_activation)) == (120, 58, 121, 62)

    quantized_convs = sum(n for op, n in after.items() if op.startswith("QuantizedConv2D"))
    assert quantized_convs == before["Conv2D"] and "Conv2D" not in after  # every convolution INT8
    assert after.get("QuantizedMatMulWithBiasAndDequantize") == 1  # the classifier head
    # the BatchNorms that follow a convolution are folded into it, the pre-activation ones stay FP32 with their ReLU
    assert after["FusedBatchNormV3"] == len(pre_activation)
    assert after["Relu"] == len(pre_activation)
    assert after.get("ConcatV2", 0) == before["ConcatV2"] and "QuantizedConcatV2" not in after
    # one QuantizeV2 in front of each of those, plus the input's and the head's; a Dequantize after every INT8 tensor
    # that feeds an FP32 op: the 58 concatenated outputs, 3 transitions' pools, the stem's pool, the head's input
    assert after["QuantizeV2"] == len(pre_activation) + 2
    assert after["Dequantize"] == before["ConcatV2"] + 3 + 1 + 1


# --- medq.inc.rewrite: the same graph with its concatenations kept in INT8 -------------------------------------------

@pytest.fixture(scope="module")
def rewritten(densenet_graphs):
    from medq.inc.rewrite import rewrite_int8_concat

    _, int8 = densenet_graphs
    before = type(int8)()
    before.CopyFrom(int8)
    graph, report = rewrite_int8_concat(int8)
    assert int8 == before  # the input graph is left as it was
    return graph, report


def _folded_batchnorms(fp32):
    """Pre-activation BatchNorms whose ReLU feeds a convolution (the final one feeds the global pooling)."""
    readers = {}
    for node in fp32.node:
        for tensor in node.input:
            readers.setdefault(tensor.split(":")[0], []).append(node)
    out = []
    for bn in fp32.node:
        if bn.op == "FusedBatchNormV3" and _producer(fp32, bn.input[0]).op != "Conv2D":
            relu = [r for r in readers[bn.name] if r.op == "Relu"]
            if relu and any(r.op == "Conv2D" for r in readers.get(relu[0].name, [])):
                out.append(bn.name)
    return out


def test_int8_concat_census(densenet_graphs, rewritten):
    fp32, _ = densenet_graphs
    graph, report = rewritten
    before, after = op_type_counts(fp32), op_type_counts(graph)
    folded = _folded_batchnorms(fp32)
    assert len(folded) == 61
    assert (report.groups, report.concats, report.folded_batchnorms) == (4, before["ConcatV2"], len(folded))
    assert report.skipped == {}
    assert "ConcatV2" not in after and after["QuantizedConcatV2"] == before["ConcatV2"]
    assert after["_FusedQuantizedDepthwiseConv2D"] == len(folded)
    # what stays FP32: the final BatchNorm + ReLU before the global pooling, read through one Dequantize
    assert after["FusedBatchNormV3"] == after["Relu"] == before["FusedBatchNormV3"] - 59 - len(folded) == 1
    # the 58 3x3 convolutions' and 3 transitions' INT8 outputs enter as INC made them; the stem's quint8 pool is
    # requantized to qint8 once; the final BatchNorm reads a Dequantize with the per-channel scales (one Mul)
    assert (report.inputs, report.requantized_inputs, report.dequantized_readers) == (58 + 3 + 1, 1, 1)
    assert after["Mul"] == 1
    quantized_convs = sum(n for op, n in after.items() if op.startswith("QuantizedConv2D"))
    assert quantized_convs == before["Conv2D"]
    # the stem's zero padding runs on the INT8 bytes (uint8 Bitcast both ways), not as Dequantize → Pad → QuantizeV2
    assert report.int8_pads == 1 and after["Bitcast"] == 2
    assert after["QuantizeV2"] == 3  # the input's, the stem pool's requantization, the classifier head's
    assert after["Dequantize"] == 2  # the stem's pool (to be requantized as qint8) and the final BatchNorm's input


def _session(graph_def):
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    return tf.compat.v1.Session(graph=graph, config=tf.compat.v1.ConfigProto(intra_op_parallelism_threads=2,
                                                                             inter_op_parallelism_threads=1))


def _tensor(name):
    return name if ":" in name else f"{name}:0"


def _scalar(graph_def, name):
    from tensorflow.python.framework import tensor_util

    node = {n.name: n for n in graph_def.node}[name.split(":")[0]]
    return tensor_util.MakeNdarray(node.attr["value"].tensor)


def _channel_scales(int8, graph, x):
    """Per INT8 tensor of the rewritten graph that a concatenation or a fold reads: the true scale of each channel,
    found without the rewrite's bookkeeping: INC's own Dequantize ranges (run on ``x``), the requantized inputs' output
    ranges, and concatenations as the concatenation of their inputs' scales."""
    dequantizes = [n for n in int8.node if n.op == "Dequantize" and n.attr["T"].type == 11]  # qint8
    with _session(int8) as session:
        ranges = session.run([_tensor(t) for n in dequantizes for t in n.input[1:3]], {"input:0": x})
    scale = {_tensor(n.input[0]): max(abs(float(ranges[2 * i])), abs(float(ranges[2 * i + 1]))) / 127
             for i, n in enumerate(dequantizes)}
    requantized = [n.name for n in graph.node if n.op == "QuantizeV2" and n.name.endswith("/int8_concat_quantize")]
    concats = [n for n in graph.node if n.op == "QuantizedConcatV2"]
    with _session(graph) as session:
        values = session.run([f"{r}:{p}" for r in requantized for p in (1, 2)], {"input:0": x})
        shapes = session.run([_tensor(t) for c in concats for t in c.input[:c.attr["N"].i]], {"input:0": x})
    for i, name in enumerate(requantized):
        scale[f"{name}:0"] = max(abs(float(values[2 * i])), abs(float(values[2 * i + 1]))) / 127
    per_channel = {}

    def of(tensor):  # a concatenation's per-channel scales, or an INC tensor's one scale
        return per_channel.get(_tensor(tensor), scale.get(_tensor(tensor)))

    inputs = iter(shapes)
    for concat in concats:  # graph order: inputs before the concatenations that read them
        parts = [np.broadcast_to(of(t), next(inputs).shape[-1]) for t in concat.input[:concat.attr["N"].i]]
        per_channel[f"{concat.name}:0"] = np.concatenate(parts)
    return of


def test_every_fold_equals_its_batchnorm_relu_quantize_op_by_op(densenet_graphs, rewritten):
    """Each fused INT8 depthwise, given the INT8 tensor it reads, equals INC's FP32 BatchNorm → ReLU → QuantizeV2
    computed on the same values (numpy, from the INC graph's constants) within one quantization step."""
    _, int8 = densenet_graphs
    graph, _ = rewritten
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    true_scale = _channel_scales(int8, graph, x)
    folds = [n for n in graph.node if n.op == "_FusedQuantizedDepthwiseConv2D"]
    fetch = [_tensor(n.input[0]) for n in folds] + [f"{n.name}:0" for n in folds]
    with _session(graph) as session:
        values = session.run(fetch, {"input:0": x})
    sources, outputs = values[:len(folds)], values[len(folds):]
    inc = {n.name: n for n in int8.node}
    worst = 0.0
    for node, source, out in zip(folds, sources, outputs):
        bn = inc[node.input[1].rsplit("/int8_fold/", 1)[0]]
        quantize = inc[node.name]  # the fold took the name of INC's QuantizeV2
        assert bn.op == "FusedBatchNormV3" and quantize.op == "QuantizeV2"
        gamma, beta, mean, var = (_scalar(int8, t).astype(np.float64) for t in bn.input[1:5])
        out_max = float(_scalar(int8, quantize.input[2]))
        assert float(_scalar(int8, quantize.input[1])) == 0.0
        real = source.astype(np.float64) * true_scale(node.input[0])
        y = (real - mean) * gamma / np.sqrt(var + bn.attr["epsilon"].f) + beta
        expected = np.clip(np.round(np.maximum(y, 0) * 255 / out_max), 0, 255)
        worst = max(worst, float(np.abs(out.astype(np.float64) - expected).max()))
    assert worst <= 1.0


@pytest.mark.slow  # runs every concatenation of the rewritten DenseNet op by op
def test_every_int8_concatenation_is_an_exact_copy_of_its_inputs(rewritten):
    graph, report = rewritten
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    concats = [n for n in graph.node if n.op == "QuantizedConcatV2"]
    ranges = set()
    with _session(graph) as session:
        for node in concats:
            n = node.attr["N"].i
            ranges.add(tuple(float(_scalar(graph, t)) for t in (node.input[n + 1], node.input[2 * n + 1])))
            ins_out = session.run([_tensor(t) for t in node.input[:n]] + [f"{node.name}:0"], {"input:0": x})
            np.testing.assert_array_equal(np.concatenate(ins_out[:-1], axis=3), ins_out[-1])
            assert len({t for t in node.input[n + 1:]}) == 2  # one min and one max for all inputs: a plain copy
    assert sorted(ranges) == sorted((-r, r) for r in np.float32(list(report.ranges.values())))
    assert all(1 <= spread < 100 for spread in report.scale_spread.values())


def test_int8_concat_graph_predicts_like_inc_graph(densenet_graphs, rewritten):
    from medq.graph import FrozenGraph

    fp32, int8 = densenet_graphs
    graph, _ = rewritten
    x = np.random.default_rng(3).normal(size=(8, 32, 32, 3)).astype(np.float32)
    outputs = []
    for g in (fp32, int8, graph):
        with FrozenGraph(g) as frozen:
            outputs.append(frozen.run(x))
    fp32_out, inc_out, ours = outputs
    inc_error = np.abs(inc_out - fp32_out).max()
    assert np.abs(ours - fp32_out).max() <= max(3 * inc_error, 1e-3)


def test_the_int8_pad_is_exact(densenet_graphs):
    """Dequantize → Pad → QuantizeV2 at one range, replaced by the Pad of the INT8 bytes: bit-identical outputs."""
    from medq.graph import FrozenGraph
    from medq.inc.rewrite import pad
    from medq.inc.rewrite.graph import GraphView

    _, int8 = densenet_graphs
    padded = type(int8)()
    padded.CopyFrom(int8)
    graph = GraphView(padded)
    assert pad.run(graph) == 1
    graph.drop_unused()
    assert op_type_counts(padded)["QuantizeV2"] == op_type_counts(int8)["QuantizeV2"] - 1
    x = np.random.default_rng(4).normal(size=(4, 32, 32, 3)).astype(np.float32)
    outputs = []
    for g in (int8, padded):
        with FrozenGraph(g) as frozen:
            outputs.append(frozen.run(x))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_a_graph_without_an_int8_concatenation_comes_back_unchanged(densenet_graphs):
    from medq.inc.rewrite import rewrite_int8_concat

    fp32, _ = densenet_graphs
    graph, report = rewrite_int8_concat(fp32)  # FP32 concatenations of FP32 tensors: nothing to keep in INT8
    assert graph == fp32
    assert report.groups == 0 and len(report.skipped) == 4
    assert all("not by a SCALED Dequantize" in why for why in report.skipped.values())


def _stage(repo_root, metrics, enabled=True):
    """The quantize stage's state as far as its INT8-concatenation step reads it."""
    from types import SimpleNamespace

    from medq.inc.deploy import load_deploy

    said = []
    return SimpleNamespace(config=SimpleNamespace(quantize=SimpleNamespace(int8_concat=enabled)), metric="auc",
                           metrics=metrics, deploy=load_deploy(Path(repo_root) / "configs" / "deploy.yaml"),
                           say=lambda line, warning=False: said.append(line), said=said)


@pytest.mark.parametrize("case", ["met", "missed", "no kernel", "graph fails", "rewrite fails", "off"])
def test_the_quantize_stage_keeps_the_rewrite_only_when_the_criterion_holds(repo_root, densenet_graphs, case,
                                                                            monkeypatch):
    from medq.inc import rewrite
    from medq.quantize import _QuantizeRun

    _, int8 = densenet_graphs
    baseline, inc_val = 0.90, {"auc": 0.895}

    def metrics(graph):
        assert any(n.op == "QuantizedConcatV2" for n in graph.node)  # only the rewritten graph is evaluated here
        if case == "no kernel":
            raise RuntimeError("No OpKernel was registered to support Op '_FusedQuantizedDepthwiseConv2D'\nmore")
        if case == "graph fails":
            raise ValueError("Input 0 of node x was passed int8 from y:0 incompatible with expected float.\nmore")
        return {"auc": 0.899 if case == "met" else 0.80}

    if case == "rewrite fails":
        def broken(graph_def):
            raise KeyError("densenet121/conv2_block1_concat/concat:0")
        monkeypatch.setattr(rewrite, "rewrite_int8_concat", broken)

    stage = _stage(repo_root, metrics, enabled=case != "off")
    threshold = stage.deploy.criterion.threshold(baseline)
    graph, val, facts = _QuantizeRun.int8_concat(stage, int8, inc_val, baseline, threshold)
    if case == "met":
        assert facts["applied"] and val == {"auc": 0.899} and graph is not int8
        assert facts["concats"] == 58 and facts["inc_val"] == 0.895
        assert stage.said[-1].startswith("  INT8 concatenation: 58 ConcatV2 in 4 group(s), 61 BatchNorm+ReLU, 1 zero "
                                         "padding(s) moved into INT8") and "criterion met" in stage.said[-1]
        return
    assert graph is int8 and val is inc_val and not facts["applied"]
    expected = {"missed": f"validation auc 0.8000 is below {threshold:.4f}",
                "no kernel": "does not run here (No OpKernel was registered to support Op "
                             "'_FusedQuantizedDepthwiseConv2D')",
                "graph fails": "the rewritten graph failed (ValueError: Input 0 of node x was passed int8 from y:0 "
                               "incompatible with expected float.); a medq bug",
                "rewrite fails": "the rewrite failed (KeyError: 'densenet121/conv2_block1_concat/concat:0'); "
                                 "a medq bug",
                "off": "quantize.int8_concat is false"}[case]
    assert expected in facts["reason"]
    if case != "off":
        assert stage.said[-1].startswith("  INT8 concatenation: not used: ") and expected in stage.said[-1]
        assert stage.said[-1].endswith("INC's graph (0.8950) is written")


def test_a_concatenation_named_by_a_control_dependency_is_left_alone(densenet_graphs):
    from medq.graph import FrozenGraph
    from medq.inc.rewrite import rewrite_int8_concat

    _, int8 = densenet_graphs
    pinned = type(int8)()
    pinned.CopyFrom(int8)
    first = next(n.name for n in pinned.node if n.op == "ConcatV2")
    waiter = pinned.node.add()
    waiter.name, waiter.op = "waits_for_the_first_concat", "NoOp"
    waiter.input.append(f"^{first}")
    graph, report = rewrite_int8_concat(pinned)
    assert report.groups == 3 and "control dependency" in report.skipped[first]
    assert any(n.name == first and n.op == "ConcatV2" for n in graph.node)
    assert list(next(n for n in graph.node if n.name == waiter.name).input) == [f"^{first}"]
    x = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with FrozenGraph(graph) as frozen:
        assert np.isfinite(frozen.run(x)).all()

