"""Which images calibrate a quantization: drawn from the training split only, stratified by class, unreadable files
replaced by the next in the same order. Quantize feeds them to INC; the benchmark's reference engines (NNCF, ONNX
Runtime) calibrate on the very same list."""
from __future__ import annotations

import math
from functools import reduce
from typing import Any

import numpy as np

CALIBRATION_SPLIT = "train"
MAX_CALIBRATION_BATCH = 32


def calibration_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``min(n, N)`` indices into the training split's ``labels`` [N, K], stratified by class.

    Each class (the first positive label; none for an all-negative multi-label row) is shuffled with ``seed`` and
    spread evenly over the order, so every prefix keeps the split's class proportions: asking for all N gives the
    order in which to replace unreadable files.
    """
    labels = np.asarray(labels, dtype=np.float32)
    total = len(labels)
    if total == 0 or n <= 0:
        return np.zeros(0, dtype=int)
    rng = np.random.default_rng(seed)
    keys = np.where(labels.max(axis=1) > 0, labels.argmax(axis=1), -1)
    position = np.empty(total, dtype=np.float64)
    for key in np.unique(keys):
        members = rng.permutation(np.flatnonzero(keys == key))
        position[members] = (np.arange(len(members)) + 0.5) / len(members)
    order = np.lexsort((keys, position))
    return order[:min(n, total)].astype(int)


def calibration_batch_size(sampling_sizes: list[int], limit: int = MAX_CALIBRATION_BATCH) -> int:
    """The largest batch ≤ ``limit`` dividing every sampling size, so INC consumes exactly that many images."""
    common = reduce(math.gcd, sampling_sizes)
    return max(d for d in range(1, min(limit, common) + 1) if common % d == 0)


def load_calibration(index: Any, spec: Any, sampling_sizes: list[int], seed: int,
                     dropped: dict[str, str] | None = None, cache: Any = None):
    """(images, labels, paths) of up to ``max(sampling_sizes)`` readable training images, in stratified order;
    unreadable ones are replaced by the next in that order (and recorded in ``dropped``)."""
    from medq.tfdata import load_split_arrays

    train = index.splits[CALIBRATION_SPLIT]
    wanted = max(sampling_sizes)
    order = calibration_indices(index.labels(CALIBRATION_SPLIT), len(train), seed)
    images, labels, paths = [], [], []
    position = 0
    while len(paths) < wanted and position < len(order):
        chunk = [train[i] for i in order[position:position + wanted - len(paths)]]
        position += len(chunk)
        loaded, kept = load_split_arrays([s.path for s in chunk], spec, dropped, cache)
        images.extend(loaded)
        labels.extend(chunk[k].label for k in kept)
        paths.extend(chunk[k].path for k in kept)
    shape = (0, *spec.input_shape)
    return (np.stack(images) if images else np.zeros(shape, np.float32),
            np.asarray(labels, np.float32).reshape(len(paths), -1), paths)
