"""Reference models for the optional comparison rows, made from the run's frozen FP32 graph:

- ``onnx-fp32``: tf2onnx export (NHWC input, like the frozen graph);
- ``onnx-int8``: onnxruntime static quantization (QDQ, per-channel weights, MinMax) with the calibration images;
- ``openvino-fp32``: OpenVINO IR converted from the ONNX model (weights kept FP32);
- ``openvino-int8``: NNCF post-training quantization of that IR with the same calibration images.

They are built in a worker process (``kind: prepare``) and cached in ``<run>/benchmark/reference/``: a model is
rebuilt only when the file it is made from (or the calibration set) changed.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medq import artifacts
from medq.errors import first_line

FILES = {"onnx-fp32": "model_fp32.onnx", "onnx-int8": "model_int8.onnx", "openvino-fp32": "openvino_fp32.xml",
         "openvino-int8": "openvino_int8.xml"}
SOURCE = {"onnx-fp32": "fp32_pb", "onnx-int8": "onnx-fp32", "openvino-fp32": "onnx-fp32", "openvino-int8": "onnx-fp32"}
NEEDS_CALIBRATION = {"onnx-int8", "openvino-int8"}
CACHE = "cache.json"
ORT_CALIBRATION_BATCH = 10


def model_bytes(path: Path) -> int:
    """Size on disk; an OpenVINO IR is its .xml plus its .bin."""
    path = Path(path)
    total = path.stat().st_size
    if path.suffix == ".xml" and path.with_suffix(".bin").is_file():
        total += path.with_suffix(".bin").stat().st_size
    return total


def needed(models: set[str]) -> list[str]:
    """The models to build, sources first."""
    out: set[str] = set()
    for name in models:
        out.add(name)
        if SOURCE[name] in FILES:
            out.add(SOURCE[name])
    return [name for name in FILES if name in out]


def cache_key(name: str, fp32_sha: str, calibration_sha: str | None, opset: int) -> str:
    key = f"{fp32_sha}|opset{opset}"
    return key + (f"|calib:{calibration_sha}" if name in NEEDS_CALIBRATION else "")


def _calibration_batches(job: dict[str, Any]) -> np.ndarray:
    return np.load(job["calibration"], mmap_mode="r")


def export_onnx(job: dict[str, Any], target: Path) -> None:
    from medq.onnxio import graph_def_to_onnx
    from medq.graph import read_graph_def

    model = graph_def_to_onnx(read_graph_def(job["fp32_pb"]), job["opset"], job["fp32_pb"], job["input_name"],
                              job["output_name"])
    artifacts.write_bytes(target, model.SerializeToString())


def quantize_onnx(job: dict[str, Any], target: Path) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quant_pre_process, quantize_static)

    source = Path(job["models"]["onnx-fp32"])
    calibration = _calibration_batches(job)

    class Reader(CalibrationDataReader):
        """Batches of the calibration images (MinMax ranges do not depend on the batching)."""

        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= len(calibration):
                return None
            self.i += ORT_CALIBRATION_BATCH
            return {job["input_name"]: np.ascontiguousarray(calibration[self.i - ORT_CALIBRATION_BATCH:self.i])}

        def rewind(self):
            self.i = 0

    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=target.parent) as work:
        pre = Path(work) / "pre.onnx"
        try:  # shape inference + graph optimisation (Conv+BN folding) so quantization sees the fused graph
            quant_pre_process(str(source), str(pre))
            quant_input = pre
        except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the exported graph instead
            quant_input = source
        with artifacts.atomic_path(target) as tmp:
            quantize_static(str(quant_input), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)


def _save_openvino(model, target: Path) -> None:
    import openvino as ov

    # Written under temporary names, then renamed (.bin first: an .xml is only ever beside its own weights).
    tmp_xml = target.with_name(f".{target.stem}.tmp.xml")
    ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
    tmp_xml.with_suffix(".bin").replace(target.with_suffix(".bin"))
    tmp_xml.replace(target)


def convert_openvino(job: dict[str, Any], target: Path) -> None:
    import openvino as ov

    _save_openvino(ov.convert_model(job["models"]["onnx-fp32"]), target)


def quantize_openvino(job: dict[str, Any], target: Path) -> None:
    import nncf
    import openvino as ov

    calibration = _calibration_batches(job)
    model = ov.convert_model(job["models"]["onnx-fp32"])
    dataset = nncf.Dataset([np.ascontiguousarray(calibration[i:i + 1]) for i in range(len(calibration))])
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration),
                              preset=nncf.QuantizationPreset.PERFORMANCE)
    _save_openvino(quantized, target)


BUILDERS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "onnx-fp32": export_onnx, "onnx-int8": quantize_onnx, "openvino-fp32": convert_openvino,
    "openvino-int8": quantize_openvino,
}


def prepare(job: dict[str, Any]) -> dict[str, Any]:
    """Build ``job['build']`` (names of FILES, in order) into ``job['models']`` paths; one failure does not stop the
    others that do not depend on it. Returns {name: {ok, seconds, error?}}."""
    out: dict[str, Any] = {}
    for name in job["build"]:
        source = SOURCE[name]
        if source in out and not out[source]["ok"]:
            out[name] = {"ok": False, "error": f"needs {source}, which failed"}
            continue
        start = time.perf_counter()
        try:
            BUILDERS[name](job, Path(job["models"][name]))
            out[name] = {"ok": True, "seconds": round(time.perf_counter() - start, 2)}
        except Exception as exc:  # noqa: BLE001 - recorded as the reason the row is skipped
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {first_line(exc)}"}
    return out
