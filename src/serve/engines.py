"""What the server runs a batch on. An engine is anything with ``precision``, ``__call__(x) -> probabilities`` and
``close()``: ``x`` is float32 ``[N, S, S, C]`` preprocessed by medq.preprocess, the answer ``[N, n_classes]``. Another
runtime (OpenVINO, ONNX Runtime) is one more small class with those three members and one line in ``open_engine``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from medq.errors import MedqError
from medq.inference import Predictor, RunInfo, model_location


class Engine(Protocol):
    precision: str  # what /v2/models/{name} reports: int8 | fp32 | bf16 | keras
    path: Path  # the verified model file

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class TensorFlowEngine:
    """The run's frozen graph (INT8, FP32, FP32 under the BF16 rewrite) or Keras model, through medq.inference."""

    def __init__(self, info: RunInfo, model: str, *, intra_op_threads: int = 0, inter_op_threads: int = 1):
        if model == "bf16":
            _check_bf16()
        kind, self.path = model_location(info, model)  # verified: recorded, present, not stale, sha256 matches
        self.precision = model
        self._predictor = Predictor(info, kind, self.path, intra_op_threads=intra_op_threads,
                                    inter_op_threads=inter_op_threads, bf16_rewrite=model == "bf16")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._predictor(x, batch_size=max(1, len(x)))

    def close(self) -> None:
        self._predictor.close()


def open_engine(info: RunInfo, model: str, *, intra_op_threads: int = 0, inter_op_threads: int = 1) -> Engine:
    return TensorFlowEngine(info, model, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads)


def _check_bf16() -> None:
    from medq.hwinfo import cpu_features
    from medq.precision import describe_cpu, select_precisions

    features = cpu_features()
    _, skipped = select_precisions(["bf16"], features)
    if skipped:
        raise MedqError(f"--model bf16: {skipped['bf16']} ({describe_cpu(features)}); serve --model fp32 or int8")
