"""Precision paths: which of FP32, BF16 (oneDNN's auto-mixed-precision rewrite), INT8 and INT8+BF16 a CPU runs
natively. Quantize measures each kept path on validation; the benchmark times each on test."""
from __future__ import annotations

from typing import Any

PRECISIONS = ("fp32", "bf16", "int8", "int8-bf16")
BF16_PATHS = ("bf16", "int8-bf16")


def select_precisions(requested: list[str], features: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The requested precision paths this CPU can run, in order, and ``{skipped path: reason}``.

    ``features`` is :func:`medq.hwinfo.cpu_features` (or a simulated dict with ``bf16``/``avx512_bf16``/``amx_bf16``).
    FP32 and INT8 run everywhere (without VNNI oneDNN's INT8 kernels are merely slower); the BF16 paths need
    AVX512-BF16 or AMX-BF16, otherwise oneDNN's BF16 rewrite would run emulated or not at all.
    """
    kept: list[str] = []
    skipped: dict[str, str] = {}
    has_bf16 = bool(features.get("bf16") or features.get("avx512_bf16") or features.get("amx_bf16"))
    for path in requested:
        if path in kept or path in skipped:
            continue
        if path not in PRECISIONS:
            skipped[path] = f"unknown precision path; medq knows {', '.join(PRECISIONS)}"
        elif path in BF16_PATHS and not has_bf16:
            skipped[path] = ("this CPU has neither AVX512-BF16 nor AMX-BF16, so oneDNN's BF16 rewrite would not "
                             "run natively")
        else:
            kept.append(path)
    return kept, skipped


def describe_cpu(features: dict[str, Any]) -> str:
    """'<model>: VNNI yes, AVX512-BF16 no, AMX-BF16 no, AMX-INT8 no'."""
    def yes(flag: str) -> str:
        return "yes" if features.get(flag) else "no"

    return (f"{features.get('model', 'unknown CPU')}: VNNI {yes('vnni')}, AVX512-BF16 {yes('avx512_bf16')}, "
            f"AMX-BF16 {yes('amx_bf16')}, AMX-INT8 {yes('amx_int8')}")
