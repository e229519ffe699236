"""Reading and committing a run folder: the record loaded and verified, artifacts looked up, a stage's results
committed (through the journal, under the writer lock)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from medq import artifacts as files
from medq.runrecord.entries import Facts, stage_entry
from medq.runrecord.journal import STAGING, apply_journal, write_journal
from medq.runrecord.lock import roll_forward_if_free, writer_lock
from medq.runrecord.record import DESCRIPTION, MANIFEST, NEEDS, PRODUCER, Artifact, Manifest, RunError, confine


# --- reading ---------------------------------------------------------------------------------------------------

def load(run_dir: str | Path) -> Manifest:
    """The run's manifest (an empty one for a new run); a damaged file is a one-line error naming it."""
    run_dir = Path(run_dir)
    roll_forward_if_free(run_dir)
    path = run_dir / MANIFEST
    if not path.is_file():
        return Manifest()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunError(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:80]}); the run record is damaged — "
                       "rerun the run's stages (or delete the run folder)") from None
    return Manifest.from_dict(data, path)


def read_manifest(run_dir: str | Path) -> Manifest:
    """The run's typed record (a copy: edits do not reach the run; write through :func:`commit`)."""
    return load(run_dir)


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


def stale(run_dir: str | Path) -> dict[str, str]:
    manifest = load(run_dir)
    return {k: r for k in manifest.artifacts if (r := manifest.stale_reason(k))}


def split_sha(run_dir: str | Path) -> str | None:
    entry = load(run_dir).artifacts.get("split")
    return entry.sha256 if entry else None


def check_classes(run_dir: str | Path, recorded: Manifest | Facts | Mapping[str, Any], index: Any) -> None:
    """The dataset must have the run's classes in the run's order, or every metric would be silently wrong.
    ``recorded``: the run's record or its facts (or a mapping with ``classes`` and ``task``)."""
    facts = recorded.facts if isinstance(recorded, Manifest) else \
        recorded if isinstance(recorded, Facts) else Facts.from_dict(recorded)
    classes = [str(c) for c in facts.classes or []]
    if classes and [str(c) for c in index.classes] != classes:
        raise RunError(f"{Path(run_dir) / MANIFEST}: the run's model predicts {classes} (in this order) but the "
                       f"dataset has {list(index.classes)}; use the dataset the run was trained on, or retrain")
    if facts.task and index.task != facts.task:
        raise RunError(f"{Path(run_dir) / MANIFEST}: the run's model is {facts.task} but the dataset is "
                       f"{index.task}; use the dataset the run was trained on, or retrain")


# --- the commands error messages suggest -----------------------------------------------------------------------

def run_flags(config: Any) -> str:
    """The user's --config and --run-name, for the commands error messages suggest."""
    flags = ""
    if getattr(config, "source", None) not in (None, "defaults", "configs/default.yaml"):
        flags += f" --config {config.source}"
    if config.run.name != "default":
        flags += f" --run-name {config.run.name}"
    return flags


def command(config: Any, stage: str) -> str:
    """`medq <stage>` with the user's --config and --run-name, for "run `...` first" hints."""
    return f"medq {stage}{run_flags(config)}"


def _command(config: Any, stage: str) -> str:
    return command(config, stage) if config is not None else f"medq {stage}"


# --- committing ------------------------------------------------------------------------------------------------

def commit(run_dir: str | Path, stage: str, *, artifacts: dict[str, str | Path] | None = None,
           inputs: tuple[str, ...] | list[str] = (), sources: dict[str, str] | None = None, config: Any = None,
           facts: dict[str, Any] | None = None, invalidate: dict[str, str] | None = None,
           remove: tuple[str, ...] | list[str] = (), **info: Any) -> Manifest:
    """Record what ``stage`` produced, atomically with the files themselves.

    ``artifacts``: key → file. Files under ``.staging/`` are renamed into the run folder by the commit; others must
    already be inside the run. Each gets ``inputs`` (artifact keys; their current sha256 is recorded) and ``sources``
    (name → sha256 of files outside the run). ``facts`` go to the manifest's top level, ``info`` into
    ``stages[stage]``; ``invalidate`` marks artifacts unusable with a reason, ``remove`` drops entries (their files
    are deleted when they are the run's own). Returns the new record.
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
        manifest.stages[stage] = stage_entry(stage, {**info, "finished_at": now})  # its last run only
        record = manifest.to_dict()
        write_journal(run_dir, renames, record)
        apply_journal(run_dir)
        return Manifest.from_dict(record, run_dir / MANIFEST)  # as written: non-finite numbers are null


def update_stage(run_dir: str | Path, stage: str, **info: Any) -> Manifest:
    """Record stage facts only (no artifacts)."""
    return commit(run_dir, stage, **info)


def _medq_version() -> str:
    from medq import __version__

    return __version__
