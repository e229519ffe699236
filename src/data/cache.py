"""The preprocessed-image cache on disk (the way MONAI's PersistentDataset is used).

The first read of an image decodes it (a 1024×1024 PNG: ~20 ms) and stores :func:`medq.preprocess.resize`'s result,
uint8 at the model's input size with the source's own channels (224×224×1: 50 KB), as one ``.npy`` file. Every
later epoch, tuning trial, calibration, evaluation and benchmark of any run with the same input size reads that file
instead (~0.1 ms). Normalisation stays on the fly (:func:`medq.preprocess.normalize`), so one cache serves every
normalisation.

An entry is keyed by the source file's identity (resolved path, size, mtime) inside a folder named by the resize
settings and the bit depth 16-bit files are read with (``data.bit_depth``): a changed file or changed preprocessing never serves a stale image, and a file that changes while it is
decoded is not stored. Entries are written to a temporary file and renamed, so an interrupted build leaves only
complete entries and resumes where it stopped; an entry that does not load as the expected array is rebuilt.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medq.errors import DataError

log = logging.getLogger(__name__)

# bump when resize() or the decode changes what is stored (2: 8-bit files resized as uint8; 3: EXIF Orientation
# applied, 16-bit PNG samples scaled by their sBIT significant bits)
CACHE_VERSION = 3


class CacheFull(DataError):
    """The cache's disk is full."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    rebuilt: int = 0
    not_stored: int = 0  # changed while being read, or the disk was full
    bytes_written: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    @property
    def reads(self) -> int:
        return self.hits + self.misses + self.rebuilt


class ImageCache:
    """``get(path)`` → the stored uint8 [S, S, 1|3] image of ``path`` for ``spec``, from the cache or decoded now."""

    def __init__(self, root: str | Path, spec: Any):
        self.spec = spec
        gray = "gray" if spec.channels == 1 else "source"
        depth = "" if spec.bit_depth == "auto" else f"-{spec.bit_depth}bit"  # how 16-bit files without sBIT read
        self.root = Path(root)
        self.folder = self.root / f"{spec.image_size}px-{gray}{depth}-v{CACHE_VERSION}"
        self.stats = CacheStats()
        self.full: CacheFull | None = None  # set once the disk filled up: no more writes, reads go on
        # The .npy headers an entry can have: reading one is then a byte comparison, not numpy's header parser
        # (a third of a cached read's time).
        shapes = [(spec.image_size, spec.image_size, c) for c in ((1,) if spec.channels == 1 else (1, 3))]
        self._headers = {_npy_header(shape): shape for shape in shapes}

    def entry(self, path: str | Path, st: os.stat_result) -> Path:
        key = hashlib.sha1(f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, path: str | Path) -> np.ndarray:
        from medq.data.decode import UnreadableImage
        from medq.preprocess import read_source, resize

        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise UnreadableImage(f"{path}: file not found (gone since the dataset was indexed)") from None
        target = self.entry(path, st)
        damaged = False
        try:
            stored = self._read(target)
            if stored is not None:
                self.stats.add(hits=1)
                return stored
            damaged = True
        except FileNotFoundError:
            pass
        except (OSError, ValueError, EOFError):
            damaged = True
        stored = resize(read_source(path, self.spec), self.spec)
        self.stats.add(**({"rebuilt": 1} if damaged else {"misses": 1}))
        try:
            unchanged = _identity(os.stat(path)) == _identity(st)
        except FileNotFoundError:
            unchanged = False
        if unchanged and self.full is None:
            self._store(target, stored)
        else:
            self.stats.add(not_stored=1)
        return stored

    def _read(self, target: Path) -> np.ndarray | None:
        """The entry's array, of a shape and type this cache writes; None when the header is another (a foreign or
        damaged file) or the data has another length."""
        with open(target, "rb") as fh:
            data = fh.read()
        for header, shape in self._headers.items():
            if data.startswith(header):
                if len(data) != len(header) + int(np.prod(shape)):
                    return None
                return np.frombuffer(data, np.uint8, offset=len(header)).reshape(shape)
        return None

    def _store(self, target: Path, stored: np.ndarray) -> None:
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".npy")
            with os.fdopen(fd, "wb") as fh:
                _write_entry(fh, stored)
            os.replace(tmp, target)
            self.stats.add(bytes_written=target.stat().st_size)
        except OSError as exc:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
            self.stats.add(not_stored=1)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                if self.full is None:
                    self.full = CacheFull(f"{self.root}: the disk is full; the image cache stops growing here "
                                          f"(reads go on from the source files); free space or set data.cache_dir "
                                          "to a larger disk")
                    log.warning("%s", self.full)
            else:
                raise DataError(f"{target.parent}: cannot write the image cache ({exc.strerror or exc}); set "
                                "data.cache_dir to a writable folder, or data.cache: false") from None

    def entry_bytes(self, channels: int = 1) -> int:
        """The size of one entry: the array plus the .npy header."""
        return self.spec.image_size ** 2 * channels + 128

    def missing(self, paths: list[str]) -> list[str]:
        out = []
        for path in paths:
            try:
                if not self.entry(path, os.stat(path)).is_file():
                    out.append(path)
            except OSError:
                continue
        return out

    def check_space(self, paths: list[str], channels: int = 1) -> None:
        """Stop before a long job when the entries still missing for ``paths`` would not fit on the cache's disk."""
        missing = self.missing(paths)
        needed = len(missing) * self.entry_bytes(channels)
        probe = self.root
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if needed > free:
            raise CacheFull(f"{self.root}: the image cache needs {_size(needed)} more for {len(missing):,} images "
                            f"and the disk has {_size(free)} free; free space, set data.cache_dir to a larger disk, "
                            "or data.cache: false")

    def summary(self) -> str:
        s = self.stats
        if not s.reads:
            return f"image cache {self.folder}: not used"
        return (f"image cache {self.folder}: {s.reads:,} reads, hit rate {s.hits / s.reads:.0%} ({s.misses:,} "
                f"decoded and stored, {s.rebuilt:,} damaged entries rebuilt, {s.not_stored:,} not stored), "
                f"{_size(s.bytes_written)} written, {_size(folder_bytes(self.folder))} on disk")


def folder_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def _write_entry(fh, stored: np.ndarray) -> None:
    """A plain .npy file, with the header :meth:`ImageCache._read` expects."""
    fh.write(_npy_header(stored.shape))
    fh.write(np.ascontiguousarray(stored).tobytes())


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The header ``np.save`` writes before a C-ordered uint8 array of ``shape``."""
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_size, st.st_mtime_ns


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def cache_root(config: Any) -> Path | None:
    """The data cache's folder (``data.cache_dir``, default ``<run.output_dir>/cache``), None with ``data.cache:
    false``: the image cache and the DICOM header cache (medq.data.headers) live there."""
    if not config.data.cache:
        return None
    return Path(config.data.cache_dir) if config.data.cache_dir else Path(config.run.output_dir) / "cache"


def image_cache(config: Any, spec: Any) -> ImageCache | None:
    """The configured cache for ``spec`` (:func:`cache_root`)."""
    root = cache_root(config)
    return None if root is None else ImageCache(root, spec)
