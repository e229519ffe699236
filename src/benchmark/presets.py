"""Benchmark presets: a config in configs/<name>.yaml run end to end by ``medq run``'s pipeline (its tune stage is
off in the preset), so a headline number is one command: ``medq benchmark --preset chexnet-cpu``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from medq import runrecord
from medq.errors import ConfigError

PRESETS = {
    "chexnet-cpu": "CheXNet-shaped DenseNet121 at 224x224 (3 channels, ImageNet normalisation), 14-label NIH "
                   "ChestX-ray14 phantoms, trained briefly; every TF precision path plus the reference engines",
}


def preset_path(name: str) -> Path:
    """configs/<name>.yaml of the working directory, else of the medq source tree."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: unknown preset; choose one of {', '.join(sorted(PRESETS))}")
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        path = base / "configs" / f"{name}.yaml"
        if path.is_file():
            return path
    raise ConfigError(f"configs/{name}.yaml: preset config not found; run from the medq checkout")


def run_preset(name: str, config: Any, overrides: list[str] | tuple[str, ...] = (),
               verbose: bool = False) -> dict[str, Any]:
    """Run the preset's whole pipeline on ``config`` (``configs/<name>.yaml`` loaded with ``overrides``); returns
    the benchmark report, which also records the stage times and the command that reproduces it."""
    from medq.pipeline import run_all

    with runrecord.writer_lock(config.run_dir, "benchmark --preset"):
        report = run_all(config, verbose=verbose, phantoms=True)  # a preset is defined on its phantoms
        return _record_preset(name, config, overrides, report)


def _record_preset(name: str, config: Any, overrides: list[str] | tuple[str, ...],
                   report: dict[str, Any]) -> dict[str, Any]:
    from medq.benchmark.report import write_reports

    timings = runrecord.read_manifest(config.run_dir)["stages"]["run"]["stage_seconds"]
    report["preset"] = {"name": name, "config_file": config.source, "overrides": list(overrides),
                        "command": " ".join(["medq benchmark --preset", name, *(f"--set {o}" for o in overrides)]),
                        "stage_seconds": timings, "total_seconds": round(sum(timings.values()), 1)}
    written = write_reports(runrecord.staging_dir(config.run_dir), report)
    made_from = ("fp32_pb", "split") + (("int8_pb",) if runrecord.usable(config.run_dir, "int8_pb") else ())
    runrecord.commit(config.run_dir, "preset", artifacts=written, inputs=made_from, **report["preset"])
    return report
