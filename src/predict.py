"""`medq predict`: class probabilities for image files (PNG, JPEG, DICOM) from a run's FP32 or INT8 frozen graph or
its Keras model, optionally averaged over ten crops, optionally with Grad-CAM heatmaps.

The run's manifest supplies the class names, the task and the preprocessing. Every image goes through the same
decode → preprocess functions as training, calibration and the benchmark (medq.data.decode.decode_pixels with the
run's bit depth, medq.preprocess.preprocess), so a file gets the probabilities the evaluation computed for it.

Output: one JSON object per input file, in input order —
``{"file", "probabilities": {class: p}, "prediction": class, "thresholds": {class: t}}`` (binary/multiclass),
``{"file", "probabilities": {label: p}, "findings": [labels with p >= t], "prediction": findings, "thresholds"}``
(multilabel). Decisions are taken at the run's operating thresholds (medq.thresholds: chosen on validation by
train; the same for every model of the run, so INT8 keeps FP32's operating point), or at ``--threshold``:
binary, the positive class iff p >= t; multiclass, arg-max(p − t); multi-label, each label iff p >= t.
``{"file", "error"}`` for a file that cannot be decoded (it is skipped, counted, and the rest are predicted); each
real file once, however often it is given (:func:`distinct_inputs`). Exit code: 0 when at least one image was
predicted, 1 when none was (a refusal before any work is the CLI's 2).
A prediction may carry ``"warning"``: a 16-bit image that uses only the low bits of its range (12-bit values in a
16-bit PNG without sBIT), read with the run's ``data.bit_depth`` as training read its images; an image smaller
than the model's input on either side (enlarged to it: a thumbnail or a crop, not the radiograph).
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

import numpy as np

from medq import artifacts, runrecord
from medq.data.common import UNREAD_IMAGE_SUFFIXES, is_junk, walk
from medq.data.decode import IMAGE_SUFFIXES, UnreadableImage, decode_pixels, is_dicom
from medq.errors import MedqError
from medq.inference import Predictor, RunInfo, model_location, pixel_warning, read_run, record, utf8_safe
from medq.metrics import decisions
from medq.preprocess import PreprocessSpec, preprocess
from medq.progress import progress
from medq.thresholds import Thresholds
from medq.tta import ten_crops

log = logging.getLogger("medq")

# --- inputs -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageInput:
    path: Path
    root: Path | None = None  # the folder argument it was found under (heatmap names keep the sub-folders)


def collect_inputs(arguments: Sequence[str | Path]) -> tuple[list[ImageInput], int]:
    """Files as given (whatever their name: content decides) and image files under folders (recursive, sorted;
    symbolic links followed, each real folder once). Image formats medq does not decode (TIFF, BMP, ...) are inputs
    too, so they are reported unreadable with the decoder's reason, as `medq data check` reports them.

    Returns (inputs, number of non-image files ignored in folders).
    """
    found: list[ImageInput] = []
    ignored = 0
    for argument in arguments:
        path = Path(argument)
        if not path.is_dir():
            found.append(ImageInput(path))
            continue
        for kind, file in walk(path, skip=lambda p: p.name.startswith(".") or is_junk(p)):
            if kind in ("broken link", "special"):
                found.append(ImageInput(file, path))  # reported: a broken link, or not a regular file (a pipe)
            elif kind == "file":
                suffix = file.suffix.lower()
                if suffix in IMAGE_SUFFIXES | UNREAD_IMAGE_SUFFIXES or (not suffix and is_dicom(file)):
                    found.append(ImageInput(file, path))
                else:
                    ignored += 1
    return found, ignored


def distinct_inputs(items: list[ImageInput]) -> tuple[list[ImageInput], int]:
    """Each real file once, at its first mention: a path given twice, spelled two ways (``./a.png``, ``a.png``, a
    symbolic link) or given and found in a folder argument too, is one image — one line, one heatmap, one SR, as
    the dataset readers count it. Returns (inputs, how many repeats were left out)."""
    seen: set[str] = set()
    kept = []
    for item in items:
        real = os.path.realpath(item.path)
        if real not in seen:
            seen.add(real)
            kept.append(item)
    return kept, len(items) - len(kept)


def _error_text(path: Path, exc: Exception) -> str:
    text = str(exc)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


# --- heatmaps ---------------------------------------------------------------------------------------------------

def heatmap_target(directory: Path, item: ImageInput, class_name: str, used: set[Path]) -> Path:
    """``<dir>/<sub-folders>/<stem>_<CLASS>.png``; a name already ``used`` in this run gets ``-2``, ``-3``..."""
    rel_parent = Path()
    if item.root is not None:
        rel_parent = item.path.parent.relative_to(item.root)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", class_name)
    base = directory / rel_parent / f"{item.path.stem}_{safe}"
    path, n = base.with_name(base.name + ".png"), 2
    while path in used:
        path, n = base.with_name(f"{base.name}-{n}.png"), n + 1
    used.add(path)
    return path


def check_outputs(items: list[ImageInput], classes: list[str], output: str | Path | None,
                  heatmap_dir: str | Path | None, overwrite: bool) -> None:
    """Refuse, before any work, outputs that cannot be written or would replace files this run did not write."""
    if output is not None:
        out = Path(output)
        if out.is_dir():
            raise MedqError(f"{out}: is a folder; -o takes a file name, e.g. -o {out / 'predictions.jsonl'}")
        refuse_under_a_file(out, "-o")
    if heatmap_dir is None:
        return
    directory = Path(heatmap_dir)
    if directory.exists() and not directory.is_dir():
        raise MedqError(f"{directory}: is a file; --heatmap takes a folder (created if missing), e.g. "
                        f"--heatmap {directory.with_suffix('')}_heatmaps")
    refuse_under_a_file(directory, "--heatmap")
    if overwrite or not directory.is_dir():
        return
    used: set[Path] = set()
    existing = [t for item in items for c in classes if (t := heatmap_target(directory, item, c, used)).exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise MedqError(f"{existing[0]}: already exists{more}; medq does not replace files it did not write in this "
                        "run — pass --overwrite, or choose an empty --heatmap folder")


def refuse_under_a_file(path: Path, option: str) -> None:
    """An output whose nearest existing parent is a file could only fail once images are predicted (an SR or
    heatmap half written, the model loaded for nothing): refused before any work, one line."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise MedqError(f"{parent}: is a file, so {option} {path} cannot be created under it; name a path "
                                "under a folder")
            return


@dataclass
class HeatmapWriter:
    """Grad-CAM overlays from the run's Keras model: ``<dir>/<sub-folders>/<stem>_<CLASS>.png``, original size."""

    directory: Path
    model: Any
    info: RunInfo
    classes: str = "all"  # 'all' | 'predicted'
    layer: str | None = None
    threshold: "float | Thresholds | None" = None  # None: the run's
    _used: set[Path] = field(default_factory=set)

    def __post_init__(self):
        from medq.heatmap import GradCAM

        self.cam = GradCAM(self.model, self.layer)

    def chosen(self, probs: np.ndarray) -> list[int]:
        if self.classes == "all":
            return list(range(len(self.info.classes)))
        called = decisions(self.info.task, np.asarray(probs)[None], self.info.operating(self.threshold).per_column())[0]
        if self.info.task == "multilabel":
            return [k for k, yes in enumerate(called) if yes]
        return [int(called)]

    def target(self, item: ImageInput, class_name: str) -> Path:
        return heatmap_target(self.directory, item, class_name, self._used)

    def write(self, items: list[ImageInput], images: list[np.ndarray], x: np.ndarray,
              probs: np.ndarray) -> list[dict[str, str]]:
        """One overlay per image and chosen class; returns {class: png path} per image."""
        from medq.heatmap import write_overlay

        wanted = [self.chosen(p) for p in probs]
        union = sorted({k for ks in wanted for k in ks})
        maps = self.cam.cams(x, union) if union else None
        out = []
        for i, (item, image) in enumerate(zip(items, images)):
            written = {}
            for k in wanted[i]:
                name = self.info.classes[k]
                written[name] = str(write_overlay(self.target(item, name), image, maps[i, union.index(k)]))
            out.append(written)
        return out


# --- the loop ---------------------------------------------------------------------------------------------------

def _load_one(item: ImageInput, spec: PreprocessSpec, ten_crop: bool, keep_image: bool):
    """(model input [S,S,C] or [10,S,S,C], decoded image or None, error text or None, warning or None)."""
    try:
        image, facts = decode_pixels(item.path, bit_depth=spec.bit_depth)
        x = ten_crops(image, spec) if ten_crop else preprocess(image, spec)
        return x, (image if keep_image else None), None, pixel_warning(facts, spec, image.shape[:2])
    except UnreadableImage as exc:
        return None, None, _error_text(item.path, exc), None
    except Exception as exc:  # noqa: BLE001 - one odd file (a codec error, say) must not cost the others
        return None, None, f"cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})", None


def iter_predictions(predictor: Predictor, inputs: list[ImageInput], *, batch_size: int = 32,
                     ten_crop: bool = False, threshold: "float | Thresholds | None" = None,
                     heatmaps: HeatmapWriter | None = None, quiet: bool = False,
                     workers: int | None = None) -> Iterator[dict[str, Any]]:
    """One JSON-ready dict per input, in input order; files are decoded in a thread pool, batch by batch."""
    info = predictor.info
    operating = info.operating(threshold)
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            progress(total=len(inputs), desc="predict", unit="img", quiet=quiet) as bar:
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start:start + batch_size]
            loaded = list(pool.map(lambda item: _load_one(item, info.spec, ten_crop, heatmaps is not None), chunk))
            good = [i for i, (x, _, error, _) in enumerate(loaded) if error is None]
            results: dict[int, dict[str, Any]] = {}
            if good:
                x = np.stack([loaded[i][0] for i in good])
                if ten_crop:  # [B, 10, S, S, C] → mean over the ten crops of each image
                    probs = predictor(x.reshape(-1, *x.shape[2:]), batch_size).reshape(len(good), 10, -1).mean(1)
                else:
                    probs = predictor(x, batch_size)
                for j, i in enumerate(good):
                    results[i] = record(chunk[i].path, probs[j], info, operating)
                    if loaded[i][3]:
                        results[i]["warning"] = loaded[i][3]
                if heatmaps is not None:
                    plain = x if not ten_crop else np.stack([preprocess(loaded[i][1], info.spec) for i in good])
                    maps = heatmaps.write([chunk[i] for i in good], [loaded[i][1] for i in good], plain, probs)
                    for j, i in enumerate(good):
                        results[i]["heatmaps"] = maps[j]
            for i, item in enumerate(chunk):
                yield results.get(i) or {"file": str(item.path), "error": loaded[i][2]}
            bar.update(len(chunk))


@dataclass
class PredictSummary:
    predicted: int = 0
    errors: int = 0
    ignored: int = 0
    repeated: int = 0  # inputs naming a file already given (distinct_inputs): predicted once
    first_error: str | None = None
    warnings: int = 0
    first_warning: str | None = None
    model: str = ""
    data_source: str | None = None  # what the run's model was trained on
    output: Path | None = None
    heatmap_dir: Path | None = None
    dicom_sr_dir: Path | None = None
    dicom_sr: int = 0  # SR files written
    dicom_sr_errors: int = 0
    first_dicom_sr_error: str | None = None

    @property
    def exit_code(self) -> int:
        """0 when at least one image was predicted (unreadable files are reported, not fatal), else 1."""
        return 0 if self.predicted else 1

    def line(self) -> str:
        text = f"{self.predicted} image{'s' if self.predicted != 1 else ''} predicted with {self.model}"
        if self.data_source:
            text += f" (trained on {self.data_source})"
        if self.errors:
            text += f"; {self.errors} unreadable file{'s' if self.errors != 1 else ''} skipped " \
                    f"(first: {self.first_error})"
        if self.warnings:
            text += f"; {self.warnings} with a warning (first: {self.first_warning})"
        if self.ignored:
            text += f"; {self.ignored} non-image file{'s' if self.ignored != 1 else ''} in the folders ignored"
        if self.repeated:
            text += f"; {self.repeated} input{'s' if self.repeated != 1 else ''} naming a file already given " \
                    "(predicted once)"
        if self.output is not None:
            text += f" → {self.output}"
        if self.heatmap_dir is not None:
            text += f"; heatmaps in {self.heatmap_dir}"
        if self.dicom_sr_dir is not None:
            text += f"; {self.dicom_sr} DICOM SR file{'s' if self.dicom_sr != 1 else ''} in {self.dicom_sr_dir}"
            if self.dicom_sr_errors:
                text += f" ({self.dicom_sr_errors} could not be built; first: {self.first_dicom_sr_error})"
        return text


def run_predict(run_dir: str | Path, inputs: Sequence[str | Path], *, model: str = "fp32",
                model_file: str | Path | None = None, output: str | Path | None = None, ten_crop: bool = False,
                heatmap_dir: str | Path | None = None, heatmap_classes: str = "all", heatmap_layer: str | None = None,
                batch_size: int = 32, threshold: float | None = None, quiet: bool = False,
                intra_op_threads: int = 0, inter_op_threads: int = 1, stdout: TextIO | None = None,
                trust_model_file: bool = False, overwrite: bool = False,
                dicom_sr_dir: str | Path | None = None) -> PredictSummary:
    """Predict every input; JSON lines to ``output`` (written atomically) or ``stdout``; with ``dicom_sr_dir`` a
    DICOM Comprehensive SR per DICOM input there (medq.dicomsr). Decisions are taken at the run's operating
    thresholds (the same for every ``model``: a quantized model keeps FP32's operating point), or at ``threshold``
    for every class when given."""
    if batch_size <= 0:
        raise MedqError(f"--batch-size {batch_size}: must be greater than 0")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise MedqError(f"--threshold {threshold}: must be between 0 and 1")
    info = read_run(run_dir)
    operating = info.operating(threshold)
    items, ignored = collect_inputs(inputs)
    items, repeated = distinct_inputs(items)
    if not items:
        raise MedqError(f"{', '.join(map(str, inputs))}: no PNG, JPEG or DICOM files found; pass image files or "
                        "folders holding them")
    check_outputs(items, info.classes, output, heatmap_dir, overwrite)
    sr_targets = plan_dicom_sr(items, dicom_sr_dir, overwrite)
    kind, path = model_location(info, model, model_file)
    keras_path = path if kind == "keras" else None
    if heatmap_dir is not None and keras_path is None:  # Grad-CAM needs gradients: the run's Keras model
        if runrecord.recorded_path(info.run_dir, "keras_model") is None:
            raise MedqError(f"{info.run_dir}: --heatmap needs the run's Keras model (Grad-CAM takes gradients, a "
                            "frozen graph has none) and this run has no model.keras; run `medq train` for it")
        _, keras_path = model_location(info, "keras")
    for note in operating.notes:  # once the command is known to run: a refusal stays its one line
        log.warning("thresholds: %s", note)
    predictor = Predictor(info, kind, path, intra_op_threads=intra_op_threads, inter_op_threads=inter_op_threads,
                          trust_model_file=trust_model_file)
    heatmaps = None
    if heatmap_dir is not None:
        from medq.models import load_keras_model

        cam_model = predictor.keras_model if kind == "keras" else load_keras_model(keras_path)
        heatmaps = HeatmapWriter(Path(heatmap_dir), cam_model, info, heatmap_classes, heatmap_layer, operating)
    summary = PredictSummary(ignored=ignored, repeated=repeated, model=f"{model if model_file is None else kind} model {path}",
                             data_source=info.data_source,
                             output=Path(output) if output is not None else None,
                             heatmap_dir=Path(heatmap_dir) if heatmap_dir is not None else None)
    stream = iter_predictions(predictor, items, batch_size=batch_size, ten_crop=ten_crop, threshold=operating,
                              heatmaps=heatmaps, quiet=quiet)
    if dicom_sr_dir is not None:
        summary.dicom_sr_dir = Path(dicom_sr_dir)
        identity = model_identity(info, model if model_file is None else kind, path)
        stream = _with_dicom_sr(stream, sr_targets, info, identity, summary)
    try:
        if output is None:
            _write_lines(stream, stdout or sys.stdout, summary)
        else:
            with artifacts.atomic_path(output) as tmp, open(tmp, "w", encoding="utf-8") as fh:
                _write_lines(stream, fh, summary)
    finally:
        predictor.close()
    return summary


def plan_dicom_sr(items: list[ImageInput], directory: str | Path | None, overwrite: bool) -> dict[Path, Path]:
    """input → SR file for the DICOM inputs; refused before any work: a file as folder, or SR files already there
    (without ``overwrite``)."""
    if directory is None:
        return {}
    from medq.dicomsr import plan_targets

    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise MedqError(f"{folder}: is a file; --dicom-sr takes a folder (created if missing)")
    refuse_under_a_file(folder, "--dicom-sr")
    targets = plan_targets(folder, [(item.path, item.root) for item in items])
    existing = [t for t in targets.values() if t.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise MedqError(f"{existing[0]}: already exists{more}; medq does not replace files it did not write in this "
                        "run — pass --overwrite, or choose an empty --dicom-sr folder")
    return targets


def model_identity(info: RunInfo, model: str, path: Path):
    """The run name, model kind and sha256 of the model file used (what the SR names as the algorithm)."""
    from medq.dicomsr import ModelIdentity

    digest = artifacts.sha256(path) if Path(path).is_file() else "(a folder)"  # a SavedModel --model-file
    return ModelIdentity(run_name=info.run_dir.resolve().name, model=model, sha256=digest,
                         medq_version=_medq_version())


def _medq_version() -> str:
    from medq import __version__

    return __version__


def _with_dicom_sr(stream: Iterator[dict[str, Any]], targets: dict[Path, Path], info: RunInfo, identity: Any,
                   summary: PredictSummary) -> Iterator[dict[str, Any]]:
    """Each record, after writing the SR of a predicted DICOM input (its path goes into the record as
    ``dicom_sr``); an SR that cannot be built is the record's ``dicom_sr_error`` (the prediction stands). The SR
    decides at the thresholds the record was decided at (its ``thresholds``)."""
    from medq.dicomsr import write_sr

    for rec in stream:
        target = targets.get(Path(rec["file"]))
        if target is not None and "probabilities" in rec:
            try:
                rec["dicom_sr"] = str(write_sr(Path(rec["file"]), target, rec["probabilities"], info.task,
                                               rec["thresholds"], identity))
                summary.dicom_sr += 1
            except MedqError as exc:
                rec["dicom_sr_error"] = _error_text(Path(rec["file"]), exc)
                summary.dicom_sr_errors += 1
                summary.first_dicom_sr_error = summary.first_dicom_sr_error or str(exc)
        yield rec


def _write_lines(stream: Iterator[dict[str, Any]], fh: TextIO, summary: PredictSummary) -> None:
    for rec in stream:
        rec = utf8_safe(rec)  # every line valid UTF-8 JSON (and the summary printable), whatever the file names
        if "error" in rec:
            summary.errors += 1
            summary.first_error = summary.first_error or f"{rec['file']}: {rec['error']}"
        else:
            summary.predicted += 1
        if "warning" in rec:
            summary.warnings += 1
            summary.first_warning = summary.first_warning or f"{rec['file']}: {rec['warning']}"
        fh.write(json.dumps(rec) + "\n")
    fh.flush()
