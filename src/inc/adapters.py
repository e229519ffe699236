"""The two objects INC 2.6's ``quantization.fit`` takes from medq: a calibration dataloader (``batch_size`` and
``(images, labels)`` batches) and an ``eval_func`` (a candidate model, as a tf.Graph or GraphDef, → a float where
higher is better). Neither imports INC."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from medq.progress import progress


class CalibrationLoader:
    """INC's calibration dataloader: ``batch_size`` and ``(images, labels)`` batches; it records, per pass, the
    files it handed to INC."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, paths: list[str], batch_size: int):
        self.images, self.labels, self.paths = images, labels, list(paths)
        self.batch_size = batch_size
        self.passes: list[list[str]] = []

    def __iter__(self):
        fed: list[str] = []
        self.passes.append(fed)
        for start in progress(range(0, len(self.images), self.batch_size), desc="calibrate", unit="batch"):
            stop = start + self.batch_size
            fed.extend(self.paths[start:stop])
            yield self.images[start:stop], self.labels[start:stop]

    @property
    def paths_fed(self) -> set[str]:
        return {p for fed in self.passes for p in fed}

    @property
    def images_per_pass(self) -> list[int]:
        return [len(fed) for fed in self.passes]


def eval_func(score: Callable[[Any], float]) -> Callable[[Any], float]:
    """INC's ``eval_func`` around ``score(graph_def)``: INC hands candidates over as a tf.Graph or a GraphDef."""
    def evaluate(model) -> float:
        return float(score(model.as_graph_def() if hasattr(model, "as_graph_def") else model))

    return evaluate
