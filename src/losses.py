"""Losses by name: cross-entropy for softmax heads, (class-weighted) binary cross-entropy and focal loss for sigmoid."""
from __future__ import annotations

import numpy as np

from medq.errors import ConfigError


def resolve_loss_name(name: str, task: str) -> str:
    if name == "auto":
        return "bce" if task == "multilabel" else "cce"
    if task != "multilabel" and name in ("bce", "weighted-bce"):
        raise ConfigError(f"train.loss: {name} is for multilabel (sigmoid) heads; this task is {task}: use cce or focal")
    if task == "multilabel" and name == "cce":
        raise ConfigError("train.loss: cce needs one class per image; a multilabel task takes bce, weighted-bce or focal")
    return name


def make_loss(name: str, task: str, positive_fraction: np.ndarray | None = None, gamma: float = 2.0):
    """``positive_fraction`` [K]: the share of training images with each label (weighted-bce's weights)."""
    import tensorflow as tf

    name = resolve_loss_name(name, task)
    if name == "cce":
        return tf.keras.losses.CategoricalCrossentropy()
    if name == "bce":
        return tf.keras.losses.BinaryCrossentropy()
    if name == "weighted-bce":
        # CheXNet: positives weighted by the negative share and negatives by the positive share, per label.
        p = tf.constant(np.clip(positive_fraction, 1e-3, 1 - 1e-3), tf.float32)

        def weighted_bce(y_true, y_pred):
            y_pred = tf.clip_by_value(y_pred, 1e-7, 1 - 1e-7)
            loss = -((1 - p) * y_true * tf.math.log(y_pred) + p * (1 - y_true) * tf.math.log(1 - y_pred))
            return tf.reduce_mean(loss, axis=-1)

        return weighted_bce
    if name == "focal":
        if task == "multilabel":
            return tf.keras.losses.BinaryFocalCrossentropy(gamma=gamma)
        return tf.keras.losses.CategoricalFocalCrossentropy(gamma=gamma)
    raise ConfigError(f"train.loss: unknown loss {name!r}")
