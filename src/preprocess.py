"""The one preprocessing function. Training, calibration, evaluation, benchmarking and prediction all call it.

decoded image (any size, gray or RGB; 8-bit pixels or float in [0, 1]) → :func:`resize` to the input size, 8-bit
(what the disk cache of :mod:`medq.data.cache` stores) → :func:`normalize`: channel count the model expects,
normalisation. The reference kit divided calibration images by 255 twice; here each pixel is scaled exactly once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from medq.data.decode import load_pixels

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class PreprocessSpec:
    image_size: int
    channels: int
    normalization: str  # 'unit' | 'imagenet' | 'symmetric'
    # data.bit_depth: how 16-bit samples without an sBIT chunk are read. It travels with the run's preprocessing so
    # that every stage, predict and serve read a file's pixels exactly as training did (runs recorded before it: auto).
    bit_depth: int | str = "auto"

    @classmethod
    def from_config(cls, config: Any) -> "PreprocessSpec":
        pre = config.preprocess
        return cls(image_size=pre.image_size, channels=pre.channels, normalization=pre.normalization,
                   bit_depth=config.data.bit_depth)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessSpec":
        bit_depth = data.get("bit_depth", "auto")
        return cls(image_size=int(data["image_size"]), channels=int(data["channels"]),
                   normalization=str(data["normalization"]), bit_depth=bit_depth if bit_depth == "auto"
                   else int(bit_depth))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)


def preprocess(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Decoded image (float32 [0, 1] or 8-bit pixels, [H, W] or [H, W, 3]) → float32 [S, S, C] for the model."""
    return normalize(resize(image, spec), spec)


def resize(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The first half of :func:`preprocess`, what the disk cache stores: the image at the model's input size as
    uint8, gray [S, S, 1] when the source is gray or the model takes one channel, else RGB [S, S, 3]. A 224×224
    radiograph is 50 KB instead of the 600 KB of its float32 three-channel input.

    ``image``: float32 [0, 1], or the uint8 pixels of an 8-bit file (:func:`medq.data.decode.load_pixels`), which
    OpenCV resizes without a float copy; both give the same 8-bit result up to OpenCV's rounding."""
    if image.ndim == 3 and spec.channels == 1:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    size = (spec.image_size, spec.image_size)
    shrinking = image.shape[0] > spec.image_size or image.shape[1] > spec.image_size
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    # 8 bits after resizing: the precision of the PNGs CheXNet-style models are trained on
    stored = image if image.dtype == np.uint8 else np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return stored[:, :, None] if stored.ndim == 2 else stored


def normalization_affine(spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """The model's input units as one per-channel affine map of the stored uint8 pixel: input = stored * scale +
    offset, float32 [C] each: what :func:`normalize` applies."""
    channels = spec.channels
    if spec.normalization == "imagenet":
        mean = IMAGENET_MEAN if channels == 3 else IMAGENET_MEAN.mean(keepdims=True)
        std = IMAGENET_STD if channels == 3 else IMAGENET_STD.mean(keepdims=True)
        return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)
    if spec.normalization == "symmetric":
        return np.full(channels, 2.0 / 255.0, np.float32), np.full(channels, -1.0, np.float32)
    if spec.normalization == "unit":
        return np.full(channels, 1.0 / 255.0, np.float32), np.zeros(channels, np.float32)
    if spec.normalization == "raw":  # the model rescales and normalises inside itself (medq.models.ModelEntry)
        return np.ones(channels, np.float32), np.zeros(channels, np.float32)
    raise ValueError(f"unknown normalization {spec.normalization!r}")


def model_channels(stored: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 [S, S, 1 or 3] → uint8 [S, S, C]: a gray image repeated into the three channels a model may take."""
    if stored.shape[2] == spec.channels:
        return stored
    return cv2.cvtColor(stored, cv2.COLOR_GRAY2RGB)  # 40x faster than numpy's copies (gray → 3 only: resize makes RGB gray for C = 1)


def normalize(stored: np.ndarray, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """The second half of :func:`preprocess`, applied on the fly (so one cache serves every normalisation):
    uint8 [S, S, 1 or 3] → float32 [S, S, C] in the model's units (written into ``out`` when given)."""
    scale, offset = normalization_affine(spec)
    matrix = np.concatenate([np.diag(scale), offset[:, None]], axis=1).astype(np.float64)
    # OpenCV's per-pixel affine map: one pass in C, outside the GIL (numpy's broadcasting is 10x slower here)
    result = cv2.transform(model_channels(stored, spec).astype(np.float32), matrix, dst=out)
    return result if result.ndim == 3 else result[:, :, None]


def read_source(path: str | Path, spec: PreprocessSpec) -> np.ndarray:
    """The decoded image :func:`preprocess` takes, read as ``spec`` says (its bit depth)."""
    return load_pixels(path, bit_depth=spec.bit_depth)


def load_and_preprocess(path: str | Path, spec: PreprocessSpec) -> np.ndarray:
    return preprocess(read_source(path, spec), spec)


def load_batch(paths: list[str], spec: PreprocessSpec) -> np.ndarray:
    """Preprocess many files into one [N, S, S, C] array (evaluation, calibration, benchmark inputs)."""
    out = np.empty((len(paths), *spec.input_shape), dtype=np.float32)
    for i, path in enumerate(paths):
        out[i] = load_and_preprocess(path, spec)
    return out
