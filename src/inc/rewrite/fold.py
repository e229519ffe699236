"""BatchNorm + ReLU + QuantizeV2 on an INT8 tensor → one fused INT8 1x1 depthwise convolution.

Before (INC's pre-activation of a dense layer, reading a tensor that exists in INT8)::

    t(FP32) → FusedBatchNormV3(γ, β, mean, var) → Relu → QuantizeV2(quint8, [0, hi]) → name:0/1/2

After (``t8`` the same values in qint8, channel c at scale factor[c]·S, S = R/127 the declared scale of [-R, R])::

    t8(qint8)[-R, R] → _FusedQuantizedDepthwiseConv2D(weight ±127 in ±|γ'|·factor, bias β' = β − mean·γ',
                                                      ReLU, requantized to [0, hi]) → name:0/1/2

per channel γ' = γ/√(var+ε). The fused node takes the QuantizeV2's name, so its reader (INC's INT8 1x1 convolution)
reads the same quantized tensor as before; the only rounding is the requantization QuantizeV2 did.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .graph import GraphView, attr, dtype, type_attr, types_attr
from .ranges import quantize_range


@dataclass
class FoldMatch:
    batchnorm: Any
    relu: Any
    quantize: Any
    source: str  # the FP32 tensor the BatchNorm reads


@dataclass
class FoldPlan:
    match: FoldMatch
    source: str  # the INT8 tensor the fused node reads instead
    low: str  # its declared range [-R, R]
    high: str
    weights: np.ndarray  # int8 (1, 1, C, 1)
    bias: np.ndarray  # float32 (C,)
    magnitude: np.ndarray  # float32 (C,): each channel's filter range
    max_output: float | None  # the widened output range when it differs from the QuantizeV2's constant


def match(graph: GraphView, reader, index: int, tensor: str) -> FoldMatch | None:
    """``reader`` (reading ``tensor`` at ``index``) as a BatchNorm (inference, NHWC) → ReLU → QuantizeV2 (quint8,
    SCALED, constant range from 0), each read only by the next."""
    if (reader.op != "FusedBatchNormV3" or index != 0 or "is_training" not in reader.attr
            or reader.attr["is_training"].b or reader.attr["data_format"].s not in (b"NHWC", b"")):
        return None  # (is_training defaults to true)
    if any(graph.const(t) is None for t in reader.input[1:5]):
        return None
    if any(graph.readers_of(f"{reader.name}:{p}") for p in range(1, 6)):
        return None
    relu = graph.only_reader(f"{reader.name}:0", "Relu")
    quantize = relu is not None and graph.only_reader(f"{relu.name}:0", "QuantizeV2")
    if not quantize or quantize.attr["T"].type != dtype("quint8") or quantize.attr["mode"].s != b"SCALED":
        return None
    bounds = quantize_range(graph, quantize)
    if bounds is None or bounds[0] != 0.0:  # after a ReLU; the fused kernel's quint8 output starts at 0
        return None
    if {reader.name, relu.name, quantize.name} & graph.pinned:
        return None
    return FoldMatch(reader, relu, quantize, tensor)


def plan(graph: GraphView, found: FoldMatch, source: str, factor: np.ndarray, low: str, high: str) -> FoldPlan:
    """The fold reading ``source``, qint8 declared at [low, high] whose channel c's true scale is factor[c] times the
    declared one (factor.size must equal the BatchNorm's channel count)."""
    bn = found.batchnorm
    gamma, beta, mean, variance = (graph.const(t).astype(np.float64) for t in bn.input[1:5])
    epsilon = bn.attr["epsilon"].f if "epsilon" in bn.attr else 1e-4  # the op's default
    scale = gamma / np.sqrt(variance + epsilon)
    shift = beta - mean * scale
    channels = scale.size
    magnitude = np.abs(scale) * factor
    tiny = magnitude < 1e-12  # a channel the BatchNorm zeroes: weight 0, the bias alone
    weights = np.where(tiny, 0, np.sign(scale) * 127).astype(np.int8).reshape(1, 1, channels, 1)
    magnitude = np.where(tiny, 1e-12, magnitude).astype(np.float32)
    out_high, widened = graph.scalar(found.quantize.input[2]), quantize_range(graph, found.quantize)[1]  # as it ran
    return FoldPlan(found, source, low, high, weights, shift.astype(np.float32), magnitude,
                    None if widened == out_high else widened)


def apply(graph: GraphView, fold: FoldPlan) -> None:
    bn, quantize = fold.match.batchnorm, fold.match.quantize
    prefix, out_max = f"{bn.name}/int8_fold", quantize.input[2]
    graph.remove(bn)
    graph.remove(fold.match.relu)
    if fold.max_output is not None:
        out_max = graph.add_const(f"{prefix}/max_output", np.float32(fold.max_output), "float32").name
    inputs = [fold.source, graph.add_const(f"{prefix}/weights", fold.weights, "qint8").name,
              graph.add_const(f"{prefix}/bias", fold.bias, "float32").name, fold.low, fold.high,
              graph.add_const(f"{prefix}/min_filter", -fold.magnitude, "float32").name,
              graph.add_const(f"{prefix}/max_filter", fold.magnitude, "float32").name,
              quantize.input[1], out_max]
    graph.replace(quantize, "_FusedQuantizedDepthwiseConv2D", inputs, {
        "Tinput": type_attr("qint8"), "Tfilter": type_attr("qint8"), "Tbias": type_attr("float32"),
        "Tsummand": type_attr("quint8"), "out_type": type_attr("quint8"),
        "Tdevice_inputs": types_attr(), "Tdevice_outputs": types_attr(),
        "Thost_inputs": types_attr("qint8", "qint8", "float32", *["float32"] * 6),
        "Thost_outputs": types_attr("quint8", "float32", "float32"),
        "fused_ops": attr(list_s=[b"BiasAdd", b"Relu", b"Requantize"]),
        "strides": attr(list_i=[1, 1, 1, 1]), "dilations": attr(list_i=[1, 1, 1, 1]),
        "padding": attr(s=b"VALID"), "data_format": attr(s=b"NHWC")})
