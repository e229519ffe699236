"""What the server runs a batch on. An engine is anything with ``name``, ``precision``, ``path``, ``sha256``,
``__call__(x) -> probabilities`` and ``close()``: ``x`` is float32 ``[N, S, S, C]`` preprocessed by medq.preprocess,
the answer ``[N, n_classes]``.

``--engine tensorflow`` serves the run's own graphs (or Keras model) through medq.inference, as `medq predict` does.
Another engine (``onnxruntime``, ``openvino``) serves the model its :class:`medq.engines.EngineSpec` offers for the
precision, loaded by the spec's own loader (the function the benchmark worker times): a model a recipe builds is the
one `medq benchmark` built for this run, served only while it is current (built from the run's present artifact).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medq import artifacts, engines, runrecord
from medq.errors import MedqError
from medq.inference import MODELS, Predictor, RunInfo, model_location

class Engine(Protocol):
    name: str  # the engine: tensorflow | onnxruntime | openvino
    precision: str  # what /v2/models/{name} reports: int8 | fp32 | bf16 | keras | ...
    path: Path  # the verified model file
    sha256: str  # of ``path``
    facts: dict[str, Any]  # the engine's own (versions, providers, ...)

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


class TensorFlowEngine:
    """The run's frozen graph (INT8, FP32, FP32 under the BF16 rewrite) or Keras model, through medq.inference."""

    name = "tensorflow"

    def __init__(self, info: RunInfo, model: str, *, intra_op_threads: int = 0, inter_op_threads: int = 1):
        if model == "bf16":
            _check_bf16()
        kind, self.path = model_location(info, model)  # verified: recorded, present, not stale, sha256 matches
        self.precision = model
        self.sha256 = runrecord.load(info.run_dir).artifacts[MODELS[model][0]].sha256
        self.facts: dict[str, Any] = {}
        self._predictor = Predictor(info, kind, self.path, intra_op_threads=intra_op_threads,
                                    inter_op_threads=inter_op_threads, bf16_rewrite=model == "bf16")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._predictor(x, batch_size=max(1, len(x)))

    def close(self) -> None:
        self._predictor.close()


class SpecEngine:
    """The model an engine spec offers for ``precision``, loaded by the spec's loader."""

    def __init__(self, info: RunInfo, engine: str, precision: str, *, intra_op_threads: int = 0,
                 inter_op_threads: int = 1):
        spec = engines.get(engine)
        offer = spec.offer(precision)
        if offer is None:
            raise MedqError(f"--engine {engine} offers no {precision} model; choose --model "
                            f"{' or '.join(o.precision for o in spec.offers)}")
        if offer.bf16:
            _check_bf16()
        missing = [m for m in spec.needs_for(offer) if importlib.util.find_spec(m) is None]
        if missing:
            raise MedqError(f"--engine {engine} --model {precision}: {', '.join(missing)} not installed; {spec.install}")
        self.name, self.precision = engine, precision
        self.path = _model_file(info, spec, offer)
        self.sha256 = artifacts.sha256(self.path)
        self._predict, self.facts = engines.open_engine(engine, engines.LoadRequest(
            self.path, info.input_name, info.output_name, intra_op_threads, inter_op_threads, offer.options))
        if engines.is_recipe(offer.model):  # the files read beside it (an IR's weights .bin) and their sha256
            self.facts["companions"] = {p.name: artifacts.sha256(p) for s in engines.recipe(offer.model).companions
                                        if (p := self.path.with_suffix(s)).is_file()}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._predict(np.ascontiguousarray(x, dtype=np.float32))

    def close(self) -> None:
        self._predict = None


def _model_file(info: RunInfo, spec: engines.EngineSpec, offer: engines.Offer) -> Path:
    """The offer's model: a run artifact, verified; or the file `medq benchmark` built by its recipe, if current."""
    root = engines.root_artifact(offer.model)
    source = runrecord.verified_path(info.run_dir, root)  # recorded, present, not stale, sha256 matches
    if not engines.is_recipe(offer.model):
        return source
    path, why = engines.built_model(info.run_dir, offer.model, runrecord.load(info.run_dir).artifacts[root].sha256)
    if path is None:
        run = Path(info.run_dir)
        raise MedqError(f"{why}; build it with `medq benchmark --set run.output_dir={run.parent} --run-name "
                        f"{run.name} --set benchmark.reference=[{spec.row_id(offer.precision)}]`")
    return path


def open_engine(info: RunInfo, model: str, *, engine: str = "tensorflow", intra_op_threads: int = 0,
                inter_op_threads: int = 1) -> Engine:
    if engine == "tensorflow":
        return TensorFlowEngine(info, model, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads)
    try:
        engines.get(engine)
    except KeyError as exc:
        raise MedqError(f"--engine {engine}: {exc.args[0]}") from None
    return SpecEngine(info, engine, model, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads)


def _check_bf16() -> None:
    from medq.hwinfo import cpu_features
    from medq.precision import describe_cpu, select_precisions

    features = cpu_features()
    _, skipped = select_precisions(["bf16"], features)
    if skipped:
        raise MedqError(f"--model bf16: {skipped['bf16']} ({describe_cpu(features)}); serve --model fp32 or int8")
