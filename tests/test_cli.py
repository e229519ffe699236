"""The CLI parses and calls; bad input ends in one line on stderr and exit code 2, never a traceback."""
import subprocess
import sys

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
