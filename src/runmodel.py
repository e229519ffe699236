"""The run's model for evaluation, as a function of preprocessed images: its Keras model, or — for a converted run
(`medq convert` writes model_fp32.pb and no Keras model) — its frozen FP32 graph, loaded through the tensorflow
engine spec (:mod:`medq.engines`: the loader the benchmark and `medq serve` use). Both are verified before loading
(recorded, not stale, sha256); a run whose Keras model is stale is refused, never quietly evaluated on the graph."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medq import runrecord
from medq.thresholds import deciding_model


@dataclass
class RunModel:
    """``predict(x, batch_size)`` → probabilities [N, K], Keras-like; ``key`` is the artifact it is
    (``keras_model`` or ``fp32_pb``) and ``sha256`` that file's."""

    key: str
    path: Path
    sha256: str
    run: Callable[[np.ndarray], np.ndarray]

    def predict(self, x: np.ndarray, batch_size: int = 32, verbose: int = 0) -> np.ndarray:
        parts = [np.asarray(self.run(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def open_run_model(run_dir: str | Path, config: Any = None) -> RunModel:
    """The run's model, verified and loaded (see the module)."""
    run_dir = Path(run_dir)
    manifest = runrecord.read_manifest(run_dir)
    key, sha = deciding_model(manifest)  # the model the run's thresholds belong to
    path = runrecord.verified_path(run_dir, key, config)
    if key == "keras_model":
        from medq.models import load_keras_model

        model = load_keras_model(path)
        return RunModel(key, path, sha, model.predict_on_batch)
    from medq.engines import LoadRequest, open_engine

    input_name, output_name = manifest.facts.tensor_names()
    predict, _ = open_engine("tensorflow", LoadRequest(path, input_name, output_name, intra_op_threads=0))
    return RunModel(key, path, sha, predict)


def probabilities(model: RunModel | Any, paths: list[str], spec: Any, cache: Any = None,
                  batch_size: int = 32) -> tuple[np.ndarray, list[int]]:
    """(probabilities of the readable images, their indices into ``paths``): images stream through the one
    preprocessing (:mod:`medq.tfdata`), unreadable files are left out (the caller counts them)."""
    from medq.tfdata import iter_split_arrays

    parts, kept = [], []
    for images, indices in iter_split_arrays(paths, spec, chunk=256, cache=cache):
        if len(images):
            parts.append(model.predict(images, batch_size=batch_size, verbose=0))
            kept.extend(int(i) for i in indices)
    return (np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)), kept


def converted_thresholds(config: Any, manifest: runrecord.Manifest, model: RunModel, index: Any,
                         spec: Any, cache: Any = None) -> dict[str, Any] | None:
    """For a converted run without current thresholds (:func:`medq.thresholds.to_choose`): the ``thresholds``
    record chosen by ``config.thresholds``' policy on the run's validation split (``index``: its pinned split),
    exactly as train records them; None for every other run (train's and tune's thresholds are never replaced)."""
    import logging

    from medq import thresholds

    why = thresholds.to_choose(manifest)
    if why is None:
        return None
    paths = index.paths("val")
    if not paths:
        logging.getLogger("medq").warning("thresholds: %s; the run's validation split is empty, so none are chosen",
                                          why)
        return None
    p_val, kept = probabilities(model, paths, spec, cache)
    logging.getLogger("medq").info("thresholds: a converted model without them: choosing them on %d validation "
                                   "images (%s)", len(kept), thresholds.Policy.from_config(config.thresholds).describe())
    return thresholds.for_run(config, index.task, index.classes, index.labels("val")[kept], p_val, model.sha256,
                              model.key)
