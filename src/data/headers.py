"""DICOM header values (RSNA's PatientSex, PatientAge, ViewPosition) read once per file and kept on disk.

Every stage reads the dataset, and a header read costs ~0.3-1.3 ms a file (pydicom, only the asked tags, never the
pixels): up to ~35 s for RSNA's 26,684 files, every stage. So the values are kept beside the image cache
(:mod:`medq.data.cache`, ``data.cache_dir``; ``data.cache: false`` turns both off), one JSON file per image folder
and tag list: ``<cache>/dicom-headers-v1/<sha1 of the folder's real path and the tags>.json``. It holds the text as
the header has it; medq.data.metadata normalises it on every read, so a change there needs no new cache.

An entry is keyed by the file's real path and its size, mtime and ctime (ns): a changed file is read again, never
served stale. ctime is set by the kernel on every change and cannot be set back, so a header edited in place to the
same size with its mtime restored (``rsync -t``, ``touch -r``) is caught too. The identity is taken before the header
is read, so a file that changes meanwhile no longer matches its entry. Not stored (read again next time): a file
whose times are less than ``SETTLE_NS`` old (a rewrite within the file system's clock tick could keep all of them;
git's "racy" case), and one whose header could not be read (a passing I/O error must not stick).

The file is written once, at the end of a dataset read and only when something changed, through
:mod:`medq.artifacts` (temp file + rename): two stages writing at once leave one complete file (the last writer's).
A cache that cannot be written (read-only folder, full disk) never fails a stage: the values are read from the
files, with one warning per process. A damaged cache file is ignored and rebuilt, with one warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

from medq import artifacts
from medq.data.dicom import header_values
from medq.errors import first_line

log = logging.getLogger(__name__)

FOLDER = "dicom-headers-v1"  # bump when what an entry holds changes
SCHEMA = 1
SETTLE_NS = 2_000_000_000  # younger files are read but not stored (coarse file-system timestamps, clock skew)
_warned: set[str] = set()  # the warnings already given in this process


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class HeaderCache:
    """``values(real_path)`` → {tag: text} of a DICOM file in ``folder``, from the cache file or read now; ``save()``
    writes what was added. ``cache_root`` None: every value is read from the files (``data.cache: false``)."""

    def __init__(self, cache_root: str | Path | None, folder: str | Path, tags: Sequence[str]):
        self.tags = tuple(tags)
        self.hits = self.read = 0
        self.path: Path | None = None
        self._entries: dict[str, list] = {}
        self._changed = False
        if cache_root is None:
            return
        real = os.path.realpath(folder)
        key = hashlib.sha1("\0".join((real, *self.tags)).encode()).hexdigest()
        self.path = Path(cache_root) / FOLDER / f"{key}.json"
        self._entries = self._load(real)

    def _load(self, folder: str) -> dict[str, list]:
        try:
            body = json.loads(self.path.read_bytes())
            if (body.get("schema") != SCHEMA or body.get("tags") != list(self.tags)
                    or not isinstance(body.get("entries"), dict)):
                raise ValueError("not a header cache of this medq")
            entries = body["entries"]
            if not all(isinstance(e, list) and len(e) == 4 and isinstance(e[3], list) and len(e[3]) == len(self.tags)
                       and all(isinstance(v, str) for v in e[3]) for e in entries.values()):
                raise ValueError("an entry of another shape")
            return entries
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self._changed = True  # rewritten whole at the end
            _warn_once(f"{self.path}: damaged DICOM header cache of {folder} ({first_line(exc)}); ignored and "
                       "rebuilt (the headers are read from the files once)")
            return {}

    def values(self, real_path: str) -> dict[str, str]:
        """The header values of ``real_path`` (a real path, as ``Intake.real_path`` gives); '' for a tag the header
        lacks, every tag '' when the header cannot be read (the decoder judges the file itself)."""
        try:
            st = os.stat(real_path)
        except OSError:
            st = None
        if st is not None and self.path is not None:
            entry = self._entries.get(real_path)
            if entry is not None and entry[:3] == _identity(st):
                self.hits += 1
                return dict(zip(self.tags, entry[3]))
        found = header_values(real_path, self.tags)
        self.read += 1
        if found is None:
            return {t: "" for t in self.tags}
        if st is not None and self.path is not None and self._settled(st):
            self._entries[real_path] = [*_identity(st), [found[t] for t in self.tags]]
            self._changed = True
        return found

    @staticmethod
    def _settled(st: os.stat_result) -> bool:
        """Old enough that a rewrite would have moved its times. (The entry keeps the times taken before the read:
        a file that changes while it is read, or after, no longer matches it.)"""
        return max(st.st_mtime_ns, st.st_ctime_ns) < time.time_ns() - SETTLE_NS

    def save(self) -> None:
        """Write the cache file when this read added to it (entries of files gone are dropped then)."""
        if self.path is None or not self._changed:
            return
        entries = {p: e for p, e in self._entries.items() if os.path.exists(p)}
        body = {"schema": SCHEMA, "tags": list(self.tags), "entries": entries}
        try:
            artifacts.write_text(self.path, json.dumps(body, separators=(",", ":")))
        except OSError as exc:
            _warn_once(f"{self.path.parent}: cannot write the DICOM header cache ({exc.strerror or first_line(exc)});"
                       " the headers are read from the files on every dataset read (slower, same values); make "
                       "data.cache_dir writable or point it at a writable folder")
        self._changed = False

    def summary(self) -> str:
        if self.path is None:
            return f"DICOM headers: {self.read} read from the files (no data cache in use)"
        return f"DICOM headers: {self.hits} from the header cache {self.path}, {self.read} read from the files"
