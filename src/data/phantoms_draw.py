"""Drawing primitives and file encoding shared by the phantom generators."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from medq.artifacts import write_bytes


def ellipse_r2(h: int, w: int, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0) -> np.ndarray:
    """Squared normalised radius of a rotated ellipse at every pixel (< 1 inside)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ca, sa = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u = (dx * ca + dy * sa) / rx
    v = (-dx * sa + dy * ca) / ry
    return (u * u + v * v).astype(np.float32)


def soft(mask_r2: np.ndarray, edge: float = 0.15) -> np.ndarray:
    """Squared elliptical radius → soft-edged 0..1 mask."""
    return np.clip((1.0 + edge - np.sqrt(mask_r2)) / (2 * edge), 0.0, 1.0)


def smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Smooth random field in [-1, 1] with features about ``scale`` pixels across."""
    small = rng.standard_normal((max(2, int(h / scale)), max(2, int(w / scale)))).astype(np.float32)
    field = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return field / (np.abs(field).max() + 1e-6)


def to_uint(image: np.ndarray, bits: int = 8) -> np.ndarray:
    top = 2 ** bits - 1
    return np.round(np.clip(image, 0.0, 1.0) * top).astype(np.uint8 if bits <= 8 else np.uint16)


def encode(image: np.ndarray, suffix: str, **params: int) -> bytes:
    """uint8/uint16 array → PNG or JPEG bytes (OpenCV channel order for colour)."""
    flags = []
    if suffix in (".jpg", ".jpeg"):
        flags = [cv2.IMWRITE_JPEG_QUALITY, int(params.get("quality", 92))]
    ok, data = cv2.imencode(suffix, image, flags)
    if not ok:
        raise ValueError(f"could not encode a {image.shape} {image.dtype} image as {suffix}")
    return data.tobytes()


def write_image(path: Path, image: np.ndarray, **params: int) -> Path:
    """Encode by the path's suffix and write atomically."""
    return write_bytes(path, encode(image, path.suffix.lower(), **params))
