"""A run served as one model: its manifest facts, its verified engine, and the images-in path.

Loading (:func:`load_model`) refuses a model file whose sha256 differs from the manifest's or that is stale (the rule
every stage applies, through runrecord.verified_path), then runs a warm-up batch of every size up to the largest
batch; only then is the model ready.
Images sent to ``/v1/models/{name}/predict`` are decoded and preprocessed by the same functions as `medq predict`
(medq.data.decode.load_pixels, DICOM display pipeline included, and medq.preprocess.preprocess).
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medq.data.decode import UnreadableImage, check_header, decode_pixels
from medq.errors import MedqError
from medq.inference import MODELS, RunInfo, pixel_warning, read_run, record, utf8_safe
from medq.preprocess import normalization_affine, preprocess
from medq.serve.engines import Engine, open_engine
from medq.serve.protocol import TensorSpec
from medq.thresholds import DECISION_RULES

log = logging.getLogger("medq")

# The warm-up runs one batch of every size 1..max_batch_size (see load_model): N (N + 1) / 2 images, quadratic, so the
# largest batch is bounded rather than the warm-up thinned out (a size left cold would stall the first batch of it
# while oneDNN builds its kernels). 128 is 8,256 warm-up images, about 2 minutes for DenseNet121 INT8 at 224² on
# 2 cores; CPU throughput has long stopped growing by then (the benchmark's batch sweep shows where).
MAX_BATCH_SIZE = 128


def warmup_images(max_batch_size: int) -> int:
    """Images the warm-up runs before the model is ready: one batch of each size 1..max_batch_size."""
    return max_batch_size * (max_batch_size + 1) // 2


@dataclass
class ServedModel:
    name: str  # the run's name
    info: RunInfo
    engine: Engine
    version: str  # the served model file's sha256, first 12 hex digits
    threshold: float | None  # None: the run's own, as `medq predict` without --threshold
    max_megapixels: float
    ready: bool = False
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def input(self) -> TensorSpec:
        scale, offset = normalization_affine(self.info.spec)  # input = 8-bit pixel * scale + offset
        bounds = (tuple(map(float, offset)), tuple(map(float, 255 * scale + offset)))
        return TensorSpec(self.info.input_name, self.info.spec.input_shape,
                          raw_pixels=self.info.spec.normalization == "raw", bounds=bounds)

    @property
    def output(self) -> TensorSpec:
        return TensorSpec(self.info.output_name, (len(self.info.classes),))

    def metadata(self) -> dict[str, Any]:
        """The v2 model metadata, with medq's facts under ``parameters``."""
        return {"name": self.name, "versions": [self.version], "platform": self.platform,
                "inputs": [self.input.describe()], "outputs": [self.output.describe()],
                "parameters": {"classes": self.info.classes, "task": self.info.task,
                               "preprocessing": self.info.spec.to_dict(),
                               # per channel, the values preprocessing gives (pixel 0, 255); others are refused
                               "input_range": {"min": list(self.input.bounds[0]), "max": list(self.input.bounds[1])},
                               # the decision rule and the thresholds every answer is decided at (medq.thresholds)
                               "decision": DECISION_RULES[self.info.task],
                               "thresholds": dict(self.info.operating(self.threshold).values),
                               "thresholds_source": self.info.operating(self.threshold).source,
                               "threshold": self.threshold,  # serve.threshold: None answers at the run's own
                               "engine": self.engine.name,
                               "precision": self.engine.precision,
                               "data_source": self.info.data_source, **self.facts}}

    @property
    def platform(self) -> str:
        """KServe's platform names."""
        if self.engine.name == "tensorflow":
            return "keras" if self.engine.precision == "keras" else "tensorflow_graphdef"
        return {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino_ir"}.get(self.engine.name, self.engine.name)

    def image_input(self, data: bytes) -> tuple[np.ndarray, str | None]:
        """([S, S, C], the warning `medq predict` gives for it or None) for one PNG / JPEG / DICOM file's bytes,
        exactly as `medq predict` computes them (medq.data.decode.decode_pixels with the run's bit depth, DICOM
        display pipeline, medq.preprocess.preprocess, medq.inference.pixel_warning).

        The bytes go to a private temporary file (no client-supplied name or path is used) so that the very decoder
        reads them: content sniffing, libjpeg's corruption check. ``data.max_megapixels`` is checked from the header
        before any pixel is decoded (decompression bombs): PNG and JPEG from their size fields, DICOM from Rows ×
        Columns. A file the decoder fails on in another way is unreadable too, as `medq predict` reports it."""
        fd, name = tempfile.mkstemp(prefix="medq-serve-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            problem = check_header(name, self.max_megapixels)
            if problem:
                raise UnreadableImage(problem)
            image, facts = decode_pixels(name, self.max_megapixels, bit_depth=self.info.spec.bit_depth)
            return preprocess(image, self.info.spec), pixel_warning(facts, self.info.spec, image.shape[:2])
        except UnreadableImage as exc:
            text = str(exc)
            raise UnreadableImage(text[len(name) + 2:] if text.startswith(f"{name}: ") else text) from None
        except Exception as exc:  # noqa: BLE001 - a codec's own error: the file's fault, as predict reports it
            raise UnreadableImage(f"cannot be read ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).replace(name, 'the file').split())[:160]})") from None
        finally:
            os.unlink(name)

    def answer(self, probabilities: np.ndarray, file: str | None, warning: str | None = None) -> dict[str, Any]:
        """The `medq predict` line for one image."""
        line = utf8_safe(record(file, probabilities, self.info, self.threshold))
        if warning:
            line["warning"] = warning
        return line


def load_model(run_dir: str | Path, model: str, *, threshold: float | None, max_megapixels: float, warmup_batch: int = 1,
               intra_op_threads: int = 0, inter_op_threads: int = 1, engine_name: str = "tensorflow") -> ServedModel:
    """The run's model in ``engine_name``, verified, loaded and warmed up (ready)."""
    info = read_run(run_dir)
    for note in info.operating(threshold).notes:  # a run without thresholds is served at 0.5: said, never silent
        log.warning("serve %s: thresholds: %s", Path(run_dir).name, note)
    if engine_name == "tensorflow" and model not in MODELS:
        raise MedqError(f"--model {model}: choose one of {', '.join(MODELS)}")
    engine = open_engine(info, model, engine=engine_name, intra_op_threads=intra_op_threads,
                         inter_op_threads=inter_op_threads)
    served = ServedModel(Path(run_dir).name, info, engine, engine.sha256[:12], threshold, max_megapixels,
                         facts={"artifact": engine.path.name, "sha256": engine.sha256,
                                "threads": {"intra_op": intra_op_threads, "inter_op": inter_op_threads},
                                **({"engine_facts": engine.facts} if engine.facts else {})})
    # one warm-up batch of every size the batcher may form: oneDNN builds its kernels per input shape, and a size
    # first seen under load would stall its batch while they are built (DenseNet121 INT8 at 224², 2 cores: 20-40 ms
    # more per new size; warming sizes 1..32 takes about 8 s before the server is ready)
    log.info("serve: %s: warming up: %d images in batches of every size 1..%d", served.name,
             warmup_images(warmup_batch), warmup_batch)
    warm = np.zeros((warmup_batch, *served.input.shape), np.float32)
    try:
        for size in range(1, warmup_batch):
            engine(warm[:size])
        out = engine(warm)
    except Exception:
        engine.close()
        raise
    if out.shape != (warmup_batch, len(info.classes)) or not np.isfinite(out).all():
        engine.close()
        raise MedqError(f"{engine.path}: the warm-up batch gave {out.shape} outputs (finite: "
                        f"{bool(np.isfinite(out).all())}) for {len(info.classes)} classes; the model file does not "
                        f"belong to {info.run_dir}")
    served.ready = True
    log.info("serve: %s ready: %s %s model %s (sha256 %s), input %s, classes %s", served.name, engine.name, model,
             engine.path, served.version, list(served.input.shape), info.classes)
    return served
