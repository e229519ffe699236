"""Test-time augmentation, one pluggable piece for evaluation and prediction: CheXNet's ten crops."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from medq.preprocess import PreprocessSpec, preprocess


def ten_crop_size(size: int) -> int:
    """Seed 000 resized to 256 and cropped 224; other input sizes keep that ratio: round(S · 256 / 224)."""
    return int(round(size * 256 / 224))


def crops_of(image: np.ndarray, size: int) -> np.ndarray:
    """[L, L, C] → [10, size, size, C]: four corners and the centre, then the same five mirrored left-right."""
    big = image.shape[0]
    o, c = big - size, (big - size) // 2
    crops = [image[:size, :size], image[:size, o:], image[o:, :size], image[o:, o:], image[c:c + size, c:c + size]]
    crops += [crop[:, ::-1] for crop in crops]
    return np.ascontiguousarray(np.stack(crops))


def ten_crops(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A decoded image → [10, S, S, C]: preprocessed at round(S·256/224), then :func:`crops_of`. Normalisation is
    per pixel, so cropping after it equals normalising each crop."""
    return crops_of(preprocess(image, replace(spec, image_size=ten_crop_size(spec.image_size))), spec.image_size)
