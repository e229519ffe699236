"""The benchmark stage: every precision path of a run (and optional reference engines), each measured in its own
process on the same preprocessed test split; results in benchmark.json / benchmark.md / benchmark.png.

    run_benchmark(config, verbose=False) -> dict     the stage (benchmark.json content)
    summary_text(report) -> str                       the one-screen summary `medq run` / `medq benchmark` print
"""
from __future__ import annotations

from medq.benchmark.report import BENCHMARK_JSON, BENCHMARK_MD, BENCHMARK_PNG, summary_text
from medq.benchmark.runner import run_benchmark


__all__ = ["run_benchmark", "summary_text", "BENCHMARK_JSON", "BENCHMARK_MD", "BENCHMARK_PNG"]
