"""Benchmark presets: a config in configs/<name>.yaml run end to end (data → train → freeze → quantize → benchmark)
through the stage functions, so a headline number is one command: ``medq benchmark --preset chexnet-cpu``."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from medq import artifacts
from medq.errors import ConfigError

log = logging.getLogger("medq")

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


def _stages(verbose: bool) -> list[tuple[str, Callable[[Any, dict[str, Any]], Any]]]:
    from medq.benchmark.runner import run_benchmark
    from medq.freeze import run_freeze
    from medq.pipeline import run_data
    from medq.train import run_train

    def quantize(config: Any, state: dict[str, Any]) -> Any:
        try:
            from medq.quantize import run_quantize
        except ImportError:
            log.warning("preset: medq.quantize is not available; the INT8 rows will be skipped")
            return None
        return run_quantize(config, verbose=verbose)

    return [
        ("data", lambda config, state: state.setdefault("index", run_data(config))),
        ("train", lambda config, state: run_train(config, index=state["index"], verbose=2 if verbose else 0)),
        ("freeze", lambda config, state: run_freeze(config)),
        ("quantize", quantize),
        ("benchmark", lambda config, state: run_benchmark(config, verbose=verbose)),
    ]


def run_preset(name: str, overrides: list[str] | tuple[str, ...] = (), verbose: bool = False) -> dict[str, Any]:
    """Run the preset's whole pipeline; returns the benchmark report, which also records the stage times."""
    from medq.benchmark.report import write_reports
    from medq.config import load_config

    path = preset_path(name)
    config = load_config(path, list(overrides))
    timings: dict[str, float] = {}
    state: dict[str, Any] = {}
    result: Any = None
    for stage, fn in _stages(verbose):
        log.info("preset %s: ── %s ──", name, stage)
        start = time.perf_counter()
        result = fn(config, state)
        timings[stage] = round(time.perf_counter() - start, 1)
        log.info("preset %s: %s done in %.1f s", name, stage, timings[stage])
    report = result
    report["preset"] = {"name": name, "config": str(path), "overrides": list(overrides),
                        "command": " ".join(["medq benchmark --preset", name, *(f"--set {o}" for o in overrides)]),
                        "stage_seconds": timings, "total_seconds": round(sum(timings.values()), 1)}
    written = write_reports(config.run_dir, report)
    artifacts.update_manifest(config.run_dir, "preset", artifacts=written, **report["preset"])
    return report
