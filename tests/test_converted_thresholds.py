"""A converted run (`medq convert`: model_fp32.pb, no Keras model) evaluates on its frozen graph and gets operating
thresholds chosen on its validation split by the config's policy — checked against sklearn's ROC on probabilities
computed by onnxruntime from the source ONNX file — while a trained run's thresholds are never replaced."""
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.metrics import roc_curve

from medq import thresholds
from medq.config import load_config
from medq.convert import convert
from medq.data import pinned
from medq.data.phantoms import generate_phantoms
from medq.preprocess import PreprocessSpec, load_batch
from medq.train import run_evaluate
from test_convert_onnx import tiny_onnx

SIZE = 32
TARGET = 0.8


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    data = root / "chest_xray"
    generate_phantoms("chest-pneumonia", data, n_train=40, n_val=0, n_test=16, size=48, seed=5)
    source = tiny_onnx(root / "study.onnx", classes=2, channels=1, size=SIZE, batch=1, seed=3)
    config = load_config(None, [f"data.root={data}", "data.generate=false", f"run.output_dir={root / 'output'}",
                                "run.name=converted", f"preprocess.image_size={SIZE}",
                                "thresholds.policy=sensitivity", f"thresholds.target={TARGET}"])
    convert(source, run_dir=config.run_dir, task="binary", classes=["NORMAL", "PNEUMONIA"], normalization="unit",
            verbose=False)
    return SimpleNamespace(config=config, source=source, data=data)


def onnx_probabilities(source: Path, paths: list[str]) -> np.ndarray:
    """The source file in onnxruntime (NCHW), softmax over its logits: no TensorFlow involved."""
    x = load_batch(paths, PreprocessSpec(SIZE, 1, "unit")).transpose(0, 3, 1, 2)
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_evaluate_runs_the_graph_and_chooses_thresholds_that_meet_the_policy(converted):
    config = converted.config
    assert not (config.run_dir / "model.keras").exists()
    report = run_evaluate(config)
    manifest = json.loads((config.run_dir / "manifest.json").read_text())
    record = manifest["thresholds"]
    assert record["split"] == "val" and record["policy"] == "sensitivity" and record["target"] == TARGET
    assert record["chosen_for"] == {"fp32_pb": manifest["artifacts"]["fp32_pb"]["sha256"]}
    t = record["classes"]["PNEUMONIA"]["value"]

    index = pinned.run_index(config)
    truth = index.labels("val")[:, 1] >= 0.5
    p = onnx_probabilities(converted.source, index.paths("val"))[:, 1]
    fpr, tpr, candidates = roc_curve(truth, p, drop_intermediate=False)
    best = candidates[np.flatnonzero(tpr >= TARGET - 1e-12)[0]]  # the highest threshold meeting the target
    assert ((p >= t) == (p >= best)).all()  # t calls exactly the images sklearn's optimal point calls
    assert (p >= t)[truth].mean() >= TARGET
    assert record["classes"]["PNEUMONIA"]["validation"]["sensitivity"] == pytest.approx((p >= t)[truth].mean())

    points = report["single_crop"]["operating_points"]
    assert points["source"] == "validation" and points["classes"]["PNEUMONIA"]["threshold"] == t
    test_truth = index.labels("test")[:, 1] >= 0.5
    p_test = onnx_probabilities(converted.source, index.paths("test"))[:, 1]
    assert points["classes"]["PNEUMONIA"]["sensitivity"] == pytest.approx((p_test >= t)[test_truth].mean())
    assert report["model"] == "fp32_pb"

    run_evaluate(config)  # thresholds the run has are kept, not chosen again
    assert json.loads((config.run_dir / "manifest.json").read_text())["thresholds"] == record


def test_external_evaluation_of_a_converted_run_runs_its_graph(converted, tmp_path):
    from sklearn.metrics import roc_auc_score

    from medq.external import run_external

    rsna = tmp_path / "rsna"
    generate_phantoms("rsna-dicom", rsna, n_train=30, n_val=0, n_test=0, size=48, seed=9)
    other = load_config(None, [f"data.root={rsna}", "data.format=rsna-pneumonia", "data.generate=false",
                               f"run.output_dir={tmp_path / 'output'}"])
    result = run_external(converted.config.run_dir, other, split="all")
    assert result["model"] == "fp32_pb"
    with open(rsna / "stage_2_detailed_class_info.csv", newline="") as fh:
        classes = {row["patientId"]: row["class"] for row in csv.DictReader(fh)}
    paths = [image["path"] for image in result["images"]]
    truth = np.array([classes[Path(p).stem] == "Lung Opacity" for p in paths])
    p = onnx_probabilities(converted.source, paths)[:, 1]
    assert result["metrics"]["PNEUMONIA"]["auc"] == pytest.approx(roc_auc_score(truth, p), abs=1e-5)


def _manifest(artifacts: dict[str, str], record=None, task="binary", classes=("NORMAL", "PNEUMONIA")):
    return SimpleNamespace(artifacts={k: SimpleNamespace(sha256=v) for k, v in artifacts.items()},
                           facts=SimpleNamespace(thresholds=record, task=task, classes=list(classes)))


def test_only_a_converted_run_without_current_thresholds_gets_them_chosen():
    record = thresholds.choose("binary", np.eye(2)[[0, 1, 1, 0]], np.array([[.9, .1], [.2, .8], [.6, .4], [.7, .3]]),
                               ["NORMAL", "PNEUMONIA"], thresholds.Policy("youden"), chosen_for={"fp32_pb": "ccc"})
    # a trained run: train and tune own its thresholds, even when it has none or they are stale
    assert thresholds.to_choose(_manifest({"keras_model": "aaa", "fp32_pb": "ccc"})) is None
    assert thresholds.to_choose(_manifest({"keras_model": "aaa", "fp32_pb": "ccc"}, record)) is None
    # a converted run: none yet, or chosen for the graph it had before a reconversion → choose; current → keep
    assert "no operating thresholds" in thresholds.to_choose(_manifest({"fp32_pb": "ccc"}))
    assert "earlier model" in thresholds.to_choose(_manifest({"fp32_pb": "ddd"}, record))
    assert thresholds.to_choose(_manifest({"fp32_pb": "ccc"}, record)) is None
    current = thresholds.Thresholds.from_manifest(_manifest({"fp32_pb": "ccc"}, record), "binary",
                                                  ["NORMAL", "PNEUMONIA"])
    assert current.source == "validation" and current.values == {"PNEUMONIA": record["classes"]["PNEUMONIA"]["value"]}


@pytest.mark.slow
def test_quantize_chooses_a_converted_runs_thresholds_on_validation(converted, tmp_path, repo_root):
    from medq.quantize import run_quantize

    config = load_config(None, [f"data.root={converted.data}", "data.generate=false",
                                f"run.output_dir={tmp_path}", "run.name=q", f"preprocess.image_size={SIZE}",
                                "thresholds.policy=specificity", f"thresholds.target={TARGET}",
                                f"quantize.deploy={Path(repo_root) / 'tests' / 'fixtures' / 'wide_criterion_deploy.yaml'}",
                                "quantize.allow_chance=true"])
    convert(converted.source, run_dir=config.run_dir, task="binary", classes=["NORMAL", "PNEUMONIA"],
            normalization="unit", verbose=False)
    run_quantize(config)
    manifest = json.loads((config.run_dir / "manifest.json").read_text())
    record = manifest["thresholds"]
    assert record["policy"] == "specificity" and "fp32_pb" in record["chosen_for"]
    index = pinned.run_index(config)
    truth = index.labels("val")[:, 1] >= 0.5
    p = onnx_probabilities(converted.source, index.paths("val"))[:, 1]
    fpr, _, candidates = roc_curve(truth, p, drop_intermediate=False)
    best = candidates[np.flatnonzero(1 - fpr >= TARGET - 1e-12)[-1]]  # the lowest threshold meeting the target
    t = record["classes"]["PNEUMONIA"]["value"]
    # onnxruntime's float32 probabilities differ from the graph's by rounding: compare the calls away from t
    far = np.abs(p - t) > 1e-5
    assert ((p >= t) == (p >= best))[far].all()
    assert record["classes"]["PNEUMONIA"]["validation"]["specificity"] >= TARGET


def test_external_evaluation_of_a_converted_run_chooses_thresholds_on_its_own_validation_split(converted, tmp_path):
    """Not at 0.5, and never on the external images: on the run's pinned validation split, by the run's policy,
    recorded as plain evaluate records them."""
    from medq.external import run_external

    config = load_config(None, [f"data.root={converted.data}", "data.generate=false",
                                f"run.output_dir={tmp_path / 'output'}", "run.name=ext",
                                f"preprocess.image_size={SIZE}"])
    convert(converted.source, run_dir=config.run_dir, task="binary", classes=["NORMAL", "PNEUMONIA"],
            normalization="unit", verbose=False)
    index = pinned.run_index(config)  # `medq data`: the run's split pinned, no thresholds chosen yet
    rsna = tmp_path / "rsna"
    generate_phantoms("rsna-dicom", rsna, n_train=30, n_val=0, n_test=0, size=48, seed=9)
    other = load_config(None, [f"data.root={rsna}", "data.format=rsna-pneumonia", "data.generate=false",
                               "thresholds.policy=fixed", "thresholds.target=0.01"])  # the other config's: unused
    result = run_external(config.run_dir, other, split="all")

    manifest = json.loads((config.run_dir / "manifest.json").read_text())
    record = manifest["thresholds"]
    assert record["split"] == "val" and record["policy"] == "youden"
    assert record["chosen_for"] == {"fp32_pb": manifest["artifacts"]["fp32_pb"]["sha256"]}
    t = record["classes"]["PNEUMONIA"]["value"]
    truth = index.labels("val")[:, 1] >= 0.5
    p = onnx_probabilities(converted.source, index.paths("val"))[:, 1]
    fpr, tpr, candidates = roc_curve(truth, p, drop_intermediate=False)
    j = tpr - fpr
    best = candidates[np.flatnonzero(j >= j.max() - 1e-12)[0]]  # Youden's point on the run's own validation split
    assert ((p >= t) == (p >= best)).all()
    assert result["thresholds"]["source"] == "validation" and result["thresholds"]["values"] == {"PNEUMONIA": t}
    point = result["metrics"]["PNEUMONIA"]["operating_point"]
    paths = [image["path"] for image in result["images"]]
    with open(rsna / "stage_2_detailed_class_info.csv", newline="") as fh:
        labels = {row["patientId"]: row["class"] for row in csv.DictReader(fh)}
    ext_truth = np.array([labels[Path(q).stem] == "Lung Opacity" for q in paths])
    ext_p = onnx_probabilities(converted.source, paths)[:, 1]
    far = np.abs(ext_p - t) > 1e-5
    assert far.all() and point["sensitivity"] == pytest.approx((ext_p >= t)[ext_truth].mean())


def test_external_evaluation_of_a_converted_run_without_a_pinned_split_says_it_decides_at_0_5(converted, tmp_path):
    from medq.external import run_external

    run_dir = tmp_path / "output" / "nosplit"
    convert(converted.source, run_dir=run_dir, task="binary", classes=["NORMAL", "PNEUMONIA"],
            normalization="unit", verbose=False)
    rsna = tmp_path / "rsna"
    generate_phantoms("rsna-dicom", rsna, n_train=12, n_val=0, n_test=0, size=48, seed=9)
    other = load_config(None, [f"data.root={rsna}", "data.format=rsna-pneumonia", "data.generate=false"])
    result = run_external(run_dir, other, split="all")
    assert result["thresholds"]["source"] == "fallback" and result["thresholds"]["values"] == {"PNEUMONIA": 0.5}
    assert "not yet chosen" in result["thresholds"]["notes"][0]
    assert "thresholds" not in json.loads((run_dir / "manifest.json").read_text())


def test_busi_3class_with_masks_as_external_data_for_a_binary_busi_model(converted, tmp_path):
    """BUSI as it unpacks (benign/malignant/normal folders, ``_mask`` PNGs beside the images) at another image size
    than the run's: only the images are evaluated, 'normal' counts as a negative of both classes, and the AUC is
    sklearn's on onnxruntime's probabilities at the run's preprocessing (32 px, 1 channel)."""
    from sklearn.metrics import roc_auc_score

    from medq.external import run_external

    run_dir = tmp_path / "output" / "busi"
    convert(converted.source, run_dir=run_dir, task="binary", classes=["benign", "malignant"],
            normalization="unit", verbose=False)
    busi = tmp_path / "Dataset_BUSI_with_GT"
    generate_phantoms("busi", busi, n_train=18, n_val=0, n_test=0, size=48, seed=4)
    images = {c: sorted(p for p in (busi / c).glob("*.png") if "_mask" not in p.name)
              for c in ("benign", "malignant", "normal")}
    assert any("_mask" in p.name for p in (busi / "benign").glob("*.png"))  # the layout under test
    other = load_config(None, [f"data.root={busi}", "data.format=busi", "data.variant=3-class",
                               "data.generate=false", "preprocess.image_size=64", "preprocess.channels=3",
                               "preprocess.normalization=imagenet"])  # the other config's: never used
    result = run_external(run_dir, other, split="all")
    assert result["counts"]["evaluated"] == sum(map(len, images.values()))
    assert result["counts"]["per_external_class"] == {c: len(v) for c, v in images.items()}
    paths = [image["path"] for image in result["images"]]
    truth = np.array([Path(p).parent.name == "malignant" for p in paths])
    p = onnx_probabilities(converted.source, paths)[:, 1]
    malignant = result["metrics"]["malignant"]
    assert (malignant["n_positive"], malignant["n_negative"]) == (len(images["malignant"]),
                                                                 len(images["benign"]) + len(images["normal"]))
    assert malignant["auc"] == pytest.approx(roc_auc_score(truth, p), abs=1e-5)


def test_a_binary_kaggle_model_on_3class_kaggle_phantoms_through_the_builtin(converted, tmp_path):
    """kaggle:kaggle-3class: PNEUMONIA's positives are the BACTERIA and VIRUS files (the names say which)."""
    from sklearn.metrics import roc_auc_score

    from medq.data.phantoms import generate_chest_pneumonia
    from medq.external import run_external

    run_dir = tmp_path / "output" / "kaggle"
    convert(converted.source, run_dir=run_dir, task="binary", classes=["NORMAL", "PNEUMONIA"],
            normalization="unit", verbose=False)
    data = tmp_path / "chest_xray"
    generate_chest_pneumonia(data, n_train=16, n_val=0, n_test=10, size=40, seed=8)
    other = load_config(None, [f"data.root={data}", "data.variant=3-class", "data.generate=false"])
    result = run_external(run_dir, other, split="all")
    assert result["mapping"]["source"] == "built-in kaggle:kaggle-3class"
    paths = [image["path"] for image in result["images"]]
    truth = np.array([Path(p).parent.name == "PNEUMONIA" for p in paths])  # the binary folders: by construction
    assert result["metrics"]["PNEUMONIA"]["n_positive"] == truth.sum() > 0
    p = onnx_probabilities(converted.source, paths)[:, 1]
    assert result["metrics"]["PNEUMONIA"]["auc"] == pytest.approx(roc_auc_score(truth, p), abs=1e-5)
