"""Max pooling padding that INT8 can calibrate: a graph pass on the converted frozen graph.

PyTorch pads max pooling symmetrically (ResNet's and DenseNet's stem: 3×3, stride 2, padding 1), which TensorFlow's
SAME padding cannot express, so onnx2tf emits ``PadV2(x, paddings, -FLT_MAX) → MaxPool(VALID)``. INC calibrates the
pool's input range on that tensor: its minimum is -3.4e38, oneDNN's QuantizeV2 (SCALED) scales by the larger
magnitude, every activation becomes 0 and the network's output is a constant (AUC 0.5000). INC's tuning then spends
trials moving the pool (and, on the way, the first convolution) back to FP32.

The pass rewrites each such padding into an exact equivalent whose values lie within the data's own range:

- input provably non-negative (a ReLU before the pool, as in ResNet and DenseNet) → ``Pad`` with zeros: every window
  holds at least one real element (padding < kernel), which is ≥ 0, so a zero never wins the maximum;
- otherwise ``MirrorPad`` SYMMETRIC: every padded element repeats a real element of each window it lies in when
  2 × padding ≤ kernel (PyTorch's own limit for max pooling), so the maximum is unchanged.

A padding that fits neither rule is left alone and reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medq.convert.graphdef import constant, node_name, readers, source, static_shapes

# A constant at least this negative is onnx2tf's "minus infinity" (it writes -FLT_MAX).
NEGATIVE_INFINITY = -1e30
# Ops whose output is >= 0 whatever their input, and ops that keep a non-negative input non-negative.
_NON_NEGATIVE = frozenset({"Relu", "Relu6", "Sigmoid", "Softmax", "Softplus", "Abs", "Exp", "Square", "Sqrt"})
_KEEPS_SIGN = frozenset({"Identity", "MaxPool", "AvgPool", "Reshape", "Transpose", "Squeeze", "ExpandDims",
                         "ConcatV2", "Mean", "Max", "Minimum", "Add", "AddV2", "Mul", "Pad"})
_DATA_FIRST = frozenset({"Reshape", "Transpose", "ExpandDims", "Squeeze", "Mean", "Max", "Pad"})  # then shapes, axes


@dataclass
class PoolPaddingReport:
    zero: list[str] = field(default_factory=list)  # PadV2 nodes rewritten to Pad (zeros)
    mirror: list[str] = field(default_factory=list)  # PadV2 nodes rewritten to MirrorPad SYMMETRIC
    left: dict[str, str] = field(default_factory=dict)  # PadV2 node → why it was left alone

    def to_dict(self) -> dict:
        return {"zero_padding": len(self.zero), "mirror_padding": len(self.mirror), "left": dict(self.left)}


def rewrite_pool_padding(graph_def) -> tuple[object, PoolPaddingReport]:
    """A copy of ``graph_def`` with every ``PadV2(-inf) → MaxPool(VALID)`` rewritten as above, and what was done."""
    from tensorflow.core.framework import graph_pb2

    graph = graph_pb2.GraphDef()
    graph.CopyFrom(graph_def)
    nodes = {node.name: node for node in graph.node}
    consumers = readers(graph)
    shapes: dict[str, list] = {}  # filled on first need (importing the graph takes a second on DenseNet)
    report = PoolPaddingReport()
    for pad in [node for node in graph.node if node.op == "PadV2"]:
        pools = consumers.get(pad.name, [])
        if not pools or any(p.op != "MaxPool" for p in pools):
            continue  # not a pooling padding
        value = constant(nodes, pad.input[2])
        paddings = constant(nodes, pad.input[1])
        if value is None or paddings is None or value.size != 1 or float(value) > 0:
            continue  # a padding value that can win the maximum is the model's own choice
        why = _unsupported(pools, paddings)
        if why:
            report.left[pad.name] = why
            continue
        kernels = [list(p.attr["ksize"].list.i) for p in pools]
        if _non_negative(nodes, pad.input[0]):
            _make_pad(pad)
            report.zero.append(pad.name)
        elif float(value) > NEGATIVE_INFINITY:
            report.left[pad.name] = f"padding value {float(value):g} with an input that may be negative"
        elif all(2 * paddings[d].max() <= k[d] for k in kernels for d in range(len(k))) and \
                _fits(_shape(shapes, graph_def, pad.input[0]), paddings):
            _make_mirror_pad(pad)
            report.mirror.append(pad.name)
        else:
            report.left[pad.name] = "padding wider than half the kernel (or than the input): no exact equivalent"
    return graph, report


def _unsupported(pools: list, paddings: np.ndarray) -> str | None:
    for pool in pools:
        if pool.attr["padding"].s != b"VALID":
            return f"{pool.name} pads itself ({pool.attr['padding'].s.decode()})"
        kernel = list(pool.attr["ksize"].list.i)
        if paddings.shape != (len(kernel), 2) or any(paddings[d].max() >= kernel[d] for d in range(len(kernel))):
            return f"a window of {pool.name} could hold padding only"
    return None


def _non_negative(nodes: dict, tensor: str, depth: int = 0) -> bool:
    """Whether ``tensor`` is >= 0 for every input, by the ops that make it (a short, conservative look back)."""
    node = source(nodes, tensor)
    if node is None or depth > 8:
        return False
    if node.op in _NON_NEGATIVE:
        return True
    if node.op == "Const":
        value = constant(nodes, node.name)
        return value is not None and value.dtype.kind == "f" and bool((value >= 0).all())
    data = [i for i in node.input if not i.startswith("^")]
    if node.op == "Maximum":
        return any(_non_negative(nodes, i, depth + 1) for i in data)
    if node.op not in _KEEPS_SIGN:
        return False
    if node.op in _DATA_FIRST:
        data = data[:1]
    elif node.op == "ConcatV2":
        data = data[:-1]  # the last is the axis
    return all(_non_negative(nodes, i, depth + 1) for i in data)


def _fits(shape: list | None, paddings: np.ndarray) -> bool:
    """MirrorPad SYMMETRIC takes at most the dimension's size on each side; unknown dimensions are refused."""
    if shape is None or len(shape) != len(paddings):
        return False
    return all(p.max() == 0 or (size is not None and p.max() <= size) for size, p in zip(shape, paddings))


def _shape(shapes: dict[str, list], graph_def, tensor: str) -> list | None:
    if not shapes:
        shapes.update(static_shapes(graph_def))
    return shapes.get(node_name(tensor))


def _make_pad(pad) -> None:
    """PadV2(x, paddings, value) → Pad(x, paddings): zeros."""
    del pad.input[2]
    pad.op = "Pad"
    for attr in list(pad.attr):
        if attr not in ("T", "Tpaddings"):
            del pad.attr[attr]


def _make_mirror_pad(pad) -> None:
    from tensorflow.core.framework import attr_value_pb2

    del pad.input[2]
    pad.op = "MirrorPad"
    pad.attr["mode"].CopyFrom(attr_value_pb2.AttrValue(s=b"SYMMETRIC"))
