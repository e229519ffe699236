"""`medq card`: the run's model card, ``model_card.md`` + ``model_card.json``, built only from the run record.

Sections and their JSON names follow Mitchell et al., "Model Cards for Model Reporting" (2019): model_details,
intended_use, factors, metrics, evaluation_data, training_data, quantitative_analyses, ethical_considerations,
caveats_and_recommendations; the model's inputs and outputs follow MONAI bundle ``metadata.json``
(``task``, ``network_data_format.inputs.image`` / ``outputs.pred``). Nothing in a card is typed by hand: every value
comes from ``manifest.json``, ``split.json`` and ``benchmark.json`` (read in :func:`read_record` only), and what the
record does not hold (subgroups, external evaluations; operating thresholds of a run made before medq chose them, or
chosen for an earlier model) is said to be "not determined".
"""
from __future__ import annotations

import dataclasses

import json
from pathlib import Path
from typing import Any

from medq import artifacts, runrecord

NOT_A_DEVICE = ("Not a medical device. This model was trained and measured by medq for research and engineering "
                "(CPU inference, quantization); it has not been cleared or approved by any regulator and must not be "
                "used to diagnose, treat or triage patients.")
NOT_DETERMINED = "not determined"
SMALL_TEST_SET = 200  # fewer test images than this: the intervals are wide
KAGGLE_PAEDIATRIC = ("the Kaggle chest_xray (pneumonia) layout: its images come from paediatric patients aged 1-5 "
                     "(Guangzhou Women and Children's Medical Center); a model trained on it may not transfer to "
                     "adults, and may learn age or site cues rather than pneumonia")


def read_record(run_dir: Path) -> dict[str, Any]:
    """Everything the card reads: the manifest, its lineage, the pinned split's patients per split, the benchmark."""
    manifest = runrecord.load(run_dir)
    lineage = [{**row, "sha256": manifest.artifacts[row["key"]].sha256}
               for row in manifest.lineage() if not row["key"].startswith("model_card")]
    # what the card shows, taken from the typed record: the facts (with fields later stages add, e.g. thresholds),
    # each stage's entry and each artifact as their JSON forms
    shown = {**manifest.facts.to_dict(), "config": manifest.config or {}, "medq_version": manifest.medq_version,
             "versions": manifest.versions, "stages": {n: e.to_dict() for n, e in manifest.stages.items()},
             "artifacts": {k: dataclasses.asdict(a) for k, a in manifest.artifacts.items()}}
    record: dict[str, Any] = {"manifest": shown, "lineage": lineage, "benchmark": None, "patients": None}
    split = runrecord.recorded_path(run_dir, "split")
    if split is not None and split.is_file():
        samples = json.loads(split.read_text(encoding="utf-8")).get("samples") or []
        patients: dict[str, set[str]] = {}
        for sample in samples:  # [path, split, patient, label, size, mtime]
            patients.setdefault(str(sample[1]), set()).add(str(sample[2]))
        record["patients"] = {k: len(v) for k, v in patients.items()}
    report = runrecord.recorded_path(run_dir, "benchmark_json")
    if report is not None and report.is_file():
        record["benchmark"] = json.loads(report.read_text(encoding="utf-8"))
    return record


def build_card(run_dir: str | Path) -> dict[str, Any]:
    """The model card as a JSON-ready dict."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    m, bench = record["manifest"], record["benchmark"]
    config = m.get("config") or {}
    stages = m["stages"]
    subgroups = subgroup_table(m, bench)
    data_stage = stages.get("data") or stages.get("train") or {}
    source = m.get("data_source") or "unknown"
    synthetic = source.startswith("synthetic")
    classes = list(m.get("classes") or [])
    pre = m.get("preprocess") or {}
    card: dict[str, Any] = {
        "schema": "medq model card 1 (sections of Mitchell et al. 2019; inputs/outputs as MONAI bundle metadata.json)",
        "model_details": {
            "name": run_dir.name, "medq_version": m.get("medq_version"),
            "architecture": (config.get("model") or {}).get("name") or (stages.get("train") or {}).get("model"),
            "model_source": m.get("model_source"), "parameters": (stages.get("train") or {}).get("parameters"),
            "hyperparameters": m.get("selected_hyperparameters"),
            "selection_objective": m.get("objective"), "date": (bench or {}).get("created_at"),
        },
        "intended_use": {
            "primary_use": f"{m.get('task', 'unknown')} classification of {', '.join(classes) or 'unknown classes'} "
                           "for research on CPU inference and quantization",
            "statement": NOT_A_DEVICE,
            "out_of_scope": "clinical decisions of any kind; images unlike the training data (other sites, "
                            "devices, ages, views)",
        },
        "task": f"{m.get('task', 'unknown')} image classification",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "dtype": "float32",
                "num_channels": pre.get("channels"), "spatial_shape": [pre.get("image_size"), pre.get("image_size")],
                "normalization": pre.get("normalization"), "bit_depth": pre.get("bit_depth"),
                "tensor": f"{m.get('input_name', 'input')}:0 [N, S, S, C]"}},
            "outputs": {"pred": {
                "type": "probabilities", "dtype": "float32", "num_channels": len(classes),
                "channel_def": {str(i): c for i, c in enumerate(classes)},
                "activation": "sigmoid" if m.get("task") == "multilabel" else "softmax",
                "tensor": f"{m.get('output_name', 'output')}:0 [N, K]"}},
        },
        "training_data": {
            "data_source": source, "synthetic": synthetic, "layout": m.get("dataset_format"),
            "split_sizes": data_stage.get("split_sizes"), "patients": record["patients"],
            "class_counts": data_stage.get("class_counts"), "patient_overlap": data_stage.get("patient_overlap"),
            "skipped_files": len(data_stage.get("skipped") or []),
        },
        "evaluation_data": _evaluation_data(bench),
        "metrics": {"validation": m.get("selected_val_metrics"),
                    "reported": "accuracy, ROC-AUC (DeLong 95% interval), sensitivity/specificity (Wilson 95%), "
                                "Brier score, expected calibration error, fidelity of each precision path to FP32"},
        "quantitative_analyses": {
            "precision_paths": _paths(bench),
            "thresholds": operating_thresholds(m),
            "subgroups": subgroups,
            "external_evaluations": m.get("external_evaluations") or NOT_DETERMINED,
        },
        "factors": {"subgroups": _factors(subgroups)},
        "ethical_considerations": NOT_A_DEVICE,
        "caveats_and_recommendations": limitations(m, bench, record["patients"]),
        "lineage": [{k: row[k] for k in ("key", "path", "stage", "sha256", "stale")} for row in record["lineage"]],
        "environment": {"versions": m.get("versions"), "cpu": ((bench or {}).get("environment") or {}).get("cpu")},
    }
    return card


def _evaluation_data(bench: dict[str, Any] | None) -> Any:
    if not bench:
        return f"{NOT_DETERMINED}: no benchmark in this run (run `medq benchmark`)"
    inputs = bench.get("inputs") or {}
    return {"split": inputs.get("split"), "n_images": inputs.get("n_images"), "dropped": inputs.get("dropped"),
            "data_source": bench.get("data_source"), "inputs_sha256": inputs.get("sha256")}


def _paths(bench: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per benchmark row: its metrics with intervals, calibration and fidelity to FP32."""
    rows = []
    for row in (bench or {}).get("results") or []:
        metrics = row.get("metrics") or {}
        clinical = row.get("clinical") or {}
        fidelity = row.get("fidelity") or {}
        rows.append({
            "id": row.get("id"), "engine": row.get("engine"), "precision": row.get("precision"),
            "model": row.get("model"),
            "metrics": {k: metrics.get(k) for k in ("accuracy", "auc", "sensitivity", "specificity", "per_class_auc")
                        if k in metrics},
            "intervals_95": metrics.get("ci"), "threshold": metrics.get("threshold"),
            "at_thresholds": _held(metrics.get("operating_points")),
            "calibration": {"brier": clinical.get("brier"), "ece": clinical.get("ece")},
            "operating_points": {k: clinical.get(k) for k in ("sensitivity_at_specificity",
                                                             "specificity_at_sensitivity") if k in clinical},
            "fidelity_to_fp32": "reference" if row.get("id") == (bench or {}).get("baseline") else
            {k: fidelity.get(k) for k in ("flipped_fraction", "max_abs_diff", "auc_difference", "auc_difference_ci",
                                          "verdict") if k in fidelity} or NOT_DETERMINED,
            "latency_p50_ms": (row.get("latency_ms") or {}).get("p50"), "throughput_ips": row.get("throughput_ips"),
        })
    return rows


def _held(points: dict[str, Any] | None) -> dict[str, Any] | None:
    """Per thresholded class with test positives: sensitivity and specificity at the run's threshold on the test split
    (medq.thresholds.held, as the benchmark measured them), with their Wilson intervals."""
    if not points:
        return None
    return {c: {k: p.get(k) for k in ("sensitivity", "sensitivity_ci", "specificity", "specificity_ci", "n_positive",
                                      "n_negative")}
            for c, p in (points.get("classes") or {}).items() if p.get("n_positive")}


def _did_not_hold(thresholds: dict[str, Any] | str, paths: list[dict[str, Any]]) -> list[str]:
    """A class whose test interval (the reference path's) lies wholly below the validation interval its threshold was
    chosen at (the intervals do not overlap, the rule the subgroup flag uses): the operating point a user would deploy
    did not hold on images the choice never saw."""
    if isinstance(thresholds, str) or not paths or not paths[0].get("at_thresholds"):
        return []
    out = []
    for c, test in paths[0]["at_thresholds"].items():
        val = (thresholds["classes"].get(c) or {}).get("validation") or {}
        misses = []
        for key in ("sensitivity", "specificity"):
            ci, chosen_ci = test.get(f"{key}_ci"), val.get(f"{key}_ci")
            if isinstance(ci, list) and isinstance(chosen_ci, list) and ci[1] < chosen_ci[0]:
                misses.append(f"{key} {test[key]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] against {val[key]:.3f} "
                              f"[{chosen_ci[0]:.3f}, {chosen_ci[1]:.3f}] on validation")
        if misses:
            out.append(f"{c}: the operating point (threshold {thresholds['classes'][c]['threshold']:.4g}) did not hold "
                       f"on the test split ({paths[0]['id']}): {'; '.join(misses)}; a point chosen on validation "
                       "flatters itself there — choose it on a larger validation split or re-check it on new data")
    return out


def limitations(m: dict[str, Any], bench: dict[str, Any] | None, patients: dict[str, int] | None) -> list[str]:
    """What medq can detect from the record that limits the model's use."""
    out = []
    source = m.get("data_source") or ""
    if source.startswith("synthetic"):
        out.append(f"SYNTHETIC DATA: trained and tested on {source}, not on patients' images; the numbers say nothing "
                   "about performance on real radiographs")
    if m.get("dataset_format") == "kaggle-pneumonia":
        lead = "the phantoms stand in for" if source.startswith("synthetic") else "training data in"
        out.append(f"{lead} {KAGGLE_PAEDIATRIC}")
    train_counts = (((m["stages"].get("data") or m["stages"].get("train") or {}).get("class_counts") or {})
                    .get("train") or {})
    never = [c for c in m.get("classes") or [] if c in train_counts and not train_counts[c]]
    if never:
        out.append(f"{len(never)} of the model's {len(m.get('classes') or [])} outputs were never trained (no training "
                   f"image has the label): {', '.join(never)}; their probabilities mean nothing — do not read them")
    n_test = ((bench or {}).get("inputs") or {}).get("n_images")
    if n_test is not None and n_test < SMALL_TEST_SET:
        out.append(f"small test set ({n_test} images{_patients(patients, 'test')}): the 95% intervals are wide")
    if not bench:
        out.append("no benchmark in this run: test-split metrics not measured (run `medq benchmark`)")
    for row in (bench or {}).get("results") or []:
        ci = ((row.get("metrics") or {}).get("ci") or {}).get("auc")
        if isinstance(ci, list) and len(ci) == 2 and ci[0] is not None and ci[0] <= 0.5:
            out.append(f"{row.get('id')}: the AUC's 95% interval [{ci[0]:.3f}, {ci[1]:.3f}] includes chance (0.5)")
        metrics = row.get("metrics") or {}
        classes = m.get("classes") or []
        if m.get("task") == "binary" and len(classes) == 2:  # sensitivity is for the second class, at the threshold
            for key, called in (("specificity", classes[1]), ("sensitivity", classes[0])):
                if metrics.get(key) == 0.0:
                    out.append(f"{row.get('id')}: {key} 0 at threshold {metrics.get('threshold')}: the model calls "
                               f"every test image {called}")
        verdict = (row.get("fidelity") or {}).get("equivalent")
        if verdict is False:
            out.append(f"{row.get('id')}: not shown equivalent to FP32 ({row['fidelity'].get('verdict')})")
    overlap = (m["stages"].get("data") or {}).get("patient_overlap") or {}
    if any(overlap.values()):
        out.append(f"patients shared between splits: {overlap}")
    stale = [k for k, a in (m.get("artifacts") or {}).items() if a.get("invalidated")]
    if stale:
        out.append(f"invalidated artifacts in the run: {', '.join(stale)}")
    out += _external_caveats(m.get("external_evaluations") or [])
    out += _subgroup_caveats(subgroup_table(m, bench))
    thresholds = operating_thresholds(m)
    if isinstance(thresholds, str):
        out.append(f"decision thresholds {thresholds}")
    else:
        out += [f"threshold {n}" for n in thresholds["notes"]]
        out += _did_not_hold(thresholds, _paths(bench))
    return out


def _external_caveats(evaluations: list[dict[str, Any]]) -> list[str]:
    """Per class of each external evaluation: an AUC interval that includes chance, or that lies wholly below the
    run's own test AUC (the model does not transfer to that data)."""
    out = []
    for e in map(runrecord.ExternalEvaluation.from_dict, evaluations):
        for c, m in (e.metrics or {}).items():
            ci, own = m.get("auc_ci"), (m.get("own_test") or {}).get("auc")
            if not m.get("evaluated") or not isinstance(ci, list) or None in ci:
                continue
            where = f"external {e.data_source} ({e.split}), {c}"
            if ci[0] <= 0.5:
                out.append(f"{where}: the AUC's 95% interval [{ci[0]:.3f}, {ci[1]:.3f}] includes chance (0.5)")
            elif isinstance(own, (int, float)) and ci[1] < own:
                out.append(f"{where}: AUC {m['auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] lies below the run's own test "
                           f"AUC {own:.3f}: the model does not transfer to that data as it is")
    return out


def operating_thresholds(m: dict[str, Any]) -> dict[str, Any] | str:
    """The thresholds the run decides at (medq.thresholds, as predict and the benchmark read them): per class the
    threshold and the validation operating point it was chosen at, with the policy; or, when the run decides at the
    fallback, "not determined" and why."""
    from medq.thresholds import DECISION_RULES, FALLBACK, Thresholds

    task, classes = m.get("task"), list(m.get("classes") or [])
    if task not in DECISION_RULES or len(classes) < 2:
        return f"{NOT_DETERMINED}: the run records no task and classes"
    models = m.get("artifacts") or {}
    key = "keras_model" if "keras_model" in models or "fp32_pb" not in models else "fp32_pb"  # converted: the graph
    operating = Thresholds.from_record(m.get("thresholds"), (models.get(key) or {}).get("sha256"), task, classes, key)
    if operating.source != "validation" or operating.record is None:
        return f"{NOT_DETERMINED}: decisions at {FALLBACK:g}, not chosen on validation ({'; '.join(operating.notes)})"
    record = operating.record
    return {"policy": record.get("policy"), "target": record.get("target"), "chosen_on": record.get("split"),
            "per_class": record.get("per_class") or {}, "task": task,
            "decision_rule": record.get("decision_rule") or DECISION_RULES[task],
            "classes": {c: {"threshold": v, "validation": (record["classes"][c] or {}).get("validation")}
                        for c, v in operating.values.items()},
            "notes": operating.notes}


def _threshold_lines(thresholds: dict[str, Any] | str, paths: list[dict[str, Any]] = ()) -> list[str]:
    """The thresholds with the validation point each was chosen at, then how they held on the test split per
    precision path (the reference path with intervals)."""
    from medq.metrics import with_ci
    from medq.thresholds import at

    if isinstance(thresholds, str):
        return [f"- Thresholds: {thresholds}"]
    target = thresholds["target"]
    how = f"{thresholds['policy']}" + ("" if target is None else f" {target:g}") + "".join(
        f", {c}: {policy}" for c, policy in (thresholds.get("per_class") or {}).items())
    lines = [f"- Thresholds ({how}, chosen on {thresholds['chosen_on']}; decision: {thresholds['decision_rule']}):"]
    for c, entry in thresholds["classes"].items():
        val = entry["validation"] or {}
        lines.append(f"  - {at(thresholds.get('task'), c, entry['threshold'])}: validation sensitivity "
                     f"{with_ci(val.get('sensitivity'), val.get('sensitivity_ci')) or 'n/a'} "
                     f"({val.get('n_positive')} positive), specificity "
                     f"{with_ci(val.get('specificity'), val.get('specificity_ci')) or 'n/a'} "
                     f"({val.get('n_negative')} negative)")
    measured = [p for p in paths if p.get("at_thresholds")]
    if not measured:
        return lines
    classes = [c for c in thresholds["classes"] if c in measured[0]["at_thresholds"]]
    header = ["class", "threshold", "validation sens. / spec.", f"test sensitivity ({measured[0]['id']})",
              f"test specificity ({measured[0]['id']})"] + [f"{p['id']} sens. / spec." for p in measured[1:]]
    rows = []
    for c in classes:
        val, ref = thresholds["classes"][c]["validation"] or {}, measured[0]["at_thresholds"][c]
        rows.append([c, f"{thresholds['classes'][c]['threshold']:.4g}",
                     f"{_num(val.get('sensitivity'))} / {_num(val.get('specificity'))}",
                     with_ci(ref["sensitivity"], ref["sensitivity_ci"]) or "n/a",
                     with_ci(ref["specificity"], ref["specificity_ci"]) or "n/a"]
                    + [f"{_num(p['at_thresholds'][c]['sensitivity'])} / {_num(p['at_thresholds'][c]['specificity'])}"
                       for p in measured[1:]])
    return lines + ["", "How the thresholds held on the test split (every path at the same thresholds; 95% Wilson "
                        "intervals; classes without test positives left out):", "",
                    "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(r) + " |" for r in rows] + [""]


def _patients(patients: dict[str, int] | None, split: str) -> str:
    return f", {patients[split]} patients" if patients and split in patients else ""


# --- Markdown ---------------------------------------------------------------------------------------------------

def render_markdown(card: dict[str, Any]) -> str:
    d, t = card["model_details"], card["training_data"]
    q = card["quantitative_analyses"]
    lines = [f"# Model card: {d['name']}", ""]
    if t["synthetic"]:
        lines += [f"> **SYNTHETIC DATA — {t['data_source']}.** These numbers describe phantoms, not patients.", ""]
    lines += [f"> **{card['intended_use']['statement']}**", "",
              "## Intended use", f"- Primary use: {card['intended_use']['primary_use']}",
              f"- Out of scope: {card['intended_use']['out_of_scope']}", "",
              "## Model details",
              f"- Architecture: {_plain(d['architecture'])} ("
              + (f"{d['parameters']} parameters; " if d["parameters"] is not None else "")
              + (f"from `medq {d['model_source']}`)" if d["model_source"] else "made by: not recorded)"),
              f"- Selected on validation {_plain(d['selection_objective'])}; hyperparameters "
              f"{_plain(d['hyperparameters'])}",
              f"- Input: {_io(card['network_data_format']['inputs']['image'])}",
              f"- Output: {_io(card['network_data_format']['outputs']['pred'])}",
              f"- medq {d['medq_version']}; card built from the run record of {d['date'] or 'an unbenchmarked run'}",
              "", "## Training data",
              f"- Source: {t['data_source']}" + (f" (layout {t['layout']})" if t["layout"] and
                                                  t["layout"] not in t["data_source"] else ""),
              f"- Split sizes (images): {_plain(t['split_sizes'])}; patients: {_plain(t['patients'])}",
              f"- Classes per split: {_plain(t['class_counts'])}",
              f"- Patients shared between splits: {_plain(t['patient_overlap'])}; skipped files: {t['skipped_files']}",
              "", "## Evaluation data", f"- {_evaluation(card['evaluation_data'])}",
              "", "## Quantitative analyses (test split, 95% intervals)", "",
              "| path | accuracy | AUC | sensitivity | specificity | Brier | ECE | fidelity to FP32 |",
              "|---|---|---|---|---|---|---|---|"]
    for row in q["precision_paths"]:
        ci = row["intervals_95"] or {}
        cells = [_ci(row["metrics"].get(k), ci.get(k)) for k in ("accuracy", "auc", "sensitivity", "specificity")]
        fid = row["fidelity_to_fp32"]
        fid_text = fid if isinstance(fid, str) else (f"{fid.get('flipped_fraction', 0):.1%} flipped, max Δp "
                                                     f"{fid.get('max_abs_diff', 0):.2g}; {fid.get('verdict', '')}")
        lines.append(f"| {row['id']} | " + " | ".join(cells) + f" | {_num(row['calibration']['brier'])} | "
                     f"{_num(row['calibration']['ece'])} | {fid_text} |")
    if not q["precision_paths"]:
        lines.append(f"| {NOT_DETERMINED} (no benchmark) | | | | | | | |")
    lines.append("")
    for row in q["precision_paths"]:
        for key, points in row["operating_points"].items():
            lines.append(f"- {row['id']} {key.replace('_', ' ')}: " + ", ".join(
                f"{target} → {_num(value)}" for target, value in (points or {}).items()))
    lines += _threshold_lines(q["thresholds"], q["precision_paths"])
    lines += _subgroup_lines(q["subgroups"])
    lines += _external_lines(q["external_evaluations"], card["lineage"])
    lines += ["", "## Caveats and recommendations (detected by medq)"]
    lines += [f"- {c}" for c in card["caveats_and_recommendations"]] or ["- none detected"]
    lines += ["", "## Lineage", "", "| artifact | file | stage | sha256 | stale |", "|---|---|---|---|---|"]
    lines += [f"| {r['key']} | {r['path']} | {r['stage']} | `{r['sha256']}` | {r['stale'] or 'no'} |"
              for r in card["lineage"]]
    env = card["environment"]
    cpu = env.get("cpu") or {}
    cores = f" ({cpu['physical_cores']} cores)" if cpu.get("physical_cores") else ""
    lines += ["", "## Environment", f"- CPU: {cpu.get('model') or NOT_DETERMINED}{cores}",
              "- Packages: " + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items()), ""]
    return "\n".join(lines)


def _external_lines(evaluations: Any, lineage: list[dict[str, Any]]) -> list[str]:
    """External evaluations as a table (medq.external): the dataset, the mapping, AUC and the operating point per
    model class, at the run's thresholds; "not determined" when the run has none."""
    from medq.external import TABLE_HEADER, table_rows

    if isinstance(evaluations, str):
        return [f"- External evaluations: {evaluations}"]
    entries = [runrecord.ExternalEvaluation.from_dict(e) for e in evaluations]
    current = {row["key"]: row["sha256"] for row in lineage if row["key"] in ("keras_model", "fp32_pb")}
    lines = ["", "## External evaluations (other datasets through a label mapping, 95% intervals)", "",
             "| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(entries, current)]
    for e in entries:
        unmapped = (e.mapping or {}).get("external_classes_without_counterpart") or []
        lines.append(f"- {_plain(e.data_source or e.dataset_format)} ({_plain(e.split)} split): mapping "
                     f"{_plain((e.mapping or {}).get('source'))}"
                     + (f"; external classes without a counterpart (negatives only): {', '.join(unmapped)}"
                        if unmapped else "")
                     + "".join(f"; {n}" for n in (e.mapping or {}).get("notes") or []))
    return lines


def _io(spec: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_plain(v)}" for k, v in spec.items()
                     if v is not None and not (isinstance(v, list) and None in v))


def _plain(value: Any) -> str:
    """A record value in words for the Markdown (never None or a Python repr): a mapping as 'key: value, …' (a
    nested one in parentheses), a list as '[a, b]', nothing recorded as NOT_DETERMINED."""
    if value is None or value in ({}, [], ""):
        return NOT_DETERMINED
    if isinstance(value, dict):
        return ", ".join(f"{k} ({_plain(v)})" if isinstance(v, dict) else f"{k}: {_plain(v)}"
                         for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}" if value == value else NOT_DETERMINED
    return str(value)


def _evaluation(data: Any) -> str:
    if isinstance(data, str):
        return data
    return f"{data['n_images']} {data['split']} images of {data['data_source']} (inputs sha256 {str(data['inputs_sha256'])[:12]})"


def _ci(value: Any, interval: Any) -> str:
    if not isinstance(value, (int, float)):
        return "n/a"
    if isinstance(interval, list) and len(interval) == 2 and None not in interval:
        return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"
    return f"{value:.3f}"


def _num(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def subgroup_table(m: dict[str, Any], bench: dict[str, Any] | None) -> Any:
    """medq.subgroups' table of the run (:func:`medq.subgroups.recorded`: evaluate's, else the benchmark reference
    row's); NOT_DETERMINED without either."""
    from medq.subgroups import recorded

    evaluated = m["stages"].get("evaluate") or {}
    return recorded(evaluated, bench) or evaluated.get("subgroups") or NOT_DETERMINED


def _subgroup_caveats(subgroups: Any) -> list[str]:
    """A subgroup evaluate flagged "below overall" (medq.subgroups), with the metrics that are."""
    from medq.metrics import with_ci

    if not isinstance(subgroups, dict):
        return []
    return [f"subgroup {row['attribute']} {row['value']} ({row['n']} images) is below the overall performance: "
            + "; ".join(f"{f['metric']} {with_ci(f['value'], f['ci'])} < overall "
                        f"{with_ci(f['overall'], f['overall_ci'])}" for f in row["flags"])
            for row in subgroups.get("groups") or [] if row.get("status") == "below overall"]


def _factors(subgroups: Any) -> Any:
    """Mitchell et al.'s evaluation factors: the patient attributes the subgroup analysis covered."""
    if not isinstance(subgroups, dict) or "available" not in subgroups:
        return subgroups
    if not subgroups["available"]:
        return subgroups.get("note")
    return {"attributes": subgroups.get("attributes"), "age_bands": subgroups.get("age_bands"),
            "source": "the dataset's patient metadata (medq.data.metadata)"}


def _subgroup_lines(subgroups: Any) -> list[str]:
    from medq.subgroups import markdown as subgroup_markdown

    if not isinstance(subgroups, dict) or "available" not in subgroups:
        return [f"- Subgroups: {_text(subgroups)}"]
    split, source = subgroups.get("split", "test"), subgroups.get("source", "medq evaluate, single crop")
    return ["", f"### Subgroups ({split} split, {source}, at the operating thresholds, 95% intervals)", "",
            *subgroup_markdown(subgroups, per_class=True), ""]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else _plain(value)


def write_card(run_dir: str | Path) -> dict[str, Path]:
    """Write model_card.json and model_card.md into the run, recorded as artifacts made from the run's models and
    benchmark (a retrain makes the card stale)."""
    run_dir = Path(run_dir)
    if not runrecord.is_run(run_dir):
        raise runrecord.RunError(f"{run_dir}: not a medq run (no {runrecord.MANIFEST}); give a run name or folder "
                                 "(`medq runs list` shows them)")
    card = build_card(run_dir)
    json_path = runrecord.staging_path(run_dir, "model_card.json")
    md_path = runrecord.staging_path(run_dir, "model_card.md")
    artifacts.write_json(json_path, card)
    artifacts.write_text(md_path, render_markdown(card))
    made_from = [k for k in ("split", "keras_model", "fp32_pb", "int8_pb", "benchmark_json")
                 if runrecord.usable(run_dir, k)]
    runrecord.commit(run_dir, "card", artifacts={"model_card_json": json_path, "model_card_md": md_path},
                     inputs=made_from)
    return {"json": run_dir / "model_card.json", "md": run_dir / "model_card.md"}
