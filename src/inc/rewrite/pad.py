"""Zero padding on INT8 bytes.

Before (INC runs the padding in FP32 between two quantizations of one range; DenseNet's and ResNet's stem)::

    x(quint8) → Dequantize[lo, hi] → Pad → QuantizeV2[lo, hi] → reader(x', lo', hi')

After (zero is zero in both, so this is exact; the Pad runs on uint8, whose kernel is fast, where quint8's is not)::

    x(quint8) → Bitcast(uint8) → Pad → Bitcast(quint8) → reader(x', lo, hi)

The Dequantize stays only if something else reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .graph import GraphView, attr, dtype, port
from .ranges import quantize_range, range_value


@dataclass
class PadMatch:
    dequantize: Any
    pad: Any
    quantize: Any


def match(graph: GraphView, quantize) -> PadMatch | None:
    """The Dequantize → Pad → QuantizeV2 that ends at ``quantize``, when both quantizations have one range (the
    match is the whole plan: the new nodes copy its attributes)."""
    if quantize.op != "QuantizeV2" or quantize.attr["mode"].s != b"SCALED":
        return None
    pad = graph.producer(quantize.input[0])
    if pad.op != "Pad" or port(quantize.input[0]) != 0 or len(graph.readers_of(f"{pad.name}:0")) != 1:
        return None
    dequantize = graph.producer(pad.input[0])
    kind = quantize.attr["T"].type
    if (dequantize.op != "Dequantize" or dequantize.attr["mode"].s != b"SCALED"
            or dequantize.attr["T"].type != kind or kind not in (dtype("quint8"), dtype("qint8"))):
        return None
    wanted = quantize_range(graph, quantize)
    found = (range_value(graph, dequantize.input[1]), range_value(graph, dequantize.input[2]))
    if wanted is None or found != wanted or {quantize.name, pad.name, dequantize.name} & graph.pinned:
        return None
    return PadMatch(dequantize, pad, quantize)


def apply(graph: GraphView, found: PadMatch) -> None:
    dequantize, pad, quantize = found.dequantize, found.pad, found.quantize
    kind = quantize.attr["T"].type
    plain = dtype("uint8") if kind == dtype("quint8") else dtype("int8")
    to_plain = graph.add(f"{pad.name}/int8_bytes", "Bitcast", [dequantize.input[0]],
                         {"T": attr(type=kind), "type": attr(type=plain)})
    padded = graph.add(f"{pad.name}/int8_pad", "Pad", [to_plain.name, pad.input[1]],
                       {"T": attr(type=plain), "Tpaddings": pad.attr["Tpaddings"]})
    back = graph.add(f"{pad.name}/int8", "Bitcast", [padded.name], {"T": attr(type=plain), "type": attr(type=kind)})
    for index, tensor in enumerate((f"{back.name}:0", dequantize.input[1], dequantize.input[2])):
        for reader, at in graph.readers_of(f"{quantize.name}:{index}"):
            graph.set_input(reader, at, tensor)
    graph.remove(quantize)
    graph.remove(pad)
    if not graph.readers_of(f"{dequantize.name}:0"):
        graph.remove(dequantize)


def run(graph: GraphView) -> int:
    """Every such padding moved onto the INT8 bytes; returns how many."""
    done = 0
    for quantize in graph.of_op("QuantizeV2"):
        found = match(graph, quantize)
        if found is not None:
            apply(graph, found)
            done += 1
    return done
