"""The converter's graph passes on onnx2tf's output. medq.convert.pool_padding: PadV2(-FLT_MAX) → MaxPool(VALID)
becomes a padding INT8 can calibrate, the pooling's results unchanged (oracle: max pooling in numpy, padding as minus
infinity like PyTorch); medq.convert.batchnorm: Mul+AddV2 BatchNorms become FusedBatchNormV3 (oracle: numpy)."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from medq.convert.pool_padding import rewrite_pool_padding  # noqa: E402

FLT_MAX = float(np.finfo(np.float32).max)


def numpy_max_pool(x, kernel, stride, pad):
    """PyTorch's max_pool2d on NHWC: symmetric padding that never wins the maximum."""
    n, h, w, c = x.shape
    padded = np.full((n, h + 2 * pad, w + 2 * pad, c), -np.inf, np.float32)
    padded[:, pad:pad + h, pad:pad + w] = x
    out_h, out_w = (h + 2 * pad - kernel) // stride + 1, (w + 2 * pad - kernel) // stride + 1
    out = np.empty((n, out_h, out_w, c), np.float32)
    for i in range(out_h):
        for j in range(out_w):
            out[:, i, j] = padded[:, i * stride:i * stride + kernel, j * stride:j * stride + kernel].max(axis=(1, 2))
    return out


def onnx2tf_pool(size, kernel=3, stride=2, pad=1, value=-FLT_MAX, relu=True, channels=4):
    """The graph onnx2tf writes for PyTorch's MaxPool2d(kernel, stride, padding=pad), behind a ReLU or not."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, size, size, channels], name="input")
        h = tf.nn.relu(x) if relu else tf.identity(x)
        padded = tf.raw_ops.PadV2(input=h, paddings=tf.constant([[0, 0], [pad, pad], [pad, pad], [0, 0]]),
                                  constant_values=tf.constant(value, tf.float32))
        tf.identity(tf.nn.max_pool2d(padded, kernel, stride, "VALID"), name="output")
    return graph.as_graph_def()


def run(graph_def, x):
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        return session.run("output:0", {"input:0": x})


def op_types(graph_def):
    return sorted(node.op for node in graph_def.node if "Pad" in node.op)


@pytest.mark.parametrize("size", [16, 17])  # even and odd: TensorFlow's SAME padding matches PyTorch only on one
def test_padding_after_a_relu_becomes_zeros_and_pools_the_same(size):
    x = np.random.default_rng(size).normal(0, 2, (3, size, size, 4)).astype(np.float32)
    graph, report = rewrite_pool_padding(onnx2tf_pool(size))
    assert op_types(graph) == ["Pad"] and len(report.zero) == 1 and not report.mirror
    np.testing.assert_array_equal(run(graph, x), numpy_max_pool(np.maximum(x, 0), 3, 2, 1))


def test_padding_of_a_signed_input_is_mirrored_and_pools_the_same():
    x = np.random.default_rng(1).normal(-5, 2, (2, 15, 15, 4)).astype(np.float32)  # mostly negative: zeros would win
    graph, report = rewrite_pool_padding(onnx2tf_pool(15, relu=False))
    assert op_types(graph) == ["MirrorPad"] and len(report.mirror) == 1 and not report.zero
    np.testing.assert_array_equal(run(graph, x), numpy_max_pool(x, 3, 2, 1))


def test_rewritten_padding_stays_in_the_data_range():
    """What INT8 calibration sees at the pool's input: the data's range, not -3.4e38."""
    x = np.random.default_rng(2).normal(0, 1, (2, 16, 16, 4)).astype(np.float32)
    graph, _ = rewrite_pool_padding(onnx2tf_pool(16))
    pad = next(node.name for node in graph.node if node.op == "Pad")
    imported = tf.Graph()
    with imported.as_default():
        tf.compat.v1.import_graph_def(graph, name="")
    with tf.compat.v1.Session(graph=imported) as session:
        padded = session.run(f"{pad}:0", {"input:0": x})
    assert padded.min() == 0.0 and padded.max() == np.maximum(x, 0).max()


def test_paddings_without_an_exact_equivalent_are_left_and_reported():
    # 2 x padding > kernel on a signed input: a mirrored element could come from outside the window
    graph, report = rewrite_pool_padding(onnx2tf_pool(12, kernel=3, stride=1, pad=2, relu=False))
    assert op_types(graph) == ["PadV2"] and "half the kernel" in next(iter(report.left.values()))
    # a finite negative padding value on a signed input is the model's choice: it can win the maximum
    graph, report = rewrite_pool_padding(onnx2tf_pool(12, value=-1.0, relu=False))
    assert op_types(graph) == ["PadV2"] and "may be negative" in next(iter(report.left.values()))
    # a positive padding value wins over data: not a pooling padding at all, untouched and not reported
    graph, report = rewrite_pool_padding(onnx2tf_pool(12, value=1.0))
    assert op_types(graph) == ["PadV2"] and report.to_dict() == {"zero_padding": 0, "mirror_padding": 0, "left": {}}


# --- BatchNorm written back (medq.convert.batchnorm) -----------------------------------------------------------------

def onnx2tf_batchnorms():
    """onnx2tf's inference BatchNormalization: per-channel Mul then AddV2 of constants, after a concatenation (NHWC),
    and the same pair on a [N, C] tensor (not a BatchNorm TensorFlow can fuse) and a Mul read twice (left alone)."""
    rng = np.random.default_rng(5)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 6, 6, 3], name="input")
        grown = tf.concat([x, tf.nn.relu(x)], axis=3)
        scale, offset = rng.normal(1, 0.3, 6).astype(np.float32), rng.normal(0, 0.3, 6).astype(np.float32)
        normed = tf.nn.relu(tf.math.add(tf.math.multiply(grown, tf.constant(scale)), tf.constant(offset)))
        pooled = tf.reduce_mean(normed, axis=[1, 2])
        flat = tf.math.add(tf.math.multiply(pooled, tf.constant(scale)), tf.constant(offset))
        twice = tf.math.multiply(flat, tf.constant(scale))
        tf.identity(tf.math.add(twice, tf.constant(offset)) + twice, name="output")
    return graph.as_graph_def(), scale, offset


def test_onnx2tf_batchnorm_becomes_fused_batchnorm_with_the_same_numbers():
    from medq.convert.batchnorm import restore_batchnorms

    graph_def, scale, offset = onnx2tf_batchnorms()
    graph, count = restore_batchnorms(graph_def)
    ops = [node.op for node in graph.node]
    assert count == 1 and ops.count("FusedBatchNormV3") == 1 and ops.count("Mul") == 2
    x = np.random.default_rng(6).normal(0, 2, (3, 6, 6, 3)).astype(np.float32)
    normed = np.maximum(np.concatenate([x, np.maximum(x, 0)], axis=3) * scale + offset, 0)
    flat = normed.mean(axis=(1, 2)) * scale + offset
    expected = (flat * scale + offset) + flat * scale
    np.testing.assert_allclose(run(graph, x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(graph, x), run(graph_def, x), rtol=0, atol=1e-6)


# --- DenseNet's concatenations as a chain (medq.convert.dense_concat) ----------------------------------------------

def test_flat_dense_block_concatenations_become_a_chain_with_the_same_tensor():
    """torchvision's dense block: layer k concatenates all k earlier tensors; after the pass each concatenation reads
    the previous one and the new tensor, so every layer's output has one reader (what INC fuses)."""
    from medq.convert.dense_concat import chain_concatenations

    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4, 4, 2], name="input")
        features = [x]
        for k in range(4):
            grown = tf.concat(features, axis=3, name=f"cat{k}") if len(features) > 1 else features[0]
            features.append(tf.nn.relu(grown * float(k + 1), name=f"layer{k}"))
        other_axis = tf.concat([x, x], axis=1, name="rows")  # another axis: never a prefix of the channel concats
        tf.identity(tf.concat(features, axis=3, name="last") + 0 * tf.reduce_sum(other_axis), name="output")
    graph_def = graph.as_graph_def()
    chained, count = chain_concatenations(graph_def)
    concats = {n.name: [i.split(":")[0] for i in n.input[:n.attr["N"].i]] for n in chained.node if n.op == "ConcatV2"}
    assert count == 3
    assert concats["cat2"] == ["cat1", "layer1"] and concats["cat3"] == ["cat2", "layer2"]
    assert concats["last"] == ["cat3", "layer3"] and concats["rows"] == ["input", "input"]
    readers = [i.split(":")[0] for n in chained.node for i in n.input]
    assert all(readers.count(f"layer{k}") == 1 for k in range(4))  # read once: by the next concatenation
    x = np.random.default_rng(7).normal(0, 1, (2, 4, 4, 2)).astype(np.float32)
    np.testing.assert_array_equal(run(chained, x), run(graph_def, x))
