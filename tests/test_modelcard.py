"""`medq card`: the model card is built only from the run record. Every value is checked against the manifest and
benchmark JSON read directly (json.load, hashlib), never against the card code; synthetic data is stated loudly;
what the record does not hold (thresholds not chosen for the run's model, subgroups, external evaluations) is "not
determined"."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from medq import artifacts, runrecord
from medq.cli import main

REPO = Path(__file__).resolve().parents[1]


def _row(rid: str, precision: str, auc: float, ci: list[float], fidelity: dict | None) -> dict:
    return {"id": rid, "engine": "tensorflow", "precision": precision, "model": f"model_{precision}.pb",
            "latency_ms": {"p50": 3.5}, "throughput_ips": 900.0,
            "metrics": {"n_images": 300, "accuracy": 0.81, "auc": auc, "sensitivity": 0.9, "specificity": 0.7,
                        "threshold": 0.5, "ci": {"accuracy": [0.76, 0.85], "auc": ci, "sensitivity": [0.85, 0.94],
                                                 "specificity": [0.62, 0.77]}},
            "clinical": {"brier": 0.13, "ece": 0.041, "sensitivity_at_specificity": {"0.90": 0.6}},
            **({"fidelity": fidelity} if fidelity else {})}


def _benchmark(source: str) -> dict:
    fidelity = {"flipped_fraction": 0.02, "max_abs_diff": 0.031, "auc_difference": -0.004,
                "auc_difference_ci": [-0.011, 0.003], "equivalent": False, "verdict": "not shown equivalent (test)"}
    return {"schema": 1, "created_at": "2026-12-06T21:00:00+0000", "baseline": "tensorflow-fp32", "data_source": source,
            "inputs": {"split": "test", "n_images": 300, "dropped": 0, "sha256": "ab" * 32},
            "environment": {"cpu": {"model": "Test CPU", "physical_cores": 2}},
            "results": [_row("tensorflow-fp32", "fp32", 0.88, [0.84, 0.92], None),
                        _row("tensorflow-int8", "int8", 0.876, [0.835, 0.917], fidelity)]}


def _run(tmp_path: Path, source: str = "synthetic phantoms (kaggle-pneumonia layout)", layout="kaggle-pneumonia",
         **facts) -> Path:
    """A run recorded as the stages record it: data, train, freeze, benchmark (files are stand-ins)."""
    run = tmp_path / "runs" / "tiny"
    split = {"schema": 1, "samples": [[f"/d/{s}/{i}.png", s, f"p{i // 2}-{s}", [1.0, 0.0], 1, 1]
                                      for s, n in (("train", 8), ("val", 4), ("test", 6)) for i in range(n)]}
    runrecord.commit(run, "split", artifacts={"split": artifacts.write_json(runrecord.staging_path(run, "split.json"),
                                                                             split)})
    runrecord.commit(run, "data", facts={"data_source": source, "dataset_format": layout, "classes": ["NORMAL",
                     "PNEUMONIA"], "task": "binary", "preprocess": {"image_size": 32, "channels": 1,
                     "normalization": "unit", "bit_depth": "auto"}, "objective": "auc", "model_source": "train",
                     "input_name": "input", "output_name": "output", **facts},
                     split_sizes={"train": 8, "val": 4, "test": 6}, class_counts={"test": {"NORMAL": 3}},
                     patient_overlap={"test/train": 0})
    for key, name, stage, inputs in (("keras_model", "model.keras", "train", ["split"]),
                                     ("fp32_pb", "model_fp32.pb", "freeze", ["keras_model"])):
        runrecord.commit(run, stage, artifacts={key: artifacts.write_bytes(runrecord.staging_path(run, name),
                                                                           name.encode())}, inputs=inputs,
                         **({"model": "refkit-cnn", "parameters": 4602} if stage == "train" else {}))
    report = artifacts.write_json(runrecord.staging_path(run, "benchmark.json"), _benchmark(source))
    runrecord.commit(run, "benchmark", artifacts={"benchmark_json": report}, inputs=["fp32_pb", "split"])
    return run


def _no_python_in(md: str) -> list[str]:
    import re

    return [line for line in md.splitlines()
            if re.search(r"\bNone\b|\bnan\b|\bnull\b|\{'|\['|\{\"|<\w+ object", line)]


def _card(run: Path) -> tuple[dict, str]:
    """The card written for ``run``; every card of these tests is checked for None, nan and Python reprs."""
    from medq.modelcard import write_card

    written = write_card(run)
    md = written["md"].read_text()
    assert _no_python_in(md) == []
    return json.loads(written["json"].read_text()), md


def test_card_values_are_the_records_values(tmp_path):
    run = _run(tmp_path)
    card, md = _card(run)
    manifest = json.loads((run / "manifest.json").read_text())  # the oracle: the record read directly
    bench = json.loads((run / "benchmark.json").read_text())
    assert card["training_data"]["data_source"] == manifest["data_source"]
    assert card["training_data"]["split_sizes"] == manifest["stages"]["data"]["split_sizes"]
    assert card["training_data"]["patients"] == {"train": 4, "val": 2, "test": 3}  # p0..p3, p0..p1, p0..p2
    assert card["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "NORMAL", "1": "PNEUMONIA"}
    assert card["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]
    assert card["model_details"]["selection_objective"] == manifest["objective"]
    paths = {row["id"]: row for row in card["quantitative_analyses"]["precision_paths"]}
    for row in bench["results"]:
        assert paths[row["id"]]["metrics"]["auc"] == row["metrics"]["auc"]
        assert paths[row["id"]]["intervals_95"]["auc"] == row["metrics"]["ci"]["auc"]
        assert paths[row["id"]]["calibration"] == {"brier": row["clinical"]["brier"], "ece": row["clinical"]["ece"]}
    assert paths["tensorflow-int8"]["fidelity_to_fp32"]["flipped_fraction"] == 0.02
    assert paths["tensorflow-fp32"]["fidelity_to_fp32"] == "reference"
    assert "| tensorflow-int8 | 0.810 [0.760, 0.850] | 0.876 [0.835, 0.917] |" in md
    assert "- tensorflow-int8 sensitivity at specificity: 0.90 → 0.600" in md
    lineage = {row["path"]: row["sha256"] for row in card["lineage"]}
    for name in ("split.json", "model.keras", "model_fp32.pb", "benchmark.json"):
        assert lineage[name] == hashlib.sha256((run / name).read_bytes()).hexdigest()
    assert card["environment"]["cpu"]["model"] == "Test CPU"
    assert card["environment"]["versions"] == manifest["versions"]


def test_synthetic_data_is_said_first_and_the_card_says_what_it_is_for(tmp_path):
    card, md = _card(_run(tmp_path))
    head = md.splitlines()[:4]
    assert any("SYNTHETIC DATA" in line and "phantoms" in line for line in head), head
    assert "Not a medical device" in md and "## Intended use" in md
    assert card["training_data"]["synthetic"] is True
    caveats = " ".join(card["caveats_and_recommendations"])
    assert "SYNTHETIC DATA" in caveats and "paediatric" in caveats
    assert "tensorflow-int8: not shown equivalent to FP32" in caveats
    assert "calls every test image" not in caveats  # sensitivity 0.9, specificity 0.7


def test_a_model_that_calls_every_image_one_class_is_flagged(tmp_path):
    run = _run(tmp_path)
    bench = json.loads((run / "benchmark.json").read_text())
    bench["results"][1]["metrics"].update(sensitivity=1.0, specificity=0.0)
    runrecord.commit(run, "benchmark", artifacts={"benchmark_json": artifacts.write_json(
        runrecord.staging_path(run, "benchmark.json"), bench)}, inputs=["fp32_pb", "split"])
    card, _ = _card(run)
    assert ("tensorflow-int8: specificity 0 at threshold 0.5: the model calls every test image PNEUMONIA"
            in card["caveats_and_recommendations"])


def test_real_kaggle_data_is_warned_about_as_paediatric_without_the_synthetic_banner(tmp_path):
    card, md = _card(_run(tmp_path, source="kaggle-pneumonia"))
    assert "SYNTHETIC" not in md
    assert any(c.startswith("training data in the Kaggle chest_xray") and "paediatric" in c and "age" in c
               for c in card["caveats_and_recommendations"])


def test_real_data_has_no_synthetic_banner_and_other_layouts_no_paediatric_warning(tmp_path):
    card, md = _card(_run(tmp_path, source="busi", layout="busi"))
    assert "SYNTHETIC" not in md and card["training_data"]["synthetic"] is False
    assert "paediatric" not in md


def _recorded_thresholds() -> tuple[dict, dict]:
    """train's record (medq.thresholds.choose) for the stand-in run's model: PNEUMONIA at 0.31, chosen at validation
    sensitivity 19/20 and specificity 14/20 (the validation point, then the whole record)."""
    keras_sha = hashlib.sha256(b"model.keras").hexdigest()  # the stand-in model file's bytes
    point = {"sensitivity": 0.95, "specificity": 0.7, "sensitivity_ci": [0.7639, 0.9911],
             "specificity_ci": [0.4810, 0.8545], "n_positive": 20, "n_negative": 20}
    return point, {"policy": "sensitivity", "target": 0.9, "split": "val", "task": "binary",
                   "decision_rule": "the positive class iff its probability >= its threshold",
                   "chosen_for": {"keras_model": keras_sha},
                   "classes": {"PNEUMONIA": {"value": 0.31, "policy": "sensitivity", "target": 0.9,
                                             "validation": point, "notes": []}}}


def test_thresholds_subgroups_external_are_not_determined_until_recorded(tmp_path):
    card, md = _card(_run(tmp_path))
    q = card["quantitative_analyses"]
    assert q["thresholds"].startswith("not determined") and "0.5" in q["thresholds"]
    assert q["subgroups"] == "not determined" and q["external_evaluations"] == "not determined"
    assert "- Subgroups: not determined" in md and "- External evaluations: not determined" in md

    point, recorded = _recorded_thresholds()
    external = [{"dataset": "site-B", "auc": 0.8}]
    run = _run(tmp_path / "again", thresholds=recorded, external_evaluations=external)
    runrecord.commit(run, "evaluate", subgroups={"sex": {"F": {"auc": 0.8}, "M": {"auc": 0.79}}})
    card, md = _card(run)
    q = card["quantitative_analyses"]
    assert q["thresholds"]["classes"] == {"PNEUMONIA": {"threshold": 0.31, "validation": point}}
    assert (q["thresholds"]["policy"], q["thresholds"]["target"], q["thresholds"]["chosen_on"]) == \
        ("sensitivity", 0.9, "val")
    assert "  - PNEUMONIA ≥ 0.31: validation sensitivity 0.950 [0.764, 0.991] (20 positive), specificity 0.700 " \
        "[0.481, 0.855] (20 negative)" in md
    assert q["external_evaluations"] == external and q["subgroups"]["sex"]["F"]["auc"] == 0.8
    assert "decisions at 0.5" not in md and "thresholds not chosen" not in md
    # thresholds chosen for an earlier model (retrained without choosing again) are not the run's: said so
    stale = dict(recorded, chosen_for={"keras_model": "0" * 64})
    card, md = _card(_run(tmp_path / "stale", thresholds=stale))
    assert card["quantitative_analyses"]["thresholds"].startswith("not determined: decisions at 0.5")
    assert "earlier model" in card["quantitative_analyses"]["thresholds"]
    assert any(c.startswith("decision thresholds not determined") for c in card["caveats_and_recommendations"])


def test_card_is_recorded_made_from_the_models_and_goes_stale_with_a_retrain(tmp_path, capsys):
    run = _run(tmp_path)
    assert main(["card", str(run)]) == 0
    manifest = json.loads((run / "manifest.json").read_text())
    entry = manifest["artifacts"]["model_card_md"]
    assert entry["sha256"] == hashlib.sha256((run / "model_card.md").read_bytes()).hexdigest()
    assert set(entry["inputs"]) >= {"keras_model", "fp32_pb", "benchmark_json"}
    runrecord.commit(run, "train", artifacts={"keras_model": artifacts.write_bytes(
        runrecord.staging_path(run, "model.keras"), b"retrained")}, inputs=["split"])
    assert runrecord.stale(run).get("model_card_md"), "a retrain must make the card stale"


def test_a_converted_model_without_data_or_benchmark_gets_a_card_that_says_so(tmp_path):
    run = tmp_path / "converted"
    pb = artifacts.write_bytes(runrecord.staging_path(run, "model_fp32.pb"), b"graph")
    runrecord.commit(run, "convert", artifacts={"fp32_pb": pb}, facts={"classes": ["a", "b"], "task": "multilabel",
                     "preprocess": {"image_size": 224, "channels": 3, "normalization": "imagenet"}})
    card, md = _card(run)
    assert card["evaluation_data"].startswith("not determined")
    assert card["quantitative_analyses"]["precision_paths"] == []
    assert "no benchmark in this run" in " ".join(card["caveats_and_recommendations"])
    assert card["network_data_format"]["outputs"]["pred"]["activation"] == "sigmoid"
    assert "patients: not determined" in md and "SYNTHETIC" not in md


def test_card_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["card", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a medq run" in err[0]


@pytest.mark.slow
def test_medq_run_writes_a_card_that_matches_its_manifest_and_benchmark(tmp_path):
    """A tiny `medq run` (smoke config, phantoms): the card it writes, read as a clinician would."""
    args = [sys.executable, "-m", "medq", "run", "--config", str(REPO / "configs" / "smoke.yaml"),
            "--set", f"data.root={tmp_path / 'data' / 'chest_xray'}", "--set", f"run.output_dir={tmp_path / 'out'}",
            "--set", f"quantize.deploy={REPO / 'configs' / 'smoke-deploy.yaml'}", "--set", "tune.enabled=false",
            "--set", "data.phantom.n_train=60", "--set", "data.phantom.n_test=24", "--phantoms"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "out" / "smoke"
    manifest = json.loads((run / "manifest.json").read_text())
    bench = json.loads((run / "benchmark.json").read_text())
    card = json.loads((run / "model_card.json").read_text())
    md = (run / "model_card.md").read_text()
    assert "model_card_md" in manifest["artifacts"]
    assert md.splitlines()[2].startswith("> **SYNTHETIC DATA")
    assert card["training_data"]["split_sizes"] == manifest["stages"]["data"]["split_sizes"]
    assert card["evaluation_data"]["n_images"] == bench["inputs"]["n_images"]
    rows = {r["id"]: r for r in bench["results"]}
    for path in card["quantitative_analyses"]["precision_paths"]:
        assert path["metrics"]["auc"] == rows[path["id"]]["metrics"]["auc"]
    assert {"tensorflow-fp32", "tensorflow-int8"} <= set(rows)
    assert card["lineage"] and all(len(r["sha256"]) == 64 for r in card["lineage"])


def test_a_recorded_subgroup_table_is_rendered_and_a_flagged_subgroup_is_a_caveat(tmp_path):
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from medq.config import SubgroupsConfig
    from medq.subgroups import Subgroups
    from medq.thresholds import Thresholds

    rng = np.random.default_rng(4)
    truth = (np.arange(200) % 2).astype(float)
    score = np.where(np.arange(200) < 100, rng.random(200), 0.2 + 0.6 * truth)  # AP: guesses; PA: perfect
    meta = [("F", "50", "AP" if i < 100 else "PA") for i in range(200)]
    classes = ["NORMAL", "PNEUMONIA"]
    table = Subgroups(meta, SubgroupsConfig(attributes=["view"])).table(
        "binary", classes, np.stack([1 - truth, truth], 1), np.stack([1 - score, score], 1),
        Thresholds.uniform("binary", classes, 0.5, "override"))
    run = _run(tmp_path)
    runrecord.commit(run, "evaluate", split="test", subgroups=json.loads(json.dumps(table)))
    card, md = _card(run)
    ap_auc = roc_auc_score(truth[:100], score[:100])
    assert "### Subgroups (test split" in md and f"| view position: AP | 100 | {ap_auc:.3f} [" in md
    assert "| view position: PA | 100 | 1.000 [" in md and "- Subgroups: not determined" not in md
    caveat = next(c for c in card["caveats_and_recommendations"] if c.startswith("subgroup view AP"))
    assert f"AUC {ap_auc:.3f} [" in caveat and "below the overall performance" in caveat
    assert not any(c.startswith("subgroup view PA") for c in card["caveats_and_recommendations"])
    assert card["factors"]["subgroups"]["attributes"] == ["view"]


def test_a_multilabel_subgroup_table_shows_each_findings_sensitivity_and_specificity(tmp_path):
    import numpy as np
    from scipy.stats import binomtest

    from medq.config import SubgroupsConfig
    from medq.subgroups import Subgroups
    from medq.thresholds import Thresholds

    rng = np.random.default_rng(5)
    classes = ["Effusion", "Mass", "Hernia"]
    y = (rng.random((120, 3)) < 0.35).astype(float)
    y[:, 2] = 0  # no Hernia in the test split: not a column of the per-class table
    p = np.clip(0.45 * y + 0.6 * rng.random((120, 3)), 0, 1)
    meta = [("M", "30", "AP" if i % 3 == 0 else "PA") for i in range(120)]
    table = Subgroups(meta, SubgroupsConfig(attributes=["view"])).table(
        "multilabel", classes, y, p, Thresholds.uniform("multilabel", classes, 0.5, "override"))
    run = _run(tmp_path)
    runrecord.commit(run, "evaluate", split="test", subgroups=json.loads(json.dumps(table)))
    _, md = _card(run)
    assert "| subgroup | Effusion sensitivity / specificity | Mass sensitivity / specificity |" in md
    ap = np.arange(120) % 3 == 0
    truth, called = y[ap, 1] >= 0.5, p[ap, 1] >= 0.5  # Mass on AP films, counted by hand
    tp, tn = int((truth & called).sum()), int((~truth & ~called).sum())

    def shown(k, n):
        ci = binomtest(k, n).proportion_ci(method="wilson")
        return f"{k / n:.3f} [{ci.low:.3f}, {ci.high:.3f}]"

    row = next(line for line in md.splitlines() if line.startswith("| view position: AP |") and " / " in line)
    assert row.split(" | ")[2].rstrip(" |") == f"{shown(tp, int(truth.sum()))} / {shown(tn, int((~truth).sum()))}"


def _held(sens_hits: int, spec_hits: int, n: int = 20) -> dict:
    """benchmark.json's operating points of PNEUMONIA at 0.31 with SENS_HITS of N positives and SPEC_HITS of N
    negatives called right (Wilson intervals from scipy's binomtest, an independent implementation)."""
    from scipy.stats import binomtest

    def ci(k):
        low, high = binomtest(k, n).proportion_ci(method="wilson")
        return [low, high]
    return {"source": "validation", "notes": [], "decision_rule": "the positive class iff its probability >= its "
            "threshold", "classes": {"PNEUMONIA": {"threshold": 0.31, "sensitivity": sens_hits / n,
                                                   "sensitivity_ci": ci(sens_hits), "specificity": spec_hits / n,
                                                   "specificity_ci": ci(spec_hits), "n_positive": n, "n_negative": n}}}


def test_the_card_shows_how_the_thresholds_held_on_test_and_says_when_they_did_not(tmp_path):
    point, recorded = _recorded_thresholds()

    def card_with(fp32_hits: int, int8_hits: int, folder: str):
        run = _run(tmp_path / folder, thresholds=recorded)
        bench = _benchmark("synthetic phantoms (kaggle-pneumonia layout)")
        for row, hits in zip(bench["results"], (fp32_hits, int8_hits)):
            row["metrics"]["operating_points"] = _held(hits, 14)
        report = artifacts.write_json(runrecord.staging_path(run, "benchmark.json"), bench)
        runrecord.commit(run, "benchmark", artifacts={"benchmark_json": report}, inputs=["fp32_pb", "split"])
        return _card(run)

    # 10/20 on test: Wilson [0.299, 0.701] lies wholly below validation's [0.764, 0.991]
    card, md = card_with(10, 9, "missed")
    assert "| PNEUMONIA | 0.31 | 0.950 / 0.700 | 0.500 [0.299, 0.701] | 0.700 [0.481, 0.855] | 0.450 / 0.700 |" in md
    missed = [c for c in card["caveats_and_recommendations"] if "did not hold" in c]
    assert len(missed) == 1 and missed[0].startswith("PNEUMONIA: the operating point (threshold 0.31) did not hold")
    assert "sensitivity 0.500 [0.299, 0.701] against 0.950 [0.764, 0.991]" in missed[0]
    assert "specificity" not in missed[0]  # 14/20 = validation's 0.700: held
    # 16/20: [0.584, 0.919] overlaps validation's interval: lower, but not shown to have moved
    card, md = card_with(16, 16, "held")
    assert "| PNEUMONIA | 0.31 | 0.950 / 0.700 | 0.800 [0.584, 0.919] |" in md
    assert not [c for c in card["caveats_and_recommendations"] if "did not hold" in c]


def test_outputs_no_training_image_taught_are_a_caveat(tmp_path):
    run = _run(tmp_path)
    runrecord.commit(run, "data", split_sizes={"train": 8, "val": 4, "test": 6},
                     class_counts={"train": {"NORMAL": 8, "PNEUMONIA": 0}, "test": {"NORMAL": 3}})
    caveats = _card(run)[0]["caveats_and_recommendations"]
    assert [c for c in caveats if "never trained" in c] == [
        "1 of the model's 2 outputs were never trained (no training image has the label): PNEUMONIA; their "
        "probabilities mean nothing — do not read them"]
    assert not [c for c in _card(_run(tmp_path / "both"))[0]["caveats_and_recommendations"] if "never trained" in c]


def test_without_evaluate_the_card_takes_the_subgroups_the_benchmark_measured(tmp_path):
    """`medq run` has no evaluate stage: the benchmark's FP32 row carries the subgroup table (here a Kaggle layout's
    'no patient metadata'); an INT8 row's table is not the card's."""
    run = _run(tmp_path)
    bench = _benchmark("synthetic phantoms (kaggle-pneumonia layout)")
    bench["results"][0]["subgroups"] = {"available": False, "note": "this dataset has no patient metadata (fp32 row)"}
    bench["results"][1]["subgroups"] = {"available": False, "note": "the int8 row's"}
    report = artifacts.write_json(runrecord.staging_path(run, "benchmark.json"), bench)
    runrecord.commit(run, "benchmark", artifacts={"benchmark_json": report}, inputs=["fp32_pb", "split"])
    card, md = _card(run)
    table = card["quantitative_analyses"]["subgroups"]
    assert table["source"] == "medq benchmark, tensorflow-fp32" and table["note"].endswith("(fp32 row)")
    assert "- Subgroups: this dataset has no patient metadata (fp32 row)" in md and "int8 row" not in md


def test_without_evaluate_runs_show_takes_the_benchmark_fp32_rows_subgroups_as_the_card_does(tmp_path):
    """`medq run` has no evaluate stage: `medq runs show` names the benchmark's FP32 row as the source of its
    subgroup line (the card's table), not "run medq evaluate"; once evaluate ran, evaluate's table wins."""
    from medq.runs import run_summary

    run = _run(tmp_path)
    bench = _benchmark("synthetic phantoms (nih-chestxray14 layout)")
    groups = [{"attribute": "sex", "value": v, "n": 150, "status": "ok", "flags": []} for v in ("F", "M")]
    bench["results"][0]["subgroups"] = {"available": True, "attributes": ["sex"], "groups": groups,
                                        "flagged": ["sex M"]}
    bench["results"][1]["subgroups"] = {"available": True, "attributes": ["view"], "groups": [], "flagged": []}
    report = artifacts.write_json(runrecord.staging_path(run, "benchmark.json"), bench)
    runrecord.commit(run, "benchmark", artifacts={"benchmark_json": report}, inputs=["fp32_pb", "split"])
    line = run_summary(run)["subgroups"]
    assert line == "sex on test (medq benchmark, tensorflow-fp32): 2 groups, below overall: sex M"
    from medq.modelcard import build_card

    assert build_card(run)["quantitative_analyses"]["subgroups"]["source"] == "medq benchmark, tensorflow-fp32"

    runrecord.commit(run, "evaluate", split="val", subgroups={"available": False, "note": "no metadata here"})
    assert run_summary(run)["subgroups"] == "no metadata here (medq evaluate, single crop)"
    # a retrain replaces the model the benchmark measured: its subgroup line says it is stale
    runrecord.commit(run, "evaluate", split="test", subgroups=None)
    runrecord.commit(run, "freeze", artifacts={"fp32_pb": artifacts.write_bytes(runrecord.staging_path(
        run, "model_fp32.pb"), b"refrozen")}, inputs=["keras_model"])
    line = run_summary(run)["subgroups"]
    assert line.startswith("sex on test (medq benchmark, tensorflow-fp32)") and "STALE: " in line


@pytest.mark.parametrize("kind", ["train only, multiclass", "converted", "tuned"])
def test_a_card_never_prints_none_nan_or_a_python_repr_and_its_json_is_strict(tmp_path, kind):
    if kind == "train only, multiclass":
        run = tmp_path / "runs" / "busi"
        runrecord.commit(run, "train", artifacts={"keras_model": artifacts.write_bytes(
            runrecord.staging_path(run, "model.keras"), b"k")}, model="refkit-cnn",
            facts={"classes": ["benign", "malignant", "normal"], "task": "multiclass",
                   "preprocess": {"image_size": 32, "channels": 1}})
    elif kind == "converted":
        run = tmp_path / "runs" / "conv"
        runrecord.commit(run, "convert", artifacts={"fp32_pb": artifacts.write_bytes(
            runrecord.staging_path(run, "model_fp32.pb"), b"g")},
            facts={"classes": ["NORMAL", "PNEUMONIA"], "task": "binary", "model_source": "convert"})
    else:
        run = _run(tmp_path)
        runrecord.commit(run, "tune", facts={"model_source": "tune", "selected_hyperparameters": {"lr": 0.01}})
    card, md = _card(run)
    assert _no_python_in(md) == []
    json.loads((run / "model_card.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    if kind.startswith("train"):
        assert "channel_def 0: benign, 1: malignant, 2: normal" in md


def test_the_card_names_a_classs_own_threshold_policy(tmp_path):
    import numpy as np

    from medq.thresholds import Policy, choose

    run = _run(tmp_path)
    sha = runrecord.load(run).artifacts["keras_model"].sha256
    y, p = np.eye(2)[[0, 1, 1, 0, 1, 0]], np.array([[.9, .1], [.2, .8], [.6, .4], [.7, .3], [.4, .6], [.5, .5]])
    record = choose("binary", y, p, ["NORMAL", "PNEUMONIA"], Policy("youden"), chosen_for={"keras_model": sha},
                    per_class={"PNEUMONIA": Policy("sensitivity", 0.9)})
    runrecord.commit(run, "tune", facts={"thresholds": record})
    _, md = _card(run)
    assert "- Thresholds (youden, PNEUMONIA: sensitivity 0.9, chosen on val;" in md
