"""The keras-tuner search: space checking, resuming without repeating trials, model selection, tune → freeze."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from medq import artifacts, runrecord
from medq.config import load_config
from medq.data.readers import read_dataset
from medq.errors import ConfigError
from test_train import data_root  # noqa: F401  (the phantom dataset, a module fixture)


def _config(tmp_path, data_root, *overrides):
    return load_config(None, [
        f"run.output_dir={tmp_path}", f"data.root={data_root}", "preprocess.image_size=32", "train.tensorboard=false",
        "model.params={blocks: 2, filters: 4, dense_units: 8}", "tune.epochs=1", "tune.latency_runs=2",
        "tune.search_space={learning_rate: [0.001, 0.003], batch_size: [8, 16]}", *overrides])


@pytest.fixture
def count_trainings(monkeypatch):
    """How many models the search trains (each trial calls medq.fitting.fit_model once)."""
    import medq.fitting as train

    calls = []
    original = train.fit_model

    def counting(*args, **kwargs):
        calls.append(kwargs.get("model_params"))
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "fit_model", counting)
    return calls


def test_search_space_is_checked_before_any_trial(tmp_path):
    from medq.tune.space import declare_space

    def space(text, *more):
        return declare_space(load_config(None, [f"tune.search_space={text}", *more]), "binary")

    hp = space("{learning_rate: [loguniform, 1.0e-4, 1.0e-2], batch_size: [16, 32], dropout: [0, 0.25], "
               "filters: [int, 4, 8], optimizer: [adam, sgd]}")
    kinds = {h.name: type(h).__name__ for h in hp.space}
    assert kinds == {"learning_rate": "Float", "batch_size": "Choice", "dropout": "Choice", "filters": "Int",
                     "optimizer": "Choice"}
    assert hp.get("dropout") == 0.0  # [0, 0.25] became floats: one type per choice
    with pytest.raises(ConfigError, match="tune.search_space.depth: refkit-cnn has no such setting"):
        space("{depth: [1, 2]}")
    with pytest.raises(ConfigError, match="low < high"):
        space("{learning_rate: [loguniform, 0.1, 0.01]}")
    with pytest.raises(ConfigError, match="multilabel"):
        space("{loss: [cce, bce]}")
    with pytest.raises(ConfigError, match="optimizers are"):
        space("{optimizer: [adam, lion]}")
    with pytest.raises(ConfigError, match="all be numbers or all be names"):
        space("{dropout: [0.1, high]}")
    with pytest.raises(ConfigError, match="alpha\\*beta\\^2 <= 2"):
        space("{alpha: [1.2, 1.8], beta: [1.1], phi: [0, 1]}", "model.name=scaled-densenet")


def test_trial_settings_scale_the_resolution_of_scaled_densenet():
    from medq.tune.space import trial_settings

    config = load_config(None, ["model.name=scaled-densenet", "preprocess.image_size=96"])
    fit, params, size = trial_settings(config, {"learning_rate": 0.01, "phi": 2, "beta": 1.1, "tuner/epochs": 3})
    assert fit == {"learning_rate": 0.01} and params == {"phi": 2, "beta": 1.1}
    assert size == 136  # 96 · γ² = 96 · 2 / (1.2 · 1.21) = 132.2 → 136, a multiple of 8 (α = 1.2 by default)
    assert trial_settings(load_config(None, ["preprocess.image_size=96"]), {"filters": 8})[2] == 96


def test_every_tuner_kind_is_a_medq_tuner(tmp_path):
    from medq.tune.space import declare_space
    from medq.tune.stage import make_tuner

    for kind in ("random", "hyperband", "bayesian"):
        config = load_config(None, [f"run.output_dir={tmp_path}", f"run.name={kind}", f"tune.tuner={kind}"])
        tuner = make_tuner(config, declare_space(config, "binary"), runner=None)
        assert type(tuner).__name__.startswith("Medq") and tuner.oracle.objective.name == "val_objective"
        assert tuner.oracle.objective.direction == "max" and tuner.oracle.seed == config.run.seed
        assert tuner.project_dir == str(config.run_dir / "tuner")


@pytest.mark.slow
def test_search_resumes_without_repeating_trials_and_its_best_model_freezes(tmp_path, data_root, count_trainings):
    from medq.freeze import run_freeze
    from medq.tune import run_tune
    from medq.tune.report import REPORT_CSV, REPORT_MD, REPORT_PNG

    config = _config(tmp_path, data_root, "tune.max_trials=2")
    index = read_dataset(config.data, seed=config.run.seed)
    first = run_tune(config, index=index)
    assert len(count_trainings) == 2 and len(first.trials) == 2 and first.replaced
    assert "became the run's model" in first.decision and "no trained model" in first.decision
    best_model = config.run_dir / "tuner" / f"trial_{first.best.trial_id}" / "model.keras"
    manifest = runrecord.read_manifest(config.run_dir)
    assert manifest["model_source"] == "tune" and manifest["classes"] == index.classes
    assert manifest["artifacts"]["keras_model"]["sha256"] == artifacts.sha256(best_model)
    assert manifest["selected_val_metrics"] == first.best.val_metrics
    # the tuned model gets its own operating thresholds, chosen on validation for exactly that file
    chosen = runrecord.read_manifest(config.run_dir).facts.thresholds
    assert chosen["chosen_for"] == {"keras_model": hashlib.sha256(best_model.read_bytes()).hexdigest()}
    assert chosen["split"] == "val" and set(chosen["classes"]) == {index.classes[1]}
    entry = manifest["stages"]["tune"]
    assert entry["best_trial"] == first.best.trial_id and len(entry["trials"]) == 2
    for row in entry["trials"]:
        assert row["status"] == "COMPLETED" and row["tuner_id"] == "tuner0"
        assert row["parameters"] > 0 and row["flops"] > 0 and row["latency_ms"] > 0
    for name in (REPORT_CSV, REPORT_MD, REPORT_PNG):
        assert (config.run_dir / name).stat().st_size > 0
    assert (config.run_dir / REPORT_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pareto" in (config.run_dir / REPORT_MD).read_text()

    # tune → freeze → quantize → benchmark: the tuned model is the one frozen, quantized and measured
    from medq.benchmark import run_benchmark
    from medq.quantize import run_quantize

    pb = run_freeze(config)
    assert pb.is_file() and runrecord.read_manifest(config.run_dir)["stages"]["freeze"]["parity_max_abs_diff"] < 1e-4
    measured = _config(tmp_path, data_root, "tune.max_trials=2", "benchmark.precisions=[fp32, int8]",
                       "benchmark.reference=[]", "benchmark.instances=[]", "benchmark.batch_sizes=[8]",
                       "benchmark.batch_size=8", "benchmark.warmup=1", "benchmark.latency_iterations=3",
                       "benchmark.throughput_iterations=2",
                       f"quantize.deploy={Path(__file__).parent / 'fixtures' / 'wide_criterion_deploy.yaml'}",
                       "quantize.allow_chance=true")
    run_quantize(measured)
    report = run_benchmark(measured)
    manifest = runrecord.read_manifest(config.run_dir)
    assert manifest["model_source"] == "tune"
    assert manifest["stages"]["freeze"]["finished_at"] <= manifest["stages"]["quantize"]["finished_at"]
    assert [r["id"] for r in report["results"]] == ["tensorflow-fp32", "tensorflow-int8"]
    assert [r["model"] for r in report["results"]] == ["model_fp32.pb", "model_int8.pb"]

    # Pretend a trained model beat it, then continue the search to 3 trials: one new trial, nothing repeated.
    before = {p.parent.name: p.stat().st_mtime_ns for p in (config.run_dir / "tuner").glob("trial_*/model.keras")}
    runrecord.commit(config.run_dir, "train", facts={"model_source": "train",
                                                          "selected_val_metrics": {"accuracy": 1.0, "auc": 1.0}})
    model_sha = artifacts.sha256(config.run_dir / "model.keras")
    again = run_tune(_config(tmp_path, data_root, "tune.max_trials=3"), index=index)
    assert len(count_trainings) == 3 and len(again.trials) == 3
    after = {p.parent.name: p.stat().st_mtime_ns for p in (config.run_dir / "tuner").glob("trial_*/model.keras")}
    assert {k: after[k] for k in before} == before and len(after) == 3
    assert not again.replaced and "kept the trained model" in again.decision
    assert artifacts.sha256(config.run_dir / "model.keras") == model_sha
    assert runrecord.read_manifest(config.run_dir)["model_source"] == "train"

    # A finished search reruns nothing.
    run_tune(_config(tmp_path, data_root, "tune.max_trials=3"), index=index)
    assert len(count_trainings) == 3


def test_a_changed_search_is_not_silently_resumed(tmp_path, data_root):
    from medq.tune import run_tune
    from medq.tune.stage import SEARCH_FILE

    config = _config(tmp_path, data_root)
    (config.run_dir / "tuner").mkdir(parents=True)
    (config.run_dir / "tuner" / SEARCH_FILE).write_text(json.dumps({"tuner": "hyperband"}))
    with pytest.raises(ConfigError, match="started with a different"):
        run_tune(config)


def test_a_search_is_not_resumed_with_pixels_decoded_at_another_bit_depth(tmp_path, data_root):
    """Trials of one search must see the same pixels: a 16-bit PNG read at 12 bits is 16× brighter than at 16."""
    from medq.tune.stage import SEARCH_FILE, _check_signature

    project = tmp_path / "tuner"
    project.mkdir()
    _check_signature(project, _config(tmp_path, data_root))
    _check_signature(project, _config(tmp_path, data_root))  # the same settings resume
    with pytest.raises(ConfigError, match="started with a different decode"):
        _check_signature(project, _config(tmp_path, data_root, "data.bit_depth=12"))
    older = json.loads((project / SEARCH_FILE).read_text())
    del older["decode"]  # a search folder written before the decode settings were recorded: auto
    (project / SEARCH_FILE).write_text(json.dumps(older))
    _check_signature(project, _config(tmp_path, data_root))


def test_only_the_chief_writes_the_search_signature(tmp_path, data_root):
    """A worker that starts before the chief must not write the signature: it has not seen the split the chief pins,
    so the chief would then refuse its own search as 'started with a different split'."""
    from medq.tune.stage import SEARCH_FILE, _check_signature

    config = _config(tmp_path, data_root)
    project = config.run_dir / "tuner"
    project.mkdir(parents=True)
    _check_signature(project, config, worker=True)
    assert not (project / SEARCH_FILE).exists()
    _check_signature(project, config)  # the chief writes it
    assert json.loads((project / SEARCH_FILE).read_text())["model"] == config.model.name
    _check_signature(project, config, worker=True)  # a worker checks against it


@pytest.mark.slow
def test_scaled_densenet_search_scales_resolution_and_the_run_follows(tmp_path, data_root, count_trainings):
    from medq.freeze import run_freeze
    from medq.tune import run_tune

    config = _config(tmp_path, data_root, "model.name=scaled-densenet", "tune.tuner=bayesian", "tune.max_trials=2",
                     "model.params={base_depths: [1, 1, 1, 1], base_growth: 8}",
                     "tune.search_space={phi: [0, 1], learning_rate: [0.003]}")
    result = run_tune(config)
    sizes = sorted(r.image_size for r in result.trials)
    assert sizes == [32, 40]  # 32 · γ^1 = 37.6 → 40
    params = {r.values["phi"]: r.parameters for r in result.trials}
    assert params[1] > params[0]  # deeper and wider at phi = 1
    manifest = runrecord.read_manifest(config.run_dir)
    assert manifest["preprocess"]["image_size"] == result.best.image_size == config.preprocess.image_size
    assert manifest["config"]["preprocess"]["image_size"] == result.best.image_size
    assert run_freeze(config).is_file()
    assert runrecord.read_manifest(config.run_dir)["input_shape"] == [result.best.image_size] * 2 + [1]
    assert np.isfinite(result.best.val_objective)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("search-*.yaml")),
                         ids=lambda p: p.name)
def test_search_configs_load_and_declare_their_space(path):
    from medq.tune.space import declare_space

    config = load_config(path)
    task = "multilabel" if config.data.format == "nih-chestxray14" else "binary"
    assert len(declare_space(config, task).space) == len(config.tune.search_space)


def test_a_search_whose_trials_all_fail_says_why_in_one_line(tmp_path, data_root):
    from medq.errors import MedqError
    from medq.tune import run_tune

    # 7+ blocks of 2x2 pooling cannot fit a 32 px input: every trial fails while building its model
    config = _config(tmp_path, data_root, "tune.max_trials=3", "tune.search_space={blocks: [7, 8, 9]}")
    with pytest.raises(MedqError, match="consecutive failures.*the last trial failed with: .*"):
        run_tune(config)


@pytest.mark.slow
def test_multilabel_search_is_scored_by_mean_auc(tmp_path):
    from medq.data.phantoms import generate_phantoms
    from medq.tune import run_tune

    root = tmp_path / "nih"
    generate_phantoms("chest-multilabel", root, n_train=40, n_val=10, n_test=6, size=40, seed=7)
    config = _config(tmp_path, root, "data.format=nih-chestxray14", "tune.max_trials=2",
                     "tune.search_space={loss: [weighted-bce, focal]}")
    result = run_tune(config)
    assert sorted(r.values["loss"] for r in result.trials) == ["focal", "weighted-bce"]
    for row in result.trials:
        assert row.val_objective == row.val_auc == row.val_metrics["auc"]  # mean AUC over the labels
        assert "exact_match" in row.val_metrics
    assert runrecord.read_manifest(config.run_dir)["task"] == "multilabel"


def test_an_interrupted_search_resumes_where_it_stopped(tmp_path, data_root, monkeypatch):
    """Ctrl-C in trial 2 of 3: the rerun trains trial 2 again and trial 3, never trial 1 (its model is untouched)."""
    import medq.fitting as train
    from medq.tune import run_tune

    config = _config(tmp_path, data_root, "tune.max_trials=3")
    index = read_dataset(config.data, seed=config.run.seed)
    original, calls = train.fit_model, []

    def interrupted_in_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "fit_model", interrupted_in_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_tune(config, index=index)
    finished = {p.parent.name: p.stat().st_mtime_ns for p in (config.run_dir / "tuner").glob("trial_*/model.keras")}
    assert len(finished) == 1
    resumed = run_tune(config, index=index)
    assert len(calls) == 2 + 2  # the interrupted trial again, and the third
    assert len([t for t in resumed.trials if t.status == "COMPLETED"]) == 3
    after = {p.parent.name: p.stat().st_mtime_ns for p in (config.run_dir / "tuner").glob("trial_*/model.keras")}
    assert {k: after[k] for k in finished} == finished and len(after) == 3


# --- selection on stubbed trial results (no training) -------------------------------------------------------------

# The search of issue 14: a trial that predicts the majority class (AUC 0.503) with the better accuracy.
MAJORITY = {"accuracy": 0.658, "auc": 0.503, "ci": {"auc": [0.41, 0.60], "accuracy": [0.59, 0.72]}}
TRAINED = {"accuracy": 0.627, "auc": 0.812, "ci": {"auc": [0.75, 0.87], "accuracy": [0.56, 0.69]}}
# a chance-level trial whose AUC point estimate beats the trained model's: its interval still reaches 0.5
LUCKY = {"accuracy": 0.70, "auc": 0.83, "ci": {"auc": [0.48, 1.0], "accuracy": [0.5, 0.85]}}


def _stub_trials(project: Path, results: dict[str, dict]) -> None:
    for trial_id, metrics in results.items():
        folder = project / f"trial_{trial_id}"
        folder.mkdir(parents=True)
        artifacts.write_json(folder / "trial.json", {"trial_id": trial_id, "status": "COMPLETED",
                                                     "hyperparameters": {"values": {"learning_rate": 0.001}}})
        artifacts.write_json(folder / "medq_trial.json", {"trial_id": trial_id, "val_metrics": metrics,
                                                          "latency_ms": 1.0, "parameters": 10, "flops": 10})
        (folder / "model.keras").write_bytes(b"trial " + trial_id.encode())


@pytest.mark.parametrize("objective", ["auc", "accuracy"])
def test_the_tuner_never_selects_a_chance_level_trial_over_a_better_auc_model(tmp_path, objective):
    from types import SimpleNamespace

    from medq.tune.report import collect_trials, pick, trial_table_markdown
    from medq.tune.stage import TUNER_PROJECT, _select

    config = load_config(None, [f"run.output_dir={tmp_path}", f"run.objective={objective}"])
    run_dir = config.run_dir
    project = run_dir / TUNER_PROJECT
    _stub_trials(project, {"0": MAJORITY, "1": TRAINED})
    best, tradeoff = pick(collect_trials(project, objective), config.tune.tradeoff_tolerance, objective)
    assert best.trial_id == "1" and tradeoff.trial_id == "1"  # even when accuracy is the objective
    table = trial_table_markdown(collect_trials(project, objective), best, tradeoff, objective)
    assert "0.503 [0.410, 0.600] (chance)" in table and f"validation {objective}" in table

    # the run's trained model against a search whose only trials are at chance
    staged = runrecord.staging_path(run_dir, runrecord.KERAS_MODEL)
    staged.write_bytes(b"trained")
    runrecord.commit(run_dir, "train", artifacts={"keras_model": staged},
                     facts={"model_source": "train", "selected_val_metrics": TRAINED})
    chance_only = tmp_path / "chance-search" / TUNER_PROJECT
    _stub_trials(chance_only, {"0": MAJORITY, "1": LUCKY})
    best, _ = pick(collect_trials(chance_only, objective), config.tune.tradeoff_tolerance, objective)
    assert best.at_chance
    (project.parent / "tuner").rename(project.parent / "tuner-searched")
    chance_only.rename(project)
    replaced, decision, top = _select(config, SimpleNamespace(task="binary", classes=["a", "b"]), best)
    assert not replaced and top == {} and "is not above chance" in decision
    assert (run_dir / "model.keras").read_bytes() == b"trained"
