"""medq.inc.rewrite, pass by pass, on small hand-built INT8 graphs: each rewritten graph is run and compared with
numpy and with the FP32 graph it replaces (TensorFlow's own Dequantize / BatchNorm / QuantizeV2), never with the
rewrite's bookkeeping. INC's DenseNet121 through all three passes: tests/test_int8_census.py (slow)."""
import numpy as np
import pytest

from medq.graph import op_type_counts

pytestmark = pytest.mark.filterwarnings("ignore")


def _build(body):
    """The GraphDef ``body()`` builds in a fresh TF1 graph (a float32 placeholder ``x`` of the shape it asks for)."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        body(tf)
    return graph.as_graph_def()


def _run(graph_def, fetches, x):
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        return session.run(fetches, {"x:0": x})


def _quantize(tf, tensor, low, high, kind, name, **attrs):
    return tf.raw_ops.QuantizeV2(input=tensor, min_range=low, max_range=high, T=kind, mode="SCALED", name=name,
                                 **attrs)


def _dequantize(tf, tensor, low, high, name):
    return tf.raw_ops.Dequantize(input=tensor, min_range=low, max_range=high, mode="SCALED", name=name)


# --- the graph view -------------------------------------------------------------------------------------------------

def test_the_graph_view_index_follows_replace_rewire_and_removal():
    from medq.inc.rewrite.graph import GraphView

    def body(tf):
        x = tf.compat.v1.placeholder(tf.float32, (1, 4), name="x")
        relu = tf.nn.relu(x, name="relu")
        tf.identity(relu, name="reader")
        tf.identity(x, name="other")

    graph_def = _build(body)
    view = GraphView(graph_def)
    reader = view.nodes["reader"]
    assert view.readers_of("relu") == [(reader, 0)]
    new = view.replace(reader, "Sigmoid", ["x"], {"T": reader.attr["T"]})  # same name, reads x now
    assert view.readers_of("relu:0") == []  # the replaced node no longer counts as a reader
    assert {n.name for n, _ in view.readers_of("x:0")} == {"relu", "other", "reader"} and view.nodes["reader"] is new
    assert [n.op for n in graph_def.node if n.name == "reader"] == ["Sigmoid"]
    view.set_input(view.nodes["other"], 0, "relu:0")
    assert [n.name for n, _ in view.readers_of("relu")] == ["other"]
    view.remove(view.nodes["relu"])
    assert [n.name for n, _ in view.readers_of("x")] == ["reader"]  # a removed node reads nothing
    view.drop_unused()
    assert "relu" not in {n.name for n in graph_def.node} and "relu" not in view.nodes


def test_quantize_range_is_widened_as_tensorflow_does():
    """A QuantizeV2 narrower than ensure_minimum_range (default 0.01) quantizes with the widened range."""
    from medq.inc.rewrite.graph import GraphView
    from medq.inc.rewrite.ranges import quantize_range

    def body(tf):
        x = tf.compat.v1.placeholder(tf.float32, (1, 4), name="x")
        _quantize(tf, x, 0.0, 0.001, tf.quint8, "narrow")
        _quantize(tf, x, 0.0, 0.001, tf.quint8, "exact", ensure_minimum_range=0.0)

    graph_def = _build(body)
    nodes = {n.name: n for n in graph_def.node}
    del nodes["narrow"].attr["ensure_minimum_range"]  # as in graphs written without the attribute: the op's default
    view = GraphView(graph_def)
    assert quantize_range(view, nodes["narrow"]) == pytest.approx((0.0, 0.01))
    assert quantize_range(view, nodes["exact"]) == pytest.approx((0.0, 0.001))
    # what TensorFlow itself reports for the default
    assert _run(graph_def, "narrow:2", np.zeros((1, 4), np.float32)) == pytest.approx(0.01)


# --- pad: zero padding on the INT8 bytes ----------------------------------------------------------------------------

def _padded_graph(out_high):
    """x → QuantizeV2 quint8 [0, 6] → Dequantize → Pad(1 pixel) → QuantizeV2 [0, out_high] → Dequantize →
    out."""
    def body(tf):
        x = tf.compat.v1.placeholder(tf.float32, (2, 3, 3, 2), name="x")
        q = _quantize(tf, x, 0.0, 6.0, tf.quint8, "q")
        fp32 = _dequantize(tf, q.output, tf.constant(0.0), tf.constant(6.0), "dq")
        padded = tf.raw_ops.Pad(input=fp32, paddings=[[0, 0], [1, 1], [1, 1], [0, 0]], name="pad")
        q2 = _quantize(tf, padded, tf.constant(0.0), tf.constant(out_high), tf.quint8, "q2")
        _dequantize(tf, q2.output, q2.output_min, q2.output_max, "out")

    return _build(body)


def _quint8(values, high):
    """numpy's QuantizeV2 (SCALED, quint8, from 0; rounds half away from zero) and back."""
    step = high / 255
    return np.clip(np.floor(values / step + 0.5), 0, 255) * step


def test_pad_runs_on_the_int8_bytes_exactly():
    from medq.inc.rewrite import pad
    from medq.inc.rewrite.graph import GraphView

    graph_def = _padded_graph(6.0)
    view = GraphView(graph_def)
    assert pad.run(view) == 1
    view.drop_unused()
    ops = op_type_counts(graph_def)
    assert ops["Bitcast"] == 2 and ops["QuantizeV2"] == 1 and ops["Dequantize"] == 1  # q's and out's only
    assert {n.attr["T"].type for n in graph_def.node if n.op == "Pad"} == {4}  # uint8, not float
    x = np.random.default_rng(0).uniform(-1, 7, (2, 3, 3, 2)).astype(np.float32)
    expected = np.pad(_quint8(x.astype(np.float64), 6.0), [(0, 0), (1, 1), (1, 1), (0, 0)])
    out = _run(graph_def, "out:0", x)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out, _run(_padded_graph(6.0), "out:0", x))  # bit-identical to INC's FP32 Pad


def test_pad_between_two_ranges_is_left_in_fp32():
    """Requantizing to another range is not a copy of the bytes: the pass must leave it (else the output is off)."""
    from medq.inc.rewrite import pad
    from medq.inc.rewrite.graph import GraphView

    graph_def = _padded_graph(3.0)
    view = GraphView(graph_def)
    assert pad.run(view) == 0
    view.drop_unused()
    assert graph_def == _padded_graph(3.0)
    x = np.random.default_rng(1).uniform(-1, 7, (2, 3, 3, 2)).astype(np.float32)
    expected = _quint8(np.pad(_quint8(x.astype(np.float64), 6.0), [(0, 0), (1, 1), (1, 1), (0, 0)]), 3.0)
    np.testing.assert_allclose(_run(graph_def, "out:0", x), expected, rtol=1e-6, atol=1e-6)


# --- fold: BatchNorm + ReLU + QuantizeV2 on an INT8 tensor → fused INT8 depthwise -------------------------------

GAMMA = np.array([1.5, -0.7, 0.0, 0.9], np.float32)  # a negative and a zero scale among them
BETA = np.array([0.2, 0.5, 0.3, -0.1], np.float32)
MEAN = np.array([0.1, -0.2, 0.0, 0.3], np.float32)
VAR = np.array([0.5, 2.0, 1.0, 0.25], np.float32)


def _batchnorm_graph(out_high):
    """x → QuantizeV2 qint8 [-2, 2] → Dequantize → BatchNorm → Relu → QuantizeV2 quint8 [0, out_high] →
    Dequantize → out; plus the constants ±4, a wider declared range for the same INT8 tensor."""
    def body(tf):
        x = tf.compat.v1.placeholder(tf.float32, (2, 3, 3, 4), name="x")
        q = _quantize(tf, x, -2.0, 2.0, tf.qint8, "q")
        fp32 = _dequantize(tf, q.output, tf.constant(-2.0), tf.constant(2.0), "dq")
        bn = tf.raw_ops.FusedBatchNormV3(x=fp32, scale=GAMMA, offset=BETA, mean=MEAN, variance=VAR, epsilon=1e-3,
                                         is_training=False, name="bn")
        relu = tf.nn.relu(bn.y, name="relu")
        q2 = _quantize(tf, relu, tf.constant(0.0), tf.constant(out_high), tf.quint8, "q2")
        _dequantize(tf, q2.output, q2.output_min, q2.output_max, "out")
        tf.constant(-4.0, name="declared_min")
        tf.constant(4.0, name="declared_max")

    return _build(body)


@pytest.mark.parametrize("out_high", [3.0, 0.004])  # 0.004: TensorFlow widens it to 0.01, so must the fold
def test_fold_equals_batchnorm_relu_quantize(out_high):
    """The fold reads the INT8 tensor declared at ±4 whose true scale is half that (factor 0.5): its quint8 output
    is what TensorFlow's FP32 BatchNorm → Relu → QuantizeV2 gives, and numpy's, within one step."""
    from medq.inc.rewrite import fold
    from medq.inc.rewrite.graph import GraphView

    graph_def = _batchnorm_graph(out_high)
    view = GraphView(graph_def)
    found = fold.match(view, view.nodes["bn"], 0, "dq:0")
    assert found is not None and found.quantize.name == "q2"
    fold.apply(view, fold.plan(view, found, "q:0", np.full(4, 0.5), "declared_min", "declared_max"))
    view.drop_unused()
    ops = op_type_counts(graph_def)
    assert ops["_FusedQuantizedDepthwiseConv2D"] == 1 and "FusedBatchNormV3" not in ops and "Relu" not in ops
    assert {n.op for n in graph_def.node if n.name == "q2"} == {"_FusedQuantizedDepthwiseConv2D"}
    x = np.random.default_rng(2).uniform(-2.5, 2.5, (2, 3, 3, 4)).astype(np.float32)
    ours, ours_max, int8 = _run(graph_def, ["q2:0", "q2:2", "q:0"], x)
    inc, inc_max = _run(_batchnorm_graph(out_high), ["q2:0", "q2:2"], x)
    assert ours_max == pytest.approx(inc_max) == pytest.approx(max(out_high, 0.01))
    assert np.abs(ours.astype(int) - inc.astype(int)).max() <= 1
    real = int8.astype(np.float64) * 2 / 127
    y = (real - MEAN) * GAMMA / np.sqrt(VAR.astype(np.float64) + 1e-3) + BETA
    expected = np.clip(np.round(np.maximum(y, 0) * 255 / max(out_high, 0.01)), 0, 255)
    assert np.abs(ours.astype(np.float64) - expected).max() <= 1


def test_fold_refuses_a_batchnorm_that_is_not_batchnorm_relu_quantize():
    from medq.inc.rewrite import fold
    from medq.inc.rewrite.graph import GraphView

    graph_def = _batchnorm_graph(3.0)
    extra = graph_def.node.add()  # a second reader of the ReLU: folding would take its input away
    extra.name, extra.op = "also_reads_relu", "Identity"
    extra.input.append("relu")
    extra.attr["T"].type = 1
    view = GraphView(graph_def)
    assert fold.match(view, view.nodes["bn"], 0, "dq:0") is None


# --- concat: a concatenation group in INT8 --------------------------------------------------------------------------

def _dense_block(int8_inputs=True):
    """A two-layer dense block: c1 = [stem (quint8 [0, 2]), a (qint8 ±1)], c2 = [c1, b (qint8 ±4)]; each read by a
    BatchNorm → Relu → QuantizeV2 → Dequantize (out1, out2), c2 also by an Identity (raw)."""
    def body(tf):
        x = tf.compat.v1.placeholder(tf.float32, (2, 3, 3, 2), name="x")
        if int8_inputs:
            stem = _quantize(tf, tf.nn.relu(x), 0.0, 2.0, tf.quint8, "stem_q")
            stem = _dequantize(tf, stem.output, tf.constant(0.0), tf.constant(2.0), "stem")
            a = _dequantize(tf, _quantize(tf, x, -1.0, 1.0, tf.qint8, "a_q").output, tf.constant(-1.0),
                            tf.constant(1.0), "a")
            b = _dequantize(tf, _quantize(tf, 3 * x, -4.0, 4.0, tf.qint8, "b_q").output, tf.constant(-4.0),
                            tf.constant(4.0), "b")
        else:
            stem, a, b = tf.nn.relu(x, name="stem"), tf.identity(x, name="a"), tf.multiply(x, 3.0, name="b")
        c1 = tf.raw_ops.ConcatV2(values=[stem, a], axis=3, name="c1")
        c2 = tf.raw_ops.ConcatV2(values=[c1, b], axis=-1, name="c2")
        rng = np.random.default_rng(7)
        for i, c in enumerate((c1, c2), 1):
            n = 2 * (i + 1)
            gamma, beta, mean, var = (rng.uniform(*bounds, n).astype(np.float32)
                                      for bounds in ((0.3, 1.0), (-0.2, 0.2), (-0.3, 0.3), (0.5, 2.0)))
            bn = tf.raw_ops.FusedBatchNormV3(x=c, scale=gamma, offset=beta, mean=mean, variance=var, epsilon=1e-3,
                                             is_training=False, name=f"bn{i}")
            q = _quantize(tf, tf.nn.relu(bn.y), tf.constant(0.0), tf.constant(4.0), tf.quint8, f"q{i}")
            _dequantize(tf, q.output, q.output_min, q.output_max, f"out{i}")
        tf.identity(c2, name="raw")

    return _build(body)


def test_concat_group_in_int8_copies_bytes_and_keeps_every_channel_scale():
    from medq.inc.rewrite import rewrite_int8_concat

    inc = _dense_block()
    graph_def, report = rewrite_int8_concat(inc)
    assert inc == _dense_block()  # the input graph is left as it was
    assert (report.groups, report.concats, report.folded_batchnorms) == (1, 2, 2)
    assert (report.inputs, report.requantized_inputs, report.dequantized_readers) == (3, 1, 1)
    assert report.ranges == {"c1": 4.0} and report.scale_spread == {"c1": 4.0} and report.skipped == {}
    ops = op_type_counts(graph_def)
    assert ops["QuantizedConcatV2"] == 2 and "ConcatV2" not in ops and "FusedBatchNormV3" not in ops
    assert ops["_FusedQuantizedDepthwiseConv2D"] == 2

    x = np.random.default_rng(3).uniform(-1.2, 1.2, (2, 3, 3, 2)).astype(np.float32)
    nodes = {n.name: n for n in graph_def.node}
    int8_inputs = [f"{t}:0" for t in (*nodes["c1"].input[:2], nodes["c2"].input[1])]  # stem requantized, a, b
    values = _run(graph_def, ["c2:0", *int8_inputs, "raw:0", "out1:0", "out2:0"], x)
    c2, stem8, a8, b8, raw, out1, out2 = values
    np.testing.assert_array_equal(c2, np.concatenate([stem8, a8, b8], axis=3))  # a plain INT8 copy
    # the other reader sees the FP32 concatenation: the qint8 inputs exactly, the quint8 stem within a qint8 step
    fp32 = _run(inc, ["raw:0", "out1:0", "out2:0"], x)
    np.testing.assert_allclose(raw[..., 2:], fp32[0][..., 2:], rtol=1e-6, atol=1e-6)
    assert np.abs(raw[..., :2] - fp32[0][..., :2]).max() <= 2 / 127
    # numpy: what was quantized, clipped to each input's range, within one step of the qint8 code it is read as
    expected = np.concatenate([np.clip(x, 0, 2), np.clip(x, -1, 1), np.clip(3 * x, -4, 4)], axis=3)
    steps = np.array([2 / 127] * 2 + [1 / 127] * 2 + [4 / 127] * 2)
    assert (np.abs(raw - expected) <= steps).all()
    for ours, theirs in zip((out1, out2), fp32[1:]):  # the folds: within two output steps (input requantized)
        assert np.abs(ours - theirs).max() <= 2 * 4 / 255 + 1e-6


def test_concat_of_fp32_tensors_is_left_alone_with_the_reason():
    from medq.inc.rewrite import rewrite_int8_concat

    fp32 = _dense_block(int8_inputs=False)
    graph_def, report = rewrite_int8_concat(fp32)
    assert graph_def == fp32 and report.groups == 0
    assert list(report.skipped) == ["c1"] and "not by a SCALED Dequantize" in report.skipped["c1"]


def test_concat_that_no_batchnorm_reads_stays_fp32():
    from medq.inc.rewrite import rewrite_int8_concat

    inc = _dense_block()
    for node in inc.node:  # training-mode BatchNorms: no fold, so nothing to gain from an INT8 concatenation
        if node.op == "FusedBatchNormV3":
            node.attr["is_training"].b = True
    graph_def, report = rewrite_int8_concat(inc)
    assert graph_def == inc and report.groups == 0 and "nothing to gain" in report.skipped["c1"]
