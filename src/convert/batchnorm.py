"""BatchNorm as a BatchNorm: a graph pass on the converted frozen graph.

``torch.onnx`` folds each BatchNorm that follows a convolution into it; the others (DenseNet's pre-activation
BatchNorms after each concatenation and after the stem's pool, its final norm5) reach onnx2tf as
BatchNormalization, which it writes as a per-channel ``Mul`` by γ/√(var+ε) and an ``AddV2`` of β − mean·γ/√(var+ε).
medq's own Keras DenseNets carry ``FusedBatchNormV3`` there, and that is what the INT8 concatenation rewrite
(:mod:`medq.inc.int8_concat`) folds into an INT8 depthwise convolution after INC. This pass writes each such pair
back as ``FusedBatchNormV3(x, scale, offset, mean=0, variance=1, epsilon=0)``: y = scale·x + offset, the same
numbers (the converter's parity check runs the rewritten graph).
"""
from __future__ import annotations

import numpy as np

from medq.convert.graphdef import constant, node_name, readers, static_shapes


def restore_batchnorms(graph_def) -> tuple[object, int]:
    """A copy of ``graph_def`` with every NHWC per-channel ``Mul(x, s) → AddV2(·, b)`` (constant s, b of the
    channel count, the Mul read only by the AddV2) as one inference ``FusedBatchNormV3``; and how many."""
    from tensorflow.core.framework import graph_pb2

    graph = graph_pb2.GraphDef()
    graph.CopyFrom(graph_def)
    nodes = {node.name: node for node in graph.node}
    reading = readers(graph)
    shapes = None
    count = 0
    for mul in [node for node in graph.node if node.op == "Mul"]:
        adds = reading.get(mul.name, [])
        if len(adds) != 1 or adds[0].op not in ("Add", "AddV2") or _dtype(mul) != "float32":
            continue
        add = adds[0]
        data, scale = _split(nodes, mul.input)
        _, offset = _split(nodes, [t for t in add.input if node_name(t) != mul.name] + [f"{mul.name}:0"])
        if data is None or scale is None or offset is None or scale.ndim != 1 or offset.shape != scale.shape:
            continue
        shapes = shapes if shapes is not None else static_shapes(graph_def)
        shape = shapes.get(node_name(data))
        if shape is None or len(shape) != 4 or shape[3] != scale.size:
            continue
        _make_batchnorm(graph, add, data, scale.astype(np.float32), offset.astype(np.float32))
        graph.node.remove(mul)
        count += 1
    return graph, count




def _dtype(node) -> str:
    from tensorflow.python.framework import dtypes

    return dtypes.as_dtype(node.attr["T"].type).name if "T" in node.attr else ""




def _split(nodes: dict, inputs) -> tuple[str | None, np.ndarray | None]:
    """(the non-constant input, the constant one) of a binary op; (None, None) unless exactly one is constant."""
    inputs = [t for t in inputs if not t.startswith("^")]
    if len(inputs) != 2:
        return None, None
    values = [constant(nodes, t) for t in inputs]
    if (values[0] is None) == (values[1] is None):
        return None, None
    return (inputs[1], values[0]) if values[1] is None else (inputs[0], values[1])




def _make_batchnorm(graph, add, data: str, scale: np.ndarray, offset: np.ndarray) -> None:
    """``add`` becomes the FusedBatchNormV3 (its name is what the rest of the graph reads)."""
    from tensorflow.core.framework import attr_value_pb2, types_pb2
    from tensorflow.python.framework import tensor_util

    constants = []
    for suffix, value in (("scale", scale), ("offset", offset), ("mean", np.zeros_like(scale)),
                          ("variance", np.ones_like(scale))):
        const = graph.node.add()
        const.name, const.op = f"{add.name}/bn_{suffix}", "Const"
        const.attr["dtype"].type = types_pb2.DT_FLOAT
        const.attr["value"].tensor.CopyFrom(tensor_util.make_tensor_proto(value))
        constants.append(const.name)
    add.op = "FusedBatchNormV3"
    del add.input[:]
    add.input.extend([data, *constants])
    add.attr.clear()
    add.attr["T"].type = types_pb2.DT_FLOAT
    add.attr["U"].type = types_pb2.DT_FLOAT
    add.attr["epsilon"].CopyFrom(attr_value_pb2.AttrValue(f=0.0))
    add.attr["data_format"].CopyFrom(attr_value_pb2.AttrValue(s=b"NHWC"))
    add.attr["is_training"].CopyFrom(attr_value_pb2.AttrValue(b=False))
    add.attr["exponential_avg_factor"].CopyFrom(attr_value_pb2.AttrValue(f=1.0))
