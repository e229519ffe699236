"""ONNX and TensorFlow side of the converter (no torch here).

- ``standardize``: one NCHW image input named ``input`` with a dynamic batch and a fixed size, one ``[N, classes]``
  output named ``output``.
- ``onnx_to_saved_model``: onnx2tf → an NHWC TensorFlow SavedModel with one serving signature.
- ``freeze_saved_model``: that signature (plus the head) → frozen GraphDef ``input:0 → output:0``
  (``medq.graph.freeze_callable``).
"""
from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from medq.errors import MedqError, first_line
from medq.onnxio import rename_tensor


def load_onnx(path: str | Path):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise MedqError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise MedqError(f"{path}: not a valid ONNX model ({first_line(exc)})") from None
    return model


def external_data_files(path: Path) -> list[Path]:
    """The files an ONNX model keeps its weights in beside itself (``model.onnx.data``), each once."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}
    return [Path(path).parent / location for location in sorted(locations)]


def real_inputs(graph) -> list:
    """Graph inputs that are fed at run time (older exporters also list every initializer as an input)."""
    initializers = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in initializers]


def _dims(value_info) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


@dataclass(frozen=True)
class OnnxSignature:
    """What a classifier's ONNX graph says about itself: NCHW input dims (None where dynamic), number of outputs."""

    batch: int | None
    channels: int
    height: int | None
    width: int | None
    num_outputs: int


def signature(model, where: str | Path) -> OnnxSignature:
    import onnx

    inputs, outputs = real_inputs(model.graph), list(model.graph.output)
    if len(inputs) != 1 or len(outputs) != 1:
        raise MedqError(f"{where}: expected one image input and one output, found {len(inputs)} input(s) "
                        f"({', '.join(i.name for i in inputs)}) and {len(outputs)} output(s)")
    for kind, value in (("input", inputs[0]), ("output", outputs[0])):
        elem = value.type.tensor_type.elem_type
        if elem != onnx.TensorProto.FLOAT:
            raise MedqError(f"{where}: {kind} {value.name!r} is {onnx.helper.tensor_dtype_to_np_dtype(elem)}; medq "
                            "feeds float32 pixels and reads float32 outputs: re-export with float32 inputs and "
                            "outputs (onnxconverter-common's float16 conversion: keep_io_types=True)")
    in_dims, out_dims = _dims(inputs[0]), _dims(outputs[0])
    if len(in_dims) != 4 or in_dims[1] not in (1, 3):
        raise MedqError(f"{where}: input {inputs[0].name!r} has shape {in_dims}; medq converts image classifiers "
                        "with an NCHW input of 1 or 3 channels (the PyTorch layout)")
    if len(out_dims) != 2 or not out_dims[1]:  # a symbolic class axis ("classes"): shape inference knows it
        out_dims = _inferred_dims(model, outputs[0].name) or out_dims
    if len(out_dims) != 2 or not out_dims[1]:
        raise MedqError(f"{where}: output {outputs[0].name!r} has shape {out_dims}; expected [N, classes]")
    return OnnxSignature(in_dims[0], in_dims[1], in_dims[2], in_dims[3], out_dims[1])


def _inferred_dims(model, name: str) -> list[int | None] | None:
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - no inferred shape: the declared one is reported
        return None
    return next((_dims(o) for o in inferred.graph.output if o.name == name), None)


_AFFINE_OPS = ("Sub", "Div", "Mul", "Add")


def own_normalization(model) -> str | None:
    """The input a model expects when its first ops rescale and normalise the pixels themselves (a chain of
    Sub/Div/Mul/Add by constants on the input, folded into one per-channel ``x * scale + offset``): ``raw`` for
    0–255 pixels (a scale near 1/255), ``unit`` for [0, 1] pixels it normalises itself (mean/std); None when the
    first op is not such a chain."""
    from onnx import numpy_helper

    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    name, scale, offset, steps = real_inputs(graph)[0].name, np.ones(1), np.zeros(1), 0
    while True:
        users = [n for n in graph.node if name in n.input]
        if len(users) != 1 or users[0].op_type not in _AFFINE_OPS or len(users[0].input) != 2:
            break
        node = users[0]
        other = node.input[1] if node.input[0] == name else node.input[0]
        if other not in constants or (node.op_type in ("Sub", "Div") and node.input[0] != name):
            break  # c - x or c / x is no normalisation
        c = constants[other].astype(np.float64).reshape(-1)  # a scalar or one value per channel
        if node.op_type == "Sub":
            offset = offset - c
        elif node.op_type == "Add":
            offset = offset + c
        elif node.op_type == "Mul":
            scale, offset = scale * c, offset * c
        else:
            scale, offset = scale / c, offset / c
        name, steps = node.output[0], steps + 1
    if not steps:
        return None
    if np.abs(scale).max() < 0.05:
        return "raw"
    if np.abs(scale).max() > 1.5 or np.abs(offset).max() > 0.3:
        return "unit"
    return None


def standardize(model, image_size: int, where: str | Path, input_name: str = "input", output_name: str = "output"):
    """A copy of ``model`` with the tensor names medq uses, a dynamic batch axis and a fixed ``image_size``.

    A static batch would make onnx2tf try to download calibration images (offline: failure); a model that really
    depends on a fixed batch (a Reshape to [1, ...]) fails the parity check, which runs several images at once.
    """
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    rename_tensor(graph, real_inputs(graph)[0].name, input_name, where)
    rename_tensor(graph, graph.output[0].name, output_name, where)
    inp = next(i for i in graph.input if i.name == input_name)
    for axis, size in ((2, image_size), (3, image_size)):
        inp.type.tensor_type.shape.dim[axis].dim_value = size
    for value in (inp, graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    del graph.value_info[:]  # intermediate shapes recorded for the old input size/batch are re-inferred
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise MedqError(f"{where}: the model does not accept a {image_size}x{image_size} input with a free batch "
                        f"size ({first_line(exc)}); pass its own --image-size or re-export with a dynamic "
                        "batch") from None
    return model


def run_onnx(model_or_path, x: np.ndarray) -> np.ndarray:
    """Run an ONNX model in onnxruntime; a model with a fixed batch size is fed in chunks of that size."""
    import onnxruntime as ort

    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    batch = feed.shape[0] if isinstance(feed.shape[0], int) and feed.shape[0] > 0 else len(x)
    outputs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        padding = np.repeat(chunk[-1:], batch - len(chunk), axis=0)
        padded = np.concatenate([chunk, padding]) if len(padding) else chunk
        outputs.append(session.run(None, {feed.name: padded})[0][:len(chunk)])
    return np.concatenate(outputs, axis=0)


def onnx_to_saved_model(onnx_path: Path, target: Path, where: str | Path,
                        retry: str = "try another opset") -> Path:
    """onnx2tf → Keras (NHWC) → a SavedModel with one ``serving_default`` signature ``input → {output}``.

    onnx2tf runs in a child process: importing it loads tf_keras beside tf.keras and sets TF_USE_LEGACY_KERAS, and
    from then on ``tf.keras.models.load_model`` in that process never returns (two Keras copies registering their
    tensor types). The child's one-line error becomes this process's MedqError, naming the node onnx2tf failed on
    and its op; ``retry`` says what the user can change.
    """
    import subprocess
    import sys

    child = "import sys; from medq.convert.onnx_graph import onnx2tf_child; onnx2tf_child(*sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", child, str(onnx_path), str(target)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        node = _failed_node(onnx_path, proc.stdout + proc.stderr)
        raise MedqError(f"{where}: onnx2tf could not convert {node or 'the ONNX graph'} ({reason[:200]}); {retry}")
    return target


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _failed_node(onnx_path: Path, output: str) -> str | None:
    """'node NAME (op TYPE)' from onnx2tf's output: the node it names on failure, or the nodes of an op type it has
    no converter for ("No module named 'onnx2tf.ops.LpPool'")."""
    import onnx

    text = _ANSI.sub("", output)
    nodes = list(onnx.load(str(onnx_path), load_external_data=False).graph.node)
    named = re.findall(r"onnx_op_name: (\S+)", text)
    if named:
        op = next((n.op_type for n in nodes if n.name == named[-1]), None)
        return f"node {named[-1]!r}" + (f" (op {op})" if op else "")
    missing = re.search(r"No module named 'onnx2tf\.ops\.(\w+)'", text)
    if missing:
        names = [n.name or f"#{i}" for i, n in enumerate(nodes) if n.op_type == missing.group(1)]
        shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"op {missing.group(1)} (node {shown}; onnx2tf has no converter for it)" if names else \
            f"op {missing.group(1)} (onnx2tf has no converter for it)"
    return None


def _onnx2tf_saved_model(onnx_path: Path, target: Path) -> None:
    """The child's work. onnx2tf rewrites the file it is given, so it works on a copy. The SavedModel is written
    from a signature traced without autograph: saving the onnx2tf Keras object itself re-traces every layer (47 s
    instead of 1.5 s on DenseNet121) and makes TFLite files nobody asked for.
    """
    import onnx2tf
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="medq-onnx2tf-") as tmp:
        work = Path(tmp) / "model.onnx"
        shutil.copyfile(onnx_path, work)
        keras_model = onnx2tf.convert(input_onnx_file_path=str(work), output_folder_path=str(Path(tmp) / "out"),
                                      not_use_onnxsim=True, disable_model_save=True, verbosity="error")
    spec = tf.TensorSpec(keras_model.inputs[0].shape, tf.float32, name="input")
    serve = tf.function(lambda x: {"output": keras_model(x, training=False)}, input_signature=[spec], autograph=False)
    module = tf.Module()
    module.model_variables = list(keras_model.variables)  # onnx2tf folds weights into constants; kept if any
    tf.saved_model.save(module, str(target), signatures={"serving_default": serve.get_concrete_function()})


def load_serving(saved_model_dir: Path) -> Callable:
    """The SavedModel's ``serving_default`` signature as ``fn(x) -> y`` (tensors in and out)."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model_dir))
    serve = loaded.signatures["serving_default"]
    (arg,) = serve.structured_input_signature[1]
    (out,) = serve.structured_outputs

    def fn(x):
        return serve(**{arg: x})[out]

    fn.loaded = loaded  # keeps the restored objects alive as long as the function
    return fn


def freeze_saved_model(saved_model_dir: Path, input_shape: tuple[int, ...], then: Callable = lambda y: y,
                       input_name: str = "input", output_name: str = "output"):
    """The SavedModel's serving signature, then ``then`` (the head) → frozen GraphDef ``input:0 → output:0``."""
    from medq.graph import freeze_callable

    serve = load_serving(saved_model_dir)
    return freeze_callable(lambda x: then(serve(x)), input_shape, input_name, output_name)


def onnx2tf_child(onnx_path: str, target: str) -> None:
    """Entry point of the onnx2tf child process: convert, or print one line to stderr and exit 1."""
    import os
    import sys

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        _onnx2tf_saved_model(Path(onnx_path), Path(target))
    except (Exception, SystemExit) as exc:  # onnx2tf calls sys.exit() on some unsupported graphs
        print(first_line(exc), file=sys.stderr)
        sys.exit(1)
