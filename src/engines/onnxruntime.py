"""ONNX Runtime (CPU execution provider) on the run's FP32 graph exported with tf2onnx, and on its static INT8
quantization (QDQ, per-channel weights, MinMax ranges from the calibration images). The ONNX export is also what
the OpenVINO models are converted from."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medq import artifacts
from medq.engines import BuildRequest, EngineSpec, LoadRequest, Offer, Predict, Recipe, register

ORT_CALIBRATION_BATCH = 10


def load(request: LoadRequest) -> tuple[Predict, dict[str, Any]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = request.intra_op_threads
    options.inter_op_num_threads = request.inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(request.model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch})[0]

    return predict, {"onnxruntime": ort.__version__, "providers": session.get_providers()}


def export_onnx(request: BuildRequest, target: Path) -> None:
    """tf2onnx export of a frozen graph (NHWC input, like the graph)."""
    from medq.graph import read_graph_def
    from medq.onnxio import graph_def_to_onnx

    model = graph_def_to_onnx(read_graph_def(request.source), request.opset, request.source, request.input_name,
                              request.output_name)
    artifacts.write_bytes(target, model.SerializeToString())


def quantize_onnx(request: BuildRequest, target: Path) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    calibration = request.calibration_images()

    class Reader(CalibrationDataReader):
        """Batches of the calibration images (MinMax ranges do not depend on the batching)."""

        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(calibration):
                return None
            self.i += ORT_CALIBRATION_BATCH
            return {request.input_name: np.ascontiguousarray(calibration[self.i - ORT_CALIBRATION_BATCH:self.i])}

        def rewind(self):
            self.i = 0

    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=target.parent) as work:
        pre = Path(work) / "pre.onnx"
        try:  # shape inference + graph optimisation (Conv+BN folding) so quantization sees the fused graph
            quant_pre_process(str(request.source), str(pre))
            quant_input = pre
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the exported graph instead
            quant_input = request.source
        with artifacts.atomic_path(target) as tmp:
            quantize_static(str(quant_input), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)


SPEC = register(EngineSpec(
    name="onnxruntime", load=load, needs=("tf2onnx", "onnxruntime"), version_keys=("onnxruntime", "tf2onnx"),
    offers=(Offer("fp32", "onnx-fp32"), Offer("int8", "onnx-int8")),
    recipes=(Recipe("onnx-fp32", "model_fp32.onnx", "fp32_pb", export_onnx),
             Recipe("onnx-int8", "model_int8.onnx", "onnx-fp32", quantize_onnx, calibrated=True)),
))
