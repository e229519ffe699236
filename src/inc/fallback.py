"""What INC 2.6 left out of INT8, and why: read from its INT8 graph (the ``<name>_eightbit_*`` nodes its TensorFlow
adaptor writes), its op table, capability and tuning trials, and deploy.yaml."""
from __future__ import annotations

import re
from typing import Any

# Float op types that INC's TensorFlow adaptor can turn into quantized kernels: the ones worth reporting when they
# stay FP32 ("fallback ops").
COMPUTE_OPS = frozenset({
    "Conv2D", "_FusedConv2D", "Conv3D", "_FusedConv3D", "DepthwiseConv2dNative", "_FusedDepthwiseConv2dNative",
    "MatMul", "_FusedMatMul", "BatchMatMul", "BatchMatMulV2", "Conv2DBackpropInput", "Conv3DBackpropInputV2",
})


def quantized_names(graph_def) -> set[str]:
    """Original op names of the quantized kernels in an INC INT8 graph ('<name>_eightbit_requantize' → '<name>')."""
    return {node.name.split("_eightbit")[0] for node in graph_def.node if "Quantized" in node.op}


def fallback_ops(fp32_graph, int8_graph, result: Any, deploy: Any) -> list[dict[str, str]]:
    """Ops of the FP32 graph that are not quantized kernels in the INT8 graph — the Conv/MatMul-type ops, and every
    op of a type INC's op table counts in FP32 (DenseNet's ConcatV2s) — with their type there, the precision they
    run in (from the graph), and why (deploy.yaml, a recipe, INC's tuning, INC's capability)."""
    quantized = quantized_names(int8_graph)
    in_int8 = {node.name: node for node in int8_graph.node}
    capable = {name for name, _ in result.capability}
    final_int8 = set(result.int8_ops)
    left_in_fp32 = {op for op, counts in result.op_table.items()
                    if counts.get("fp32") and op not in ("QuantizeV2", "Dequantize")}
    compute = [(node.name, node.op) for node in fp32_graph.node if node.op in COMPUTE_OPS]
    reported = compute + [(node.name, node.op) for node in fp32_graph.node
                          if node.op in left_in_fp32 and node.op not in COMPUTE_OPS]
    out = []
    for name, op_type in reported:
        if name in quantized:
            continue
        position = compute.index((name, op_type)) if op_type in COMPUTE_OPS else None
        node = in_int8.get(name)
        runs_as = _precision_of(node) if node is not None else "fused/removed"
        int8_before = [t for t in result.trials if name in t.int8_ops]
        if any(re.fullmatch(p, name) for p, s in (deploy.op_wise or {}).items() if _asks_fp32(s)) \
                or any(re.fullmatch(p, op_type) for p, s in (deploy.optype_wise or {}).items() if _asks_fp32(s)) \
                or (deploy.model_wise and _asks_fp32(deploy.model_wise)):
            reason = "deploy.yaml asks for FP32 (quantization.op_wise / optype_wise / model_wise)"
        elif position == 0 and not deploy.recipes.get("first_conv_or_matmul_quantization", True):
            reason = "recipe first_conv_or_matmul_quantization: false"
        elif position == len(compute) - 1 and not deploy.recipes.get("last_conv_or_matmul_quantization", True):
            reason = "recipe last_conv_or_matmul_quantization: false"
        elif name in final_int8:
            reason = ("INC's final configuration puts it in INT8, but its graph rewrite matched no quantized kernel "
                      "for it here, so it runs in FP32 between Dequantize and QuantizeV2")
        elif int8_before:
            trial = int8_before[-1]
            value = "n/a" if trial.metric is None else f"{trial.metric:.4f}"
            reason = (f"INC's tuning took it out of INT8 to meet the accuracy criterion (with it in INT8, trial "
                      f"{trial.number} scored {value})")
        elif name not in capable:
            reason = "INC's TensorFlow adaptor has no INT8 pattern for it in this graph (not in its capability)"
        else:
            reason = "INC's tuning kept it out of INT8 in every trial"
        out.append({"name": name, "op_type": op_type, "in_int8_graph": node.op if node is not None else runs_as,
                    "runs_as": runs_as, "reason": reason})
    return out


def _precision_of(node) -> str:
    from tensorflow.core.framework import types_pb2

    dtype = node.attr["T"].type if "T" in node.attr else types_pb2.DT_FLOAT
    return "BF16" if dtype == types_pb2.DT_BFLOAT16 else "FP32"


def _asks_fp32(settings: dict[str, Any]) -> bool:
    return any("fp32" in (side or {}).get("dtype", []) and "int8" not in (side or {}).get("dtype", [])
               and "uint8" not in (side or {}).get("dtype", []) for side in settings.values())
