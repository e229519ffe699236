"""Subgroups (issue 23 item 3): patient metadata read from the datasets as they arrive (NIH CSV columns, RSNA DICOM
headers), per-subgroup metrics with intervals, the "below overall" flag, and where the table goes (evaluate's record,
benchmark rows, the model card). Oracles: the CSV read with the csv module, the DICOM headers read with pydicom,
sklearn's roc_auc_score, hand-counted sensitivity/specificity and scipy's Wilson interval."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from medq.config import SubgroupsConfig, load_config
from medq.errors import ConfigError
from medq.subgroups import Subgroups, markdown
from medq.thresholds import Thresholds

BINARY = ["NORMAL", "PNEUMONIA"]


def _wilson(k: int, n: int) -> list[float]:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [ci.low, ci.high]


def _nih(root: Path, n_train: int = 30, n_test: int = 12):
    from medq.data.phantoms_nih import generate_chest_multilabel

    generate_chest_multilabel(root, n_train=n_train, n_val=0, n_test=n_test, size=32, seed=3)
    return root


# --- readers -------------------------------------------------------------------------------------------------------

def test_nih_metadata_is_read_per_image_and_impossible_ages_are_unknown_and_counted(tmp_path):
    from medq.data.nih import read_nih_chestxray14

    root = _nih(tmp_path / "nih")
    table = root / "Data_Entry_2017.csv"
    rows = list(csv.reader(table.open()))
    header, body = rows[0], rows[1:]
    age, sex, view = (header.index(c) for c in ("Patient Age", "Patient Gender", "View Position"))
    # the data-entry errors of the real table (ages 411-414), a missing age and a missing sex
    body[0][age], body[1][age], body[2][age], body[3][sex] = "411", "412", "", ""
    body[4][age] = "3"
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows([header] + body)
    index = read_nih_chestxray14(root)
    by_name = {Path(s.path).name: s for samples in index.splits.values() for s in samples}

    def expected(row):  # the oracle: the rules written out by hand
        years = row[age].strip()
        a = years if years and 0 <= int(years) <= 120 else "unknown"
        return (row[sex] or "unknown", a, row[view])

    assert by_name and all(by_name[r[0]].metadata == expected(r) for r in body if r[0] in by_name)
    assert by_name[body[0][0]].metadata[1] == "unknown" and by_name[body[4][0]].metadata[1] == "3"
    note = next(n for n in index.notes if "outside 0-120" in n)
    assert note.startswith("2 images have an age outside") and "411" in note and "412" in note


def test_nih_table_without_the_metadata_columns_carries_none(tmp_path):
    from medq.data.nih import read_nih_chestxray14

    root = _nih(tmp_path / "nih")
    table = root / "Data_Entry_2017.csv"
    rows = [r[:4] for r in csv.reader(table.open())]  # Image Index, Finding Labels, Follow-up #, Patient ID
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    index = read_nih_chestxray14(root)
    assert all(s.metadata == () for samples in index.splits.values() for s in samples)
    assert any("no patient metadata" in n for n in index.notes)


def test_rsna_metadata_comes_from_the_dicom_header_in_both_age_spellings(tmp_path):
    import pydicom

    from medq.artifacts import write_bytes
    from medq.data.dicom import dicom_bytes
    from medq.data.phantoms_rsna import generate_rsna_dicom
    from medq.data.rsna import read_rsna_pneumonia

    root = tmp_path / "rsna"
    generate_rsna_dicom(root, n_train=10, n_val=2, n_test=4, size=32, seed=5)
    files = sorted((root / "stage_2_train_images").glob("*.dcm"))
    # a DICOM Age String, an age in months and a file whose header has none of the three tags
    replaced = {files[0]: {"PatientSex": "F", "PatientAge": "058Y", "ViewPosition": "AP"},
                files[1]: {"PatientSex": "M", "PatientAge": "006M", "ViewPosition": "PA"}, files[2]: {}}
    for path, header in replaced.items():
        write_bytes(path, dicom_bytes(np.full((32, 32), 100, np.uint8), patient_id=path.stem, header=header))
    index = read_rsna_pneumonia(root)
    samples = {Path(s.path).name: s for split in index.splits.values() for s in split}
    assert len(samples) == 16
    for path in files[3:]:  # the phantoms' own headers, read back with pydicom (plain-number ages, as in RSNA)
        ds = pydicom.dcmread(path)
        age = ds.PatientAge if int(ds.PatientAge) <= 120 else "unknown"
        assert samples[path.name].metadata == (ds.PatientSex, age, ds.ViewPosition)
    assert samples[files[0].name].metadata == ("F", "58", "AP")
    assert samples[files[1].name].metadata == ("M", "0.5", "PA")
    assert samples[files[2].name].metadata == ("unknown", "unknown", "unknown")
    assert any("without sex" in n for n in index.notes)


def test_csv_table_metadata_columns_are_read_and_are_not_labels(tmp_path):
    import cv2

    from medq.data.readers import read_dataset

    root = tmp_path / "table"
    (root / "img").mkdir(parents=True)
    rows = ["image,finding,Sex,Age,View"]
    table = [("effusion", "F", "34", "PA"), ("normal", "M", "071Y", "AP"), ("effusion", "", "999", "ap"),
             ("normal", "female", "12", ""), ("effusion", "O", "40", "PA")] * 3
    for i, (finding, sex, age, view) in enumerate(table):
        cv2.imwrite(str(root / "img" / f"{i}.png"), np.full((32, 32), 10 * i, np.uint8))
        rows.append(f"img/{i}.png,{finding},{sex},{age},{view}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    config = load_config(None, [f"data.root={root}", "data.generate=false", "data.format=csv",
                                "data.metadata_columns={sex: Sex, age: Age, view: View}"])
    index = read_dataset(config.data, seed=1)
    assert index.classes == ["normal", "effusion"]  # Sex, Age and View are not label columns
    expected = {"F": "F", "M": "M", "": "unknown", "female": "F", "O": "O"}  # DICOM's O (other) kept
    for s in (s for split in index.splits.values() for s in split):
        finding, sex, age, view = table[int(Path(s.path).stem)]
        years = {"34": "34", "071Y": "71", "999": "unknown", "12": "12", "40": "40"}[age]
        assert s.metadata == (expected[sex], years, view.upper() or "unknown")
    from medq.data.check import check_dataset

    checked = check_dataset(root, format="csv", metadata_columns={"sex": "Sex", "age": "Age", "view": "View"})
    assert checked["classes"] == ["normal", "effusion"] and not checked["errors"]
    assert sum(checked["splits"][s].get("metadata", {}).get("sex", {}).get("F", 0) for s in checked["splits"]) == 6
    with pytest.raises(Exception, match="no column 'Gender'"):
        read_dataset(load_config(None, [f"data.root={root}", "data.generate=false",
                                        "data.metadata_columns={sex: Gender}"]).data, seed=1)
    with pytest.raises(ConfigError, match="metadata_columns"):
        load_config(None, ["data.metadata_columns={race: R}"])


def test_data_check_counts_the_metadata_per_split(tmp_path):
    from medq.data.check import check_dataset, format_check_report

    root = _nih(tmp_path / "nih")
    report = check_dataset(root)
    test_names = set((root / "test_list.txt").read_text().split())
    rows = [r for r in csv.DictReader((root / "Data_Entry_2017.csv").open()) if r["Image Index"] in test_names]
    counts = report["splits"]["test"]["metadata"]
    assert counts["sex"] == {s: sum(r["Patient Gender"] == s for r in rows) for s in {r["Patient Gender"] for r in rows}}
    assert counts["view"] == {v: sum(r["View Position"] == v for r in rows) for v in {r["View Position"] for r in rows}}
    ages = [int(r["Patient Age"]) for r in rows]
    assert counts["age"] == {"known": len(rows), "unknown": 0, "min": min(ages), "max": max(ages)}
    assert f"patient metadata, test: sex F {counts['sex']['F']}" in format_check_report(report)


def test_metadata_survives_the_pinned_split(tmp_path):
    from medq.data import pinned

    root = _nih(tmp_path / "nih")
    config = load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"data.root={root}", "data.generate=false"])
    first = pinned.run_index(config)  # pins
    again = pinned.run_index(config)  # applies the pin
    meta = {s.path: s.metadata for samples in first.splits.values() for s in samples}
    assert all(s.metadata == meta[s.path] and s.metadata for samples in again.splits.values() for s in samples)


# --- the table -----------------------------------------------------------------------------------------------------

def _known_binary():
    """Two sexes; F: 6 positives / 6 negatives, M: 5 / 7 (hand-made scores with ties and errors)."""
    truth = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    score = np.array([.9, .8, .7, .4, .6, .6, .1, .2, .3, .6, .5, .2, .9, .3, .2, .7, .8, .1, .4, .6, .3, .2, .1, .5])
    sex = ["F"] * 12 + ["M"] * 12
    meta = [(s, str(30 + i), "PA") for i, s in enumerate(sex)]
    return truth, score, meta


def test_binary_subgroup_metrics_match_sklearn_and_hand_counts():
    truth, score, meta = _known_binary()
    y, p = np.stack([1 - truth, truth], 1), np.stack([1 - score, score], 1)
    thresholds = Thresholds.uniform("binary", BINARY, 0.5, "override")
    table = Subgroups(meta, SubgroupsConfig(attributes=["sex"], min_images=5)).table("binary", BINARY, y, p, thresholds)
    rows = {r["value"]: r for r in table["groups"]}
    assert list(rows) == ["F", "M"]
    for value, sl in (("F", slice(0, 12)), ("M", slice(12, 24))):
        row = rows[value]
        assert row["n"] == 12 and row["positives"]["PNEUMONIA"] == truth[sl].sum()
        assert row["auc"] == pytest.approx(roc_auc_score(truth[sl], score[sl]))
        assert row["auc_ci"][0] < row["auc"] < row["auc_ci"][1]
    # hand-counted at 0.5 (>= is positive): F has TP 5 of 6 (0.4 missed), TN 4 of 6 (0.6 and 0.5 called)
    f = rows["F"]["operating_points"]["PNEUMONIA"]
    assert (f["sensitivity"], f["specificity"]) == (pytest.approx(5 / 6), pytest.approx(4 / 6))
    assert f["sensitivity_ci"] == pytest.approx(_wilson(5, 6)) and f["specificity_ci"] == pytest.approx(_wilson(4, 6))
    # M: TP .9 .7 .8 = 3 of 5; TN: .1 .4 .3 .2 .1 = 5 of 7 (.6 and .5 called)
    m = rows["M"]["operating_points"]["PNEUMONIA"]
    assert (m["sensitivity"], m["specificity"]) == (pytest.approx(3 / 5), pytest.approx(5 / 7))
    assert table["overall"]["auc"] == pytest.approx(roc_auc_score(truth, score))
    assert table["flagged"] == []  # 12 images a group: intervals far too wide to separate


def test_multilabel_summary_auc_is_the_mean_over_the_classes_a_subgroup_can_judge():
    rng = np.random.default_rng(0)
    n = 80
    y = (rng.random((n, 4)) < 0.4).astype(float)
    y[:40, 2] = 0  # no positive of the third label among the first 40 (view AP)
    y[:40, 3] = 0
    y[0, 3] = 1  # one positive of the fourth: an AUC, but no DeLong interval and not in the summary
    p = np.clip(y * 0.3 + rng.random((n, 4)) * 0.7, 0, 1)
    meta = [("F", "50", "AP" if i < 40 else "PA") for i in range(n)]
    classes = ["a", "b", "c", "d"]
    table = Subgroups(meta, SubgroupsConfig(attributes=["view"])).table(
        "multilabel", classes, y, p, Thresholds.uniform("multilabel", classes, 0.5, "override"))
    ap, pa = table["groups"]
    assert ap["value"] == "AP" and ap["per_class_auc"]["c"] == {"value": None, "ci": None, "note": "no positives"}
    assert ap["auc_classes"] == ["a", "b"]
    assert ap["auc"] == pytest.approx(np.mean([roc_auc_score(y[:40, k], p[:40, k]) for k in (0, 1)]))
    assert ap["per_class_auc"]["d"]["value"] == pytest.approx(roc_auc_score(y[:40, 3], p[:40, 3]))
    assert ap["per_class_auc"]["d"]["ci"] is None
    assert pa["auc"] == pytest.approx(np.mean([roc_auc_score(y[40:, k], p[40:, k]) for k in range(4)]))
    assert ap["operating_points"]["c"]["sensitivity"] is None and ap["operating_points"]["c"]["n_positive"] == 0


def test_a_subgroup_the_model_fails_is_flagged_and_a_small_one_is_only_shown():
    rng = np.random.default_rng(1)
    n_ap, n_pa, n_ll, n_lat = 150, 150, 12, 40
    n = n_ap + n_pa + n_ll + n_lat
    truth = (np.arange(n) % 2).astype(float)
    score = truth * 0.6 + rng.random(n) * 0.4  # separable: PA and LL
    score[:n_ap] = rng.random(n_ap)  # AP: the model guesses
    ll = slice(n_ap + n_pa, n_ap + n_pa + n_ll)
    score[ll] = 1 - score[ll]  # LL: inverted, but only 12 images
    score[n - n_lat:] = 0.1 * score[n - n_lat:] + 0.9 * rng.random(n_lat)  # LATERAL: worse, on 40 images
    view = ["AP"] * n_ap + ["PA"] * n_pa + ["LL"] * n_ll + ["LATERAL"] * n_lat
    meta = [("M", "40", v) for v in view]
    y, p = np.stack([1 - truth, truth], 1), np.stack([1 - score, score], 1)
    table = Subgroups(meta, SubgroupsConfig(min_images=30)).table(
        "binary", BINARY, y, p, Thresholds.uniform("binary", BINARY, 0.5, "override"))
    rows = {r["value"]: r for r in table["groups"] if r["attribute"] == "view"}
    assert rows["AP"]["status"] == "below overall" and rows["PA"]["status"] == "ok"
    assert rows["LL"]["status"] == "too few images" and rows["LL"]["flags"] == []
    assert rows["LL"]["auc"] == pytest.approx(roc_auc_score(truth[ll], score[ll]))  # shown all the same
    # LATERAL's AUC lies below the overall interval, but its own interval reaches into it: not flagged
    overall = table["overall"]
    assert rows["LATERAL"]["auc"] == pytest.approx(roc_auc_score(truth[-n_lat:], score[-n_lat:]))
    assert rows["LATERAL"]["auc"] < overall["auc_ci"][0] <= rows["LATERAL"]["auc_ci"][1]
    assert rows["LATERAL"]["status"] == "ok"
    assert table["flagged"] == ["view AP"]
    # the rule, checked by hand on every judged row: flagged iff an upper bound lies below the overall lower bound
    for row in table["groups"]:
        if row["n"] < 30:
            continue
        point, whole = row["operating_points"]["PNEUMONIA"], overall["operating_points"]["PNEUMONIA"]
        below = row["auc_ci"][1] < overall["auc_ci"][0] or any(
            point[f"{m}_ci"][1] < whole[f"{m}_ci"][0] for m in ("sensitivity", "specificity"))
        assert (row["status"] == "below overall") == below, row["value"]
    # the rule by hand: AP's upper bound below the overall lower bound, for AUC
    auc_flag = next(f for f in rows["AP"]["flags"] if f["metric"] == "AUC")
    assert auc_flag["ci"][1] < table["overall"]["auc_ci"][0]
    # the age attribute has one band ([40, 60)): the same images as overall, never below it
    assert [r["value"] for r in table["groups"] if r["attribute"] == "age"] == ["[40, 60)"]
    assert "| view position: AP | 150 |" in "\n".join(markdown(table))


def test_on_nih_phantoms_the_view_with_noisy_predictions_is_flagged(tmp_path):
    """A test split whose AP films get noisy predictions and PA films good ones: AP is flagged, PA and the sexes
    (mixed views) are not."""
    from medq.data.nih import read_nih_chestxray14

    index = read_nih_chestxray14(_nih(tmp_path / "nih", n_train=20, n_test=160))
    y = index.labels("test")
    views = np.array([s.metadata[2] for s in index.splits["test"]])
    rng = np.random.default_rng(2)
    p = np.clip(y * 0.7 + rng.random(y.shape) * 0.3, 0, 1)
    p[views == "AP"] = rng.random(((views == "AP").sum(), y.shape[1]))
    table = Subgroups.of(index, "test", SubgroupsConfig(min_images=20)).table(
        "multilabel", index.classes, y, p, Thresholds.uniform("multilabel", index.classes, 0.5, "override"))
    status = {(r["attribute"], r["value"]): r["status"] for r in table["groups"]}
    assert status[("view", "AP")] == "below overall" and status[("view", "PA")] == "ok"
    assert "below overall" not in {status[k] for k in status if k[0] == "sex"}
    assert table["overall"]["n"] == len(index.splits["test"]) == sum(
        r["n"] for r in table["groups"] if r["attribute"] == "view")


def test_kaggle_layout_says_it_has_no_patient_metadata(tmp_path):
    from medq.data.phantoms import generate_chest_pneumonia
    from medq.data.readers import read_dataset

    generate_chest_pneumonia(tmp_path / "chest_xray", 48, 4, 12, 40, 7)
    config = load_config(None, [f"data.root={tmp_path / 'chest_xray'}", "data.generate=false"])
    index = read_dataset(config.data, seed=1)
    y = index.labels("test")
    table = Subgroups.of(index, "test", config.subgroups).table(
        "binary", index.classes, y, y, Thresholds.uniform("binary", index.classes, 0.5, "override"))
    assert table["available"] is False
    assert "no patient metadata" in table["note"] and "child" in table["note"]
    assert markdown(table) == [f"- Subgroups: {table['note']}"]


def test_subgroups_config_is_strict():
    with pytest.raises(ConfigError, match="age_bands"):
        load_config(None, ["subgroups.age_bands=[0, 40, 20]"])
    with pytest.raises(ConfigError, match="attributes"):
        load_config(None, ["subgroups.attributes=[race]"])
    assert load_config(None, ["subgroups.age_bands=[0, 65, 120]"]).subgroups.age_bands == [0.0, 65.0, 120.0]


# --- where the table goes --------------------------------------------------------------------------------------------

def test_evaluate_records_the_subgroup_table_and_the_card_renders_it(tmp_path):
    """A tiny model trained on NIH-layout phantoms: evaluate writes the table into evaluation.json and the record's
    evaluate entry; the group sizes are the CSV's (read with the csv module); the card shows the table."""
    from medq import runrecord
    from medq.modelcard import write_card
    from medq.train import run_evaluate, run_train

    root = _nih(tmp_path / "nih", n_train=40, n_test=40)
    config = load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"data.root={root}",
                                "data.format=nih-chestxray14",
                                "data.generate=false", "preprocess.image_size=32", "train.epochs=1",
                                "model.params={blocks: 2, filters: 4, dense_units: 8}", "subgroups.min_images=5"])
    run_train(config)
    result = run_evaluate(config)
    table = result["single_crop"]["subgroups"]
    entry = runrecord.read_manifest(config.run_dir).stage(runrecord.EvaluateEntry)
    assert entry.subgroups == json.loads((config.run_dir / "evaluation.json").read_text())["single_crop"]["subgroups"]
    test_names = set((root / "test_list.txt").read_text().split())
    rows = [r for r in csv.DictReader((root / "Data_Entry_2017.csv").open()) if r["Image Index"] in test_names]
    by_sex = {g["value"]: g["n"] for g in table["groups"] if g["attribute"] == "sex"}
    assert by_sex == {s: sum(r["Patient Gender"] == s for r in rows) for s in {r["Patient Gender"] for r in rows}}
    assert table["overall"]["n"] == len(rows)
    md = write_card(config.run_dir)["md"].read_text()
    assert "### Subgroups (test split" in md
    female = next(g for g in table["groups"] if g["attribute"] == "sex" and g["value"] == "F")
    assert f"| sex: F | {by_sex['F']} | " in md and f"{female['auc']:.3f}" in md
    card = json.loads((config.run_dir / "model_card.json").read_text())
    assert card["factors"]["subgroups"]["attributes"] == table["attributes"]
    from medq.runs import format_run, run_summary

    n_groups = len({(r["Patient Gender"]) for r in rows}) + len({r["View Position"] for r in rows}) + len(
        {g["value"] for g in table["groups"] if g["attribute"] == "age"})
    assert f"  subgroups   sex, age, view on test (medq evaluate, single crop): {n_groups} groups, " in format_run(run_summary(config.run_dir))


def test_benchmark_inputs_keep_each_images_metadata_beside_its_label_when_one_is_unreadable(tmp_path):
    """The benchmark's test inputs drop unreadable images: the metadata must drop the same ones, or every subgroup
    row would mix other patients' predictions."""
    from medq import artifacts, runrecord
    from medq.benchmark.runner import test_inputs
    from medq.data.nih import read_nih_chestxray14

    root = _nih(tmp_path / "nih", n_train=10, n_test=12)
    index = read_nih_chestxray14(root)
    broken = index.splits["test"][3]
    Path(broken.path).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # a PNG signature, then nothing usable
    config = load_config(None, [f"run.output_dir={tmp_path / 'out'}", f"data.root={root}", "data.generate=false",
                                "preprocess.image_size=32", "data.cache=false"])
    run = config.run_dir
    runrecord.commit(run, "data", facts={"preprocess": {"image_size": 32, "channels": 1, "normalization": "unit",
                                                        "bit_depth": "auto"}})
    bench = run / "benchmark"
    bench.mkdir(parents=True)
    inputs = test_inputs(config, runrecord.read_manifest(run), index, bench)
    kept = [s for s in index.splits["test"] if s.path != broken.path]
    assert inputs["n_images"] == len(kept) == 11
    assert inputs["subgroups"].metadata == [s.metadata for s in kept]
    np.testing.assert_array_equal(inputs["labels"], np.asarray([s.label for s in kept], dtype=np.float32))
    assert artifacts.sha256(inputs["path"]) == inputs["sha256"]


def test_benchmark_report_shows_each_paths_subgroup_table_paired_with_the_baseline():
    from medq.benchmark.report import subgroup_section

    truth, score, meta = _known_binary()
    int8 = np.clip(score + np.where(np.arange(24) % 3 == 0, 0.25, 0.0), 0, 1)  # moves some images, not all
    y = np.stack([1 - truth, truth], 1)
    groups = Subgroups(meta, SubgroupsConfig(attributes=["sex"], min_images=5))
    thresholds = Thresholds.uniform("binary", BINARY, 0.5, "override")
    base = np.stack([1 - score, score], 1)
    rows = [{"id": "tensorflow-fp32", "subgroups": groups.table("binary", BINARY, y, base, thresholds)},
            {"id": "tensorflow-int8",
             "subgroups": groups.table("binary", BINARY, y, np.stack([1 - int8, int8], 1), thresholds, base)}]
    for row in rows[1]["subgroups"]["groups"]:
        sl = slice(0, 12) if row["value"] == "F" else slice(12, 24)
        expected = roc_auc_score(truth[sl], int8[sl]) - roc_auc_score(truth[sl], score[sl])
        assert row["vs_reference"]["auc_difference"] == pytest.approx(expected)
        assert row["vs_reference"]["ci"][0] <= expected <= row["vs_reference"]["ci"][1]
    assert "vs_reference" not in rows[0]["subgroups"]["overall"]
    md = "\n".join(subgroup_section({"results": rows, "baseline": "tensorflow-fp32"}))
    fp32_part, int8_part = md.split("### tensorflow-int8")
    assert "### tensorflow-fp32" in fp32_part and "Δ AUC" not in fp32_part
    assert "| Δ AUC vs tensorflow-fp32 |" in int8_part
    f_int8 = roc_auc_score(truth[:12], int8[:12])
    f_diff = f_int8 - roc_auc_score(truth[:12], score[:12])
    assert f"| sex: F | 12 | {f_int8:.3f} [" in int8_part and f"{f_diff:+.3f} [" in int8_part


def test_age_bands_follow_the_config_and_unknown_or_outside_ages_are_rows_of_their_own():
    from medq.subgroups import age_band

    default = SubgroupsConfig().age_bands
    assert [age_band(a, default) for a in ("0.5", "17", "18", "79.9", "80", "119", "unknown")] == \
        ["[0, 18)", "[0, 18)", "[18, 40)", "[60, 80)", "≥ 80", "≥ 80", "unknown"]
    assert [age_band(a, [20.0, 65.0, 90.0]) for a in ("19", "20", "64", "65", "95")] == \
        ["outside [20, 90)", "[20, 65)", "[20, 65)", "[65, 90)", "outside [20, 90)"]


def test_an_age_of_120_falls_in_the_top_band_when_the_top_edge_is_120_and_every_image_is_in_one_age_row():
    """Ages are valid from 0 to 120 inclusive (medq.data.metadata); bands are [lo, hi) but a top edge of 120 holds
    120 itself, so [0, 65, 120] bands every valid age. Ages beyond the edges are a row of their own, never dropped."""
    from medq.data.metadata import Demographics
    from medq.subgroups import age_band

    assert [age_band(a, [0.0, 65.0, 120.0]) for a in ("0", "64.9", "65", "119.5", "120")] == \
        ["[0, 65)", "[0, 65)", "≥ 65", "≥ 65", "≥ 65"]
    assert [age_band(a, [20.0, 65.0, 120.0]) for a in ("19", "120")] == ["outside [20, 120]", "≥ 65"]
    truth, score, _ = _known_binary()
    normalise = Demographics()  # as the readers do: a DICOM Age String '120Y' and a plain '120' are both 120 years
    meta = [normalise("F", age, "PA") for age in ["040Y"] * 12 + ["120Y", "120"] * 6]
    y, p = np.stack([1 - truth, truth], 1), np.stack([1 - score, score], 1)
    table = Subgroups(meta, SubgroupsConfig(attributes=["age"], age_bands=[0.0, 65.0, 120.0], min_images=5)).table(
        "binary", BINARY, y, p, Thresholds.uniform("binary", BINARY, 0.5, "override"))
    rows = {r["value"]: r for r in table["groups"]}
    assert list(rows) == ["[0, 65)", "≥ 65"] and sum(r["n"] for r in rows.values()) == len(truth)
    assert rows["≥ 65"]["auc"] == pytest.approx(roc_auc_score(truth[12:], score[12:]))
