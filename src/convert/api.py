"""The converter's two entry points: ``convert`` (PyTorch / ONNX in → medq run folder) and ``export_onnx`` (medq
model → ONNX). One function per step; these two only put the steps in order and write the run folder."""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medq import artifacts, runrecord
# Each sibling by its own name, not through the package (whose __init__ re-exports this module).
import medq.convert.head as head
import medq.convert.onnx_graph as onnx_graph
import medq.convert.parity as parity
import medq.convert.torch_models as torch_models
from medq.convert.batchnorm import restore_batchnorms
from medq.convert.dense_concat import chain_concatenations
from medq.convert.pool_padding import rewrite_pool_padding
from medq.onnxio import graph_def_to_onnx
from medq.data.nih import CHEXNET_CLASSES
from medq.errors import MedqError, first_line
from medq.preprocess import PreprocessSpec

DEFAULT_IMAGE_SIZE = 224
DEFAULT_OPSET = 17
OPSETS = range(13, 18)  # what this stack was tested with (torch exporter, onnx2tf 1.28, tf2onnx 1.17)
PARITY_TOLERANCE = 1e-4  # absolute, on probabilities
PARITY_IMAGES = 8
NOISE_IMAGES = 4  # beside the parity phantoms, through the source only: logits spread beyond [0, 1] on them
NORMALIZATIONS = ("imagenet", "symmetric", "unit", "raw")
FROZEN_FP32 = "model_fp32.pb"  # the name medq.freeze writes: later stages find it through the manifest either way
ONNX_FILE = "model.onnx"
ONNX_FP32_FILE = "model_fp32.onnx"
SAVED_MODEL_DIR = "saved_model"
PARITY_FILE = "parity.json"
EXPORT_PARITY_FILE = "parity_onnx.json"


@dataclass
class ExportResult:
    run_dir: Path
    onnx: Path  # convert: model.onnx (NCHW, as the source); export_onnx: model_fp32.onnx (NHWC, as model_fp32.pb)
    parity: dict[str, Any]  # the parity report, as written to the run folder
    manifest: runrecord.Manifest  # the run's record after the commit


@dataclass
class ConvertResult(ExportResult):
    fp32_pb: Path
    saved_model: Path
    task: str
    classes: list[str]
    preprocess: PreprocessSpec


@dataclass
class _Source:
    """A model read from the user's file: its ONNX graph as exported, and the engine the parity check trusts."""

    onnx_model: Any
    engine: str
    predict: Callable[[np.ndarray], np.ndarray]  # NCHW batch → raw outputs (before the appended head)
    image_size: int
    info: dict[str, Any]
    arch: str | None = None


def _read_onnx_source(path: Path, image_size: int | None) -> _Source:
    model = onnx_graph.load_onnx(path)
    sig = onnx_graph.signature(model, path)
    if sig.height != sig.width:
        raise MedqError(f"{path}: input is {sig.height}x{sig.width}; medq feeds square images")
    if image_size is not None and sig.height is not None and image_size != sig.height:
        raise MedqError(f"{path}: the model takes {sig.height}x{sig.width} images, not {image_size}; "
                        f"drop --image-size or pass --image-size {sig.height}")
    if sig.height is None and image_size is None:  # a size the file does not state is not guessed
        raise MedqError(f"{path}: the model's input size is dynamic ({sig.height or '?'}x{sig.width or '?'}), so "
                        "the file does not say the size it was trained at; pass --image-size")
    size = sig.height or image_size
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    info = {"kind": "onnx", "opset": opset, "input": onnx_graph.real_inputs(model.graph)[0].name,
            "output": model.graph.output[0].name, "producer": model.producer_name or None}
    external = onnx_graph.external_data_files(path)
    if external:  # the weights live beside the file: their hashes are the model's too
        info["external_data"] = {f.name: artifacts.sha256(f) for f in external}
    return _Source(model, "source-onnx", lambda x: onnx_graph.run_onnx(path, x), size, info)


def _load_torch(path: Path, arch: str | None, image_size: int, trust_torchscript: bool, trust_pickle: bool):
    """The torch model from a checkpoint (strictly loaded) or a trusted TorchScript file: the quick part."""
    if torch_models.is_torchscript(path):
        if arch is not None:
            raise MedqError(f"{path}: a TorchScript file carries its own architecture; drop --arch {arch}")
        return torch_models.load_torchscript(path, image_size, trust_torchscript)
    return torch_models.load_checkpoint_model(path, arch, trust_pickle)


def _torch_source(loaded, path: Path, arch: str | None, image_size: int, opset: int, work: Path) -> _Source:
    import onnx

    target = torch_models.export_onnx_from_torch(loaded, work / "source.onnx", image_size, opset, path)
    info = {**loaded.info, "in_channels": loaded.in_channels, "num_outputs": loaded.num_outputs, "opset": opset}
    return _Source(onnx.load(str(target)), "pytorch", lambda x: torch_models.torch_predict(loaded.model, x),
                   image_size, info, arch)


def _class_names(classes: list[str] | None, arch: str | None, n: int, where: Path) -> list[str]:
    if classes is not None:
        classes = [str(c) for c in classes]
        if len(classes) != n or len(set(classes)) != n:
            raise MedqError(f"{where}: {len(classes)} class names given for a model with {n} outputs "
                            f"(or names repeat); pass --classes with {n} distinct names, in output order")
        return classes
    if arch == "chexnet" and n == len(CHEXNET_CLASSES):
        return list(CHEXNET_CLASSES)
    return [f"class_{i}" for i in range(n)]


def _normalization(requested: str | None, arch: str | None, where: Path) -> str | None:
    """The preprocessing asked for or the architecture's; None when neither says (the graph may, see below)."""
    if requested is None and arch is not None:
        requested = torch_models.get_architecture(arch, where).normalization
    if requested is not None and requested not in NORMALIZATIONS:
        raise MedqError(f"{where}: {requested!r} is not a normalization; pass --normalization "
                        + " / ".join(NORMALIZATIONS))
    return requested


def _graph_normalization(requested: str | None, model, where: Path) -> str:
    """``requested`` checked against what the graph's first ops do to the pixels themselves: a model that divides
    by 255 and subtracts a mean inside, fed ImageNet-normalised pixels, normalises twice, silently."""
    own = onnx_graph.own_normalization(model)
    if requested is None and own is None:
        raise MedqError(f"{where}: pass --normalization, the preprocessing the model was trained with (it is not known "
                        "for this model): imagenet (ImageNet mean/std), symmetric (mean 0.5, std 0.5), unit ([0, 1]) "
                        "or raw (0-255 pixels)")
    if own is not None and requested not in (None, own):
        takes = "0-255 pixels" if own == "raw" else "[0, 1] pixels"
        raise MedqError(f"{where}: the model's first ops rescale and normalise its input themselves (it takes "
                        f"{takes}); --normalization {requested} would normalise twice: pass --normalization {own}")
    return requested or own


def _check_arguments(source: Path, run_dir: Path, arch: str | None, opset: int, parity_images: int) -> bool:
    """Everything about ``convert``'s arguments that can be checked before loading anything; True for ONNX input."""
    if not source.is_file():
        raise MedqError(f"{source}: model file not found")
    _check_settings(source, opset, parity_images)
    is_onnx = source.suffix.lower() == ".onnx"
    if is_onnx and arch is not None:
        raise MedqError(f"{source}: an ONNX file carries its own architecture; drop --arch {arch}")
    if not is_onnx:
        torch_models.require_torch(source)
    trained = sorted(runrecord.read_manifest(run_dir).ran("train", "tune", "freeze"))
    if trained:
        raise MedqError(f"{run_dir}: holds a model medq trained ({', '.join(trained)} recorded); convert into a new "
                        "run folder")
    return is_onnx


def _source_outputs(src: _Source, x: np.ndarray, where: Path) -> np.ndarray:
    """The source's own outputs on NHWC ``x``, in the engine it came from; its failure is one line."""
    try:
        return src.predict(x.transpose(0, 3, 1, 2))
    except MedqError:
        raise
    except Exception as exc:  # noqa: BLE001 - onnxruntime's or torch's refusal of the input, as one line
        raise MedqError(f"{where}: {src.engine} could not run the model on {x.shape[1]}x{x.shape[2]} images with "
                        f"{x.shape[3]} channel(s) ({first_line(exc)}); check --image-size, or that the file runs "
                        f"in {src.engine}") from None


def _raw_outputs(src: _Source, source_raw: np.ndarray, network, saved_model: Path, x: np.ndarray,
                 batch: int) -> dict[str, np.ndarray]:
    """The network's own outputs (before medq's head) in the source engine, onnxruntime and the SavedModel."""
    serve = onnx_graph.load_serving(saved_model)
    return {src.engine: source_raw,
            "onnxruntime": parity.in_batches(lambda b: onnx_graph.run_onnx(network, b.transpose(0, 3, 1, 2)), x, batch),
            "tensorflow": parity.in_batches(lambda b: serve(b).numpy(), x, batch)}


def _parity_batch(network, sig: onnx_graph.OnnxSignature, x: np.ndarray) -> int:
    """The batch the parity check runs at: all its images at once, unless the source declares a fixed batch that
    the network really depends on (a GridSample grid or a Reshape of batch 1): then that batch."""
    import onnxruntime as ort

    if not sig.batch or sig.batch >= len(x):
        return len(x)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the expected failure is the answer, not an error for the terminal
    session = ort.InferenceSession(network.SerializeToString(), options, providers=["CPUExecutionProvider"])
    try:
        session.run(None, {session.get_inputs()[0].name: x[:sig.batch + 1].transpose(0, 3, 1, 2)})
    except Exception:  # noqa: BLE001 - onnxruntime's shape failure; the fixed batch is tried next, for real
        return sig.batch
    return len(x)


def _check_settings(where: Path, opset: int, parity_images: int) -> None:
    if opset not in OPSETS:
        raise MedqError(f"{where}: opset {opset} is outside the tested range {OPSETS.start}-{OPSETS.stop - 1}")
    if parity_images < 2:
        raise MedqError(f"{where}: parity needs at least 2 images (a batch), got {parity_images}")


def _replace_dir(source: Path, target: Path) -> None:
    """Move a finished folder into place; the previous one is removed only after the new one is there."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


def convert(source: str | Path, *, run_dir: str | Path, arch: str | None = None, classes: list[str] | None = None,
            task: str | None = None, image_size: int | None = None, normalization: str | None = None,
            opset: int = DEFAULT_OPSET, tolerance: float = PARITY_TOLERANCE, parity_images: int = PARITY_IMAGES,
            trust_torchscript: bool = False, trust_pickle: bool = False, model_output: str | None = None,
            verbose: bool = True) -> ConvertResult:
    """A PyTorch checkpoint (with ``arch``), a trusted TorchScript file or an ONNX file → a medq run folder.

    Writes ``model_fp32.pb`` (``input:0`` [N, S, S, C] → ``output:0`` probabilities), ``model.onnx`` (NCHW, same
    head), ``saved_model/`` (the network as onnx2tf converted it, NHWC, its own outputs: no appended head),
    ``parity.json`` and the manifest entries later stages read.

    ``image_size``: default 224 for PyTorch input, the file's own size for ONNX (required when the file's is
    dynamic). ``normalization``: the preprocessing the model was trained with; required unless the architecture
    defines it (chexnet: imagenet) or the graph's first ops show what they expect (``raw``/``unit``). ``task``:
    required when the model ends in logits with 2+ outputs (it picks softmax or sigmoid). ``model_output``:
    ``logits`` or ``probabilities``, what the model's outputs are when its graph does not show it (outputs that look
    like probabilities behind ops other than Sigmoid/Softmax are refused without it). ``trust_pickle``: unpickle a
    checkpoint that holds more than tensors (numpy scalars, a whole model: code runs); its tensors still load
    strictly into ``arch``. ``tolerance``: the largest absolute difference of probabilities, and of logits relative
    to their magnitude when medq appends the head, between any
    two engines. Raises ``MedqError`` (one line naming the file) on bad input or when the engines disagree by more;
    nothing but ``parity.json`` is written then.
    """
    source, run_dir = Path(source), Path(run_dir)
    with runrecord.writer_lock(run_dir, "convert"):
        return _convert(source, run_dir, arch, classes, task, image_size, normalization, opset, tolerance,
                        parity_images, trust_torchscript, trust_pickle, model_output, verbose)


def _convert(source: Path, run_dir: Path, arch: str | None, classes: list[str] | None, task: str | None,
             image_size: int | None, normalization: str | None, opset: int, tolerance: float, parity_images: int,
             trust_torchscript: bool, trust_pickle: bool, model_output: str | None, verbose: bool) -> ConvertResult:
    is_onnx = _check_arguments(source, run_dir, arch, opset, parity_images)
    loaded = None if is_onnx else _load_torch(source, arch, image_size or DEFAULT_IMAGE_SIZE, trust_torchscript,
                                              trust_pickle)
    requested = _normalization(normalization, arch, source)  # checked before the slow steps
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=run_dir) as tmp:
        work = Path(tmp)
        src = _read_onnx_source(source, image_size) if is_onnx else \
            _torch_source(loaded, source, arch, image_size or DEFAULT_IMAGE_SIZE, opset, work)
        sig = onnx_graph.signature(src.onnx_model, source)
        norm = _graph_normalization(requested, src.onnx_model, source)
        plan = head.plan_head(head.model_ending(src.onnx_model, source), sig.num_outputs, task, source, model_output)
        names = _class_names(classes, src.arch, plan.num_classes, source)
        spec = PreprocessSpec(src.image_size, sig.channels, norm)

        network = onnx_graph.standardize(src.onnx_model, spec.image_size, source)  # the source's own outputs
        network_path = work / "network.onnx"
        network_path.write_bytes(network.SerializeToString())
        x = parity.phantom_batch(spec, parity_images)
        # phantoms and noise: what the source makes of them tells logits from probabilities, before the slow steps
        source_raw = _source_outputs(src, np.concatenate([x, parity.noise_batch(spec, NOISE_IMAGES)]), source)
        head.check_outputs(plan, source_raw, source)
        onnx_path = work / ONNX_FILE
        onnx_path.write_bytes(head.append_head(network, plan).SerializeToString())
        # The SavedModel is the network as onnx2tf converts it; the head is added in TF when freezing.
        retry = ("re-export the model from its framework without that op, or with another opset" if is_onnx
                 else "try another --opset")
        saved_model = onnx_graph.onnx_to_saved_model(network_path, work / SAVED_MODEL_DIR, source, retry)
        graph_def = onnx_graph.freeze_saved_model(saved_model, spec.input_shape, head.tf_head(plan))
        # The graph in the form INC quantizes well, like medq's own models (onnx2tf's -FLT_MAX pooling padding makes
        # INT8 calibration collapse; its Mul+Add BatchNorms and DenseNet's flat concatenations keep the INT8
        # concatenation rewrite from applying); the parity check below runs the result.
        graph_def, pool_padding = rewrite_pool_padding(graph_def)
        graph_def, batchnorms = restore_batchnorms(graph_def)
        graph_def, chained = chain_concatenations(graph_def)

        batch = _parity_batch(network, sig, x)
        raw = _raw_outputs(src, source_raw[:len(x)], network, saved_model, x, batch)
        probabilities = {src.engine: head.apply_head(plan, raw[src.engine]),
                         "onnxruntime": parity.in_batches(
                             lambda b: onnx_graph.run_onnx(onnx_path, b.transpose(0, 3, 1, 2)), x, batch),
                         "tensorflow": parity.run_frozen(graph_def, x, batch_size=batch)}
        report = parity.parity_report(probabilities, spec, tolerance, raw if plan.appended else None)
        report["batch"] = batch
        if batch < len(x):
            report["note"] = (f"the model runs only at batch {batch}, its source's fixed batch; run later stages "
                              f"at batch {batch}")
        parity.record(report, run_dir / PARITY_FILE, source, verbose)

        staged_pb = artifacts.write_bytes(runrecord.staging_path(run_dir, FROZEN_FP32), graph_def.SerializeToString())
        staged_onnx = runrecord.staging_path(run_dir, ONNX_FILE)
        os.replace(onnx_path, staged_onnx)
        _replace_dir(saved_model, run_dir / SAVED_MODEL_DIR)

    source_info = {**src.info, "path": str(source.resolve()), "sha256": artifacts.sha256(source),
                   "model_ends_in": plan.model_ends_in, "appended_head": list(plan.appended),
                   "normalization_from": "argument" if normalization else
                   "architecture default" if requested else "model graph",
                   "model_output_declared": model_output}
    manifest = runrecord.commit(
        run_dir, "convert", artifacts={"fp32_pb": staged_pb, "onnx": staged_onnx},
        sources={"source_model": source_info["sha256"]},
        facts={"input_name": "input", "output_name": "output", "input_shape": list(spec.input_shape),
             "classes": names, "task": plan.task, "preprocess": spec.to_dict(), "model_source": "convert",
             "source_model": source_info},
        saved_model=SAVED_MODEL_DIR, saved_model_outputs="the network's own outputs, before the appended head",
        onnx_input_layout="NCHW", parity=parity.summary(report), pool_padding=pool_padding.to_dict(),
        batchnorms_restored=batchnorms, concatenations_chained=chained)
    return ConvertResult(run_dir=run_dir, onnx=run_dir / ONNX_FILE, parity=report, manifest=manifest,
                         fp32_pb=run_dir / FROZEN_FP32,
                         saved_model=run_dir / SAVED_MODEL_DIR, task=plan.task, classes=names, preprocess=spec)


def export_onnx(run_dir: str | Path, *, source: str | Path | None = None, opset: int = DEFAULT_OPSET,
                tolerance: float = PARITY_TOLERANCE, parity_images: int = PARITY_IMAGES,
                verbose: bool = True) -> ExportResult:
    """A medq run's model (its frozen ``fp32_pb``, else its ``keras_model``, or ``source``) → ``model_fp32.onnx``
    with tf2onnx, checked in onnxruntime against TensorFlow. The ONNX model takes the same NHWC ``input`` as the
    frozen graph. Recorded as artifact ``fp32_onnx``."""
    run_dir = Path(run_dir)
    with runrecord.writer_lock(run_dir, "export-onnx"):
        return _export_onnx(run_dir, source, opset, tolerance, parity_images, verbose)


def _export_onnx(run_dir: Path, source: str | Path | None, opset: int, tolerance: float, parity_images: int,
                 verbose: bool) -> ExportResult:
    from medq.graph import read_graph_def

    manifest = runrecord.read_manifest(run_dir)
    facts = manifest.facts
    if facts.preprocess is None:
        raise MedqError(f"{run_dir / runrecord.MANIFEST}: no preprocessing recorded (not a medq run folder, or no "
                        "model yet); run `medq train` and `medq freeze`, or `medq convert`, for this run first")
    _check_settings(run_dir, opset, parity_images)
    spec = PreprocessSpec.from_dict(facts.preprocess)
    input_name, output_name = facts.tensor_names()
    made_from = "fp32_pb" if runrecord.recorded_path(run_dir, "fp32_pb") else "keras_model"
    path = Path(source) if source else runrecord.verified_path(run_dir, made_from, hint="medq freeze")
    x = parity.phantom_batch(spec, parity_images)
    # a converted model that runs only at its fixed batch (recorded by convert's parity check) is checked at it
    batch = (manifest.stage(runrecord.ConvertEntry).parity or {}).get("batch") or len(x)
    if path.suffix == ".pb":
        graph_def = read_graph_def(path)
        reference = parity.run_frozen(graph_def, x, input_name, output_name, batch_size=batch)
    else:
        from medq.graph import freeze_keras
        from medq.models import load_keras_model

        keras_model = load_keras_model(path)
        graph_def = freeze_keras(keras_model, input_name, output_name)
        reference = keras_model.predict(x, batch_size=batch, verbose=0)
    model = graph_def_to_onnx(graph_def, opset, path, input_name, output_name)
    onnx_outputs = parity.in_batches(lambda b: onnx_graph.run_onnx(model, b), x, batch)
    report = parity.parity_report({"tensorflow": reference, "onnxruntime": onnx_outputs}, spec, tolerance)
    report["batch"] = batch
    parity.record(report, run_dir / EXPORT_PARITY_FILE, path, verbose)
    staged = artifacts.write_bytes(runrecord.staging_path(run_dir, ONNX_FP32_FILE), model.SerializeToString())
    manifest = runrecord.commit(run_dir, "export-onnx", artifacts={"fp32_onnx": staged},
                                inputs=() if source else (made_from,), source=os.path.relpath(path, run_dir),
                                opset=opset, onnx_input_layout="NHWC", parity=parity.summary(report))
    return ExportResult(run_dir, run_dir / ONNX_FP32_FILE, report, manifest)
