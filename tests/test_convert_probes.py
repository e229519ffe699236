"""Probes of the converter with models made elsewhere: heads written by hand, inputs onnxruntime or onnx2tf cannot
take, TorchScript that only runs at its own size. Models are built node by node with onnx.helper (torch only where
the probe is about TorchScript)."""
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from medq.convert import convert
from medq.convert.parity import phantom_batch, run_frozen
from medq.errors import MedqError
from medq.preprocess import PreprocessSpec

SIZE = 32


def classifier(path, tail=(), *, classes=3, out="logits", opset=17, dtype=TensorProto.FLOAT,
               batch="N", out_shape=None):
    """images [batch, 1, 32, 32] → Conv → Relu → GlobalAveragePool → Flatten → Gemm ('fc', logits) → TAIL
    (nodes ending in ``out``)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "wf", "bf"], ["fc" if tail else out], transB=1), *tail]
    inits = [numpy_helper.from_array((rng.standard_normal((6, 1, 3, 3)) * 0.5).astype(np.float32), "w1"),
             numpy_helper.from_array(np.full(6, 0.1, np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((classes, 6)) * 2).astype(np.float32), "wf"),
             numpy_helper.from_array(np.zeros(classes, np.float32), "bf")]
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("images", dtype, [batch, 1, SIZE, SIZE])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape or [batch, classes])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, str(path))
    return path


def onnx_outputs(path, x_nhwc):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x_nhwc.transpose(0, 3, 1, 2)})[0]


HAND_SOFTMAX = [helper.make_node("Exp", ["fc"], ["e"]),
                helper.make_node("ReduceSum", ["e", "axes"], ["s"], keepdims=1),
                helper.make_node("Div", ["e", "s"], ["probs"])]


def with_axes(path):
    model = onnx.load(str(path))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("tail, classes, task", [
    (HAND_SOFTMAX, 3, "multiclass"),  # softmax written out: Exp / ReduceSum
    ([helper.make_node("Softmax", ["fc"], ["sm"], axis=1),  # a softmax, then the positive class's column
      helper.make_node("Slice", ["sm", "one", "two", "axis1"], ["probs"])], 2, None),
    ([helper.make_node("Sigmoid", ["fc"], ["sg"]),  # a sigmoid, then clipped away from 0 and 1
      helper.make_node("Clip", ["sg", "lo", "hi"], ["probs"])], 3, "multilabel"),
])
def test_probabilities_behind_ops_the_graph_walk_does_not_know_are_not_activated_twice(tmp_path, tail, classes, task):
    """Applying a softmax or sigmoid to probabilities is a silently wrong model (every answer squeezed towards the
    middle, the ranking of classes changed): refused in one line before the slow conversion."""
    source = classifier(tmp_path / "p.onnx", tail, classes=classes, out="probs",
                        out_shape=["N", 1] if tail[-1].op_type == "Slice" else None)
    constants = {"axes": np.array([1], np.int64), "one": np.array([1], np.int64), "two": np.array([2], np.int64),
                 "axis1": np.array([1], np.int64), "lo": np.array(1e-6, np.float32),
                 "hi": np.array(1 - 1e-6, np.float32)}
    used = {name for node in tail for name in node.input}
    model = onnx.load(str(source))
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items() if k in used)
    onnx.save(model, str(source))
    p = onnx_outputs(source, phantom_batch(PreprocessSpec(SIZE, 1, "unit"), 4))
    assert ((p >= 0) & (p <= 1)).all()  # the oracle: these really are probabilities
    with pytest.raises(MedqError) as err:
        convert(source, run_dir=tmp_path / "run", task=task, normalization="unit", verbose=False)
    text = str(err.value)
    assert "\n" not in text and str(source) in text and "--model-output" in text
    assert not (tmp_path / "run" / "model_fp32.pb").exists()


def test_declared_probabilities_are_kept_as_they_are(tmp_path):
    source = with_axes(classifier(tmp_path / "p.onnx", HAND_SOFTMAX, out="probs"))
    result = convert(source, run_dir=tmp_path / "run", task="multiclass", normalization="unit",
                     model_output="probabilities", verbose=False)
    x = phantom_batch(result.preprocess, 4)
    expected = onnx_outputs(source, x)  # the file's own probabilities, nothing appended
    assert np.abs(run_frozen(result.fp32_pb, x) - expected).max() < 1e-5
    assert np.abs(expected.sum(axis=1) - 1).max() < 1e-5


def test_declared_logits_contradicting_a_final_softmax_is_refused(tmp_path):
    source = classifier(tmp_path / "s.onnx", [helper.make_node("Softmax", ["fc"], ["probs"], axis=1)], out="probs")
    with pytest.raises(MedqError, match=r"s\.onnx: .*ends in softmax.*--model-output logits"):
        convert(source, run_dir=tmp_path / "run", normalization="unit", model_output="logits", verbose=False)


def half_input(path):
    """The model of ``classifier`` taking float16 pixels (a model converted with onnxconverter-common's float16
    without keep_io_types): a Cast to float32 first."""
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    model.graph.node[0].input[0] = "images32"
    model.graph.node.insert(0, helper.make_node("Cast", ["images"], ["images32"], to=TensorProto.FLOAT))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_float16_input_is_one_line(tmp_path):
    source = half_input(classifier(tmp_path / "half.onnx"))
    with pytest.raises(MedqError) as err:
        convert(source, run_dir=tmp_path / "run", task="multiclass", normalization="unit", verbose=False)
    text = str(err.value)
    assert "\n" not in text and str(source) in text and "float16" in text


# ---------------------------------------------------------------- TorchScript made elsewhere

def _scripted(tmp_path, module, name):
    torch = pytest.importorskip("torch")
    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation
        torch.jit.script(module.eval()).save(str(path))
    return path


def _gray_net_head_first():
    """A 1-channel network whose classifier convolution is registered before its stem (the first 4-D tensor of its
    state_dict has 16 input channels)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.head = nn.Conv2d(16, 3, 1)
            self.stem = nn.Conv2d(1, 16, 3, padding=1)

        def forward(self, x):
            return self.head(torch.relu(self.stem(x))).mean(dim=(2, 3))

    return Net()


def test_torchscript_channels_come_from_what_the_module_accepts(tmp_path):
    torch = pytest.importorskip("torch")
    model = _gray_net_head_first()
    path = _scripted(tmp_path, model, "gray.pt")
    result = convert(path, run_dir=tmp_path / "run", task="multiclass", normalization="unit", image_size=SIZE,
                     trust_torchscript=True, verbose=False)
    assert result.preprocess == PreprocessSpec(SIZE, 1, "unit")
    x = phantom_batch(result.preprocess, 4)
    with torch.no_grad():
        logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.abs(run_frozen(result.fp32_pb, x) - expected).max() < 1e-5


def test_torchscript_that_runs_only_at_its_own_size_is_one_line(tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * SIZE * SIZE, 2))
    path = _scripted(tmp_path, model, "fixed.pt")
    with pytest.raises(MedqError) as err:  # 224 px, the default, does not fit its Linear layer
        convert(path, run_dir=tmp_path / "run", task="binary", normalization="unit", trust_torchscript=True,
                verbose=False)
    text = str(err.value)
    assert "\n" not in text and str(path) in text and "--image-size" in text


# ---------------------------------------------------------------- checkpoints pickling more than tensors

def test_checkpoint_with_numpy_scalars_is_refused_naming_the_flag_and_loads_when_trusted(tmp_path):
    import argparse

    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from medq.convert.torch_models import load_checkpoint_model

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=2).eval()
    path = tmp_path / "best.pth"  # what many training scripts write
    torch.save({"model": model.state_dict(), "best_auc": np.float64(0.91), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(MedqError) as err:
        load_checkpoint_model(path, "resnet18")
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: the file pickles Python objects") and "--trust-pickle" in text

    loaded = load_checkpoint_model(path, "resnet18", trust_pickle=True)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_a_whole_pickled_model_loads_its_tensors_into_the_named_architecture_when_trusted(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from medq.convert.torch_models import load_checkpoint_model

    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(MedqError, match=r"whole\.pt: the file pickles Python objects .*--trust-pickle"):
        load_checkpoint_model(path, "resnet18")
    loaded = load_checkpoint_model(path, "resnet18", trust_pickle=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.info["layout"] == "pickled ResNet"


def test_a_symbolic_class_axis_is_read_from_shape_inference(tmp_path):
    """Exporters that name every axis dynamic write the output as [N, 'classes']: the count is in the graph."""
    source = classifier(tmp_path / "dyn.onnx", classes=3)
    model = onnx.load(str(source))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "classes"
    onnx.save(model, str(source))
    result = convert(source, run_dir=tmp_path / "run", task="multiclass", normalization="unit", verbose=False)
    x = phantom_batch(result.preprocess, 4)
    logits = onnx_outputs(source, x)
    assert logits.shape == (4, 3) and result.classes == ["class_0", "class_1", "class_2"]
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.abs(run_frozen(result.fp32_pb, x) - expected).max() < 1e-5


# ---------------------------------------------------------------- models that normalise their input themselves

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def normalizing_inside(path, steps):
    """``classifier`` with 3 input channels behind STEPS: (op, per-channel or scalar constant) applied to the input
    first, as a model exported with its own preprocessing does."""
    classifier(path)
    model = onnx.load(str(path))
    graph = model.graph
    graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    w1 = next(t for t in graph.initializer if t.name == "w1")
    w1.CopyFrom(numpy_helper.from_array(np.repeat(numpy_helper.to_array(w1), 3, axis=1) / 3, "w1"))
    current, nodes = "images", []
    for i, (op, value) in enumerate(steps):
        graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32).reshape(1, -1, 1, 1), f"k{i}"))
        nodes.append(helper.make_node(op, [current, f"k{i}"], [f"pre{i}"]))
        current = f"pre{i}"
    graph.node[0].input[0] = current
    for node in reversed(nodes):
        graph.node.insert(0, node)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


RAW_IMAGENET = [("Div", 255.0), ("Sub", IMAGENET_MEAN), ("Div", IMAGENET_STD)]


def test_a_model_normalising_inside_refuses_a_second_normalisation(tmp_path):
    source = normalizing_inside(tmp_path / "own.onnx", RAW_IMAGENET)
    with pytest.raises(MedqError) as err:
        convert(source, run_dir=tmp_path / "run", task="multiclass", normalization="imagenet", verbose=False)
    text = str(err.value)
    assert "\n" not in text and str(source) in text and "pass --normalization raw" in text
    symmetric = normalizing_inside(tmp_path / "sym.onnx", [("Sub", 0.5), ("Div", 0.5)])
    with pytest.raises(MedqError, match=r"sym\.onnx: .*pass --normalization unit"):
        convert(symmetric, run_dir=tmp_path / "run", task="multiclass", normalization="symmetric", verbose=False)


def test_a_model_taking_0_255_pixels_gets_them(tmp_path):
    source = normalizing_inside(tmp_path / "own.onnx", RAW_IMAGENET)
    result = convert(source, run_dir=tmp_path / "run", task="multiclass", verbose=False)  # read from its graph
    assert result.preprocess == PreprocessSpec(SIZE, 3, "raw")
    pixels = np.random.default_rng(5).integers(0, 256, (4, SIZE, SIZE, 3)).astype(np.float32)
    logits = onnx_outputs(source, pixels)  # the file fed 0-255 pixels, as it was made for
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.abs(run_frozen(result.fp32_pb, pixels) - expected).max() < 1e-5


def test_safetensors_checkpoint_loads_every_tensor(tmp_path):
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from medq.convert.torch_models import load_checkpoint_model

    torch.manual_seed(2)
    model = torchvision.models.resnet18(weights=None, num_classes=2).eval()
    path = tmp_path / "model.safetensors"  # Hugging Face / timm's format: no pickle at all
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_checkpoint_model(path, "resnet18")
    assert loaded.info["layout"] == "safetensors"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(MedqError, match=r"damaged\.safetensors: not a readable safetensors file"):
        load_checkpoint_model(damaged, "resnet18")


def _with_input_dims(path, dims):
    model = onnx.load(str(path))
    for dim, value in zip(model.graph.input[0].type.tensor_type.shape.dim, dims):
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    onnx.save(model, str(path))
    return path


def test_a_dynamic_input_size_is_not_guessed(tmp_path):
    """[N, 1, 'H', 'W']: the file does not say the size the model was trained at; 224 by default would be a
    silently different resolution for a model trained at 32 or 512."""
    source = _with_input_dims(classifier(tmp_path / "hw.onnx"), ["N", 1, "H", "W"])
    with pytest.raises(MedqError) as err:
        convert(source, run_dir=tmp_path / "run", task="multiclass", normalization="unit", verbose=False)
    text = str(err.value)
    assert "\n" not in text and str(source) in text and "pass --image-size" in text


def test_two_outputs_are_one_line(tmp_path):
    source = classifier(tmp_path / "two.onnx")
    model = onnx.load(str(source))
    model.graph.output.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["N", 6]))
    onnx.save(model, str(source))
    with pytest.raises(MedqError, match=r"two\.onnx: expected one image input and one output, found 1 input\(s\) "
                                        r"\(images\) and 2 output\(s\)$"):
        convert(source, run_dir=tmp_path / "run", task="multiclass", normalization="unit", verbose=False)


def test_weights_in_an_external_data_file_convert_and_are_hashed(tmp_path):
    import hashlib

    source = classifier(tmp_path / "big.onnx")
    onnx.save_model(onnx.load(str(source)), str(source), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="big.onnx.data", size_threshold=0)
    data = tmp_path / "big.onnx.data"
    result = convert(source, run_dir=tmp_path / "run", task="multiclass", normalization="unit", verbose=False)
    x = phantom_batch(result.preprocess, 4)
    logits = onnx_outputs(source, x)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.abs(run_frozen(result.fp32_pb, x) - expected).max() < 1e-5
    from medq import runrecord

    recorded = runrecord.read_manifest(tmp_path / "run")["source_model"]["external_data"]
    assert recorded == {"big.onnx.data": hashlib.sha256(data.read_bytes()).hexdigest()}


def test_a_softmax_over_the_batch_axis_is_refused(tmp_path):
    source = classifier(tmp_path / "batch.onnx", [helper.make_node("Softmax", ["fc"], ["probs"], axis=0)], out="probs")
    x = phantom_batch(PreprocessSpec(SIZE, 1, "unit"), 2)
    alone = onnx_outputs(source, x[:1])
    assert np.allclose(alone, 1.0)  # the oracle: a lone image gets probability 1 for every class
    with pytest.raises(MedqError) as err:
        convert(source, run_dir=tmp_path / "run", normalization="unit", verbose=False)
    text = str(err.value)
    assert "\n" not in text and str(source) in text and "axis 0, the batch" in text
