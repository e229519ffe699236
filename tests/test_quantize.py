"""The quantize stage end to end with INC 2.6 on a tiny trained refkit-cnn.

One module-scoped run is trained and frozen once (generated images in the Kaggle layout: a bright round opacity on
PNEUMONIA films, a dark one on NORMAL ones, so that a 5-epoch model is right and sure of itself); each test
quantizes a copy of it.
"""
import copy
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from medq import runrecord
from medq.config import load_config
from medq.data.readers import read_dataset
from medq.errors import MedqError
from medq.graph import FrozenGraph, op_type_counts, read_graph_def
from medq.hwinfo import cpu_features
from medq.metrics import task_metrics
from medq.preprocess import PreprocessSpec, load_batch
from medq.precision import select_precisions

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "configs" / "deploy.yaml"
REFKIT = REPO / "tests" / "fixtures" / "refkit_deploy.yaml"


def write_films(root: Path, n_train: int, n_val: int, n_test: int, size: int = 48, seed: int = 0) -> None:
    """Kaggle layout, Kaggle file names (one patient per film)."""
    rng = np.random.default_rng(seed)
    patient = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(n):
            patient += 1
            sick = i % 3 != 0
            image = rng.normal(90, 20, (size, size))
            cy, cx = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
            cv2.circle(image, (cx, cy), int(rng.integers(size // 8, size // 5)), 230 if sick else 40, -1)
            image = cv2.GaussianBlur(np.clip(image, 0, 255).astype(np.uint8), (3, 3), 0)
            name = f"person{patient}_bacteria_1.jpeg" if sick else f"IM-{patient:04d}-0001.jpeg"
            folder = root / split / ("PNEUMONIA" if sick else "NORMAL")
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / name), image)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from medq.freeze import run_freeze
    from medq.train import run_train

    base = tmp_path_factory.mktemp("quantize")
    write_films(base / "chest_xray", n_train=120, n_val=4, n_test=30)
    config = load_config(None, [
        f"data.root={base / 'chest_xray'}", "data.generate=false", "data.val_fraction=0.3",
        f"run.output_dir={base / 'output'}", "run.name=trained", "preprocess.image_size=40",
        "model.params={blocks: 2, filters: 8, dense_units: 16}", "train.epochs=5", "train.batch_size=8",
        "train.learning_rate=0.003", f"quantize.deploy={DEPLOY}",
        "run.objective=accuracy"])  # these tests read INC's accuracy criterion on accuracy (the default is AUC)
    run_train(config)
    run_freeze(config)
    return config


def copy_run(config, name: str, deploy: Path | None = None):
    """A fresh run folder holding the trained run's manifest and frozen graph."""
    fresh = copy.deepcopy(config)
    fresh.run.name = name
    shutil.copytree(config.run_dir, fresh.run_dir)
    if deploy is not None:
        fresh.quantize.deploy = str(deploy)
    return fresh


def deploy_with(tmp_path: Path, changes: dict) -> Path:
    data = yaml.safe_load(DEPLOY.read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def stage(config) -> dict:
    return runrecord.read_manifest(config.run_dir)["stages"]["quantize"]


@pytest.fixture(scope="module")
def default_run(trained, tmp_path_factory):
    from medq.quantize import run_quantize

    config = copy_run(trained, "default")
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)  # INC's default workspace would be ./nc_workspace
        target = run_quantize(config)
    return config, target, cwd


def test_default_run_has_quantized_convolutions_within_the_criterion(default_run):
    config, target, _ = default_run
    assert target == config.run_dir / "model_int8.pb" and runrecord.recorded_path(config.run_dir, "int8_pb") == target
    int8 = read_graph_def(target)
    ops = op_type_counts(int8)
    assert any(op.startswith(("QuantizedConv2D", "_QuantizedConv2D", "_FusedQuantizedConv2D")) for op in ops), ops
    facts = stage(config)
    assert facts["status"] == "ok" and facts["metric"] == "accuracy"
    criterion = facts["criterion"]
    assert criterion["met"] and (criterion["kind"], criterion["tolerance"]) == ("relative", 0.01)
    assert facts["int8_val"]["accuracy"] >= facts["fp32_val"]["accuracy"] * (1 - 0.01)
    assert facts["quantized_kernels"] > 0
    table = runrecord.read_manifest(config.run_dir)["artifacts"]["quantized_ops"]
    op_table = yaml.safe_load((config.run_dir / table["path"]).read_text())
    assert op_table["Conv2D"]["int8"] == op_table["Conv2D"]["total"] == 4
    assert set(op_table["Conv2D"]) == {"total", "int8", "bf16", "fp32"}
    for op_type, counts in op_table.items():  # every op INC's table counts in FP32 is listed with its reason
        if op_type not in ("QuantizeV2", "Dequantize"):
            listed = [op for op in facts["fallback_ops"] if op["op_type"] == op_type]
            assert len(listed) == counts["fp32"] and all(op["reason"] for op in listed), (op_type, listed)


def test_int8_metric_recomputed_from_the_file_on_validation(default_run):
    """The number in the manifest is what the written file scores, with the training preprocessing."""
    config, target, _ = default_run
    manifest = runrecord.read_manifest(config.run_dir)
    index = read_dataset(config.data, seed=config.run.seed)
    x = load_batch(index.paths("val"), PreprocessSpec.from_dict(manifest["preprocess"]))
    runner = FrozenGraph(target, manifest["input_name"], manifest["output_name"])
    accuracy = task_metrics("binary", index.labels("val"), runner.predict(x), index.classes)["accuracy"]
    runner.close()
    assert accuracy == pytest.approx(stage(config)["int8_val"]["accuracy"])
    assert stage(config)["fp32_val"]["accuracy"] >= 0.8  # a trained model, not a coin


def test_calibration_and_precision_facts_are_recorded(default_run):
    config, _, cwd = default_run
    facts = stage(config)
    calibration = facts["calibration"]
    assert calibration["source_split"] == "train"
    assert sum(calibration["class_balance"].values()) == calibration["n"] == calibration["sampling_sizes"][-1]
    assert set(calibration["images_fed_per_pass"]) == {calibration["n"]}
    kept, skipped = facts["precision_paths"]["kept"], facts["precision_paths"]["skipped"]
    assert (kept, skipped) == select_precisions(["fp32", "bf16", "int8", "int8-bf16"], cpu_features())
    assert list(facts["precision_val"]) == kept
    assert facts["cpu_features"]["model"] == cpu_features()["model"]
    assert (config.run_dir / "logs" / "quantize.log").stat().st_size > 0
    assert (config.run_dir / "nc_workspace" / "history.snapshot").is_file() and not (cwd / "nc_workspace").exists()


def test_terminal_output_is_a_short_summary_and_inc_logs_to_the_run(trained, capfd, monkeypatch):
    import logging

    from medq.quantize import run_quantize

    monkeypatch.setattr(logging.getLogger("medq"), "handlers", [])  # library use: the summary is printed
    config = copy_run(trained, "quiet")
    capfd.readouterr()
    run_quantize(config)
    out, err = capfd.readouterr()
    assert "validation accuracy: FP32" in out and "INC op table: Conv2D 4/4 INT8" in out
    assert "calibration:" in out and "from the train split" in out and "precision paths:" in out
    assert "[INFO]" not in out + err and len(out.splitlines()) < 20, out + err
    log = (config.run_dir / "logs" / "quantize.log").read_text()
    assert "[INFO] |******Mixed Precision Statistics******|" in log and "Tune 1 result is" in log


@pytest.fixture(scope="module")
def changed_run(trained, tmp_path_factory):
    """Deploy values changed from the repo's file, calibration recorded, a CPU without BF16 simulated."""
    import medq.quantize as quantize
    from medq.inc import adapters

    loaders = []

    class RecordingLoader(adapters.CalibrationLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            loaders.append(self)

    no_bf16 = dict(cpu_features(), avx512_bf16=False, amx_bf16=False, bf16=False)
    deploy = deploy_with(tmp_path_factory.mktemp("deploy"), {
        "quantization.calibration.sampling_size": 24, "tuning.exit_policy.max_trials": 3,
        "tuning.exit_policy.timeout": 500, "tuning.accuracy_criterion": {"absolute": 0.05},
        "tuning.random_seed": 7, "quantization.recipes.fast_bias_correction": True})
    config = copy_run(trained, "changed", deploy)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(adapters, "CalibrationLoader", RecordingLoader)
        patch.setattr("medq.hwinfo.cpu_features", lambda *a, **k: no_bf16)
        quantize.run_quantize(config)
    return config, loaders


def test_deploy_values_reach_inc(changed_run):
    config, loaders = changed_run
    received = stage(config)["inc_received"]
    assert received["calibration_sampling_size"] == [24]
    assert received["tuning_criterion"]["max_trials"] == 3 and received["tuning_criterion"]["timeout"] == 500
    assert received["tuning_criterion"]["strategy"] == "basic" and received["quant_level"] == 1
    assert received["accuracy_criterion"] == {"criterion": "absolute", "tolerable_loss": 0.05,
                                              "higher_is_better": True}
    assert received["random_seed"] == 7 and received["use_bf16"] is False
    assert received["recipes"]["fast_bias_correction"] is True
    assert received["inputs"] == ["input"] and received["outputs"] == ["output"]
    assert Path(received["workspace"]) == config.run_dir / "nc_workspace"
    # INC consumed exactly the sampling size from the file, in every calibration pass
    (loader,) = loaders
    assert loader.images_per_pass and set(loader.images_per_pass) == {24}
    assert received["calib_batch_size"] == loader.batch_size == 24


def test_calibration_never_touches_validation_or_test(changed_run):
    config, (loader,) = changed_run
    index = read_dataset(config.data, seed=config.run.seed)
    fed = loader.paths_fed
    assert fed and fed <= set(index.paths("train"))
    assert not fed & (set(index.paths("val")) | set(index.paths("test")))
    balance = stage(config)["calibration"]["class_balance"]
    assert balance == {"NORMAL": 8, "PNEUMONIA": 16}  # the training split's 1:2, stratified


def test_bf16_paths_are_skipped_on_a_cpu_without_bf16(changed_run):
    config, _ = changed_run
    facts = stage(config)
    assert facts["precision_paths"]["kept"] == ["fp32", "int8"]
    assert set(facts["precision_paths"]["skipped"]) == {"bf16", "int8-bf16"}
    assert list(facts["precision_val"]) == ["fp32", "int8"]


def test_no_model_within_the_criterion_is_one_line_and_writes_no_int8_file(trained, tmp_path, monkeypatch):
    import medq.quantize as quantize

    from medq.inc import adapters

    real = adapters.eval_func

    def int8_scores_zero(score):
        return real(lambda graph_def: 0.0 if any("Quantized" in node.op for node in graph_def.node)
                    else score(graph_def))

    monkeypatch.setattr(adapters, "eval_func", int8_scores_zero)
    config = copy_run(trained, "fails", deploy_with(tmp_path, {"tuning.exit_policy.max_trials": 1}))
    with pytest.raises(MedqError) as caught:
        quantize.run_quantize(config)
    message = str(caught.value)
    assert "\n" not in message and "INC found no INT8 model within the accuracy criterion" in message
    assert "FP32 val accuracy" in message and "best of 1 trial(s) 0.0000" in message
    assert "max_trials" in message and "sampling_size" in message
    assert not (config.run_dir / "model_int8.pb").exists()
    assert stage(config)["status"] == "failed" and stage(config)["criterion"]["met"] is False


def test_evaluation_errors_are_raised_not_swallowed_by_inc(trained, tmp_path):
    from medq.inc.deploy import load_deploy
    from medq.inc.ptq import run_ptq
    from medq.inc.adapters import CalibrationLoader

    def broken(model):
        raise ValueError("metric exploded")

    x = np.zeros((4, 40, 40, 1), np.float32)
    loader = CalibrationLoader(x, np.zeros((4, 2), np.float32), ["a", "b", "c", "d"], batch_size=4)
    graph = read_graph_def(runrecord.recorded_path(trained.run_dir, "fp32_pb"))
    with pytest.raises(ValueError, match="metric exploded"):
        run_ptq(graph, load_deploy(DEPLOY), inputs=["input"], outputs=["output"], sampling_sizes=[4],
                calib_dataloader=loader, eval_func=broken, workspace=tmp_path / "ws", log_path=tmp_path / "q.log")


def test_inc_own_schema_accepts_our_files_and_agrees_with_our_defaults():
    from medq.inc.deploy import INC_VERSION_DEFAULT, RECIPE_DEFAULTS, PerformanceSettings, load_deploy
    from medq.inc.ptq import check_with_inc, inc_schema_defaults

    check_with_inc(load_deploy(DEPLOY))
    refkit = load_deploy(REFKIT)
    check_with_inc(refkit)
    inc = inc_schema_defaults()
    assert inc["version"] == INC_VERSION_DEFAULT and inc["device"] == "cpu" and inc["use_bf16"] is True
    assert inc["quantization"]["calibration"]["sampling_size"] == [100]
    assert inc["quantization"]["recipes"] == RECIPE_DEFAULTS
    assert inc["quantization"]["quant_level"] == "auto"
    tuning = inc["tuning"]
    criterion = tuning["accuracy_criterion"]
    assert criterion["relative"] == 0.01 and criterion.get("higher_is_better", True)
    assert tuning["exit_policy"] == {"timeout": 0, "max_trials": 100, "performance_only": False}
    assert tuning["random_seed"] == 1978 and tuning["strategy"]["name"] == "basic"
    assert tuning["objective"] == "performance"
    performance = inc["evaluation"]["performance"]
    assert PerformanceSettings(warmup=performance["warmup"], iteration=performance["iteration"],
                               **performance["configs"]) == PerformanceSettings()
    ours = refkit.inc_defaults()
    assert ours["tuning.exit_policy.max_trials"] == 100 and ours["tuning.random_seed"] == 1978
    # INC's import rewires yaml.SafeLoader to read null as {}; medq puts it back
    assert yaml.safe_load("a: null") == {"a": None}


def test_a_model_at_chance_stops_quantize_unless_allowed(trained, tmp_path, capfd):
    """A model at chance level 'meets' any criterion: the stage stops and says the model has nothing to preserve;
    quantize.allow_chance quantizes it anyway, with the warning and no plain 'met'."""
    from medq.freeze import run_freeze
    from medq.models import build_model
    from medq.quantize import run_quantize

    config = copy_run(trained, "untrained", deploy=REPO / "tests" / "fixtures" / "wide_criterion_deploy.yaml")
    model = build_model("refkit-cnn", (40, 40, 1), 2, "binary", blocks=2, filters=8, dense_units=16)
    model.layers[-1].set_weights([np.zeros_like(w) for w in model.layers[-1].get_weights()])  # always 50/50
    model.save(config.run_dir / "model.keras")
    runrecord.commit(config.run_dir, "train", artifacts={"keras_model": config.run_dir / "model.keras"})
    run_freeze(config)
    with pytest.raises(MedqError, match="not above chance.*nothing to preserve.*allow_chance"):
        run_quantize(config)
    assert not (config.run_dir / "model_int8.pb").exists() and stage(config)["status"] == "failed"

    config.quantize.allow_chance = True
    run_quantize(config)
    # chance for accuracy: always answering the commonest validation class (2 of 3 films are PNEUMONIA)
    assert stage(config)["fp32_near_chance"] == {"near": True, "chance": pytest.approx(2 / 3, abs=0.1),
                                                 "margin": 0.05}
    out = capfd.readouterr().out
    assert "not above chance" in out and "which proves nothing" in out
    again = copy_run(trained, "trained-again")
    run_quantize(again)
    out = capfd.readouterr().out
    assert stage(again)["fp32_near_chance"]["near"] is False and "not above chance" not in out and "→ met (" in out
