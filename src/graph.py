"""Load and run frozen GraphDefs (FP32, INT8, BF16-rewritten): the inference engine of evaluation and benchmarks."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from medq.errors import MedqError


class ModelFileError(MedqError):
    """A model file is missing, not a frozen graph, or lacks the named tensors."""


def read_graph_def(path: str | Path):
    import tensorflow as tf

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found; run the stage that writes it (freeze/quantize) first")
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except Exception:  # protobuf raises DecodeError or RuntimeWarning-wrapped errors depending on the backend
        raise ModelFileError(f"{path}: not a frozen TensorFlow GraphDef (.pb); pass the file `medq freeze` wrote") from None
    if not graph_def.node:
        raise ModelFileError(f"{path}: empty GraphDef; re-run `medq freeze`")
    return graph_def


def session_config(intra_op_threads: int = 0, inter_op_threads: int = 1, bf16_rewrite: bool = False):
    import tensorflow as tf
    from tensorflow.core.protobuf import rewriter_config_pb2

    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=intra_op_threads,
                                      inter_op_parallelism_threads=inter_op_threads)
    if bf16_rewrite:
        # oneDNN's auto-mixed-precision pass rewrites eligible FP32 ops to BF16 (AVX512-BF16 / AMX hardware).
        config.graph_options.rewrite_options.auto_mixed_precision_onednn_bfloat16 = rewriter_config_pb2.RewriterConfig.ON
    return config


class FrozenGraph:
    """A frozen graph in its own tf.compat.v1 Session; ``predict`` runs it batch by batch. A context manager:
    ``with FrozenGraph(pb) as graph: graph.predict(x)`` closes the session."""

    def __init__(self, graph_or_path, input_name: str = "input", output_name: str = "output", *,
                 intra_op_threads: int = 0, inter_op_threads: int = 1, bf16_rewrite: bool = False):
        import tensorflow as tf

        graph_def = read_graph_def(graph_or_path) if isinstance(graph_or_path, (str, Path)) else graph_or_path
        source = graph_or_path if isinstance(graph_or_path, (str, Path)) else "graph"
        names = {n.name for n in graph_def.node}
        for name in (input_name, output_name):
            if name not in names:
                raise ModelFileError(f"{source}: no tensor named {name!r}:0 in the graph; "
                                     "pass the names recorded in the run's manifest.json")
        self.graph = tf.Graph()
        with self.graph.as_default():
            tf.compat.v1.import_graph_def(graph_def, name="")
        self.input = self.graph.get_tensor_by_name(f"{input_name}:0")
        self.output = self.graph.get_tensor_by_name(f"{output_name}:0")
        self.session = tf.compat.v1.Session(graph=self.graph, config=session_config(
            intra_op_threads, inter_op_threads, bf16_rewrite))

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(self.output, {self.input: batch})

    def predict(self, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
        outputs = [self.run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(outputs, axis=0) if outputs else np.zeros((0,), np.float32)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "FrozenGraph":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def op_type_counts(graph_def) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph_def.node:
        counts[node.op] = counts.get(node.op, 0) + 1
    return dict(sorted(counts.items()))


# --- freezing -------------------------------------------------------------------------------------------------

def freeze_callable(fn: Callable, input_shape: tuple[int, ...], input_name: str = "input",
                    output_name: str = "output"):
    """Trace ``fn`` on a float32 ``[None, *input_shape]`` input and fold its variables into constants.

    The graph is cut at ``output_name`` so the file holds exactly ``input:0 → … → output:0``.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    @tf.function(input_signature=[tf.TensorSpec([None, *input_shape], tf.float32, name=input_name)])
    def serve(x):
        return tf.identity(fn(x), name=output_name)

    from tensorflow.python.util import deprecation

    frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
    graph_def = frozen.graph.as_graph_def()
    with deprecation.silence():  # extract_sub_graph is TF1 API and says so on the user's terminal
        return tf.compat.v1.graph_util.extract_sub_graph(graph_def, [output_name])


def freeze_keras(model, input_name: str = "input", output_name: str = "output"):
    return freeze_callable(lambda x: model(x, training=False), tuple(model.input_shape[1:]), input_name, output_name)


def parity(model, graph_def, x: np.ndarray, input_name: str = "input", output_name: str = "output") -> float:
    """Max absolute difference between the Keras model and the frozen graph on ``x``."""
    with FrozenGraph(graph_def, input_name, output_name) as runner:
        frozen_out = runner.predict(x, batch_size=16)
    keras_out = model.predict(x, batch_size=16, verbose=0)
    return float(np.max(np.abs(frozen_out - keras_out)))


def graph_metrics(graph_def, batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], y: np.ndarray,
                  task: str, classes: list[str], input_name: str, output_name: str,
                  bf16_rewrite: bool = False) -> dict[str, Any]:
    """The task metrics of a frozen graph on streamed images: ``batches()`` yields (preprocessed images, their
    indices into ``y``); files that became unreadable since are simply absent from the metrics."""
    from medq.metrics import task_metrics

    probabilities, kept = graph_probabilities(graph_def, batches, input_name, output_name, bf16_rewrite)
    return task_metrics(task, np.asarray(y)[kept], probabilities, classes)


def graph_probabilities(graph_def, batches: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
                        input_name: str, output_name: str,
                        bf16_rewrite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, the indices ``batches()`` gave them): a frozen graph's outputs on streamed images."""
    probabilities, kept = [], []
    with FrozenGraph(graph_def, input_name, output_name, bf16_rewrite=bf16_rewrite) as runner:
        for images, indices in batches():
            if len(images):
                probabilities.append(runner.predict(images, batch_size=64))
                kept.append(indices)
    if not kept:
        raise MedqError("none of the evaluation images could be read")
    return np.concatenate(probabilities), np.concatenate(kept)
