"""The op census of INC's INT8 DenseNet121, under configs/deploy.yaml: which ops stay FP32.

This is where DenseNet's INT8 time goes (tests/perf/int8_profile.py measures it): every convolution is INT8, but
INC 2.6 on intel-tensorflow 2.14 leaves the pre-activation BatchNorm+ReLU in front of each dense layer, and every
ConcatV2, in FP32, with a Quantize/Dequantize pair around each. The counts are derived from the FP32 graph's
structure, so a change that puts more ops in FP32 (or fewer in INT8) fails here; a rewrite that moves them to INT8
lowers the expected FP32 counts below.
"""
from pathlib import Path

import numpy as np
import pytest

from medq.graph import op_type_counts

pytestmark = pytest.mark.filterwarnings("ignore")


def _producer(graph_def, name: str):
    nodes = {n.name: n for n in graph_def.node}
    node = nodes[name.split(":")[0].lstrip("^")]
    while node.op == "Identity":
        node = nodes[node.input[0].split(":")[0]]
    return node


@pytest.fixture(scope="module")
def densenet_graphs(repo_root, tmp_path_factory):
    import tensorflow as tf

    from medq.graph import freeze_keras
    from medq.inc.adapters import CalibrationLoader
    from medq.inc.deploy import load_deploy
    from medq.inc.ptq import run_ptq
    from medq.models import build_model

    tf.keras.utils.set_random_seed(0)
    model = build_model("densenet121", (32, 32, 3), 14, "multilabel")
    x = np.random.default_rng(0).normal(size=(16, 32, 32, 3)).astype(np.float32)
    model(x, training=True)  # moving statistics that are not the initial ones, so BN folding is not trivial
    fp32 = freeze_keras(model)
    work = tmp_path_factory.mktemp("census")
    loader = CalibrationLoader(x, np.zeros((16, 14), np.float32), [f"{i}.png" for i in range(16)], batch_size=8)
    result = run_ptq(fp32, load_deploy(Path(repo_root) / "configs" / "deploy.yaml"), inputs=["input"], outputs=["output"],
                     sampling_sizes=[16], calib_dataloader=loader, eval_func=lambda graph: 1.0,
                     workspace=work / "nc_workspace", log_path=work / "inc.log")
    assert result.graph_def is not None
    return fp32, result.graph_def


def test_densenet_int8_census(densenet_graphs):
    fp32, int8 = densenet_graphs
    before, after = op_type_counts(fp32), op_type_counts(int8)
    batchnorms = [n for n in fp32.node if n.op == "FusedBatchNormV3"]
    pre_activation = [n for n in batchnorms if _producer(fp32, n.input[0]).op != "Conv2D"]
    assert (before["Conv2D"], before["ConcatV2"], len(batchnorms), len(pre_activation)) == (120, 58, 121, 62)

    quantized_convs = sum(n for op, n in after.items() if op.startswith("QuantizedConv2D"))
    assert quantized_convs == before["Conv2D"] and "Conv2D" not in after  # every convolution INT8
    assert after.get("QuantizedMatMulWithBiasAndDequantize") == 1  # the classifier head
    # the BatchNorms that follow a convolution are folded into it, the pre-activation ones stay FP32 with their ReLU
    assert after["FusedBatchNormV3"] == len(pre_activation)
    assert after["Relu"] == len(pre_activation)
    assert after.get("ConcatV2", 0) == before["ConcatV2"] and "QuantizedConcatV2" not in after
    # one QuantizeV2 in front of each of those, plus the input's and the head's; a Dequantize after every INT8 tensor
    # that feeds an FP32 op: the 58 concatenated outputs, 3 transitions' pools, the stem's pool, the head's input
    assert after["QuantizeV2"] == len(pre_activation) + 2
    assert after["Dequantize"] == before["ConcatV2"] + 3 + 1 + 1
