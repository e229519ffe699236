"""The quantize stage's pure parts (precision paths, calibration choice) and its errors before INC is reached."""
import json

import numpy as np
import pytest

from medq import artifacts, runrecord
from medq.config import load_config
from medq.errors import MedqError
from medq.inc.deploy import DeployError
from medq.calibration import calibration_batch_size, calibration_indices
from medq.inc.adapters import CalibrationLoader
from medq.precision import describe_cpu, select_precisions
from medq.quantize import run_quantize

ALL = ["fp32", "bf16", "int8", "int8-bf16"]
SAPPHIRE_RAPIDS = {"model": "Xeon 8480", "avx512f": True, "avx512_vnni": True, "vnni": True, "avx512_bf16": True,
                   "amx_bf16": True, "amx_int8": True, "bf16": True}
CASCADE_LAKE = {"model": "Xeon 8280", "avx512f": True, "avx512_vnni": True, "vnni": True, "avx512_bf16": False,
                "amx_bf16": False, "amx_int8": False, "bf16": False}


def test_precisions_with_bf16_hardware():
    kept, skipped = select_precisions(ALL, SAPPHIRE_RAPIDS)
    assert kept == ALL and skipped == {}


def test_precisions_without_bf16_hardware_skip_the_bf16_paths_with_a_reason():
    kept, skipped = select_precisions(ALL, CASCADE_LAKE)
    assert kept == ["fp32", "int8"]
    assert set(skipped) == {"bf16", "int8-bf16"}
    assert all("AVX512-BF16" in why and "AMX-BF16" in why for why in skipped.values())


def test_precisions_keep_order_drop_duplicates_and_name_unknown_paths():
    kept, skipped = select_precisions(["int8", "fp32", "int8", "fp16"], {"bf16": False})
    assert kept == ["int8", "fp32"] and list(skipped) == ["fp16"] and "unknown" in skipped["fp16"]
    # a dict with only the raw flags (no derived 'bf16') is understood too
    assert select_precisions(["bf16"], {"amx_bf16": True}) == (["bf16"], {})


def test_describe_cpu_says_what_was_detected():
    text = describe_cpu(CASCADE_LAKE)
    assert text == "Xeon 8280: VNNI yes, AVX512-BF16 no, AMX-BF16 no, AMX-INT8 no"


def one_hot(classes: list[int], k: int = 2) -> np.ndarray:
    return np.eye(k, dtype=np.float32)[classes]


def test_calibration_indices_are_stratified_and_every_prefix_keeps_the_balance():
    labels = one_hot([0] * 30 + [1] * 70)
    order = calibration_indices(labels, len(labels), seed=3)
    assert sorted(order.tolist()) == list(range(100))  # a permutation: all of train, each once
    for n in (10, 20, 50):
        chosen = calibration_indices(labels, n, seed=3)
        assert chosen.tolist() == order[:n].tolist()
        assert abs(int(labels[chosen, 0].sum()) - round(0.3 * n)) <= 1


def test_calibration_indices_are_seeded_and_capped():
    labels = one_hot([0, 1] * 20)
    assert calibration_indices(labels, 10, 1).tolist() == calibration_indices(labels, 10, 1).tolist()
    assert calibration_indices(labels, 10, 1).tolist() != calibration_indices(labels, 10, 2).tolist()
    assert len(calibration_indices(labels, 500, 1)) == 40
    assert len(calibration_indices(np.zeros((0, 2)), 10, 1)) == 0


def test_calibration_indices_multilabel_rows_without_findings():
    labels = np.zeros((12, 3), np.float32)
    labels[:4, 0] = 1
    labels[4:6, 2] = 1
    chosen = calibration_indices(labels, 6, seed=0)
    assert len(set(chosen.tolist())) == 6
    assert int((labels[chosen].sum(axis=1) == 0).sum()) == 3  # half of the rows have no finding, half of the pick


@pytest.mark.parametrize("sizes, batch", [([100], 25), ([64], 32), ([50, 100], 25), ([83], 1), ([24], 24)])
def test_calibration_batch_divides_every_sampling_size(sizes, batch):
    assert calibration_batch_size(sizes) == batch


def test_calibration_loader_records_what_it_hands_out():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    loader = CalibrationLoader(x, one_hot([0] * 10), [f"f{i}" for i in range(10)], batch_size=4)
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [4, 4, 2] and batches[0][1].shape == (4, 2)
    for i, _ in enumerate(loader):  # a consumer that stops early, as INC does after its calibration iterations
        if i == 1:
            break
    assert loader.images_per_pass == [10, 8] and loader.paths_fed == {f"f{i}" for i in range(10)}


# --- errors before INC is reached: one line each -----------------------------------------------------------------

def stage_config(tmp_path, deploy="configs/deploy.yaml"):
    return load_config(None, [f"run.output_dir={tmp_path}", "run.name=r", f"quantize.deploy={deploy}"])


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text
    return text


def test_missing_deploy_file(tmp_path):
    config = stage_config(tmp_path, deploy=str(tmp_path / "missing.yaml"))
    with pytest.raises(DeployError) as caught:
        run_quantize(config)
    assert "missing.yaml: deploy file not found" in one_line(caught.value)


def test_malformed_deploy_file(tmp_path):
    bad = tmp_path / "deploy.yaml"
    bad.write_text("model:\n  name: m\n   framework: tensorflow\n")
    with pytest.raises(DeployError) as caught:
        run_quantize(stage_config(tmp_path, deploy=str(bad)))
    assert f"{bad}: not valid YAML at line" in one_line(caught.value)


def test_run_without_frozen_graph(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    config = stage_config(tmp_path)
    runrecord.commit(config.run_dir, "train", facts={"task": "binary"})
    with pytest.raises(MedqError) as caught:
        run_quantize(config)
    # the run has no model at all: the stage that is really missing is train, then freeze
    assert "no frozen FP32 graph in this run" in one_line(caught.value)
    assert "run `medq train --run-name r` first (then freeze)" in str(caught.value)


def test_frozen_graph_file_deleted(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    config = stage_config(tmp_path)
    pb = config.run_dir / "model_fp32.pb"
    artifacts.write_bytes(pb, b"x")
    runrecord.commit(config.run_dir, "freeze", artifacts={"fp32_pb": pb})
    pb.unlink()
    with pytest.raises(MedqError) as caught:
        run_quantize(config)
    assert f"{pb}: recorded in the run's manifest but missing; rerun `medq freeze" in one_line(caught.value)


def test_deploy_tensor_names_must_match_the_frozen_graph(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    config = stage_config(tmp_path)
    pb = artifacts.write_bytes(config.run_dir / "model_fp32.pb", b"x")
    manifest = {"task": "binary", "classes": ["A", "B"], "input_name": "Placeholder", "output_name": "output",
                "preprocess": {"image_size": 32, "channels": 1, "normalization": "unit"}}
    runrecord.commit(config.run_dir, "freeze", artifacts={"fp32_pb": pb}, facts=manifest)
    with pytest.raises(DeployError) as caught:
        run_quantize(config)
    assert "model.inputs: ['input'] is not the frozen graph's input 'Placeholder'" in one_line(caught.value)
    recorded = json.loads((config.run_dir / "manifest.json").read_text())["stages"]["quantize"]
    assert recorded["status"] == "failed" and "model.inputs" in recorded["error"]


def test_a_failed_quantize_marks_the_earlier_int8_graph_stale(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    config = stage_config(tmp_path)
    pb = artifacts.write_bytes(config.run_dir / "model_fp32.pb", b"fp32")
    manifest = {"task": "binary", "classes": ["A", "B"], "input_name": "Placeholder", "output_name": "output",
                "preprocess": {"image_size": 32, "channels": 1, "normalization": "unit"}}
    runrecord.commit(config.run_dir, "freeze", artifacts={"fp32_pb": pb}, facts=manifest)
    int8 = artifacts.write_bytes(config.run_dir / "model_int8.pb", b"int8")
    runrecord.commit(config.run_dir, "quantize", artifacts={"int8_pb": int8}, inputs=("fp32_pb",), status="ok")
    assert runrecord.usable(config.run_dir, "int8_pb")
    with pytest.raises(DeployError):
        run_quantize(config)  # model.inputs no longer matches: this quantize fails after the earlier success
    assert not runrecord.usable(config.run_dir, "int8_pb") and int8.read_bytes() == b"int8"
    with pytest.raises(MedqError, match="stale, the last `medq quantize` .* failed"):
        runrecord.verified_path(config.run_dir, "int8_pb")


# --- what stayed out of INT8, and why ----------------------------------------------------------------------------

def graph(*nodes):
    from tensorflow.core.framework import graph_pb2, types_pb2

    out = graph_pb2.GraphDef()
    for name, op, *dtype in nodes:
        node = out.node.add(name=name, op=op)
        node.attr["T"].type = types_pb2.DT_BFLOAT16 if dtype == ["bf16"] else types_pb2.DT_FLOAT
    return out


def test_fallback_ops_name_each_reason():
    from types import SimpleNamespace

    from medq.inc.ptq import Trial
    from medq.inc.fallback import fallback_ops

    fp32 = graph(("input", "Placeholder"), ("c1", "Conv2D"), ("c2", "Conv2D"), ("c3", "Conv2D"), ("c4", "Conv2D"),
                 ("cat1", "ConcatV2"), ("cat2", "ConcatV2"), ("pool", "MaxPool"), ("m1", "MatMul"), ("m2", "MatMul"))
    int8 = graph(("input", "Placeholder"), ("c1", "Conv2D"),
                 ("c2_eightbit_requantize", "QuantizedConv2DWithBiasAndRequantize"), ("c3", "_FusedConv2D", "bf16"),
                 ("c4", "Conv2D"), ("cat1", "ConcatV2"), ("cat2_eightbit_quantized_concatv2", "QuantizedConcatV2"),
                 ("pool_eightbit_quantized_maxpool", "QuantizedMaxPool"),
                 ("m1_eightbit_requantize", "QuantizedMatMulWithBiasAndDequantize"), ("m2", "MatMul"))
    capability = [(n, "Conv2D") for n in ("c1", "c2", "c3")] + [("m1", "MatMul"), ("m2", "MatMul")]
    result = SimpleNamespace(capability=capability,
                             trials=[Trial(1, ["c2", "c3", "m1"], ["c1"], [], metric=0.5),
                                     Trial(2, ["c2", "m1"], ["c1"], ["c3"], metric=0.9)], bf16_ops=["c3"],
                             int8_ops=["c2", "m1", "cat1", "cat2"],
                             op_table={"ConcatV2": {"total": 2, "int8": 1, "bf16": 0, "fp32": 1},
                                       "MaxPool": {"total": 1, "int8": 1, "bf16": 0, "fp32": 0}})
    deploy = SimpleNamespace(op_wise={"c[1]": {"activation": {"dtype": ["fp32"]}}}, optype_wise=None,
                             model_wise=None, recipes={"last_conv_or_matmul_quantization": False})
    found = {op["name"]: op for op in fallback_ops(fp32, int8, result, deploy)}
    # c2, m1, cat2 are quantized kernels; MaxPool has no FP32 count in INC's table
    assert set(found) == {"c1", "c3", "c4", "cat1", "m2"}
    # cat1 was INT8 in INC's final decision and still is FP32 in the graph: the rewrite, not the tuning, kept it
    assert found["cat1"]["op_type"] == "ConcatV2" and "matched no quantized kernel" in found["cat1"]["reason"]
    assert found["c1"]["reason"].startswith("deploy.yaml asks for FP32")
    assert "took it out of INT8" in found["c3"]["reason"] and "trial 1 scored 0.5000" in found["c3"]["reason"]
    assert (found["c3"]["runs_as"], found["c3"]["in_int8_graph"]) == ("BF16", "_FusedConv2D")
    assert "no INT8 pattern" in found["c4"]["reason"] and found["c4"]["runs_as"] == "FP32"
    assert found["m2"]["reason"] == "recipe last_conv_or_matmul_quantization: false"


def test_chance_level_is_what_a_model_that_learned_nothing_scores():
    from medq.metrics import chance_level

    single = np.array([[1, 0]] * 7 + [[0, 1]] * 3, np.float32)
    assert chance_level("accuracy", single, "binary") == pytest.approx(0.7)
    assert chance_level("auc", single, "binary") == 0.5
    multi = np.array([[1, 0], [0, 0], [0, 0], [1, 1]], np.float32)  # label 0: half positive; label 1: 1 in 4
    assert chance_level("accuracy", multi, "multilabel") == pytest.approx((0.5 + 0.75) / 2)
