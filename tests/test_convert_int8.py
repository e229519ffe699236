"""A PyTorch-trained torchvision ResNet18 through `medq convert` → `medq quantize`: INC's first trial holds, with
every convolution and the stem's max pooling in INT8, and the INT8 graph agrees with the FP32 model as PyTorch
computes it. Real weights matter (an untrained net says nothing about quantization), so the test trains one, in
PyTorch, on chest phantoms at 64 px. Needs the convert extra (torch, torchvision)."""
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from medq import runrecord  # noqa: E402
from medq.data import pinned  # noqa: E402
from medq.config import load_config  # noqa: E402
from medq.graph import FrozenGraph, op_type_counts, read_graph_def  # noqa: E402
from medq.metrics import paired_comparison  # noqa: E402
from medq.preprocess import PreprocessSpec, load_batch  # noqa: E402

SIZE = 64
DEPLOY = Path(__file__).resolve().parents[1] / "configs" / "deploy.yaml"


def deploy_within(tmp_path: Path, auc: float) -> Path:
    """configs/deploy.yaml with an absolute criterion: INT8's noise on a 75-image validation split can reach 1%
    relative, a collapsed graph (AUC 0.5) cannot pass 0.03 absolute."""
    document = yaml.safe_load(DEPLOY.read_text())
    document["tuning"]["accuracy_criterion"] = {"absolute": auc}
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def train_resnet18(x: np.ndarray, y: np.ndarray, epochs: int = 6) -> "torch.nn.Module":
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=2)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    images, labels = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(images)).split(32):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval()


@pytest.mark.slow
def test_converted_resnet18_quantizes_at_inc_first_trial_and_agrees_with_pytorch(tmp_path):
    from medq.convert import convert
    from medq.data.phantoms import generate_phantoms
    from medq.quantize import run_quantize

    data = tmp_path / "chest_xray"
    generate_phantoms("chest-pneumonia", data, n_train=300, n_val=0, n_test=80, size=SIZE + 16, seed=7)
    config = load_config(None, [f"data.root={data}", "data.generate=false", "data.val_fraction=0.25",
                                f"run.output_dir={tmp_path / 'output'}", "run.name=resnet18",
                                f"preprocess.image_size={SIZE}", "preprocess.channels=3",
                                "preprocess.normalization=imagenet",
                                f"quantize.deploy={deploy_within(tmp_path, 0.03)}"])
    index = pinned.run_index(config)  # the split quantize will use: train in PyTorch on its training images
    spec = PreprocessSpec(SIZE, 3, "imagenet")
    model = train_resnet18(load_batch(index.paths("train"), spec), index.labels("train").argmax(axis=1))
    checkpoint = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), checkpoint)

    convert(checkpoint, run_dir=config.run_dir, arch="resnet18", task="binary", classes=["NORMAL", "PNEUMONIA"],
            image_size=SIZE, normalization="imagenet", verbose=False)
    fp32_ops = op_type_counts(read_graph_def(config.run_dir / "model_fp32.pb"))
    assert "PadV2" not in fp32_ops  # onnx2tf's -FLT_MAX pooling padding is gone
    int8_pb = run_quantize(config)

    stage = runrecord.read_manifest(config.run_dir)["stages"]["quantize"]
    assert len(stage["trials"]) == 1 and stage["trials"][0]["fp32_ops"] == []  # INC's first trial: all of it INT8
    int8_ops = op_type_counts(read_graph_def(int8_pb))
    assert "Conv2D" not in int8_ops and "MaxPool" not in int8_ops and int8_ops.get("QuantizedMaxPool") == 1
    assert sum(n for op, n in int8_ops.items() if op.startswith("QuantizedConv2D")) == fp32_ops["Conv2D"]

    # FP32 computed independently: the PyTorch model itself, on test images neither calibration nor tuning saw
    x_test = load_batch(index.paths("test"), spec)
    with torch.no_grad():
        p_fp32 = torch.softmax(model(torch.from_numpy(np.ascontiguousarray(x_test.transpose(0, 3, 1, 2)))), 1).numpy()
    with FrozenGraph(int8_pb) as graph:
        p_int8 = graph.predict(x_test)
    comparison = paired_comparison("binary", index.labels("test"), p_fp32, p_int8, margin=0.05)
    assert comparison["flipped_fraction"] <= 0.1 and comparison["mean_abs_diff"] < 0.08
    assert -0.05 <= comparison["auc_difference_ci"][0] and comparison["auc_difference_ci"][1] <= 0.05
    assert p_int8[:, 1].std() > 0.5 * p_fp32[:, 1].std()  # not a constant output
