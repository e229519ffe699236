"""Everyday rough edges: options that would do nothing are refused, thresholds are probabilities everywhere, the
run summary never cuts a word, the chart's metric panel shows the differences, an oversized batch is capped and the
chance guard says when it decided."""
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from medq.benchmark import report, summary_text
from medq.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, flag", [
    (["data", "--format", "busi"], "--format"),
    (["data", "--variant", "binary", "--json"], "--variant, --json"),
    (["data", "check", "somewhere", "--resplit"], "--resplit"),
    (["data", "check", "somewhere", "--run-name", "mine"], "--run-name"),
    (["predict", "x.png", "--heatmap-classes", "predicted"], "--heatmap-classes"),
    (["predict", "x.png", "--heatmap-layer", "conv5"], "--heatmap-layer"),
    (["runs", "list", "--run-name", "mine"], "--run-name"),
    (["convert", "model.onnx", "--set", "train.epochs=3"], "--set train.epochs=3"),
    (["export-onnx", "--set", "train.epochs=3"], "--set train.epochs=3"),
])
def test_an_option_that_would_do_nothing_is_refused(argv, flag, tmp_path, capsys):
    assert main([*argv, "--set", f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medq {argv[0]}: error: {flag} do") and "nothing" in err[0]
    assert list(tmp_path.iterdir()) == []  # refused before anything was touched


@pytest.mark.parametrize("argv", [["evaluate"], ["predict", "x.png"]])
@pytest.mark.parametrize("threshold", ["1.5", "7", "0", "-0.2", "1"])
def test_a_threshold_outside_0_1_is_refused_by_evaluate_as_by_predict(argv, threshold, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--threshold", threshold])
    assert exit_.value.code == 2
    assert f"--threshold: {threshold}: must be between 0 and 1" in capsys.readouterr().err


def synthetic(results: list[dict], skipped: list[dict]) -> dict:
    cpu = {"model": "AMD EPYC", "vnni": True, "bf16": True, "amx_int8": False, "physical_cores": 2, "logical_cpus": 2}
    return {"run": "r", "objective": "auc", "inputs": {"n_images": 100},
            "settings": {"batch_size": 32}, "results": results, "skipped": skipped, "notes": [],
            "environment": {"cpu": cpu, "thread_environment": {"OMP_NUM_THREADS": "2"}, "versions": {},
                            "load_average": {}}}


def row(row_id: str, auc: float, ci: list[float]) -> dict:
    return {"id": row_id, "throughput_ips": 50.0, "latency_ms": {"p50": 10.0, "p90": 11.0, "p99": 12.0},
            "metrics": {"auc": auc, "accuracy": 0.9, "ci": {"auc": ci}},
            "vs_fp32": {"throughput_speedup": 1.0, "latency_speedup": 1.0, "auc_delta": 0.0}}


def test_the_summary_wraps_a_long_reason_without_cutting_the_command_in_it():
    hint = ("onnxruntime is not installed (the reference engines are an optional extra); install them with "
            "pip install -r env/requirements-reference.txt and rerun the benchmark")
    text = summary_text(synthetic([], [{"id": "onnxruntime-fp32", "reason": hint}]))
    assert "env/requirements-reference.txt" in text.split()  # the file name whole, on one line
    assert " ".join(text.split()).endswith(f"skipped onnxruntime-fp32: {hint}")  # nothing dropped
    assert all(len(line) <= 110 for line in text.splitlines()[2:])


def test_the_chart_metric_panel_zooms_to_the_values_and_their_intervals():
    import matplotlib.pyplot as plt

    rows = [row("tensorflow-fp32", 0.9012, [0.871, 0.929]), row("tensorflow-int8", 0.8987, [0.868, 0.927])]
    fig = report.chart_figure(synthetic(rows, []))
    low, high = fig.axes[2].get_xlim()
    plt.close(fig)
    assert low <= 0.868 and high >= 0.929  # every interval is drawn whole
    assert high - low < 0.2  # a 0.0025 difference is not drawn on a 0-1 axis (there it is 0.25 % of the width)


def films(root: Path, per_split: dict[str, int], size: int = 32) -> None:
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for i in range(n):
            folder = root / split / ("PNEUMONIA" if i % 2 else "NORMAL")
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{split}{i}.png"), rng.integers(0, 255, (size, size), dtype=np.uint8))


def test_an_oversized_batch_is_capped_at_the_split_and_the_chance_guard_says_it_decided(tmp_path, capsys):
    """12 training images of noise, 10 validation images: no AUC interval clears 0.5 on those."""
    films(tmp_path / "films", {"train": 12, "val": 10, "test": 2})
    argv = ["train", "--set", f"run.output_dir={tmp_path / 'out'}", "--set", f"data.root={tmp_path / 'films'}",
            "--set", "data.generate=false", "--set", "data.val_split=official", "--set", "preprocess.image_size=32",
            "--set", "train.epochs=2",
            "--set", "model.params={blocks: 1, filters: 4, dense_units: 4}", "--set", "train.batch_size=100000"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    run = tmp_path / "out" / "default"
    n_train = sum(1 for s in json.loads((run / "split.json").read_text())["samples"] if s[1] == "train")
    assert n_train == 12  # the run's own pinned split
    assert f"batch size 100000 exceeds the {n_train} training images; training with batches of {n_train}" in err
    history = json.loads((run / "manifest.json").read_text())["stages"]["train"]
    assert history["val_metrics"]["ci"]["auc"][0] <= 0.5  # the oracle: the recorded interval reaches 0.5
    assert re.search(r"epoch 1/2: .*\(best epoch 1, at chance: its AUC interval reaches 0\.5\)", err)
    assert "at chance: its validation AUC interval reaches 0.5" in err


def test_the_readme_names_the_benchmark_folder_the_stage_writes():
    from medq.benchmark.runner import BENCH_DIR

    readme = (REPO / "README.md").read_text()
    assert f"the run's `{BENCH_DIR}/` folder" in readme and "`bench/`" not in readme


def test_runs_show_takes_the_run_from_run_name_and_refuses_two_names(tmp_path, capsys):
    from medq import runrecord

    runrecord.commit(tmp_path / "mine", "data", facts={"classes": ["a", "b"], "task": "binary"})
    assert main(["runs", "show", "--run-name", "mine", "--json", "--set", f"run.output_dir={tmp_path}"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["classes"] == ["a", "b"] and str(tmp_path / "mine") in json.dumps(shown)
    assert main(["runs", "show", "other", "--run-name", "mine", "--set", f"run.output_dir={tmp_path}"]) == 2
    assert "both name the run" in capsys.readouterr().err
