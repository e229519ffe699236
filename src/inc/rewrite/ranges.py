"""The float range an INT8 tensor of INC's graph stands for, read from its frozen constants."""
from __future__ import annotations

from .graph import GraphView, port

_RANGE_PRESERVING = ("QuantizedAvgPool", "QuantizedMaxPool")  # INT8 in, INT8 out, the input's range passed on
_REQUANTIZING = ("QuantizedConv2DWithBiasAndRequantize", "QuantizedConv2DWithBiasAndReluAndRequantize",
                 "QuantizedConv2DWithBiasSumAndReluAndRequantize", "QuantizedDepthwiseConv2DWithBiasAndRequantize",
                 "QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize")
_FROZEN_OUTPUT_RANGE = (7, 8)  # min_freezed_output, max_freezed_output of the *AndRequantize convolutions


def quantize_range(graph: GraphView, quantize) -> tuple[float, float] | None:
    """The range a QuantizeV2 of constant bounds really quantizes with: TensorFlow widens one narrower than
    ensure_minimum_range (relative to its magnitude; the op's default 0.01 when the attribute is absent)."""
    low, high = graph.scalar(quantize.input[1]), graph.scalar(quantize.input[2])
    if low is None or high is None:
        return None
    ensure = quantize.attr["ensure_minimum_range"].f if "ensure_minimum_range" in quantize.attr else 0.01
    low = min(0.0, low)
    return low, max(0.0, high, low + ensure * max(1.0, abs(low), abs(high)))


def range_value(graph: GraphView, tensor: str) -> float | None:
    """A min/max tensor of an INT8 tensor, followed back to its frozen constant."""
    value = graph.scalar(tensor)
    if value is not None:
        return value
    node, index = graph.producer(tensor), port(tensor)
    if index in (1, 2) and node.op in _RANGE_PRESERVING:
        return range_value(graph, node.input[index])
    if index in (1, 2) and node.op in _REQUANTIZING:
        return range_value(graph, node.input[_FROZEN_OUTPUT_RANGE[index - 1]])
    if index in (1, 2) and node.op == "QuantizeV2":
        bounds = quantize_range(graph, node)
        return None if bounds is None else bounds[index - 1]
    return None


def abs_max(graph: GraphView, min_tensor: str, max_tensor: str) -> float | None:
    """The symmetric range (largest magnitude) of an INT8 tensor given its min and max tensors."""
    low, high = range_value(graph, min_tensor), range_value(graph, max_tensor)
    if low is None or high is None:
        return None
    return max(abs(low), abs(high))
