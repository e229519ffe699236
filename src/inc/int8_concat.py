"""INT8 concatenation: a graph rewrite of INC's INT8 graph for networks that grow a concatenation (DenseNet).

INC 2.6 on intel-tensorflow 2.14 quantizes every convolution of DenseNet but leaves each dense layer's input in FP32:
the 3x3 convolution's INT8 output is dequantized, appended to the FP32 concatenation, and the next layer's
pre-activation BatchNorm + ReLU + QuantizeV2 read the whole, ever-wider FP32 tensor again (about 21 bytes of memory
traffic per element and layer, against 4 for the convolutions' INT8 inputs). This rewrite keeps the concatenation in
INT8, as OpenVINO's low-precision transformations do:

1. every concatenation group (ConcatV2 nodes feeding each other: one dense block) concatenates the INT8 tensors INC
   already makes, each at its own calibrated scale, as one plain INT8 copy (TensorFlow's oneDNN QuantizedConcatV2
   copies without requantizing when all declared input ranges are equal, so every input is declared at the group's
   range R and the true scale of each channel, its input's, is carried as a per-channel factor); an input that is
   not INT8 with a signed range (DenseNet's stem pool, quint8) is requantized to qint8 at its own range once;
2. each BatchNorm → ReLU → QuantizeV2 that reads a group tensor becomes one INT8 1x1 depthwise convolution with
   BiasAdd, ReLU and requantization fused (``_FusedQuantizedDepthwiseConv2D``): per channel the weight is ±127 with
   range |γ'|·s_c/S (γ' = γ/√(var+ε), s_c the channel's true scale, S = R/127 the declared one), the bias β' =
   β − mean·γ', the output range the QuantizeV2's, so its consumer, the INT8 1x1 convolution, reads the same
   quantized tensor as before;
3. any other reader of a group tensor gets a Dequantize of it and a per-channel Mul by s_c/S.

Before that, a zero padding that INC runs in FP32 between a Dequantize and a QuantizeV2 of the same range (DenseNet's
stem, in front of its max pooling) becomes the same Pad on the INT8 bytes (zero is zero in both, so this is exact; the
Pad goes through uint8, whose kernel is fast, where TensorFlow's quint8 Pad is not).

No producer is changed and every channel keeps its own scale, so the only new rounding is step 1's requantization of
a non-qint8 input and the fold's own requantization (what QuantizeV2 did). Graphs without such groups (ResNet, VGG,
the small CNN) come back unchanged. medq's quantize stage keeps the rewritten graph only when it still meets
deploy.yaml's accuracy criterion on the validation split.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_RANGE_PRESERVING = ("QuantizedAvgPool", "QuantizedMaxPool")  # INT8 in, INT8 out, the input's range passed on
_REQUANTIZING = ("QuantizedConv2DWithBiasAndRequantize", "QuantizedConv2DWithBiasAndReluAndRequantize",
                 "QuantizedConv2DWithBiasSumAndReluAndRequantize", "QuantizedDepthwiseConv2DWithBiasAndRequantize",
                 "QuantizedDepthwiseConv2DWithBiasAndReluAndRequantize")
_FROZEN_OUTPUT_RANGE = (7, 8)  # min_freezed_output, max_freezed_output of the *AndRequantize convolutions


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
    graph = _Graph(out)
    report.int8_pads = _int8_pads(graph)
    groups = graph.concat_groups()
    channels = _channel_counts(graph_def) if groups else {}
    for group in groups:
        plan = _plan_group(graph, group, channels)
        if isinstance(plan, str):
            report.skipped[group[0]] = plan
            continue
        _apply(graph, plan, report)
    graph.drop_unused()
    return out, report


# --- reading the graph ----------------------------------------------------------------------------------------------

def _name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def _port(tensor: str) -> int:
    return int(tensor.split(":")[1]) if ":" in tensor else 0


class _Graph:
    def __init__(self, graph_def):
        self.graph_def = graph_def
        self.nodes = {n.name: n for n in graph_def.node}
        self.readers: dict[str, list[tuple[Any, int]]] = defaultdict(list)  # "node:port" → [(reader, input index)]
        self.pinned: set[str] = set()  # nodes a control dependency names or that carry one: left as they are
        for node in graph_def.node:
            for i, tensor in enumerate(node.input):
                if tensor.startswith("^"):
                    self.pinned.update((node.name, _name(tensor)))
                else:
                    self.readers[f"{_name(tensor)}:{_port(tensor)}"].append((node, i))
        self.removed: set[str] = set()

    def const(self, tensor: str) -> np.ndarray | None:
        from tensorflow.python.framework import tensor_util

        node = self.nodes.get(_name(tensor))
        while node is not None and node.op == "Identity":
            node = self.nodes.get(_name(node.input[0]))
        if node is None or node.op not in ("Const", "HostConst"):
            return None
        return tensor_util.MakeNdarray(node.attr["value"].tensor)

    def scalar(self, tensor: str) -> float | None:
        value = self.const(tensor)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def producer(self, tensor: str):
        return self.nodes[_name(tensor)]

    def readers_of(self, tensor: str) -> list[tuple[Any, int]]:
        return [(n, i) for n, i in self.readers[f"{_name(tensor)}:{_port(tensor)}"] if n.name not in self.removed]

    def only_reader(self, tensor: str, op: str):
        readers = self.readers_of(tensor)
        if len(readers) == 1 and readers[0][0].op == op and readers[0][1] == 0:
            return readers[0][0]
        return None

    def concat_groups(self) -> list[list[str]]:
        """Float ConcatV2 nodes along channels (NHWC), grouped where one feeds another, in graph order."""
        concats = [n for n in self.graph_def.node if n.op == "ConcatV2" and n.attr["T"].type == _dtype("float32")
                   and self.scalar(n.input[n.attr["N"].i]) in (3, -1)]
        parent = {n.name: n.name for n in concats}

        def root(name: str) -> str:
            while parent[name] != name:
                parent[name] = parent[parent[name]]
                name = parent[name]
            return name

        for node in concats:
            for tensor in node.input[:node.attr["N"].i]:
                if _name(tensor) in parent and _port(tensor) == 0:
                    parent[root(_name(tensor))] = root(node.name)
        groups: dict[str, list[str]] = defaultdict(list)
        for node in concats:
            groups[root(node.name)].append(node.name)
        return list(groups.values())

    def add(self, name: str, op: str, inputs: list[str], attrs: dict[str, Any]):
        node = self.graph_def.node.add()
        node.name, node.op = name, op
        node.input.extend(inputs)
        for key, value in attrs.items():
            node.attr[key].CopyFrom(value)
        self.nodes[name] = node
        for i, tensor in enumerate(inputs):
            self.readers[f"{_name(tensor)}:{_port(tensor)}"].append((node, i))
        return node

    def add_const(self, name: str, value: np.ndarray, dtype: str):
        from tensorflow.python.framework import dtypes, tensor_util

        tensor = tensor_util.make_tensor_proto(value, dtypes.as_dtype(dtype), list(np.shape(value)))
        return self.add(name, "Const", [], {"dtype": _type_attr(dtype), "value": _attr(tensor=tensor)})

    def set_input(self, node, index: int, tensor: str) -> None:
        old = f"{_name(node.input[index])}:{_port(node.input[index])}"
        self.readers[old] = [(n, i) for n, i in self.readers[old] if not (n is node and i == index)]
        node.input[index] = tensor
        self.readers[f"{_name(tensor)}:{_port(tensor)}"].append((node, index))

    def set_inputs(self, node, tensors: list[str]) -> None:
        for tensor in set(node.input):
            key = f"{_name(tensor)}:{_port(tensor)}"
            self.readers[key] = [(n, i) for n, i in self.readers[key] if n is not node]
        del node.input[:]
        node.input.extend(tensors)
        for i, tensor in enumerate(tensors):
            self.readers[f"{_name(tensor)}:{_port(tensor)}"].append((node, i))

    def remove(self, node) -> None:
        self.removed.add(node.name)

    def drop_unused(self) -> None:
        """Remove the replaced nodes and the constants that only they read."""
        orphaned = {_name(t) for n in self.graph_def.node if n.name in self.removed for t in n.input}
        kept = [n for n in self.graph_def.node if n.name not in self.removed]
        read = {_name(t) for n in kept for t in n.input}
        kept = [n for n in kept if not (n.name in orphaned and n.name not in read and n.op in ("Const", "HostConst"))]
        del self.graph_def.node[:]
        self.graph_def.node.extend(kept)


# --- zero padding in INT8 ---------------------------------------------------------------------------------------

def _int8_pads(graph: _Graph) -> int:
    done = 0
    for quantize in [n for n in graph.graph_def.node if n.op == "QuantizeV2" and n.attr["mode"].s == b"SCALED"]:
        pad = graph.producer(quantize.input[0])
        if pad.op != "Pad" or _port(quantize.input[0]) != 0 or len(graph.readers_of(f"{pad.name}:0")) != 1:
            continue
        dequantize = graph.producer(pad.input[0])
        dtype = quantize.attr["T"].type
        if (dequantize.op != "Dequantize" or dequantize.attr["mode"].s != b"SCALED"
                or dequantize.attr["T"].type != dtype or dtype not in (_dtype("quint8"), _dtype("qint8"))):
            continue
        wanted = _quantize_range(graph, quantize)
        found = (_range_value(graph, dequantize.input[1]), _range_value(graph, dequantize.input[2]))
        if wanted is None or found != wanted or {quantize.name, pad.name, dequantize.name} & graph.pinned:
            continue
        plain = _dtype("uint8") if dtype == _dtype("quint8") else _dtype("int8")
        to_plain = graph.add(f"{pad.name}/int8_bytes", "Bitcast", [dequantize.input[0]],
                             {"T": _attr(type=dtype), "type": _attr(type=plain)})
        padded = graph.add(f"{pad.name}/int8_pad", "Pad", [to_plain.name, pad.input[1]],
                           {"T": _attr(type=plain), "Tpaddings": pad.attr["Tpaddings"]})
        back = graph.add(f"{pad.name}/int8", "Bitcast", [padded.name],
                         {"T": _attr(type=plain), "type": _attr(type=dtype)})
        for port, tensor in enumerate((f"{back.name}:0", dequantize.input[1], dequantize.input[2])):
            for reader, index in graph.readers_of(f"{quantize.name}:{port}"):
                graph.set_input(reader, index, tensor)
        graph.remove(quantize)
        graph.remove(pad)
        if not graph.readers_of(f"{dequantize.name}:0"):
            graph.remove(dequantize)
        done += 1
    return done


# --- planning one group ---------------------------------------------------------------------------------------------

@dataclass
class _Input:
    """A tensor entering the group's concatenation: its FP32 form (read by the concat) and how to get it in INT8."""

    fp32: str  # the Dequantize's output
    dequantize: Any
    signed: bool  # qint8 already: concatenated as it is; else requantized to qint8 at its own range
    abs_max: float  # its range: the true scale of its channels is abs_max / 127 (qint8)
    channels: int


@dataclass
class _Fold:
    batchnorm: Any
    relu: Any
    quantize: Any
    source: str  # the FP32 group tensor it reads


@dataclass
class _Plan:
    concats: list[Any]  # each after the concatenations it reads
    inputs: dict[str, _Input]  # FP32 tensor → group input
    folds: list[_Fold]
    fp32_readers: list[tuple[str, Any, int]]  # (FP32 concat tensor, reader, input index) that need a Dequantize
    abs_max: float  # R, the declared range of every concatenation in the group


def _channel_counts(graph_def) -> dict[str, int]:
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


def _plan_group(graph: _Graph, names: list[str], channels: dict[str, int]) -> _Plan | str:
    concats = [graph.nodes[n] for n in names]
    members = set(names)
    if members & graph.pinned:
        return "a control dependency names or holds one of its concatenations"
    inputs: dict[str, _Input] = {}
    for node in concats:
        for tensor in node.input[:node.attr["N"].i]:
            if _name(tensor) in members:
                continue
            found = _group_input(graph, tensor, channels)
            if isinstance(found, str):
                return f"input {tensor}: {found}"
            if found.dequantize.name in graph.pinned:
                return f"input {tensor}: a control dependency names or holds its Dequantize"
            inputs[f"{_name(tensor)}:{_port(tensor)}"] = found
    tensors = [f"{n}:0" for n in names] + list(inputs)
    folds, fp32_readers = [], []
    for tensor in tensors:
        for reader, index in graph.readers_of(tensor):
            if reader.name in members:
                continue
            fold = _batchnorm_chain(graph, reader, index, tensor)
            if fold is not None:
                folds.append(fold)
            elif _name(tensor) in members:
                fp32_readers.append((tensor, reader, index))
            # an input's other FP32 readers keep reading its Dequantize
    if not folds:
        return "no BatchNorm + ReLU + QuantizeV2 reads the concatenation: nothing to gain"
    ordered = _inputs_first(concats, members)
    if ordered is None:
        return "its concatenations form a cycle"
    width = {tensor: found.channels for tensor, found in inputs.items()}
    for node in ordered:
        width[f"{node.name}:0"] = sum(width[f"{_name(t)}:{_port(t)}"] for t in node.input[:node.attr["N"].i])
    for fold in folds:
        if graph.const(fold.batchnorm.input[1]).size != width[fold.source]:
            return f"{fold.batchnorm.name} normalises a different number of channels than {fold.source} holds"
    return _Plan(ordered, inputs, folds, fp32_readers, max(i.abs_max for i in inputs.values()))


def _inputs_first(concats: list[Any], members: set[str]) -> list[Any] | None:
    """The group's concatenations ordered so that each comes after the ones it reads (GraphDef order is arbitrary)."""
    done: set[str] = set()
    ordered: list[Any] = []
    pending = list(concats)
    while pending:
        ready = [n for n in pending
                 if all(_name(t) in done for t in n.input[:n.attr["N"].i] if _name(t) in members)]
        if not ready:
            return None
        ordered += ready
        done.update(n.name for n in ready)
        pending = [n for n in pending if n.name not in done]
    return ordered


def _group_input(graph: _Graph, tensor: str, channels: dict[str, int]) -> _Input | str:
    dequantize = graph.producer(tensor)
    if dequantize.op != "Dequantize" or dequantize.attr["mode"].s != b"SCALED" or _port(tensor) != 0:
        return f"made by {dequantize.op}, not by a SCALED Dequantize of an INT8 tensor"
    abs_max = _abs_max(graph, dequantize.input[1], dequantize.input[2])
    if abs_max is None or not abs_max > 0:
        return "its range is not a calibrated constant"
    count = channels.get(f"{_name(tensor)}:{_port(tensor)}")
    if count is None:
        return "its channel count is not static"
    signed = dequantize.attr["T"].type == _dtype("qint8")
    return _Input(tensor, dequantize, signed, abs_max, count)


def _abs_max(graph: _Graph, min_tensor: str, max_tensor: str) -> float | None:
    low, high = _range_value(graph, min_tensor), _range_value(graph, max_tensor)
    if low is None or high is None:
        return None
    return max(abs(low), abs(high))


def _quantize_range(graph: _Graph, quantize) -> tuple[float, float] | None:
    """The range a QuantizeV2 of constant bounds really quantizes with: TensorFlow widens one narrower than
    ensure_minimum_range (relative to its magnitude; the op's default 0.01 when the attribute is absent)."""
    low, high = graph.scalar(quantize.input[1]), graph.scalar(quantize.input[2])
    if low is None or high is None:
        return None
    ensure = quantize.attr["ensure_minimum_range"].f if "ensure_minimum_range" in quantize.attr else 0.01
    low = min(0.0, low)
    return low, max(0.0, high, low + ensure * max(1.0, abs(low), abs(high)))


def _range_value(graph: _Graph, tensor: str) -> float | None:
    """A min/max tensor of an INT8 tensor, followed back to its frozen constant."""
    value = graph.scalar(tensor)
    if value is not None:
        return value
    node, port = graph.producer(tensor), _port(tensor)
    if port in (1, 2) and node.op in _RANGE_PRESERVING:
        return _range_value(graph, node.input[port])
    if port in (1, 2) and node.op in _REQUANTIZING:
        return _range_value(graph, node.input[_FROZEN_OUTPUT_RANGE[port - 1]])
    if port in (1, 2) and node.op == "QuantizeV2":
        bounds = _quantize_range(graph, node)
        return None if bounds is None else bounds[port - 1]
    return None


def _batchnorm_chain(graph: _Graph, reader, index: int, tensor: str) -> _Fold | None:
    """BatchNorm (inference, NHWC) → ReLU → QuantizeV2 (quint8, SCALED, constant range), each read only by the
    next."""
    if (reader.op != "FusedBatchNormV3" or index != 0 or "is_training" not in reader.attr
            or reader.attr["is_training"].b or reader.attr["data_format"].s not in (b"NHWC", b"")):
        return None  # (is_training defaults to true)
    if any(graph.const(t) is None for t in reader.input[1:5]):
        return None
    if any(graph.readers_of(f"{reader.name}:{p}") for p in range(1, 6)):
        return None
    relu = graph.only_reader(f"{reader.name}:0", "Relu")
    quantize = relu is not None and graph.only_reader(f"{relu.name}:0", "QuantizeV2")
    if not quantize or quantize.attr["T"].type != _dtype("quint8") or quantize.attr["mode"].s != b"SCALED":
        return None
    bounds = _quantize_range(graph, quantize)
    if bounds is None or bounds[0] != 0.0:  # after a ReLU; the fused kernel's quint8 output starts at 0
        return None
    if {reader.name, relu.name, quantize.name} & graph.pinned:
        return None
    return _Fold(reader, relu, quantize, tensor)


# --- applying the plan ----------------------------------------------------------------------------------------------

def _apply(graph: _Graph, plan: _Plan, report: RewriteReport) -> None:
    key = plan.concats[0].name
    low = graph.add_const(f"{key}/int8_concat_min", np.float32(-plan.abs_max), "float32").name
    high = graph.add_const(f"{key}/int8_concat_max", np.float32(plan.abs_max), "float32").name
    int8_of: dict[str, str] = {}  # FP32 group tensor → its values in INT8 (channel c at scale factor[c] · R/127)
    factor: dict[str, np.ndarray] = {}  # FP32 group tensor → per channel, true scale / declared scale
    for tensor, found in plan.inputs.items():
        if found.signed:
            int8_of[tensor] = found.dequantize.input[0]
        else:
            name = f"{found.dequantize.name}/int8_concat_quantize"
            if name not in graph.nodes:  # an input of two groups is requantized once
                own_low = graph.add_const(f"{name}/min", np.float32(-found.abs_max), "float32").name
                own_high = graph.add_const(f"{name}/max", np.float32(found.abs_max), "float32").name
                graph.add(name, "QuantizeV2", [tensor, own_low, own_high],
                          {"T": _type_attr("qint8"), "mode": _attr(s=b"SCALED"), "round_mode": _attr(s=b"HALF_TO_EVEN"),
                           "narrow_range": _attr(b=False), "axis": _attr(i=-1), "ensure_minimum_range": _attr(f=0.0)})
                report.requantized_inputs += 1
            int8_of[tensor] = name
        factor[tensor] = np.full(found.channels, found.abs_max / plan.abs_max)
        report.inputs += 1
    for node in plan.concats:  # a concatenation's inputs come before it
        n = node.attr["N"].i
        values = [f"{_name(t)}:{_port(t)}" for t in node.input[:n]]
        factor[f"{node.name}:0"] = np.concatenate([factor[v] for v in values])
        int8_of[f"{node.name}:0"] = node.name
        # ConcatV2(values, axis) → QuantizedConcatV2(values, axis, mins, maxes), same name
        graph.set_inputs(node, [int8_of[v] for v in values] + [node.input[n]] + [low] * n + [high] * n)
        node.op = "QuantizedConcatV2"
        node.attr["T"].CopyFrom(_type_attr("qint8"))
        report.concats += 1
    for fold in plan.folds:
        _fold(graph, fold, int8_of[fold.source], factor[fold.source], low, high)
        report.folded_batchnorms += 1
    dequantized: dict[str, str] = {}
    for tensor, reader, index in plan.fp32_readers:
        if tensor not in dequantized:
            name = f"{_name(tensor)}/int8_concat_dequantize"
            graph.add(name, "Dequantize", [int8_of[tensor], low, high],
                      {"T": _type_attr("qint8"), "mode": _attr(s=b"SCALED"), "narrow_range": _attr(b=False),
                       "axis": _attr(i=-1), "dtype": _type_attr("float32")})
            scale = graph.add_const(f"{name}/channel_scale", factor[tensor].astype(np.float32), "float32")
            graph.add(f"{name}/scaled", "Mul", [name, scale.name], {"T": _type_attr("float32")})
            dequantized[tensor] = f"{name}/scaled"
        graph.set_input(reader, index, dequantized[tensor])
        report.dequantized_readers += 1
    for found in plan.inputs.values():  # an input's Dequantize stays only where something still reads it
        if found.signed and not graph.readers_of(found.fp32):
            graph.remove(found.dequantize)
    report.groups += 1
    report.ranges[key] = plan.abs_max
    report.scale_spread[key] = plan.abs_max / min(i.abs_max for i in plan.inputs.values())


def _fold(graph: _Graph, fold: _Fold, source: str, factor: np.ndarray, low: str, high: str) -> None:
    bn, quantize = fold.batchnorm, fold.quantize
    gamma, beta, mean, variance = (graph.const(t).astype(np.float64) for t in bn.input[1:5])
    epsilon = bn.attr["epsilon"].f if "epsilon" in bn.attr else 1e-4  # the op's default
    scale = gamma / np.sqrt(variance + epsilon)
    shift = beta - mean * scale
    channels = scale.size  # == factor.size, checked by the plan
    magnitude = np.abs(scale) * factor  # the declared input scale is R/127; channel c's true one factor[c] times that
    tiny = magnitude < 1e-12  # a channel the BatchNorm zeroes: weight 0, the bias alone
    weights = np.where(tiny, 0, np.sign(scale) * 127).astype(np.int8).reshape(1, 1, channels, 1)
    magnitude = np.where(tiny, 1e-12, magnitude).astype(np.float32)
    out_high, widened = graph.scalar(quantize.input[2]), _quantize_range(graph, quantize)[1]  # as QuantizeV2 ran
    prefix, name, out_min, out_max = f"{bn.name}/int8_fold", quantize.name, quantize.input[1], quantize.input[2]
    graph.remove(bn)
    graph.remove(fold.relu)
    graph.graph_def.node.remove(quantize)  # replaced below by a node of the same name; its range constants stay read
    if widened != out_high:
        out_max = graph.add_const(f"{prefix}/max_output", np.float32(widened), "float32").name
    inputs = [source, graph.add_const(f"{prefix}/weights", weights, "qint8").name,
              graph.add_const(f"{prefix}/bias", shift.astype(np.float32), "float32").name, low, high,
              graph.add_const(f"{prefix}/min_filter", -magnitude, "float32").name,
              graph.add_const(f"{prefix}/max_filter", magnitude, "float32").name,
              out_min, out_max]
    # Takes the QuantizeV2's name: its readers (the INT8 1x1 convolution) read name:0/1/2 exactly as before.
    graph.add(name, "_FusedQuantizedDepthwiseConv2D", inputs, {
        "Tinput": _type_attr("qint8"), "Tfilter": _type_attr("qint8"), "Tbias": _type_attr("float32"),
        "Tsummand": _type_attr("quint8"), "out_type": _type_attr("quint8"),
        "Tdevice_inputs": _types(), "Tdevice_outputs": _types(),
        "Thost_inputs": _types("qint8", "qint8", "float32", *["float32"] * 6),
        "Thost_outputs": _types("quint8", "float32", "float32"),
        "fused_ops": _attr(list_s=[b"BiasAdd", b"Relu", b"Requantize"]),
        "strides": _attr(list_i=[1, 1, 1, 1]), "dilations": _attr(list_i=[1, 1, 1, 1]),
        "padding": _attr(s=b"VALID"), "data_format": _attr(s=b"NHWC")})


# --- attribute helpers ----------------------------------------------------------------------------------------------

def _dtype(name: str) -> int:
    from tensorflow.python.framework import dtypes

    return dtypes.as_dtype(name).as_datatype_enum


def _type_attr(name: str):
    from tensorflow.core.framework import attr_value_pb2

    return attr_value_pb2.AttrValue(type=_dtype(name))


def _types(*names: str):
    from tensorflow.core.framework import attr_value_pb2

    return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(type=[_dtype(n) for n in names]))


def _attr(**kwargs: Any):
    from tensorflow.core.framework import attr_value_pb2

    if "list_s" in kwargs:
        return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(s=kwargs["list_s"]))
    if "list_i" in kwargs:
        return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(i=kwargs["list_i"]))
    return attr_value_pb2.AttrValue(**kwargs)
