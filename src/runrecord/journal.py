"""The commit journal: how a stage's staged files and the new manifest land together.

A stage writes its files under ``.staging/``; a commit writes ``.commit.json`` (the new manifest and the renames)
atomically, then :func:`apply_journal` renames the files into place, writes the manifest and drops the journal. A
kill before the journal leaves the run as it was; a kill after it is rolled forward by the next command (under the
writer lock: :mod:`medq.runrecord.lock`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medq import artifacts as files
from medq.runrecord.record import MANIFEST, confine

STAGING = ".staging"
JOURNAL = ".commit.json"


def staging_dir(run_dir: str | Path) -> Path:
    """The folder a stage writes its artifacts into before the commit renames them into the run folder."""
    folder = Path(run_dir) / STAGING
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def staging_path(run_dir: str | Path, name: str) -> Path:
    return staging_dir(run_dir) / name


def pending(run_dir: Path) -> bool:
    """Whether a commit was interrupted after its journal was written."""
    return (run_dir / JOURNAL).is_file()


def write_journal(run_dir: Path, renames: list[list[str]], manifest: dict[str, Any]) -> None:
    """The commit point: once this file is in place the commit happens, whatever kills the process after."""
    journal = {"renames": renames, "manifest": manifest}
    files.write_text(run_dir / JOURNAL, json.dumps(journal, indent=1, allow_nan=False))


def apply_journal(run_dir: Path) -> None:
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
