"""medq.convert with PyTorch input: real torchvision architectures with random weights, saved the ways checkpoints
arrive in the wild, loaded strictly and converted with the numerics checked. Needs the extra
(pip install -r env/requirements-convert.txt); skipped without it."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
nn = torch.nn

from medq import runrecord
from medq import artifacts  # noqa: E402
from medq.convert import CHEXNET_CLASSES, convert  # noqa: E402
from medq.convert.parity import phantom_batch, run_frozen  # noqa: E402
from medq.convert.torch_models import ARCHITECTURES, load_checkpoint_model, model_from_state_dict  # noqa: E402
from medq.errors import MedqError  # noqa: E402
from medq.graph import FrozenGraph  # noqa: E402
from medq.preprocess import PreprocessSpec  # noqa: E402

SIZE = 64  # DenseNet/GoogLeNet need about 32 px or more; 64 keeps every conversion fast


def randomize(model, seed=0):
    """Random weights and BatchNorm statistics (fresh BN layers are the identity and would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return model.eval()


def one_channel(model, attr):
    """What the breast-ultrasound study did: the first convolution takes 1 gray channel."""
    parent, _, name = attr.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, name)
    setattr(owner, name, nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding,
                                   bias=old.bias is not None))
    return model


class ArnowengDenseNet121(nn.Module):
    """CheXNet as arnoweng wrote it: the torchvision model is an attribute, the classifier ends in Sigmoid."""

    def __init__(self, classes=14):
        super().__init__()
        self.densenet121 = torchvision.models.densenet121(weights=None)
        self.densenet121.classifier = nn.Sequential(nn.Linear(1024, classes), nn.Sigmoid())

    def forward(self, x):
        return self.densenet121(x)


def arnoweng_checkpoint(model):
    """DataParallel keys, the legacy DenseNet names (norm.1, conv.1, ...) and no BatchNorm step counters (torch 0.3)."""
    state = nn.DataParallel(model).state_dict()
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
              for k, v in state.items() if not k.endswith("num_batches_tracked")}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    return {"epoch": 11, "state_dict": legacy, "optimizer": optimizer.state_dict()}


def torch_out(model, x_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def inputs(spec, n=6):
    """Phantoms plus uniform noise over the normalised range, independent of what parity.json used."""
    noise = np.random.default_rng(123).uniform(-1, 1, (2, *spec.input_shape)).astype(np.float32)
    return np.concatenate([phantom_batch(spec, n)[::-1], noise])


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def assert_parity(result):
    report = json.loads((result.run_dir / "parity.json").read_text())
    assert report["passed"] and report["max_abs_diff"] < 1e-4
    assert set(report["engines"]) == {"pytorch", "onnxruntime", "tensorflow"}
    for pair in report["pairs"].values():
        assert pair["max_abs_diff"] < 1e-4 and pair["top1_agreement"] == 1.0
    assert report["saturated_fraction"] < 0.5  # else agreeing probabilities would prove little
    for pair in report.get("raw_outputs", {}).get("pairs", {}).values():  # logits, when medq appended the head
        assert pair["max_rel_diff"] < 1e-4
    return report


# ---------------------------------------------------------------- checkpoint layouts, strict loading (no conversion)

def _layouts(model):
    sd = model.state_dict()
    return {
        "bare": sd,
        "training-dict": {"state_dict": sd, "epoch": 3,
                          "optimizer": torch.optim.SGD(model.parameters(), 0.1).state_dict()},
        "model_state_dict": {"model_state_dict": sd, "epoch": 1},
        "dataparallel": nn.DataParallel(model).state_dict(),
        "model": {"model": nn.DataParallel(model).state_dict(), "epoch": 7, "best_auc": 0.8},
        "net": {"net": sd, "acc": 91.2},
    }


@pytest.mark.parametrize("layout", ["bare", "training-dict", "model_state_dict", "dataparallel", "model", "net"])
def test_checkpoint_layouts_load_every_tensor(tmp_path, layout):
    model = randomize(torchvision.models.resnet18(weights=None, num_classes=3), seed=1)
    path = tmp_path / f"{layout}.pt"
    torch.save(_layouts(model)[layout], path)
    loaded = load_checkpoint_model(path, "resnet18")
    assert (loaded.in_channels, loaded.num_outputs) == (3, 3)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))


def test_arnoweng_chexnet_checkpoint_loads_every_tensor(tmp_path):
    model = randomize(ArnowengDenseNet121())
    path = tmp_path / "model.pth.tar"
    torch.save(arnoweng_checkpoint(model), path)
    loaded = load_checkpoint_model(path, "chexnet")
    for key, value in model.densenet121.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded.model.state_dict()[key], value), key
    assert loaded.info["prefix_stripped"] == "module.densenet121."
    assert loaded.info["legacy_names_renamed"] > 0 and loaded.info["epoch"] == 11


@pytest.mark.parametrize("arch, channels", [
    ("densenet121", 3), ("vgg16", 1), ("vgg16_bn", 3), ("googlenet", 1), ("resnet34", 1), ("resnet50", 3),
    ("resnet101", 1),
])
def test_every_architecture_builds_from_its_state_dict(arch, channels):
    extra = {"aux_logits": True, "init_weights": False} if arch == "googlenet" else {}  # trained with aux heads
    model = getattr(torchvision.models, arch)(weights=None, num_classes=5, **extra)
    if channels == 1:
        one_channel(model, ARCHITECTURES[arch].first_conv.rsplit(".", 1)[0])
    model = randomize(model)
    loaded = model_from_state_dict(arch, model.state_dict(), f"{arch}.pt")
    assert (loaded.in_channels, loaded.num_outputs) == (channels, 5)
    x = torch.randn(2, channels, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(loaded.model(x), getattr(expected, "logits", expected), atol=1e-6)
    if arch == "googlenet":
        assert loaded.info["training_only_dropped"]["tensors"] > 0


def test_missing_tensor_is_named(tmp_path):
    state = randomize(torchvision.models.resnet18(weights=None, num_classes=2)).state_dict()
    del state["layer4.1.bn2.running_var"]
    path = tmp_path / "broken.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(MedqError) as err:
        load_checkpoint_model(path, "resnet18")
    text = str(err.value)
    assert text.startswith(f"{path}: checkpoint does not fit resnet18 (1 missing [layer4.1.bn2.running_var]; "
                           "0 unexpected)")
    assert "\n" not in text


def test_wrong_architecture_lists_keys_and_suggests_the_right_one(tmp_path):
    path = tmp_path / "chexnet.pth.tar"
    torch.save(arnoweng_checkpoint(ArnowengDenseNet121()), path)
    with pytest.raises(MedqError, match=r"chexnet\.pth\.tar: checkpoint does not fit densenet121 \(2 missing "
                                        r"\[classifier\.weight, classifier\.bias\]; 2 unexpected "
                                        r"\[classifier\.0\.weight, classifier\.0\.bias\]\); it looks like chexnet"):
        load_checkpoint_model(path, "densenet121")


def test_pickled_modules_and_missing_arch_are_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(torchvision.models.resnet18(weights=None), path)  # pickles the class: code, not just tensors
    with pytest.raises(MedqError, match="whole_model.pt: the file pickles Python objects"):
        load_checkpoint_model(path, "resnet18")
    with pytest.raises(MedqError, match="whole_model.pt: .*pass the architecture"):
        convert(path, run_dir=tmp_path / "run", verbose=False)


# ---------------------------------------------------------------- full conversions

@pytest.mark.slow  # converted through onnx2tf in a child process
def test_chexnet_checkpoint_converts_with_what_quantize_needs(tmp_path):
    model = randomize(ArnowengDenseNet121(), seed=3)
    path = tmp_path / "model.pth.tar"
    torch.save(arnoweng_checkpoint(model), path)
    run = tmp_path / "chexnet"
    result = convert(path, arch="chexnet", run_dir=run, image_size=SIZE, verbose=False)
    assert_parity(result)

    spec = PreprocessSpec(SIZE, 3, "imagenet")
    x = inputs(spec)
    assert np.abs(run_frozen(result.fp32_pb, x) - torch_out(model, x)).max() < 1e-4

    manifest = runrecord.read_manifest(run)
    assert runrecord.recorded_path(run, "fp32_pb") == run / "model_fp32.pb"
    assert manifest["artifacts"]["fp32_pb"]["sha256"] == artifacts.sha256(run / "model_fp32.pb")
    assert manifest["input_name"] == "input" and manifest["output_name"] == "output"
    assert manifest["input_shape"] == [SIZE, SIZE, 3]
    assert manifest["classes"] == list(CHEXNET_CLASSES) and manifest["task"] == "multilabel"
    assert manifest["preprocess"] == {"image_size": SIZE, "channels": 3, "normalization": "imagenet",
                                      "bit_depth": "auto"}
    assert manifest["source_model"]["arch"] == "chexnet" and manifest["source_model"]["appended_head"] == []
    assert (run / "model.onnx").is_file() and (run / "saved_model" / "saved_model.pb").is_file()
    graph = FrozenGraph(run / "model_fp32.pb")  # what quantize/benchmark load: names from the manifest
    assert graph.input.shape.as_list() == [None, SIZE, SIZE, 3] and graph.output.shape.as_list() == [None, 14]
    graph.close()

    # ... and goes on through INC and the benchmark like any medq model, on NIH-layout phantoms. The weights are
    # random, so the accuracy criterion is made wide: this checks the plumbing, not the model.
    from medq.benchmark import run_benchmark
    from medq.config import load_config
    from medq.data.phantoms import generate_phantoms
    from medq.quantize import run_quantize

    data = tmp_path / "nih"
    generate_phantoms("chest-multilabel", data, n_train=40, n_val=0, n_test=16, size=SIZE, seed=2)
    deploy = Path(__file__).parent / "fixtures" / "wide_criterion_deploy.yaml"
    config = load_config(None, [f"run.output_dir={tmp_path}", "run.name=chexnet", f"data.root={data}",
                                "data.format=nih-chestxray14", f"quantize.deploy={deploy}",
                                "quantize.allow_chance=true",
                                "benchmark.precisions=[fp32, int8]", "benchmark.reference=[]",
                                "benchmark.instances=[]", "benchmark.batch_sizes=[8]", "benchmark.batch_size=8",
                                "benchmark.warmup=1", "benchmark.latency_iterations=3",
                                "benchmark.throughput_iterations=2"])
    int8 = run_quantize(config)
    assert runrecord.read_manifest(run)["stages"]["quantize"]["quantized_kernels"] > 0
    report = run_benchmark(config)
    assert [(r["id"], r["model"]) for r in report["results"]] == [("tensorflow-fp32", "model_fp32.pb"),
                                                                  ("tensorflow-int8", int8.name)]
    assert report["classes"] == list(CHEXNET_CLASSES) and report["objective"] == "auc"


def test_one_channel_resnet18_study_checkpoint_gets_a_softmax(tmp_path):
    model = randomize(one_channel(torchvision.models.resnet18(weights=None, num_classes=2), "conv1"), seed=4)
    path = tmp_path / "resnet18_bus.pt"
    torch.save(model.state_dict(), path)  # the study saved bare state_dicts
    result = convert(path, arch="resnet18", run_dir=tmp_path / "bus", task="binary", normalization="symmetric",
                     classes=["benign", "malignant"], image_size=SIZE, verbose=False)
    assert_parity(result)
    assert result.task == "binary" and result.preprocess == PreprocessSpec(SIZE, 1, "symmetric")
    x = inputs(result.preprocess)
    assert np.abs(run_frozen(result.fp32_pb, x) - softmax(torch_out(model, x))).max() < 1e-4
    assert runrecord.read_manifest(result.run_dir)["source_model"]["appended_head"] == ["softmax"]


@pytest.mark.slow  # converted through onnx2tf in a child process
def test_googlenet_dataparallel_model_state_dict_converts(tmp_path):
    model = torchvision.models.googlenet(weights=None, num_classes=3, aux_logits=True, init_weights=False)
    model = randomize(one_channel(model, "conv1.conv"), seed=5)
    path = tmp_path / "googlenet.pth"
    torch.save({"model_state_dict": nn.DataParallel(model).state_dict(), "epoch": 30}, path)
    result = convert(path, arch="googlenet", run_dir=tmp_path / "gn", task="multiclass", normalization="unit",
                     image_size=SIZE, verbose=False)
    assert_parity(result)
    x = inputs(result.preprocess)
    assert np.abs(run_frozen(result.fp32_pb, x) - softmax(torch_out(model, x))).max() < 1e-4


class SmallNet(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_needs_explicit_trust(tmp_path):
    model = randomize(SmallNet(), seed=6)
    path = tmp_path / "scripted.pt"
    torch.jit.script(model).save(str(path))
    with pytest.raises(MedqError, match="scripted.pt: is a TorchScript program; loading it runs code"):
        convert(path, run_dir=tmp_path / "ts", task="multilabel", normalization="imagenet", verbose=False)
    result = convert(path, run_dir=tmp_path / "ts", task="multilabel", normalization="imagenet", image_size=SIZE,
                     trust_torchscript=True, verbose=False)
    assert_parity(result)
    x = inputs(result.preprocess)
    assert np.abs(run_frozen(result.fp32_pb, x) - 1 / (1 + np.exp(-torch_out(model, x)))).max() < 1e-4
