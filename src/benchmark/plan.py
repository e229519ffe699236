"""What the benchmark measures: one row per engine × precision, the rows skipped (with the reason), and the
multi-instance layouts. Pure functions of the config, the run's artifacts, the CPU and the installed packages, so
that every skip rule is testable without running anything."""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from medq.errors import ConfigError

TF_PRECISIONS = ("fp32", "bf16", "int8", "int8-bf16")
REFERENCE_ROWS = ("onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-bf16", "openvino-int8",
                  "openvino-int8-bf16")
BASELINE = "tensorflow-fp32"
NO_BF16 = "this CPU has neither AVX512-BF16 nor AMX-BF16, so the BF16 path would not run natively"
NO_INT8 = "no INT8 graph (int8_pb) in this run; run `medq quantize` first"

# What each reference engine needs installed (import names), beyond the pinned stack's TensorFlow.
REFERENCE_NEEDS = {
    "onnxruntime-fp32": ("tf2onnx", "onnxruntime"),
    "onnxruntime-int8": ("tf2onnx", "onnxruntime"),
    "openvino-fp32": ("tf2onnx", "openvino"),
    "openvino-bf16": ("tf2onnx", "openvino"),
    "openvino-int8": ("tf2onnx", "openvino", "nncf"),
    "openvino-int8-bf16": ("tf2onnx", "openvino", "nncf"),
}
# The prepared model each reference row runs (a key of medq.benchmark.reference.FILES).
REFERENCE_MODEL = {
    "onnxruntime-fp32": "onnx-fp32", "onnxruntime-int8": "onnx-int8", "openvino-fp32": "openvino-fp32",
    "openvino-bf16": "openvino-fp32", "openvino-int8": "openvino-int8", "openvino-int8-bf16": "openvino-int8",
}


@dataclass
class Row:
    """One measured configuration: an engine running one model file at one precision."""

    id: str  # "<engine>-<precision>", e.g. "tensorflow-int8", "openvino-int8-bf16"
    engine: str  # tensorflow | onnxruntime | openvino
    precision: str  # fp32 | bf16 | int8 | int8-bf16
    model: Path | None = None  # None for reference rows until their model is prepared
    options: dict[str, Any] = field(default_factory=dict)  # bf16_rewrite (TF), inference_precision (OpenVINO)

    @property
    def reference(self) -> bool:
        return self.engine != "tensorflow"


@dataclass
class Layout:
    instances: int
    cores_per_instance: int
    source: str = "config"  # config | auto | deploy.yaml

    @property
    def name(self) -> str:
        return f"{self.instances}x{self.cores_per_instance}"


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (checked without importing it)."""
    return importlib.util.find_spec(module) is not None


def plan_rows(precisions: Iterable[str], reference: Iterable[str], features: dict[str, Any], fp32_pb: Path,
              int8_pb: Path | None, is_installed=None) -> tuple[list[Row], dict[str, str]]:
    """TensorFlow rows for the requested precisions, then the reference rows; and {row id: reason} for the rest."""
    from medq.precision import select_precisions

    is_installed = is_installed or installed
    kept, why = select_precisions(list(precisions), features)
    skipped = {f"tensorflow-{p}": reason for p, reason in why.items()}
    rows: list[Row] = []
    for precision in kept:
        row_id = f"tensorflow-{precision}"
        if precision not in TF_PRECISIONS:
            skipped[row_id] = f"unknown precision {precision!r}; use one of {', '.join(TF_PRECISIONS)}"
            continue
        model = fp32_pb if precision in ("fp32", "bf16") else int8_pb
        if model is None or not Path(model).is_file():
            skipped[row_id] = NO_INT8
            continue
        rows.append(Row(row_id, "tensorflow", precision, Path(model), {"bf16_rewrite": precision.endswith("bf16")}))
    for row_id in dict.fromkeys(reference):
        if row_id not in REFERENCE_NEEDS:
            skipped[row_id] = f"unknown reference row; use one of {', '.join(REFERENCE_ROWS)}"
            continue
        engine, _, precision = row_id.partition("-")
        missing = [m for m in REFERENCE_NEEDS[row_id] if not is_installed(m)]
        if missing:
            skipped[row_id] = (f"{', '.join(missing)} not installed; install the reference extra: "
                               ".venv/bin/pip install -r env/requirements-reference.txt")
            continue
        if precision.endswith("bf16") and not features.get("bf16"):
            skipped[row_id] = NO_BF16
            continue
        options = {"inference_precision": "bf16" if precision.endswith("bf16") else "f32"} if engine == "openvino" else {}
        rows.append(Row(row_id, engine, precision, None, options))
    return rows, skipped


# --- multi-instance layouts -------------------------------------------------------------------------------------

def parse_layout(text: str, where: str = "benchmark.instances") -> Layout:
    """'2x1' → 2 instances of 1 core each."""
    left, sep, right = str(text).lower().replace("×", "x").partition("x")
    if not sep or not left.strip().isdigit() or not right.strip().isdigit() or int(left) < 1 or int(right) < 1:
        raise ConfigError(f"{where}: {text!r} is not a layout; write INSTANCESxCORES, e.g. 2x1, or 'auto'")
    return Layout(int(left), int(right))


def deploy_performance(deploy: str | Path | None) -> dict[str, Any]:
    """The deploy.yaml's ``evaluation.performance`` section as medq.inc.deploy reads it (warmup, iteration,
    cores_per_instance, num_of_instance, ...), or {} when there is no deploy file."""
    if not deploy or not Path(deploy).is_file():
        return {}
    from medq.inc.deploy import load_deploy

    return dataclasses.asdict(load_deploy(deploy).performance) | {"file": str(deploy)}


def plan_layouts(requested: Iterable[str], cores: int, performance: dict[str, Any] | None = None
                 ) -> tuple[list[Layout], dict[str, str]]:
    """Layouts to measure and {layout: reason} for those that do not fit the machine's physical cores. An empty
    request measures none (not even the deploy.yaml's)."""
    requested = list(requested)
    if not requested:
        return [], {}
    layouts: list[Layout] = []
    for text in requested:
        if str(text).strip().lower() == "auto":
            layouts += [Layout(1, cores, "auto"), Layout(cores, 1, "auto")]
        else:
            layouts.append(parse_layout(text))
    performance = performance or {}
    if performance.get("num_of_instance") and performance.get("cores_per_instance"):
        layouts.append(Layout(int(performance["num_of_instance"]), int(performance["cores_per_instance"]),
                              "deploy.yaml"))
    kept: list[Layout] = []
    skipped: dict[str, str] = {}
    for layout in layouts:
        same = next((k for k in kept if k.name == layout.name), None)
        if same is not None:
            same.source = same.source if layout.source in same.source else f"{same.source}, {layout.source}"
            continue
        if layout.instances * layout.cores_per_instance > cores:
            skipped[layout.name] = (f"{layout.instances} instances x {layout.cores_per_instance} cores needs "
                                    f"{layout.instances * layout.cores_per_instance} physical cores; this machine "
                                    f"has {cores}")
        else:
            kept.append(layout)
    return kept, skipped


def core_groups(cpuinfo: Path = Path("/proc/cpuinfo"), allowed: Iterable[int] | None = None) -> list[list[int]]:
    """Logical CPU ids grouped by physical core (hyper-thread siblings together), in core order."""
    groups: dict[tuple[str, str], list[int]] = {}
    processor, physical = None, "0"
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            processor = int(value)
        elif key == "physical id":
            physical = value.strip()
        elif key == "core id" and processor is not None:
            groups.setdefault((physical, value.strip()), []).append(processor)
    allowed_set = set(allowed) if allowed is not None else None
    result = [[c for c in cpus if allowed_set is None or c in allowed_set] for cpus in groups.values()]
    result = [g for g in result if g]
    if not result:
        ids = sorted(allowed_set) if allowed_set is not None else list(range(1))
        result = [[c] for c in ids]
    return result


def instance_cpus(layout: Layout, groups: list[list[int]]) -> list[list[int]]:
    """The logical CPUs of each instance: consecutive physical cores, ``cores_per_instance`` each."""
    c = layout.cores_per_instance
    return [sorted(cpu for group in groups[i * c:(i + 1) * c] for cpu in group) for i in range(layout.instances)]
