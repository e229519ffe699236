"""ONNX pieces shared by the converter and the benchmark's reference engines: tensor renaming and the export of a
medq frozen graph (``input:0`` → ``output:0``) to ONNX with tf2onnx."""
from __future__ import annotations

from pathlib import Path

from medq.errors import MedqError, first_line


def rename_tensor(graph, old: str, new: str, where: str | Path) -> None:
    if old == new:
        return
    taken = {n for node in graph.node for n in node.output} | {t.name for t in graph.initializer} | \
        {i.name for i in graph.input}
    if new in taken:
        raise MedqError(f"{where}: cannot rename tensor {old!r} to {new!r}, the graph already has a tensor of that "
                        "name; rename it in the model and export again")
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new


def graph_def_to_onnx(graph_def, opset: int, where: str | Path, input_name: str = "input",
                      output_name: str = "output"):
    """tf2onnx on a frozen graph; the ONNX model keeps the graph's NHWC input, named ``input`` / ``output``."""
    import tensorflow as tf
    import tf2onnx

    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")  # tf2onnx calls TF1 graph utilities that print deprecation warnings
    try:
        model, _ = tf2onnx.convert.from_graph_def(graph_def, input_names=[f"{input_name}:0"],
                                                  output_names=[f"{output_name}:0"], opset=opset)
    except Exception as exc:
        raise MedqError(f"{where}: tf2onnx could not convert the graph ({first_line(exc)}); "
                        "try another opset") from None
    finally:
        logger.setLevel(level)
    rename_tensor(model.graph, f"{input_name}:0", input_name, where)
    rename_tensor(model.graph, f"{output_name}:0", output_name, where)
    return model
