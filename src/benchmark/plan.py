"""What the benchmark measures: one row per engine × precision, the rows skipped (with the reason), and the
multi-instance layouts. Pure functions of the config, the run's artifacts, the CPU and the installed packages, so
that every skip rule is testable without running anything."""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from medq import engines
from medq.errors import ConfigError

BASELINE = "tensorflow-fp32"
NO_BF16 = "this CPU has neither AVX512-BF16 nor AMX-BF16, so the BF16 path would not run natively"
NO_INT8 = "no INT8 graph (int8_pb) in this run; run `medq quantize` first"
TF_PRECISIONS = tuple(o.precision for o in engines.get("tensorflow").offers)
REFERENCE_ROWS = engines.row_ids(reference=True)  # at import; engines registered later: engines.row_ids()


@dataclass
class Row:
    """One measured configuration: an engine running one model file at one precision."""

    id: str  # "<engine>-<precision>", e.g. "tensorflow-int8", "openvino-int8-bf16"
    engine: str  # a medq.engines name: tensorflow | onnxruntime | openvino | ...
    precision: str  # fp32 | bf16 | int8 | int8-bf16
    model: Path | None = None  # None until its recipe is built
    options: dict[str, Any] = field(default_factory=dict)  # the offer's loader options
    recipe: str | None = None  # the medq.engines recipe its model is built by (None: a run artifact)
    reference: bool = False  # a benchmark.reference row (not one of the run's own TensorFlow paths)


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

    run_models = {"fp32_pb": fp32_pb, "int8_pb": int8_pb}
    check = _RowCheck(features, run_models, is_installed or installed)
    kept, why = select_precisions(list(precisions), features)
    skipped = {f"tensorflow-{p}": reason for p, reason in why.items()}
    rows: list[Row] = []
    requested = [(f"tensorflow-{p}", False) for p in kept] + [(r, True) for r in dict.fromkeys(reference)]
    for row_id, is_reference in requested:
        row = check.row(row_id, is_reference)
        if isinstance(row, Row):
            rows.append(row)
        else:
            skipped[row_id] = row
    return rows, skipped


@dataclass
class _RowCheck:
    """The skip rules of one requested row, in order: known, installed, native BF16, its model there."""

    features: dict[str, Any]
    run_models: dict[str, Path | None]
    is_installed: Callable[[str], bool]

    def row(self, row_id: str, reference: bool) -> Row | str:
        found = engines.find_row(row_id)
        if found is None or found[0].reference != reference:
            return f"unknown reference row; use one of {', '.join(engines.row_ids(reference=True))}"
        spec, offer = found
        missing = [m for m in spec.needs_for(offer) if not self.is_installed(m)]
        if missing:
            return f"{', '.join(missing)} not installed; {spec.install}"
        if offer.bf16 and not self.features.get("bf16"):
            return NO_BF16
        source = engines.root_artifact(offer.model)  # the run artifact its model is, or is built from
        model = self.run_models.get(source)
        if model is None or not Path(model).is_file():
            return NO_INT8 if source == "int8_pb" else f"no {source} in this run"
        recipe = offer.model if engines.is_recipe(offer.model) else None
        return Row(row_id, spec.name, offer.precision, None if recipe else Path(model), dict(offer.options), recipe,
                   reference)


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
