"""Run folders, atomic writes and the run manifest.

Every artifact is written to a temporary file in the same folder and renamed into place, so an interrupted stage never
leaves a half-written model or report behind, and whatever was already written is not lost.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"

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
    return write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


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


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def update_manifest(run_dir: str | Path, stage: str, *, config: Any = None, artifacts: dict[str, str | Path] = (),
                    **info: Any) -> dict[str, Any]:
    """Record what ``stage`` produced: artifact paths (relative to the run) with sha256, and stage facts.

    ``info`` keys are merged into the manifest's ``stages[stage]`` entry; top-level facts that later stages read
    (tensor names, class names, preprocessing) go in via ``info['top']``.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    manifest.setdefault("medq_version", _medq_version())
    manifest["versions"] = package_versions()
    if config is not None:
        manifest["config"] = config.to_dict() if hasattr(config, "to_dict") else config
    manifest.update(info.pop("top", {}))
    entries = manifest.setdefault("artifacts", {})
    for key, path in dict(artifacts).items():
        path = Path(path)
        entries[key] = {"path": os.path.relpath(path, run_dir), "sha256": sha256(path), "bytes": path.stat().st_size}
    stage_entry = manifest.setdefault("stages", {}).setdefault(stage, {})
    stage_entry.update(info)
    stage_entry["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(run_dir / MANIFEST, manifest)
    return manifest


def artifact_path(run_dir: str | Path, key: str) -> Path | None:
    entry = read_manifest(run_dir).get("artifacts", {}).get(key)
    return Path(run_dir) / entry["path"] if entry else None


def _medq_version() -> str:
    from medq import __version__

    return __version__
