"""TensorFlow (intel-tensorflow, oneDNN): the run's own frozen graphs, FP32 and INC's INT8, each also under oneDNN's
BF16 auto-mixed-precision rewrite. The baseline every other row is compared with."""
from __future__ import annotations

from typing import Any

from medq.engines import EngineSpec, LoadRequest, Offer, Predict, register


def load(request: LoadRequest) -> tuple[Predict, dict[str, Any]]:
    from medq.graph import FrozenGraph

    bf16 = bool(request.options.get("bf16_rewrite"))
    graph = FrozenGraph(request.model, request.input_name, request.output_name,
                        intra_op_threads=request.intra_op_threads, inter_op_threads=request.inter_op_threads,
                        bf16_rewrite=bf16)
    import tensorflow as tf

    return graph.run, {"bf16_rewrite": bf16, "tensorflow": tf.__version__, "onednn": _onednn_enabled()}


def _onednn_enabled() -> bool | None:
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # noqa: BLE001 - a private TF module; the fact is optional
        return None


SPEC = register(EngineSpec(
    name="tensorflow", reference=False, load=load, version_keys=("intel-tensorflow",),
    offers=(Offer("fp32", "fp32_pb", {"bf16_rewrite": False}),
            Offer("bf16", "fp32_pb", {"bf16_rewrite": True}, bf16=True),
            Offer("int8", "int8_pb", {"bf16_rewrite": False}),
            Offer("int8-bf16", "int8_pb", {"bf16_rewrite": True}, bf16=True)),
))
