"""DenseNet's concatenations as a chain: a graph pass on the converted frozen graph.

torchvision's dense layer concatenates the whole list of earlier features (``torch.cat(prev_features, 1)``), so
onnx2tf writes every layer's ``ConcatV2`` over all of the block's tensors: each convolution's output is read by every
later concatenation of its block. INC fuses a convolution with its requantization only when one op reads it; with
many readers it leaves a per-channel INT8 convolution followed by an FP32 bias and Dequantize, which the INT8
concatenation rewrite (:mod:`medq.inc.int8_concat`) cannot take. Keras' DenseNet (medq's own models) concatenates
the previous concatenation with the new features instead. This pass writes the converted graph that way:
``concat(t0, …, tk)`` becomes ``concat(concat(t0, …, tj), tj+1, …, tk)`` where that inner concatenation already
exists — the same tensor, each convolution's output read once.
"""
from __future__ import annotations

from medq.convert.graphdef import constant


def chain_concatenations(graph_def) -> tuple[object, int]:
    """A copy of ``graph_def`` where each ConcatV2 reads the longest existing ConcatV2 (same axis) of a prefix of
    its inputs instead of that prefix; and how many were rewritten."""
    from tensorflow.core.framework import graph_pb2

    graph = graph_pb2.GraphDef()
    graph.CopyFrom(graph_def)
    nodes = {node.name: node for node in graph.node}
    concats = [node for node in graph.node if node.op == "ConcatV2" and not any(t.startswith("^") for t in node.input)]
    by_inputs: dict[tuple, str] = {}
    original: dict[str, tuple] = {}
    for node in concats:
        count = node.attr["N"].i
        axis = constant(nodes, node.input[count])
        if axis is None or axis.size != 1:
            continue
        inputs = tuple(_tensor(t) for t in node.input[:count])
        original[node.name] = (int(axis), inputs)
        by_inputs.setdefault((int(axis), inputs), node.name)
    rewritten = 0
    for node in concats:
        if node.name not in original:
            continue
        axis, inputs = original[node.name]
        for length in range(len(inputs) - 1, 1, -1):
            prefix = by_inputs.get((axis, inputs[:length]))
            if prefix is not None and prefix != node.name:
                rest = list(node.input[length:])  # the remaining inputs and the axis
                del node.input[:]
                node.input.extend([f"{prefix}:0", *rest])
                node.attr["N"].i = 1 + len(inputs) - length
                rewritten += 1
                break
    return graph, rewritten


def _tensor(name: str) -> str:
    return name if ":" in name else f"{name}:0"
