"""OpenVINO (CPU plugin) on an IR converted from the ONNX export (weights kept FP32), and on NNCF's post-training
INT8 quantization of it with the calibration images. INFERENCE_PRECISION_HINT is always set (f32 or bf16): the CPU
plugin's default on AMX hardware is bf16."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medq.engines import BuildRequest, EngineSpec, LoadRequest, Offer, Predict, Recipe, register


def load(request: LoadRequest) -> tuple[Predict, dict[str, Any]]:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": request.intra_op_threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": request.options.get("inference_precision", "f32")}
    compiled = core.compile_model(str(request.model), "CPU", config)
    infer = compiled.create_infer_request()
    output = compiled.output(0)

    def predict(batch: np.ndarray) -> np.ndarray:
        return infer.infer({0: batch})[output]

    facts = {"openvino": ov.__version__,
             "inference_precision": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
             "inference_num_threads": int(compiled.get_property("INFERENCE_NUM_THREADS"))}
    return predict, facts


def _type_name(value: Any) -> str:
    """OpenVINO element type → 'f32' / 'bf16'."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def _save(model, target: Path) -> None:
    import openvino as ov

    # Written under temporary names, then renamed (.bin first: an .xml is only ever beside its own weights).
    tmp_xml = target.with_name(f".{target.stem}.tmp.xml")
    ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
    tmp_xml.with_suffix(".bin").replace(target.with_suffix(".bin"))
    tmp_xml.replace(target)


def convert(request: BuildRequest, target: Path) -> None:
    import openvino as ov

    _save(ov.convert_model(str(request.source)), target)


def quantize(request: BuildRequest, target: Path) -> None:
    import nncf
    import openvino as ov

    calibration = request.calibration_images()
    model = ov.convert_model(str(request.source))
    dataset = nncf.Dataset([np.ascontiguousarray(calibration[i:i + 1]) for i in range(len(calibration))])
    _save(nncf.quantize(model, dataset, subset_size=len(calibration), preset=nncf.QuantizationPreset.PERFORMANCE),
          target)


F32, BF16 = {"inference_precision": "f32"}, {"inference_precision": "bf16"}
SPEC = register(EngineSpec(
    name="openvino", load=load, needs=("tf2onnx", "openvino"), version_keys=("openvino", "nncf", "tf2onnx"),
    offers=(Offer("fp32", "openvino-fp32", F32), Offer("bf16", "openvino-fp32", BF16, bf16=True),
            Offer("int8", "openvino-int8", F32, needs=("nncf",)),
            Offer("int8-bf16", "openvino-int8", BF16, needs=("nncf",), bf16=True)),
    recipes=(Recipe("openvino-fp32", "openvino_fp32.xml", "onnx-fp32", convert, companions=(".bin",)),
             Recipe("openvino-int8", "openvino_int8.xml", "onnx-fp32", quantize, calibrated=True,
                    companions=(".bin",))),
))
