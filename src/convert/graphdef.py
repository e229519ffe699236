"""What the converter's graph passes (pool_padding, batchnorm) read from a frozen GraphDef."""
from __future__ import annotations

import numpy as np


def node_name(tensor: str) -> str:
    """'name:1' / '^name' → 'name'."""
    return tensor.lstrip("^").split(":")[0]


def source(nodes: dict, tensor: str):
    """The node producing ``tensor``, looking through Identity nodes (a frozen graph has one per variable read)."""
    node = nodes.get(node_name(tensor))
    while node is not None and node.op == "Identity":
        node = nodes.get(node_name(node.input[0]))
    return node


def constant(nodes: dict, tensor: str) -> np.ndarray | None:
    """The value of ``tensor`` when a Const produces it (through Identity nodes), else None."""
    from tensorflow.python.framework import tensor_util

    node = source(nodes, tensor)
    if node is None or node.op != "Const":
        return None
    return tensor_util.MakeNdarray(node.attr["value"].tensor)


def readers(graph_def) -> dict[str, list]:
    """Node name → the nodes that read any of its outputs (control inputs included)."""
    out: dict[str, list] = {}
    for node in graph_def.node:
        for tensor in node.input:
            out.setdefault(node_name(tensor), []).append(node)
    return out


def static_shapes(graph_def) -> dict[str, list]:
    """Every node's first output shape as TensorFlow infers it on import (None for unknown dimensions)."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    return {op.name: op.outputs[0].shape.as_list() for op in graph.get_operations()
            if op.outputs and op.outputs[0].shape.rank is not None}
