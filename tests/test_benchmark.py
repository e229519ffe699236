"""The benchmark stage: plan rules (skips with reasons), report schema and formatting, and tiny end-to-end runs of
every TensorFlow precision path and of the reference engines, each row in its own worker process.

No timed assertions: the numbers only have to exist, be positive and be ordered (p50 ≤ p90 ≤ p99).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medq import artifacts, hwinfo, runrecord
from medq.data import pinned
from medq.benchmark import plan, report, run_benchmark, runner, summary_text, worker
from medq.config import load_config
from medq.errors import ConfigError, MedqError

TF_ROWS = [f"tensorflow-{p}" for p in plan.TF_PRECISIONS]
FULL_CPU = {"model": "test CPU", "physical_cores": 2, "logical_cpus": 2, "vnni": True, "bf16": True,
            "avx512_bf16": True, "amx_bf16": True, "amx_int8": True}
NO_BF16_CPU = FULL_CPU | {"bf16": False, "avx512_bf16": False, "amx_bf16": False, "amx_int8": False}


# --- the schema every benchmark.json must satisfy ----------------------------------------------------------------

def check_schema(rep: dict) -> None:
    for key in ("run", "task", "classes", "inputs", "settings", "environment", "results", "skipped"):
        assert key in rep, key
    env = rep["environment"]
    assert {"model", "vnni", "bf16", "amx_int8"} <= set(env["cpu"])
    assert "OMP_NUM_THREADS" in env["thread_environment"] and "numpy" in env["versions"]
    for row in rep["results"]:
        for key, kind in (("engine", str), ("precision", str), ("latency_ms", dict), ("throughput_ips", float),
                          ("batch_size", int), ("metrics", dict), ("inputs_sha256", str), ("pid", int),
                          ("model_bytes", int)):
            assert isinstance(row[key], kind), (row["id"], key, row.get(key))
        lat = row["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"], (row["id"], lat)
        assert row["throughput_ips"] > 0
        assert all(v > 0 for v in row["throughput_by_batch"].values())
        for name in ("accuracy", "auc"):
            assert isinstance(row["metrics"][name], float) and 0.0 <= row["metrics"][name] <= 1.0, (row["id"], name)
        assert row["model_bytes"] > 0
    for skip in rep["skipped"]:
        assert skip["id"] and skip["reason"]
    json.dumps(rep, allow_nan=False)  # strict JSON: no NaN


# --- plan: what is measured and what is skipped, with the reason -------------------------------------------------

def test_cpu_without_bf16_skips_the_bf16_paths_with_a_reason(tmp_path):
    fp32, int8 = tmp_path / "fp32.pb", tmp_path / "int8.pb"
    fp32.write_bytes(b"x")
    int8.write_bytes(b"x")
    rows, skipped = plan.plan_rows(plan.TF_PRECISIONS, ["openvino-bf16", "openvino-int8"], NO_BF16_CPU, fp32, int8,
                                   is_installed=lambda m: True)
    assert [r.id for r in rows] == ["tensorflow-fp32", "tensorflow-int8", "openvino-int8"]
    for row_id in ("tensorflow-bf16", "tensorflow-int8-bf16", "openvino-bf16"):
        assert "BF16" in skipped[row_id]
    rows, skipped = plan.plan_rows(plan.TF_PRECISIONS, [], FULL_CPU, fp32, int8)
    assert [r.id for r in rows] == TF_ROWS and not skipped
    assert [r.options["bf16_rewrite"] for r in rows] == [False, True, False, True]
    assert [r.model for r in rows] == [fp32, fp32, int8, int8]


def test_missing_int8_graph_skips_the_int8_rows_telling_to_quantize(tmp_path):
    fp32 = tmp_path / "fp32.pb"
    fp32.write_bytes(b"x")
    rows, skipped = plan.plan_rows(["fp32", "int8", "int8-bf16"], [], FULL_CPU, fp32, None)
    assert [r.id for r in rows] == ["tensorflow-fp32"]
    assert "medq quantize" in skipped["tensorflow-int8"] and "medq quantize" in skipped["tensorflow-int8-bf16"]


def test_reference_rows_skip_cleanly_when_their_engines_are_absent(tmp_path):
    fp32 = tmp_path / "fp32.pb"
    fp32.write_bytes(b"x")
    absent = {"onnxruntime", "openvino", "nncf"}
    rows, skipped = plan.plan_rows(["fp32"], plan.REFERENCE_ROWS, FULL_CPU, fp32, None,
                                   is_installed=lambda m: m not in absent)
    assert [r.id for r in rows] == ["tensorflow-fp32"]
    assert set(skipped) == set(plan.REFERENCE_ROWS)
    assert "onnxruntime not installed" in skipped["onnxruntime-int8"]
    assert "openvino, nncf not installed" in skipped["openvino-int8"]
    assert all("requirements-reference.txt" in why for why in skipped.values())


def test_model_size_counts_the_files_its_recipe_writes_beside_it(tmp_path):
    from medq.benchmark.reference import model_bytes

    (tmp_path / "openvino_fp32.xml").write_bytes(b"x" * 10)
    (tmp_path / "openvino_fp32.bin").write_bytes(b"x" * 100)
    assert model_bytes(tmp_path / "openvino_fp32.xml", "openvino-fp32") == 110  # an IR: its .xml and its .bin
    assert model_bytes(tmp_path / "openvino_fp32.xml") == 10  # a run artifact: the file alone


def test_layouts_auto_deploy_and_too_many_cores():
    layouts, skipped = plan.plan_layouts(["auto", "4x1"], 2, {"num_of_instance": 1, "cores_per_instance": 2})
    assert [layout.name for layout in layouts] == ["1x2", "2x1"]
    assert "deploy.yaml" in layouts[0].source
    assert "4 physical cores" in skipped["4x1"]
    assert plan.plan_layouts([], 2, {"num_of_instance": 2, "cores_per_instance": 1}) == ([], {})
    with pytest.raises(ConfigError, match="INSTANCESxCORES"):
        plan.parse_layout("two")


def test_instances_get_whole_physical_cores(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    blocks = [f"processor\t: {p}\nphysical id\t: 0\ncore id\t: {p % 2}\n" for p in range(4)]  # 2 cores x 2 threads
    cpuinfo.write_text("\n".join(blocks))
    groups = plan.core_groups(cpuinfo)
    assert groups == [[0, 2], [1, 3]]
    assert plan.instance_cpus(plan.Layout(2, 1), groups) == [[0, 2], [1, 3]]
    assert plan.instance_cpus(plan.Layout(1, 2), groups) == [[0, 1, 2, 3]]


def test_deploy_performance_section_is_read(repo_root):
    perf = plan.deploy_performance(Path(repo_root) / "configs" / "deploy.yaml")
    assert {"warmup", "iteration", "num_of_instance", "cores_per_instance"} <= set(perf)
    assert plan.deploy_performance("no/such/deploy.yaml") == {}


# --- worker timing helpers -----------------------------------------------------------------------------------------

def test_timing_helpers():
    stats = worker.percentiles_ms([0.003, 0.001, 0.002, 0.010])
    assert stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    x = np.arange(5, dtype=np.float32).reshape(5, 1)
    batches = worker.make_batches(x, 4, 10)
    assert len(batches) == 2 and batches[1][:, 0].tolist() == [4, 0, 1, 2]  # cycles through the inputs
    assert worker.make_batches(x, 8, 3)[0].shape == (8, 1)  # fewer images than the batch: repeated
    calls = []
    times = worker.timed_calls(lambda b: calls.append(len(b)), batches, warmup=2, iterations=3)
    assert len(calls) == 5 and len(times) == 3
    assert worker.throughput([0.5, 0.5], 4)["throughput_ips"] == pytest.approx(8.0)


def test_rounds_are_combined_by_their_medians():
    from medq.benchmark.runner import combine_rounds

    def fake(pid, p50, ips):
        return {"pid": pid, "inputs_sha256": "s", "seconds": 1.0, "latency_ms": {"p50": p50, "p90": p50 + 1},
                "sweep": [{"batch_size": 8, "throughput_ips": ips, "throughput_mean_ips": ips,
                           "batch_latency_ms": {"p50": 8000 / ips}}]}

    combined = combine_rounds([fake(1, 10.0, 100.0), fake(2, 30.0, 50.0), fake(3, 20.0, 70.0)])
    assert combined["latency_ms"] == {"p50": 20.0, "p90": 21.0}
    assert combined["sweep"][0]["throughput_ips"] == 70.0 and combined["seconds"] == 3.0
    assert [r["pid"] for r in combined["rounds"]] == [1, 2, 3]
    assert combine_rounds([fake(1, 10.0, 100.0)])["latency_ms"]["p50"] == 10.0


def test_worker_usage_error():
    assert worker.main([]) == 2


# --- report: comparisons, markdown, chart, summary on a synthetic report ------------------------------------------

def _row(row_id, p50, ips, auc):
    engine, _, precision = row_id.partition("-")
    return {"id": row_id, "engine": engine, "precision": precision, "model_bytes": 2_000_000,
            "latency_ms": {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3}, "batch_size": 32, "throughput_ips": ips,
            "throughput_by_batch": {"1": ips / 2, "32": ips}, "metrics": {"accuracy": 0.9, "auc": auc,
                                                                           "per_class_auc": {"a": auc, "b": auc}},
            "multi_instance": [{"layout": "2x1", "throughput_ips": ips * 1.2}], "inputs_sha256": "0" * 64, "pid": 1}


def _synthetic() -> dict:
    return {"run": "synthetic", "created_at": "now", "task": "multilabel", "classes": ["a", "b"],
            "objective": "auc", "baseline": "tensorflow-fp32",
            "inputs": {"path": "benchmark/test_inputs.npy", "sha256": "0" * 64, "n_images": 10},
            "settings": {"warmup": 1, "latency_iterations": 5, "throughput_iterations": 2, "batch_size": 32,
                         "batch_sizes": [1, 32], "instances": ["2x1"]},
            "environment": {"cpu": FULL_CPU, "thread_environment": {"OMP_NUM_THREADS": "2"},
                            "versions": {"python": "3.11", "numpy": "1.26.4"},
                            "load_average": {"before": [0.5], "after": [0.7]}},
            "results": [_row("tensorflow-fp32", 40.0, 30.0, 0.80), _row("tensorflow-int8", 20.0, 60.0, 0.79)],
            "skipped": [{"id": "tensorflow-bf16", "reason": "no BF16"}], "notes": []}


def _with_fidelity(rep: dict, margin: float) -> dict:
    """Real metrics, clinical numbers and FP32 pairing for the synthetic rows, from constructed probabilities."""
    from medq.metrics import clinical_metrics, paired_comparison, task_metrics

    rng = np.random.default_rng(0)
    y = (rng.random((60, 2)) < 0.4).astype(float)
    fp32 = np.clip(0.35 * y + 0.65 * rng.random((60, 2)), 0, 1)
    int8 = np.clip(fp32 + rng.normal(scale=0.002, size=fp32.shape), 0, 1)
    for row, probs in zip(rep["results"], (fp32, int8)):
        row["metrics"] = task_metrics("multilabel", y, probs, rep["classes"])
        row["clinical"] = clinical_metrics("multilabel", y, probs, rep["classes"])
        row["fidelity"] = paired_comparison("multilabel", y, fp32, probs, margin)
    return rep


def test_fidelity_and_clinical_sections_state_the_verdict_for_every_row(tmp_path):
    rep = _with_fidelity(_synthetic(), margin=0.05)
    report.add_comparisons(rep)
    md = report.markdown(rep)
    assert "## Fidelity against tensorflow-fp32 (paired, the same 60 test images)" in md
    int8 = rep["results"][1]["fidelity"]
    assert int8["equivalent"] and f"| tensorflow-int8 | {int8['auc_difference']:+.4f} [" in md
    assert "equivalent to FP32 within ±0.05 AUC" in md and "verdict (margin ±0.05 AUC)" in md
    assert "## Clinical operating points and calibration" in md and "sensitivity @ specificity 0.95" in md
    assert "AUC [95% CI]" in md and "selection objective: auc" in md
    assert "equivalent to FP32 within ±0.05 AUC" in summary_text(rep)
    strict = _with_fidelity(_synthetic(), margin=1e-6)  # the same rows against a margin no interval fits in
    report.add_comparisons(strict)
    assert "not shown equivalent within ±1e-06 AUC" in report.markdown(strict)


def test_every_row_is_reported_at_the_run_thresholds_with_hand_counted_sensitivity_and_specificity():
    from medq.metrics import task_metrics
    from medq.thresholds import Thresholds, held

    rep = _synthetic()
    # class a at 0.4: positives 0.9, 0.5, 0.3 (2 of 3 called), negatives 0.45, 0.2, 0.1, 0.05 (3 of 4 not called)
    y = np.array([[1, 0], [1, 0], [1, 1], [0, 1], [0, 0], [0, 0], [0, 1]], dtype=float)
    fp32 = np.array([[0.9, .1], [0.5, .1], [0.3, .8], [0.45, .7], [0.2, .1], [0.1, .2], [0.05, .9]])
    int8 = fp32.copy()
    int8[1, 0] = 0.35  # INT8 misses one more positive of class a at the same threshold
    chosen = Thresholds("multilabel", ["a", "b"], {"a": 0.4, "b": 0.5}, "validation")
    for row, probs in zip(rep["results"], (fp32, int8)):
        row["metrics"] = task_metrics("multilabel", y, probs, rep["classes"]) | {
            "operating_points": held(chosen, y, probs)}
    report.add_comparisons(rep)
    md = report.markdown(rep)
    assert "## Operating thresholds on the test split" in md
    assert "| a | 0.4 | tensorflow-fp32 | 0.667 [" in md and "| a | 0.4 | tensorflow-int8 | 0.333 [" in md
    assert "| 0.750 [" in md and "| 3+ / 4− |" in md
    assert "| b | 0.5 | tensorflow-int8 | 1.000 [" in md  # b: all 3 positives ≥ 0.5, no negative above it


def test_a_multiclass_row_is_reported_at_the_argmax_calls_and_says_threshold_not_at_least():
    """benchmark.md's operating-threshold section of a multiclass run: each row's figures are of the one class an
    image is called, argmax(p - t) (what predict and serve call), not of each class's own p >= t; a multiclass class
    is shown as 'c (threshold t)', never 'c ≥ t'. Oracle: the calls counted by hand below."""
    from medq.thresholds import Thresholds

    rep = _synthetic() | {"task": "multiclass", "classes": ["a", "b", "c"]}
    chosen = Thresholds("multiclass", ["a", "b", "c"], {"a": 0.5, "b": 0.2, "c": 0.3}, "validation")
    y = np.eye(3)[[0, 0, 0, 1, 1, 1, 0]]  # c has no test positives
    probs = np.array([[0.7, 0.25, 0.05],   # p - t = (.2, .05, -.25): a (b's p >= t too)
                      [0.5, 0.4, 0.1],     # (0, .2, -.2): b, although a's p >= t
                      [0.45, 0.15, 0.4],   # (-.05, -.05, .1): c
                      [0.3, 0.6, 0.1],     # b
                      [0.6, 0.22, 0.18],   # (.1, .02, -.12): a, although b's p >= t
                      [0.2, 0.3, 0.5],     # (-.3, .1, .2): c, although b's p >= t
                      [0.8, 0.1, 0.1]])    # a
    for row in rep["results"]:
        row["metrics"] = runner._metrics("multiclass", rep["classes"], y, probs, chosen)
    report.add_comparisons(rep)
    md = report.markdown(rep)
    # a: positives 1,2,3,7 called a at 1,7 (2/4; p >= t alone: 3/4); negatives 4,5,6, 5 called a (2/3)
    assert "| a | 0.5 | tensorflow-int8 | 0.500 [0.150, 0.850] | 0.667 [0.208, 0.939] | 4+ / 3− |" in md
    # b: positives 4,5,6 called b at 4 only (1/3; p >= t alone: 3/3); negatives 1,2,3,7, 2 called b (3/4)
    assert "| b | 0.2 | tensorflow-fp32 | 0.333 [0.061, 0.792] | 0.750 [0.301, 0.954] | 3+ / 4− |" in md
    # c: no positives; called at 3 and 6, so 5 of 7 negatives not called
    assert "c (threshold 0.3): 0.714–0.714" in md and "c ≥" not in md and "b ≥" not in md


def test_comparisons_markdown_chart_and_summary(tmp_path):
    rep = _synthetic()
    report.add_comparisons(rep)
    vs = rep["results"][1]["vs_fp32"]
    assert vs["throughput_speedup"] == pytest.approx(2.0) and vs["latency_speedup"] == pytest.approx(2.0)
    assert vs["auc_delta"] == pytest.approx(-0.01)
    assert rep["results"][1]["multi_instance"][0]["speedup_vs_fp32"] == pytest.approx(2.0)
    check_schema(rep)
    written = report.write_reports(tmp_path, rep)
    md = written["benchmark_md"].read_text()
    assert "| tensorflow | int8 |" in md and "2.00×" in md and "Per-class AUC" in md and "no BF16" in md
    assert "AVX512-BF16 yes" in md and "numpy 1.26.4" in md
    assert written["benchmark_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(written["benchmark_json"].read_text())["results"][1]["vs_fp32"]["throughput_speedup"] == 2.0
    text = summary_text(rep)
    assert "INT8 vs FP32 (TensorFlow): 2.00× throughput, 2.00× latency, auc -0.0100" in text
    assert len(text.splitlines()) < 25


def test_missing_fp32_graph_is_one_line_error_naming_the_stage_really_missing(tmp_path):
    config = load_config(None, [f"run.output_dir={tmp_path}", "run.name=empty"])
    # a never-trained run: the stage to run is train (with the user's run name), not freeze
    with pytest.raises(MedqError, match=r"run `medq train --run-name empty` first \(then freeze\)") as info:
        run_benchmark(config)
    assert "\n" not in str(info.value)


# --- end to end on a tiny trained model ---------------------------------------------------------------------------

INC_SCRIPT = """
import sys, numpy as np
from neural_compressor import PostTrainingQuantConfig, quantization, set_workspace
from neural_compressor.config import TuningCriterion
from medq.graph import read_graph_def
fp32, calib, target, workspace = sys.argv[1:5]
set_workspace(workspace)
x = np.load(calib)
class Loader:
    batch_size = 8
    def __iter__(self):
        for i in range(0, len(x), 8):
            yield x[i:i + 8], np.zeros(len(x[i:i + 8]))
conf = PostTrainingQuantConfig(inputs=["input"], outputs=["output"], calibration_sampling_size=[16],
                               tuning_criterion=TuningCriterion(max_trials=1))
quantization.fit(read_graph_def(fp32), conf, calib_dataloader=Loader()).save(target)
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A refkit-cnn trained 1 epoch on 80 phantoms, frozen, and quantized with INC (in a subprocess: the test is
    about the benchmark, so INC runs with one trial and no accuracy tuning)."""
    from medq.data.phantoms import generate_chest_pneumonia
    from medq.freeze import run_freeze
    from medq.preprocess import PreprocessSpec
    from medq.train import run_train

    base = tmp_path_factory.mktemp("bench")
    root = base / "data" / "chest_xray"
    generate_chest_pneumonia(root, 80, 16, 32, size=40, seed=3)
    overrides = [f"run.output_dir={base / 'out'}", "run.name=tiny", f"data.root={root}", "data.format=kaggle-pneumonia",
                 "preprocess.image_size=32", "train.epochs=1", "train.batch_size=16", "tune.enabled=false",
                 "model.params={blocks: 2, filters: 8, dense_units: 16}",
                 f"quantize.deploy={base / 'no-deploy.yaml'}",
                 "benchmark.warmup=1", "benchmark.latency_iterations=8", "benchmark.throughput_iterations=2",
                 "benchmark.batch_sizes=[1, 8]", "benchmark.batch_size=8", "benchmark.calibration_images=16"]
    config = load_config(None, overrides)
    run_train(config)
    run_freeze(config)
    run_dir = config.run_dir
    from medq.data.readers import read_dataset
    from medq.tfdata import load_split_arrays

    index = read_dataset(config.data, seed=config.run.seed)
    calib, _ = load_split_arrays(index.paths("train")[:16], PreprocessSpec.from_config(config))
    np.save(base / "calib.npy", calib)
    int8 = run_dir / "model_int8.pb"
    subprocess.run([sys.executable, "-c", INC_SCRIPT, str(run_dir / "model_fp32.pb"), str(base / "calib.npy"),
                    str(int8), str(base / "nc_workspace")], check=True, capture_output=True, timeout=600, cwd=base)
    runrecord.commit(run_dir, "quantize", artifacts={"int8_pb": int8})
    return overrides


@pytest.mark.slow  # a trained, frozen and quantized run benchmarked in worker processes
def test_every_tensorflow_path_each_in_its_own_process(tiny_run):
    config = load_config(None, tiny_run + ["benchmark.precisions=[fp32, bf16, int8, int8-bf16]",
                                           "benchmark.reference=[]", "benchmark.instances=[2x1]",
                                           "benchmark.instance_precisions=[int8]"])
    rep = run_benchmark(config)
    check_schema(rep)
    features = hwinfo.cpu_features()
    expected = TF_ROWS if features["bf16"] else ["tensorflow-fp32", "tensorflow-int8"]
    assert [r["id"] for r in rep["results"]] == expected
    rows = {r["id"]: r for r in rep["results"]}
    # one process per row, started by this process, never the same one twice
    pids = [r["pid"] for r in rep["results"]]
    assert len(set(pids)) == len(pids) and os.getpid() not in pids
    assert all(r["parent_pid"] == os.getpid() for r in rep["results"])
    # identical inputs: every worker hashed the same .npy, the one the parent wrote
    npy = config.run_dir / rep["inputs"]["path"]
    assert {r["inputs_sha256"] for r in rep["results"]} == {artifacts.sha256(npy)} == {rep["inputs"]["sha256"]}
    assert rep["inputs"]["n_images"] == 32
    # same thread settings in every worker, as the runtime config says
    assert all(r["threads"]["OMP_NUM_THREADS"] == rep["environment"]["thread_environment"]["OMP_NUM_THREADS"]
               for r in rep["results"])
    assert rows["tensorflow-fp32"]["vs_fp32"]["throughput_speedup"] == pytest.approx(1.0)
    assert rows["tensorflow-int8"]["model"] == "model_int8.pb"
    # multi-instance: two concurrent workers, each pinned to its own core
    (mi,) = rows["tensorflow-int8"]["multi_instance"]
    assert mi["layout"] == "2x1" and mi["throughput_ips"] > 0 and len(mi["per_instance_ips"]) == 2
    assert sorted(map(tuple, mi["cpus"])) == [(0,), (1,)] and len(set(mi["pids"])) == 2
    assert mi["inputs_sha256"] == [rep["inputs"]["sha256"]]
    assert rows["tensorflow-fp32"]["multi_instance"] == []
    for name in ("benchmark.json", "benchmark.md", "benchmark.png"):
        assert (config.run_dir / name).is_file()
    assert json.loads((config.run_dir / "benchmark.json").read_text())["results"][0]["id"] == "tensorflow-fp32"
    manifest = runrecord.read_manifest(config.run_dir)
    assert {"benchmark_json", "benchmark_md", "benchmark_png"} <= set(manifest["artifacts"])
    assert "INT8 vs FP32" in summary_text(rep)
    # every row paired with FP32 on the same images, a verdict in words, operating points and calibration
    # the oracle: each worker's saved probabilities, scored here by sklearn and numpy
    from sklearn.metrics import accuracy_score, roc_auc_score

    truth = pinned.run_index(config, write=False).labels("test").argmax(axis=1)
    probs = {r["id"]: np.load(config.run_dir / "benchmark" / "probs" / f"{r['id']}.npy") for r in rep["results"]}
    base = probs["tensorflow-fp32"]
    # decisions at the run's operating threshold, chosen by train on validation (the positive class's)
    t = runrecord.read_manifest(config.run_dir).facts.thresholds["classes"][rep["classes"][1]]["value"]
    for row in rep["results"]:
        p, fidelity = probs[row["id"]], row["fidelity"]
        assert row["metrics"]["accuracy"] == pytest.approx(accuracy_score(truth, p[:, 1] >= t), abs=1e-9)
        assert row["metrics"]["auc"] == pytest.approx(roc_auc_score(truth, p[:, 1]), abs=1e-9)
        flipped = (p[:, 1] >= t) != (base[:, 1] >= t)
        assert fidelity["flipped_images"] == flipped.sum()
        assert fidelity["flipped_fraction"] == pytest.approx(flipped.mean())
        # the paired DeLong difference's point estimate is the difference of the two empirical AUCs
        assert fidelity["auc_difference"] == pytest.approx(roc_auc_score(truth, p[:, 1]) -
                                                           roc_auc_score(truth, base[:, 1]), abs=1e-9)
        low, high = fidelity["auc_difference_ci"]
        margin = fidelity["margin"]
        inside = -margin <= low and high <= margin
        assert fidelity["equivalent"] is inside and fidelity["verdict"].startswith(
            "equivalent" if inside else ("different", "not shown equivalent"))
    assert rows["tensorflow-fp32"]["fidelity"]["flipped_fraction"] == 0
    assert all({"brier", "ece", "sensitivity_at_specificity"} <= set(r["clinical"]) for r in rep["results"])
    md = (config.run_dir / "benchmark.md").read_text()
    assert "## Fidelity against tensorflow-fp32" in md and "| tensorflow-int8 |" in md.split("## Fidelity")[1]


@pytest.mark.slow  # a trained, frozen and quantized run benchmarked in worker processes
def test_simulated_cpu_without_bf16_and_absent_reference_engines(tiny_run, monkeypatch):
    monkeypatch.setattr(hwinfo, "cpu_features", lambda *a, **k: dict(NO_BF16_CPU))
    monkeypatch.setattr(plan, "installed", lambda module: module not in {"onnxruntime", "openvino", "nncf"})
    config = load_config(None, tiny_run + ["benchmark.precisions=[fp32, bf16, int8-bf16]",
                                           f"benchmark.reference={list(plan.REFERENCE_ROWS)}",
                                           "benchmark.instances=[]", "benchmark.repeats=2"])
    rep = run_benchmark(config)
    check_schema(rep)
    assert [r["id"] for r in rep["results"]] == ["tensorflow-fp32"]
    rounds = rep["results"][0]["rounds"]  # two rounds, each a fresh process on the same inputs
    assert len({r["pid"] for r in rounds}) == 2 and {r["inputs_sha256"] for r in rounds} == {rep["inputs"]["sha256"]}
    reasons = {s["id"]: s["reason"] for s in rep["skipped"]}
    assert "BF16" in reasons["tensorflow-bf16"] and "BF16" in reasons["tensorflow-int8-bf16"]
    assert all("not installed" in reasons[r] for r in plan.REFERENCE_ROWS)
    assert rep["environment"]["cpu"]["bf16"] is False
    md = (config.run_dir / "benchmark.md").read_text()
    assert "## Skipped" in md and "tensorflow-bf16" in md


@pytest.mark.slow
@pytest.mark.skipif(not all(plan.installed(m) for m in ("tf2onnx", "onnxruntime", "openvino", "nncf")),
                    reason="the reference extra (env/requirements-reference.txt) is not installed")
def test_reference_rows_run_in_their_own_processes_on_the_same_inputs(tiny_run, repo_root):
    deploy = Path(repo_root) / "configs" / "deploy.yaml"  # its calibration set: what the reference INT8 models use
    config = load_config(None, tiny_run + [f"quantize.deploy={deploy}", "benchmark.precisions=[fp32]",
                                           "benchmark.instances=[]",
                                           "benchmark.reference=[onnxruntime-fp32, onnxruntime-int8, "
                                           "openvino-fp32, openvino-int8]"])
    rep = run_benchmark(config)
    check_schema(rep)
    rows = {r["id"]: r for r in rep["results"]}
    assert list(rows) == ["tensorflow-fp32", "onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32",
                          "openvino-int8"], rep["skipped"]
    assert len({r["pid"] for r in rep["results"]}) == 5
    assert {r["inputs_sha256"] for r in rep["results"]} == {rep["inputs"]["sha256"]}
    # the FP32 exports compute what TensorFlow computes
    assert rows["onnxruntime-fp32"]["fidelity"]["max_abs_diff"] < 1e-4
    assert rows["openvino-fp32"]["fidelity"]["max_abs_diff"] < 1e-3
    assert rows["openvino-fp32"]["engine_facts"]["inference_precision"] == "f32"
    assert any("the INC calibration set" in note for note in rep["notes"]), rep["notes"]


# --- a new engine is one source file: registered here, it flows through config, plan, builder, worker and report ---

NUMPY_ENGINE = '''
"""A trivial engine: a linear map fitted to nothing (seeded) and a softmax, in numpy."""
import numpy as np

from medq import artifacts, engines


def build(request, target):
    x = request.calibration_images()
    w = np.random.default_rng(0).normal(size=(int(np.prod(x.shape[1:])), 2)).astype(np.float32)
    with artifacts.atomic_path(target) as tmp:
        np.save(tmp, w / np.float32(np.sqrt(w.shape[0])))


def load(request):
    w = np.load(request.model)

    def predict(batch):
        z = batch.reshape(len(batch), -1) @ w * request.options["gain"]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return predict, {"numpy": np.__version__, "gain": request.options["gain"]}


SPEC = engines.register(engines.EngineSpec(
    name="numpy", load=load, needs=("numpy",), install="pip install numpy", version_keys=("PyYAML",),
    offers=(engines.Offer("fp32", "numpy-linear", {"gain": 3.0}), engines.Offer("int8", "int8_pb")),
    recipes=(engines.Recipe("numpy-linear", "numpy_linear.npy", "fp32_pb", build, calibrated=True),)))
'''


@pytest.fixture
def numpy_engine(tmp_path, monkeypatch):
    """The engine above as a module of its own, importable here and in the workers (PYTHONPATH), registered for
    this test only."""
    import importlib

    from medq import engines

    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "medq_numpy_engine.py").write_text(NUMPY_ENGINE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    engines.engines()  # the built-in ones first, as in any process
    monkeypatch.setattr(engines, "_ENGINES", dict(engines._ENGINES))
    monkeypatch.setattr(engines, "_RECIPES", dict(engines._RECIPES))
    monkeypatch.delitem(sys.modules, "medq_numpy_engine", raising=False)
    return importlib.import_module("medq_numpy_engine").SPEC


def test_a_registered_engine_is_planned_like_the_built_in_ones(numpy_engine, tmp_path):
    from medq import engines

    fp32 = tmp_path / "fp32.pb"
    fp32.write_bytes(b"x")
    assert engines.row_ids(reference=True)[-2:] == ("numpy-fp32", "numpy-int8")
    rows, skipped = plan.plan_rows(["fp32"], ["numpy-fp32", "numpy-int8", "numpy-bf16"], FULL_CPU, fp32, None)
    assert [(r.id, r.recipe, r.reference, r.options) for r in rows] == [
        ("tensorflow-fp32", None, False, {"bf16_rewrite": False}), ("numpy-fp32", "numpy-linear", True, {"gain": 3.0})]
    assert set(skipped) == {"numpy-int8", "numpy-bf16"} and skipped["numpy-int8"] == plan.NO_INT8
    assert skipped["numpy-bf16"].startswith("unknown reference row; use one of onnxruntime-fp32, ")
    assert skipped["numpy-bf16"].endswith(", numpy-fp32, numpy-int8")
    _, skipped = plan.plan_rows([], ["numpy-fp32"], FULL_CPU, fp32, None, is_installed=lambda m: m != "numpy")
    assert skipped == {"numpy-fp32": "numpy not installed; pip install numpy"}
    # a recipe made from another is built after it; both come from the run's FP32 graph
    assert engines.recipe_chain(["openvino-int8", "numpy-linear"]) == ["onnx-fp32", "openvino-int8", "numpy-linear"]
    assert engines.root_artifact("openvino-int8") == "fp32_pb"


def test_the_config_offers_the_rows_of_the_registered_engines(tmp_path, monkeypatch, request):
    with pytest.raises(ConfigError, match="'numpy-fp32' is not allowed"):
        load_config(None, ["benchmark.reference=[numpy-fp32]"])
    request.getfixturevalue("numpy_engine")
    assert load_config(None, ["benchmark.reference=[numpy-fp32]"]).benchmark.reference == ["numpy-fp32"]


def test_a_registered_engine_runs_in_its_own_worker_and_reaches_the_report(tiny_run, numpy_engine):
    from importlib import metadata

    config = load_config(None, tiny_run + ["benchmark.precisions=[fp32]", "benchmark.instances=[]",
                                           "benchmark.reference=[numpy-fp32]"])
    rep = run_benchmark(config)
    check_schema(rep)
    rows = {r["id"]: r for r in rep["results"]}
    assert list(rows) == ["tensorflow-fp32", "numpy-fp32"], rep["skipped"]
    row = rows["numpy-fp32"]
    assert row["model"] == os.path.join("benchmark", "reference", "numpy_linear.npy")
    assert row["engine_facts"]["gain"] == 3.0 and row["pid"] not in (os.getpid(), rows["tensorflow-fp32"]["pid"])
    # its probabilities are the engine's on the stage's test inputs, computed here independently
    x = np.load(config.run_dir / rep["inputs"]["path"])
    w = np.load(config.run_dir / row["model"])
    z = x.reshape(len(x), -1).astype(np.float64) @ w * 3.0
    oracle = np.exp(z - z.max(axis=1, keepdims=True))
    oracle /= oracle.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(np.load(config.run_dir / "benchmark" / "probs" / "numpy-fp32.npy"), oracle, atol=1e-5)
    assert row["fidelity"]["n_images"] == len(x)
    # its version key is recorded and shown
    assert rep["environment"]["versions"]["PyYAML"] == metadata.version("PyYAML")
    assert f"PyYAML {metadata.version('PyYAML')}" in (config.run_dir / "benchmark.md").read_text()
    # every row carries its subgroup table: the Kaggle layout has no patient metadata, and the report says so
    assert all(not r["subgroups"]["available"] and "no patient metadata" in r["subgroups"]["note"]
               for r in rep["results"])
    assert "## Subgroups" in (config.run_dir / "benchmark.md").read_text()
