"""The CLI parses and calls; bad input ends in one line on stderr and exit code 2, never a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

from medq.cli import COMMANDS, build_parser


def medq(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medq", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_every_stage_has_a_subcommand_with_help():
    parser = build_parser()
    for stage in ("data", "train", "tune", "freeze", "quantize", "benchmark", "run"):
        assert stage in COMMANDS
        args = parser.parse_args([stage, "--config", "x.yaml", "--set", "train.epochs=1"])
        assert args.config == "x.yaml" and args.set == ["train.epochs=1"]


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--config", "missing.yaml"], "missing.yaml: config file not found"),
    (["train", "--set", "train.epochs=-1"], "train.epochs: must be greater than 0"),
    (["freeze", "--set", "run.output_dir=/nonexistent/medq-out"], "no trained model in this run"),
    (["data", "--set", "data.root=/nonexistent/chest_xray", "--set", "data.generate=false"],
     "/nonexistent/chest_xray: dataset folder not found"),
])
def test_bad_input_is_one_clear_line(argv, fragment, repo_root):
    result = medq(*argv, cwd=repo_root)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and fragment in error_lines[0], result.stderr


@pytest.mark.slow  # the preset runs every stage
def test_benchmark_preset_runs_the_pipeline_and_logs_to_the_run(tmp_path, capsys):
    """`medq benchmark --preset chexnet-cpu`, shrunk by --set: data → low-res + full training → freeze → INC →
    benchmark, with the reproducing command in the report and the log under the run."""
    import json

    from medq.cli import main

    shrink = [f"run.output_dir={tmp_path}", f"data.root={tmp_path / 'phantoms'}", "data.phantom.n_train=30",
              "data.phantom.n_test=8", "data.phantom.size=48", "preprocess.image_size=48", "train.epochs=1",
              "model.name=refkit-cnn", "model.params={blocks: 2, filters: 4, dense_units: 8}",  # the plumbing only
              "train.low_res={image_size: 32, epochs: 1}", "benchmark.precisions=[fp32, int8]",
              "benchmark.reference=[]", "benchmark.instances=[]", "benchmark.batch_sizes=[4]",
              "benchmark.batch_size=4", "benchmark.warmup=1", "benchmark.latency_iterations=3",
              "benchmark.throughput_iterations=2",
              f"quantize.deploy={Path(__file__).parent / 'fixtures' / 'wide_criterion_deploy.yaml'}",
              "quantize.allow_chance=true"]
    argv = ["benchmark", "--preset", "chexnet-cpu", "--quiet"] + [a for o in shrink for a in ("--set", o)]
    assert main(argv) == 0
    run = tmp_path / "chexnet-cpu"
    report = json.loads((run / "benchmark.json").read_text())
    assert report["preset"]["name"] == "chexnet-cpu" and "--set train.epochs=1" in report["preset"]["command"]
    assert set(report["preset"]["stage_seconds"]) == {"data", "train", "freeze", "quantize", "benchmark"}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["train"]["low_res"]["image_size"] == 32 and manifest["input_shape"] == [48, 48, 3]
    assert manifest["config"]["model"]["name"] == "refkit-cnn"  # the run's config, not the preset file's name
    assert "quantize:" in (run / "logs" / "benchmark.log").read_text()
    assert "tensorflow-int8" in capsys.readouterr().out


def test_an_unexpected_error_is_one_line_naming_the_log_with_the_traceback(tmp_path, monkeypatch, capsys):
    import medq.freeze
    from medq.cli import main

    def broken(config, parity_inputs=None):
        (config.run_dir / "model.keras").write_bytes(b"x")  # the run has content: its log stays in it
        raise ZeroDivisionError("a bug deep in a stage")

    monkeypatch.setattr(medq.freeze, "run_freeze", broken)
    assert main(["freeze", "--set", f"run.output_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("medq freeze: unexpected error: ZeroDivisionError: a bug deep in a stage")
    log_file = tmp_path / "default" / "logs" / "freeze.log"
    assert f"the traceback is in {log_file}" in err[0]
    assert "Traceback (most recent call last)" in log_file.read_text()


@pytest.mark.parametrize("argv, fragment", [
    (["freeze", "--run-name", ""], "--run-name: the run name is empty"),
    (["freeze", "--set", "run.name="], "run.name: the run name is empty"),
    (["freeze", "--run-name", "../elsewhere"], "'../elsewhere' is not a plain folder name"),
])
def test_a_run_name_is_a_plain_folder_name_never_silently_the_default(argv, fragment, tmp_path, capsys):
    from medq.cli import main

    (tmp_path / "default").mkdir()
    assert main([*argv, "--set", f"run.output_dir={tmp_path}"]) == 2
    assert fragment in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default"]


def test_a_failed_command_leaves_no_empty_run_folder(tmp_path, capsys):
    from medq.cli import main

    assert main(["quantize", "--run-name", "typo", "--set", f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "run `medq train --run-name typo` first (then freeze)" in err  # the stage really missing, the user's flags
    assert not (tmp_path / "typo").exists()
