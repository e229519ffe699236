"""The engines a worker process runs: each turns a job into ``predict(batch) -> probabilities`` plus the facts worth
recording (thread settings the engine reports, the precision it really runs). Imported only inside workers, so a
measuring process holds exactly one inference runtime."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]


def load_tensorflow(job: dict[str, Any]) -> tuple[Predict, dict[str, Any]]:
    from medq.graph import FrozenGraph

    graph = FrozenGraph(job["model"], job["input_name"], job["output_name"], intra_op_threads=job["intra_op_threads"],
                        inter_op_threads=job["inter_op_threads"], bf16_rewrite=bool(job.get("bf16_rewrite")))
    import tensorflow as tf

    facts = {"bf16_rewrite": bool(job.get("bf16_rewrite")), "tensorflow": tf.__version__,
             "onednn": _onednn_enabled()}
    return graph.run, facts


def _onednn_enabled() -> bool | None:
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # noqa: BLE001 - a private TF module; the fact is optional
        return None


def load_onnxruntime(job: dict[str, Any]) -> tuple[Predict, dict[str, Any]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = job["intra_op_threads"]
    options.inter_op_num_threads = job["inter_op_threads"]
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(job["model"], options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {name: batch})[0]

    return predict, {"onnxruntime": ort.__version__, "providers": session.get_providers()}


def load_openvino(job: dict[str, Any]) -> tuple[Predict, dict[str, Any]]:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": job["intra_op_threads"], "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": job.get("inference_precision", "f32")}
    compiled = core.compile_model(job["model"], "CPU", config)
    request = compiled.create_infer_request()
    output = compiled.output(0)

    def predict(batch: np.ndarray) -> np.ndarray:
        return request.infer({0: batch})[output]

    facts = {"openvino": ov.__version__,
             "inference_precision": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
             "inference_num_threads": int(compiled.get_property("INFERENCE_NUM_THREADS"))}
    return predict, facts


def _type_name(value: Any) -> str:
    """OpenVINO element type → 'f32' / 'bf16'."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


LOADERS = {"tensorflow": load_tensorflow, "onnxruntime": load_onnxruntime, "openvino": load_openvino}


def load_engine(job: dict[str, Any]) -> tuple[Predict, dict[str, Any]]:
    """``predict`` returns a float32 array the engine no longer owns (safe to keep across calls)."""
    run, facts = LOADERS[job["engine"]](job)

    def predict(batch: np.ndarray) -> np.ndarray:
        return np.array(run(batch), dtype=np.float32, copy=True)

    return predict, facts
