"""The benchmark stage: every precision path of a run (and optional reference engines), each measured in its own
process on the same preprocessed test split; results in benchmark.json / benchmark.md / benchmark.png.

    run_benchmark(config, verbose=False) -> dict     the stage (benchmark.json content)
    summary_text(report) -> str                       the one-screen summary `medq run` / `medq benchmark` print
    run_preset(name, config, overrides=(), verbose=False)  `medq run` on configs/<name>.yaml (tune off), report
"""
from __future__ import annotations

from medq.benchmark.report import BENCHMARK_JSON, BENCHMARK_MD, BENCHMARK_PNG, summary_text
from medq.benchmark.runner import run_benchmark


def run_preset(name: str, config, overrides=(), verbose: bool = False) -> dict:
    from medq.benchmark.presets import run_preset as _run_preset

    return _run_preset(name, config, overrides, verbose=verbose)


__all__ = ["run_benchmark", "summary_text", "run_preset", "BENCHMARK_JSON", "BENCHMARK_MD", "BENCHMARK_PNG"]
