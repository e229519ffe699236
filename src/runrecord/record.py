"""The run record: :class:`Manifest` (schema :data:`SCHEMA_VERSION`), its :class:`Artifact` entries and the typed
facts and stage entries (:mod:`medq.runrecord.entries`), read from and written to ``manifest.json``'s JSON form."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, TypeVar

from medq import artifacts as files
from medq.errors import MedqError
from medq.runrecord.entries import Facts, StageEntry, stage_entry

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
KERAS_MODEL = "model.keras"

# The stage whose command makes each artifact: named by error messages ("run `medq quantize` first").
PRODUCER = {
    "split": "data", "keras_model": "train", "train_history": "train", "skipped_files": "train", "fp32_pb": "freeze",
    "int8_pb": "quantize", "quantized_ops": "quantize", "benchmark_json": "benchmark", "benchmark_md": "benchmark",
    "benchmark_png": "benchmark", "evaluation": "evaluate", "fp32_onnx": "export-onnx",
}
# What error messages call them.
DESCRIPTION = {"keras_model": ("trained model", "model.keras"), "fp32_pb": ("frozen FP32 graph", "model_fp32.pb"),
               "int8_pb": ("INT8 graph", "model_int8.pb"), "split": ("pinned split", "split.json")}
# What each artifact needs before it can be made: a missing input names the stage that is really missing.
NEEDS = {"fp32_pb": "keras_model", "int8_pb": "fp32_pb", "benchmark_json": "fp32_pb", "fp32_onnx": "fp32_pb"}

_RESERVED = ("schema_version", "medq_version", "versions", "config", "artifacts", "stages")
E = TypeVar("E", bound=StageEntry)


class RunError(MedqError):
    """The run folder or its record is missing, damaged, stale or in use."""


@dataclass
class Artifact:
    path: str  # relative to the run folder, never outside it
    sha256: str
    bytes: int
    stage: str = "unknown"
    created_at: str = ""
    inputs: dict[str, str] = field(default_factory=dict)  # artifact key → the sha256 it had when this was made
    sources: dict[str, str] = field(default_factory=dict)  # files outside the run (deploy.yaml ...) → sha256
    invalidated: str | None = None  # why it must not be used although its inputs are unchanged


@dataclass
class Manifest(Mapping[str, Any]):
    """A run's manifest. Read it through its typed parts (``facts``, ``artifacts``, :meth:`stage`); the read-only
    mapping over its JSON form (``manifest["classes"]``) is for callers not converted yet."""

    schema_version: int = SCHEMA_VERSION
    medq_version: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    facts: Facts = field(default_factory=Facts)  # classes, task, preprocess, input_name, ... (JSON: the top level)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    stages: dict[str, StageEntry] = field(default_factory=dict)

    def stage(self, entry_type: type[E]) -> E:
        """The typed entry of ``entry_type.STAGE`` (an empty one when the stage has not run)."""
        entry = self.stages.get(entry_type.STAGE)  # from_dict gave it its stage's class
        return entry if entry is not None else entry_type()  # type: ignore[return-value]

    def ran(self, *stages: str) -> list[str]:
        """Which of ``stages`` this run has an entry for, in the order given."""
        return [s for s in stages if s in self.stages]

    # JSON keeps the facts at the top level, where readers of earlier manifests find them.
    def to_dict(self) -> dict[str, Any]:
        return files.finite({"schema_version": self.schema_version, "medq_version": self.medq_version,
                             "versions": self.versions, "config": self.config, **self.facts.to_dict(),
                             "artifacts": {k: dataclasses.asdict(a) for k, a in self.artifacts.items()},
                             "stages": {k: e.to_dict() for k, e in self.stages.items()}})

    @classmethod
    def from_dict(cls, data: Any, where: str | Path) -> "Manifest":
        if not isinstance(data, dict):
            raise RunError(f"{where}: not a JSON object; the run record is damaged — rerun the run's stages "
                           "(or delete the run folder)")
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise RunError(f"{where}: schema_version {version!r} is newer than this medq ({SCHEMA_VERSION}); "
                           "upgrade medq to read this run")
        entries = {}
        for key, raw in (data.get("artifacts") or {}).items():
            if not isinstance(raw, dict):
                raise RunError(f"{where}: artifact {key!r} is not an object; the run record is damaged")
            known = {f.name for f in dataclasses.fields(Artifact)}
            if version == 1:  # before the typed record: no lineage, and hand-made test runs lack hashes
                raw = {"sha256": "", "bytes": 0, **raw}
            try:
                entry = Artifact(**{k: v for k, v in raw.items() if k in known})
            except TypeError:
                raise RunError(f"{where}: artifact {key!r} lacks path, sha256 or bytes; the run record is "
                               "damaged") from None
            confine(Path(where).parent, entry.path, where)
            entries[key] = entry
        stages = data.get("stages") or {}
        if not isinstance(stages, dict) or not all(isinstance(e, dict) for e in stages.values()):
            raise RunError(f"{where}: 'stages' is not an object of objects; the run record is damaged")
        return cls(schema_version=SCHEMA_VERSION, medq_version=str(data.get("medq_version", "")),
                   versions=dict(data.get("versions") or {}), config=data.get("config"),
                   facts=Facts.from_dict({k: v for k, v in data.items() if k not in _RESERVED}), artifacts=entries,
                   stages={name: stage_entry(name, raw) for name, raw in stages.items()})

    # the read-only mapping over the JSON form
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def stale_reason(self, key: str, _seen: frozenset[str] = frozenset()) -> str | None:
        """Why artifact ``key`` must not be used (None: it may): invalidated, or made from inputs that changed."""
        entry = self.artifacts[key]
        if entry.invalidated:
            return entry.invalidated
        for dep, sha in sorted(entry.inputs.items()):
            current = self.artifacts.get(dep)
            if current is None:
                return f"the {dep} it was made from is no longer in the run"
            if current.sha256 != sha:
                return f"it was made from an older {current.path} (replaced by `medq {current.stage}` since)"
            if dep not in _seen:
                upstream = self.stale_reason(dep, _seen | {key})
                if upstream:
                    return f"its input {current.path} is stale: {upstream}"
        return None

    def lineage(self) -> list[dict[str, Any]]:
        """Every artifact with what it was made from and whether it is stale (for `medq runs show`)."""
        return [{"key": key, "path": a.path, "stage": a.stage, "sha256": a.sha256[:12],
                 "made_from": {dep: sha[:12] for dep, sha in a.inputs.items()},
                 "sources": {name: sha[:12] for name, sha in a.sources.items()},
                 "stale": self.stale_reason(key)} for key, a in self.artifacts.items()]


def confine(run_dir: str | Path, relative: str, where: str | Path = MANIFEST) -> Path:
    """``run_dir / relative``, refusing absolute paths and ``..`` (a manifest must not point outside its run)."""
    rel = Path(str(relative))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise RunError(f"{where}: artifact path {relative!r} points outside the run folder; the run record is "
                       "damaged or was edited — rerun the stage that wrote it")
    return Path(run_dir) / rel
