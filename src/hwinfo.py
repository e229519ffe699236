"""What the CPU can do (VNNI, AVX512-BF16, AMX) and the thread settings in force: recorded beside every number."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

FLAGS = {"avx512f": "avx512f", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni", "avx512_bf16": "avx512_bf16",
         "amx_bf16": "amx_bf16", "amx_int8": "amx_int8", "amx_tile": "amx_tile"}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "KMP_AFFINITY", "KMP_BLOCKTIME", "TF_ENABLE_ONEDNN_OPTS",
                    "ONEDNN_MAX_CPU_ISA", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("unknown", "", platform.processor()):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    model, flags = _cpuinfo(cpuinfo)
    features = {name: flag in flags for name, flag in FLAGS.items()}
    features["vnni"] = features["avx512_vnni"] or features["avx_vnni"]
    features["bf16"] = features["avx512_bf16"] or features["amx_bf16"]
    return {"model": model, "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(cpuinfo), **features}


def physical_cores(cpuinfo: Path = Path("/proc/cpuinfo")) -> int:
    """Distinct (physical id, core id) pairs; falls back to the logical count."""
    pairs, physical = set(), "0"
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                physical = value.strip()
            elif key.strip() == "core id":
                pairs.add((physical, value.strip()))
    except OSError:
        pass
    return len(pairs) or (os.cpu_count() or 1)


def intra_op_threads(runtime: Any) -> int:
    """The intra-op thread count every measuring process runs with: the runtime section's, 0 meaning every physical
    core."""
    return runtime.intra_op_threads or physical_cores()


def thread_environment(runtime: Any) -> dict[str, str]:
    """Environment variables for a measuring process, from the config's runtime section."""
    threads = intra_op_threads(runtime)
    return {"OMP_NUM_THREADS": str(threads), "KMP_BLOCKTIME": str(runtime.kmp_blocktime),
            "KMP_AFFINITY": runtime.kmp_affinity, "TF_NUM_INTRAOP_THREADS": str(threads),
            "TF_NUM_INTEROP_THREADS": str(runtime.inter_op_threads)}


def thread_settings_in_force() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in THREAD_VARIABLES}
