"""Decode an image file (JPEG, PNG 8/16-bit, DICOM) to float32 in [0, 1], grayscale [H, W] or RGB [H, W, 3].

Decoding is the only place that knows file formats; everything after it (src/preprocess.py) sees one kind of array.
The file's content decides how it is read, not its name: a PNG saved as ``.jpeg`` decodes as the PNG it is, a DICOM
file without a suffix decodes as DICOM, and a text or HTML file named ``.png`` is reported as not an image.

Two levels of checking:
- :func:`check_header` — cheap (one open, two small reads): empty, not an image, or visibly truncated. Readers run it
  on every file at index time, which keeps indexing 100k-image datasets to seconds.
- :func:`load_image` / :func:`decode_image` — the full decode; ``verify_images`` (medq.data.check) runs it on every
  file of small datasets and ``medq data check`` on a sample.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medq.errors import DataError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm", ".dicom"}
DICOM_SUFFIXES = {".dcm", ".dicom", ""}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
_TAIL = 1024  # bytes read from the end of a JPEG to find its end-of-image marker


class UnreadableImage(DataError):
    """A file that cannot be decoded as an image; readers list it as a skip, or raise it under strict mode."""


def sniff(head: bytes, suffix: str = "") -> str | None:
    """'png' | 'jpeg' | 'dicom' from a file's first 132 bytes, or None when it is none of them."""
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head[128:132] == b"DICM":
        return "dicom"
    # DICOM written without the 128-byte preamble starts with a group 0002 or 0008 tag (little endian).
    if suffix.lower() in DICOM_SUFFIXES and head[:2] in (b"\x02\x00", b"\x08\x00") and len(head) >= 8:
        return "dicom"
    return None


def _describe_content(head: bytes) -> str:
    text = head.lstrip()[:16].lower()
    if text.startswith((b"<!doctype", b"<html", b"<?xml")):
        return "an HTML/XML page"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if head.startswith((b"GIF8", b"BM", b"II*\x00", b"MM\x00*")):
        return "an image format medq does not read (GIF/BMP/TIFF)"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head[:64]):
        return "a text file"
    return f"unknown content (starts with {head[:8].hex(' ')})"


def _truncation(kind: str, tail: bytes) -> str | None:
    if kind == "png" and tail[-12:][4:8] != b"IEND":
        return "truncated PNG (no IEND chunk at the end of the file)"
    if kind == "jpeg" and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    return None


def check_header(path: str | Path) -> str | None:
    """Why ``path`` cannot be an image (empty, not PNG/JPEG/DICOM, truncated), or None if its header looks right.

    One open and two small reads, no pathlib: it runs on every file of 100k-image datasets at index time."""
    name = os.fspath(path)
    try:
        with open(name, "rb", buffering=0) as fh:
            head = fh.read(132)
            if not head:
                return "empty file (0 bytes)"
            suffix = os.path.splitext(name)[1]
            kind = sniff(head, suffix)
            if kind is None:
                return f"not a PNG, JPEG or DICOM file: named {suffix or '(no suffix)'}, content is " \
                       f"{_describe_content(head)}"
            if kind == "dicom":
                return None if len(head) == 132 and fh.read(1) else "truncated DICOM (header only)"
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - (_TAIL if kind == "jpeg" else 12)))
            return _truncation(kind, fh.read())
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"


def is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return sniff(fh.read(132), Path(path).suffix) == "dicom"
    except OSError:
        return False


def decode_image(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Full decode: (float32 [0, 1] gray [H, W] or RGB [H, W, 3], facts about the stored file).

    The facts: ``format`` (png/jpeg/dicom), ``width``, ``height``, ``channels`` (gray/RGB/RGBA), ``bits`` (stored bit
    depth). Raises :class:`UnreadableImage` naming the file and what is wrong with it.
    """
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise UnreadableImage(f"{path}: file not found") from None
    except OSError as exc:
        raise UnreadableImage(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if raw.size == 0:
        raise UnreadableImage(f"{path}: empty file (0 bytes)")
    head = raw[:132].tobytes()
    kind = sniff(head, path.suffix)
    if kind == "dicom":
        from medq.data.dicom import read_dicom

        return read_dicom(path)
    if kind is None:
        raise UnreadableImage(f"{path}: not a PNG, JPEG or DICOM file (content is {_describe_content(head)})")
    problem = _truncation(kind, raw[-_TAIL:].tobytes())
    if problem:
        raise UnreadableImage(f"{path}: {problem}")
    image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UnreadableImage(f"{path}: not a decodable {kind.upper()} (corrupt data)")
    channels = 1 if image.ndim == 2 else image.shape[2]
    info = {"format": kind, "width": int(image.shape[1]), "height": int(image.shape[0]),
            "channels": {1: "gray", 3: "RGB", 4: "RGBA"}.get(channels, f"{channels}-channel"),
            "bits": 16 if image.dtype == np.uint16 else 8}
    return to_unit_float(image, path), info


def load_image(path: str | Path) -> np.ndarray:
    """float32 [0, 1], gray [H, W] or RGB [H, W, 3]; :class:`UnreadableImage` if the file cannot be decoded."""
    return decode_image(path)[0]


def to_unit_float(image: np.ndarray, path: Path | str = "<array>") -> np.ndarray:
    """uint8/uint16 gray, BGR or BGRA (OpenCV's order) → float32 [0, 1], gray [H, W] or RGB [H, W, 3]."""
    if image.dtype == np.uint8:
        scaled = image.astype(np.float32) / 255.0
    elif image.dtype == np.uint16:
        scaled = image.astype(np.float32) / 65535.0
    elif np.issubdtype(image.dtype, np.floating):
        scaled = np.clip(image.astype(np.float32), 0.0, 1.0)
    else:
        raise UnreadableImage(f"{path}: unsupported pixel type {image.dtype}")
    if scaled.ndim == 3 and scaled.shape[2] == 1:
        scaled = scaled[:, :, 0]
    if scaled.ndim == 3:
        if scaled.shape[2] == 4:  # alpha carries no anatomy
            scaled = scaled[:, :, :3]
        if scaled.shape[2] != 3:
            raise UnreadableImage(f"{path}: {scaled.shape[2]} channels; expected gray, RGB or RGBA")
        scaled = np.ascontiguousarray(scaled[:, :, ::-1])  # BGR → RGB
    elif scaled.ndim != 2:
        raise UnreadableImage(f"{path}: {scaled.ndim}-D pixel array; expected a 2-D image")
    return scaled
