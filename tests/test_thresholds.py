"""Operating thresholds: chosen per class on validation by a policy (oracle: sklearn's ROC), recorded by train,
used by evaluate and predict, with clear fallbacks for runs and splits that cannot give them."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from medq.config import load_config
from medq.errors import ConfigError
from medq.metrics import decisions, task_metrics
from medq.thresholds import FALLBACK, Policy, Thresholds, choose, choose_one, held

# sklearn's roc_curve example: thresholds inf, 0.8, 0.4, 0.35, 0.1 → (fpr, tpr) (0,0) (0,.5) (.5,.5) (.5,1) (1,1)
TRUTH = np.array([0, 0, 1, 1])
SCORE = np.array([0.1, 0.4, 0.35, 0.8])


def _called(truth, score, value):
    truth = np.asarray(truth) >= 0.5
    called = np.asarray(score) >= value
    return called[truth].mean(), (~called[~truth]).mean()


def test_hand_computed_points_and_tie_rules():
    # youden J is 0.5 at both 0.8 and 0.35: the tie goes to the higher threshold (fewer positive calls);
    # the value lies midway to the next lower score (0.4), calling exactly the images 0.8 calls
    youden = choose_one(TRUTH, SCORE, Policy("youden"))
    assert youden["value"] == pytest.approx(0.6)
    assert (youden["validation"]["sensitivity"], youden["validation"]["specificity"]) == (0.5, 1.0)
    # sensitivity ≥ 0.9 needs both positives: the highest such threshold is 0.35 (midway to 0.1: 0.225)
    sens = choose_one(TRUTH, SCORE, Policy("sensitivity", 0.9))
    assert sens["value"] == pytest.approx(0.225)
    assert (sens["validation"]["sensitivity"], sens["validation"]["specificity"]) == (1.0, 0.5)
    # 2 positives cannot resolve 0.90 (one image moves sensitivity by 0.5): said, not hidden
    assert any("cannot resolve" in n for n in sens["notes"])
    # specificity ≥ 0.9: the lowest threshold with no negative called is 0.8
    spec = choose_one(TRUTH, SCORE, Policy("specificity", 0.9))
    assert spec["value"] == pytest.approx(0.6)
    assert (spec["validation"]["n_positive"], spec["validation"]["n_negative"]) == (2, 2)
    fixed = choose_one(TRUTH, SCORE, Policy("fixed", 0.37))
    assert fixed["value"] == 0.37 and (fixed["validation"]["sensitivity"], fixed["validation"]["specificity"]) == \
        (0.5, 0.5)


def test_a_class_without_positives_falls_back_with_a_note_and_call_nothing_stays_finite():
    none = choose_one(np.zeros(5), np.linspace(0.1, 0.9, 5), Policy("youden"))
    assert none["value"] == FALLBACK and "0 positive(s)" in none["notes"][0]
    # specificity 0.99 when a negative ties the top score: only "call nothing" meets it
    top = choose_one(np.array([1, 0]), np.array([0.5, 0.5]), Policy("specificity", 0.99))
    assert np.isfinite(top["value"]) and top["value"] > 0.5
    assert (top["validation"]["sensitivity"], top["validation"]["specificity"]) == (0.0, 1.0)
    json.dumps(top, allow_nan=False)  # the manifest is strict JSON
    # "call nothing" must survive the top score recomputed in float32 (0.3 rounds up to 0.30000001192...)
    rounded = choose_one(np.array([1, 0]), np.array([0.2, 0.3]), Policy("specificity", 0.99))
    assert float(np.float32(0.3)) < rounded["value"] and rounded["validation"]["specificity"] == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_each_policy_meets_its_target_and_is_optimal_against_sklearns_roc(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 300))
    truth = rng.random(n) < rng.uniform(0.1, 0.6)
    # rounded scores: many ties, as a saturated or quantized model gives
    score = np.round(np.clip(rng.normal(0.35 + 0.3 * truth, 0.2), 0, 1), 2)
    fpr, tpr, _ = roc_curve(truth, score, drop_intermediate=False)
    youden = choose_one(truth, score, Policy("youden"))
    s, p = _called(truth, score, youden["value"])
    assert s - (1 - p) == pytest.approx((tpr - fpr).max())
    for target in (0.8, 0.9, 0.95):
        sens = choose_one(truth, score, Policy("sensitivity", target))
        s, p = _called(truth, score, sens["value"])
        assert s >= target and p == pytest.approx((1 - fpr[tpr >= target]).max())
        assert (s, p) == (sens["validation"]["sensitivity"], sens["validation"]["specificity"])
        spec = choose_one(truth, score, Policy("specificity", target))
        s, p = _called(truth, score, spec["value"])
        assert p >= target and s == pytest.approx(tpr[1 - fpr >= target].max())


def test_multiclass_decision_rule_and_per_class_choice():
    p = np.array([[0.5, 0.3, 0.2], [0.4, 0.35, 0.25], [0.2, 0.2, 0.6]])
    # equal thresholds: the arg-max; per class: the class exceeding its threshold by the most
    assert decisions("multiclass", p, 0.5).tolist() == [0, 0, 2]
    assert decisions("multiclass", p, np.array([0.6, 0.2, 0.5])).tolist() == [1, 1, 2]
    assert decisions("binary", np.array([[0.7, 0.3], [0.4, 0.6]]), 0.25).tolist() == [True, True]
    y = np.eye(3)[[0, 1, 2, 0, 1, 2]]
    probs = np.array([[.6, .3, .1], [.2, .5, .3], [.1, .2, .7], [.4, .4, .2], [.5, .3, .2], [.3, .3, .4]])
    record = choose("multiclass", y, probs, ["a", "b", "c"], Policy("youden"))
    assert set(record["classes"]) == {"a", "b", "c"} and record["decision_rule"].startswith("the class whose")
    binary = choose("binary", np.eye(2)[[0, 1, 1, 0]], np.array([[.9, .1], [.2, .8], [.6, .4], [.7, .3]]),
                    ["NORMAL", "PNEUMONIA"], Policy("youden"))
    assert list(binary["classes"]) == ["PNEUMONIA"]  # binary: the positive class only


def test_task_metrics_decide_at_per_class_thresholds():
    y = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=float)
    p = np.array([[0.3, 0.1], [0.1, 0.3], [0.25, 0.35], [0.1, 0.05]])
    m = task_metrics("multilabel", y, p, ["a", "b"], threshold=np.array([0.2, 0.25]))
    # by hand: a called on images 0, 2 (both true) → sensitivity 1, specificity 1; b called on 1, 2 → 1, 1
    assert m["sensitivity"] == {"a": 1.0, "b": 1.0} and m["specificity"] == {"a": 1.0, "b": 1.0}
    assert m["threshold"] == [0.2, 0.25]


def test_held_reports_the_split_figures_with_wilson_intervals():
    chosen = Thresholds("binary", ["NORMAL", "PNEUMONIA"], {"PNEUMONIA": 0.5}, "validation")
    y = np.eye(2)[[1, 1, 1, 1, 0, 0]]
    p = np.array([[0, .9], [0, .8], [0, .7], [0, .2], [0, .1], [0, .6]])
    out = held(chosen, y, p)["classes"]["PNEUMONIA"]
    assert (out["sensitivity"], out["specificity"], out["n_positive"], out["n_negative"]) == (0.75, 0.5, 4, 2)
    assert out["sensitivity_ci"] == pytest.approx([0.3006, 0.9544], abs=1e-4)  # Wilson 3/4, standard tables


def _manifest(thresholds: dict | None, model_sha: str):
    from medq.runrecord import Artifact, Facts, Manifest

    return Manifest(facts=Facts(classes=["NORMAL", "PNEUMONIA"], task="binary", thresholds=thresholds),
                    artifacts={"keras_model": Artifact("model.keras", model_sha, 1, "train")})


def test_old_manifests_decide_at_0_5_with_a_note_and_a_replaced_model_is_caught():
    classes = ["NORMAL", "PNEUMONIA"]
    old = Thresholds.from_manifest(_manifest(None, "aaa"), "binary", classes)
    assert old.values == {"PNEUMONIA": 0.5} and old.source == "fallback" and "no operating thresholds" in old.notes[0]
    record = choose("binary", np.eye(2)[[0, 1, 1, 0]], np.array([[.9, .1], [.2, .8], [.6, .4], [.7, .3]]), classes,
                    Policy("youden"), chosen_for={"keras_model": "aaa"})
    good = Thresholds.from_manifest(_manifest(record, "aaa"), "binary", classes)
    assert good.source == "validation" and good.values["PNEUMONIA"] == record["classes"]["PNEUMONIA"]["value"]
    stale = Thresholds.from_manifest(_manifest(record, "bbb"), "binary", classes)
    assert stale.source == "fallback" and "earlier model" in stale.notes[0]


@pytest.mark.parametrize("overrides, message", [
    (["thresholds.policy=sensitivity"], "needs a target"),
    (["thresholds.target=0.3"], "youden policy takes no target"),
    (["thresholds.policy=fixed", "thresholds.target=1.5"], "strictly between 0 and 1"),
    (["thresholds.policy=roc"], "'roc' is not allowed"),
])
def test_config_section_is_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    assert load_config(None, ["thresholds.policy=specificity", "thresholds.target=0.95"]).thresholds.target == 0.95


# --- the stages -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from medq.data.phantoms import generate_chest_pneumonia
    from medq.train import run_train

    root = tmp_path_factory.mktemp("data") / "chest_xray"
    generate_chest_pneumonia(root, 48, 4, 12, 40, 7)
    config = load_config(None, [f"run.output_dir={tmp_path_factory.mktemp('runs')}", f"data.root={root}",
                                "preprocess.image_size=32", "train.batch_size=16", "train.tensorboard=false",
                                "train.epochs=2", "model.params={blocks: 2, filters: 4, dense_units: 8}",
                                "thresholds.policy=sensitivity", "thresholds.target=0.9"])
    run_train(config)
    return config


def test_train_records_thresholds_that_evaluate_and_predict_use(trained, caplog):
    from medq import runrecord
    from medq.cli import _evaluation_lines
    from medq.data.readers import read_dataset
    from medq.predict import ImageInput, Predictor, iter_predictions, read_run
    from medq.train import run_evaluate

    manifest = runrecord.read_manifest(trained.run_dir)
    record = manifest["thresholds"]
    entry = record["classes"]["PNEUMONIA"]
    assert record["policy"] == "sensitivity" and entry["validation"]["sensitivity"] >= 0.9
    assert record["chosen_for"]["keras_model"] == manifest["artifacts"]["keras_model"]["sha256"]
    # evaluate on the validation split: the chosen point reproduces the recorded validation figures
    report = run_evaluate(trained, split="val")
    val = report["single_crop"]
    point = val["operating_points"]["classes"]["PNEUMONIA"]
    shown = "\n".join(_evaluation_lines(report))
    assert f"PNEUMONIA ≥ {entry['value']:.4g}: val sensitivity" in shown and "chosen on validation" in shown
    assert point["threshold"] == entry["value"] == val["threshold"]
    assert (point["sensitivity"], point["specificity"]) == (entry["validation"]["sensitivity"],
                                                            entry["validation"]["specificity"])
    # predict decides at the run's threshold, not the arg-max: record one that splits these images differently
    # from 0.5 (the manifest's value is what predict must read), then check every line against p ≥ t
    paths = read_dataset(trained.data, trained.run.seed).paths("test")[:12]
    items = [ImageInput(Path(p)) for p in paths]

    def predictions():
        predictor = Predictor(read_run(trained.run_dir), "keras", trained.run_dir / "model.keras")
        try:
            return list(iter_predictions(predictor, items, batch_size=6, quiet=True))
        finally:
            predictor.close()

    probs = np.array([r["probabilities"]["PNEUMONIA"] for r in predictions()])
    ranked = np.unique(probs)
    middles = (ranked[1:] + ranked[:-1]) / 2
    value = float(next(t for t in middles if (probs >= t).sum() != (probs >= 0.5).sum()))
    path = trained.run_dir / runrecord.MANIFEST
    data = json.loads(path.read_text())
    data["thresholds"]["classes"]["PNEUMONIA"]["value"] = value
    path.write_text(json.dumps(data))
    records = predictions()
    assert sum(r["prediction"] == "PNEUMONIA" for r in records) == (probs >= value).sum() != (probs >= 0.5).sum()
    for r in records:
        expected = "PNEUMONIA" if r["probabilities"]["PNEUMONIA"] >= value else "NORMAL"
        assert r["prediction"] == expected and r["thresholds"] == {"PNEUMONIA": value}
    # a run recorded before thresholds existed: 0.5, with a warning saying so
    data.pop("thresholds")
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="medq"):
        old = run_evaluate(trained, split="val")["single_crop"]
    assert old["threshold"] == 0.5 and old["operating_points"]["source"] == "fallback"
    assert "no operating thresholds" in caplog.text
    assert run_evaluate(trained, split="val", threshold=0.3)["single_crop"]["threshold"] == 0.3


def test_benchmark_rows_decide_and_count_flips_at_the_run_thresholds():
    from medq.benchmark import runner

    classes = ["NORMAL", "PNEUMONIA"]
    operating = Thresholds("binary", classes, {"PNEUMONIA": 0.3}, "validation")
    y = np.eye(2)[[1, 1, 0, 0]]
    fp32 = np.array([[.6, .4], [.8, .2], [.9, .1], [.75, .25]])
    int8 = np.array([[.62, .38], [.72, .28], [.9, .1], [.69, .31]])
    # at 0.3 by hand: FP32 calls image 0 only; INT8 calls images 0 and 3 → one flip (image 3); at 0.5 there is none
    fidelity = runner._fidelity("binary", y, fp32, int8, 0.05, operating)
    assert (fidelity["flipped_images"], fidelity["threshold"]) == (1, 0.3)
    metrics = runner._metrics("binary", classes, y, int8, operating)
    assert (metrics["sensitivity"], metrics["specificity"]) == (0.5, 0.5)
    assert metrics["operating_points"]["classes"]["PNEUMONIA"]["threshold"] == 0.3


# three classes, every threshold 0.3; image 0 (a B) passes A's and B's threshold but predict calls it A
MC_CLASSES = ["A", "B", "C"]
MC_TRUTH = np.eye(3)[[1, 1, 0, 2]]
MC_PROB = np.array([[.40, .35, .25], [.10, .60, .30], [.50, .20, .30], [.20, .20, .60]])


def test_multiclass_operating_points_are_the_calls_predict_makes_not_one_vs_rest():
    """A softmax model's image is called one class (argmax(p − t)); the operating point reported per class must be
    of those calls, or evaluate, the card and the subgroups promise a sensitivity the deployed tool does not have."""
    out = held(Thresholds.uniform("multiclass", MC_CLASSES, 0.3, "validation"), MC_TRUTH, MC_PROB)["classes"]
    # by hand: calls A, B, A, C. B: 1 of its 2 images called B; C: none of images 0-2 called C; A: image 0 wrongly
    assert (out["B"]["sensitivity"], out["B"]["specificity"]) == (0.5, 1.0)
    assert (out["C"]["sensitivity"], out["C"]["specificity"]) == (1.0, 1.0)
    assert (out["A"]["sensitivity"], out["A"]["specificity"]) == (1.0, pytest.approx(2 / 3))
    # the same figures as the evaluation's own per-class sensitivity/specificity at those thresholds
    m = task_metrics("multiclass", MC_TRUTH, MC_PROB, MC_CLASSES, threshold=np.full(3, 0.3))
    assert {c: out[c]["sensitivity"] for c in MC_CLASSES} == m["sensitivity"]
    assert {c: out[c]["specificity"] for c in MC_CLASSES} == pytest.approx(m["specificity"])


def test_multiclass_validation_figures_are_recorded_under_the_decision_rule_with_a_note_when_short():
    record = choose("multiclass", MC_TRUTH, MC_PROB, MC_CLASSES, Policy("fixed", 0.3))
    assert record["classes"]["B"]["validation"]["sensitivity"] == 0.5  # by hand, as above (one-vs-rest: 1.0)
    assert record["classes"]["C"]["validation"]["specificity"] == 1.0  # one-vs-rest: 1/3
    # A's only positive scores 0.2, so A's threshold is 0.15 (midway to 0.1) and B's 0.275 (midway 0.4 → 0.15): B's
    # image 0 (0.45, 0.40) exceeds A's threshold by 0.30 and B's by 0.125, so it is called A. By hand.
    truth = np.eye(3)[[1, 1, 0, 2]]
    prob = np.array([[.45, .40, .15], [.10, .80, .10], [.20, .10, .70], [.05, .15, .80]])
    target = choose("multiclass", truth, prob, MC_CLASSES, Policy("sensitivity", 0.9))
    assert [target["classes"][c]["value"] for c in MC_CLASSES] == pytest.approx([0.15, 0.275, 0.75])
    b = target["classes"]["B"]
    assert b["validation"]["sensitivity"] == 0.5
    assert target["classes"]["A"]["validation"]["sensitivity"] == 1.0
    assert not any("decision rule" in n for n in target["classes"]["A"]["notes"])
    assert any("decision rule" in n and "0.500" in n for n in b["notes"])


@pytest.mark.parametrize("policy", [Policy("youden"), Policy("sensitivity", 0.9), Policy("specificity", 0.9)])
def test_scores_that_separate_nothing_on_validation_get_a_note_not_a_silent_threshold(policy):
    tied = choose_one(np.array([0, 1, 0, 1, 1]), np.full(5, 0.42), policy)
    # every score tied: calling all images or none are the only points, sensitivity + specificity − 1 = 0 at both
    assert tied["validation"]["sensitivity"] + tied["validation"]["specificity"] == 1.0
    assert any("at chance" in n for n in tied["notes"])
    inverted = choose_one(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9]), policy)  # AUC 0 by hand
    assert any("at chance" in n for n in inverted["notes"])
    separated = choose_one(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]), policy)
    assert not any("at chance" in n for n in separated["notes"])


def test_an_undefined_auc_is_said_never_printed_as_nan():
    """A test split without positives: task_metrics' AUC is NaN; `medq evaluate` must say undefined, not 'nan'."""
    from medq.cli import _evaluation_lines
    from medq.metrics import clinical_metrics

    y, p = np.eye(2)[[0, 0, 0]], np.array([[.8, .2], [.6, .4], [.3, .7]])
    m = task_metrics("binary", y, p, ["NORMAL", "PNEUMONIA"], threshold=0.5)
    report = {"objective": "auc", "n_images": 3, "split": "test",
              "single_crop": m | {"clinical": clinical_metrics("binary", y, p, ["NORMAL", "PNEUMONIA"])}}
    text = "\n".join(_evaluation_lines(report))
    assert "nan" not in text.lower() and "auc undefined" in text
    assert "accuracy 0.6667" in text  # 2 of 3 called NORMAL at 0.5, by hand


def test_predict_calls_a_saturated_models_images_as_the_validation_figures_counted_them(tmp_path):
    """Scores a few float32 steps below 1 (a saturated sigmoid/softmax): the threshold lies between two of them.
    The JSON line must call each image as the threshold's validation figures did, which rounding the shown
    probabilities to 6 decimals (all of them to 1.0) did not."""
    from medq.inference import RunInfo, record
    from medq.preprocess import PreprocessSpec

    score = np.array([0.99999976, 0.99999982, 0.99999988, 0.99999994], dtype=np.float32)
    truth = np.array([0, 0, 1, 1])
    chosen = choose_one(truth, score, Policy("youden"))
    assert (chosen["validation"]["sensitivity"], chosen["validation"]["specificity"]) == (1.0, 1.0)
    info = RunInfo(tmp_path, ["NORMAL", "PNEUMONIA"], "binary", PreprocessSpec(8, 1, "unit"),
                   thresholds=Thresholds("binary", ["NORMAL", "PNEUMONIA"], {"PNEUMONIA": chosen["value"]},
                                         "validation"))
    calls = [record(None, np.array([1 - s, s], dtype=np.float32), info)["prediction"] for s in score]
    assert calls == ["NORMAL", "NORMAL", "PNEUMONIA", "PNEUMONIA"]  # the validation truth, met exactly


def test_a_policy_per_class_overrides_the_default_for_that_class_only():
    """thresholds.per_class: {Effusion: {policy: sensitivity, target: 0.9}} — that class by its own policy (oracle:
    sklearn's ROC), every other class by the section's."""
    config = load_config(None, ["thresholds.per_class={b: {policy: sensitivity, target: 0.9}}"])
    rng = np.random.default_rng(3)
    y = (rng.random((60, 2)) < 0.4).astype(float)
    p = np.clip(y * 0.3 + rng.random((60, 2)) * 0.7, 0, 1)
    record = __import__("medq.thresholds", fromlist=["for_run"]).for_run(config, "multilabel", ["a", "b"], y, p, "s")
    assert record["classes"]["b"]["policy"] == "sensitivity" and record["classes"]["a"]["policy"] == "youden"
    fpr, tpr, cand = roc_curve(y[:, 1], p[:, 1], drop_intermediate=False)
    best = cand[np.flatnonzero(tpr >= 0.9 - 1e-12)[0]]
    assert ((p[:, 1] >= record["classes"]["b"]["value"]) == (p[:, 1] >= best)).all()
    fpr, tpr, cand = roc_curve(y[:, 0], p[:, 0], drop_intermediate=False)
    youden = cand[np.flatnonzero(tpr - fpr >= (tpr - fpr).max() - 1e-12)[0]]
    assert ((p[:, 0] >= record["classes"]["a"]["value"]) == (p[:, 0] >= youden)).all()


def test_a_per_class_policy_for_a_class_the_run_does_not_threshold_is_one_line_naming_the_valid_ones():
    from medq.thresholds import check_per_class

    config = load_config(None, ["thresholds.per_class={Pneumonai: {policy: fixed, target: 0.3}}"])
    with pytest.raises(ConfigError) as caught:
        check_per_class(config.thresholds, "multilabel", ["Effusion", "Pneumonia"])
    assert "'Pneumonai'" in str(caught.value) and "Effusion, Pneumonia" in str(caught.value)
    assert "\n" not in str(caught.value)
    binary = load_config(None, ["thresholds.per_class={NORMAL: {policy: fixed, target: 0.3}}"])
    with pytest.raises(ConfigError, match="'NORMAL'.*PNEUMONIA"):  # binary: only the positive class has one
        check_per_class(binary.thresholds, "binary", ["NORMAL", "PNEUMONIA"])
    with pytest.raises(ConfigError, match="needs a target"):
        load_config(None, ["thresholds.per_class={b: {policy: sensitivity}}"])


def test_train_refuses_a_per_class_policy_for_an_unknown_class_before_training(tmp_path, monkeypatch):
    import medq.train as train
    from medq.data.phantoms import generate_chest_pneumonia

    data = tmp_path / "data"
    generate_chest_pneumonia(data, n_train=12, n_val=8, n_test=8, size=32, seed=2)
    config = load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"data.root={data}", "data.generate=false",
                                "thresholds.per_class={PNEUMONA: {policy: sensitivity, target: 0.9}}"])
    monkeypatch.setattr(train, "fit_model", lambda *a, **k: pytest.fail("trained before checking the config"))
    with pytest.raises(ConfigError, match="'PNEUMONA'.*use one of PNEUMONIA"):
        train.run_train(config)
    assert not (config.run_dir / "model.keras").exists()


def test_the_evaluate_report_does_not_print_a_multiclass_call_as_p_above_its_threshold():
    from medq.cli import _operating_lines

    multiclass = held(Thresholds.uniform("multiclass", MC_CLASSES, 0.3, "validation"), MC_TRUTH, MC_PROB)
    text = "\n".join(_operating_lines(multiclass, "test"))
    assert "B (threshold 0.3): test sensitivity 0.500" in text and "≥" not in text  # B: 1 of 2 called B, by hand
    binary = held(Thresholds("binary", ["NORMAL", "PNEUMONIA"], {"PNEUMONIA": 0.5}, "validation"),
                  np.eye(2)[[1, 0]], np.array([[.2, .8], [.9, .1]]))
    assert "PNEUMONIA ≥ 0.5: test sensitivity 1.000" in "\n".join(_operating_lines(binary, "test"))
