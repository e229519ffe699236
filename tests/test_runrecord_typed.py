"""The typed run record: a manifest.json as medq 0.x (schema 2) writes it loads into typed facts and stage entries,
and comes back byte for byte, keys this medq does not know (new fields, new stages) included."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medq import runrecord
from medq.runrecord import (BenchmarkEntry, DataEntry, EvaluateEntry, Facts, QuantizeEntry, RunEntry, SplitEntry,
                            StageEntry, TrainEntry, TuneEntry)

SHA = "ab" * 32
METRICS = {"accuracy": 0.9, "auc": 0.95, "ci": {"auc": [0.9, 0.99], "accuracy": [0.85, 0.94]}, "n_images": 40}

# train's operating thresholds (medq.thresholds.choose's record), chosen for the run's Keras model
THRESHOLDS = {"policy": "sensitivity", "target": 0.9, "split": "val", "task": "binary",
              "decision_rule": "the positive class iff its probability >= its threshold",
              "chosen_for": {"keras_model": SHA},
              "classes": {"PNEUMONIA": {"value": 0.42, "policy": "sensitivity", "target": 0.9,
                                        "validation": {"sensitivity": 0.95, "specificity": 0.8,
                                                       "sensitivity_ci": [0.76, 0.99], "specificity_ci": [0.58, 0.92],
                                                       "n_positive": 20, "n_negative": 20}, "notes": []}}}
# Every field today's stages record, in the order their commits write them (medq.runrecord.commit: the facts after
# config, then artifacts and stages; each stage entry = its keyword arguments, then finished_at), plus keys a newer
# medq adds: a fact (external evaluations), a quantize field and a whole stage.
MAIN_MANIFEST = {
    "schema_version": 2, "medq_version": "0.9.0", "versions": {"tensorflow": "2.14.1", "neural-compressor": "2.6"},
    "config": {"run": {"name": "default", "seed": 42, "objective": "auc"}, "preprocess": {"image_size": 64}},
    "data_source": "synthetic phantoms (kaggle-pneumonia layout)",
    "classes": ["NORMAL", "PNEUMONIA"], "task": "binary", "dataset_format": "kaggle-pneumonia",
    "preprocess": {"image_size": 64, "channels": 1, "normalization": "unit", "bit_depth": "auto"},
    "model_source": "tune", "selected_val_metrics": METRICS,
    "selected_hyperparameters": {"learning_rate": 0.001, "dropout": 0.2},
    "objective": "auc", "tuned_hyperparameters": {"learning_rate": 0.001, "dropout": 0.2},
    "input_name": "input", "output_name": "output", "input_shape": [64, 64, 1],
    "thresholds": THRESHOLDS,
    "external_evaluations": [{"dataset": "site-B", "auc": 0.8}],
    "future_fact": {"from": "a newer medq"},
    "artifacts": {
        "split": {"path": "split.json", "sha256": SHA, "bytes": 1200, "stage": "split",
                  "created_at": "2026-12-06T10:00:00+0000", "inputs": {}, "sources": {}, "invalidated": None},
        "keras_model": {"path": "model.keras", "sha256": SHA, "bytes": 99, "stage": "tune",
                        "created_at": "2026-12-06T10:05:00+0000", "inputs": {"split": SHA}, "sources": {},
                        "invalidated": None},
        "int8_pb": {"path": "model_int8.pb", "sha256": SHA, "bytes": 50, "stage": "quantize",
                    "created_at": "2026-12-06T10:09:00+0000", "inputs": {"fp32_pb": SHA, "split": SHA},
                    "sources": {"deploy_yaml": SHA}, "invalidated": "the last quantize failed"},
    },
    "stages": {
        "data": {"format": "kaggle-pneumonia", "task": "binary", "classes": ["NORMAL", "PNEUMONIA"],
                 "split_sizes": {"train": 160, "val": 40, "test": 40}, "class_counts": {"train": [80, 80]},
                 "patient_overlap": {}, "skipped": [{"path": "/d/x.png", "reason": "unreadable"}], "notes": [],
                 "warnings": ["test has no image of class A"], "finished_at": "2026-12-06T10:00:00+0000"},
        "split": {"pinned_by": "data", "resplit": False, "split_sizes": {"train": 160, "val": 40, "test": 40},
                  "settings": {"root": "/d", "seed": 42}, "warnings": ["test has no image of class A"],
                  "finished_at": "2026-12-06T10:00:00+0000"},
        "train": {"model": "refkit-cnn", "parameters": 12345, "flops": 6.5e6, "best_epoch": 2,
                  "val_metrics": METRICS, "seconds": 12.5, "epochs_run": 2, "resumed": False,
                  "low_res": {"image_size": 32, "epochs": 1, "best_epoch": 1},
                  "split_sizes": {"train": 160, "val": 40, "test": 40}, "skipped": 0, "notes": ["a note"],
                  "dropped_while_loading": [], "finished_at": "2026-12-06T10:03:00+0000"},
        "tune": {"tuner": "random", "objective": "auc", "trials": [{"trial_id": "0", "status": "COMPLETED"}],
                 "best_trial": "0", "tradeoff_trial": None, "replaced": True, "decision": "trial 0 is better",
                 "best_values": {"learning_rate": 0.001}, "seconds": 30.1, "dropped_workers": [],
                 "finished_at": "2026-12-06T10:05:00+0000"},
        "freeze": {"parity_max_abs_diff": 1e-06, "parity_images": 16, "finished_at": "2026-12-06T10:06:00+0000"},
        "evaluate": {"split": "test", "ten_crop": True, "threshold": {"PNEUMONIA": 0.42},
                     "threshold_source": "validation", "objective": "auc",
                     "single_crop": None, "ten_crop_metrics": METRICS, "finished_at": "2026-12-06T10:07:00+0000"},
        "quantize": {"status": "failed", "error": "INC found no INT8 model", "deploy": {"path": "deploy.yaml"},
                     "cpu_features": ["avx512_vnni"], "calibration": {"n": 32, "source_split": "train"},
                     "precision_paths": {"kept": ["fp32", "int8"], "skipped": {}}, "trials": [],
                     "inc_received": {}, "log": "logs/quantize.log", "dropped_while_loading": [],
                     "fp32_near_chance": {"near": False, "chance": 0.5, "margin": 0.05},
                     "criterion": {"kind": "relative", "met": False}, "fp32_val": METRICS, "best_int8_val": 0.8,
                     "int8_conv_collapse": {"checked": True}, "finished_at": "2026-12-06T10:09:00+0000"},
        "benchmark": {"rows": ["tensorflow-fp32"], "skipped": {}, "seconds": 8.0, "inputs_sha256": SHA,
                      "finished_at": "2026-12-06T10:10:00+0000"},
        "export-onnx": {"source": "model_fp32.pb", "opset": 17, "onnx_input_layout": "NHWC",
                        "parity": {"max_abs_diff": 1e-6}, "finished_at": "2026-12-06T10:11:00+0000"},
        "run": {"stage_seconds": {"train": 12.5, "quantize": 20.0}, "total_seconds": 32.5,
                "finished_at": "2026-12-06T10:12:00+0000"},
        "serve": {"port": 8080, "finished_at": "2026-12-06T10:13:00+0000"},
    },
}


def _written_by_main(run: Path, manifest: dict) -> bytes:
    """The bytes medq's commit writes (runrecord's journal: json.dumps, indent 2, a final newline)."""
    run.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
    (run / runrecord.MANIFEST).write_text(text, encoding="utf-8")
    return text.encode()


def test_a_manifest_written_by_main_loads_typed_and_round_trips_byte_for_byte(tmp_path):
    written = _written_by_main(tmp_path / "run", MAIN_MANIFEST)
    record = runrecord.read_manifest(tmp_path / "run")
    # typed reads give what the file holds
    assert record.stage(TrainEntry).split_sizes["test"] == 40 and record.stage(TrainEntry).low_res["image_size"] == 32
    assert record.stage(QuantizeEntry).deploy == {"path": "deploy.yaml"} and record.stage(QuantizeEntry).status == \
        "failed"
    assert record.stage(DataEntry).warnings == ["test has no image of class A"] == record.stage(SplitEntry).warnings
    assert record.stage(RunEntry).stage_seconds == {"train": 12.5, "quantize": 20.0}
    assert record.stage(TuneEntry).tradeoff_trial is None and record.stage(BenchmarkEntry).rows == ["tensorflow-fp32"]
    assert record.facts.classes == ["NORMAL", "PNEUMONIA"] and record.facts.preprocess["bit_depth"] == "auto"
    assert record.facts.tensor_names() == ("input", "output")
    assert record.artifacts["int8_pb"].invalidated == "the last quantize failed"
    # what this medq does not know is kept, not dropped
    assert record.facts.thresholds == THRESHOLDS and record.stage(EvaluateEntry).threshold == {"PNEUMONIA": 0.42}
    assert record.stage(EvaluateEntry).threshold_source == "validation"
    assert record.facts.extra == {"future_fact": {"from": "a newer medq"}}
    assert record.facts.external_evaluations == [{"dataset": "site-B", "auc": 0.8}]
    assert record.stage(QuantizeEntry).extra["int8_conv_collapse"] == {"checked": True}
    assert type(record.stages["serve"]) is StageEntry and record.stages["serve"].extra == {"port": 8080}
    # and the record writes the same bytes back
    assert (json.dumps(record.to_dict(), indent=2, allow_nan=False) + "\n").encode() == written


def test_a_commit_changes_only_its_own_stage_entry(tmp_path):
    run = tmp_path / "run"
    _written_by_main(run, MAIN_MANIFEST)
    runrecord.commit(run, "evaluate", split="val", ten_crop=False)
    after = json.loads((run / runrecord.MANIFEST).read_text())
    for key, value in MAIN_MANIFEST.items():
        if key not in ("medq_version", "versions", "stages"):
            assert json.dumps(after[key]) == json.dumps(value), key  # same values, same key order
    stages = dict(MAIN_MANIFEST["stages"])
    assert list(after["stages"]) == list(stages)  # evaluate keeps its place
    evaluate = after["stages"].pop("evaluate")
    assert list(evaluate) == ["split", "ten_crop", "finished_at"] and evaluate["split"] == "val"
    stages.pop("evaluate")
    assert json.dumps(after["stages"]) == json.dumps(stages)


@pytest.mark.parametrize("raw", [
    {"finished_at": "t", "split_sizes": {"test": 3}, "new_field": [1, None], "model": None},
    {"zeta": 1, "model": "m", "alpha": {"nested": True}},
    {},
    {"extra": "a key named like the bookkeeping field", "order": [2, 1]},
])
def test_a_stage_entry_keeps_unknown_keys_and_their_order(raw):
    entry = TrainEntry.from_dict(raw)
    assert list(entry.to_dict().items()) == list(raw.items())
    assert json.dumps(StageEntry.from_dict(raw).to_dict()) == json.dumps(raw)


def test_fields_set_after_reading_follow_the_keys_read():
    entry = DataEntry.from_dict({"notes": [], "later": 1})
    entry.split_sizes = {"train": 2}
    entry.update({"later": 2, "newest": 3, "task": "binary"})
    assert list(entry.to_dict().items()) == [("notes", []), ("later", 2), ("newest", 3), ("task", "binary"),
                                             ("split_sizes", {"train": 2})]
    facts = Facts()
    assert facts.missing("classes", "task") == ["classes", "task"] and facts.to_dict() == {}
    assert Facts.from_dict({"classes": [], "task": "binary"}).missing("classes", "task") == ["classes"]


def test_the_mapping_view_is_the_json_form_and_read_only(tmp_path):
    _written_by_main(tmp_path / "run", MAIN_MANIFEST)
    record = runrecord.read_manifest(tmp_path / "run")
    assert record["stages"]["train"]["split_sizes"] == {"train": 160, "val": 40, "test": 40}
    assert record.get("thresholds") == THRESHOLDS and "preprocess" in record and "nothing" not in record
    assert dict(record) == json.loads(json.dumps(MAIN_MANIFEST))
    with pytest.raises(TypeError):
        record["classes"] = ["a"]  # type: ignore[index]
    record["stages"]["train"]["split_sizes"]["test"] = 0  # a copy: the record itself is unchanged
    assert record.stage(TrainEntry).split_sizes["test"] == 40


def test_a_stage_entry_that_is_not_an_object_is_a_damaged_record(tmp_path):
    _written_by_main(tmp_path / "run", {**MAIN_MANIFEST, "stages": {"train": ["not", "an", "object"]}})
    with pytest.raises(runrecord.RunError, match="manifest.json: 'stages' is not an object of objects"):
        runrecord.read_manifest(tmp_path / "run")
