"""One writer per run: :func:`writer_lock` (``fcntl.flock`` on ``.lock``) is held by every command that writes the
run; a second writer stops at once, naming the process that holds it. Readers do not take it. Taking it finishes a
commit that was interrupted after its journal (:mod:`medq.runrecord.journal`)."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from medq.runrecord.journal import JOURNAL, STAGING, apply_journal, pending
from medq.runrecord.record import RunError

LOCK = ".lock"


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
        if pending(run_dir):
            apply_journal(run_dir)
        yield
    finally:
        del _HELD[key]
        if not (run_dir / JOURNAL).exists():  # a pending commit still needs its staged files
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)  # what a failed or interrupted stage left
        os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


def holds_lock(run_dir: str | Path) -> bool:
    return str(Path(run_dir).resolve()) in _HELD


def roll_forward_if_free(run_dir: Path) -> None:
    """A commit interrupted after its journal was written is finished by the next command that can take the lock."""
    if not pending(run_dir):
        return
    if holds_lock(run_dir):
        apply_journal(run_dir)
        return
    try:
        with writer_lock(run_dir, "recover"):
            pass  # writer_lock rolls forward on acquisition
    except RunLocked:
        pass  # its writer is alive and will finish the commit itself


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
