"""The run folder and its manifest: the one package that reads and writes them, and hands out typed records.

A run is ``<run.output_dir>/<run.name>/``. Its ``manifest.json`` is a :class:`Manifest` (schema
:data:`SCHEMA_VERSION`): the config, package versions, the facts later stages need (:class:`Facts`: classes, task,
preprocessing, tensor names), one :class:`Artifact` per file with its sha256 and **what it was made from** (the
sha256 of its input artifacts: split → model.keras → model_fp32.pb → model_int8.pb → benchmark), and one typed entry
per stage (:mod:`medq.runrecord.entries`: ``manifest.stage(TrainEntry).split_sizes``).

- :mod:`~medq.runrecord.record`: the record's types and its JSON form (what is on disk, schema 2).
- :mod:`~medq.runrecord.entries`: the typed facts and stage entries (unknown keys kept: a round trip changes nothing).
- :mod:`~medq.runrecord.journal`: the commit journal; :mod:`~medq.runrecord.lock`: the one-writer lock.
- :mod:`~medq.runrecord.folder`: loading, verifying and committing (what stages call).

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

The pinned split (``split.json``) is an artifact like the others; the code that makes and applies it reads the
dataset and lives in :mod:`medq.data.pinned` (this package imports nothing from :mod:`medq.data`).
"""
from __future__ import annotations


from medq.runrecord.entries import (BenchmarkEntry, ConvertEntry, DataEntry, Entry, EvaluateEntry, ExportOnnxEntry,
                                    ExternalEvaluation, Facts, FreezeEntry, PresetEntry, QuantizeEntry, RunEntry,
                                    SplitEntry, StageEntry, TrainEntry, TuneEntry, stage_entry)
from medq.runrecord.folder import (check_classes, command, commit, is_run, load, missing_hint, read_manifest,
                                   recorded_path, run_flags, split_sha, stale, update_stage, usable, verified_path)
from medq.runrecord.journal import JOURNAL, STAGING, staging_dir, staging_path
from medq.runrecord.lock import LOCK, RunLocked, folder_lock, holds_lock, writer_lock
from medq.runrecord.record import (DESCRIPTION, KERAS_MODEL, MANIFEST, NEEDS, PRODUCER, SCHEMA_VERSION, Artifact,
                                   Manifest, RunError, confine)

__all__ = [
    "Artifact", "BenchmarkEntry", "ConvertEntry", "DESCRIPTION", "DataEntry", "Entry", "EvaluateEntry",
    "ExportOnnxEntry", "ExternalEvaluation", "Facts", "FreezeEntry", "JOURNAL", "KERAS_MODEL", "LOCK", "MANIFEST",
    "Manifest", "NEEDS",
    "PRODUCER", "PresetEntry", "QuantizeEntry", "RunEntry", "RunError", "RunLocked", "SCHEMA_VERSION", "STAGING",
    "SplitEntry", "StageEntry", "TrainEntry", "TuneEntry", "check_classes", "command", "commit", "confine",
    "folder_lock", "holds_lock", "is_run", "load", "missing_hint", "read_manifest", "recorded_path", "run_flags",
    "split_sha", "stage_entry", "stale", "staging_dir", "staging_path", "update_stage", "usable", "verified_path",
    "writer_lock",
]
