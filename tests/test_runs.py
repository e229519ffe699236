"""`medq runs list` / `medq runs show`: complete, partial and corrupt runs, read from manifests only (no TF)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from medq.cli import main
from medq.runrecord import QuantizeEntry
from medq.runs import benchmark_rows, list_runs, quantize_metrics

CONFIG = {"model": {"name": "refkit-cnn", "params": {"blocks": 2}}, "data": {"format": "kaggle-pneumonia",
                                                                         "root": "/data/chest_xray"},
          "preprocess": {"image_size": 96, "channels": 1, "normalization": "unit"},
          "train": {"epochs": 15, "batch_size": 32, "optimizer": "adam", "learning_rate": 0.001, "loss": "auto",
                    "low_res": {"image_size": 48, "epochs": 4}}, "run": {"objective": "auc"}}


def _write_run(output: Path, name: str, stages: dict, benchmark: dict | None = None, **top) -> Path:
    run = output / name
    run.mkdir(parents=True)
    (run / "model.keras").write_bytes(b"k" * 2048)
    manifest = {"config": CONFIG, "classes": ["NORMAL", "PNEUMONIA"], "task": "binary",
                "dataset_format": "kaggle-pneumonia", "preprocess": CONFIG["preprocess"],
                "artifacts": {"keras_model": {"path": "model.keras", "bytes": 2048},
                              "fp32_pb": {"path": "model_fp32.pb", "bytes": 10}},
                "stages": stages, **top}
    (run / "manifest.json").write_text(json.dumps(manifest))
    if benchmark is not None:
        (run / "benchmark.json").write_text(json.dumps(benchmark))
    return run


TRAIN = {"model": "refkit-cnn", "parameters": 12345, "best_epoch": 7, "split_sizes": {"train": 640, "val": 160},
         "val_metrics": {"accuracy": 0.9, "auc": 0.95, "n_images": 160}, "finished_at": "2026-01-01T10:00:00+0000"}
QUANTIZE = {"status": "ok", "metric": "accuracy", "fp32_val": {"accuracy": 0.91, "auc": 0.96},
            "int8_val": {"accuracy": 0.905, "auc": 0.955},
            "precision_val": {"fp32": {"accuracy": 0.91}, "bf16": {"accuracy": 0.909},
                              "int8": {"accuracy": 0.905}, "int8-bf16": {"accuracy": 0.9}},
            "finished_at": "2026-01-01T11:00:00+0000"}
BENCHMARK = {"baseline": "tf-fp32", "results": [
    {"id": "tf-fp32", "engine": "tensorflow", "precision": "fp32", "latency_ms": {"p50": 4.25, "p90": 5.0},
     "throughput_ips": 310.5, "metrics": {"accuracy": 0.9, "auc": 0.95},
     "fidelity": {"conclusion": "equivalent", "margin": 0.005}},
    {"id": "tf-int8", "engine": "tensorflow", "precision": "int8", "latency_ms": {"p50": 2.5},
     "throughput_ips": 612.0, "metrics": {"accuracy": 0.895, "auc": 0.949, "ci": {"auc": [0.91, 0.988]}},
     "fidelity": {"conclusion": "not shown equivalent", "margin": 0.005}},
]}


@pytest.fixture
def output(tmp_path):
    out = tmp_path / "output"
    _write_run(out, "full", {"train": TRAIN, "freeze": {}, "quantize": QUANTIZE, "benchmark": {}}, BENCHMARK,
               model_source="tune", objective="auc",
               selected_val_metrics={"accuracy": 0.92, "auc": 0.97, "ci": {"auc": [0.95, 0.99]}})
    _write_run(out, "partial", {"train": TRAIN})
    (out / "corrupt").mkdir()
    (out / "corrupt" / "manifest.json").write_text('{"stages": {"train": ')  # interrupted by hand-editing
    (out / "logs-only" / "logs").mkdir(parents=True)  # not a run: no manifest
    return out


def test_list_shows_complete_and_partial_runs_and_warns_once_about_a_corrupt_one(output, capsys):
    assert main(["runs", "list", "--set", f"run.output_dir={output}"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"2 runs in {output}"
    header, full, partial = lines[1:]
    assert header.split()[:5] == ["NAME", "MODEL", "DATA", "SIZE", "STAGES"]
    assert full.split()[:5] == ["full", "refkit-cnn", "kaggle-pneumonia", "96", "train,freeze,quantize,benchmark"]
    assert "acc 0.920 auc 0.970" in full  # the selected (tuned) model's validation metrics
    assert "acc 0.910→0.905 auc 0.960→0.955" in full
    assert "tensorflow int8 612 img/s, p50 2.5 ms" in full
    assert partial.split()[:5] == ["partial", "refkit-cnn", "kaggle-pneumonia", "96", "train"]
    assert "acc 0.900 auc 0.950" in partial and re.search(r"\s-\s+-$", partial)
    warnings = [line for line in captured.err.splitlines() if line.strip()]
    assert len(warnings) == 1 and "corrupt/manifest.json: unreadable" in warnings[0]


def test_show_prints_config_metrics_artifacts_and_benchmark(output, capsys):
    assert main(["runs", "show", "full", "--set", f"run.output_dir={output}"]) == 0
    text = capsys.readouterr().out
    for expected in ("run full", "task        binary: NORMAL, PNEUMONIA",
                     "refkit-cnn (blocks=2), 12,345 parameters, selected by tune",
                     "kaggle-pneumonia at /data/chest_xray  (train 640, val 160)", "96 px, 1 channel(s), unit",
                     "validation  accuracy 0.9200, auc 0.9700 [0.9500, 0.9900]  (best epoch 7)",
                     "objective   auc (run.objective: epochs, trials and INC)",
                     "training    15 epochs, batch 32, adam lr 0.001, loss auto, first 4 at 48 px",
                     "fp32 accuracy 0.9100, auc 0.9600; bf16 accuracy 0.9090; int8 accuracy 0.9050, auc 0.9550; "
                     "int8-bf16 accuracy 0.9000  (ok)",
                     "keras_model    model.keras  2.0 KB", "fp32_pb        model_fp32.pb  MISSING"):
        assert expected in text, expected
    bench = [line.split() for line in text.splitlines()[-3:]]
    assert bench[0] == ["ENGINE", "PRECISION", "P50", "MS", "IMG/S", "ACCURACY", "AUC", "[95%", "CI]", "VS", "FP32"]
    assert " ".join(bench[1]) == "tensorflow fp32 4.25 310.5 0.9000 0.9500 -"  # the baseline is not paired with itself
    assert " ".join(bench[2]) == ("tensorflow int8 2.50 612.0 0.8950 0.9490 [0.9100, 0.9880] "
                                  "not shown equivalent (±0.005)")

    assert main(["runs", "show", str(output / "partial"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stages"] == ["train"] and data["benchmark"] == [] and data["quantize"] == {}
    assert data["val_metrics"] == {"accuracy": 0.9, "auc": 0.95}
    assert data["config"]["train"]["epochs"] == 15  # the whole config, for scripts


def test_show_unknown_or_corrupt_run_is_one_line(output, capsys):
    assert main(["runs", "show", "nope", "--set", f"run.output_dir={output}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a medq run" in err and "full, partial" in err
    assert main(["runs", "show", "corrupt", "--set", f"run.output_dir={output}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unreadable" in err


def test_empty_or_missing_output_dir(tmp_path, capsys):
    assert main(["runs", "--set", f"run.output_dir={tmp_path / 'none'}"]) == 0
    assert "no runs in" in capsys.readouterr().out
    assert list_runs(tmp_path / "none") == []


def test_quantize_metrics_come_from_the_stage_entry():
    assert quantize_metrics(QuantizeEntry.from_dict(QUANTIZE)) == {
        "fp32": {"accuracy": 0.91, "auc": 0.96}, "bf16": {"accuracy": 0.909},
        "int8": {"accuracy": 0.905, "auc": 0.955}, "int8-bf16": {"accuracy": 0.9}}
    failed = QuantizeEntry.from_dict({"status": "failed", "fp32_val": {"auc": 0.7, "accuracy": float("nan")}})
    assert quantize_metrics(failed) == {"fp32": {"auc": 0.7}}
    assert quantize_metrics(QuantizeEntry()) == {}


def test_benchmark_rows_read_the_schema_and_flag_a_corrupt_file(tmp_path):
    (tmp_path / "benchmark.json").write_text(json.dumps(BENCHMARK))
    rows, warning = benchmark_rows(tmp_path)
    assert warning is None and rows[1] == {"engine": "tensorflow", "precision": "int8", "latency_p50_ms": 2.5,
                                           "throughput_ips": 612.0, "accuracy": 0.895, "auc": 0.949,
                                           "auc_ci": [0.91, 0.988], "vs_fp32": "not shown equivalent (±0.005)"}
    for broken in ("{", '{"rows": []}'):
        (tmp_path / "benchmark.json").write_text(broken)
        rows, warning = benchmark_rows(tmp_path)
        assert rows == [] and "unreadable" in warning


def test_show_marks_the_benchmark_and_quantize_results_stale_after_a_retrain(tmp_path, capsys):
    from medq import artifacts, runrecord

    run = tmp_path / "output" / "r"
    run.mkdir(parents=True)

    def publish(stage, key, name, content, inputs=(), **info):
        runrecord.commit(run, stage, artifacts={key: artifacts.write_bytes(runrecord.staging_path(run, name),
                                                                            content)}, inputs=inputs, **info)

    publish("train", "keras_model", "model.keras", b"v1", model="refkit-cnn")
    publish("freeze", "fp32_pb", "model_fp32.pb", b"fp32", ("keras_model",))
    publish("quantize", "int8_pb", "model_int8.pb", b"int8", ("fp32_pb",), **QUANTIZE)
    publish("benchmark", "benchmark_json", "benchmark.json", json.dumps(BENCHMARK).encode(), ("fp32_pb", "int8_pb"))
    assert main(["runs", "show", "r", "--set", f"run.output_dir={tmp_path / 'output'}"]) == 0
    assert "STALE:" not in capsys.readouterr().out
    publish("train", "keras_model", "model.keras", b"v2", model="refkit-cnn")  # retrained
    assert main(["runs", "show", "r", "--set", f"run.output_dir={tmp_path / 'output'}"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^  quantize .*STALE", text, re.M) and re.search(r"^  benchmark +STALE: .*rerun `medq "
                                                                         r"benchmark`", text, re.M)
    assert re.search(r"fp32_pb .*← keras_model  STALE: it was made from an older model.keras", text)


def test_runs_show_says_how_many_thresholds_were_chosen_on_validation():
    from medq.runs import _thresholds_text

    record = {"policy": "sensitivity", "target": 0.9, "split": "val",
              "classes": {"Mass": {"value": 0.2, "notes": ["the split cannot resolve the target"]},
                          "Hernia": {"value": 0.5, "notes": ["not chosen: the validation split has 0 positive(s)"]},
                          "Nodule": {"value": 0.3, "notes": []}}}
    assert _thresholds_text(record).startswith("sensitivity 0.9 on val: 2 of 3 classes chosen (the others at 0.5")
    assert _thresholds_text(None).startswith("- (decisions at 0.5")
