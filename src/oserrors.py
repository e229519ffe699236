"""A file-system failure (full disk, read-only or unwritable folder, a file where a folder belongs) as one line naming
the folder and what it needs; the CLI prints it instead of "unexpected error"."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
NOT_A_FOLDER = (errno.ENOTDIR, errno.EEXIST)
# TensorFlow's C++ file system raises its own errors carrying only the C library's message.
_MESSAGES = {os.strerror(code): code for code in (*NO_SPACE, *NOT_WRITABLE)}


def file_system_error(exc: BaseException, fallback: Path | None = None) -> tuple[int, Path] | None:
    """(errno, path) of the file-system failure behind ``exc`` (its chain included), or None when it is not one.
    ``fallback``: the path named when the error carries none (TensorFlow's errors name no file)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (*NO_SPACE, *NOT_WRITABLE, *NOT_A_FOLDER):
            name = current.filename if current.filename is not None else fallback
            if name is not None and (current.errno not in NOT_A_FOLDER or _file_in_the_way(Path(os.fsdecode(name)))):
                return current.errno, Path(os.fsdecode(name))
        text = str(current)
        for message, code in _MESSAGES.items():
            if message in text and fallback is not None:
                return code, fallback
        current = current.__cause__ or current.__context__
    return None


def explain(code: int, path: Path) -> str:
    """One line: the folder, what went wrong there and what the write needs."""
    if code in NO_SPACE:
        folder = _existing(path if path.is_dir() else path.parent)
        free = shutil.disk_usage(folder).free
        what = "" if path == folder else f" while writing {path.name}"
        return (f"{folder}: no space left on its disk ({_size(free)} free){what}; free space there (the command "
                "needs room for its files and logs) or write elsewhere (run.output_dir, --output)")
    if code in NOT_A_FOLDER:
        blocker = _file_in_the_way(path)
        return (f"{blocker}: is a file where a folder is expected (to hold {path}); move it away or write "
                "elsewhere (run.output_dir, --output)")
    folder = path if path.exists() else _existing(path.parent)
    if code == errno.EROFS or _read_only(folder):
        reason = "is on a read-only file system"
        need = "mount it read-write"
    else:
        reason = f"is not writable by uid {os.geteuid()}" if hasattr(os, "geteuid") else "is not writable"
        need = "give this user write permission there (chmod/chown)"
    return (f"{folder}: {reason}, and writing {path} needs write access; {need} or write "
            "elsewhere (run.output_dir, --output)")


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _file_in_the_way(path: Path) -> Path | None:
    """The first component of ``path`` that exists and is not a folder (None: nothing is in the way, and an EEXIST
    was about something else, a file created exclusively say)."""
    current = Path(os.path.abspath(path))
    for part in [*reversed(current.parents), current]:
        if part.exists() and not part.is_dir():
            return part
    return None


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"
