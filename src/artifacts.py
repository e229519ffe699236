"""Atomic writes, sha256 and package versions (the run folder and its manifest: :mod:`medq.runrecord`).

Every artifact is written to a temporary file in the same folder and renamed into place, so an interrupted stage never
leaves a half-written model or report behind, and whatever was already written is not lost.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator

# Packages whose versions are recorded beside every number medq writes.
RECORDED_PACKAGES = (
    "intel-tensorflow", "tf-keras", "numpy", "neural-compressor", "keras-tuner", "onnx", "onnxruntime", "tf2onnx",
    "onnx2tf", "openvino", "nncf", "torch", "torchvision", "pydicom", "opencv-python-headless",
)


# mkstemp creates 0600 files; artifacts get the mode a plain open() would give (shared runs, docker mounts).
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + target.suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(target: str | Path, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, obj: Any) -> Path:
    """Strict JSON: NaN and infinity are written as null (strict readers reject bare NaN)."""
    return write_text(target, json.dumps(finite(obj), indent=2, sort_keys=False, default=_json_default,
                                         allow_nan=False) + "\n")


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (also inside numpy arrays and scalars) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return finite(obj.tolist())
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions(extra: Iterable[str] = ()) -> dict[str, str]:
    """Installed versions of RECORDED_PACKAGES and of ``extra`` distributions (absent ones left out)."""
    versions = {"python": platform.python_version()}
    for name in dict.fromkeys((*RECORDED_PACKAGES, *extra)):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
