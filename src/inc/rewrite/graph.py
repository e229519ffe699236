"""The graph view every rewrite pass works through: a GraphDef with an index of its nodes and of who reads each
tensor, kept true by the only methods that change the graph (add, replace, rewire, retype, remove).

Removal is deferred: a removed node stays in the GraphDef (invisible to ``readers_of``) until ``drop_unused`` deletes
it with the constants only it read, so a pass can still look at what it replaces while it builds the replacement.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np


def node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def port(tensor: str) -> int:
    return int(tensor.split(":")[1]) if ":" in tensor else 0


def tensor_key(tensor: str) -> str:
    """``name:port`` for any spelling of a tensor (``name`` is port 0)."""
    return f"{node_name(tensor)}:{port(tensor)}"


class GraphView:
    def __init__(self, graph_def):
        self.graph_def = graph_def
        self.nodes = {n.name: n for n in graph_def.node}
        self._readers: dict[str, list[tuple[Any, int]]] = defaultdict(list)  # "node:port" → [(reader, input index)]
        self.pinned: set[str] = set()  # nodes a control dependency names or that carry one: left as they are
        for node in graph_def.node:
            self._index(node)
        self._removed: set[str] = set()

    def _index(self, node) -> None:
        for i, tensor in enumerate(node.input):
            if tensor.startswith("^"):
                self.pinned.update((node.name, node_name(tensor)))
            else:
                self._readers[tensor_key(tensor)].append((node, i))

    def _unindex(self, node) -> None:
        for tensor in set(node.input):
            key = tensor_key(tensor)
            self._readers[key] = [(n, i) for n, i in self._readers[key] if n is not node]

    # --- reading ---

    def const(self, tensor: str) -> np.ndarray | None:
        from tensorflow.python.framework import tensor_util

        node = self.nodes.get(node_name(tensor))
        while node is not None and node.op == "Identity":
            node = self.nodes.get(node_name(node.input[0]))
        if node is None or node.op not in ("Const", "HostConst"):
            return None
        return tensor_util.MakeNdarray(node.attr["value"].tensor)

    def scalar(self, tensor: str) -> float | None:
        value = self.const(tensor)
        return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None

    def producer(self, tensor: str):
        return self.nodes[node_name(tensor)]

    def readers_of(self, tensor: str) -> list[tuple[Any, int]]:
        return [(n, i) for n, i in self._readers[tensor_key(tensor)] if n.name not in self._removed]

    def only_reader(self, tensor: str, op: str):
        readers = self.readers_of(tensor)
        if len(readers) == 1 and readers[0][0].op == op and readers[0][1] == 0:
            return readers[0][0]
        return None

    def of_op(self, op: str) -> list[Any]:
        """The nodes running ``op``, in graph order (a snapshot: safe to change the graph while walking it)."""
        return [n for n in self.graph_def.node if n.op == op and n.name not in self._removed]

    # --- changing ---

    def add(self, name: str, op: str, inputs: list[str], attrs: dict[str, Any]):
        node = self.graph_def.node.add()
        node.name, node.op = name, op
        node.input.extend(inputs)
        for key, value in attrs.items():
            node.attr[key].CopyFrom(value)
        self.nodes[name] = node
        self._index(node)
        return node

    def add_const(self, name: str, value: np.ndarray, dtype: str):
        from tensorflow.python.framework import dtypes, tensor_util

        tensor = tensor_util.make_tensor_proto(value, dtypes.as_dtype(dtype), list(np.shape(value)))
        return self.add(name, "Const", [], {"dtype": type_attr(dtype), "value": attr(tensor=tensor)})

    def replace(self, node, op: str, inputs: list[str], attrs: dict[str, Any]):
        """A new node of the same name in place of ``node``: its readers read the new one's outputs."""
        self._unindex(node)
        self.graph_def.node.remove(node)
        return self.add(node.name, op, inputs, attrs)

    def set_input(self, node, index: int, tensor: str) -> None:
        old = tensor_key(node.input[index])
        self._readers[old] = [(n, i) for n, i in self._readers[old] if not (n is node and i == index)]
        node.input[index] = tensor
        self._readers[tensor_key(tensor)].append((node, index))

    def set_inputs(self, node, tensors: list[str]) -> None:
        self._unindex(node)
        del node.input[:]
        node.input.extend(tensors)
        self._index(node)

    def retype(self, node, op: str, attrs: dict[str, Any]) -> None:
        """``node`` runs ``op`` from now on, with ``attrs`` set (its inputs are changed with ``set_inputs``)."""
        node.op = op
        for key, value in attrs.items():
            node.attr[key].CopyFrom(value)

    def remove(self, node) -> None:
        self._removed.add(node.name)

    def drop_unused(self) -> None:
        """Remove the removed nodes and the constants that only they read."""
        orphaned = {node_name(t) for n in self.graph_def.node if n.name in self._removed for t in n.input}
        kept = [n for n in self.graph_def.node if n.name not in self._removed]
        read = {node_name(t) for n in kept for t in n.input}
        kept = [n for n in kept if not (n.name in orphaned and n.name not in read and n.op in ("Const", "HostConst"))]
        del self.graph_def.node[:]
        self.graph_def.node.extend(kept)
        self.nodes = {n.name: n for n in kept}


# --- attribute values ---------------------------------------------------------------------------------------------

def dtype(name: str) -> int:
    from tensorflow.python.framework import dtypes

    return dtypes.as_dtype(name).as_datatype_enum


def type_attr(name: str):
    from tensorflow.core.framework import attr_value_pb2

    return attr_value_pb2.AttrValue(type=dtype(name))


def types_attr(*names: str):
    from tensorflow.core.framework import attr_value_pb2

    return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(type=[dtype(n) for n in names]))


def attr(**kwargs: Any):
    from tensorflow.core.framework import attr_value_pb2

    if "list_s" in kwargs:
        return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(s=kwargs["list_s"]))
    if "list_i" in kwargs:
        return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(i=kwargs["list_i"]))
    return attr_value_pb2.AttrValue(**kwargs)
