"""INT8 concatenation: a concatenation group (ConcatV2 nodes feeding each other; one dense block) concatenates the
INT8 tensors INC already makes, each at its own calibrated scale, as one plain INT8 copy.

Before (each input dequantized, concatenated in FP32, the result read by FP32 ops)::

    a(qint8)[-a, a] → Dequantize ┐
    b(quint8)[0, b] → Dequantize ┴→ ConcatV2 → c(FP32) → reader

After (oneDNN's QuantizedConcatV2 copies without requantizing when every declared input range is equal, so each input
is declared at the group's range R = max(a, b); channel c's true scale, its input's, is kept as factor[c] = its
range / R)::

    a(qint8) ────────────────────────────────┐
    b(quint8) → Dequantize → QuantizeV2(qint8, [-b, b]) ┴→ QuantizedConcatV2([-R, R]) → c8(qint8)
    c8 → Dequantize[-R, R] → Mul(factor) → reader      (a reader that is not folded: medq.inc.rewrite.fold)

An input that is not qint8 (DenseNet's stem pool, quint8) is requantized to qint8 at its own range, once. A group is
kept only when a BatchNorm + ReLU + QuantizeV2 reads it (:mod:`.fold`), the reason to have it in INT8.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import fold
from .graph import GraphView, attr, dtype, node_name, port, tensor_key, type_attr
from .ranges import abs_max


@dataclass
class GroupInput:
    """A tensor entering the group's concatenation: its FP32 form (read by the concat) and how to get it in INT8."""

    fp32: str  # the Dequantize's output
    dequantize: Any
    signed: bool  # qint8 already: concatenated as it is; else requantized to qint8 at its own range
    abs_max: float  # its range: the true scale of its channels is abs_max / 127 (qint8)
    channels: int


@dataclass
class GroupPlan:
    concats: list[Any]  # each after the concatenations it reads
    inputs: dict[str, GroupInput]  # FP32 tensor → group input
    folds: list[fold.FoldMatch]
    fp32_readers: list[tuple[str, Any, int]]  # (FP32 concat tensor, reader, input index) that need a Dequantize
    abs_max: float  # R, the declared range of every concatenation in the group

    @property
    def key(self) -> str:  # the group's name in the report: its first concatenation
        return self.concats[0].name


@dataclass
class Int8Group:
    """An applied group: every FP32 group tensor's INT8 form, and per channel its true scale / the declared one."""

    int8_of: dict[str, str]
    factor: dict[str, np.ndarray]
    low: str  # the declared range's constants
    high: str
    requantized: int = 0  # inputs requantized to qint8 here (an input of two groups is requantized once)


def groups(graph: GraphView) -> list[list[str]]:
    """Float ConcatV2 nodes along channels (NHWC), grouped where one feeds another, in graph order."""
    concats = [n for n in graph.of_op("ConcatV2") if n.attr["T"].type == dtype("float32")
               and graph.scalar(n.input[n.attr["N"].i]) in (3, -1)]
    parent = {n.name: n.name for n in concats}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for node in concats:
        for tensor in node.input[:node.attr["N"].i]:
            if node_name(tensor) in parent and port(tensor) == 0:
                parent[root(node_name(tensor))] = root(node.name)
    found: dict[str, list[str]] = defaultdict(list)
    for node in concats:
        found[root(node.name)].append(node.name)
    return list(found.values())


def channel_counts(graph_def) -> dict[str, int]:
    """Every tensor's static channel count (last dimension), from TensorFlow's shape inference."""
    import tensorflow as tf

    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
    out = {}
    for op in graph.get_operations():
        for tensor in op.outputs:
            shape = tensor.shape
            if shape.rank and shape[-1] is not None:
                out[tensor.name] = int(shape[-1])
    return out


def plan(graph: GraphView, names: list[str], channels: dict[str, int]) -> GroupPlan | str:
    """The group's plan, or why it stays FP32."""
    concats = [graph.nodes[n] for n in names]
    members = set(names)
    if members & graph.pinned:
        return "a control dependency names or holds one of its concatenations"
    inputs: dict[str, GroupInput] = {}
    for node in concats:
        for tensor in node.input[:node.attr["N"].i]:
            if node_name(tensor) in members:
                continue
            found = _group_input(graph, tensor, channels)
            if isinstance(found, str):
                return f"input {tensor}: {found}"
            if found.dequantize.name in graph.pinned:
                return f"input {tensor}: a control dependency names or holds its Dequantize"
            inputs[tensor_key(tensor)] = found
    tensors = [f"{n}:0" for n in names] + list(inputs)
    folds, fp32_readers = [], []
    for tensor in tensors:
        for reader, index in graph.readers_of(tensor):
            if reader.name in members:
                continue
            found_fold = fold.match(graph, reader, index, tensor)
            if found_fold is not None:
                folds.append(found_fold)
            elif node_name(tensor) in members:
                fp32_readers.append((tensor, reader, index))
            # an input's other FP32 readers keep reading its Dequantize
    if not folds:
        return "no BatchNorm + ReLU + QuantizeV2 reads the concatenation: nothing to gain"
    ordered = _inputs_first(concats, members)
    if ordered is None:
        return "its concatenations form a cycle"
    width = {tensor: found.channels for tensor, found in inputs.items()}
    for node in ordered:
        width[f"{node.name}:0"] = sum(width[tensor_key(t)] for t in node.input[:node.attr["N"].i])
    for found_fold in folds:
        if graph.const(found_fold.batchnorm.input[1]).size != width[found_fold.source]:
            return (f"{found_fold.batchnorm.name} normalises a different number of channels than "
                    f"{found_fold.source} holds")
    return GroupPlan(ordered, inputs, folds, fp32_readers, max(i.abs_max for i in inputs.values()))


def _inputs_first(concats: list[Any], members: set[str]) -> list[Any] | None:
    """The group's concatenations ordered so that each comes after the ones it reads (GraphDef order is arbitrary)."""
    done: set[str] = set()
    ordered: list[Any] = []
    pending = list(concats)
    while pending:
        ready = [n for n in pending
                 if all(node_name(t) in done for t in n.input[:n.attr["N"].i] if node_name(t) in members)]
        if not ready:
            return None
        ordered += ready
        done.update(n.name for n in ready)
        pending = [n for n in pending if n.name not in done]
    return ordered


def _group_input(graph: GraphView, tensor: str, channels: dict[str, int]) -> GroupInput | str:
    dequantize = graph.producer(tensor)
    if dequantize.op != "Dequantize" or dequantize.attr["mode"].s != b"SCALED" or port(tensor) != 0:
        return f"made by {dequantize.op}, not by a SCALED Dequantize of an INT8 tensor"
    magnitude = abs_max(graph, dequantize.input[1], dequantize.input[2])
    if magnitude is None or not magnitude > 0:
        return "its range is not a calibrated constant"
    count = channels.get(tensor_key(tensor))
    if count is None:
        return "its channel count is not static"
    signed = dequantize.attr["T"].type == dtype("qint8")
    return GroupInput(tensor, dequantize, signed, magnitude, count)


def apply(graph: GraphView, group: GroupPlan) -> Int8Group:
    """The group's concatenations in INT8 (same names); its folds and other readers come next."""
    low = graph.add_const(f"{group.key}/int8_concat_min", np.float32(-group.abs_max), "float32").name
    high = graph.add_const(f"{group.key}/int8_concat_max", np.float32(group.abs_max), "float32").name
    made = Int8Group({}, {}, low, high)
    for tensor, found in group.inputs.items():
        if found.signed:
            made.int8_of[tensor] = found.dequantize.input[0]
        else:
            name = f"{found.dequantize.name}/int8_concat_quantize"
            if name not in graph.nodes:  # an input of two groups is requantized once
                own_low = graph.add_const(f"{name}/min", np.float32(-found.abs_max), "float32").name
                own_high = graph.add_const(f"{name}/max", np.float32(found.abs_max), "float32").name
                graph.add(name, "QuantizeV2", [tensor, own_low, own_high],
                          {"T": type_attr("qint8"), "mode": attr(s=b"SCALED"), "round_mode": attr(s=b"HALF_TO_EVEN"),
                           "narrow_range": attr(b=False), "axis": attr(i=-1), "ensure_minimum_range": attr(f=0.0)})
                made.requantized += 1
            made.int8_of[tensor] = name
        made.factor[tensor] = np.full(found.channels, found.abs_max / group.abs_max)
    for node in group.concats:  # a concatenation's inputs come before it
        n = node.attr["N"].i
        values = [tensor_key(t) for t in node.input[:n]]
        made.factor[f"{node.name}:0"] = np.concatenate([made.factor[v] for v in values])
        made.int8_of[f"{node.name}:0"] = node.name
        # ConcatV2(values, axis) → QuantizedConcatV2(values, axis, mins, maxes), same name
        graph.set_inputs(node, [made.int8_of[v] for v in values] + [node.input[n]] + [low] * n + [high] * n)
        graph.retype(node, "QuantizedConcatV2", {"T": type_attr("qint8")})
    return made


def dequantize_readers(graph: GraphView, group: GroupPlan, made: Int8Group) -> None:
    """The group's other FP32 readers read a Dequantize of its INT8 tensor, times the channel factors; an input's
    Dequantize stays only where something still reads it. Run after the folds took their readers."""
    dequantized: dict[str, str] = {}
    for tensor, reader, index in group.fp32_readers:
        if tensor not in dequantized:
            name = f"{node_name(tensor)}/int8_concat_dequantize"
            graph.add(name, "Dequantize", [made.int8_of[tensor], made.low, made.high],
                      {"T": type_attr("qint8"), "mode": attr(s=b"SCALED"), "narrow_range": attr(b=False),
                       "axis": attr(i=-1), "dtype": type_attr("float32")})
            scale = graph.add_const(f"{name}/channel_scale", made.factor[tensor].astype(np.float32), "float32")
            graph.add(f"{name}/scaled", "Mul", [name, scale.name], {"T": type_attr("float32")})
            dequantized[tensor] = f"{name}/scaled"
        graph.set_input(reader, index, dequantized[tensor])
    for found in group.inputs.values():
        if found.signed and not graph.readers_of(found.fp32):
            graph.remove(found.dequantize)
