"""The run folder and its manifest: the one module that reads and writes them.

A run is ``<run.output_dir>/<run.name>/``. Its ``manifest.json`` is a :class:`Manifest` (schema
:data:`SCHEMA_VERSION`): the config, package versions, the facts later stages need (classes, task, preprocessing,
tensor names), one :class:`Artifact` per file with its sha256 and **what it was made from** (the sha256 of its input
artifacts: split → model.keras → model_fp32.pb → model_int8.pb → benchmark), and one entry per stage.

Guarantees, each because a medical tool must never serve the wrong model silently:

- **Commit, not overwrite.** A stage writes its files under ``.staging/`` and calls :func:`commit`; the commit
  writes a journal (the new manifest and the renames) atomically, then renames the files into place and writes the
  manifest. A kill before the journal leaves the run as it was; a kill after it is rolled forward by the next
  command. The run's files and their manifest entries therefore change together.
- **Lineage.** An artifact whose inputs changed (a retrain replaced model.keras under an older model_fp32.pb), or
  that a failed rerun invalidated, is *stale*: :func:`verified_path` refuses it and names the stage to rerun.
- **Verified loading.** :func:`verified_path` checks that the file is inside the run, exists and has its recorded
  sha256 before anything loads it.
- **One writer.** :func:`writer_lock` (``fcntl.flock`` on ``.lock``) is held by every command that writes the run;
  a second writer stops at once, naming the process that holds it. Readers do not take it.
- **Pinned splits.** :func:`run_index` writes the split (file → split, size, mtime) into ``split.json`` the first
  time a stage of the run reads the data; every later stage of that run uses it (:mod:`medq.data.pinned`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from medq import artifacts as files
from medq.errors import MedqError

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
STAGING = ".staging"
JOURNAL = ".commit.json"
LOCK = ".lock"
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


class RunError(MedqError):
    """The run folder or its record is missing, damaged, stale or in use."""


# --- the record ------------------------------------------------------------------------------------------------

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
class Manifest:
    schema_version: int = SCHEMA_VERSION
    medq_version: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    facts: dict[str, Any] = field(default_factory=dict)  # classes, task, preprocess, input_name, ... (top level)
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    # JSON keeps the facts at the top level, where readers of earlier manifests find them.
    def to_dict(self) -> dict[str, Any]:
        return files.finite({"schema_version": self.schema_version, "medq_version": self.medq_version,
                        "versions": self.versions, "config": self.config, **self.facts,
                        "artifacts": {k: dataclasses.asdict(a) for k, a in self.artifacts.items()},
                        "stages": self.stages})

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
        if not isinstance(stages, dict):
            raise RunError(f"{where}: 'stages' is not an object; the run record is damaged")
        reserved = {"schema_version", "medq_version", "versions", "config", "artifacts", "stages"}
        return cls(schema_version=SCHEMA_VERSION, medq_version=str(data.get("medq_version", "")),
                   versions=dict(data.get("versions") or {}), config=data.get("config"),
                   facts={k: v for k, v in data.items() if k not in reserved}, artifacts=entries, stages=stages)

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


# --- reading ---------------------------------------------------------------------------------------------------

def load(run_dir: str | Path) -> Manifest:
    """The run's manifest (an empty one for a new run); a damaged file is a one-line error naming it."""
    run_dir = Path(run_dir)
    _roll_forward_if_free(run_dir)
    path = run_dir / MANIFEST
    if not path.is_file():
        return Manifest()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunError(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:80]}); the run record is damaged — "
                       "rerun the run's stages (or delete the run folder)") from None
    return Manifest.from_dict(data, path)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest as a plain dict (a copy: edits do not reach the run; write through :func:`commit`)."""
    return load(run_dir).to_dict()


def is_run(run_dir: str | Path) -> bool:
    return (Path(run_dir) / MANIFEST).is_file()


def recorded_path(run_dir: str | Path, key: str) -> Path | None:
    """Where artifact ``key`` is, without verifying it (for reports); None when the run has none."""
    entry = load(run_dir).artifacts.get(key)
    return confine(run_dir, entry.path) if entry else None


def verified_path(run_dir: str | Path, key: str, config: Any = None, hint: str | None = None) -> Path:
    """The path of artifact ``key`` after checking it may be loaded: recorded, inside the run, present, not stale,
    and with its recorded sha256. Error messages name the command to run, with ``config``'s --config and
    --run-name (``hint`` overrides the command)."""
    run_dir = Path(run_dir)
    manifest = load(run_dir)
    entry = manifest.artifacts.get(key)
    if entry is None:
        what, file = DESCRIPTION.get(key, (key, key))
        raise RunError(f"{run_dir}: no {what} in this run ({file}); {missing_hint(manifest, key, config, hint)}")
    path = confine(run_dir, entry.path)
    producer = entry.stage if entry.stage not in ("unknown", "split") else PRODUCER.get(key, "train")
    stage_hint = hint or _command(config, producer)
    if not path.is_file():
        raise RunError(f"{path}: recorded in the run's manifest but missing; rerun `{stage_hint}`")
    reason = manifest.stale_reason(key)
    if reason:
        raise RunError(f"{path}: stale, {reason}; rerun `{stage_hint}` (and the stages after it)")
    if files.sha256(path) != entry.sha256:
        raise RunError(f"{path}: changed since `medq {entry.stage}` recorded it (sha256 differs); it is not "
                       f"loaded — rerun `{stage_hint}`")
    return path


def usable(run_dir: str | Path, key: str) -> bool:
    """Whether ``key`` is recorded, present and not stale (for optional inputs such as the INT8 graph)."""
    manifest = load(run_dir)
    entry = manifest.artifacts.get(key)
    return entry is not None and confine(run_dir, entry.path).is_file() and manifest.stale_reason(key) is None


def missing_hint(manifest: Manifest, key: str, config: Any = None, hint: str | None = None) -> str:
    """'run `medq train` first (then freeze)': the first stage in ``key``'s chain whose artifact the run lacks."""
    chain = [key]
    while chain[-1] in NEEDS and NEEDS[chain[-1]] not in manifest.artifacts:
        chain.append(NEEDS[chain[-1]])
    first = chain[-1]
    if first != key:
        then = " → ".join(PRODUCER[k] for k in reversed(chain[:-1]))
        return f"run `{_command(config, PRODUCER.get(first, 'train'))}` first (then {then})"
    return f"run `{hint or _command(config, PRODUCER.get(key, 'train'))}` first"


def _command(config: Any, stage: str) -> str:
    return command(config, stage) if config is not None else f"medq {stage}"


def stale(run_dir: str | Path) -> dict[str, str]:
    manifest = load(run_dir)
    return {k: r for k in manifest.artifacts if (r := manifest.stale_reason(k))}


# --- writing ---------------------------------------------------------------------------------------------------

def staging_dir(run_dir: str | Path) -> Path:
    """The folder a stage writes its artifacts into before :func:`commit` renames them into the run folder."""
    folder = Path(run_dir) / STAGING
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def staging_path(run_dir: str | Path, name: str) -> Path:
    return staging_dir(run_dir) / name


def commit(run_dir: str | Path, stage: str, *, artifacts: dict[str, str | Path] | None = None,
           inputs: tuple[str, ...] | list[str] = (), sources: dict[str, str] | None = None, config: Any = None,
           facts: dict[str, Any] | None = None, invalidate: dict[str, str] | None = None,
           remove: tuple[str, ...] | list[str] = (), **info: Any) -> dict[str, Any]:
    """Record what ``stage`` produced, atomically with the files themselves.

    ``artifacts``: key → file. Files under ``.staging/`` are renamed into the run folder by the commit; others must
    already be inside the run. Each gets ``inputs`` (artifact keys; their current sha256 is recorded) and ``sources``
    (name → sha256 of files outside the run). ``facts`` go to the manifest's top level, ``info`` into
    ``stages[stage]``; ``invalidate`` marks artifacts unusable with a reason, ``remove`` drops entries (their files
    are deleted when they are the run's own). Returns the new manifest as a dict.
    """
    run_dir = Path(run_dir)
    with writer_lock(run_dir, stage):
        manifest = load(run_dir)
        manifest.medq_version = _medq_version()
        manifest.versions = files.package_versions()
        if config is not None:
            manifest.config = config.to_dict() if hasattr(config, "to_dict") else config
        manifest.facts.update(facts or {})
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        made_from = {k: manifest.artifacts[k].sha256 for k in inputs if k in manifest.artifacts}
        renames: list[list[str]] = []
        for key, given in (artifacts or {}).items():
            path = Path(given)
            try:
                relative = path.resolve().relative_to(run_dir.resolve())
            except ValueError:
                raise RunError(f"{path}: an artifact must be written inside the run folder {run_dir}") from None
            if relative.parts[0] == STAGING:
                final = Path(*relative.parts[1:])
                renames.append([str(relative), str(final)])
            else:
                final = relative
            manifest.artifacts[key] = Artifact(
                path=str(final), sha256=files.sha256(path), bytes=path.stat().st_size, stage=stage,
                created_at=now, inputs=dict(made_from), sources=dict(sources or {}))
        for key in remove:
            manifest.artifacts.pop(key, None)
        for key, reason in (invalidate or {}).items():
            if key in manifest.artifacts:
                manifest.artifacts[key].invalidated = reason
        entry = manifest.stages.setdefault(stage, {})
        entry.clear()  # a stage's entry describes its last run only
        entry.update(info)
        entry["finished_at"] = now
        journal = {"renames": renames, "manifest": manifest.to_dict()}
        files.write_text(run_dir / JOURNAL, json.dumps(journal, indent=1, allow_nan=False))
        _apply_journal(run_dir)
        return manifest.to_dict()


def update_stage(run_dir: str | Path, stage: str, **info: Any) -> dict[str, Any]:
    """Record stage facts only (no artifacts)."""
    return commit(run_dir, stage, **info)


def _apply_journal(run_dir: Path) -> None:
    """Finish a commit: rename staged files into place, write the manifest, drop the journal (idempotent)."""
    path = run_dir / JOURNAL
    journal = json.loads(path.read_text(encoding="utf-8"))
    for source, target in journal["renames"]:
        staged = run_dir / source
        if staged.exists():
            final = confine(run_dir, target, path)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
    files.write_text(run_dir / MANIFEST, json.dumps(journal["manifest"], indent=2, allow_nan=False) + "\n")
    path.unlink()


def _roll_forward_if_free(run_dir: Path) -> None:
    """A commit interrupted after its journal was written is finished by the next command that can take the lock."""
    if not (run_dir / JOURNAL).is_file():
        return
    key = str(run_dir.resolve())
    if key in _HELD:
        _apply_journal(run_dir)
        return
    try:
        with writer_lock(run_dir, "recover"):
            pass  # writer_lock rolls forward on acquisition
    except RunLocked:
        pass  # its writer is alive and will finish the commit itself


# --- the lock --------------------------------------------------------------------------------------------------

class RunLocked(RunError):
    """Another process is writing this run."""


_HELD: dict[str, list[int]] = {}  # resolved run folder → [fd, depth]: re-entrant within one process


@contextlib.contextmanager
def writer_lock(run_dir: str | Path, command: str) -> Iterator[None]:
    """Hold the run's writer lock for the block (re-entrant in one process; a second process stops at once)."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise RunLocked(f"{run_dir}: in use by {holder}; wait for it to finish (or stop it) and rerun — two "
                        "commands writing one run would lose each other's results") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} (medq {command}, since {time.strftime('%H:%M:%S')})".encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        if (run_dir / JOURNAL).is_file():
            _apply_journal(run_dir)
        yield
    finally:
        del _HELD[key]
        if not (run_dir / JOURNAL).exists():  # a pending commit still needs its staged files
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)  # what a failed or interrupted stage left
        os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


def holds_lock(run_dir: str | Path) -> bool:
    return str(Path(run_dir).resolve()) in _HELD


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[None]:
    """An exclusive lock beside ``folder`` (e.g. a phantom dataset being generated); waits for the holder."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder.parent / f".{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _medq_version() -> str:
    from medq import __version__

    return __version__


# --- the pinned split ------------------------------------------------------------------------------------------

SPLIT = "split.json"
SPLIT_SETTINGS = ("root", "format", "variant", "val_split", "val_fraction", "test_fraction")


def split_settings(config: Any) -> dict[str, Any]:
    """The settings a split depends on: changing one after the split was pinned needs `medq data --resplit`."""
    return {**{key: getattr(config.data, key) for key in SPLIT_SETTINGS}, "seed": config.run.seed}


def run_index(config: Any, index: Any = None, *, resplit: bool = False, stage: str = "data",
              write: bool = True) -> Any:
    """The run's dataset index with its pinned split.

    ``write=False`` never pins (a process that shares the run without writing it). The first call for a run (or
    ``resplit``) pins ``index`` (default: the dataset read now) into ``split.json``;
    later calls read the dataset again only to see what changed: files added since are ignored with a note, files
    gone are dropped and counted, and changed split settings or classes are an error that names `--resplit`.
    """
    from medq.data.readers import read_dataset

    run_dir = config.run_dir
    current = index if index is not None else read_dataset(config.data, seed=config.run.seed)
    if not write:  # a process that shares the run without writing it (a tuning worker): the pin if there is one
        if "split" not in load(run_dir).artifacts:
            return current
        path = verified_path(run_dir, "split", config, hint=command(config, "data --resplit"))
        return _apply_pin(config, json.loads(path.read_text(encoding="utf-8")), current, path)
    with writer_lock(run_dir, stage):
        manifest = load(run_dir)
        if "split" not in manifest.artifacts or resplit:
            _pin(config, current, stage, replaced="split" in manifest.artifacts)
            return current
        path = verified_path(run_dir, "split", config, hint=command(config, "data --resplit"))
    pinned = json.loads(path.read_text(encoding="utf-8"))
    return _apply_pin(config, pinned, current, path)


def _pin(config: Any, index: Any, stage: str, replaced: bool) -> None:
    from medq.data.common import class_warnings, data_source

    samples = []
    for split, members in index.splits.items():
        for s in members:
            try:
                st = os.stat(s.path)
                identity = [st.st_size, st.st_mtime_ns]
            except OSError:
                identity = [None, None]
            samples.append([s.path, split, s.patient, list(s.label), *identity])
    body = {"schema": 1, "settings": split_settings(config), "format": index.format, "task": index.task,
            "classes": list(index.classes), "samples": samples,
            "columns": ["path", "split", "patient", "label", "bytes", "mtime_ns"]}
    staged = staging_path(config.run_dir, SPLIT)
    files.write_text(staged, json.dumps(files.finite(body), separators=(",", ":"), allow_nan=False))
    commit(config.run_dir, "split", artifacts={"split": staged}, pinned_by=stage, resplit=replaced,
           facts={"data_source": data_source(config.data.root, index.format)},
           split_sizes={k: len(v) for k, v in index.splits.items()}, settings=split_settings(config),
           warnings=class_warnings(index))


def _apply_pin(config: Any, pinned: dict[str, Any], current: Any, path: Path) -> Any:
    from medq.data.index import DatasetIndex, Sample

    fix = f"`medq data --resplit{_run_flags(config)}` splits again (and makes every model of the run stale)"
    now = split_settings(config)
    changed = [f"{k} {pinned['settings'].get(k)!r} → {now[k]!r}" for k in now if pinned["settings"].get(k) != now[k]]
    if changed:
        raise RunError(f"{path}: this run's split was made with other data settings ({'; '.join(changed)}); "
                       f"restore them, or {fix}")
    if list(current.classes) != list(pinned["classes"]) or current.task != pinned["task"]:
        raise RunError(f"{path}: the dataset's classes are now {current.task} {current.classes}, the run was split "
                       f"with {pinned['task']} {pinned['classes']} (a class folder renamed or added?); restore the "
                       f"dataset, or {fix}")
    present = {s.path: s for members in current.splits.values() for s in members}  # real paths
    splits: dict[str, list[Any]] = {name: [] for name in current.splits}
    gone: list[tuple[str, str]] = []
    used: set[str] = set()
    modified = relabelled = 0
    for listed, split, patient, label, size, mtime in pinned["samples"]:
        file = os.path.realpath(listed)  # a pin made before paths were resolved names aliases of one file
        sample = present.pop(file, None)
        if sample is None:
            gone.append((listed, "the same file as an earlier entry of the pinned split (a path alias); used once"
                         if file in used else "in the pinned split but no longer readable in the dataset"))
            continue
        used.add(file)
        if sample.label != tuple(label):
            relabelled += 1
        try:
            st = os.stat(file)
            modified += (st.st_size, st.st_mtime_ns) != (size, mtime)
        except OSError:
            pass
        splits.setdefault(split, []).append(Sample(file, tuple(label), patient))
    notes = list(current.notes) + [f"split pinned in {path.name} ({sum(map(len, splits.values()))} files)"]
    if present:
        notes.append(f"{len(present)} file(s) added to the dataset since the split was pinned are not used; {fix}")
    if gone:
        notes.append(f"{len(gone)} file(s) of the pinned split are gone or unreadable and were dropped")
    if modified:
        notes.append(f"{modified} file(s) changed on disk since the split was pinned (same split, new content)")
    if relabelled:
        notes.append(f"{relabelled} file(s) have another label in the dataset now; the pinned labels are used; {fix}")
    return DatasetIndex(current.format, current.task, list(current.classes), splits,
                        skipped=list(current.skipped) + gone, notes=notes)


def _run_flags(config: Any) -> str:
    """The user's --config and --run-name, for the commands error messages suggest."""
    flags = ""
    if getattr(config, "source", None) not in (None, "defaults", "configs/default.yaml"):
        flags += f" --config {config.source}"
    if config.run.name != "default":
        flags += f" --run-name {config.run.name}"
    return flags


def command(config: Any, stage: str) -> str:
    """`medq <stage>` with the user's --config and --run-name, for "run `...` first" hints."""
    return f"medq {stage}{_run_flags(config)}"


def split_sha(run_dir: str | Path) -> str | None:
    entry = load(run_dir).artifacts.get("split")
    return entry.sha256 if entry else None


def check_classes(run_dir: str | Path, manifest: dict[str, Any], index: Any) -> None:
    """The dataset must have the run's classes in the run's order, or every metric would be silently wrong."""
    recorded = [str(c) for c in manifest.get("classes") or []]
    if recorded and [str(c) for c in index.classes] != recorded:
        raise RunError(f"{Path(run_dir) / MANIFEST}: the run's model predicts {recorded} (in this order) but the "
                       f"dataset has {list(index.classes)}; use the dataset the run was trained on, or retrain")
    task = manifest.get("task")
    if task and index.task != task:
        raise RunError(f"{Path(run_dir) / MANIFEST}: the run's model is {task} but the dataset is {index.task}; "
                       "use the dataset the run was trained on, or retrain")
