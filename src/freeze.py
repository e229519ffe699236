"""Stage 4: a trained Keras model → frozen GraphDef ``.pb`` with stable tensor names, checked against Keras."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medq import artifacts, runrecord
from medq.errors import MedqError
from medq.graph import freeze_keras, parity
from medq.models import load_keras_model

FROZEN_FP32 = "model_fp32.pb"
PARITY_TOLERANCE = 1e-4


def run_freeze(config: Any, parity_inputs: np.ndarray | None = None) -> Path:
    """Freeze the run's Keras model to ``model_fp32.pb``, verify parity, record tensor names in the manifest."""
    run_dir = config.run_dir
    with runrecord.writer_lock(run_dir, "freeze"):
        keras_path = runrecord.verified_path(run_dir, "keras_model", config)
        model = load_keras_model(keras_path)
        input_name, output_name = config.freeze.input_name, config.freeze.output_name
        graph_def = freeze_keras(model, input_name, output_name)
        if parity_inputs is None:
            parity_inputs = _parity_inputs(config, tuple(model.input_shape[1:]))
        diff = parity(model, graph_def, parity_inputs, input_name, output_name)
        if diff > PARITY_TOLERANCE:
            raise MedqError(f"{keras_path}: frozen graph differs from the Keras model by {diff:.2e} "
                            f"(tolerance {PARITY_TOLERANCE}); this is a bug, please report it")
        staged = artifacts.write_bytes(runrecord.staging_path(run_dir, FROZEN_FP32), graph_def.SerializeToString())
        runrecord.commit(run_dir, "freeze", artifacts={"fp32_pb": staged}, inputs=("keras_model",),
                         parity_max_abs_diff=diff, parity_images=len(parity_inputs),
                         facts={"input_name": input_name, "output_name": output_name,
                                "input_shape": list(model.input_shape[1:])})
    return run_dir / FROZEN_FP32


def _parity_inputs(config: Any, input_shape: tuple[int, ...]) -> np.ndarray:
    """Real validation images when the dataset is there (what the model will see), else seeded noise."""
    from medq.data.cache import cache_root
    from medq.data.readers import read_dataset
    from medq.preprocess import PreprocessSpec, load_batch

    recorded = runrecord.read_manifest(config.run_dir).facts.preprocess  # tune may have changed the resolution
    spec = PreprocessSpec.from_dict(recorded) if recorded else PreprocessSpec.from_config(config)
    try:
        index = read_dataset(config.data, seed=config.run.seed, cache_root=cache_root(config))
        paths = (index.paths("val") or index.paths("train"))[:16]
        return load_batch(paths, spec)
    except MedqError:
        return np.random.default_rng(0).uniform(0, 1, (8, *input_shape)).astype(np.float32)
