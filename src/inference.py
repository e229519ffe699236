"""A run's model as a function of preprocessed images, shared by `medq predict` and `medq serve`.

The run's manifest supplies the class names, the task, the preprocessing and the tensor names (:func:`read_run`);
:func:`model_location` finds and verifies (sha256, not stale) the model file a ``--model`` choice names;
:class:`Predictor` runs it (frozen graph or Keras model); :func:`record` is the JSON answer for one image, decided at
the run's operating thresholds (medq.thresholds) unless a threshold overrides them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medq import runrecord
from medq.data.decode import low_range_advice
from medq.errors import MedqError
from medq.metrics import decisions, shown_probabilities
from medq.preprocess import PreprocessSpec
from medq.thresholds import FALLBACK, Thresholds

# --model choice → (manifest artifact key, the file's usual name, the stage that writes it)
MODELS = {
    "fp32": ("fp32_pb", "model_fp32.pb", "medq freeze"),
    "bf16": ("fp32_pb", "model_fp32.pb", "medq freeze"),  # the FP32 graph under oneDNN's BF16 rewrite
    "int8": ("int8_pb", "model_int8.pb", "medq quantize"),
    "keras": ("keras_model", "model.keras", "medq train"),
}
KERAS_SUFFIXES = {".keras", ".h5", ".hdf5"}


@dataclass(frozen=True)
class RunInfo:
    """What prediction needs from a run's manifest."""

    run_dir: Path
    classes: list[str]
    task: str
    spec: PreprocessSpec
    input_name: str = "input"
    output_name: str = "output"
    data_source: str | None = None  # 'synthetic phantoms (...)' or the real layout (manifest fact)
    thresholds: Thresholds | None = None  # the run's operating thresholds (None: FALLBACK for every class)

    def operating(self, threshold: float | Thresholds | None = None) -> Thresholds:
        """The thresholds predictions decide with: ``threshold`` (--threshold, serve.threshold: every class) when
        given, else the run's."""
        if isinstance(threshold, Thresholds):
            return threshold
        if threshold is not None:
            return Thresholds.uniform(self.task, self.classes, threshold, "override",
                                      f"a threshold of {threshold:g} overrides the run's thresholds")
        return self.thresholds or Thresholds.uniform(self.task, self.classes, FALLBACK, "fallback")


def read_run(run_dir: str | Path) -> RunInfo:
    """The run's classes, task, preprocessing and tensor names; one-line errors for anything missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MedqError(f"{run_dir}: no such run folder; pass --run output/<name> of a trained run "
                        "(`medq runs list` shows them)")
    manifest_path = run_dir / runrecord.MANIFEST
    if not manifest_path.is_file():
        raise MedqError(f"{run_dir}: not a medq run (no {runrecord.MANIFEST}); pass --run output/<name> of a "
                        "trained run (`medq runs list` shows them)")
    manifest = runrecord.read_manifest(run_dir)
    facts = manifest.facts
    missing = facts.missing("classes", "task", "preprocess")
    if missing:
        raise MedqError(f"{manifest_path}: no {', '.join(missing)} recorded; run `medq train` for this run first")
    try:
        spec = PreprocessSpec.from_dict(facts.preprocess)
    except (KeyError, TypeError, ValueError):
        raise MedqError(f"{manifest_path}: 'preprocess' must hold image_size, channels and normalization; "
                        "re-run `medq train` for this run") from None
    input_name, output_name = facts.tensor_names()
    classes, task = [str(c) for c in facts.classes], str(facts.task)
    return RunInfo(run_dir, classes, task, spec, str(input_name), str(output_name), facts.data_source,
                   Thresholds.from_manifest(manifest, task, classes))


def model_location(info: RunInfo, model: str = "fp32", model_file: str | Path | None = None) -> tuple[str, Path]:
    """('graph' | 'keras', path) for ``--model`` or ``--model-file``."""
    if model_file is not None:
        path = Path(model_file)
        if not path.exists():
            raise MedqError(f"{path}: model file not found; pass a .pb frozen graph or a .keras model")
        return ("keras" if path.suffix.lower() in KERAS_SUFFIXES or path.is_dir() else "graph"), path
    if model not in MODELS:
        raise MedqError(f"--model {model}: choose one of {', '.join(MODELS)}")
    key, usual, stage = MODELS[model]
    if runrecord.recorded_path(info.run_dir, key) is None:
        raise MedqError(f"{info.run_dir}: this run has no {model.upper() if model != 'keras' else 'Keras'} model "
                        f"({usual}); run `{stage}` for it first, or choose another --model")
    return ("keras" if model == "keras" else "graph"), runrecord.verified_path(info.run_dir, key, hint=stage)


class Predictor:
    """Probabilities [N, K] for preprocessed images [N, S, S, C] from a frozen graph or a Keras model."""

    def __init__(self, info: RunInfo, kind: str, path: Path, *, intra_op_threads: int = 0,
                 inter_op_threads: int = 1, trust_model_file: bool = False, bf16_rewrite: bool = False):
        self.kind, self.path, self.info = kind, Path(path), info
        self.keras_model = None
        self.graph = None
        if kind == "keras":
            from medq.models import load_keras_model

            self.keras_model = load_keras_model(path, trust_legacy=trust_model_file)
        else:
            from medq.graph import FrozenGraph

            self.graph = FrozenGraph(path, info.input_name, info.output_name, intra_op_threads=intra_op_threads,
                                     inter_op_threads=inter_op_threads, bf16_rewrite=bf16_rewrite)

    def __call__(self, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
        if self.graph is not None:
            probs = self.graph.predict(x, batch_size=batch_size)
        else:
            probs = np.concatenate([np.asarray(self.keras_model.predict_on_batch(x[i:i + batch_size]))
                                    for i in range(0, len(x), batch_size)])
        if probs.ndim != 2 or probs.shape[1] != len(self.info.classes):
            raise MedqError(f"{self.path}: the model gives {probs.shape[1:]} outputs per image but the run lists "
                            f"{len(self.info.classes)} classes; the model file does not belong to {self.info.run_dir}")
        return probs

    def close(self) -> None:
        if self.graph is not None:
            self.graph.close()


def pixel_warning(facts: dict[str, Any], spec: PreprocessSpec, shape: tuple[int, ...]) -> str | None:
    """What the answer for an image of ``shape`` (height, width) decoded with ``facts`` (medq.data.decode) must warn
    about though the file decoded (predict's and serve's answers alike): 16-bit values in the low bits only (a 10-14
    bit image, read near black as training read its images), or an image smaller than the model's input (a thumbnail
    or a crop, enlarged: the model answers on interpolated pixels)."""
    found = []
    if facts.get("low_range"):
        found.append(f"a 16-bit image with {low_range_advice(facts['max_value'])} in the run's config and retrain "
                     f"(predict reads pixels as the run's training did: data.bit_depth {spec.bit_depth})")
    height, width = shape
    if min(height, width) < spec.image_size:
        found.append(f"a {width}×{height}-pixel image, smaller than the model's {spec.image_size}×{spec.image_size} "
                     "input: enlarged to it, so the prediction rests on interpolated pixels; give the full-resolution "
                     "image, not a thumbnail or a crop")
    return "; ".join(found) or None


def utf8_safe(value: Any) -> Any:
    """``value`` (a record: dicts, lists, strings, numbers) with every string valid UTF-8 text: the bytes of a file
    name that are not UTF-8 (os.fsdecode keeps them as lone surrogates, ``\\udcXX``, which strict JSON parsers
    reject) shown as ``\\xNN``, so ``caf<0xE9>.png`` from a Latin-1 system reads ``caf\\xe9.png``."""
    if isinstance(value, dict):
        return {utf8_safe(k): utf8_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [utf8_safe(v) for v in value]
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        try:  # the file name's own bytes back, each one that is not UTF-8 escaped visibly
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate not from a file name: its code point, escaped
            return value.encode("utf-8", "backslashreplace").decode("utf-8")


def record(file: str | Path | None, probs: np.ndarray, info: RunInfo,
           threshold: float | Thresholds | None = None) -> dict[str, Any]:
    """The JSON object for one image (``file``: its path, or an upload's name, or None): its probabilities, the
    prediction at the operating thresholds (:func:`medq.metrics.decisions`; ``threshold`` None: the run's own) and
    the thresholds it was made at."""
    operating = info.operating(threshold)
    shown = shown_probabilities(probs)
    out: dict[str, Any] = {"file": None if file is None else str(file), "probabilities": dict(zip(info.classes, shown))}
    # decided on the probabilities the line shows: a reader (or the DICOM SR) applying the rule to them agrees
    called = decisions(info.task, np.array([shown]), operating.per_column())[0]
    if info.task == "multilabel":  # the findings at the thresholds, as both keys: one schema for every task
        out["findings"] = [c for c, yes in zip(info.classes, called) if yes]
        out["prediction"] = out["findings"]
    else:
        out["prediction"] = info.classes[int(called)]
    out["thresholds"] = dict(operating.values)
    return out
