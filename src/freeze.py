"""Stage 4: a trained Keras model → frozen GraphDef ``.pb`` with stable tensor names, checked against Keras."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from medq import artifacts
from medq.errors import MedqError

FROZEN_FP32 = "model_fp32.pb"
PARITY_TOLERANCE = 1e-4


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


def load_keras_model(path: str | Path):
    import tensorflow as tf

    path = Path(path)
    if not path.exists():
        raise MedqError(f"{path}: Keras model not found; run `medq train` (or `medq tune`) for this run first")
    try:
        return tf.keras.models.load_model(path, compile=False)
    except (OSError, ValueError) as exc:
        raise MedqError(f"{path}: not a loadable Keras model ({str(exc).splitlines()[0][:120]}); re-run `medq train`") from None


def parity(model, graph_def, x: np.ndarray, input_name: str = "input", output_name: str = "output") -> float:
    """Max absolute difference between the Keras model and the frozen graph on ``x``."""
    from medq.graph import FrozenGraph

    runner = FrozenGraph(graph_def, input_name, output_name)
    try:
        frozen_out = runner.predict(x, batch_size=16)
    finally:
        runner.close()
    keras_out = model.predict(x, batch_size=16, verbose=0)
    return float(np.max(np.abs(frozen_out - keras_out)))


def run_freeze(config: Any, parity_inputs: np.ndarray | None = None) -> Path:
    """Freeze the run's Keras model to ``model_fp32.pb``, verify parity, record tensor names in the manifest."""
    run_dir = config.run_dir
    keras_path = artifacts.artifact_path(run_dir, "keras_model")
    if keras_path is None:
        raise MedqError(f"{run_dir}: no trained model in this run; run `medq train --config {config.source}` first")
    model = load_keras_model(keras_path)
    input_name, output_name = config.freeze.input_name, config.freeze.output_name
    graph_def = freeze_keras(model, input_name, output_name)
    if parity_inputs is None:
        parity_inputs = _parity_inputs(config, tuple(model.input_shape[1:]))
    diff = parity(model, graph_def, parity_inputs, input_name, output_name)
    if diff > PARITY_TOLERANCE:
        raise MedqError(f"{keras_path}: frozen graph differs from the Keras model by {diff:.2e} "
                        f"(tolerance {PARITY_TOLERANCE}); this is a bug, please report it")
    target = artifacts.write_bytes(run_dir / FROZEN_FP32, graph_def.SerializeToString())
    artifacts.update_manifest(run_dir, "freeze", artifacts={"fp32_pb": target}, parity_max_abs_diff=diff,
                              parity_images=len(parity_inputs),
                              top={"input_name": input_name, "output_name": output_name,
                                   "input_shape": list(model.input_shape[1:])})
    return target


def _parity_inputs(config: Any, input_shape: tuple[int, ...]) -> np.ndarray:
    """Real validation images when the dataset is there (what the model will see), else seeded noise."""
    from medq.data.readers import read_dataset
    from medq.preprocess import PreprocessSpec, load_batch

    recorded = artifacts.read_manifest(config.run_dir).get("preprocess")  # tune may have changed the resolution
    spec = PreprocessSpec.from_dict(recorded) if recorded else PreprocessSpec.from_config(config)
    try:
        index = read_dataset(config.data, seed=config.run.seed)
        paths = (index.paths("val") or index.paths("train"))[:16]
        return load_batch(paths, spec)
    except MedqError:
        return np.random.default_rng(0).uniform(0, 1, (8, *input_shape)).astype(np.float32)
