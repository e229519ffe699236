"""INC's INT8 graph rewritten for networks that grow a concatenation (DenseNet): ``rewrite_int8_concat``.

INC 2.6 on intel-tensorflow 2.14 quantizes every convolution of DenseNet but leaves each dense layer's input in FP32:
the 3x3 convolution's INT8 output is dequantized, appended to the FP32 concatenation, and the next layer's
pre-activation BatchNorm + ReLU + QuantizeV2 read the whole, ever-wider FP32 tensor again (about 21 bytes of memory
traffic per element and layer, against 4 for the convolutions' INT8 inputs). This rewrite keeps the concatenation in
INT8, as OpenVINO's low-precision transformations do, in three passes over one :class:`~.graph.GraphView`:

1. :mod:`.pad`: a zero padding INC runs in FP32 between a Dequantize and a QuantizeV2 of one range runs on the INT8
   bytes (exact);
2. :mod:`.concat`: every concatenation group concatenates the INT8 tensors INC makes as one plain INT8 copy, each
   channel's own scale carried as a per-channel factor;
3. :mod:`.fold`: each BatchNorm → ReLU → QuantizeV2 reading a group tensor becomes one fused INT8 1x1 depthwise
   convolution; any other reader of a group tensor gets a Dequantize and a per-channel Mul (back in :mod:`.concat`).

Each pass matches, plans (or says why not), then applies. No producer is changed and every channel keeps its own
scale, so the only new rounding is the requantization of a non-qint8 group input and the fold's own (what QuantizeV2
did). Graphs without such groups (ResNet, VGG, the small CNN) get only the exact padding change. medq's quantize
stage keeps the rewritten graph only when it still meets deploy.yaml's accuracy criterion on the validation split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import concat, fold, pad
from .graph import GraphView


@dataclass
class RewriteReport:
    groups: int = 0  # concatenation groups made INT8
    concats: int = 0  # ConcatV2 → QuantizedConcatV2
    folded_batchnorms: int = 0  # BatchNorm + ReLU + QuantizeV2 → fused INT8 depthwise
    int8_pads: int = 0  # Dequantize → Pad → QuantizeV2 of the same range → Pad of the INT8 bytes
    inputs: int = 0  # INT8 tensors entering the groups as INC made them
    requantized_inputs: int = 0  # inputs requantized to qint8 first (not signed INT8 from INC)
    dequantized_readers: int = 0  # other readers of a group tensor, given a Dequantize (and the channel scales)
    ranges: dict[str, float] = field(default_factory=dict)  # group (its first concat) → declared symmetric range R
    scale_spread: dict[str, float] = field(default_factory=dict)  # group → widest / narrowest input range
    skipped: dict[str, str] = field(default_factory=dict)  # group → why it stayed FP32

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def rewrite_int8_concat(graph_def) -> tuple[Any, RewriteReport]:
    """INC's INT8 GraphDef → (rewritten copy, what was done). The input graph is not modified."""
    from tensorflow.core.framework import graph_pb2

    out = graph_pb2.GraphDef()
    out.CopyFrom(graph_def)
    report = RewriteReport()
    graph = GraphView(out)
    report.int8_pads = pad.run(graph)
    names = concat.groups(graph)
    channels = concat.channel_counts(graph_def) if names else {}
    for group in names:
        plan = concat.plan(graph, group, channels)
        if isinstance(plan, str):
            report.skipped[group[0]] = plan
            continue
        made = concat.apply(graph, plan)
        # the folds before the other readers: an input's Dequantize goes once no fold reads it any more
        for match in plan.folds:
            fold.apply(graph, fold.plan(graph, match, made.int8_of[match.source], made.factor[match.source],
                                        made.low, made.high))
        concat.dequantize_readers(graph, plan, made)
        report.groups += 1
        report.concats += len(plan.concats)
        report.folded_batchnorms += len(plan.folds)
        report.inputs += len(plan.inputs)
        report.requantized_inputs += made.requantized
        report.dequantized_readers += len(plan.fp32_readers)
        report.ranges[plan.key] = plan.abs_max
        report.scale_spread[plan.key] = plan.abs_max / min(i.abs_max for i in plan.inputs.values())
    graph.drop_unused()
    return out, report
