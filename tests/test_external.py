"""External validation (`medq evaluate --run NAME --config OTHER.yaml`): a Kaggle-layout run on RSNA-layout DICOM
phantoms through the label mapping and the reverse, against independent oracles — labels read from the datasets'
own files (RSNA's class table, Kaggle's folder names, NIH's Finding Labels), probabilities from the Keras model
called directly, AUC from sklearn, sensitivity/specificity counted by hand at the run's recorded threshold — plus
the record (manifest entry, artifact, `medq runs show`, the model card) and the mapping's errors."""
import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from medq import labelmap, runrecord
from medq.cli import main
from medq.config import load_config
from medq.data.phantoms import generate_phantoms
from medq.errors import ConfigError, DataError
from medq.external import run_external, table_rows
from medq.preprocess import PreprocessSpec, load_batch
from medq.train import run_evaluate, run_train

SIZE = 32
BASE = ["data.generate=false", f"preprocess.image_size={SIZE}", "train.epochs=2",
        "model.params={blocks: 2, filters: 4, dense_units: 8}"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Kaggle-layout and RSNA-layout phantoms, a run trained on each (2 epochs: the metrics, not the model, are
    under test) and evaluated on its own test split."""
    root = tmp_path_factory.mktemp("external")
    generate_phantoms("chest-pneumonia", root / "kaggle", n_train=40, n_val=0, n_test=24, size=48, seed=1)
    generate_phantoms("rsna-dicom", root / "rsna", n_train=60, n_val=0, n_test=0, size=48, seed=2)
    out = [f"run.output_dir={root / 'output'}"]
    kaggle = load_config(None, BASE + out + [f"data.root={root / 'kaggle'}", "data.format=kaggle-pneumonia",
                                             "run.name=kaggle"])
    rsna = load_config(None, BASE + out + [f"data.root={root / 'rsna'}", "data.format=rsna-pneumonia",
                                           "data.test_fraction=0.3", "run.name=rsna"])
    for config in (kaggle, rsna):
        run_train(config)
        run_evaluate(config)
    return root, kaggle, rsna


def rsna_truth(root: Path) -> dict[str, str]:
    """patientId → class, from the challenge's class table itself (duplicate rows per box collapse)."""
    with open(root / "stage_2_detailed_class_info.csv", newline="") as fh:
        return {row["patientId"]: row["class"] for row in csv.DictReader(fh)}


def direct_probabilities(run_dir: Path, paths: list[str]) -> np.ndarray:
    """The run's Keras model called directly on the run's recorded preprocessing."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    model = tf.keras.models.load_model(run_dir / "model.keras", compile=False)
    return model.predict(load_batch(paths, PreprocessSpec.from_dict(manifest["preprocess"])), verbose=0)


def by_hand(truth: np.ndarray, score: np.ndarray, t: float) -> tuple[float, float, list[float]]:
    """Sensitivity, specificity at ``score >= t`` and the Wilson 95% interval of the sensitivity."""
    called = score >= t
    tp, n = int((called & truth).sum()), int(truth.sum())
    z = 1.959963984540054
    p = tp / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    return p, float((~called[~truth]).mean()), [centre - half, centre + half]


def test_kaggle_run_on_rsna_phantoms_matches_sklearn_and_lists_the_class_without_counterpart(world):
    root, kaggle, _ = world
    other = load_config(None, BASE + [f"data.root={root / 'rsna'}", "data.format=rsna-pneumonia",
                                      f"run.output_dir={root / 'output'}"])
    result = run_external(kaggle.run_dir, other, split="all")

    paths = [image["path"] for image in result["images"]]
    truth_of = rsna_truth(root / "rsna")
    labels = [truth_of[Path(p).stem] for p in paths]
    assert len(paths) == len(truth_of) == result["counts"]["evaluated"]  # 'all': every image of the dataset
    probs = direct_probabilities(kaggle.run_dir, paths)
    pneumonia = np.array([c == "Lung Opacity" for c in labels])
    normal = np.array([c == "Normal" for c in labels])
    metrics = result["metrics"]
    assert metrics["PNEUMONIA"]["auc"] == pytest.approx(roc_auc_score(pneumonia, probs[:, 1]), abs=1e-6)
    assert metrics["NORMAL"]["auc"] == pytest.approx(roc_auc_score(normal, probs[:, 0]), abs=1e-6)
    assert metrics["PNEUMONIA"]["n_positive"] == pneumonia.sum()
    assert metrics["PNEUMONIA"]["prevalence"] == pytest.approx(pneumonia.mean())

    manifest = json.loads((kaggle.run_dir / "manifest.json").read_text())
    t = manifest["thresholds"]["classes"]["PNEUMONIA"]["value"]
    sens, spec, sens_ci = by_hand(pneumonia, probs[:, 1], t)
    point = metrics["PNEUMONIA"]["operating_point"]
    assert point["threshold"] == t
    assert point["sensitivity"] == pytest.approx(sens) and point["specificity"] == pytest.approx(spec)
    assert point["sensitivity_ci"] == pytest.approx(sens_ci, abs=1e-9)
    # NORMAL has no threshold of its own: a binary model calls it wherever it does not call PNEUMONIA
    called_normal = probs[:, 1] < t
    sens, spec = called_normal[normal].mean(), (~called_normal[~normal]).mean()
    normal_point = metrics["NORMAL"]["operating_point"]
    assert normal_point["rule"].startswith("PNEUMONIA < ")
    assert normal_point["sensitivity"] == pytest.approx(sens) and normal_point["specificity"] == pytest.approx(spec)
    # the run's own test figure beside it: evaluation.json's, the AUC sklearn gives on its own test probabilities
    own = json.loads((kaggle.run_dir / "evaluation.json").read_text())["single_crop"]["per_class_auc"]["PNEUMONIA"]
    assert metrics["PNEUMONIA"]["own_test"]["auc"] == own

    # RSNA's "No Lung Opacity / Not Normal" has no counterpart: listed, its images negatives of both classes
    assert result["mapping"]["external_classes_without_counterpart"] == ["No Lung Opacity / Not Normal"]
    assert result["counts"]["per_external_class"]["No Lung Opacity / Not Normal"] == \
        sum(c == "No Lung Opacity / Not Normal" for c in truth_of.values())
    assert result["mapping"]["source"] == "built-in kaggle:rsna"


def test_rsna_run_on_kaggle_phantoms_reports_its_unmapped_class(world):
    root, _, rsna = world
    other = load_config(None, BASE + [f"data.root={root / 'kaggle'}", "data.format=kaggle-pneumonia",
                                      f"run.output_dir={root / 'output'}"])
    result = run_external(rsna.run_dir, other)  # the Kaggle test folder

    paths = [image["path"] for image in result["images"]]
    expected = sorted(str(p.resolve()) for p in (root / "kaggle" / "test").rglob("*.jpeg"))
    assert sorted(str(Path(p).resolve()) for p in paths) == expected
    pneumonia = np.array([Path(p).parent.name == "PNEUMONIA" for p in paths])
    probs = direct_probabilities(rsna.run_dir, paths)
    classes = json.loads((rsna.run_dir / "manifest.json").read_text())["classes"]
    opacity = classes.index("Lung Opacity")
    assert result["metrics"]["Lung Opacity"]["auc"] == pytest.approx(roc_auc_score(pneumonia, probs[:, opacity]),
                                                                     abs=1e-6)
    assert result["metrics"]["Normal"]["auc"] == pytest.approx(
        roc_auc_score(~pneumonia, probs[:, classes.index("Normal")]), abs=1e-6)
    unmapped = result["metrics"]["No Lung Opacity / Not Normal"]
    assert unmapped["evaluated"] is False and "no counterpart" in unmapped["reason"]
    assert result["mapping"]["model_classes_without_counterpart"] == ["No Lung Opacity / Not Normal"]


def test_binary_kaggle_model_on_multilabel_nih_through_an_explicit_mapping(world, tmp_path):
    root, kaggle, _ = world
    nih = tmp_path / "nih"
    generate_phantoms("chest-multilabel", nih, n_train=20, n_val=0, n_test=24, size=48, seed=3)
    other = load_config(None, BASE + [f"data.root={nih}", "data.format=nih-chestxray14",
                                      f"run.output_dir={tmp_path / 'output'}"])
    result = run_external(kaggle.run_dir, other, mapping=labelmap.parse_map(["PNEUMONIA=Pneumonia|Consolidation"]))
    with open(nih / "Data_Entry_2017.csv", newline="") as fh:
        findings = {row["Image Index"]: set(row["Finding Labels"].split("|")) for row in csv.DictReader(fh)}
    paths = [image["path"] for image in result["images"]]
    truth = np.array([bool(findings[Path(p).name] & {"Pneumonia", "Consolidation"}) for p in paths])
    probs = direct_probabilities(kaggle.run_dir, paths)
    entry = result["metrics"]["PNEUMONIA"]
    assert entry["n_positive"] == truth.sum() and entry["external"] == ["Pneumonia", "Consolidation"]
    if 0 < truth.sum() < len(truth):
        assert entry["auc"] == pytest.approx(roc_auc_score(truth, probs[:, 1]), abs=1e-6)
    assert result["metrics"]["NORMAL"]["evaluated"] is False
    assert "Pneumothorax" in result["mapping"]["external_classes_without_counterpart"]


def test_multilabel_nih_model_on_binary_kaggle_data(world, tmp_path):
    root, _, _ = world
    nih = tmp_path / "nih"
    generate_phantoms("chest-multilabel", nih, n_train=40, n_val=0, n_test=10, size=48, seed=4)
    config = load_config(None, BASE + [f"data.root={nih}", "data.format=nih-chestxray14",
                                       f"run.output_dir={tmp_path / 'output'}", "run.name=nih"])
    run_train(config)
    other = load_config(None, BASE + [f"data.root={root / 'kaggle'}", "data.format=kaggle-pneumonia",
                                      f"run.output_dir={tmp_path / 'output'}"])
    result = run_external(config.run_dir, other)  # the built-in nih:kaggle mapping
    assert result["mapping"]["pairs"] == {"Pneumonia": ["PNEUMONIA"]}
    paths = [image["path"] for image in result["images"]]
    truth = np.array([Path(p).parent.name == "PNEUMONIA" for p in paths])
    probs = direct_probabilities(config.run_dir, paths)
    column = labelmap.NIH.index("Pneumonia")
    entry = result["metrics"]["Pneumonia"]
    assert entry["auc"] == pytest.approx(roc_auc_score(truth, probs[:, column]), abs=1e-6)
    t = json.loads((config.run_dir / "manifest.json").read_text())["thresholds"]["classes"]["Pneumonia"]["value"]
    sens, spec, _ = by_hand(truth, probs[:, column], t)
    assert entry["operating_point"]["sensitivity"] == pytest.approx(sens)
    assert entry["operating_point"]["specificity"] == pytest.approx(spec)
    assert sorted(result["mapping"]["model_classes_without_counterpart"]) == sorted(set(labelmap.NIH) - {"Pneumonia"})
    assert result["metrics"]["Hernia"]["evaluated"] is False
    assert result["mapping"]["external_classes_without_counterpart"] == ["NORMAL"]


def test_the_record_runs_show_and_the_card(world, capsys):
    root, kaggle, _ = world
    run_dir = kaggle.run_dir
    config = root / "rsna.yaml"
    config.write_text(f"data:\n  root: {root / 'rsna'}\n  format: rsna-pneumonia\n  generate: false\n"
                      f"run:\n  output_dir: {root / 'output'}\nexternal:\n  label_map:\n    PNEUMONIA: Lung Opacity\n")
    for _ in range(2):  # evaluating the same dataset and split again replaces its entry
        assert main(["evaluate", "--run", str(run_dir), "--config", str(config), "--split", "test", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "PNEUMONIA → Lung Opacity" in printed and "NORMAL → no counterpart: not evaluated" in printed

    manifest = json.loads((run_dir / "manifest.json").read_text())
    entries = [e for e in manifest["external_evaluations"] if e["split"] == "test" and e["dataset_format"] ==
               "rsna-pneumonia"]
    assert len(entries) == 1
    entry = entries[0]
    assert entry["dataset_format"] == "rsna-pneumonia" and entry["root"] == str((root / "rsna").resolve())
    assert entry["model"] == "keras_model"
    assert entry["model_sha256"] == hashlib.sha256((run_dir / "model.keras").read_bytes()).hexdigest()[:12]
    assert entry["mapping"]["source"].startswith("external.label_map")
    artifact = run_dir / entry["artifact"]
    key = entry["artifact"].removesuffix(".json")
    assert manifest["artifacts"][key]["sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert json.loads(artifact.read_text())["metrics"] == entry["metrics"]

    auc = entry["metrics"]["PNEUMONIA"]["auc"]
    assert main(["runs", "show", str(run_dir)]) == 0
    shown = capsys.readouterr().out
    rows = [line.split() for line in shown.splitlines() if "rsna-pneumonia" in line and "PNEUMONIA" in line]
    assert any(row[1] == "test" and f"{auc:.3f}" in row for row in rows)
    assert main(["card", str(run_dir)]) == 0
    card = (run_dir / "model_card.md").read_text()
    assert "## External evaluations" in card
    assert any(f"{auc:.3f}" in line and "| PNEUMONIA | Lung Opacity |" in line for line in card.splitlines())
    card_json = json.loads((run_dir / "model_card.json").read_text())
    assert card_json["quantitative_analyses"]["external_evaluations"]
    low, high = entry["metrics"]["PNEUMONIA"]["auc_ci"]
    own = entry["metrics"]["PNEUMONIA"]["own_test"]["auc"]
    caveat = [c for c in card_json["caveats_and_recommendations"] if "rsna-pneumonia (test), PNEUMONIA" in c]
    if low <= 0.5:
        assert caveat and "includes chance" in caveat[0]
    elif high < own:
        assert caveat and "does not transfer" in caveat[0]
    else:
        assert not caveat


def test_a_mapping_naming_an_unknown_class_is_one_line(world, capsys):
    root, kaggle, _ = world
    code = main(["evaluate", "--run", str(kaggle.run_dir), "--data", str(root / "rsna"), "--format",
                 "rsna-pneumonia", "--map", "PNEUMONIA=Opacity", "-q",
                 "--set", f"run.output_dir={root / 'output'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "'Opacity'" in err and "Lung Opacity" in err and "PNEUMONIA" in err
    assert main(["evaluate", "--map", "PNEUMONIA=Lung Opacity", "-q"]) == 2  # a mapping without --run does nothing
    assert "without --run" in capsys.readouterr().err
    missing = root / "no-such-dataset"
    assert main(["evaluate", "--run", str(kaggle.run_dir), "--data", str(missing), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and not missing.exists()


def test_the_runs_own_training_images_are_refused_as_external(world):
    root, kaggle, _ = world
    same = load_config(None, BASE + [f"data.root={root / 'kaggle'}", "data.format=kaggle-pneumonia",
                                     f"run.output_dir={root / 'output'}"])
    before = (kaggle.run_dir / "manifest.json").read_bytes()
    with pytest.raises(DataError, match=r"in the run's own train(/val)? split"):
        run_external(kaggle.run_dir, same, split="all")
    assert (kaggle.run_dir / "manifest.json").read_bytes() == before  # nothing recorded


def test_table_rows_mark_an_evaluation_of_a_replaced_model_stale():
    entry = runrecord.ExternalEvaluation(
        data_source="rsna-pneumonia", split="test", counts={"evaluated": 10}, model="keras_model",
        model_sha256="aaaaaaaaaaaa", metrics={"PNEUMONIA": {
            "evaluated": True, "external": ["Lung Opacity"], "n_positive": 4, "n_negative": 6, "auc": 0.75,
            "auc_ci": [0.5, 1.0], "operating_point": None}, "NORMAL": {"evaluated": False, "reason": "x"}})
    current, replaced = table_rows([entry], {"keras_model": "a" * 64}), table_rows([entry], {"keras_model": "b" * 64})
    assert "STALE" not in current[0][0] and "STALE" in replaced[0][0]
    assert current[0][6] == "0.750 [0.500, 1.000]" and current[1][4] == "no counterpart: not evaluated"


# --- the mapping alone (no model) -----------------------------------------------------------------------------

def test_builtin_mappings_state_their_gaps_and_unknown_classes_are_refused():
    kaggle, rsna_binary = list(labelmap.KAGGLE), list(labelmap.RSNA_BINARY)
    lmap = labelmap.resolve(kaggle, rsna_binary)
    assert lmap.pairs == {"PNEUMONIA": ["Lung Opacity"]}
    assert lmap.unmapped_model == ["NORMAL"] and lmap.unmapped_external == ["No Lung Opacity"]
    assert any("Not Normal" in n for n in lmap.notes)
    lossy = labelmap.resolve(kaggle, rsna_binary, labelmap.parse_map(["NORMAL=No Lung Opacity"]))
    assert any("abnormal" in n for n in lossy.notes)  # said, not silent
    union = labelmap.resolve(list(labelmap.RSNA), list(labelmap.NIH))
    assert union.pairs == {"Lung Opacity": ["Pneumonia", "Consolidation"]}
    with pytest.raises(ConfigError, match="'Pneumonitis' is not a class of the external dataset"):
        labelmap.resolve(kaggle, list(labelmap.NIH), labelmap.parse_map(["PNEUMONIA=Pneumonitis"]))
    with pytest.raises(ConfigError, match="'COVID' is not a class of the run's model"):
        labelmap.resolve(kaggle, list(labelmap.NIH), labelmap.parse_map(["COVID=Pneumonia"]))
    with pytest.raises(ConfigError, match="no label mapping"):
        labelmap.resolve(["benign", "malignant"], kaggle)
    with pytest.raises(ConfigError, match="no built-in mapping"):
        labelmap.resolve(kaggle, rsna_binary, "kaggle:busi")
    with pytest.raises(ConfigError, match="MODEL_CLASS=EXTERNAL_CLASS"):
        labelmap.parse_map(["PNEUMONIA=", "NORMAL=Normal"])


def test_every_chest_class_list_pair_has_a_builtin_and_the_3class_kaggle_maps_its_causes():
    """Each pair of medq's chest X-ray class lists (as the readers name them) has a built-in both ways; the Kaggle
    3-class variant's BACTERIA and VIRUS are PNEUMONIA, an opacity, NIH's Pneumonia (by hand from DATASETS.md)."""
    from medq.data.nih import CHEXNET_CLASSES
    from medq.data.rsna import BINARY_CLASSES, RSNA_CLASSES

    lists = {"kaggle": ["NORMAL", "PNEUMONIA"], "kaggle-3class": ["NORMAL", "BACTERIA", "VIRUS"],
             "rsna": RSNA_CLASSES, "rsna-binary": BINARY_CLASSES, "nih": CHEXNET_CLASSES}
    for a, model in lists.items():
        for b, external in lists.items():
            if a != b:
                assert labelmap.resolve(model, external).source == f"built-in {a}:{b}"
    causes = ["BACTERIA", "VIRUS"]
    assert labelmap.resolve(lists["kaggle"], lists["kaggle-3class"]).pairs == {"NORMAL": ["NORMAL"],
                                                                                "PNEUMONIA": causes}
    to_rsna = labelmap.resolve(lists["kaggle-3class"], RSNA_CLASSES)
    assert to_rsna.pairs == {"NORMAL": ["Normal"], "BACTERIA": ["Lung Opacity"], "VIRUS": ["Lung Opacity"]}
    assert any("bacterial from viral" in n for n in to_rsna.notes)
    assert labelmap.resolve(RSNA_CLASSES, lists["kaggle-3class"]).pairs == {"Lung Opacity": causes,
                                                                            "Normal": ["NORMAL"]}
    assert labelmap.resolve(lists["kaggle-3class"], CHEXNET_CLASSES).pairs == {"BACTERIA": ["Pneumonia"],
                                                                               "VIRUS": ["Pneumonia"]}
    assert labelmap.resolve(CHEXNET_CLASSES, lists["kaggle-3class"]).pairs == {"Pneumonia": causes}


def test_a_map_file_is_read_and_each_mistake_in_it_is_one_line_naming_the_file(tmp_path):
    kaggle, rsna = list(labelmap.KAGGLE), list(labelmap.RSNA)
    good = tmp_path / "map.yaml"
    good.write_text("PNEUMONIA: Lung Opacity\nNORMAL: [Normal, No Lung Opacity / Not Normal]\n")
    lmap = labelmap.resolve(kaggle, rsna, labelmap.parse_map([str(good)]))
    assert lmap.pairs == {"PNEUMONIA": ["Lung Opacity"], "NORMAL": ["Normal", "No Lung Opacity / Not Normal"]}
    assert lmap.source == str(good) and any("abnormal" in n for n in lmap.notes)  # a lossy pair: said
    (tmp_path / "many.yaml").write_text("NORMAL: Normal\nPNEUMONIA: [Lung Opacity, Normal]\n")
    many = labelmap.resolve(kaggle, rsna, labelmap.parse_map([str(tmp_path / "many.yaml")]))
    assert any(n.startswith("NORMAL and PNEUMONIA map to Normal together") for n in many.notes)  # many-to-one: said
    cases = {"unknown_model.yaml": ("COVID: Lung Opacity\n", "'COVID' is not a class of the run's model"),
             "unknown_external.yaml": ("PNEUMONIA: Pneumonitis\n", "'Pneumonitis' is not a class of the external"),
             "twice.yaml": ("PNEUMONIA: Lung Opacity\nPNEUMONIA: Normal\n", "PNEUMONIA"),
             "list.yaml": ("- PNEUMONIA: Lung Opacity\n", "expected a mapping"),
             "empty_value.yaml": ("PNEUMONIA:\n", "not an external class name"),
             "nested.yaml": ("PNEUMONIA: {a: b}\n", "not an external class name")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as caught:
            labelmap.resolve(kaggle, rsna, labelmap.parse_map([str(tmp_path / name)]))
        assert message in str(caught.value) and name in str(caught.value) and "\n" not in str(caught.value), name
    with pytest.raises(ConfigError, match="no such label map file"):
        labelmap.parse_map([str(tmp_path / "absent.yaml")])


def test_a_mapped_class_without_external_positives_is_said_undefined_never_nan():
    from medq import external, runrecord, thresholds

    classes = ["NORMAL", "PNEUMONIA"]
    lmap = labelmap.resolve(classes, classes)
    y = np.eye(2)[[0, 0, 0, 0]]  # no PNEUMONIA among the external images
    p = np.array([[.8, .2], [.6, .4], [.3, .7], [.9, .1]])
    metrics = external.class_metrics(lmap, classes, y, p, thresholds.Thresholds.uniform("binary", classes, .5,
                                                                                         "validation"), {})
    pneumonia = metrics["PNEUMONIA"]
    assert pneumonia["auc"] is None and pneumonia["operating_point"]["sensitivity"] is None
    assert pneumonia["operating_point"]["specificity"] == 0.75  # 3 of 4 below 0.5, by hand
    assert "0 positive(s) and 4 negative(s)" in pneumonia["note"]
    entry = runrecord.ExternalEvaluation(metrics=metrics, counts={"evaluated": 4}, split="test", data_source="x")
    text = "\n".join(" | ".join(r) for r in external.table_rows([entry]))
    assert "nan" not in text.lower() and "None" not in text and "n/a @ 0.5" in text


def test_external_label_map_is_checked_when_the_config_loads(tmp_path):
    """A typo in external.label_map stops loading the config (every command), one line naming the file and listing
    the built-ins; a built-in's name, an external list's name alone, pairs or a map file load."""
    bad = tmp_path / "other.yaml"
    bad.write_text("external:\n  label_map: kagle:rsna\n")
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    message = str(caught.value)
    assert message.startswith(f"{bad}: external.label_map: 'kagle:rsna' is no built-in mapping") and "\n" not in message
    assert all(name in message for name in ("kaggle:rsna", "rsna:nih", "nih:rsna-binary"))
    with pytest.raises(ConfigError, match=r"^--set external.label_map=absent.yaml: .*no such label map file"):
        load_config(None, ["external.label_map=absent.yaml"])
    for good in ("kaggle:rsna", "nih", "{PNEUMONIA: Lung Opacity}"):
        load_config(None, [f"external.label_map={good}"])
    mapping = tmp_path / "map.yaml"
    mapping.write_text("PNEUMONIA: [Lung Opacity]\n")
    config = load_config(None, [f"external.label_map={mapping}"])
    given = labelmap.from_config(config.external.label_map, "external.label_map")
    assert labelmap.resolve(list(labelmap.KAGGLE), list(labelmap.RSNA), given).pairs == {"PNEUMONIA": ["Lung Opacity"]}


def test_the_per_image_file_writes_every_float32_probability_exactly_as_predict_does(world, tmp_path, monkeypatch):
    """A saturated model's scores lie a few float32 steps below 1; 6 decimals wrote them all as 1.0. The per-image
    file must give back exactly the float32 values the model returned (as predict and serve print them)."""
    import shutil

    from medq import runmodel

    root, kaggle, _ = world
    run_dir = tmp_path / "kaggle"
    shutil.copytree(kaggle.run_dir, run_dir)  # the module's run keeps its record for the other tests
    real = runmodel.probabilities
    injected = {}

    def saturated(*args, **kwargs):
        probs, kept = real(*args, **kwargs)
        steps = np.arange(1, len(probs) + 1) % 5 + 1  # 1 - k * 2^-24, k = 1..5: distinct float32, all within 1e-6 of 1
        top = (np.float32(1.0) - steps.astype(np.float32) * np.float32(2.0 ** -24)).astype(np.float32)
        injected["probs"] = np.stack([np.float32(1.0) - top, top], axis=1).astype(np.float32)
        return injected["probs"], kept

    monkeypatch.setattr(runmodel, "probabilities", saturated)
    other = load_config(None, BASE + [f"data.root={root / 'rsna'}", "data.format=rsna-pneumonia",
                                      f"run.output_dir={root / 'output'}"])
    result = run_external(run_dir, other, split="all")
    written = json.loads((run_dir / result["artifact"]).read_text())["images"]
    back = np.array([[image["probabilities"][c] for c in labelmap.KAGGLE] for image in written], dtype=np.float32)
    assert np.array_equal(back, injected["probs"])
    assert len(set(back[:, 1].tolist())) == 5  # five distinct scores below 1, none written as 1.0
